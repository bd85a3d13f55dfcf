"""MSDA and KDA with autograd on the CPU: ``torch.library`` custom ops over the C++ kernels'
forward and fused backward (:mod:`litedetr.ops.cpu_kernels`, ``csrc/deform_attn_cpu.cpp``).

Registered ops (schemas inferred from the signatures below), CPU tensors of one dtype, float32 or float64:

- ``litedetr::cpu_ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights)``
  -> ``(B, Lq, M*D)``, and its backward ``litedetr::cpu_ms_deform_attn_backward(grad_out, value,
  spatial_shapes, sampling_locations, attention_weights)`` -> ``(grad_value, grad_sampling_locations,
  grad_attention_weights)``.
- ``litedetr::cpu_ms_deform_attn_key_aware(query, key?, value, spatial_shapes, sampling_locations,
  logit_bias?)`` -> ``(B, Lq, M*D)`` (``key=None``: the keys are the values, sampled once;
  ``logit_bias``: ``(B, Lq, M, L, P)`` added to every ``q.k / sqrt(D)``), and its backward
  ``litedetr::cpu_ms_deform_attn_key_aware_backward(grad_out, query, key?, value, spatial_shapes,
  sampling_locations, logit_bias?)`` -> ``[grad_query, grad_value, grad_sampling_locations]``, then
  ``grad_key`` when ``key`` is given, then ``grad_logit_bias`` when ``logit_bias`` is given.

Autograd saves the inputs only: the backward recomputes the bilinear corners and KDA's softmax of
each query-head, so nothing of size queries x heads x levels x points x channels exists in either
pass. Every op has a fake implementation, so ``torch.compile`` and ``torch.export`` trace it as one
op. :func:`ms_deform_attn` and :func:`ms_deform_attn_key_aware` check shapes and cast the inputs to
the compute dtype (float64 for float64 values, float32 otherwise: bf16 and fp16 from autocast are
upcast), and autograd casts the gradients back to each input's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from litedetr.ops import cpu_kernels
from litedetr.ops.cpu_kernels import compute_dtype
from litedetr.ops.custom_ops import key_aware_input_grads
from litedetr.ops.geometry import SpatialShapes

__all__ = ["ms_deform_attn", "ms_deform_attn_key_aware"]


def _empty_like(t: Tensor) -> Tensor:
    return t.new_empty(t.shape)


@torch.library.custom_op("litedetr::cpu_ms_deform_attn", mutates_args=(), device_types="cpu")
def _msda_op(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    return cpu_kernels._kernels().ms_deform_attn_forward(value, spatial_shapes, sampling_locations, attention_weights)


@_msda_op.register_fake
def _msda_fake(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    b, _, m, d = value.shape
    return value.new_empty((b, sampling_locations.shape[1], m * d))


@torch.library.custom_op("litedetr::cpu_ms_deform_attn_backward", mutates_args=(), device_types="cpu")
def _msda_backward_op(
    grad_out: Tensor, value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    grads = cpu_kernels._kernels().ms_deform_attn_backward(grad_out, value, spatial_shapes, sampling_locations, attention_weights)
    return tuple(grads)


@_msda_backward_op.register_fake
def _msda_backward_fake(
    grad_out: Tensor, value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return _empty_like(value), _empty_like(sampling_locations), _empty_like(attention_weights)


def _msda_setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _msda_backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    value, spatial_shapes, locations, weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = torch.ops.litedetr.cpu_ms_deform_attn_backward(grad_out, value, spatial_shapes, locations, weights)
    needs = ctx.needs_input_grad
    return grad_value if needs[0] else None, None, grad_locations if needs[2] else None, grad_weights if needs[3] else None


_msda_op.register_autograd(_msda_backward, setup_context=_msda_setup_context)


@torch.library.custom_op("litedetr::cpu_ms_deform_attn_key_aware", mutates_args=(), device_types="cpu")
def _kda_op(query: Tensor, key: Tensor | None, value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, logit_bias: Tensor | None) -> Tensor:
    shared = key is None
    return cpu_kernels._kernels().ms_deform_attn_key_aware_forward(
        query, value if shared else key, value, spatial_shapes, sampling_locations, shared, logit_bias
    )


@_kda_op.register_fake
def _kda_fake(query: Tensor, key: Tensor | None, value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, logit_bias: Tensor | None) -> Tensor:
    b, _, m, d = value.shape
    return value.new_empty((b, sampling_locations.shape[1], m * d))


@torch.library.custom_op("litedetr::cpu_ms_deform_attn_key_aware_backward", mutates_args=(), device_types="cpu")
def _kda_backward_op(
    grad_out: Tensor, query: Tensor, key: Tensor | None, value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, logit_bias: Tensor | None
) -> list[Tensor]:
    """Returns ``[grad_query, grad_value, grad_sampling_locations]``, then ``grad_key`` when ``key`` is
    given, then ``grad_logit_bias`` when ``logit_bias`` is given."""
    shared = key is None
    return cpu_kernels._kernels().ms_deform_attn_key_aware_backward(
        grad_out, query, value if shared else key, value, spatial_shapes, sampling_locations, shared, logit_bias
    )


@_kda_backward_op.register_fake
def _kda_backward_fake(
    grad_out: Tensor, query: Tensor, key: Tensor | None, value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, logit_bias: Tensor | None
) -> list[Tensor]:
    grads = [_empty_like(query), _empty_like(value), _empty_like(sampling_locations)]
    return grads + [_empty_like(t) for t in (key, logit_bias) if t is not None]


def _kda_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _kda_backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    query, key, value, spatial_shapes, locations, bias = ctx.saved_tensors
    grads = torch.ops.litedetr.cpu_ms_deform_attn_key_aware_backward(grad_out, query, key, value, spatial_shapes, locations, bias)
    return key_aware_input_grads(grads, key is not None, bias is not None, ctx.needs_input_grad, shape_inputs=1)


_kda_op.register_autograd(_kda_backward, setup_context=_kda_setup_context)


def ms_deform_attn(value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """MSDA through ``litedetr::cpu_ms_deform_attn`` (differentiable in value, locations and weights).

    Shapes: value ``(B, S, M, D)``, spatial_shapes ``(H_l, W_l)`` per level (a tuple of int pairs or an
    ``(L, 2)`` tensor), sampling_locations ``(B, Lq, M, L, P, 2)``, attention_weights ``(B, Lq, M, L, P)``
    -> ``(B, Lq, M*D)`` in value's dtype.

    Raises:
        ValueError: a shape does not fit the others (named).
    """
    weights_dims = ("B", "Lq", "M", "L", "P")
    shapes = cpu_kernels.check_shapes(value, spatial_shapes, sampling_locations, attention_weights=(attention_weights, weights_dims))
    dtype = compute_dtype(value)
    out = torch.ops.litedetr.cpu_ms_deform_attn(value.to(dtype), shapes, sampling_locations.to(dtype), attention_weights.to(dtype))
    return out.to(value.dtype)


def ms_deform_attn_key_aware(
    query: Tensor, key: Tensor, value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, logit_bias: Tensor | None = None
) -> Tensor:
    """KDA through ``litedetr::cpu_ms_deform_attn_key_aware`` (differentiable in query, key, value,
    locations and the logit bias).

    Shapes: query ``(B, Lq, M, D)``, key and value ``(B, S, M, D)``, spatial_shapes as :func:`ms_deform_attn`,
    sampling_locations ``(B, Lq, M, L, P, 2)``, logit_bias ``(B, Lq, M, L, P)`` or None -> ``(B, Lq, M*D)``
    in value's dtype. When ``key is value`` the map is sampled once and the value's gradient holds both.

    Raises:
        ValueError: a shape does not fit the others (named).
    """
    shapes = cpu_kernels.check_key_aware_shapes(query, key, value, spatial_shapes, sampling_locations, logit_bias)
    dtype = compute_dtype(value)
    distinct_key = None if key is value else key.to(dtype)
    bias = None if logit_bias is None else logit_bias.to(dtype)
    out = torch.ops.litedetr.cpu_ms_deform_attn_key_aware(query.to(dtype), distinct_key, value.to(dtype), shapes, sampling_locations.to(dtype), bias)
    return out.to(value.dtype)
