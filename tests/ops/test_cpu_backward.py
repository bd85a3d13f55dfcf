"""The fused C++ CPU backward (``litedetr::cpu_*`` custom ops, :mod:`litedetr.ops.cpu_autograd`):
gradcheck in float64 for every op and input option, agreement of the forward and every gradient with
the ``grid_sample`` path in float32, dispatch (used with autograd, fallback when switched off),
determinism, low precision, and the custom ops' registration (``opcheck``, ``torch.compile``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch

from litedetr.ops import attention_backend, cpu_autograd, cpu_kernels, ms_deform_attn, ms_deform_attn_key_aware

pytestmark = pytest.mark.skipif(not cpu_kernels.enabled(torch.zeros(1)), reason="the C++ CPU kernels are not available here")

SMALL = torch.tensor([[3, 4], [2, 2], [1, 1]])  # the last level is a single cell
OPS = ("msda", "kda_shared", "kda_distinct", "kda_shared_bias", "kda_distinct_bias")  # *_bias: with a logit bias (query_logits)
NAMES = {
    "msda": ("value", "locations", "weights"),
    "kda_shared": ("query", "value", "locations"),
    "kda_distinct": ("query", "key", "value", "locations"),
    "kda_shared_bias": ("query", "value", "locations", "bias"),
    "kda_distinct_bias": ("query", "key", "value", "locations", "bias"),
}


def inputs(shapes: torch.Tensor, b: int, m: int, d: int, p: int, dtype: torch.dtype, seed: int = 0, spread: float = 1.4) -> dict[str, torch.Tensor]:
    """Every token a query; locations uniform over ``[-(spread-1)/2, 1+(spread-1)/2]`` (some samples partly or wholly off the map)."""
    s, n_levels = int(shapes.prod(1).sum()), len(shapes)
    g = torch.Generator().manual_seed(seed)
    kw = dict(dtype=dtype, generator=g)
    return {
        "query": torch.randn(b, s, m, d, **kw),
        "key": torch.randn(b, s, m, d, **kw),
        "value": torch.randn(b, s, m, d, **kw),
        "locations": torch.rand(b, s, m, n_levels, p, 2, **kw) * spread - (spread - 1) / 2,
        "weights": torch.rand(b, s, m, n_levels, p, **kw).softmax(-1),
        "bias": 2 * torch.randn(b, s, m, n_levels, p, **kw),
    }


def op_call(op: str, shapes: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The public op as a function of the inputs in ``NAMES[op]`` (KDA with shared keys passes the value twice)."""
    if op == "msda":
        return lambda value, locations, weights: ms_deform_attn(value, shapes, locations, weights)
    if op == "kda_shared":
        return lambda query, value, locations: ms_deform_attn_key_aware(query, value, value, shapes, locations)
    if op == "kda_shared_bias":
        return lambda query, value, locations, bias: ms_deform_attn_key_aware(query, value, value, shapes, locations, bias)
    if op == "kda_distinct_bias":
        return lambda query, key, value, locations, bias: ms_deform_attn_key_aware(query, key, value, shapes, locations, bias)
    return lambda query, key, value, locations: ms_deform_attn_key_aware(query, key, value, shapes, locations)


def forward_and_grads(op: str, shapes: torch.Tensor, x: dict[str, torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    """``[output, grad of each input of NAMES[op]]`` on the path the current settings select."""
    leaves = [x[name].detach().clone().requires_grad_() for name in NAMES[op]]
    out = op_call(op, shapes)(*leaves)
    out.backward(grad_out)
    return [out.detach(), *(leaf.grad for leaf in leaves)]


def gradcheck_case(op: str, option: str) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]:
    """A float64 function of leaf inputs, and the inputs, for one option of the fused path."""
    x = inputs(SMALL, b=2, m=2, d=3, p=2, dtype=torch.float64)
    call = op_call(op, SMALL)
    if option == "far_outside":  # whole samples off the map, others on its edges' outer half-cells
        far = torch.tensor([-0.7, -0.2, 1.15, 1.8], dtype=torch.float64)
        pick = torch.randint(len(far), x["locations"].shape, generator=torch.Generator().manual_seed(2))
        off = torch.rand(x["locations"].shape, generator=torch.Generator().manual_seed(3)) < 0.4
        x["locations"] = torch.where(off, far[pick], x["locations"])
    if option == "non_contiguous":
        x = {k: v.transpose(0, 1).contiguous().transpose(0, 1) if v.dim() > 4 else v.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0) for k, v in x.items()}
        assert not any(x[name].is_contiguous() for name in NAMES[op])
    leaves = tuple(x[name].requires_grad_() for name in NAMES[op])
    if option != "padding_mask":
        return call, leaves
    padded = torch.zeros(2, int(SMALL.prod(1).sum()), dtype=torch.bool)
    padded[0, [3, 7, 11, 13, 15]] = True  # image 0 padded on the right: the last column of levels 0 (3x4) and 1 (2x2)

    def masked(*args: torch.Tensor) -> torch.Tensor:  # the model zeroes padded values (and keys) before attention
        named = dict(zip(NAMES[op], args))
        for name in ("key", "value"):
            if name in named:
                named[name] = named[name].masked_fill(padded[:, :, None, None], 0.0)
        return call(*named.values())

    return masked, leaves


@pytest.mark.parametrize("option", ["plain", "padding_mask", "far_outside", "non_contiguous"])
@pytest.mark.parametrize("op", OPS)
def test_gradcheck_of_the_fused_path(op, option):
    """Batch 2, 2 heads, 3 levels (3x4, 2x2, 1x1), 2 points, some samples partly or wholly off the map."""
    call, leaves = gradcheck_case(op, option)
    assert attention_backend(*leaves) == "cpu_kernel"
    out = call(*leaves)
    assert "litedetr_cpu_ms_deform_attn" in out.grad_fn.name()
    assert torch.autograd.gradcheck(call, leaves)


@pytest.mark.parametrize("op", OPS)
def test_forward_and_every_gradient_agree_with_the_grid_sample_path_in_float32(op):
    """Encoder-like sizes (8 heads of 32 channels, 4 levels, 4 points, every token a query, batch 2):
    within 1e-5 of each tensor's largest magnitude, and as close to float64 as the ``grid_sample`` path.

    (With other random locations a sample may fall within float32 rounding of a cell centre, where the
    bilinear derivative jumps: the two paths round the pixel coordinate differently and their location
    gradients there are the two one-sided derivatives. This seed has no such sample.)"""
    shapes = torch.tensor([[12, 14], [6, 7], [3, 4], [1, 1]])
    x64 = inputs(shapes, b=2, m=8, d=32, p=4, dtype=torch.float64, spread=1.2)
    grad_out64 = torch.randn(2, x64["value"].shape[1], 8 * 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    truth = forward_and_grads(op, shapes, x64, grad_out64)
    x32, grad_out = {k: v.float() for k, v in x64.items()}, grad_out64.float()
    fused = forward_and_grads(op, shapes, x32, grad_out)
    with cpu_kernels.cpu_kernels_disabled():
        reference = forward_and_grads(op, shapes, x32, grad_out)
    for name, got, want, exact in zip(("output", *NAMES[op]), fused, reference, truth):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, name=name: f"{name}: {m}")
        fused_error, reference_error = (got.double() - exact).abs().max().item(), (want.double() - exact).abs().max().item()
        assert fused_error <= 2 * reference_error + 1e-7 * scale, (name, fused_error, reference_error)


@pytest.mark.parametrize("d", [5, 12])
def test_shared_keys_get_the_sum_of_the_key_and_value_gradients(d):
    """KDA(q, v, v) (sampled once, one combined gradient row per sample) is KDA(q, k, v) with k == v
    (per-corner dot products and scatters); the value's gradient is the sum of both. D=5 runs the
    kernels' per-channel tail only, D=12 their 8-lane vectors and the tail."""
    x = inputs(SMALL, b=2, m=2, d=d, p=3, dtype=torch.float64)
    grad_out = torch.randn(2, x["value"].shape[1], 2 * d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    shared = forward_and_grads("kda_shared", SMALL, x, grad_out)
    distinct = forward_and_grads("kda_distinct", SMALL, {**x, "key": x["value"]}, grad_out)
    torch.testing.assert_close(shared[0], distinct[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shared[1], distinct[1], rtol=1e-12, atol=1e-12)  # query
    torch.testing.assert_close(shared[2], distinct[2] + distinct[3], rtol=1e-12, atol=1e-12)  # value = key + value
    torch.testing.assert_close(shared[3], distinct[4], rtol=1e-12, atol=1e-12)  # locations


@contextlib.contextmanager
def environment_switch_off(monkeypatch: pytest.MonkeyPatch):
    with monkeypatch.context() as patch:
        patch.setenv(cpu_kernels.ENV_SWITCH, "0")
        yield


@pytest.mark.parametrize("op", OPS)
def test_the_fused_path_runs_with_autograd_and_the_fallback_when_switched_off(op, monkeypatch):
    x = inputs(SMALL, b=1, m=2, d=4, p=2, dtype=torch.float32)
    leaves = [x[name].requires_grad_() for name in NAMES[op]]
    grad_out = torch.randn(1, x["value"].shape[1], 8)
    assert attention_backend(*leaves) == "cpu_kernel"
    assert "litedetr_cpu_ms_deform_attn" in op_call(op, SMALL)(*leaves).grad_fn.name()
    fused = forward_and_grads(op, SMALL, x, grad_out)
    for switched_off in (cpu_kernels.cpu_kernels_disabled(), environment_switch_off(monkeypatch)):
        with switched_off:
            assert attention_backend(*leaves) == "grid_sample"
            assert "litedetr" not in op_call(op, SMALL)(*leaves).grad_fn.name()
            for got, want in zip(forward_and_grads(op, SMALL, x, grad_out), fused):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tracing_and_no_grad_keep_their_paths():
    x = inputs(SMALL, b=1, m=2, d=4, p=2, dtype=torch.float32)
    value = x["value"].requires_grad_()
    with torch.no_grad():
        assert attention_backend(value) == "cpu_kernel" and ms_deform_attn(value, SMALL, x["locations"], x["weights"]).grad_fn is None
    traced = torch.jit.trace(lambda v: ms_deform_attn(v, SMALL, x["locations"], x["weights"]), (value,), check_trace=False)
    assert "grid_sampler" in str(traced.graph) and "litedetr::" not in str(traced.graph)


def _two_threads_twice_then_one(op, x, grad_out):
    """The forward output and gradients of ``op`` twice with 2 threads, then once with 1."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = forward_and_grads(op, SMALL, x, grad_out), forward_and_grads(op, SMALL, x, grad_out)
        torch.set_num_threads(1)
        return first, second, forward_and_grads(op, SMALL, x, grad_out)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("op", OPS)
def test_two_backward_runs_are_bitwise_equal_and_independent_of_threads_up_to_images_x_heads(op):
    """Batch 1 x 2 heads: every thread count up to 2 splits the work the same way (one unit per image-head)."""
    x = inputs(SMALL, b=1, m=2, d=32, p=4, dtype=torch.float32)
    grad_out = torch.randn(1, x["value"].shape[1], 64)
    first, second, single = _two_threads_twice_then_one(op, x, grad_out)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("op", OPS)
def test_more_threads_than_image_heads_split_the_queries_deterministically(op):
    """One image, one head, 2 threads: two query chunks, the second accumulating into its own gradient
    copy (summed in order): bitwise repeatable, and equal to the single-thread result to rounding."""
    x = inputs(SMALL, b=1, m=1, d=32, p=4, dtype=torch.float32)
    grad_out = torch.randn(1, x["value"].shape[1], 32)
    first, second, single = _two_threads_twice_then_one(op, x, grad_out)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", OPS)
def test_bfloat16_inputs_run_in_float32_and_get_bfloat16_gradients(op):
    x32 = inputs(SMALL, b=2, m=2, d=8, p=2, dtype=torch.float32)
    x16 = {k: v.bfloat16() for k, v in x32.items()}
    grad_out = torch.randn(2, x32["value"].shape[1], 16).bfloat16()
    leaves = [x16[name].requires_grad_() for name in NAMES[op]]
    assert attention_backend(*leaves) == "cpu_kernel"
    low = forward_and_grads(op, SMALL, x16, grad_out)
    exact = forward_and_grads(op, SMALL, {k: v.float() for k, v in x16.items()}, grad_out.float())
    for got, want in zip(low, exact):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_only_the_gradients_asked_for_are_returned():
    x = inputs(SMALL, b=1, m=2, d=4, p=2, dtype=torch.float64)
    value = x["value"].requires_grad_()
    ms_deform_attn(value, SMALL, x["locations"], x["weights"]).sum().backward()
    query = x["query"].requires_grad_()
    ms_deform_attn_key_aware(query, x["key"], x["value"], SMALL, x["locations"]).sum().backward()
    assert value.grad is not None and query.grad is not None
    assert x["locations"].grad is None and x["weights"].grad is None and x["key"].grad is None


def opcheck_args(op: str) -> list[tuple[object, tuple[object, ...]]]:
    """(op overload, arguments) of the forward custom op for ``op``, float64, inputs requiring grad."""
    x = inputs(SMALL, b=1, m=2, d=4, p=2, dtype=torch.float64)
    for t in x.values():
        t.requires_grad_()
    if op == "msda":
        return torch.ops.litedetr.cpu_ms_deform_attn.default, (x["value"], SMALL, x["locations"], x["weights"])
    key = None if op.startswith("kda_shared") else x["key"]
    bias = x["bias"] if op.endswith("_bias") else None
    return torch.ops.litedetr.cpu_ms_deform_attn_key_aware.default, (x["query"], key, x["value"], SMALL, x["locations"], bias)


@pytest.mark.parametrize("op", OPS)
def test_custom_ops_pass_opcheck(op):
    """Schema, fake implementations (forward and backward), autograd registration and AOT dispatch."""
    overload, args = opcheck_args(op)
    torch.library.opcheck(overload, args)


def test_torch_compile_traces_the_custom_ops_forward_and_backward_without_graph_breaks():
    """AOTAutograd sees one op per direction (their fake implementations give the shapes), with the eager gradients."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.utils import counters

    x = inputs(SMALL, b=1, m=2, d=4, p=2, dtype=torch.float32)
    shapes = tuple(tuple(s) for s in SMALL.tolist())
    leaves = [x[name].requires_grad_() for name in ("query", "value", "locations")]
    graphs: dict[str, list[str]] = {"forward": [], "backward": []}

    def recorder(kind: str) -> Callable[..., object]:
        def compiler(gm: torch.fx.GraphModule, example_inputs: list) -> object:
            graphs[kind].extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
            return gm.forward

        return compiler

    def step(query: torch.Tensor, value: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        return cpu_autograd.ms_deform_attn_key_aware(query, value, value, shapes, locations).square().sum()

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, backend=aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward")), fullgraph=True)
    grads = torch.autograd.grad(compiled(*leaves), leaves)
    assert not counters["graph_break"], list(counters["graph_break"])
    assert "litedetr.cpu_ms_deform_attn_key_aware.default" in graphs["forward"]
    assert "litedetr.cpu_ms_deform_attn_key_aware_backward.default" in graphs["backward"]
    eager_grads = torch.autograd.grad(step(*leaves), leaves)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
