"""The package's layers: ``ops`` -> ``nn`` -> ``models`` -> ``weights`` -> ``data`` -> ``engine`` -> ``bench`` -> ``tools``/``cli``.
A module imports from its own layer or lower ones, never higher (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "litedetr"
LAYERS = {"ops": 0, "nn": 1, "models": 2, "weights": 3, "data": 4, "engine": 5, "bench": 6, "tools": 7, "cli": 7, "__init__": 8, "__main__": 8}


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


def test_the_readme_layout_names_every_module_and_only_existing_ones():
    readme = (PACKAGE.parents[1] / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```\nops", 1)[1].split("```", 1)[0]
    named: dict[str, set[str]] = {}
    layer = "ops"
    for line in ("ops" + block).splitlines():
        if line[:9].strip():
            layer = line[:9].strip()
        named.setdefault(layer, set()).update(n.strip() for n in line[9:45].replace("(", ",").replace(")", ",").replace(":", ",").split(",") if n.strip())
    for layer in ("ops", "nn", "models", "weights", "data", "engine", "bench"):
        modules = {p.stem for p in (PACKAGE / layer).glob("*.py") if p.stem != "__init__"} | {
            p.name + "/" for p in (PACKAGE / layer).iterdir() if p.is_dir() and p.name != "__pycache__"
        }
        listed = named[layer]
        missing = {m for m in modules if m not in listed and not any(n.endswith("*") and m.startswith(n[:-1]) for n in listed)}
        assert not missing, f"{layer}: not in the README's layout: {sorted(missing)}"
        unknown = {n for n in listed if n not in modules and not (n.endswith("*") and any(m.startswith(n[:-1]) for m in modules))}
        assert not unknown, f"{layer}: the README's layout names what is not there: {sorted(unknown)}"
    assert {p.stem for p in (PACKAGE / "tools").glob("*.py")} - {"__init__", "args", "draw"} <= set(
        readme.split("tools    one module per CLI command", 1)[1].split("```", 1)[0].replace(";", ",").replace(" ", ",").split(",")
    )
