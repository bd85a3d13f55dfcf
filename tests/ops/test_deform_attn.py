"""MSDA / KDA ops against a naive per-point bilinear reference, gradcheck, dtypes and errors."""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import pytest
import torch

from litedetr.ops import bilinear as bilinear_ops
from litedetr.ops import cpu_kernels, key_aware_attention_weights, ms_deform_attn, ms_deform_attn_key_aware

SHAPES = torch.tensor([[5, 7], [3, 4], [2, 2]])


def bilinear(feature: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Sample ``(H, W, C)`` at normalised ``(x, y)``; pixel centres at ``(j+0.5)/W``; zeros outside."""
    h, w, c = feature.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(c, dtype=feature.dtype)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out = out + wy * wx * feature[yy, xx]
    return out


def level_maps(feats: torch.Tensor, shapes: torch.Tensor) -> list[torch.Tensor]:
    """``(S, C)`` -> per-level ``(H, W, C)``."""
    sizes = [int(h * w) for h, w in shapes]
    return [f.view(int(h), int(w), -1) for f, (h, w) in zip(feats.split(sizes), shapes)]


def naive(query, key, value, shapes, locations, weights=None, logit_bias=None):
    """Loop over batch, query, head, level, point; KDA's logit of each sample plus ``logit_bias``'s, where given."""
    b, lq, m, n_levels, p, _ = locations.shape
    d = value.shape[-1]
    out = torch.zeros(b, lq, m, d, dtype=value.dtype)
    for bi in range(b):
        for hi in range(m):
            vmaps = level_maps(value[bi, :, hi], shapes)
            kmaps = level_maps(key[bi, :, hi], shapes) if key is not None else None
            for qi in range(lq):
                samples_v, logits = [], []
                for li in range(n_levels):
                    for pi in range(p):
                        x, y = locations[bi, qi, hi, li, pi].tolist()
                        samples_v.append(bilinear(vmaps[li], x, y))
                        if kmaps is not None:
                            logits.append(bilinear(kmaps[li], x, y) @ query[bi, qi, hi] / math.sqrt(d))
                if weights is None:
                    bias = 0.0 if logit_bias is None else logit_bias[bi, qi, hi].reshape(-1)
                    w = torch.softmax(torch.stack(logits) + bias, 0)
                else:
                    w = weights[bi, qi, hi].reshape(-1)
                out[bi, qi, hi] = (w[:, None] * torch.stack(samples_v)).sum(0)
    return out.flatten(2)


def random_inputs(b=2, lq=5, m=2, d=4, p=3, dtype=torch.float64, requires_grad=False):
    s = int(SHAPES.prod(1).sum())
    n_levels = len(SHAPES)
    g = torch.Generator().manual_seed(0)
    kw = dict(dtype=dtype, generator=g)
    query = torch.randn(b, lq, m, d, **kw)
    key = torch.randn(b, s, m, d, **kw)
    value = torch.randn(b, s, m, d, **kw)
    # locations in [-0.2, 1.2]: some samples fall (partly) outside the maps
    locations = torch.rand(b, lq, m, n_levels, p, 2, **kw) * 1.4 - 0.2
    weights = torch.rand(b, lq, m, n_levels, p, **kw)
    tensors = [query, key, value, locations, weights]
    return [t.requires_grad_(requires_grad) for t in tensors]


# the CPU paths: "kernel" (C++, no autograd), "gather" (embedding_bag, no autograd), "traced_gather"
# (the gather path as a trace records it, Gather and MatMul, run eagerly) and "grid_sample" (autograd:
# the inputs require grad)
PATHS = ["kernel", "gather", "traced_gather", "grid_sample"]


def on_path(path: str, tensors: list[torch.Tensor]) -> contextlib.AbstractContextManager:
    """Prepare ``tensors`` for ``path`` (requires_grad for grid_sample) and return the context to call the op in."""
    if path == "kernel" and not cpu_kernels.enabled(*tensors):
        pytest.skip("the C++ CPU kernels are not available here")
    for t in tensors:
        t.requires_grad_(path == "grid_sample")
    if path == "kernel":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(cpu_kernels.cpu_kernels_disabled())
    if path == "traced_gather":
        stack.enter_context(mock.patch.object(bilinear_ops, "tracing", return_value=True))
    return stack


@pytest.mark.parametrize("path", PATHS)
def test_msda_matches_naive_bilinear(path):
    _, _, value, locations, weights = random_inputs()
    expected = naive(None, None, value, SHAPES, locations, weights)
    with on_path(path, [value, locations, weights]):
        torch.testing.assert_close(ms_deform_attn(value, SHAPES, locations, weights), expected)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shared_key", [False, True])
def test_kda_matches_naive_bilinear(shared_key, path):
    query, key, value, locations, _ = random_inputs()
    key = value if shared_key else key
    expected = naive(query, key, value, SHAPES, locations)
    with on_path(path, [query, key, value, locations]):
        torch.testing.assert_close(ms_deform_attn_key_aware(query, key, value, SHAPES, locations), expected)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shared_key", [False, True])
def test_kda_with_a_logit_bias_matches_naive_bilinear(shared_key, path):
    """``logit_bias`` (B, Lq, M, L, P) is added to each sample's q.k / sqrt(D) before the softmax."""
    query, key, value, locations, weights = random_inputs()
    bias = 3 * weights - 1.5  # spread as trained attention logits are: weights moved by factors up to e^3
    key = value if shared_key else key
    expected = naive(query, key, value, SHAPES, locations, logit_bias=bias)
    assert not torch.allclose(expected, naive(query, key, value, SHAPES, locations), atol=1e-2)
    with on_path(path, [query, key, value, locations, bias]):
        torch.testing.assert_close(ms_deform_attn_key_aware(query, key, value, SHAPES, locations, bias), expected)


def test_kda_logit_bias_shape_is_checked():
    query, key, value, locations, weights = random_inputs()
    with pytest.raises(ValueError, match="logit_bias"):
        ms_deform_attn_key_aware(query, key, value, SHAPES, locations, weights[..., :1])


@pytest.mark.parametrize("path", PATHS)
def test_locations_on_cell_borders_and_far_outside(path):
    """Exact cell centres, map edges and far-away samples agree with the reference on every path."""
    query, _, value, _, weights = random_inputs()
    b, lq, m, n_levels, p = weights.shape
    grid = torch.tensor([-3.0, -0.01, 0.0, 0.1, 0.5, 1.0, 1.01, 4.0], dtype=value.dtype)
    locations = grid[torch.randint(len(grid), (b, lq, m, n_levels, p, 2), generator=torch.Generator().manual_seed(1))]
    expected_msda = naive(None, None, value, SHAPES, locations, weights)
    expected_kda = naive(query, value, value, SHAPES, locations)
    with on_path(path, [query, value, weights]):
        torch.testing.assert_close(ms_deform_attn(value, SHAPES, locations, weights), expected_msda)
        torch.testing.assert_close(ms_deform_attn_key_aware(query, value, value, SHAPES, locations), expected_kda)


def test_msda_gradcheck():
    _, _, value, locations, weights = random_inputs(b=1, lq=3, m=2, d=3, p=2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn(v, SHAPES, loc, w), (value, locations, weights))


def test_kda_gradcheck_all_inputs():
    query, key, value, locations, _ = random_inputs(b=1, lq=3, m=2, d=3, p=2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, loc: ms_deform_attn_key_aware(q, k, v, SHAPES, loc), (query, key, value, locations))


def test_kda_gradcheck_shared_key_value():
    query, _, value, locations, _ = random_inputs(b=1, lq=3, m=2, d=3, p=2, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, v, loc: ms_deform_attn_key_aware(q, v, v, SHAPES, loc), (query, value, locations))


def test_kda_equals_msda_with_the_dot_product_weights():
    """KDA is MSDA whose weights are softmax(q.k/sqrt(d)) of the sampled keys."""
    query, key, value, locations, _ = random_inputs()
    b, lq, m, n_levels, p, _ = locations.shape
    sampled_keys = torch.zeros(b, lq, m, n_levels * p, query.shape[-1], dtype=query.dtype)
    for li in range(n_levels):
        one_hot = torch.zeros(b, lq, m, n_levels, p, dtype=query.dtype)
        for pi in range(p):
            one_hot.zero_()
            one_hot[:, :, :, li, pi] = 1
            sampled_keys[:, :, :, li * p + pi] = ms_deform_attn(key, SHAPES, locations, one_hot).view(b, lq, m, -1)
    weights = torch.softmax((sampled_keys * query[:, :, :, None]).sum(-1) / math.sqrt(query.shape[-1]), -1)
    expected = ms_deform_attn(value, SHAPES, locations, weights.view(b, lq, m, n_levels, p))
    torch.testing.assert_close(ms_deform_attn_key_aware(query, key, value, SHAPES, locations), expected)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2), (torch.float16, 5e-3)])
def test_low_precision_dtypes(dtype, tol):
    query, key, value, locations, weights = random_inputs(dtype=torch.float32)
    ref_msda = ms_deform_attn(value, SHAPES, locations, weights)
    ref_kda = ms_deform_attn_key_aware(query, key, value, SHAPES, locations)
    cast = [t.to(dtype) for t in (query, key, value, locations, weights)]
    out_msda = ms_deform_attn(cast[2], SHAPES, cast[3], cast[4])
    out_kda = ms_deform_attn_key_aware(cast[0], cast[1], cast[2], SHAPES, cast[3])
    assert out_msda.dtype == dtype and out_kda.dtype == dtype
    torch.testing.assert_close(out_msda.float(), ref_msda, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(out_kda.float(), ref_kda, atol=tol * 10, rtol=tol)


def test_low_precision_backward_runs():
    query, key, value, locations = [t.to(torch.bfloat16).requires_grad_() for t in random_inputs(dtype=torch.float32)[:4]]
    ms_deform_attn_key_aware(query, key, value, SHAPES, locations).float().square().sum().backward()
    for t in (query, key, value, locations):
        assert t.grad is not None and t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad.float()).all()


def test_shape_errors_name_the_problem():
    query, key, value, locations, weights = random_inputs()
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value, torch.tensor([[5, 7], [3, 4], [2, 3]]), locations, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value, SHAPES, locations, weights[..., :1])
    with pytest.raises(ValueError, match="query"):
        ms_deform_attn_key_aware(query[..., :2], key, value, SHAPES, locations)


@pytest.mark.parametrize("path", PATHS)
def test_tuple_shapes_give_the_tensor_shapes_result(path):
    """Python-int shapes (what the model passes: no device sync, no graph break) and an ``(L, 2)`` tensor are the same input."""
    query, _, value, locations, weights = random_inputs()
    as_tuple = tuple((int(h), int(w)) for h, w in SHAPES.tolist())
    with on_path(path, [query, value, locations, weights]):
        torch.testing.assert_close(ms_deform_attn(value, as_tuple, locations, weights), ms_deform_attn(value, SHAPES, locations, weights), rtol=0, atol=0)
        kda_tuple = ms_deform_attn_key_aware(query, value, value, [list(s) for s in as_tuple], locations)
        torch.testing.assert_close(kda_tuple, ms_deform_attn_key_aware(query, value, value, SHAPES, locations), rtol=0, atol=0)
        torch.testing.assert_close(key_aware_attention_weights(query, value, as_tuple, locations), key_aware_attention_weights(query, value, SHAPES, locations))


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (((5, 7), (3, 4), (2, 3)), "cover 53 tokens, input has 51"),
        (((5, 7), (3, 4)), "L=3, got 2 levels"),
        (((5, 7, 1), (3, 4), (2, 2)), r"\(H_l, W_l\) pairs"),
        (((5, 7), (3, 4), (0, 2)), "positive"),
        (torch.zeros(3, 2), "integer tensor"),
    ],
)
def test_bad_shapes_are_refused_by_name(shapes, message):
    _, _, value, locations, weights = random_inputs()
    with pytest.raises(ValueError, match=message):
        ms_deform_attn(value, shapes, locations, weights)
