"""The kernel off switch: re-entrant contexts, and the two kernel families that use it."""

from __future__ import annotations

import pytest

from litedetr.ops import cpu_kernels, custom_ops
from litedetr.ops.switch import KernelSwitch


def test_nested_off_contexts():
    switch = KernelSwitch()
    assert switch.on
    with switch.off():
        with switch.off():
            assert not switch.on
        assert not switch.on, "still inside the outer context"
    assert switch.on


def test_off_survives_an_exception():
    switch = KernelSwitch()
    with pytest.raises(RuntimeError), switch.off():
        raise RuntimeError("boom")
    assert switch.on


def test_triton_switch():
    with custom_ops.triton_disabled():
        assert not custom_ops.triton_enabled()
    assert custom_ops.triton_enabled() == custom_ops.TRITON_AVAILABLE


def test_cpu_kernel_switches_are_independent():
    with custom_ops.triton_disabled():
        assert cpu_kernels._switch.on
    with cpu_kernels.cpu_kernels_disabled():
        assert not cpu_kernels._switch.on
        assert custom_ops.triton_enabled() == custom_ops.TRITON_AVAILABLE
