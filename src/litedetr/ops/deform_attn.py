"""Multi-scale deformable attention (MSDA) and key-aware deformable attention (KDA).

Pure tensor functions. The reference implementation is built on ``torch.nn.functional.grid_sample``
(bilinear, zero padding outside the map, ``align_corners=False``: the sampling convention of the
authors' code); the fused C++ CPU kernels (with and without autograd), the ``embedding_bag`` gather
(CPU, no autograd; traced as ``Gather`` and ``MatMul``, see :func:`traced_sampling`) and the Triton
kernels (CUDA) follow the same convention. Everything is differentiable w.r.t. every floating-point
input.

Notation: ``B`` batch, ``S`` tokens over all levels, ``M`` heads, ``D`` channels per head, ``Lq``
queries, ``L`` levels, ``P`` points per level and head.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from litedetr.ops import cpu_autograd, cpu_kernels
from litedetr.ops.bilinear import bilinear_corners, gather_rows, tracing
from litedetr.ops.geometry import LevelShapes, SpatialShapes, check_token_count, level_shapes

__all__ = ["TRACED_SAMPLING", "attention_backend", "ms_deform_attn", "ms_deform_attn_key_aware", "key_aware_attention_weights", "traced_sampling"]

TRACED_SAMPLING = ("grid_sample", "gather")
"""How a trace (ONNX export) records the deformable sampling, see :func:`traced_sampling`."""
_traced_kind = ["grid_sample"]


def _level_maps(feats: Tensor, spatial_shapes: SpatialShapes) -> list[Tensor]:
    """Split ``(B, S, M, C)`` into per-level maps ``(B*M, C, H_l, W_l)`` (one transposing copy)."""
    b, s, m, c = feats.shape
    shapes = level_shapes(spatial_shapes)
    channels_first = feats.permute(0, 2, 3, 1).reshape(b * m, c, s)
    return [level.view(b * m, c, h, w) for level, (h, w) in zip(channels_first.split([h * w for h, w in shapes], -1), shapes)]


def _level_grids(sampling_locations: Tensor) -> Tensor:
    """``(B, Lq, M, L, P, 2)`` locations in [0, 1] -> ``(L, B*M, Lq, P, 2)`` grids in [-1, 1]."""
    b, lq, m, n_levels, p, _ = sampling_locations.shape
    grids = (2 * sampling_locations - 1).permute(3, 0, 2, 1, 4, 5)
    return grids.reshape(n_levels, b * m, lq, p, 2)


def _check_shapes(feats: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor) -> LevelShapes | Tensor:
    """Check the inputs' shapes against each other; returns the level shapes as :data:`LevelShapes`, or
    a CUDA tensor unread (reading it would synchronise the device; the Triton kernels take it as it is)."""
    if feats.dim() != 4:
        raise ValueError(f"expected (B, S, M, D) keys/values, got shape {tuple(feats.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"expected (B, Lq, M, L, P, 2) sampling locations, got {tuple(sampling_locations.shape)}")
    b, _, m, _ = feats.shape
    if sampling_locations.shape[0] != b or sampling_locations.shape[2] != m:
        raise ValueError(f"batch/heads of sampling locations {tuple(sampling_locations.shape)} do not match values {tuple(feats.shape)}")
    levels = sampling_locations.shape[3]
    if isinstance(spatial_shapes, Tensor) and spatial_shapes.is_cuda:
        if spatial_shapes.shape != (levels, 2):
            raise ValueError(f"spatial_shapes must be (L, 2) with L={levels}, got {tuple(spatial_shapes.shape)}")
        return spatial_shapes
    shapes = level_shapes(spatial_shapes)
    if len(shapes) != levels:
        raise ValueError(f"spatial_shapes must be (L, 2) with L={levels}, got {len(shapes)} levels {shapes}")
    check_token_count(shapes, feats.shape[1])
    return shapes


def _sample(maps: list[Tensor], grids: Tensor) -> Tensor:
    """Bilinearly sample every level: ``(B*M, C, H_l, W_l)`` maps at ``(L, B*M, Lq, P, 2)`` grids ->
    ``(B*M, Lq, C, L*P)``, the layout in which the attention's sums are matrix products."""
    sampled = [
        F.grid_sample(level_map, grid.to(level_map.dtype), mode="bilinear", padding_mode="zeros", align_corners=False) for level_map, grid in zip(maps, grids)
    ]
    return torch.cat(sampled, -1).transpose(1, 2)


@contextlib.contextmanager
def traced_sampling(kind: str) -> Iterator[None]:
    """Within this context a trace (``torch.onnx.export(..., dynamo=False)``, ``torch.jit.trace``) records
    the deformable sampling of :func:`ms_deform_attn` and :func:`ms_deform_attn_key_aware` as ``kind``:

    - ``"grid_sample"`` (the default outside this context): one ``GridSample`` per level (ONNX opset >= 16);
    - ``"gather"``: the four corner rows of every sample gathered from the flattened maps (``Gather``)
      and weighted with ``MatMul`` (:func:`~litedetr.ops.bilinear.gather_rows`): no ``GridSample``, for
      runtimes that lack it or compile it wrongly, at the cost of ``(B*Lq*M, 4*L*P, D)`` gathered rows.

    Neither the C++ kernels nor ``embedding_bag`` can be traced, so a trace always takes one of these.

    Raises:
        ValueError: ``kind`` is not one of :data:`TRACED_SAMPLING`.
    """
    if kind not in TRACED_SAMPLING:
        raise ValueError(f"sampling must be one of {', '.join(TRACED_SAMPLING)}, got {kind!r}")
    _traced_kind.append(kind)
    try:
        yield
    finally:
        _traced_kind.pop()


def _autograd(*tensors: Tensor) -> bool:
    """Whether autograd records this call: grad mode on and an input that requires grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def attention_backend(*tensors: Tensor) -> str:
    """The implementation :func:`ms_deform_attn` and :func:`ms_deform_attn_key_aware` run for these inputs.

    ``"triton"`` (CUDA, Triton installed); while tracing or exporting to ONNX ``"grid_sample"``, or
    ``"gather"`` within ``traced_sampling("gather")``;
    ``"cpu_kernel"`` (the C++ kernels built and not switched off, CPU inputs in float32, float64,
    bfloat16 or float16 outside ``torch.compile``, the last two computed in float32: without autograd
    the forward kernel alone, with autograd the ``litedetr::cpu_*`` custom ops with the fused
    backward); otherwise
    ``"grid_sample"`` with autograd and ``"gather"`` (``embedding_bag`` row gathers) without.
    """
    if tensors[0].is_cuda:
        from litedetr.ops import custom_ops

        if custom_ops.triton_enabled():
            return "triton"
    if tracing():
        return _traced_kind[-1]
    if cpu_kernels.enabled(*tensors):
        return "cpu_kernel"
    return "grid_sample" if _autograd(*tensors) else "gather"


def _kda_gather(query: Tensor, key: Tensor, value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, logit_bias: Tensor | None) -> Tensor:
    """KDA without autograd: keys gathered per sample; when ``key is value`` the sampled keys are the
    sampled values and are weighted with one batched product, otherwise values are gathered already
    weighted (never materialised)."""
    b, s, m, d = value.shape
    lq, n_levels, p = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    rows, weights = bilinear_corners(spatial_shapes, sampling_locations, s, value.dtype)
    keys = gather_rows(key.reshape(-1, d), rows, weights).view(b * lq * m, n_levels * p, d)
    q = query.to(value.dtype).reshape(b * lq * m, d, 1) * (1.0 / math.sqrt(d))
    logits = torch.bmm(keys, q).view(b, lq, m, n_levels, p)
    if logit_bias is not None:
        logits = logits + logit_bias.to(logits.dtype)
    attention = logits.flatten(3).softmax(-1, dtype=torch.promote_types(value.dtype, torch.float32)).view_as(logits)
    if key is value:
        return torch.bmm(attention.to(value.dtype).view(b * lq * m, 1, n_levels * p), keys).view(b, lq, m * d)
    weights *= attention.to(value.dtype)[..., None]
    return gather_rows(value.reshape(-1, d), rows.flatten(3), weights.flatten(3)).view(b, lq, m * d)


def _merge_heads(out: Tensor, b: int, m: int) -> Tensor:
    """``(B*M, Lq, D, 1)`` -> ``(B, Lq, M*D)``."""
    _, lq, d, _ = out.shape
    return out.view(b, m, lq, d).transpose(1, 2).reshape(b, lq, m * d)


def ms_deform_attn(value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention with given attention weights.

    Args:
        value: ``(B, S, M, D)`` values of all levels, flattened level by level (row-major per level).
        spatial_shapes: ``(H_l, W_l)`` per level: a tuple of int pairs (:data:`~litedetr.ops.geometry.LevelShapes`,
            no device sync, no graph break) or an ``(L, 2)`` integer tensor.
        sampling_locations: ``(B, Lq, M, L, P, 2)`` as ``(x, y)`` in [0, 1] of each level's map.
        attention_weights: ``(B, Lq, M, L, P)`` (normally softmax-normalised over ``L*P``).

    Returns:
        ``(B, Lq, M*D)``.

    CUDA inputs run the fused Triton kernel (``litedetr::ms_deform_attn``, see
    :mod:`litedetr.ops.custom_ops`) when Triton is installed; CPU inputs the fused C++ kernels where
    they build (:mod:`litedetr.ops.cpu_kernels`; with autograd ``litedetr::cpu_ms_deform_attn`` and
    its fused backward, :mod:`litedetr.ops.cpu_autograd`); other inputs the PyTorch code below (see
    :func:`attention_backend`).
    """
    shapes = _check_shapes(value, spatial_shapes, sampling_locations)
    b, _, m, _ = value.shape
    _, lq, _, n_levels, p, _ = sampling_locations.shape
    if attention_weights.shape != (b, lq, m, n_levels, p):
        raise ValueError(f"attention_weights must be {(b, lq, m, n_levels, p)}, got {tuple(attention_weights.shape)}")
    backend = attention_backend(value, sampling_locations, attention_weights)
    if backend == "triton":
        from litedetr.ops import custom_ops

        return custom_ops.ms_deform_attn(value, shapes, sampling_locations, attention_weights)
    if backend == "cpu_kernel" and _autograd(value, sampling_locations, attention_weights):
        return cpu_autograd.ms_deform_attn(value, shapes, sampling_locations, attention_weights)
    if backend == "cpu_kernel":
        return cpu_kernels.ms_deform_attn(value, shapes, sampling_locations, attention_weights)
    if backend == "gather":
        rows, corner_weights = bilinear_corners(shapes, sampling_locations, value.shape[1], value.dtype)
        corner_weights *= attention_weights.to(value.dtype)[..., None]
        out = gather_rows(value.reshape(-1, value.shape[-1]), rows.flatten(3), corner_weights.flatten(3))
        return out.view(b, lq, -1)
    weights = attention_weights.transpose(1, 2).reshape(b * m, lq, n_levels * p, 1).to(value.dtype)
    sampled = _sample(_level_maps(value, shapes), _level_grids(sampling_locations))  # (B*M, Lq, D, L*P)
    return _merge_heads(sampled @ weights, b, m)


def ms_deform_attn_key_aware(
    query: Tensor, key: Tensor, value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, logit_bias: Tensor | None = None
) -> Tensor:
    """Key-aware deformable attention (KDA, Lite DETR).

    Keys and values are bilinearly sampled at the same locations, in one pass per level (when ``key``
    is ``value``, as in the authors' ``proj_key=False`` setting, the map is sampled once). Per head,
    the weights are a softmax over all ``L*P`` sampled keys of ``q.k / sqrt(D)``; a sample outside a
    map is a zero key and a zero value, and stays in the softmax (as in the authors' code).

    Args:
        query: ``(B, Lq, M, D)`` projected queries.
        key: ``(B, S, M, D)``.
        value: ``(B, S, M, D)``.
        spatial_shapes: ``(H_l, W_l)`` per level, as for :func:`ms_deform_attn`.
        sampling_locations: ``(B, Lq, M, L, P, 2)`` as ``(x, y)`` in [0, 1].
        logit_bias: ``(B, Lq, M, L, P)`` added to every ``q.k / sqrt(D)`` before the softmax, or ``None``
            (the authors' KDA). Not in the authors' code: see
            :class:`~litedetr.nn.attention.KeyAwareOptions`' ``query_logits``.

    Returns:
        ``(B, Lq, M*D)``.

    CUDA inputs run the fused Triton kernel (``litedetr::ms_deform_attn_key_aware``, see
    :mod:`litedetr.ops.custom_ops`) when Triton is installed; CPU inputs the fused C++ kernels where
    they build (:mod:`litedetr.ops.cpu_kernels`; with autograd ``litedetr::cpu_ms_deform_attn_key_aware``
    and its fused backward, :mod:`litedetr.ops.cpu_autograd`); other inputs the PyTorch code below (see
    :func:`attention_backend`).
    """
    shapes = _check_shapes(value, spatial_shapes, sampling_locations)
    if key.shape != value.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must have the same shape")
    b, _, m, d = value.shape
    _, lq, _, _, _, _ = sampling_locations.shape
    if query.shape != (b, lq, m, d):
        raise ValueError(f"query must be {(b, lq, m, d)}, got {tuple(query.shape)}")
    n_levels, p = sampling_locations.shape[3:5]
    if logit_bias is not None and logit_bias.shape != (b, lq, m, n_levels, p):
        raise ValueError(f"logit_bias must be {(b, lq, m, n_levels, p)}, got {tuple(logit_bias.shape)}")
    inputs = (value, query, key, sampling_locations, *([] if logit_bias is None else [logit_bias]))
    backend = attention_backend(*inputs)
    if backend == "triton":
        from litedetr.ops import custom_ops

        return custom_ops.ms_deform_attn_key_aware(query, key, value, shapes, sampling_locations, logit_bias)
    if backend == "cpu_kernel" and _autograd(*inputs):
        return cpu_autograd.ms_deform_attn_key_aware(query, key, value, shapes, sampling_locations, logit_bias)
    if backend == "cpu_kernel":
        return cpu_kernels.ms_deform_attn_key_aware(query, key, value, shapes, sampling_locations, logit_bias)
    if backend == "gather":
        return _kda_gather(query, key, value, shapes, sampling_locations, logit_bias)
    shared = key is value
    feats = value if shared else torch.cat([key, value], dim=-1)
    sampled = _sample(_level_maps(feats, shapes), _level_grids(sampling_locations))  # (B*M, Lq, D or 2D, L*P)
    keys = sampled if shared else sampled[:, :, :d]
    values = sampled if shared else sampled[:, :, d:]
    return _merge_heads(values @ _kda_softmax(query, keys, logit_bias).unsqueeze(-1), b, m)


def _kda_softmax(query: Tensor, keys: Tensor, logit_bias: Tensor | None) -> Tensor:
    """KDA weights from ``(B, Lq, M, D)`` queries, sampled keys ``(B*M, Lq, D, L*P)`` and an optional
    ``(B, Lq, M, L, P)`` logit bias -> ``(B*M, Lq, L*P)``."""
    b, lq, m, d = query.shape
    q = query.to(keys.dtype).transpose(1, 2).reshape(b * m, lq, 1, d) * (1.0 / math.sqrt(d))
    logits = (q @ keys).squeeze(2)
    if logit_bias is not None:
        logits = logits + logit_bias.to(logits.dtype).transpose(1, 2).reshape(b * m, lq, -1)
    return logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(logits.dtype)


def key_aware_attention_weights(
    query: Tensor, key: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, logit_bias: Tensor | None = None
) -> Tensor:
    """The attention weights KDA applies: softmax over ``L*P`` of ``q.k / sqrt(D)`` of the sampled keys
    (plus ``logit_bias``, where given).

    For inspection (e.g. ``litedetr explain``); the same computation as in
    :func:`ms_deform_attn_key_aware` (``grid_sample`` path), out-of-map samples included as zero keys.

    Args:
        query: ``(B, Lq, M, D)``; key: ``(B, S, M, D)``; spatial_shapes: ``(H_l, W_l)`` per level;
        sampling_locations: ``(B, Lq, M, L, P, 2)`` in [0, 1]; logit_bias: ``(B, Lq, M, L, P)`` or None.

    Returns:
        ``(B, Lq, M, L, P)``, summing to 1 over ``L, P``.
    """
    shapes = _check_shapes(key, spatial_shapes, sampling_locations)
    b, lq, m, n_levels, p, _ = sampling_locations.shape
    keys = _sample(_level_maps(key, shapes), _level_grids(sampling_locations))
    weights = _kda_softmax(query, keys, logit_bias).view(b, m, lq, n_levels, p)
    return weights.transpose(1, 2)
