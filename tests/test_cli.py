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
