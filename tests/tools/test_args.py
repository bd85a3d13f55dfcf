"""HxW size arguments: parsing, malformed text and minimum sides, also through the commands."""

from __future__ import annotations

import argparse
import re

import pytest

from litedetr.cli import main
from litedetr.tools.args import float_in, int_at_least, parse_size, size_type


def test_parse_size():
    assert parse_size("850x1040") == (850, 1040)
    assert parse_size("64X48") == (64, 48)
    assert parse_size("0x160") == (0, 160), "without a minimum the command judges the size"


@pytest.mark.parametrize("text", ["850", "850x", "axb", "1x2x3", ""])
def test_malformed_sizes_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="HxW"):
        parse_size(text)


def test_minimum_side():
    assert size_type(32)("32x40") == (32, 40)
    with pytest.raises(argparse.ArgumentTypeError, match="at least 32x32"):
        size_type(32)("31x40")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["schedule", "--size", "0x64"], "at least 1x1"),
        (["export", "--checkpoint", "m.safetensors", "--size", "16x64"], "at least 32x32"),
        (["flops", "--size", "big"], "HxW"),
    ],
)
def test_commands_name_a_bad_size(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bounded_numbers():
    assert int_at_least(1)("3") == 3 and int_at_least(0)("0") == 0
    assert float_in(0, 1)("1") == 1.0 and float_in(0, 1)("0") == 0.0
    for parse, text, message in [
        (int_at_least(1), "0", "must be an integer >= 1, got 0"),
        (int_at_least(1), "2.5", "must be an integer, got '2.5'"),
        (float_in(0, 1), "1.5", r"must lie in \[0, 1\], got 1.5"),
        (float_in(0, 1), "nan", "must lie in"),
        (float_in(0, low_open=True), "0", r"must lie in \(0, inf\), got 0"),
        (float_in(0, 1, low_open=True, high_open=True), "1", r"must lie in \(0, 1\)"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["predict", "--checkpoint", "m.safetensors", "a.jpg", "--out", "o", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
        (["predict", "--checkpoint", "m.safetensors", "a.jpg", "--out", "o", "--threshold", "1.5"], r"argument --threshold: must lie in \[0, 1\], got 1.5"),
        (["eval", "--checkpoint", "m.safetensors", "--data", "d", "--out", "o", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
        (["train", "--model", "dino-r18-tiny", "--data", "d", "--out", "o", "--accumulate", "0"], "argument --accumulate: must be an integer >= 1"),
        (["train", "--model", "dino-r18-tiny", "--data", "d", "--out", "o", "--ema", "1"], r"argument --ema: must lie in \(0, 1\)"),
    ],
)
def test_numeric_arguments_are_checked_by_the_parser(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
