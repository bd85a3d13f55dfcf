"""Fused Triton MSDA / KDA kernels (through the ``litedetr::`` custom ops) against the PyTorch ops.

Triton decides between compiling for a GPU and its CPU interpreter when a kernel is defined, from
``TRITON_INTERPRET`` at that moment; other tests in the same pytest process may already have imported
torch, triton or the kernels. So the kernels run in one child process started with
``TRITON_INTERPRET=1``, and this file is that child's script too (``python test_triton.py CASES
RESULTS``): the parent builds the inputs, the child runs forward and backward through
:mod:`litedetr.ops.custom_ops` (plus ``torch.compile``, ``torch.export`` and ``opcheck`` on tiny
cases) and saves what it got, and the tests compare that with the PyTorch ops run here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

pytest.importorskip("triton")

from litedetr.nn.attention import sampling_locations
from litedetr.ops import ms_deform_attn, ms_deform_attn_key_aware

LEVELS = [(5, 7), (3, 4), (2, 2)]
TINY_LEVELS = [(3, 4), (2, 2)]
CHILD_TIMEOUT_S = 600  # the child takes about 12 s on a quiet machine


def make_case(
    op: str,
    *,
    levels: list[tuple[int, int]],
    b: int,
    lq: int,
    m: int,
    d: int,
    p: int,
    boxes: bool,
    distinct_key: bool = False,
    pad: bool = False,
    dtype: torch.dtype = torch.float32,
    backward: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Random inputs of one op; sampling locations from 2-d points or 4-d boxes, partly outside the maps.

    Returns a dict with ``op`` ("msda" or "kda"), ``spatial_shapes`` ``(L, 2)``, ``inputs`` (value
    ``(B, S, M, D)``, sampling_locations ``(B, Lq, M, L, P, 2)``, and attention_weights
    ``(B, Lq, M, L, P)`` or query ``(B, Lq, M, D)`` [+ key ``(B, S, M, D)``]), ``grad_out``
    ``(B, Lq, M*D)`` and ``backward``.
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.long)
    n_levels = len(levels)
    s = int(shapes.prod(1).sum())
    if boxes:
        centres = torch.rand(b, lq, n_levels, 2, generator=gen)
        sizes = 0.1 + 0.5 * torch.rand(b, lq, n_levels, 2, generator=gen)
        reference = torch.cat([centres, sizes], -1)
        offsets = 2.0 * torch.randn(b, lq, m, n_levels, p, 2, generator=gen)
    else:
        reference = torch.rand(b, lq, n_levels, 2, generator=gen)
        offsets = 1.5 * torch.randn(b, lq, m, n_levels, p, 2, generator=gen)
    inputs = {
        "value": torch.randn(b, s, m, d, generator=gen),
        "sampling_locations": sampling_locations(reference, offsets, shapes),
    }
    if pad:
        padding = torch.zeros(b, s, dtype=torch.bool)
        start = 0
        for h, w in levels:
            rows = torch.arange(h * w) // w
            cols = torch.arange(h * w) % w
            padding[-1, start : start + h * w] = (rows >= h - 1) | (cols >= w - 1)
            start += h * w
        inputs["value"] = inputs["value"].masked_fill(padding[..., None, None], 0.0)
    if op == "msda":
        inputs["attention_weights"] = torch.randn(b, lq, m, n_levels * p, generator=gen).softmax(-1).view(b, lq, m, n_levels, p)
    else:
        inputs["query"] = 2.0 * torch.randn(b, lq, m, d, generator=gen)
        if distinct_key:
            inputs["key"] = torch.randn(b, s, m, d, generator=gen)
    return {
        "op": op,
        "spatial_shapes": shapes,
        "inputs": {name: t.to(dtype) for name, t in inputs.items()},
        "grad_out": torch.randn(b, lq, m * d, generator=gen),
        "backward": backward,
    }


def make_cases() -> dict[str, dict[str, Any]]:
    """Lq = 70 spans two 64-query blocks, the second one partial; D = 6 is not a power of two."""
    return {
        "msda_points_padded": make_case("msda", levels=LEVELS, b=2, lq=70, m=2, d=8, p=2, boxes=False, pad=True, seed=1),
        "msda_boxes_d6": make_case("msda", levels=LEVELS, b=1, lq=37, m=3, d=6, p=3, boxes=True, seed=2),
        "kda_shared_points_padded": make_case("kda", levels=LEVELS, b=2, lq=70, m=2, d=8, p=2, boxes=False, pad=True, seed=3),
        "kda_distinct_boxes_d6": make_case("kda", levels=LEVELS, b=1, lq=37, m=3, d=6, p=3, boxes=True, distinct_key=True, seed=4),
        "msda_bf16": make_case("msda", levels=LEVELS, b=1, lq=40, m=2, d=8, p=2, boxes=False, dtype=torch.bfloat16, backward=False, seed=5),
        "kda_bf16": make_case(
            "kda", levels=LEVELS, b=1, lq=40, m=2, d=8, p=2, boxes=True, distinct_key=True, dtype=torch.bfloat16, backward=False, seed=6
        ),
        "tiny_msda": make_case("msda", levels=TINY_LEVELS, b=1, lq=5, m=2, d=4, p=2, boxes=False, seed=7),
        "tiny_kda": make_case("kda", levels=TINY_LEVELS, b=1, lq=5, m=2, d=4, p=2, boxes=True, distinct_key=True, seed=8),
    }


def forward_backward(case: dict[str, Any], msda: Callable[..., Tensor], kda: Callable[..., Tensor], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Run one case through the given MSDA/KDA functions: ``{"out": ..., "grad_<input>": ...}``."""
    inputs = {name: t.to(dtype or t.dtype).detach().requires_grad_(case["backward"]) for name, t in case["inputs"].items()}
    shapes = case["spatial_shapes"]
    if case["op"] == "msda":
        out = msda(inputs["value"], shapes, inputs["sampling_locations"], inputs["attention_weights"])
    else:
        key = inputs.get("key", inputs["value"])
        out = kda(inputs["query"], key, inputs["value"], shapes, inputs["sampling_locations"])
    result = {"out": out.detach()}
    if case["backward"]:
        out.backward(case["grad_out"].to(out.dtype))
        result.update({f"grad_{name}": t.grad for name, t in inputs.items()})
    return result


def _capture(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    """Store ``fn()`` under ``name``, or the traceback text under ``name + ":error"``."""
    try:
        results[name] = fn()
    except Exception:  # reported to the parent test, which fails with the traceback
        results[f"{name}:error"] = traceback.format_exc()


def run_child(cases_path: str, results_path: str) -> None:
    """The child process: everything through the Triton custom ops, on CPU tensors under the interpreter."""
    cases = torch.load(cases_path, weights_only=False)
    results: dict[str, Any] = {}
    tiny = cases["tiny_msda"]
    ms_deform_attn(**{"spatial_shapes": tiny["spatial_shapes"], **tiny["inputs"]})
    results["cpu_public_op_loaded_kernels"] = "litedetr.ops.triton_deform_attn" in sys.modules

    from litedetr.ops import custom_ops, triton_deform_attn
    from litedetr.ops.geometry import level_start_index

    results["interpreted"] = triton_deform_attn.interpreted()
    for name, case in cases.items():
        _capture(results, name, lambda case=case: forward_backward(case, custom_ops.ms_deform_attn, custom_ops.ms_deform_attn_key_aware))

    compiled_msda = torch.compile(custom_ops.ms_deform_attn, backend="aot_eager", fullgraph=True)
    compiled_kda = torch.compile(custom_ops.ms_deform_attn_key_aware, backend="aot_eager", fullgraph=True)
    for name in ("tiny_msda", "tiny_kda"):
        _capture(results, f"compiled:{name}", lambda name=name: forward_backward(cases[name], compiled_msda, compiled_kda))

    class Exported(torch.nn.Module):
        def forward(self, value: Tensor, spatial_shapes: Tensor, locations: Tensor, weights: Tensor) -> Tensor:
            return custom_ops.ms_deform_attn(value, spatial_shapes, locations, weights)

    def export() -> dict[str, Any]:
        args = (tiny["inputs"]["value"], tiny["spatial_shapes"], tiny["inputs"]["sampling_locations"], tiny["inputs"]["attention_weights"])
        program = torch.export.export(Exported(), args)
        targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
        return {"out": program.module()(*args), "targets": targets}

    _capture(results, "exported:tiny_msda", export)

    def opcheck() -> bool:
        for name, op in (("tiny_msda", torch.ops.litedetr.ms_deform_attn.default), ("tiny_kda", torch.ops.litedetr.ms_deform_attn_key_aware.default)):
            case = cases[name]
            inputs = {k: t.detach().requires_grad_() for k, t in case["inputs"].items()}
            shapes = case["spatial_shapes"]
            starts = level_start_index(shapes)
            if name == "tiny_msda":
                args = (inputs["value"], shapes, starts, inputs["sampling_locations"], inputs["attention_weights"])
                torch.library.opcheck(op, args)
            else:
                for key in (inputs["key"], None):
                    torch.library.opcheck(op, (inputs["query"], key, inputs["value"], shapes, starts, inputs["sampling_locations"]))
        return True

    _capture(results, "opcheck", opcheck)
    torch.save(results, results_path)


@pytest.fixture(scope="module")
def cases() -> dict[str, dict[str, Any]]:
    return make_cases()


@pytest.fixture(scope="module")
def interpreter_results(cases: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("triton_interpreter")
    cases_path, results_path = folder / "cases.pt", folder / "results.pt"
    torch.save(cases, cases_path)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(cases_path), str(results_path)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"interpreter child failed:\n{proc.stdout}\n{proc.stderr}"
    return torch.load(results_path, weights_only=False)


def get_result(results: dict[str, Any], name: str) -> Any:
    assert f"{name}:error" not in results, results.get(f"{name}:error")
    return results[name]


def assert_matches_reference(got: dict[str, Tensor], case: dict[str, Any], atol: float = 1e-4, rtol: float = 1e-4) -> None:
    expected = forward_backward(case, ms_deform_attn, ms_deform_attn_key_aware)
    assert set(got) == set(expected)
    if case["backward"]:
        assert {f"grad_{name}" for name in case["inputs"]} <= set(got)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype, name
        torch.testing.assert_close(got[name], want, atol=atol, rtol=rtol, msg=lambda text, name=name: f"{name}: {text}")


def test_child_runs_the_kernels_in_the_interpreter(interpreter_results: dict[str, Any]) -> None:
    assert interpreter_results["interpreted"] is True
    assert interpreter_results["cpu_public_op_loaded_kernels"] is False


def test_cases_cover_points_outside_the_maps(cases: dict[str, dict[str, Any]]) -> None:
    for name in ("msda_points_padded", "msda_boxes_d6", "kda_shared_points_padded", "kda_distinct_boxes_d6"):
        locations = cases[name]["inputs"]["sampling_locations"]
        outside = ((locations < 0) | (locations > 1)).any(-1).float().mean().item()
        assert 0.05 < outside < 0.6, (name, outside)
    assert (cases["msda_points_padded"]["inputs"]["value"][-1].abs().sum((-2, -1)) == 0).sum() > 10


@pytest.mark.parametrize("name", ["msda_points_padded", "msda_boxes_d6", "tiny_msda"])
def test_msda_forward_and_gradients(interpreter_results: dict[str, Any], cases: dict[str, dict[str, Any]], name: str) -> None:
    got = get_result(interpreter_results, name)
    assert set(got) == {"out", "grad_value", "grad_sampling_locations", "grad_attention_weights"}
    assert_matches_reference(got, cases[name])


@pytest.mark.parametrize("name", ["kda_shared_points_padded", "kda_distinct_boxes_d6", "tiny_kda"])
def test_kda_forward_and_gradients(interpreter_results: dict[str, Any], cases: dict[str, dict[str, Any]], name: str) -> None:
    got = get_result(interpreter_results, name)
    expected_keys = {"out", "grad_query", "grad_value", "grad_sampling_locations"}
    if "key" in cases[name]["inputs"]:
        expected_keys.add("grad_key")
    assert set(got) == expected_keys
    assert_matches_reference(got, cases[name])


@pytest.mark.parametrize("name", ["msda_bf16", "kda_bf16"])
def test_bf16_forward(interpreter_results: dict[str, Any], cases: dict[str, dict[str, Any]], name: str) -> None:
    got = get_result(interpreter_results, name)["out"]
    assert got.dtype == torch.bfloat16
    expected = forward_backward(cases[name], ms_deform_attn, ms_deform_attn_key_aware, dtype=torch.float32)["out"]
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", ["tiny_msda", "tiny_kda"])
def test_torch_compile_traces_the_custom_ops(interpreter_results: dict[str, Any], cases: dict[str, dict[str, Any]], name: str) -> None:
    assert_matches_reference(get_result(interpreter_results, f"compiled:{name}"), cases[name])


def test_torch_export_keeps_the_custom_op(interpreter_results: dict[str, Any], cases: dict[str, dict[str, Any]]) -> None:
    exported = get_result(interpreter_results, "exported:tiny_msda")
    assert "litedetr.ms_deform_attn.default" in exported["targets"]
    expected = forward_backward({**cases["tiny_msda"], "backward": False}, ms_deform_attn, ms_deform_attn_key_aware)["out"]
    torch.testing.assert_close(exported["out"], expected, atol=1e-5, rtol=1e-5)


def test_opcheck(interpreter_results: dict[str, Any]) -> None:
    assert get_result(interpreter_results, "opcheck") is True


def test_ops_import_and_run_without_triton() -> None:
    script = (
        "import sys\n"
        "sys.modules['triton'] = None\n"
        "import torch\n"
        "import litedetr.ops\n"
        "from litedetr.ops import custom_ops\n"
        "assert not custom_ops.TRITON_AVAILABLE and not custom_ops.triton_enabled()\n"
        "value = torch.randn(1, 16, 2, 4)\n"
        "out = litedetr.ops.ms_deform_attn(value, torch.tensor([[4, 4]]), torch.rand(1, 3, 2, 1, 2, 2), torch.rand(1, 3, 2, 1, 2))\n"
        "assert out.shape == (1, 3, 8)\n"
    )
    env = {**os.environ, "LITEDETR_CPU_KERNELS": "0"}  # this test is about Triton: no C++ kernel build in the child
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernels_compile_for_sm90(dtype: str) -> None:
    """Ahead-of-time compile (Triton -> PTX -> cubin with the bundled ptxas) at the 800x1333 configuration; no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from litedetr.ops import triton_deform_attn as kernels

    if kernels.interpreted():
        pytest.skip("TRITON_INTERPRET is set in this process")
    fp32_buffers = {"grad_value_ptr", "grad_key_ptr", "lse_ptr"}
    fwd_q, block_d = kernels._blocks(32, kernels._TILE_ELEMENTS_FWD)
    bwd_q, _ = kernels._blocks(32, kernels._TILE_ELEMENTS_BWD)
    sep_q, _ = kernels._blocks(32, kernels._TILE_ELEMENTS_FWD // 2)
    common = {"NUM_HEADS": 8, "HEAD_DIM": 32, "NUM_LEVELS": 4, "NUM_POINTS": 4, "BLOCK_D": block_d}
    configs = [
        (kernels._msda_fwd_kernel, {"BLOCK_Q": fwd_q}),
        (kernels._msda_bwd_kernel, {"BLOCK_Q": bwd_q}),
        (kernels._kda_fwd_kernel, {"BLOCK_Q": fwd_q, "SHARED_KV": True}),
        (kernels._kda_fwd_kernel, {"BLOCK_Q": sep_q, "SHARED_KV": False}),
        (kernels._kda_bwd_kernel, {"BLOCK_Q": bwd_q, "SHARED_KV": True}),
        (kernels._kda_bwd_kernel, {"BLOCK_Q": bwd_q, "SHARED_KV": False}),
    ]
    for fn, extra in configs:
        constexprs = {**common, **extra}
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in ("shapes_ptr", "starts_ptr"):
                signature[name] = "*i64"
            elif name.endswith("_ptr"):
                signature[name] = "*fp32" if name in fp32_buffers else f"*{dtype}"
            else:
                signature[name] = "fp32" if name == "scale" else "i32"
        aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if signature[name].startswith("*")}
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert len(compiled.asm["cubin"]) > 0
        if "bwd" in fn.__name__:
            assert "atom.global" in compiled.asm["ptx"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op", ["msda", "kda_shared", "kda_distinct"])
def test_cuda_dispatch_matches_pytorch(op: str) -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    from litedetr.ops import custom_ops

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    levels = [(20, 30), (10, 15), (5, 8), (3, 4)]
    kind = "msda" if op == "msda" else "kda"
    case = make_case(kind, levels=levels, b=2, lq=700, m=8, d=32, p=4, boxes=False, distinct_key=op == "kda_distinct", pad=True)
    case = {**case, "spatial_shapes": case["spatial_shapes"].cuda(), "grad_out": case["grad_out"].cuda()}
    case["inputs"] = {name: t.cuda() for name, t in case["inputs"].items()}
    with Recorder() as recorder:
        got = forward_backward(case, ms_deform_attn, ms_deform_attn_key_aware)
    assert f"litedetr.{'ms_deform_attn' if kind == 'msda' else 'ms_deform_attn_key_aware'}.default" in recorder.ops
    with custom_ops.triton_disabled():
        expected = forward_backward(case, ms_deform_attn, ms_deform_attn_key_aware)
    for name, want in expected.items():
        torch.testing.assert_close(got[name], want, atol=1e-4, rtol=1e-4, msg=lambda text, name=name: f"{name}: {text}")
    bf16 = {**case, "inputs": {name: t.bfloat16() for name, t in case["inputs"].items()}, "backward": False}
    got_bf16 = forward_backward(bf16, ms_deform_attn, ms_deform_attn_key_aware)["out"]
    with custom_ops.triton_disabled():
        expected_bf16 = forward_backward(bf16, ms_deform_attn, ms_deform_attn_key_aware, dtype=torch.float32)["out"]
    torch.testing.assert_close(got_bf16.float(), expected_bf16, atol=2e-2, rtol=2e-2)


if __name__ == "__main__":
    run_child(sys.argv[1], sys.argv[2])
