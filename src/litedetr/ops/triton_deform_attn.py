"""Fused Triton multi-scale deformable attention (MSDA) and key-aware deformable attention (KDA).

Same contracts as the PyTorch ops in :mod:`litedetr.ops.deform_attn` (bilinear sampling, zero
padding outside each map, ``align_corners=False``), forward and backward; the kernels are in
:mod:`litedetr.ops.triton_kernels`. This module launches them:

- **Device.** Every input must be on one device (a ``ValueError`` names them otherwise), and every
  launch runs under ``torch.cuda.device`` of that device, so tensors on ``cuda:1`` run there whatever
  the current device is.
- **Dtypes and strides.** Inputs may be fp32, bf16 or fp16, in any mix (as autocast produces them),
  and of any strides (they are made contiguous); results come back in their inputs' dtypes.
- **Autotuning.** ``BLOCK_Q`` (queries per program) and ``num_warps`` are tuned once per head dim,
  level count, point count (and KDA's shared or distinct keys) and dtypes, over :func:`config_space`
  less the tiles that would spill registers. The backward kernels accumulate value/key gradients
  with atomics, so those buffers are zeroed before every trial (``reset_to_zero``). Under Triton's
  interpreter the space is pruned to :func:`default_config` (nothing to time on a CPU).
- **Determinism.** Under ``torch.use_deterministic_algorithms(True)`` the launches skip autotuning
  (:func:`default_config`, so reruns use the same reduction order) and the backward kernels store
  each sample's four-neighbour value/key gradients, which are then summed with ``index_add_``
  (deterministic on CUDA in that mode) instead of float atomics. That costs ``4*D`` fp32 numbers
  and 4 int64 row indices per sample (``B*Lq*M*L*P`` samples) during the backward.

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``
set before ``triton`` is imported), see :func:`interpreted`.

Notation: ``B`` batch, ``S`` tokens over all levels, ``M`` heads, ``D`` channels per head, ``Lq``
queries, ``L`` levels, ``P`` points per level and head.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import triton
from torch import Tensor

from litedetr.ops import triton_kernels as kernels

__all__ = [
    "config_space",
    "default_config",
    "deterministic",
    "interpreted",
    "kda_backward",
    "kda_forward",
    "msda_backward",
    "msda_forward",
]

logger = logging.getLogger(__name__)

_MIN_BLOCK_Q, _MAX_BLOCK_Q = 16, 64
_DEFAULT_TILE = 1024
"""Elements of a ``(BLOCK_Q, BLOCK_D)`` fp32 tile in :func:`default_config`: with 4 warps and D = 32
every kernel stays within 128 registers per thread on sm_90."""
_TILE_PER_THREAD = (2, 8)
"""Autotuning keeps configs with this many tile elements per thread (at most 8: the backward holds
about a dozen tiles)."""


def interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import of the kernels)."""
    return not isinstance(kernels.msda_fwd_kernel, triton.runtime.JITFunction)


def deterministic() -> bool:
    """Whether launches are deterministic: ``torch.are_deterministic_algorithms_enabled()`` (see the module docstring)."""
    return torch.are_deterministic_algorithms_enabled()


def config_space() -> list[triton.Config]:
    """Every candidate ``(BLOCK_Q, num_warps)``: BLOCK_Q 16, 32 or 64 and 2, 4 or 8 warps."""
    return [triton.Config({"BLOCK_Q": block_q}, num_warps=warps) for block_q in (16, 32, 64) for warps in (2, 4, 8)]


def default_config(block_d: int) -> triton.Config:
    """The untuned config for ``BLOCK_D`` channels: 4 warps and about 1024 tile elements (16 to 64 queries)."""
    return triton.Config({"BLOCK_Q": max(_MIN_BLOCK_Q, min(_MAX_BLOCK_Q, _DEFAULT_TILE // block_d))}, num_warps=4)


def _tile_per_thread(config: triton.Config, block_d: int) -> float:
    return config.kwargs["BLOCK_Q"] * block_d / (32 * config.num_warps)


def _prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """The configs worth timing for ``kwargs["BLOCK_D"]``; only :func:`default_config` under the interpreter."""
    block_d = kwargs["BLOCK_D"]
    if interpreted():
        return [default_config(block_d)]
    low, high = _TILE_PER_THREAD
    kept = [c for c in configs if low <= _tile_per_thread(c, block_d) <= high]
    return kept or [min(configs, key=lambda c: _tile_per_thread(c, block_d))]


def _autotuned(fn: Any, key: list[str], reset_to_zero: list[str] | None = None) -> Any:
    return triton.autotune(configs=config_space(), key=key, prune_configs_by={"early_config_prune": _prune}, reset_to_zero=reset_to_zero)(fn)


_KEY = ["HEAD_DIM", "NUM_LEVELS", "NUM_POINTS"]
msda_fwd = _autotuned(kernels.msda_fwd_kernel, _KEY)
msda_bwd = _autotuned(kernels.msda_bwd_kernel, _KEY, reset_to_zero=["grad_value_ptr"])
kda_fwd = _autotuned(kernels.kda_fwd_kernel, [*_KEY, "SHARED_KV", "HAS_BIAS"])
kda_bwd = _autotuned(kernels.kda_bwd_kernel, [*_KEY, "SHARED_KV", "HAS_BIAS"], reset_to_zero=["grad_key_ptr", "grad_value_ptr"])
AUTOTUNED = (msda_fwd, msda_bwd, kda_fwd, kda_bwd)
"""Every launch goes through one of these (``triton.runtime.Autotuner``; ``.fn`` is the kernel)."""


def on_device(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """``torch.cuda.device(device)`` for a CUDA device, else a no-op: the context every launch runs in."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def _log_deterministic() -> None:
    logger.info(
        "deterministic algorithms: the Triton deformable-attention kernels run untuned, and their backward "
        "sums value/key gradients with index_add_ instead of float atomics (4*D floats per sample of extra memory)"
    )


def _launch(kernel: Any, grid: Callable[[dict[str, Any]], tuple[int, int, int]], device: torch.device, *args: Any, **meta: Any) -> None:
    """Run ``kernel`` (one of :data:`AUTOTUNED`) on ``device``: autotuned, or :func:`default_config` when :func:`deterministic`."""
    with on_device(device):
        if deterministic():
            _log_deterministic()
            kernel.fn[grid](*args, **meta, **default_config(meta["BLOCK_D"]).all_kwargs())
        else:
            kernel[grid](*args, **meta)


def _common_device(**tensors: Tensor | None) -> torch.device:
    """The one device of ``tensors``; a ``ValueError`` naming each tensor's device if they differ."""
    named = {name: t.device for name, t in tensors.items() if t is not None}
    devices = set(named.values())
    if len(devices) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in named.items())
        raise ValueError(f"the Triton deformable-attention inputs must be on one device, got {listed}")
    device = devices.pop()
    if device.type != "cuda" and not interpreted():
        raise RuntimeError(
            f"the Triton deformable-attention kernels need CUDA tensors, got them on {device} "
            "(CPU tensors run only under TRITON_INTERPRET=1, set before triton is imported)"
        )
    return device


def _geometry(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor) -> tuple[Tensor, Tensor]:
    """``(L, 2)`` shapes and ``(L,)`` starts as contiguous int64 on the values' device."""
    _, s, m, d = value.shape
    if s * m * d >= 2**31:
        raise ValueError(f"one image's values ({s} x {m} x {d}) exceed the int32 offsets of the kernels")
    shapes = spatial_shapes.to(device=value.device, dtype=torch.int64).contiguous()
    starts = level_start_index.to(device=value.device, dtype=torch.int64).contiguous()
    return shapes, starts


def _grid(lq: int, m: int, b: int) -> Callable[[dict[str, Any]], tuple[int, int, int]]:
    return lambda meta: (triton.cdiv(lq, meta["BLOCK_Q"]), m, b)


def _zeros(t: Tensor) -> Tensor:
    """Contiguous zeros of the shape, dtype and device of ``t``."""
    return torch.zeros(t.shape, dtype=t.dtype, device=t.device)


def _parts(sampling_locations: Tensor, d: int, count: int) -> tuple[Tensor, list[Tensor]]:
    """For the deterministic backward: ``(N*4,)`` int64 rows and ``count`` ``(N*4, D)`` fp32 buffers, ``N = B*Lq*M*L*P``."""
    corners = sampling_locations.numel() // 2 * 4
    device = sampling_locations.device
    index = torch.empty(corners, dtype=torch.int64, device=device)
    return index, [torch.empty((corners, d), dtype=torch.float32, device=device) for _ in range(count)]


def _sum_parts(grad: Tensor, index: Tensor, parts: Tensor) -> None:
    """``grad (B, S, M, D)`` fp32 += the rows of ``parts (N*4, D)`` at ``index (N*4,)`` (deterministic ``index_add_``)."""
    grad.view(-1, grad.shape[-1]).index_add_(0, index, parts)


def msda_forward(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """MSDA forward.

    Args:
        value: ``(B, S, M, D)``.
        spatial_shapes: ``(L, 2)`` integer ``(H_l, W_l)``.
        level_start_index: ``(L,)`` index of each level's first token.
        sampling_locations: ``(B, Lq, M, L, P, 2)`` as ``(x, y)`` in [0, 1].
        attention_weights: ``(B, Lq, M, L, P)``.

    Returns:
        ``(B, Lq, M*D)`` in the dtype of ``value``.
    """
    device = _common_device(value=value, sampling_locations=sampling_locations, attention_weights=attention_weights)
    b, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    out = value.new_empty((b, lq, m * d))
    if out.numel() == 0:
        return out
    shapes, starts = _geometry(value, spatial_shapes, level_start_index)
    _launch(
        msda_fwd, _grid(lq, m, b), device,
        value.contiguous(), shapes, starts, sampling_locations.contiguous(), attention_weights.contiguous(), out, s, lq,
        NUM_HEADS=m, HEAD_DIM=d, NUM_LEVELS=n_levels, NUM_POINTS=n_points, BLOCK_D=triton.next_power_of_2(d),
    )  # fmt: skip
    return out


def msda_backward(
    grad_out: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """MSDA backward: ``grad_out`` ``(B, Lq, M*D)`` -> grads of value, sampling_locations, attention_weights (their shapes and dtypes)."""
    device = _common_device(grad_out=grad_out, value=value, sampling_locations=sampling_locations, attention_weights=attention_weights)
    b, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    if grad_out.numel() == 0 or value.numel() == 0:
        return _zeros(value), _zeros(sampling_locations), _zeros(attention_weights)
    grad_value = torch.zeros(value.shape, dtype=torch.float32, device=device)
    grad_loc = torch.empty_like(sampling_locations, memory_format=torch.contiguous_format)
    grad_attn = torch.empty_like(attention_weights, memory_format=torch.contiguous_format)
    shapes, starts = _geometry(value, spatial_shapes, level_start_index)
    exact = deterministic()
    index, parts = _parts(sampling_locations, d, 1) if exact else (grad_value, [grad_value])  # unused unless exact
    _launch(
        msda_bwd, _grid(lq, m, b), device,
        grad_out.contiguous(), value.contiguous(), shapes, starts, sampling_locations.contiguous(), attention_weights.contiguous(),
        grad_value, grad_loc, grad_attn, parts[0], index, s, lq,
        NUM_HEADS=m, HEAD_DIM=d, NUM_LEVELS=n_levels, NUM_POINTS=n_points, DETERMINISTIC=exact, BLOCK_D=triton.next_power_of_2(d),
    )  # fmt: skip
    if exact:
        _sum_parts(grad_value, index, parts[0])
    return grad_value.to(value.dtype), grad_loc, grad_attn


def kda_forward(
    query: Tensor,
    key: Tensor | None,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    logit_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """KDA forward.

    Args:
        query: ``(B, Lq, M, D)``.
        key: ``(B, S, M, D)``, or ``None`` when the keys are the values.
        value: ``(B, S, M, D)``.
        spatial_shapes: ``(L, 2)`` integer ``(H_l, W_l)``.
        level_start_index: ``(L,)``.
        sampling_locations: ``(B, Lq, M, L, P, 2)`` as ``(x, y)`` in [0, 1].
        logit_bias: ``(B, Lq, M, L, P)`` added to every logit, or ``None``.

    Returns:
        ``(B, Lq, M*D)`` output in the dtype of ``value``, and the ``(B, Lq, M)`` fp32 log-sum-exp of
        the logits (for :func:`kda_backward`).
    """
    device = _common_device(query=query, key=key, value=value, sampling_locations=sampling_locations, logit_bias=logit_bias)
    b, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    out = value.new_empty((b, lq, m * d))
    lse = torch.empty((b, lq, m), dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out, lse
    shapes, starts = _geometry(value, spatial_shapes, level_start_index)
    value = value.contiguous()
    _launch(
        kda_fwd, _grid(lq, m, b), device,
        query.contiguous(), value if key is None else key.contiguous(), value, shapes, starts, sampling_locations.contiguous(),
        lse if logit_bias is None else logit_bias.contiguous(), out, lse, s, lq, 1.0 / math.sqrt(d),
        NUM_HEADS=m, HEAD_DIM=d, NUM_LEVELS=n_levels, NUM_POINTS=n_points, SHARED_KV=key is None, HAS_BIAS=logit_bias is not None,
        BLOCK_D=triton.next_power_of_2(d),
    )  # fmt: skip
    return out, lse


def kda_backward(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor | None,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    out: Tensor,
    lse: Tensor,
    logit_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor | None]:
    """KDA backward from the forward's output ``(B, Lq, M*D)`` and log-sum-exp ``(B, Lq, M)``.

    Returns:
        Grads of ``query``, ``key`` (``None`` when ``key`` is ``None``: then the value grad holds both
        roles), ``value``, ``sampling_locations`` and ``logit_bias`` (``None`` without one), in their
        shapes and dtypes.
    """
    device = _common_device(
        grad_out=grad_out, query=query, key=key, value=value, sampling_locations=sampling_locations, out=out, lse=lse, logit_bias=logit_bias
    )
    b, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    if grad_out.numel() == 0 or value.numel() == 0:
        grad_bias = None if logit_bias is None else _zeros(logit_bias)
        return _zeros(query), None if key is None else _zeros(key), _zeros(value), _zeros(sampling_locations), grad_bias
    grad_bias = None if logit_bias is None else torch.empty(logit_bias.shape, dtype=torch.float32, device=device)
    grad_query = torch.empty_like(query, memory_format=torch.contiguous_format)
    grad_value = torch.zeros(value.shape, dtype=torch.float32, device=device)
    grad_key = grad_value if key is None else torch.zeros(key.shape, dtype=torch.float32, device=device)
    grad_loc = torch.empty_like(sampling_locations, memory_format=torch.contiguous_format)
    shapes, starts = _geometry(value, spatial_shapes, level_start_index)
    exact = deterministic()
    # parts: [key, value] (distinct keys) or [value]; unused unless exact
    index, parts = _parts(sampling_locations, d, 1 if key is None else 2) if exact else (grad_value, [grad_value])
    value = value.contiguous()
    _launch(
        kda_bwd, _grid(lq, m, b), device,
        grad_out.contiguous(), query.contiguous(), value if key is None else key.contiguous(), value, shapes, starts,
        sampling_locations.contiguous(), lse if logit_bias is None else logit_bias.contiguous(), out.contiguous(), lse.contiguous(),
        grad_query, grad_key, grad_value, grad_loc, lse if grad_bias is None else grad_bias,
        parts[0], parts[-1], index, s, lq, 1.0 / math.sqrt(d),
        NUM_HEADS=m, HEAD_DIM=d, NUM_LEVELS=n_levels, NUM_POINTS=n_points, SHARED_KV=key is None, HAS_BIAS=logit_bias is not None,
        DETERMINISTIC=exact, BLOCK_D=triton.next_power_of_2(d),
    )  # fmt: skip
    if exact:
        _sum_parts(grad_value, index, parts[-1])
        if key is not None:
            _sum_parts(grad_key, index, parts[0])
    if grad_bias is not None:
        grad_bias = grad_bias.to(logit_bias.dtype)
    if key is None:
        return grad_query, None, grad_value.to(value.dtype), grad_loc, grad_bias
    return grad_query, grad_key.to(key.dtype), grad_value.to(value.dtype), grad_loc, grad_bias
