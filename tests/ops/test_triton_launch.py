"""The Triton launch layer without running a kernel: the device guard, the one-device check, the
autotuning space, and ahead-of-time compilation of every kernel variant for sm_90 (no GPU needed).

The kernels' values are tested in ``test_triton.py`` (under Triton's interpreter, and on CUDA).
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch

pytest.importorskip("triton")


def test_on_device_guards_the_cuda_device() -> None:
    from litedetr.ops import triton_deform_attn as ops

    guard = ops.on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(ops.on_device(torch.device("cpu")), contextlib.nullcontext)


def test_inputs_on_two_devices_are_named() -> None:
    from litedetr.ops import triton_deform_attn as ops

    value, locations, weights = torch.zeros(1, 4, 1, 2), torch.zeros(1, 1, 1, 1, 1, 2, device="meta"), torch.zeros(1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"on one device, got value on cpu, sampling_locations on meta, attention_weights on cpu"):
        ops.msda_forward(value, torch.tensor([[2, 2]]), torch.tensor([0]), locations, weights)


def test_autotuning_space_is_pruned_by_tile_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from litedetr.ops import triton_deform_attn as ops

    space = ops.config_space()
    monkeypatch.setattr(ops, "interpreted", lambda: False)
    for block_d, expected in ((32, 6), (64, 3), (128, 1), (256, 1)):
        kept = ops._prune(space, {}, BLOCK_D=block_d)
        assert len(kept) == expected, block_d
        assert all(c.kwargs["BLOCK_Q"] * block_d <= 8 * 32 * c.num_warps for c in kept) or block_d == 256
    assert {(c.kwargs["BLOCK_Q"], c.num_warps) for c in ops._prune(space, {}, BLOCK_D=32)} >= {(32, 4)}
    monkeypatch.setattr(ops, "interpreted", lambda: True)
    (only,) = ops._prune(space, {}, BLOCK_D=8)
    assert (only.kwargs, only.num_warps) == (ops.default_config(8).kwargs, 4)


def _sm90_signature(fn: Any, constexprs: dict[str, Any], dtype: str) -> dict[str, str]:
    fp32_buffers = {"grad_value_ptr", "grad_key_ptr", "lse_ptr", "parts_ptr", "key_parts_ptr", "value_parts_ptr"}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("shapes_ptr", "starts_ptr", "index_ptr"):
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in fp32_buffers else f"*{dtype}"
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    return signature


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernels_compile_for_sm90(dtype: str) -> None:
    """Ahead-of-time compile (Triton -> PTX -> cubin with the bundled ptxas) at the 800x1333 configuration; no GPU needed.

    Every kernel variant in the default config (the backward with atomics, and deterministic without
    any), and the heaviest kernel with the autotuning space's largest tile (64 queries, 8 warps)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from litedetr.ops import triton_deform_attn as ops
    from litedetr.ops import triton_kernels as kernels

    if ops.interpreted():
        pytest.skip("TRITON_INTERPRET is set in this process")
    common = {"NUM_HEADS": 8, "HEAD_DIM": 32, "NUM_LEVELS": 4, "NUM_POINTS": 4, "BLOCK_D": 32}
    variants = [
        (kernels.msda_fwd_kernel, {}, ops.default_config(32)),
        (kernels.msda_bwd_kernel, {"DETERMINISTIC": False}, ops.default_config(32)),
        (kernels.kda_fwd_kernel, {"SHARED_KV": False}, ops.default_config(32)),
        (kernels.kda_bwd_kernel, {"SHARED_KV": False, "DETERMINISTIC": False}, ops.default_config(32)),
    ]
    if dtype == "fp32":  # the dtype changes only loads and stores: the other variants once
        variants += [
            (kernels.msda_bwd_kernel, {"DETERMINISTIC": True}, ops.default_config(32)),
            (kernels.kda_fwd_kernel, {"SHARED_KV": True}, ops.default_config(32)),
            (kernels.kda_bwd_kernel, {"SHARED_KV": True, "DETERMINISTIC": False}, ops.default_config(32)),
            (kernels.kda_bwd_kernel, {"SHARED_KV": False, "DETERMINISTIC": True}, ops.default_config(32)),
            (kernels.kda_bwd_kernel, {"SHARED_KV": False, "DETERMINISTIC": False}, triton.Config({"BLOCK_Q": 64}, num_warps=8)),
        ]
    for fn, extra, config in variants:
        constexprs = {**common, **extra, **config.kwargs}
        signature = _sm90_signature(fn, constexprs, dtype)
        aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if signature[name].startswith("*")}
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": config.num_warps})
        assert len(compiled.asm["cubin"]) > 0
        if "bwd" in fn.__name__:
            assert ("atom.global" in compiled.asm["ptx"]) is not extra["DETERMINISTIC"], (fn.__name__, extra)
