"""The ``@triton.jit`` building blocks of :mod:`litedetr.ops.triton_kernels`: a program's tile of
queries and channels; a level's size and first token; bilinear sampling of the four neighbouring
rows; the scatter of value/key gradients to those rows (atomics, or per-corner parts for a
deterministic sum); the gradient of a sampling location.

Layouts as in :mod:`litedetr.ops.triton_kernels`; all arithmetic is in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "bilinear_sample",
    "bilinear_setup",
    "corner",
    "level_geometry",
    "load_rows",
    "program_tile",
    "scatter_corners",
    "store_corner_rows",
    "store_location_grad",
]


@triton.jit
def bilinear_setup(loc_ptr, sample, q_mask, height, width):
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
def corner(start, row, col, height, width, row_stride, q_mask):
    """Row offsets ``(BLOCK_Q,)`` (int32, relative to the head's base) of the neighbour ``(row, col)`` of each query, and whether it is inside the map."""
    inside = q_mask & (row >= 0) & (row < height) & (col >= 0) & (col < width)
    rows = (start + row * width + col) * row_stride
    return rows, inside


@triton.jit
def load_rows(feat_ptr, rows, inside, d_offs, d_mask):
    """``(BLOCK_Q, BLOCK_D)`` fp32 rows, zero where ``inside`` is False."""
    ptrs = feat_ptr + rows[:, None] + d_offs[None, :]
    return tl.load(ptrs, mask=inside[:, None] & d_mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _add_rows(grad_ptr, parts_ptr, rows, inside, slot, d_offs, d_mask, q_mask, val, HEAD_DIM: tl.constexpr, DETERMINISTIC: tl.constexpr):
    """Add ``(BLOCK_Q, BLOCK_D)`` fp32 ``val`` to the rows that are inside the map.

    Atomically into ``grad_ptr`` (offsets ``rows``); with ``DETERMINISTIC``, stored instead as row
    ``slot`` of the ``(N*4, D)`` buffer ``parts_ptr`` (zero outside the map).
    """
    if DETERMINISTIC:
        ptrs = parts_ptr + slot[:, None] * HEAD_DIM + d_offs[None, :]
        tl.store(ptrs, tl.where(inside[:, None], val, 0.0), mask=q_mask[:, None] & d_mask[None, :])
    else:
        ptrs = grad_ptr + rows[:, None] + d_offs[None, :]
        tl.atomic_add(ptrs, val, mask=inside[:, None] & d_mask[None, :], sem="relaxed")


@triton.jit
def scatter_corners(grad_ptr, parts_ptr, sample, r00, i00, r01, i01, r10, i10, r11, i11, lh, lw, val, d_offs, d_mask, q_mask,
                     HEAD_DIM: tl.constexpr, DETERMINISTIC: tl.constexpr):  # fmt: skip
    """Spread ``val`` ``(BLOCK_Q, BLOCK_D)`` over the four neighbours of one sample with their bilinear weights (see :func:`_add_rows`)."""
    hh = 1.0 - lh
    hw = 1.0 - lw
    slot = sample * 4
    _add_rows(grad_ptr, parts_ptr, r00, i00, slot, d_offs, d_mask, q_mask, (hh * hw)[:, None] * val, HEAD_DIM, DETERMINISTIC)
    _add_rows(grad_ptr, parts_ptr, r01, i01, slot + 1, d_offs, d_mask, q_mask, (hh * lw)[:, None] * val, HEAD_DIM, DETERMINISTIC)
    _add_rows(grad_ptr, parts_ptr, r10, i10, slot + 2, d_offs, d_mask, q_mask, (lh * hw)[:, None] * val, HEAD_DIM, DETERMINISTIC)
    _add_rows(grad_ptr, parts_ptr, r11, i11, slot + 3, d_offs, d_mask, q_mask, (lh * lw)[:, None] * val, HEAD_DIM, DETERMINISTIC)


@triton.jit
def store_corner_rows(index_ptr, sample, base_row, r00, i00, r01, i01, r10, i10, r11, i11, q_mask, HEAD_DIM: tl.constexpr):
    """Rows of the ``(B*S*M, D)`` table of one sample's four neighbours (0 outside the map) at ``4 * sample + corner`` (int64)."""
    slot = sample * 4
    tl.store(index_ptr + slot, tl.where(i00, base_row + r00 // HEAD_DIM, 0), mask=q_mask)
    tl.store(index_ptr + slot + 1, tl.where(i01, base_row + r01 // HEAD_DIM, 0), mask=q_mask)
    tl.store(index_ptr + slot + 2, tl.where(i10, base_row + r10 // HEAD_DIM, 0), mask=q_mask)
    tl.store(index_ptr + slot + 3, tl.where(i11, base_row + r11 // HEAD_DIM, 0), mask=q_mask)


@triton.jit
def bilinear_sample(feat_ptr, start, h0, w0, lh, lw, height, width, row_stride, d_offs, d_mask, q_mask):
    """Bilinear sample of one point per query: ``(BLOCK_Q, BLOCK_D)`` in fp32, zero outside the map."""
    hh = 1.0 - lh
    hw = 1.0 - lw
    rows, inside = corner(start, h0, w0, height, width, row_stride, q_mask)
    out = load_rows(feat_ptr, rows, inside, d_offs, d_mask) * (hh * hw)[:, None]
    rows, inside = corner(start, h0, w0 + 1, height, width, row_stride, q_mask)
    out += load_rows(feat_ptr, rows, inside, d_offs, d_mask) * (hh * lw)[:, None]
    rows, inside = corner(start, h0 + 1, w0, height, width, row_stride, q_mask)
    out += load_rows(feat_ptr, rows, inside, d_offs, d_mask) * (lh * hw)[:, None]
    rows, inside = corner(start, h0 + 1, w0 + 1, height, width, row_stride, q_mask)
    out += load_rows(feat_ptr, rows, inside, d_offs, d_mask) * (lh * lw)[:, None]
    return out


@triton.jit
def store_location_grad(grad_loc_ptr, sample, q_mask, g00, g01, g10, g11, lh, lw, height, width, scale):
    """Gradient w.r.t. ``(x, y)`` given ``g_c = dLoss / d(weight of corner c)`` for the four corners, times ``scale``."""
    hh = 1.0 - lh
    hw = 1.0 - lw
    grad_x = scale * width.to(tl.float32) * (hh * (g01 - g00) + lh * (g11 - g10))
    grad_y = scale * height.to(tl.float32) * (hw * (g10 - g00) + lw * (g11 - g01))
    out_ty = grad_loc_ptr.dtype.element_ty
    tl.store(grad_loc_ptr + 2 * sample, grad_x.to(out_ty), mask=q_mask)
    tl.store(grad_loc_ptr + 2 * sample + 1, grad_y.to(out_ty), mask=q_mask)


@triton.jit
def program_tile(num_tokens, num_queries, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's share of grid ``(cdiv(Lq, BLOCK_Q), M, B)`` (one head of one image): the mask of its
    ``BLOCK_Q`` queries, the channel offsets and mask, the offset of its head's channels in the image's
    ``(S, M*D)`` maps, the first ``(B*S*M)`` row of its head and image, and its queries' ``(B*Lq*M)`` rows."""
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    q_offs = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q_offs < num_queries
    d_offs = tl.arange(0, BLOCK_D)
    d_mask = d_offs < HEAD_DIM
    feat_offset = batch * num_tokens * (NUM_HEADS * HEAD_DIM) + head * HEAD_DIM
    base_row = batch * num_tokens * NUM_HEADS + head
    query_row = (batch * num_queries + q_offs) * NUM_HEADS + head
    return q_mask, d_offs, d_mask, feat_offset, base_row, query_row


@triton.jit
def level_geometry(shapes_ptr, starts_ptr, level):
    """Height, width and first token of ``level``."""
    height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
    width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
    start = tl.load(starts_ptr + level).to(tl.int32)
    return height, width, start
