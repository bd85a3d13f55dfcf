"""Bilinear sampling of flattened multi-scale maps as weighted row gathers (the no-autograd CPU path).

A bilinear sample is a weighted sum of four map cells. With the maps stored as a table of rows
(``value.reshape(-1, D)``: ``(B*S*M, D)``, token-major and head-minor, no copy), a sample is a bag
of four row indices with four weights, and :func:`torch.nn.functional.embedding_bag` sums bags with
contiguous, vectorised row reads. A bag can also span every level and point of a query-head, with
the attention weights folded into the bilinear weights: deformable attention in one gather-reduce,
without materialising sampled values.

Conventions are ``grid_sample``'s with ``align_corners=False`` and zero padding: cell ``(i, j)`` of
an ``H x W`` map has its centre at ``((j + 0.5) / W, (i + 0.5) / H)``; a corner outside the map
gets weight zero (and a clamped, valid row index).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from litedetr.ops.geometry import SpatialShapes, level_shapes

__all__ = ["bilinear_corners", "gather_rows", "tracing"]


def tracing() -> bool:
    """Whether a trace is being recorded (``torch.jit.trace``, ``torch.onnx.export(..., dynamo=False)``)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


@torch.no_grad()
def bilinear_corners(spatial_shapes: SpatialShapes, sampling_locations: Tensor, num_tokens: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Table rows and bilinear weights of the four corners of every sampling location.

    Args:
        spatial_shapes: ``(H_l, W_l)`` per level (:data:`~litedetr.ops.geometry.SpatialShapes`); levels are flattened row-major, one after another.
        sampling_locations: ``(B, Lq, M, L, P, 2)`` as ``(x, y)`` in [0, 1] of each level's map.
        num_tokens: ``S = sum(H_l * W_l)``.
        dtype: dtype of the returned weights (the table's).

    Returns:
        ``rows (B, Lq, M, L, P, 4)`` (int32, or int64 for tables of 2**31 rows or more) into the
        ``(B*S*M, D)`` table, and ``weights (B, Lq, M, L, P, 4)``; corners ordered
        ``(y0, x0), (y0, x1), (y1, x0), (y1, x1)``.
    """
    b, lq, m, n_levels, p, _ = sampling_locations.shape
    index_dtype = torch.int32 if b * num_tokens * m < 2**31 else torch.int64
    device = sampling_locations.device
    level_rows, level_weights = [], []
    # row of cell (y, x) of level l, image i, head h: (i * S + start_l + y * W_l + x) * M + h
    image_head = (
        torch.arange(b, dtype=index_dtype, device=device)[:, None, None, None] * (num_tokens * m)
        + torch.arange(m, dtype=index_dtype, device=device)[None, None, :, None]
    )
    coord_dtype = torch.promote_types(sampling_locations.dtype, torch.float32)
    per_level = sampling_locations.to(coord_dtype).permute(3, 5, 0, 1, 2, 4).contiguous()  # (L, 2, B, Lq, M, P)
    start = 0
    for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
        x = per_level[lvl, 0] * w - 0.5
        y = per_level[lvl, 1] * h - 0.5
        x0, y0 = x.floor(), y.floor()
        fx, fy = x - x0, y - y0
        wx = ((1 - fx) * ((x0 >= 0) & (x0 <= w - 1)), fx * ((x0 >= -1) & (x0 <= w - 2)))
        wy = ((1 - fy) * ((y0 >= 0) & (y0 <= h - 1)), fy * ((y0 >= -1) & (y0 <= h - 2)))
        cols = (x0.clamp(0, w - 1).to(index_dtype) * m, (x0 + 1).clamp_(0, w - 1).to(index_dtype) * m)
        first = image_head + start * m
        line = (y0.clamp(0, h - 1).to(index_dtype) * (w * m) + first, (y0 + 1).clamp_(0, h - 1).to(index_dtype) * (w * m) + first)
        corners = ((0, 0), (0, 1), (1, 0), (1, 1))
        level_rows.append(torch.stack([line[iy] + cols[ix] for iy, ix in corners], -1))
        level_weights.append(torch.stack([wy[iy] * wx[ix] for iy, ix in corners], -1).to(dtype))
        start += h * w
    return torch.stack(level_rows, 3), torch.stack(level_weights, 3)


def gather_rows(table: Tensor, rows: Tensor, weights: Tensor) -> Tensor:
    """Weighted sums of table rows: ``(N, D)`` table, ``(..., K)`` rows and weights -> ``(..., D)``.

    While tracing (ONNX has no ``embedding_bag``) the rows are gathered (``Gather``) and each bag's
    weights applied as one matrix product (``MatMul``), materialising the ``(..., K, D)`` rows."""
    k = rows.shape[-1]
    if tracing():
        picked = table[rows.reshape(-1)].view(-1, k, table.shape[-1])
        out = weights.reshape(-1, 1, k).to(table.dtype) @ picked
        return out.view(*rows.shape[:-1], table.shape[-1])
    out = F.embedding_bag(rows.reshape(-1, k), table, per_sample_weights=weights.reshape(-1, k).to(table.dtype), mode="sum")
    return out.view(*rows.shape[:-1], table.shape[-1])
