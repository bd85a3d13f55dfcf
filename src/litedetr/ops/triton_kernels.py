"""The Triton kernels of :mod:`litedetr.ops.triton_deform_attn` (MSDA and KDA, forward and backward).

One program handles ``BLOCK_Q`` queries of one head of one image (grid ``(cdiv(Lq, BLOCK_Q), M, B)``),
walks the ``L*P`` sampling points, bilinearly gathers the four neighbouring rows of ``D`` channels
for each point and accumulates in fp32 registers (KDA: online softmax over the ``L*P`` logits),
without materialising the ``(B, Lq, M, L*P, D)`` sampled keys/values. The backward recomputes the
samples; gradients of queries, sampling locations and attention weights are owned by one program
each and stored directly. Gradients of values/keys go to the four neighbours of every sample: with
``tl.atomic_add`` into fp32 buffers, or (``DETERMINISTIC``) stored per ``(sample, corner)`` with the
table row they belong to, for a deterministic ``index_add_`` by the caller.

Tensors are contiguous: values/keys ``(B, S, M, D)``, queries and outputs ``(B, Lq, M, D)``,
sampling locations ``(B, Lq, M, L, P, 2)``, attention weights ``(B, Lq, M, L, P)``; any of fp32,
bf16 and fp16 (every sum is in fp32). ``BLOCK_Q`` and ``num_warps`` are left to the caller (autotuned
there); ``BLOCK_D`` is ``D`` rounded up to a power of two.
"""

from __future__ import annotations

import triton
import triton.language as tl

from litedetr.ops.triton_sampling import (
    bilinear_sample,
    bilinear_setup,
    corner,
    level_geometry,
    load_rows,
    program_tile,
    scatter_corners,
    store_corner_rows,
    store_location_grad,
)

__all__ = ["kda_bwd_kernel", "kda_fwd_kernel", "msda_bwd_kernel", "msda_fwd_kernel"]


@triton.jit
def msda_fwd_kernel(
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
    q_mask, d_offs, d_mask, feat_offset, base_row, query_row = program_tile(num_tokens, num_queries, NUM_HEADS, HEAD_DIM, BLOCK_Q, BLOCK_D)
    row_stride = NUM_HEADS * HEAD_DIM
    value_base = value_ptr + feat_offset
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for level in range(NUM_LEVELS):
        height, width, start = level_geometry(shapes_ptr, starts_ptr, level)
        for point in tl.static_range(NUM_POINTS):
            sample = query_row * (NUM_LEVELS * NUM_POINTS) + level * NUM_POINTS + point
            h0, w0, lh, lw = bilinear_setup(loc_ptr, sample, q_mask, height, width)
            weight = tl.load(attn_ptr + sample, mask=q_mask, other=0.0).to(tl.float32)
            sampled = bilinear_sample(value_base, start, h0, w0, lh, lw, height, width, row_stride, d_offs, d_mask, q_mask)
            acc += weight[:, None] * sampled
    out_offs = query_row[:, None] * HEAD_DIM + d_offs[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])


@triton.jit
def msda_bwd_kernel(
    grad_out_ptr,
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attn_ptr,
    grad_value_ptr,
    grad_loc_ptr,
    grad_attn_ptr,
    parts_ptr,
    index_ptr,
    num_tokens,
    num_queries,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(Lq, BLOCK_Q), M, B)``; ``grad_value_ptr`` is an fp32 buffer accumulated with atomics.

    With ``DETERMINISTIC`` the value gradient goes instead to ``parts_ptr`` ``(N*4, D)`` fp32 and
    ``index_ptr`` ``(N*4,)`` int64 (``N = B*Lq*M*L*P``), and ``grad_value_ptr`` is not touched.
    """
    q_mask, d_offs, d_mask, feat_offset, base_row, query_row = program_tile(num_tokens, num_queries, NUM_HEADS, HEAD_DIM, BLOCK_Q, BLOCK_D)
    row_stride = NUM_HEADS * HEAD_DIM
    value_base = value_ptr + feat_offset
    grad_value_base = grad_value_ptr + feat_offset
    tile_mask = q_mask[:, None] & d_mask[None, :]
    grad_out = tl.load(grad_out_ptr + query_row[:, None] * HEAD_DIM + d_offs[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    for level in range(NUM_LEVELS):
        height, width, start = level_geometry(shapes_ptr, starts_ptr, level)
        for point in tl.static_range(NUM_POINTS):
            sample = query_row * (NUM_LEVELS * NUM_POINTS) + level * NUM_POINTS + point
            h0, w0, lh, lw = bilinear_setup(loc_ptr, sample, q_mask, height, width)
            weight = tl.load(attn_ptr + sample, mask=q_mask, other=0.0).to(tl.float32)
            hh = 1.0 - lh
            hw = 1.0 - lw

            rows00, inside00 = corner(start, h0, w0, height, width, row_stride, q_mask)
            rows01, inside01 = corner(start, h0, w0 + 1, height, width, row_stride, q_mask)
            rows10, inside10 = corner(start, h0 + 1, w0, height, width, row_stride, q_mask)
            rows11, inside11 = corner(start, h0 + 1, w0 + 1, height, width, row_stride, q_mask)
            g00 = tl.sum(grad_out * load_rows(value_base, rows00, inside00, d_offs, d_mask), axis=1)
            g01 = tl.sum(grad_out * load_rows(value_base, rows01, inside01, d_offs, d_mask), axis=1)
            g10 = tl.sum(grad_out * load_rows(value_base, rows10, inside10, d_offs, d_mask), axis=1)
            g11 = tl.sum(grad_out * load_rows(value_base, rows11, inside11, d_offs, d_mask), axis=1)

            grad_attn = hh * hw * g00 + hh * lw * g01 + lh * hw * g10 + lh * lw * g11
            tl.store(grad_attn_ptr + sample, grad_attn.to(grad_attn_ptr.dtype.element_ty), mask=q_mask)
            store_location_grad(grad_loc_ptr, sample, q_mask, g00, g01, g10, g11, lh, lw, height, width, weight)
            weighted_grad = weight[:, None] * grad_out

            if DETERMINISTIC:
                store_corner_rows(index_ptr, sample, base_row, rows00, inside00, rows01, inside01, rows10, inside10, rows11, inside11, q_mask, HEAD_DIM)
            scatter_corners(
                grad_value_base,
                parts_ptr,
                sample,
                rows00,
                inside00,
                rows01,
                inside01,
                rows10,
                inside10,
                rows11,
                inside11,
                lh,
                lw,
                weighted_grad,
                d_offs,
                d_mask,
                q_mask,
                HEAD_DIM,
                DETERMINISTIC,
            )


@triton.jit
def kda_fwd_kernel(
    query_ptr,
    key_ptr,
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    bias_ptr,
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
    HAS_BIAS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(Lq, BLOCK_Q), M, B)``: online softmax over the ``L*P`` logits ``scale * q . k``
    (plus ``bias_ptr``'s ``(B, Lq, M, L, P)`` logit bias with ``HAS_BIAS``; ignored otherwise).

    Writes the output and the log-sum-exp ``(B, Lq, M)`` (fp32) of the logits, for the backward.
    With ``SHARED_KV`` the keys are the values (``key_ptr`` is ignored) and each map is read once.
    """
    q_mask, d_offs, d_mask, feat_offset, base_row, query_row = program_tile(num_tokens, num_queries, NUM_HEADS, HEAD_DIM, BLOCK_Q, BLOCK_D)
    row_stride = NUM_HEADS * HEAD_DIM
    value_base = value_ptr + feat_offset
    key_base = key_ptr + feat_offset
    tile_offs = query_row[:, None] * HEAD_DIM + d_offs[None, :]
    tile_mask = q_mask[:, None] & d_mask[None, :]
    query = tl.load(query_ptr + tile_offs, mask=tile_mask, other=0.0).to(tl.float32) * scale

    running_max = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for level in range(NUM_LEVELS):
        height, width, start = level_geometry(shapes_ptr, starts_ptr, level)
        for point in tl.static_range(NUM_POINTS):
            sample = query_row * (NUM_LEVELS * NUM_POINTS) + level * NUM_POINTS + point
            h0, w0, lh, lw = bilinear_setup(loc_ptr, sample, q_mask, height, width)
            value = bilinear_sample(value_base, start, h0, w0, lh, lw, height, width, row_stride, d_offs, d_mask, q_mask)
            if SHARED_KV:
                key = value
            else:
                key = bilinear_sample(key_base, start, h0, w0, lh, lw, height, width, row_stride, d_offs, d_mask, q_mask)
            logit = tl.sum(query * key, axis=1)
            if HAS_BIAS:
                logit += tl.load(bias_ptr + sample, mask=q_mask, other=0.0).to(tl.float32)
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
def kda_bwd_kernel(
    grad_out_ptr,
    query_ptr,
    key_ptr,
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    bias_ptr,
    out_ptr,
    lse_ptr,
    grad_query_ptr,
    grad_key_ptr,
    grad_value_ptr,
    grad_loc_ptr,
    grad_bias_ptr,
    key_parts_ptr,
    value_parts_ptr,
    index_ptr,
    num_tokens,
    num_queries,
    scale,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    SHARED_KV: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(Lq, BLOCK_Q), M, B)``; recomputes the probabilities from the saved log-sum-exp.
    With ``HAS_BIAS`` the logits include ``bias_ptr``'s bias and ``grad_bias_ptr`` ``(B, Lq, M, L, P)``
    receives ``ds_j``.

    With ``p_j = softmax(s)_j``, ``s_j = scale * q . k_j``, ``dp_j = dO . v_j`` and
    ``delta = dO . out``: ``ds_j = p_j (dp_j - delta)``, ``dq = scale * sum_j ds_j k_j``,
    ``dv_j = p_j dO``, ``dk_j = scale * ds_j q``, scattered to the four neighbours with their
    bilinear weights. ``grad_key_ptr``/``grad_value_ptr`` are fp32 buffers accumulated with atomics;
    with ``SHARED_KV`` both contributions go to ``grad_value_ptr``. With ``DETERMINISTIC`` they go
    instead to ``key_parts_ptr``/``value_parts_ptr`` ``(N*4, D)`` fp32 with their rows in
    ``index_ptr`` ``(N*4,)`` int64 (``N = B*Lq*M*L*P``), as in :func:`msda_bwd_kernel`.
    """
    q_mask, d_offs, d_mask, feat_offset, base_row, query_row = program_tile(num_tokens, num_queries, NUM_HEADS, HEAD_DIM, BLOCK_Q, BLOCK_D)
    row_stride = NUM_HEADS * HEAD_DIM
    value_base = value_ptr + feat_offset
    key_base = key_ptr + feat_offset
    grad_value_base = grad_value_ptr + feat_offset
    grad_key_base = grad_key_ptr + feat_offset
    tile_offs = query_row[:, None] * HEAD_DIM + d_offs[None, :]
    tile_mask = q_mask[:, None] & d_mask[None, :]
    query = tl.load(query_ptr + tile_offs, mask=tile_mask, other=0.0).to(tl.float32) * scale
    grad_out = tl.load(grad_out_ptr + tile_offs, mask=tile_mask, other=0.0).to(tl.float32)
    out = tl.load(out_ptr + tile_offs, mask=tile_mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + query_row, mask=q_mask, other=0.0)
    delta = tl.sum(grad_out * out, axis=1)
    grad_query = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for level in range(NUM_LEVELS):
        height, width, start = level_geometry(shapes_ptr, starts_ptr, level)
        for point in tl.static_range(NUM_POINTS):
            sample = query_row * (NUM_LEVELS * NUM_POINTS) + level * NUM_POINTS + point
            h0, w0, lh, lw = bilinear_setup(loc_ptr, sample, q_mask, height, width)
            hh = 1.0 - lh
            hw = 1.0 - lw
            rows00, inside00 = corner(start, h0, w0, height, width, row_stride, q_mask)
            rows01, inside01 = corner(start, h0, w0 + 1, height, width, row_stride, q_mask)
            rows10, inside10 = corner(start, h0 + 1, w0, height, width, row_stride, q_mask)
            rows11, inside11 = corner(start, h0 + 1, w0 + 1, height, width, row_stride, q_mask)
            v00 = load_rows(value_base, rows00, inside00, d_offs, d_mask)
            v01 = load_rows(value_base, rows01, inside01, d_offs, d_mask)
            v10 = load_rows(value_base, rows10, inside10, d_offs, d_mask)
            v11 = load_rows(value_base, rows11, inside11, d_offs, d_mask)
            if SHARED_KV:
                k00 = v00
                k01 = v01
                k10 = v10
                k11 = v11
            else:
                k00 = load_rows(key_base, rows00, inside00, d_offs, d_mask)
                k01 = load_rows(key_base, rows01, inside01, d_offs, d_mask)
                k10 = load_rows(key_base, rows10, inside10, d_offs, d_mask)
                k11 = load_rows(key_base, rows11, inside11, d_offs, d_mask)
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
            if HAS_BIAS:
                logit += tl.load(bias_ptr + sample, mask=q_mask, other=0.0).to(tl.float32)
            grad_prob = hh * hw * dv00 + hh * lw * dv01 + lh * hw * dv10 + lh * lw * dv11
            prob = tl.exp(logit - lse)
            grad_logit = prob * (grad_prob - delta)
            if HAS_BIAS:
                tl.store(grad_bias_ptr + sample, grad_logit.to(grad_bias_ptr.dtype.element_ty), mask=q_mask)
            grad_query += grad_logit[:, None] * key
            store_location_grad(
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
            if DETERMINISTIC:
                store_corner_rows(index_ptr, sample, base_row, rows00, inside00, rows01, inside01, rows10, inside10, rows11, inside11, q_mask, HEAD_DIM)
            if SHARED_KV:
                grad_value += grad_key
            else:
                scatter_corners(
                    grad_key_base,
                    key_parts_ptr,
                    sample,
                    rows00,
                    inside00,
                    rows01,
                    inside01,
                    rows10,
                    inside10,
                    rows11,
                    inside11,
                    lh,
                    lw,
                    grad_key,
                    d_offs,
                    d_mask,
                    q_mask,
                    HEAD_DIM,
                    DETERMINISTIC,
                )
            scatter_corners(
                grad_value_base,
                value_parts_ptr,
                sample,
                rows00,
                inside00,
                rows01,
                inside01,
                rows10,
                inside10,
                rows11,
                inside11,
                lh,
                lw,
                grad_value,
                d_offs,
                d_mask,
                q_mask,
                HEAD_DIM,
                DETERMINISTIC,
            )
    grad_query = grad_query * scale
    tl.store(grad_query_ptr + tile_offs, grad_query.to(grad_query_ptr.dtype.element_ty), mask=tile_mask)
