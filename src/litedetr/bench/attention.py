"""Inputs and runners for timing the deformable-attention ops (shared by the scripts in ``benchmarks/``).

An op (``msda``; ``kda``, keys are the values as in the Lite DETR encoder; ``kda_distinct_key``)
runs one of three ways:

- ``ours``: the public op as the models call it; :mod:`litedetr.ops` picks the implementation
  (Triton on CUDA, the C++ kernels on the CPU: with autograd their fused forward and backward);
- ``pytorch``: the same op with the Triton and C++ kernels switched off (``embedding_bag`` gathers
  without autograd, ``grid_sample`` with it);
- ``two_pass`` (KDA only): the authors' way, one ``grid_sample`` pass for the keys and one for the
  values per level, stacked, then the softmax of ``q.k``.

Every token is a query. Values, queries, keys and weights are in the requested dtype; sampling
locations stay float32 (as in the models, where reference points are float32).

:func:`fused_backward_row` times the forward and backward of ``ours`` and ``pytorch`` on the CPU
(the fused C++ path against the ``grid_sample`` path) alternately, call by call, in one process.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from litedetr.bench.timing import Timing, measure, peak_memory, time_calls
from litedetr.ops import attention_backend, cpu_kernels, custom_ops, ms_deform_attn, ms_deform_attn_key_aware

__all__ = [
    "LEVELS_800X1333",
    "D_MODEL",
    "HEADS",
    "POINTS",
    "OPS",
    "KernelCase",
    "methods",
    "kernel_cases",
    "two_pass_kda",
    "attention_inputs",
    "run_attention",
    "attention_call",
    "kernel_row",
    "kernel_markdown",
    "fused_backward_row",
    "fused_backward_markdown",
]

LEVELS_800X1333: tuple[tuple[int, int], ...] = ((100, 167), (50, 84), (25, 42), (13, 21))
"""The four levels (strides 8, 16, 32, 64) of an 800x1333 image: 22,223 tokens."""
D_MODEL, HEADS, POINTS = 256, 8, 4
OPS = ("msda", "kda", "kda_distinct_key")


@dataclass(frozen=True)
class KernelCase:
    """One row of the kernel benchmark."""

    op: str
    method: str
    batch: int
    dtype: torch.dtype


def methods(op: str) -> tuple[str, ...]:
    return ("ours", "pytorch") if op == "msda" else ("ours", "pytorch", "two_pass")


def kernel_cases(batches: Sequence[int], dtypes: Sequence[torch.dtype]) -> list[KernelCase]:
    """Every (op, method) for each dtype and batch, dtype-major."""
    return [KernelCase(op, method, batch, dtype) for dtype in dtypes for batch in batches for op in OPS for method in methods(op)]


def two_pass_kda(query: Tensor, key: Tensor, value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor) -> Tensor:
    """KDA as the authors' code computes it: separate ``grid_sample`` passes for keys and values, stacked.

    Shapes as :func:`litedetr.ops.ms_deform_attn_key_aware`: query ``(B, Lq, M, D)``, key and value
    ``(B, S, M, D)``, spatial_shapes ``(L, 2)``, sampling_locations ``(B, Lq, M, L, P, 2)`` -> ``(B, Lq, M*D)``.
    """
    b, _, m, d = value.shape
    lq = sampling_locations.shape[1]
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    grids = (2 * sampling_locations - 1).to(value.dtype)
    sizes = [h * w for h, w in shapes]
    keys, values = [], []
    for lvl, ((h, w), k_l, v_l) in enumerate(zip(shapes, key.split(sizes, 1), value.split(sizes, 1), strict=True)):
        grid = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        for feats, out in ((k_l, keys), (v_l, values)):
            level_map = feats.flatten(2).transpose(1, 2).reshape(b * m, d, h, w)
            out.append(F.grid_sample(level_map, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    k = torch.stack(keys, -2).flatten(-2).permute(0, 2, 3, 1).flatten(0, 1)  # (B*M*Lq, L*P, D)
    v = torch.stack(values, -2).flatten(-2).permute(0, 2, 3, 1).flatten(0, 1)
    q = query.permute(0, 2, 1, 3).reshape(b * m * lq, 1, d)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), -1)
    return (weights @ v).view(b, m, lq, d).permute(0, 2, 1, 3).flatten(2)


def _locations(levels: Sequence[tuple[int, int]], batch: int, near_reference: bool, gen: torch.Generator) -> Tensor:
    """``(B, S, M, L, P, 2)``: 2 px (std) around each token's cell centre on every level, or uniform over the maps."""
    s, n_levels = sum(h * w for h, w in levels), len(levels)
    if not near_reference:
        return torch.rand(batch, s, HEADS, n_levels, POINTS, 2, generator=gen)
    centres = []
    for h, w in levels:
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        centres.append(torch.stack([xs.flatten(), ys.flatten()], -1))
    reference = torch.cat(centres)[None, :, None, None, None]  # (1, S, 1, 1, 1, 2)
    per_level = torch.tensor([[w, h] for h, w in levels], dtype=torch.float32)[:, None]  # (L, 1, 2) pixels per unit
    offsets = 2.0 * torch.randn(batch, s, HEADS, n_levels, POINTS, 2, generator=gen)
    return reference + offsets / per_level


def attention_inputs(
    op: str,
    levels: Sequence[tuple[int, int]] = LEVELS_800X1333,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    near_reference: bool = True,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Random inputs of ``op`` at ``levels``: ``spatial_shapes``, ``value``, ``locations`` and ``weights`` (MSDA) or ``query`` [+ ``key``] (KDA).

    ``near_reference``: locations a few pixels around each token's own position (as a trained
    encoder samples); otherwise uniform over the maps.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; one of {OPS}")
    gen = torch.Generator().manual_seed(seed)
    s, d = sum(h * w for h, w in levels), D_MODEL // HEADS
    inputs = {
        "spatial_shapes": torch.tensor(levels, dtype=torch.long),
        "value": torch.randn(batch, s, HEADS, d, generator=gen, dtype=dtype),
        "locations": _locations(levels, batch, near_reference, gen),
    }
    if op == "msda":
        inputs["weights"] = torch.randn(batch, s, HEADS, len(levels) * POINTS, generator=gen).softmax(-1).view(batch, s, HEADS, len(levels), POINTS)
        inputs["weights"] = inputs["weights"].to(dtype)
    else:
        inputs["query"] = torch.randn(batch, s, HEADS, d, generator=gen, dtype=dtype)
    if op == "kda_distinct_key":
        inputs["key"] = torch.randn(batch, s, HEADS, d, generator=gen, dtype=dtype)
    return {name: t if name == "spatial_shapes" else t.to(device) for name, t in inputs.items()}


@contextlib.contextmanager
def _implementation(method: str) -> Iterator[None]:
    """``pytorch``: the Triton and C++ kernels off; otherwise as the models run."""
    if method != "pytorch":
        yield
        return
    with custom_ops.triton_disabled(), cpu_kernels.cpu_kernels_disabled():
        yield


def run_attention(op: str, method: str, inputs: dict[str, Tensor]) -> Tensor:
    """``op`` computed by ``method`` (``ours``, ``pytorch`` or ``two_pass``) on :func:`attention_inputs`."""
    if method not in methods(op):
        raise ValueError(f"{op} has no method {method!r}; one of {methods(op)}")
    shapes, value, locations = inputs["spatial_shapes"], inputs["value"], inputs["locations"]
    if op == "msda":
        with _implementation(method):
            return ms_deform_attn(value, shapes, locations, inputs["weights"])
    key = inputs.get("key", value)
    if method == "two_pass":
        return two_pass_kda(inputs["query"], key, value, shapes, locations)
    with _implementation(method):
        return ms_deform_attn_key_aware(inputs["query"], key, value, shapes, locations)


def _leaves(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inputs as fresh autograd leaves (the shared key stays the value)."""
    leaves = {name: t.detach().requires_grad_() if t.is_floating_point() else t for name, t in inputs.items()}
    if "key" not in inputs:
        return leaves
    return {**leaves, "key": leaves["key"]}


def _backend(method: str, inputs: dict[str, Tensor], backward: bool) -> str:
    """The implementation ``method`` runs (:func:`litedetr.ops.attention_backend`); ``two_pass`` is ``grid_sample``."""
    if method == "two_pass":
        return "grid_sample"
    floats = [inputs["value"], *(t for name, t in inputs.items() if name != "value" and t.is_floating_point())]
    probe = [t.detach().requires_grad_(backward) for t in floats]
    with _implementation(method), torch.set_grad_enabled(backward):
        return attention_backend(*probe)


def attention_call(op: str, method: str, inputs: dict[str, Tensor], backward: bool) -> Callable[[], object]:
    """A call of the forward (under ``no_grad``) or of the forward and backward (gradients of every float input)."""
    if not backward:
        return torch.no_grad()(lambda: run_attention(op, method, inputs))
    leaves = _leaves(inputs)
    value, lq = inputs["value"], inputs["locations"].shape[1]
    gen = torch.Generator().manual_seed(1)
    grad_out = torch.randn(value.shape[0], lq, value.shape[2] * value.shape[3], generator=gen, dtype=value.dtype).to(value.device)

    def call() -> None:
        for leaf in leaves.values():
            leaf.grad = None
        run_attention(op, method, leaves).backward(grad_out)

    return call


def _max_abs_diff_vs_fp32_grid_sample(case: KernelCase, inputs: dict[str, Tensor]) -> float:
    """The forward's largest error against our ``grid_sample`` path in float32 (inputs that require grad select it)."""
    fp32 = _leaves({name: t.float() if t.is_floating_point() else t for name, t in inputs.items()})
    want = run_attention(case.op, "pytorch", fp32).detach()
    with torch.no_grad():
        got = run_attention(case.op, case.method, inputs).float()
    return (got - want).abs().max().item()


def _measure_or_oom(call: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> Timing | None:
    try:
        return measure(call, device, repeats, warmup)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def kernel_row(case: KernelCase, levels: Sequence[tuple[int, int]], device: torch.device, repeats: int, warmup: int) -> dict[str, object]:
    """Latency (ms, median and 90th percentile) and peak memory (MiB beyond the inputs) of the forward
    (``fwd_*``) and of the forward and backward (``fwd_bwd_*``) of ``case``; ``None`` where it ran out
    of memory. ``max_abs_diff_vs_fp32_grid_sample``: the forward's error against our ``grid_sample`` path in float32."""
    inputs = attention_inputs(case.op, levels, case.batch, case.dtype, device)
    row: dict[str, object] = {"op": case.op, "method": case.method, "batch": case.batch, "dtype": str(case.dtype).removeprefix("torch.")}
    row["max_abs_diff_vs_fp32_grid_sample"] = _max_abs_diff_vs_fp32_grid_sample(case, inputs)
    for mode, backward in (("fwd", False), ("fwd_bwd", True)):
        row[f"{mode}_backend"] = _backend(case.method, inputs, backward)
        timing = _measure_or_oom(attention_call(case.op, case.method, inputs, backward), device, repeats, warmup)
        row[f"{mode}_ms"] = None if timing is None else timing.median_s * 1e3
        row[f"{mode}_p90_ms"] = None if timing is None else timing.p90_s * 1e3
        row[f"{mode}_peak_mib"] = None if timing is None else timing.peak_memory_bytes / 2**20
    return row


def kernel_markdown(rows: Sequence[dict[str, object]]) -> str:
    """A Markdown table of :func:`kernel_row` rows (OOM where a measurement ran out of memory)."""

    def cell(x: object) -> str:
        return "OOM" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)

    lines = [
        "| op | method | implementation (fwd / fwd+bwd) | batch | dtype | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB "
        "| max abs diff vs fp32 grid_sample |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [r["op"], r["method"], f"{r['fwd_backend']} / {r['fwd_bwd_backend']}", r["batch"], r["dtype"]]
        cells += [r["fwd_ms"], r["fwd_bwd_ms"], r["fwd_peak_mib"], r["fwd_bwd_peak_mib"]]
        lines.append("| " + " | ".join(cell(c) for c in cells) + f" | {r['max_abs_diff_vs_fp32_grid_sample']:.1e} |")
    return "\n".join(lines)


def _outputs_and_grads(op: str, method: str, inputs: dict[str, Tensor], grad_out: Tensor) -> dict[str, Tensor]:
    """The output of ``op`` by ``method`` (``output``) and the gradient of every float input (by its name)."""
    leaves = _leaves(inputs)
    out = run_attention(op, method, leaves)
    out.backward(grad_out)
    return {"output": out.detach(), **{name: leaf.grad for name, leaf in leaves.items() if leaf.is_floating_point()}}


def _differences(op: str, inputs: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Per tensor (``output`` and the gradient of each input), the fused path against ``grid_sample``:
    ``max_relative`` = max |ours - pytorch| / max |pytorch|, and ``beyond_1e-4`` elements whose
    difference exceeds 1e-4 of that largest magnitude. Location gradients can differ by O(1) at a
    sample within float rounding of a cell centre, where the bilinear derivative jumps and the two
    paths' coordinate arithmetic picks opposite sides."""
    grad_out = torch.randn(inputs["value"].shape[0], inputs["locations"].shape[1], D_MODEL, generator=torch.Generator().manual_seed(1))
    ours = _outputs_and_grads(op, "ours", inputs, grad_out.to(inputs["value"].dtype))
    reference = _outputs_and_grads(op, "pytorch", inputs, grad_out.to(inputs["value"].dtype))
    differences = {}
    for name, want in reference.items():
        gap, scale = (ours[name] - want).abs(), want.abs().max()
        differences[name] = {"max_relative": (gap.max() / scale).item(), "beyond_1e-4": int((gap > 1e-4 * scale).sum()), "elements": want.numel()}
    return differences


def _summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median_ms": statistics.median(ordered) * 1e3,
        "p90_ms": ordered[max(math.ceil(0.9 * len(ordered)) - 1, 0)] * 1e3,
        "min_ms": ordered[0] * 1e3,
    }


def fused_backward_row(op: str, levels: Sequence[tuple[int, int]] = LEVELS_800X1333, batch: int = 1, repeats: int = 5, warmup: int = 1) -> dict[str, object]:
    """Forward + backward of ``op`` on the CPU (float32, gradients of every float input): ``ours`` (the
    fused C++ kernels with autograd) against ``pytorch`` (the ``grid_sample`` path), timed alternately
    (each repeat runs both, in alternating order) in this process.

    Per method: the implementation that ran (:func:`litedetr.ops.attention_backend`), median, 90th
    percentile and minimum ms, and ``peak_mib``: the most memory one call holds in tensors beyond its
    inputs (the profiler's allocation events: every tensor, output and gradients included, allocated
    through torch's CPU allocator, also inside the C++ kernels; not the kernels' per-thread scratch of
    a few KiB, nor the allocator's or the process's overhead). ``speedup``: pytorch's median over ours;
    ``memory_ratio``: ours' peak over pytorch's; ``differences``: the output and every gradient against
    the ``grid_sample`` path's (see :func:`_differences`).
    """
    cpu = torch.device("cpu")
    inputs = attention_inputs(op, levels, batch)
    methods = ("ours", "pytorch")
    calls = {method: attention_call(op, method, inputs, backward=True) for method in methods}
    row: dict[str, object] = {"op": op, "batch": batch, "dtype": "float32", "repeats": repeats}
    row["differences"] = _differences(op, inputs)
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {method: [] for method in methods}
    for repeat in range(repeats):
        for method in methods if repeat % 2 == 0 else methods[::-1]:
            times[method].extend(time_calls(calls[method], cpu, 1, warmup=0))
    for method in methods:
        peak = peak_memory(calls[method], cpu)
        row[method] = {"backend": _backend(method, inputs, True), **_summary(times[method]), "peak_mib": peak / 2**20}
    row["speedup"] = row["pytorch"]["median_ms"] / row["ours"]["median_ms"]
    row["memory_ratio"] = row["ours"]["peak_mib"] / row["pytorch"]["peak_mib"]
    return row


def fused_backward_markdown(rows: Sequence[dict[str, object]]) -> str:
    """A Markdown table of :func:`fused_backward_row` rows."""
    lines = [
        "| op | batch | fused C++ fwd+bwd ms (median / p90) | grid_sample fwd+bwd ms (median / p90) | speedup | fused peak MiB "
        "| grid_sample peak MiB | memory ratio | max rel. diff, output and gradients but locations' | location gradients off by > 1e-4 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ours, ref, diff = r["ours"], r["pytorch"], r["differences"]
        others = max(d["max_relative"] for name, d in diff.items() if name != "locations")
        locations = diff["locations"]
        lines.append(
            f"| {r['op']} | {r['batch']} | {ours['median_ms']:.0f} / {ours['p90_ms']:.0f} | {ref['median_ms']:.0f} / {ref['p90_ms']:.0f} | "
            f"{r['speedup']:.1f}x | {ours['peak_mib']:.0f} | {ref['peak_mib']:.0f} | {r['memory_ratio']:.2f} | {others:.1e} | "
            f"{locations['beyond_1e-4']} of {locations['elements']} (max {locations['max_relative']:.1e}) |"
        )
    return "\n".join(lines)
