"""``torch.library`` custom ops over the fused Triton deformable-attention kernels.

Registered ops (schemas inferred from the signatures below):

- ``litedetr::ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
  attention_weights) -> Tensor``: MSDA, ``(B, Lq, M*D)``.
- ``litedetr::ms_deform_attn_key_aware(query, key?, value, spatial_shapes, level_start_index,
  sampling_locations, logit_bias?) -> (Tensor, Tensor)``: KDA output ``(B, Lq, M*D)`` and the fp32
  log-sum-exp ``(B, Lq, M)`` of its logits (kept for the backward, not differentiable). ``key=None``
  means the keys are the values (sampled once); ``logit_bias`` ``(B, Lq, M, L, P)`` is added to the logits.
- ``litedetr::ms_deform_attn_backward`` and ``litedetr::ms_deform_attn_key_aware_backward``: the
  Triton backward kernels, called from the registered autograd formulas.

Each op has a fake (meta) implementation, so ``torch.compile`` and ``torch.export`` trace through
them without running Triton. Triton itself is imported only when an op runs, so this module (and
``litedetr.ops``) imports without it. The ops run on CUDA tensors, or on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported), which is how the tests drive
them on machines without a GPU: :func:`ms_deform_attn` and :func:`ms_deform_attn_key_aware` below
always take the Triton path, whatever the device.
"""

import contextlib
import importlib.util
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from litedetr.ops.geometry import SpatialShapes, check_token_count, level_shapes, level_start_index, shapes_tensor
from litedetr.ops.switch import KernelSwitch

__all__ = ["TRITON_AVAILABLE", "key_aware_input_grads", "ms_deform_attn", "ms_deform_attn_key_aware", "triton_disabled", "triton_enabled"]

TRITON_AVAILABLE: bool = importlib.util.find_spec("triton") is not None
_switch = KernelSwitch()


def triton_enabled() -> bool:
    """Whether :mod:`litedetr.ops` sends CUDA inputs to the Triton kernels (Triton installed, not inside :func:`triton_disabled`)."""
    return TRITON_AVAILABLE and _switch.on


def triton_disabled() -> contextlib.AbstractContextManager[None]:
    """Within this context, :mod:`litedetr.ops` runs its PyTorch implementation on CUDA inputs too (reference runs, benchmarks)."""
    return _switch.off()


def _kernels() -> ModuleType:
    from litedetr.ops import triton_deform_attn

    return triton_deform_attn


def _contiguous_like(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype if dtype is None else dtype, device=t.device)


@torch.library.custom_op("litedetr::ms_deform_attn", mutates_args=())
def _ms_deform_attn_op(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    return _kernels().msda_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@_ms_deform_attn_op.register_fake
def _ms_deform_attn_fake(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    b, _, m, d = value.shape
    return value.new_empty((b, sampling_locations.shape[1], m * d))


@torch.library.custom_op("litedetr::ms_deform_attn_backward", mutates_args=())
def _ms_deform_attn_backward_op(
    grad_out: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().msda_backward(grad_out, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@_ms_deform_attn_backward_op.register_fake
def _ms_deform_attn_backward_fake(
    grad_out: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    return _contiguous_like(value), _contiguous_like(sampling_locations), _contiguous_like(attention_weights)


def _ms_deform_attn_setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _ms_deform_attn_backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    value, spatial_shapes, starts, locations, weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = torch.ops.litedetr.ms_deform_attn_backward(grad_out, value, spatial_shapes, starts, locations, weights)
    needs = ctx.needs_input_grad
    return (
        grad_value if needs[0] else None,
        None,
        None,
        grad_locations if needs[3] else None,
        grad_weights if needs[4] else None,
    )


_ms_deform_attn_op.register_autograd(_ms_deform_attn_backward, setup_context=_ms_deform_attn_setup_context)


@torch.library.custom_op("litedetr::ms_deform_attn_key_aware", mutates_args=())
def _key_aware_op(
    query: Tensor,
    key: Tensor | None,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    logit_bias: Tensor | None,
) -> tuple[Tensor, Tensor]:
    return _kernels().kda_forward(query, key, value, spatial_shapes, level_start_index, sampling_locations, logit_bias)


@_key_aware_op.register_fake
def _key_aware_fake(
    query: Tensor,
    key: Tensor | None,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    logit_bias: Tensor | None,
) -> tuple[Tensor, Tensor]:
    b, _, m, d = value.shape
    lq = sampling_locations.shape[1]
    return value.new_empty((b, lq, m * d)), value.new_empty((b, lq, m), dtype=torch.float32)


@torch.library.custom_op("litedetr::ms_deform_attn_key_aware_backward", mutates_args=())
def _key_aware_backward_op(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor | None,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    out: Tensor,
    lse: Tensor,
    logit_bias: Tensor | None,
) -> list[Tensor]:
    """Returns ``[grad_query, grad_value, grad_sampling_locations]``, then ``grad_key`` when ``key`` is
    given, then ``grad_logit_bias`` when ``logit_bias`` is given."""
    grad_query, grad_key, grad_value, grad_locations, grad_bias = _kernels().kda_backward(
        grad_out, query, key, value, spatial_shapes, level_start_index, sampling_locations, out, lse, logit_bias
    )
    return [grad_query, grad_value, grad_locations] + [grad for grad in (grad_key, grad_bias) if grad is not None]


@_key_aware_backward_op.register_fake
def _key_aware_backward_fake(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor | None,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    out: Tensor,
    lse: Tensor,
    logit_bias: Tensor | None,
) -> list[Tensor]:
    grads = [_contiguous_like(query), _contiguous_like(value), _contiguous_like(sampling_locations)]
    return grads + [_contiguous_like(t) for t in (key, logit_bias) if t is not None]


def _key_aware_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(*inputs, out, lse)


def _key_aware_backward(ctx: Any, grad_out: Tensor, grad_lse: Tensor | None) -> tuple[Tensor | None, ...]:
    query, key, value, spatial_shapes, starts, locations, bias, out, lse = ctx.saved_tensors
    grads = torch.ops.litedetr.ms_deform_attn_key_aware_backward(grad_out, query, key, value, spatial_shapes, starts, locations, out, lse, bias)
    return key_aware_input_grads(grads, key is not None, bias is not None, ctx.needs_input_grad, shape_inputs=2)


def key_aware_input_grads(grads: tuple[Tensor, ...], has_key: bool, has_bias: bool, needs: tuple[bool, ...], shape_inputs: int) -> tuple[Tensor | None, ...]:
    """A KDA backward op's ``(grad_query, grad_value, grad_locations[, grad_key][, grad_logit_bias])`` as
    an autograd formula returns them: in input order ``(query, key, value, <shape_inputs level-shape
    inputs>, locations, logit_bias)``, ``None`` for the level shapes and for every input whose gradient
    is not needed (``needs``)."""
    grad_query, grad_value, grad_locations, *rest = grads
    grad_key = rest.pop(0) if has_key else None
    grad_bias = rest.pop(0) if has_bias else None
    found = (grad_query, grad_key, grad_value, *([None] * shape_inputs), grad_locations, grad_bias)
    return tuple(grad if need else None for grad, need in zip(found, needs, strict=True))


_key_aware_op.register_autograd(_key_aware_backward, setup_context=_key_aware_setup_context)


def _geometry(spatial_shapes: SpatialShapes, num_tokens: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(L, 2)`` long shapes and ``(L,)`` level starts on ``device``, the shapes checked against
    ``num_tokens`` when that costs no device sync (always for a tuple, for a tensor on the CPU outside
    ``torch.compile``). The tensors of a tuple are made once per shapes and device (see
    :func:`~litedetr.ops.geometry.shapes_tensor`); a tensor's starts are computed on the device."""
    reads_host = not isinstance(spatial_shapes, Tensor) or (spatial_shapes.device.type == "cpu" and not torch.compiler.is_compiling())
    if reads_host:
        check_token_count(level_shapes(spatial_shapes), num_tokens)
    on_device = shapes_tensor(spatial_shapes, device)
    return on_device, level_start_index(on_device)


def ms_deform_attn(value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """MSDA through ``litedetr::ms_deform_attn``; same arguments and result as :func:`litedetr.ops.ms_deform_attn`.

    Shapes: value ``(B, S, M, D)``, spatial_shapes ``(H_l, W_l)`` per level (a tuple of int pairs or an
    ``(L, 2)`` tensor), sampling_locations ``(B, Lq, M, L, P, 2)``, attention_weights ``(B, Lq, M, L, P)``
    -> ``(B, Lq, M*D)``. A shapes tensor on the GPU is trusted to cover the ``S`` tokens (checking it
    would synchronise the device).
    """
    shapes, starts = _geometry(spatial_shapes, value.shape[1], value.device)
    return torch.ops.litedetr.ms_deform_attn(value, shapes, starts, sampling_locations, attention_weights)


def ms_deform_attn_key_aware(
    query: Tensor, key: Tensor, value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor, logit_bias: Tensor | None = None
) -> Tensor:
    """KDA through ``litedetr::ms_deform_attn_key_aware``; same arguments and result as :func:`litedetr.ops.ms_deform_attn_key_aware`.

    Shapes: query ``(B, Lq, M, D)``, key/value ``(B, S, M, D)``, spatial_shapes as :func:`ms_deform_attn`,
    sampling_locations ``(B, Lq, M, L, P, 2)``, logit_bias ``(B, Lq, M, L, P)`` or None -> ``(B, Lq, M*D)``.
    When ``key is value`` the map is sampled once and both gradients land in the value's.
    """
    shapes, starts = _geometry(spatial_shapes, value.shape[1], value.device)
    key = None if key is value else key
    out, _ = torch.ops.litedetr.ms_deform_attn_key_aware(query, key, value, shapes, starts, sampling_locations, logit_bias)
    return out
