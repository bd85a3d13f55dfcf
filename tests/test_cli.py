"""The command-line interface."""

from __future__ import annotations

import json

from litedetr.cli import main


def test_schedule_reports_paper_token_counts(capsys):
    assert main(["schedule", "--size", "800x1333", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["levels"] == [[100, 167], [50, 84], [25, 42], [13, 21]]  # 16700 / 4200 / 1050 / 273 tokens
    assert [layer["num_queries"] for layer in report["layers"]] == [5523, 22223] * 3
    assert [layer["narrow_ffn_tokens"] for layer in report["layers"]] == [0, 16700] * 3


def test_schedule_standard_encoder(capsys):
    assert main(["schedule", "--standard", "--size", "64x64"]) == 0
    out = capsys.readouterr().out
    assert "standard deformable encoder, 6 layers" in out and "100.0% of a standard encoder" in out


def test_bad_configuration_is_one_clear_line(capsys):
    assert main(["schedule", "--high", "4"]) == 2
    assert capsys.readouterr().err.strip() == "litedetr: error: n_high must be in 1..3, got 4"


def test_models_lists_the_paper_presets(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("deformable-detr-r50", "lite-deformable-detr-r50-h3l1-2x3", "dino-r50", "lite-dino-r50-h3l1-2x3",
                 "lite-dino-r50-h3l1-6x1", "lite-dino-r50-h2l2-2x3", "dino-swint", "lite-dino-swint-h3l1-2x3",
                 "h-detr-r50", "lite-h-detr-r50-h3l1-2x3", "lite-dino-r18-tiny-h3l1-2x3"):  # fmt: skip
        assert f"\n{name} " in out
    assert "H3L1-(2+1)x3, KDA" in out


def test_convert_missing_file_is_one_line(capsys, tmp_path):
    assert main(["convert", str(tmp_path / "none.pth"), "--preset", "dino-r50", "--out", str(tmp_path / "o.safetensors")]) == 2
    assert capsys.readouterr().err == f"litedetr: error: {tmp_path / 'none.pth'}: no such checkpoint file\n"


def test_help_and_version_do_not_import_torch():
    """`litedetr --help` lists every command without importing torch or any command's module (start-up time)."""
    import subprocess
    import sys

    script = (
        "import sys, contextlib, io\n"
        "from litedetr.cli import main, TOOL_COMMANDS\n"
        "for argv in (['--help'], ['--version']):\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "    print(out.getvalue())\n"
        "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('litedetr.models', 'litedetr.tools.train', 'litedetr.engine')))\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True)
    assert "HEAVY []" in result.stdout, result.stdout[-2000:]
    for command in ("train", "eval", "demo", "predict", "export", "explain", "flops", "bench", "schedule", "models", "convert"):
        assert command in result.stdout
    from litedetr import __version__

    assert f"litedetr {__version__}" in result.stdout


def test_a_command_help_shows_its_arguments(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--epochs" in out and "--amp" in out


def test_quiet_and_verbose_set_what_the_library_logs(capsys):
    import logging

    from litedetr.cli import main

    def logged(flag: list[str]) -> str:
        assert main(["models", "r18-tiny", *flag]) == 0
        logging.getLogger("litedetr.models").info("an info line")
        logging.getLogger("litedetr.models").debug("a debug line")
        return capsys.readouterr().err

    assert "an info line" in logged([]) and "a debug line" not in logged([])
    assert logged(["--quiet"]) == ""
    assert "litedetr: a debug line" in logged(["-v"])


def test_log_lines_go_through_tqdm_while_it_is_loaded(monkeypatch, capsys):
    import logging

    import tqdm

    from litedetr.cli import configure_logging

    written = []
    monkeypatch.setattr(tqdm.tqdm, "write", classmethod(lambda cls, text, file=None, **kw: written.append(text)))
    configure_logging()
    logging.getLogger("litedetr.engine").warning("over a progress bar")
    assert written == ["litedetr: warning: over a progress bar"] and capsys.readouterr().err == ""
