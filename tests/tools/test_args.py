"""HxW size arguments: parsing, malformed text and minimum sides, also through the commands."""

from __future__ import annotations

import argparse

import pytest

from litedetr.cli import main
from litedetr.tools.args import parse_size, size_type


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
