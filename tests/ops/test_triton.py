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

import contextlib
import logging
import logging.handlers
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
    logit_bias: bool = False,
    pad: bool = False,
    dtype: torch.dtype = torch.float32,
    dtypes: dict[str, torch.dtype] | None = None,
    noncontiguous: bool = False,
    backward: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Random inputs of one op; sampling locations from 2-d points or 4-d boxes, partly outside the maps.

    Inputs are in ``dtype`` except those named in ``dtypes`` (mixed precision, as autocast makes it).
    Returns a dict with ``op`` ("msda" or "kda"), ``spatial_shapes`` ``(L, 2)``, ``inputs`` (value
    ``(B, S, M, D)``, sampling_locations ``(B, Lq, M, L, P, 2)``, and attention_weights
    ``(B, Lq, M, L, P)`` or query ``(B, Lq, M, D)`` [+ key ``(B, S, M, D)``] [+ logit_bias
    ``(B, Lq, M, L, P)``]), ``grad_out``
    ``(B, Lq, M*D)`` in the value's dtype, ``backward`` and ``noncontiguous`` (run with every input
    and ``grad_out`` in column-major order).
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
        if logit_bias:
            inputs["logit_bias"] = 2.0 * torch.randn(b, lq, m, n_levels, p, generator=gen)
    dtypes = {name: (dtypes or {}).get(name, dtype) for name in inputs}
    return {
        "op": op,
        "spatial_shapes": shapes,
        "inputs": {name: t.to(dtypes[name]) for name, t in inputs.items()},
        "grad_out": torch.randn(b, lq, m * d, generator=gen).to(dtypes["value"]),
        "backward": backward,
        "noncontiguous": noncontiguous,
    }


def make_cases() -> dict[str, dict[str, Any]]:
    """Lq = 70 spans two 64-query blocks, the second one partial; D = 6 is not a power of two.

    The ``tiny_*`` cases cover strides and dtypes: fp32 in column-major order, fp16 and bf16, and the
    mixes autocast gives (values/keys/queries in 16 bits, sampling locations and weights in fp32).
    """
    tiny = {"levels": TINY_LEVELS, "b": 1, "lq": 5, "m": 2, "d": 4, "p": 2}
    variants: dict[str, dict[str, Any]] = {
        "msda": {"op": "msda", "boxes": False},
        "kda_shared": {"op": "kda", "boxes": True},
        "kda_distinct": {"op": "kda", "boxes": True, "distinct_key": True},
    }
    half_mixes = {
        "msda": (torch.bfloat16, {"sampling_locations": torch.float32, "attention_weights": torch.float32}),
        "kda_shared": (torch.bfloat16, {"sampling_locations": torch.float32}),
        "kda_distinct": (torch.float16, {"sampling_locations": torch.float32, "query": torch.float32}),
    }
    cases = {
        "msda_points_padded": make_case("msda", levels=LEVELS, b=2, lq=70, m=2, d=8, p=2, boxes=False, pad=True, seed=1),
        "msda_boxes_d6": make_case("msda", levels=LEVELS, b=1, lq=37, m=3, d=6, p=3, boxes=True, seed=2),
        "kda_shared_points_padded": make_case("kda", levels=LEVELS, b=2, lq=70, m=2, d=8, p=2, boxes=False, pad=True, seed=3),
        "kda_distinct_boxes_d6": make_case("kda", levels=LEVELS, b=1, lq=37, m=3, d=6, p=3, boxes=True, distinct_key=True, seed=4),
        "kda_shared_bias_points_padded": make_case("kda", levels=LEVELS, b=2, lq=70, m=2, d=8, p=2, boxes=False, logit_bias=True, pad=True, seed=5),
        "kda_distinct_bias_boxes_d6": make_case("kda", levels=LEVELS, b=1, lq=37, m=3, d=6, p=3, boxes=True, distinct_key=True, logit_bias=True, seed=6),
        "tiny_kda_shared_bias_bf16": make_case("kda", **tiny, boxes=True, logit_bias=True, dtype=torch.bfloat16, seed=7),
    }
    for seed, (name, variant) in enumerate(variants.items(), start=10):
        cases[f"tiny_{name}"] = make_case(**variant, **tiny, seed=seed)
        cases[f"tiny_{name}_noncontiguous"] = make_case(**variant, **tiny, noncontiguous=True, seed=seed + 10)
        cases[f"tiny_{name}_fp16"] = make_case(**variant, **tiny, dtype=torch.float16, seed=seed + 20)
        cases[f"tiny_{name}_bf16"] = make_case(**variant, **tiny, dtype=torch.bfloat16, seed=seed + 30)
        dtype, mixed = half_mixes[name]
        cases[f"tiny_{name}_mixed"] = make_case(**variant, **tiny, dtype=dtype, dtypes=mixed, seed=seed + 40)
    return cases


TINY = ("tiny_msda", "tiny_kda_shared", "tiny_kda_distinct")
STRIDE_AND_DTYPE_CASES = [*(f"{name}_{kind}" for name in TINY for kind in ("noncontiguous", "fp16", "bf16", "mixed")), "tiny_kda_shared_bias_bf16"]


def column_major(t: Tensor) -> Tensor:
    """``t`` with its dimensions stored in reverse order (same values; not contiguous when two dims exceed 1)."""
    order = list(range(t.dim()))[::-1]
    return t.permute(order).contiguous().permute(order)


def forward_backward(case: dict[str, Any], msda: Callable[..., Tensor], kda: Callable[..., Tensor], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Run one case through the given MSDA/KDA functions: ``{"out": ..., "grad_<input>": ...}`` (inputs in ``dtype`` if given)."""
    layout = column_major if case.get("noncontiguous") else (lambda t: t)
    inputs = {name: layout(t.to(dtype or t.dtype)).detach().requires_grad_(case["backward"]) for name, t in case["inputs"].items()}
    shapes = case["spatial_shapes"]
    if case["op"] == "msda":
        out = msda(inputs["value"], shapes, inputs["sampling_locations"], inputs["attention_weights"])
    else:
        key = inputs.get("key", inputs["value"])
        out = kda(inputs["query"], key, inputs["value"], shapes, inputs["sampling_locations"], inputs.get("logit_bias"))
    result = {"out": out.detach()}
    if case["backward"]:
        out.backward(layout(case["grad_out"].to(out.dtype)))
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
    for name in ("tiny_msda", "tiny_kda_distinct", "kda_distinct_bias_boxes_d6"):
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
        for name, op in (("tiny_msda", torch.ops.litedetr.ms_deform_attn.default), ("tiny_kda_distinct", torch.ops.litedetr.ms_deform_attn_key_aware.default)):
            case = cases[name]
            inputs = {k: t.detach().requires_grad_() for k, t in case["inputs"].items()}
            shapes = case["spatial_shapes"]
            starts = level_start_index(shapes)
            if name == "tiny_msda":
                args = (inputs["value"], shapes, starts, inputs["sampling_locations"], inputs["attention_weights"])
                torch.library.opcheck(op, args)
            else:
                bias = 2.0 * torch.randn(inputs["sampling_locations"].shape[:-1]).requires_grad_()
                for key, logit_bias in ((inputs["key"], None), (None, None), (inputs["key"], bias), (None, bias)):
                    torch.library.opcheck(op, (inputs["query"], key, inputs["value"], shapes, starts, inputs["sampling_locations"], logit_bias))
        return True

    _capture(results, "opcheck", opcheck)

    def run_tiny() -> dict[str, Any]:
        return {name: forward_backward(cases[name], custom_ops.ms_deform_attn, custom_ops.ms_deform_attn_key_aware) for name in TINY}

    _capture(results, "launches", lambda: record_launches(run_tiny))
    _capture(results, "autotuned", lambda: autotune_two_configs(run_tiny))
    torch.save(results, results_path)


def record_launches(run_tiny: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run the tiny cases as usual, then under ``torch.use_deterministic_algorithms(True)``, recording every kernel launch:
    the kernel, the device guard it ran in (``None``: none) and its ``DETERMINISTIC`` flag; and the log records of the ops."""
    from litedetr.ops import triton_deform_attn as ops

    guards: list[str] = []
    launches: list[dict[str, Any]] = []
    real_on_device = ops.on_device

    @contextlib.contextmanager
    def recording_guard(device: torch.device) -> Any:
        with real_on_device(device):
            guards.append(str(device))
            try:
                yield
            finally:
                guards.pop()

    def recording_run(kernel: Any) -> Callable[..., Any]:
        run = kernel.fn.run

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            mode = "deterministic" if torch.are_deterministic_algorithms_enabled() else "default"
            launches.append({"kernel": kernel.fn.__name__, "mode": mode, "guard": guards[-1] if guards else None, "deterministic": kwargs.get("DETERMINISTIC")})
            return run(*args, **kwargs)

        return wrapped

    handler = logging.handlers.BufferingHandler(100)
    ops.logger.addHandler(handler)
    ops.logger.setLevel(logging.INFO)
    ops.on_device = recording_guard
    for kernel in ops.AUTOTUNED:
        kernel.fn.run = recording_run(kernel)
    try:
        out = {}
        for mode in ("default", "deterministic"):
            torch.use_deterministic_algorithms(mode == "deterministic")
            out[mode] = run_tiny()
            out[f"{mode}:again"] = run_tiny()
    finally:
        torch.use_deterministic_algorithms(False)
        ops.on_device = real_on_device
        ops.logger.removeHandler(handler)
        for kernel in ops.AUTOTUNED:
            del kernel.fn.run
    return {**out, "launches": launches, "logs": [record.getMessage() for record in handler.buffer]}


def autotune_two_configs(run_tiny: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run the tiny cases with each kernel autotuned over two configs, each timed by running it three times
    (so a buffer accumulated with atomics that is not zeroed between trials ends up 7x too large)."""
    import triton

    from litedetr.ops import triton_deform_attn as ops

    trials: list[str] = []

    def bench(kernel_call: Callable[[], None], quantiles: Any) -> list[float]:
        for _ in range(3):
            kernel_call()
        trials.append("timed")
        return [float(len(trials))] * 3

    two = [triton.Config({"BLOCK_Q": 4}, num_warps=4), triton.Config({"BLOCK_Q": 8}, num_warps=4)]
    try:
        for kernel in ops.AUTOTUNED:
            kernel.early_config_prune = lambda configs, named_args, **kwargs: two
            kernel.__dict__["do_bench"] = bench
            kernel.cache.clear()
        results = run_tiny()
        chosen = [kernel.best_config.kwargs["BLOCK_Q"] for kernel in ops.AUTOTUNED]
    finally:
        for kernel in ops.AUTOTUNED:
            kernel.early_config_prune = ops._prune
            kernel.__dict__.pop("do_bench", None)
            kernel.cache.clear()
    return {"results": results, "trials": len(trials), "chosen": chosen}


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


TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
"""Error allowed against float64 by a case's least precise input dtype, relative to each result's largest
magnitude: about two units in the last place, as Triton's interpreter truncates when it narrows fp32 to
16 bits (a GPU rounds to nearest); fp32 sums the few products of the tiny cases to about 1e-7."""
QUERY_GRAD_FACTOR = 4
"""KDA's query gradient subtracts ``dO . out`` with the output as stored (in the value's dtype): that
cancellation costs it about two more bits."""


def assert_matches_float64(got: dict[str, Tensor], case: dict[str, Any]) -> None:
    """Every result in its input's dtype (the output in the value's), within :data:`TOLERANCE` of the float64 PyTorch op."""
    expected = forward_backward(case, ms_deform_attn, ms_deform_attn_key_aware, dtype=torch.float64)
    assert set(got) == {"out", *(f"grad_{name}" for name in case["inputs"])}
    dtypes = {"out": case["inputs"]["value"].dtype, **{f"grad_{name}": t.dtype for name, t in case["inputs"].items()}}
    tolerance = max(TOLERANCE[t.dtype] for t in case["inputs"].values())
    for name, want in expected.items():
        assert got[name].dtype == dtypes[name], name
        tol = tolerance * (QUERY_GRAD_FACTOR if name == "grad_query" else 1) * float(want.abs().max())
        torch.testing.assert_close(got[name].double(), want, atol=tol, rtol=0, msg=lambda text, name=name: f"{name}: {text}")


def test_child_runs_the_kernels_in_the_interpreter(interpreter_results: dict[str, Any]) -> None:
    assert interpreter_results["interpreted"] is True
    assert interpreter_results["cpu_public_op_loaded_kernels"] is False


def test_cases_cover_points_outside_the_maps(cases: dict[str, dict[str, Any]]) -> None:
    for name in ("msda_points_padded", "msda_boxes_d6", "kda_shared_points_padded", "kda_distinct_boxes_d6", *TINY):
        locations = cases[name]["inputs"]["sampling_locations"]
        outside = ((locations < 0) | (locations > 1)).any(-1).float().mean().item()
        assert 0.05 < outside < 0.8, (name, outside)
    assert (cases["msda_points_padded"]["inputs"]["value"][-1].abs().sum((-2, -1)) == 0).sum() > 10


@pytest.mark.parametrize("name", ["msda_points_padded", "msda_boxes_d6", "tiny_msda"])
def test_msda_forward_and_gradients(interpreter_results: dict[str, Any], cases: dict[str, dict[str, Any]], name: str) -> None:
    got = get_result(interpreter_results, name)
    assert set(got) == {"out", "grad_value", "grad_sampling_locations", "grad_attention_weights"}
    assert_matches_reference(got, cases[name])


@pytest.mark.parametrize(
    "name",
    [
        "kda_shared_points_padded",
        "kda_distinct_boxes_d6",
        "kda_shared_bias_points_padded",
        "kda_distinct_bias_boxes_d6",
        "tiny_kda_shared",
        "tiny_kda_distinct",
    ],
)
def test_kda_forward_and_gradients(interpreter_results: dict[str, Any], cases: dict[str, dict[str, Any]], name: str) -> None:
    got = get_result(interpreter_results, name)
    expected_keys = {"out", "grad_query", "grad_value", "grad_sampling_locations"}
    expected_keys |= {f"grad_{optional}" for optional in ("key", "logit_bias") if optional in cases[name]["inputs"]}
    assert set(got) == expected_keys
    assert_matches_reference(got, cases[name])


@pytest.mark.parametrize("name", STRIDE_AND_DTYPE_CASES)
def test_strides_and_dtypes_match_float64(interpreter_results: dict[str, Any], cases: dict[str, dict[str, Any]], name: str) -> None:
    """Column-major fp32, fp16, bf16 and autocast's mixes, forward and backward, against the float64 PyTorch op."""
    case = cases[name]
    if case["noncontiguous"]:
        assert not column_major(case["inputs"]["value"]).is_contiguous() and not column_major(case["grad_out"]).is_contiguous()
    assert_matches_float64(get_result(interpreter_results, name), case)


def test_the_float64_comparison_can_fail(interpreter_results: dict[str, Any], cases: dict[str, dict[str, Any]]) -> None:
    """The float64 comparison fails for a bf16 output off by twice its tolerance."""
    got = dict(get_result(interpreter_results, "tiny_kda_distinct_bf16"))
    got["out"] = (got["out"].float() * (1 + 2 * TOLERANCE[torch.bfloat16])).bfloat16()
    with pytest.raises(AssertionError, match="out"):
        assert_matches_float64(got, cases["tiny_kda_distinct_bf16"])


@pytest.mark.parametrize("name", ["tiny_msda", "tiny_kda_distinct", "kda_distinct_bias_boxes_d6"])
def test_torch_compile_traces_the_custom_ops(interpreter_results: dict[str, Any], cases: dict[str, dict[str, Any]], name: str) -> None:
    assert_matches_reference(get_result(interpreter_results, f"compiled:{name}"), cases[name])


def test_torch_export_keeps_the_custom_op(interpreter_results: dict[str, Any], cases: dict[str, dict[str, Any]]) -> None:
    exported = get_result(interpreter_results, "exported:tiny_msda")
    assert "litedetr.ms_deform_attn.default" in exported["targets"]
    expected = forward_backward({**cases["tiny_msda"], "backward": False}, ms_deform_attn, ms_deform_attn_key_aware)["out"]
    torch.testing.assert_close(exported["out"], expected, atol=1e-5, rtol=1e-5)


def test_opcheck(interpreter_results: dict[str, Any]) -> None:
    assert get_result(interpreter_results, "opcheck") is True


def test_every_launch_runs_under_the_inputs_device_guard(interpreter_results: dict[str, Any]) -> None:
    launches = get_result(interpreter_results, "launches")["launches"]
    kernels = {"msda_fwd_kernel", "msda_bwd_kernel", "kda_fwd_kernel", "kda_bwd_kernel"}
    # per mode: 2 runs x 3 cases x (forward + backward)
    assert len(launches) == 2 * 2 * 3 * 2 and {launch["kernel"] for launch in launches} == kernels
    assert [launch["guard"] for launch in launches] == ["cpu"] * len(launches)


def test_deterministic_mode_takes_the_atomic_free_backward(interpreter_results: dict[str, Any], cases: dict[str, dict[str, Any]]) -> None:
    """Under ``use_deterministic_algorithms(True)`` the backward kernels store per-corner gradients (summed with ``index_add_``)
    and match the PyTorch op; otherwise they use atomics. The choice is logged once."""
    recorded = get_result(interpreter_results, "launches")
    for mode in ("default", "deterministic"):
        flags = {launch["deterministic"] for launch in recorded["launches"] if launch["mode"] == mode and "bwd" in launch["kernel"]}
        assert flags == {mode == "deterministic"}, (mode, flags)
        for name in TINY:
            assert_matches_reference(recorded[mode][name], cases[name], atol=1e-5, rtol=1e-5)
            for result, again in zip(recorded[mode][name].values(), recorded[f"{mode}:again"][name].values()):
                assert torch.equal(result, again)
    assert len(recorded["logs"]) == 1 and "index_add_ instead of float atomics" in recorded["logs"][0]


def test_autotuning_zeroes_the_atomic_buffers_between_trials(interpreter_results: dict[str, Any], cases: dict[str, dict[str, Any]]) -> None:
    tuned = get_result(interpreter_results, "autotuned")
    assert tuned["trials"] == 2 * 6 and tuned["chosen"] == [4, 4, 4, 4]  # two configs for each of 6 (kernel, key) pairs
    for name in TINY:
        assert_matches_reference(tuned["results"][name], cases[name], atol=1e-5, rtol=1e-5)


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op", ["msda", "kda_shared", "kda_distinct", "kda_shared_bias"])
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
    case = make_case(kind, levels=levels, b=2, lq=700, m=8, d=32, p=4, boxes=False, distinct_key=op == "kda_distinct", logit_bias=op.endswith("bias"), pad=True)
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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_kernels_run_on_the_inputs_device() -> None:
    """Inputs on cuda:1 while the current device is cuda:0: the kernels run on cuda:1 and match the CPU op."""
    case = make_case("kda", levels=LEVELS, b=2, lq=70, m=2, d=8, p=2, boxes=True, distinct_key=True, seed=20)
    on_gpu1 = {**case, "inputs": {name: t.to("cuda:1") for name, t in case["inputs"].items()}, "grad_out": case["grad_out"].to("cuda:1")}
    assert torch.cuda.current_device() == 0
    got = forward_backward(on_gpu1, ms_deform_attn, ms_deform_attn_key_aware)
    expected = forward_backward(case, ms_deform_attn, ms_deform_attn_key_aware)
    for name, want in expected.items():
        assert got[name].device == torch.device("cuda", 1)
        torch.testing.assert_close(got[name].cpu(), want, atol=1e-4, rtol=1e-4, msg=lambda text, name=name: f"{name}: {text}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op", ["msda", "kda_shared", "kda_distinct"])
def test_cuda_deterministic_backward_repeats_bitwise(op: str) -> None:
    levels = [(20, 30), (10, 15), (5, 8), (3, 4)]
    kind = "msda" if op == "msda" else "kda"
    case = make_case(kind, levels=levels, b=2, lq=700, m=8, d=32, p=4, boxes=False, distinct_key=op == "kda_distinct", seed=21)
    case = {**case, "inputs": {name: t.cuda() for name, t in case["inputs"].items()}, "grad_out": case["grad_out"].cuda()}
    torch.use_deterministic_algorithms(True)
    try:
        first = forward_backward(case, ms_deform_attn, ms_deform_attn_key_aware)
        second = forward_backward(case, ms_deform_attn, ms_deform_attn_key_aware)
    finally:
        torch.use_deterministic_algorithms(False)
    expected = forward_backward(case, ms_deform_attn, ms_deform_attn_key_aware)
    for name, want in expected.items():
        assert torch.equal(first[name], second[name]), name
        torch.testing.assert_close(first[name], want, atol=1e-4, rtol=1e-4, msg=lambda text, name=name: f"{name}: {text}")
