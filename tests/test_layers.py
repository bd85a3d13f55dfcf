"""The package's layers: ``ops`` -> ``nn`` -> ``models`` -> ``data`` -> ``engine`` -> ``bench`` -> ``tools``/``cli``.
A module imports from its own layer or lower ones, never higher (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "litedetr"
LAYERS = {"ops": 0, "nn": 1, "models": 2, "data": 3, "engine": 4, "bench": 5, "tools": 6, "cli": 6, "__init__": 7, "__main__": 7}


def upward_imports(source: str, layer: str) -> list[str]:
    """The ``litedetr.<layer>`` imports in ``source`` of layers above ``layer``, with their lines."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "litedetr" and len(parts) > 1 and LAYERS.get(parts[1], -1) > LAYERS[layer]:
                found.append(f"line {node.lineno}: {name}")
    return found


def test_no_module_imports_a_higher_layer():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 50
    layers = {path.relative_to(PACKAGE).parts[0].removesuffix(".py") for path in modules}
    assert layers <= set(LAYERS), f"a layer without a rank: {sorted(layers - set(LAYERS))}"
    wrong = {
        str(path.relative_to(PACKAGE)): bad
        for path in modules
        if (bad := upward_imports(path.read_text(), path.relative_to(PACKAGE).parts[0].removesuffix(".py")))
    }
    assert wrong == {}


def test_the_check_finds_an_upward_import_also_inside_a_function():
    source = "from litedetr.ops import boxes\n\ndef f():\n    from litedetr.engine import Trainer\n    import litedetr.bench.timing\n"
    assert upward_imports(source, "models") == ["line 4: litedetr.engine", "line 5: litedetr.bench.timing"]
    assert upward_imports(source, "bench") == []
