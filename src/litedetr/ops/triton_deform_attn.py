"""Fused Triton kernels for multi-scale deformable attention (MSDA) and key-aware deformable attention (KDA).

Same contracts as the PyTorch ops in :mod:`litedetr.ops.deform_attn` (bilinear sampling, zero
padding outside each map, ``align_corners=False``), forward and backward, without materialising the
``(B, Lq, M, L*P, D)`` sampled keys/values: one program handles ``BLOCK_Q`` queries of one head of
one image, walks the ``L*P`` sampling points, bilinearly gathers the four neighbouring rows of
``D`` channels for each point and accumulates in fp32 registers (KDA: online softmax over the
``L*P`` logits). The backward recomputes the samples and scatters into fp32 gradient buffers for
value/key with ``tl.atomic_add``; gradients of queries, sampling locations and attention weights are
owned by one program each and stored directly.

Inputs may be fp32, bf16 or fp16 (any mix); every sum is in fp32. The kernels run on CUDA tensors,
or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is
imported), see :func:`interpreted`.

Notation: ``B`` batch, ``S`` tokens over all levels, ``M`` heads, ``D`` channels per head, ``Lq``
queries, ``L`` levels, ``P`` points per level and head.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["interpreted", "kda_backward", "kda_forward", "msda_backward", "msda_forward"]

# Queries per program are chosen so that a (BLOCK_Q, BLOCK_D) fp32 tile holds about this many elements:
# with 4 warps and D = 32 every kernel then stays within 128 registers per thread without spilling on
# sm_90 (KDA forward with distinct keys gathers twice as many rows, so it takes half the queries).
_TILE_ELEMENTS_FWD = 1024
_TILE_ELEMENTS_BWD = 1024
_MAX_BLOCK_Q = 64
_MIN_BLOCK_Q = 16


@triton.jit
def _bilinear_setup(loc_ptr, sample, q_mask, height, width):
    """Top-left neighbour ``(h0, w0)`` (int32) and fractions ``(lh, lw)`` of one sampling point per query.

    ``loc_ptr`` holds ``(x, y)`` pairs in [0, 1]; pixel ``(i, j)`` has its centre at
    ``((j + 0.5) / W, (i + 0.5) / H)``. Coordinates are clamped to ``[-2, size + 1]``: beyond that all
    four neighbours are outside the map either way, so values and gradients are unchanged.
    """
    x = tl.load(loc_ptr + 2 * sample, mask=q_mask, other=0.0).to(tl.float32)
    y = tl.load(loc_ptr + 2 * sample + 1, mask=q_mask, other=0.0).to(tl.float32)
    height_f = height.to(tl.float32)
    width_f = width.to(tl.float32)
    h_im = tl.minimum(tl.maximum(y * height_f - 0.5, -2.0), height_f + 1.0)
    w_im = tl.minimum(tl.maximum(x * width_f - 0.5, -2.0), width_f + 1.0)
    h_floor = tl.floor(h_im)
    w_floor = tl.floor(w_im)
    return h_floor.to(tl.int32), w_floor.to(tl.int32), h_im - h_floor, w_im - w_floor


@triton.jit
def _corner(start, row, col, height, width, row_stride, q_mask):
    """Row offsets ``(BLOCK_Q,)`` (int32, relative to the head's base) of the neighbour ``(row, col)`` of each query, and whether it is inside the map."""
    inside = q_mask & (row >= 0) & (row < height) & (col >= 0) & (col < width)
    rows = (start + row * width + col) * row_stride
    return rows, inside


@triton.jit
def _load_rows(feat_ptr, rows, inside, d_offs, d_mask):
    """``(BLOCK_Q, BLOCK_D)`` fp32 rows, zero where ``inside`` is False."""
    ptrs = feat_ptr + rows[:, None] + d_offs[None, :]
    return tl.load(ptrs, mask=inside[:, None] & d_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _scatter_rows(grad_ptr, rows, inside, d_offs, d_mask, val):
    """Atomically add ``(BLOCK_Q, BLOCK_D)`` fp32 ``val`` to the rows that are inside the map."""
    ptrs = grad_ptr + rows[:, None] + d_offs[None, :]
    tl.atomic_add(ptrs, val, mask=inside[:, None] & d_mask[None, :], sem="relaxed")


@triton.jit
def _bilinear_sample(feat_ptr, start, h0, w0, lh, lw, height, width, row_stride, d_offs, d_mask, q_mask):
    """Bilinear sample of one point per query: ``(BLOCK_Q, BLOCK_D)`` in fp32, zero outside the map."""
    hh = 1.0 - lh
    hw = 1.0 - lw
    rows, inside = _corner(start, h0, w0, height, width, row_stride, q_mask)
    out = _load_rows(feat_ptr, rows, inside, d_offs, d_mask) * (hh * hw)[:, None]
    rows, inside = _corner(start, h0, w0 + 1, height, width, row_stride, q_mask)
    out += _load_rows(feat_ptr, rows, inside, d_offs, d_mask) * (hh * lw)[:, None]
    rows, inside = _corner(start, h0 + 1, w0, height, width, row_stride, q_mask)
    out += _load_rows(feat_ptr, rows, inside, d_offs, d_mask) * (lh * hw)[:, None]
    rows, inside = _corner(start, h0 + 1, w0 + 1, height, width, row_stride, q_mask)
    out += _load_rows(feat_ptr, rows, inside, d_offs, d_mask) * (lh * lw)[:, None]
    return out


@triton.jit
def _store_location_grad(grad_loc_ptr, sample, q_mask, g00, g01, g10, g11, lh, lw, height, width, scale):
    """Gradient w.r.t. ``(x, y)`` given ``g_c = dLoss / d(weight of corner c)`` for the four corners, times ``scale``."""
    hh = 1.0 - lh
    hw = 1.0 - lw
    grad_x = scale * width.to(tl.float32) * (hh * (g01 - g00) + lh * (g11 - g10))
    grad_y = scale * height.to(tl.float32) * (hw * (g10 - g00) + lw * (g11 - g01))
    out_ty = grad_loc_ptr.dtype.element_ty
    tl.store(grad_loc_ptr + 2 * sample, grad_x.to(out_ty), mask=q_mask)
    tl.store(grad_loc_ptr + 2 * sample + 1, grad_y.to(out_ty), mask=q_mask)


@triton.jit
def _msda_fwd_kernel(
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attn_ptr,
    out_ptr,
    num_tokens,
    num_queries,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(Lq, BLOCK_Q), M, B)``: ``out[b, q, m] = sum_{l,p} a[b, q, m, l, p] * sample_l(value[b, :, m], loc[b, q, m, l, p])``."""
    q_block = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    q_offs = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q_offs < num_queries
    d_offs = tl.arange(0, BLOCK_D)
    d_mask = d_offs < HEAD_DIM
    row_stride = NUM_HEADS * HEAD_DIM
    value_base = value_ptr + batch * num_tokens * row_stride + head * HEAD_DIM
    query_row = (batch * num_queries + q_offs) * NUM_HEADS + head
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for level in range(NUM_LEVELS):
        height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        start = tl.load(starts_ptr + level).to(tl.int32)
        for point in tl.static_range(NUM_POINTS):
            sample = query_row * (NUM_LEVELS * NUM_POINTS) + level * NUM_POINTS + point
            h0, w0, lh, lw = _bilinear_setup(loc_ptr, sample, q_mask, height, width)
            weight = tl.load(attn_ptr + sample, mask=q_mask, other=0.0).to(tl.float32)
            sampled = _bilinear_sample(value_base, start, h0, w0, lh, lw, height, width, row_stride, d_offs, d_mask, q_mask)
            acc += weight[:, None] * sampled
    out_offs = query_row[:, None] * HEAD_DIM + d_offs[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])


@triton.jit
def _msda_bwd_kernel(
    grad_out_ptr,
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attn_ptr,
    grad_value_ptr,
    grad_loc_ptr,
    grad_attn_ptr,
    num_tokens,
    num_queries,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(Lq, BLOCK_Q), M, B)``; ``grad_value_ptr`` is an fp32 buffer accumulated with atomics."""
    q_block = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    q_offs = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q_offs < num_queries
    d_offs = tl.arange(0, BLOCK_D)
    d_mask = d_offs < HEAD_DIM
    row_stride = NUM_HEADS * HEAD_DIM
    feat_offset = batch * num_tokens * row_stride + head * HEAD_DIM
    value_base = value_ptr + feat_offset
    grad_value_base = grad_value_ptr + feat_offset
    query_row = (batch * num_queries + q_offs) * NUM_HEADS + head
    tile_mask = q_mask[:, None] & d_mask[None, :]
    grad_out = tl.load(grad_out_ptr + query_row[:, None] * HEAD_DIM + d_offs[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    for level in range(NUM_LEVELS):
        height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        start = tl.load(starts_ptr + level).to(tl.int32)
        for point in tl.static_range(NUM_POINTS):
            sample = query_row * (NUM_LEVELS * NUM_POINTS) + level * NUM_POINTS + point
            h0, w0, lh, lw = _bilinear_setup(loc_ptr, sample, q_mask, height, width)
            weight = tl.load(attn_ptr + sample, mask=q_mask, other=0.0).to(tl.float32)
            hh = 1.0 - lh
            hw = 1.0 - lw
            weighted_grad = weight[:, None] * grad_out

            rows00, inside00 = _corner(start, h0, w0, height, width, row_stride, q_mask)
            rows01, inside01 = _corner(start, h0, w0 + 1, height, width, row_stride, q_mask)
            rows10, inside10 = _corner(start, h0 + 1, w0, height, width, row_stride, q_mask)
            rows11, inside11 = _corner(start, h0 + 1, w0 + 1, height, width, row_stride, q_mask)
            g00 = tl.sum(grad_out * _load_rows(value_base, rows00, inside00, d_offs, d_mask), axis=1)
            g01 = tl.sum(grad_out * _load_rows(value_base, rows01, inside01, d_offs, d_mask), axis=1)
            g10 = tl.sum(grad_out * _load_rows(value_base, rows10, inside10, d_offs, d_mask), axis=1)
            g11 = tl.sum(grad_out * _load_rows(value_base, rows11, inside11, d_offs, d_mask), axis=1)

            grad_attn = hh * hw * g00 + hh * lw * g01 + lh * hw * g10 + lh * lw * g11
            tl.store(grad_attn_ptr + sample, grad_attn.to(grad_attn_ptr.dtype.element_ty), mask=q_mask)
            _store_location_grad(grad_loc_ptr, sample, q_mask, g00, g01, g10, g11, lh, lw, height, width, weight)

            _scatter_rows(grad_value_base, rows00, inside00, d_offs, d_mask, (hh * hw)[:, None] * weighted_grad)
            _scatter_rows(grad_value_base, rows01, inside01, d_offs, d_mask, (hh * lw)[:, None] * weighted_grad)
            _scatter_rows(grad_value_base, rows10, inside10, d_offs, d_mask, (lh * hw)[:, None] * weighted_grad)
            _scatter_rows(grad_value_base, rows11, inside11, d_offs, d_mask, (lh * lw)[:, None] * weighted_grad)


@triton.jit
def _kda_fwd_kernel(
    query_ptr,
    key_ptr,
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    out_ptr,
    lse_ptr,
    num_tokens,
    num_queries,
    scale,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    SHARED_KV: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(Lq, BLOCK_Q), M, B)``: online softmax over the ``L*P`` logits ``scale * q . k``.

    Writes the output and the log-sum-exp ``(B, Lq, M)`` (fp32) of the logits, for the backward.
    With ``SHARED_KV`` the keys are the values (``key_ptr`` is ignored) and each map is read once.
    """
    q_block = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    q_offs = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q_offs < num_queries
    d_offs = tl.arange(0, BLOCK_D)
    d_mask = d_offs < HEAD_DIM
    row_stride = NUM_HEADS * HEAD_DIM
    feat_offset = batch * num_tokens * row_stride + head * HEAD_DIM
    value_base = value_ptr + feat_offset
    key_base = key_ptr + feat_offset
    query_row = (batch * num_queries + q_offs) * NUM_HEADS + head
    tile_offs = query_row[:, None] * HEAD_DIM + d_offs[None, :]
    tile_mask = q_mask[:, None] & d_mask[None, :]
    query = tl.load(query_ptr + tile_offs, mask=tile_mask, other=0.0).to(tl.float32) * scale

    running_max = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for level in range(NUM_LEVELS):
        height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        start = tl.load(starts_ptr + level).to(tl.int32)
        for point in tl.static_range(NUM_POINTS):
            sample = query_row * (NUM_LEVELS * NUM_POINTS) + level * NUM_POINTS + point
            h0, w0, lh, lw = _bilinear_setup(loc_ptr, sample, q_mask, height, width)
            value = _bilinear_sample(value_base, start, h0, w0, lh, lw, height, width, row_stride, d_offs, d_mask, q_mask)
            if SHARED_KV:
                key = value
            else:
                key = _bilinear_sample(key_base, start, h0, w0, lh, lw, height, width, row_stride, d_offs, d_mask, q_mask)
            logit = tl.sum(query * key, axis=1)
            new_max = tl.maximum(running_max, logit)
            rescale = tl.exp(running_max - new_max)
            prob = tl.exp(logit - new_max)
            running_sum = running_sum * rescale + prob
            acc = acc * rescale[:, None] + prob[:, None] * value
            running_max = new_max
    out = acc / running_sum[:, None]
    tl.store(out_ptr + tile_offs, out.to(out_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(lse_ptr + query_row, running_max + tl.log(running_sum), mask=q_mask)


@triton.jit
def _kda_bwd_kernel(
    grad_out_ptr,
    query_ptr,
    key_ptr,
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    out_ptr,
    lse_ptr,
    grad_query_ptr,
    grad_key_ptr,
    grad_value_ptr,
    grad_loc_ptr,
    num_tokens,
    num_queries,
    scale,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    SHARED_KV: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(Lq, BLOCK_Q), M, B)``; recomputes the probabilities from the saved log-sum-exp.

    With ``p_j = softmax(s)_j``, ``s_j = scale * q . k_j``, ``dp_j = dO . v_j`` and
    ``delta = dO . out``: ``ds_j = p_j (dp_j - delta)``, ``dq = scale * sum_j ds_j k_j``,
    ``dv_j = p_j dO``, ``dk_j = scale * ds_j q``, scattered to the four neighbours with their
    bilinear weights. ``grad_key_ptr``/``grad_value_ptr`` are fp32 buffers accumulated with atomics;
    with ``SHARED_KV`` both contributions go to ``grad_value_ptr``.
    """
    q_block = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    q_offs = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q_offs < num_queries
    d_offs = tl.arange(0, BLOCK_D)
    d_mask = d_offs < HEAD_DIM
    row_stride = NUM_HEADS * HEAD_DIM
    feat_offset = batch * num_tokens * row_stride + head * HEAD_DIM
    value_base = value_ptr + feat_offset
    key_base = key_ptr + feat_offset
    grad_value_base = grad_value_ptr + feat_offset
    grad_key_base = grad_key_ptr + feat_offset
    query_row = (batch * num_queries + q_offs) * NUM_HEADS + head
    tile_offs = query_row[:, None] * HEAD_DIM + d_offs[None, :]
    tile_mask = q_mask[:, None] & d_mask[None, :]
    query = tl.load(query_ptr + tile_offs, mask=tile_mask, other=0.0).to(tl.float32) * scale
    grad_out = tl.load(grad_out_ptr + tile_offs, mask=tile_mask, other=0.0).to(tl.float32)
    out = tl.load(out_ptr + tile_offs, mask=tile_mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + query_row, mask=q_mask, other=0.0)
    delta = tl.sum(grad_out * out, axis=1)
    grad_query = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for level in range(NUM_LEVELS):
        height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        start = tl.load(starts_ptr + level).to(tl.int32)
        for point in tl.static_range(NUM_POINTS):
            sample = query_row * (NUM_LEVELS * NUM_POINTS) + level * NUM_POINTS + point
            h0, w0, lh, lw = _bilinear_setup(loc_ptr, sample, q_mask, height, width)
            hh = 1.0 - lh
            hw = 1.0 - lw
            rows00, inside00 = _corner(start, h0, w0, height, width, row_stride, q_mask)
            rows01, inside01 = _corner(start, h0, w0 + 1, height, width, row_stride, q_mask)
            rows10, inside10 = _corner(start, h0 + 1, w0, height, width, row_stride, q_mask)
            rows11, inside11 = _corner(start, h0 + 1, w0 + 1, height, width, row_stride, q_mask)
            v00 = _load_rows(value_base, rows00, inside00, d_offs, d_mask)
            v01 = _load_rows(value_base, rows01, inside01, d_offs, d_mask)
            v10 = _load_rows(value_base, rows10, inside10, d_offs, d_mask)
            v11 = _load_rows(value_base, rows11, inside11, d_offs, d_mask)
            if SHARED_KV:
                k00 = v00
                k01 = v01
                k10 = v10
                k11 = v11
            else:
                k00 = _load_rows(key_base, rows00, inside00, d_offs, d_mask)
                k01 = _load_rows(key_base, rows01, inside01, d_offs, d_mask)
                k10 = _load_rows(key_base, rows10, inside10, d_offs, d_mask)
                k11 = _load_rows(key_base, rows11, inside11, d_offs, d_mask)
            key = (hh * hw)[:, None] * k00 + (hh * lw)[:, None] * k01 + (lh * hw)[:, None] * k10 + (lh * lw)[:, None] * k11
            qk00 = tl.sum(query * k00, axis=1)
            qk01 = tl.sum(query * k01, axis=1)
            qk10 = tl.sum(query * k10, axis=1)
            qk11 = tl.sum(query * k11, axis=1)
            dv00 = tl.sum(grad_out * v00, axis=1)
            dv01 = tl.sum(grad_out * v01, axis=1)
            dv10 = tl.sum(grad_out * v10, axis=1)
            dv11 = tl.sum(grad_out * v11, axis=1)
            logit = hh * hw * qk00 + hh * lw * qk01 + lh * hw * qk10 + lh * lw * qk11
            grad_prob = hh * hw * dv00 + hh * lw * dv01 + lh * hw * dv10 + lh * lw * dv11
            prob = tl.exp(logit - lse)
            grad_logit = prob * (grad_prob - delta)
            grad_query += grad_logit[:, None] * key
            _store_location_grad(
                grad_loc_ptr,
                sample,
                q_mask,
                prob * dv00 + grad_logit * qk00,
                prob * dv01 + grad_logit * qk01,
                prob * dv10 + grad_logit * qk10,
                prob * dv11 + grad_logit * qk11,
                lh,
                lw,
                height,
                width,
                1.0,
            )

            grad_value = prob[:, None] * grad_out
            grad_key = grad_logit[:, None] * query
            if SHARED_KV:
                grad_value += grad_key
            else:
                _scatter_rows(grad_key_base, rows00, inside00, d_offs, d_mask, (hh * hw)[:, None] * grad_key)
                _scatter_rows(grad_key_base, rows01, inside01, d_offs, d_mask, (hh * lw)[:, None] * grad_key)
                _scatter_rows(grad_key_base, rows10, inside10, d_offs, d_mask, (lh * hw)[:, None] * grad_key)
                _scatter_rows(grad_key_base, rows11, inside11, d_offs, d_mask, (lh * lw)[:, None] * grad_key)
            _scatter_rows(grad_value_base, rows00, inside00, d_offs, d_mask, (hh * hw)[:, None] * grad_value)
            _scatter_rows(grad_value_base, rows01, inside01, d_offs, d_mask, (hh * lw)[:, None] * grad_value)
            _scatter_rows(grad_value_base, rows10, inside10, d_offs, d_mask, (lh * hw)[:, None] * grad_value)
            _scatter_rows(grad_value_base, rows11, inside11, d_offs, d_mask, (lh * lw)[:, None] * grad_value)
    grad_query = grad_query * scale
    tl.store(grad_query_ptr + tile_offs, grad_query.to(grad_query_ptr.dtype.element_ty), mask=tile_mask)


def interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import of this module)."""
    return not isinstance(_msda_fwd_kernel, triton.runtime.JITFunction)


def _check_device(*tensors: Tensor) -> None:
    for t in tensors:
        if not t.is_cuda and not interpreted():
            raise RuntimeError(
                f"the Triton deformable-attention kernels need CUDA tensors, got one on {t.device} "
                "(CPU tensors run only under TRITON_INTERPRET=1, set before triton is imported)"
            )


def _blocks(head_dim: int, tile_elements: int) -> tuple[int, int]:
    """``(BLOCK_Q, BLOCK_D)``: a power-of-two channel block covering ``D`` and about ``tile_elements`` per tile."""
    block_d = triton.next_power_of_2(head_dim)
    block_q = max(_MIN_BLOCK_Q, min(_MAX_BLOCK_Q, tile_elements // block_d))
    return block_q, block_d


def _zeros(t: Tensor) -> Tensor:
    """Contiguous zeros of the shape, dtype and device of ``t``."""
    return torch.zeros(t.shape, dtype=t.dtype, device=t.device)


def _geometry(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor) -> tuple[Tensor, Tensor]:
    """``(L, 2)`` shapes and ``(L,)`` starts as contiguous int64 on the values' device."""
    _, s, m, d = value.shape
    if s * m * d >= 2**31:
        raise ValueError(f"one image's values ({s} x {m} x {d}) exceed the int32 offsets of the kernels")
    shapes = spatial_shapes.to(device=value.device, dtype=torch.int64).contiguous()
    starts = level_start_index.to(device=value.device, dtype=torch.int64).contiguous()
    return shapes, starts


def msda_forward(
    value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
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
    _check_device(value, sampling_locations, attention_weights)
    b, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    out = value.new_empty((b, lq, m * d))
    if out.numel() == 0:
        return out
    shapes, starts = _geometry(value, spatial_shapes, level_start_index)
    block_q, block_d = _blocks(d, _TILE_ELEMENTS_FWD)
    grid = (triton.cdiv(lq, block_q), m, b)
    _msda_fwd_kernel[grid](
        value.contiguous(),
        shapes,
        starts,
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
        out,
        s,
        lq,
        NUM_HEADS=m,
        HEAD_DIM=d,
        NUM_LEVELS=n_levels,
        NUM_POINTS=n_points,
        BLOCK_Q=block_q,
        BLOCK_D=block_d,
        num_warps=4,
    )
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
    _check_device(grad_out, value, sampling_locations, attention_weights)
    b, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    if grad_out.numel() == 0 or value.numel() == 0:
        return _zeros(value), _zeros(sampling_locations), _zeros(attention_weights)
    grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
    grad_loc = torch.empty_like(sampling_locations, memory_format=torch.contiguous_format)
    grad_attn = torch.empty_like(attention_weights, memory_format=torch.contiguous_format)
    shapes, starts = _geometry(value, spatial_shapes, level_start_index)
    block_q, block_d = _blocks(d, _TILE_ELEMENTS_BWD)
    grid = (triton.cdiv(lq, block_q), m, b)
    _msda_bwd_kernel[grid](
        grad_out.contiguous(),
        value.contiguous(),
        shapes,
        starts,
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
        grad_value,
        grad_loc,
        grad_attn,
        s,
        lq,
        NUM_HEADS=m,
        HEAD_DIM=d,
        NUM_LEVELS=n_levels,
        NUM_POINTS=n_points,
        BLOCK_Q=block_q,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return grad_value.to(value.dtype), grad_loc, grad_attn


def kda_forward(
    query: Tensor,
    key: Tensor | None,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
) -> tuple[Tensor, Tensor]:
    """KDA forward.

    Args:
        query: ``(B, Lq, M, D)``.
        key: ``(B, S, M, D)``, or ``None`` when the keys are the values.
        value: ``(B, S, M, D)``.
        spatial_shapes: ``(L, 2)`` integer ``(H_l, W_l)``.
        level_start_index: ``(L,)``.
        sampling_locations: ``(B, Lq, M, L, P, 2)`` as ``(x, y)`` in [0, 1].

    Returns:
        ``(B, Lq, M*D)`` output in the dtype of ``value``, and the ``(B, Lq, M)`` fp32 log-sum-exp of
        the logits (for :func:`kda_backward`).
    """
    _check_device(query, value, sampling_locations)
    b, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    out = value.new_empty((b, lq, m * d))
    lse = torch.empty((b, lq, m), dtype=torch.float32, device=value.device)
    if out.numel() == 0:
        return out, lse
    shapes, starts = _geometry(value, spatial_shapes, level_start_index)
    value = value.contiguous()
    block_q, block_d = _blocks(d, _TILE_ELEMENTS_FWD if key is None else _TILE_ELEMENTS_FWD // 2)
    grid = (triton.cdiv(lq, block_q), m, b)
    _kda_fwd_kernel[grid](
        query.contiguous(),
        value if key is None else key.contiguous(),
        value,
        shapes,
        starts,
        sampling_locations.contiguous(),
        out,
        lse,
        s,
        lq,
        1.0 / math.sqrt(d),
        NUM_HEADS=m,
        HEAD_DIM=d,
        NUM_LEVELS=n_levels,
        NUM_POINTS=n_points,
        SHARED_KV=key is None,
        BLOCK_Q=block_q,
        BLOCK_D=block_d,
        num_warps=4,
    )
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
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """KDA backward from the forward's output and log-sum-exp.

    Returns:
        Grads of ``query``, ``key`` (``None`` when ``key`` is ``None``: then the value grad holds both
        roles), ``value`` and ``sampling_locations``, in their shapes and dtypes.
    """
    _check_device(grad_out, query, value, sampling_locations)
    b, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    if grad_out.numel() == 0 or value.numel() == 0:
        return _zeros(query), None if key is None else _zeros(key), _zeros(value), _zeros(sampling_locations)
    grad_query = torch.empty_like(query, memory_format=torch.contiguous_format)
    grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
    grad_key = None if key is None else torch.zeros(key.shape, dtype=torch.float32, device=key.device)
    grad_loc = torch.empty_like(sampling_locations, memory_format=torch.contiguous_format)
    shapes, starts = _geometry(value, spatial_shapes, level_start_index)
    value = value.contiguous()
    block_q, block_d = _blocks(d, _TILE_ELEMENTS_BWD)
    grid = (triton.cdiv(lq, block_q), m, b)
    _kda_bwd_kernel[grid](
        grad_out.contiguous(),
        query.contiguous(),
        value if key is None else key.contiguous(),
        value,
        shapes,
        starts,
        sampling_locations.contiguous(),
        out.contiguous(),
        lse.contiguous(),
        grad_query,
        grad_value if grad_key is None else grad_key,
        grad_value,
        grad_loc,
        s,
        lq,
        1.0 / math.sqrt(d),
        NUM_HEADS=m,
        HEAD_DIM=d,
        NUM_LEVELS=n_levels,
        NUM_POINTS=n_points,
        SHARED_KV=key is None,
        BLOCK_Q=block_q,
        BLOCK_D=block_d,
        num_warps=4,
    )
    if key is None or grad_key is None:
        return grad_query, None, grad_value.to(value.dtype), grad_loc
    return grad_query, grad_key.to(key.dtype), grad_value.to(value.dtype), grad_loc
