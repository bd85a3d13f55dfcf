"""Bilinear sampling of flattened multi-scale maps as weighted row gathers.

A bilinear sample is a weighted sum of four map cells. With the maps stored as a table of rows
(``(B*S*M, D)``: token-major, head-minor, i.e. ``value.reshape(-1, D)`` with no copy), a sample is
a bag of four row indices with four weights, and :func:`torch.nn.functional.embedding_bag` sums the
bags with contiguous, vectorised row reads. Bags can also span every level and point of a query-head
(with attention weights folded into the bilinear weights), which computes deformable attention in
one gather-reduce without materialising the sampled values.

Conventions are ``grid_sample``'s with ``align_corners=False`` and zero padding: cell ``(i, j)`` of
an ``H x W`` map has its centre at ``((j + 0.5) / W, (i + 0.5) / H)``; cells outside the map are
zero (here: weight zero on a clamped, valid row index).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Corners", "bilinear_corners"]


class Corners(NamedTuple):
    """Rows and weights of the four bilinear corners of every sample.

    Attributes:
        rows: ``(B, Lq, M, L, P, 2, 2)`` int64 row indices into the ``(B*S*M, D)`` table.
        weights_y: ``(B, Lq, M, L, P, 2, 1)`` weights of the two rows (zero outside the map).
        weights_x: ``(B, Lq, M, L, P, 1, 2)`` weights of the two columns (zero outside the map).
    """

    rows: Tensor
    weights_y: Tensor
    weights_x: Tensor


def _axis(coord: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    """Neighbour indices (clamped into the map) and their linear weights (zero outside) along one axis.

    Args:
        coord: ``(..., L, P)`` pixel coordinate (cell centres at integers).
        size: ``(L, 1)`` map size along the axis.

    Returns:
        ``(..., L, P, 2)`` long indices and weights.
    """
    low = coord.detach().floor()
    frac = coord - low
    idx = low.long().unsqueeze(-1) + torch.tensor([0, 1], device=coord.device)
    size = size[..., None]
    inside = (idx >= 0) & (idx < size)
    weights = torch.stack([1 - frac, frac], -1) * inside
    return torch.minimum(idx.clamp_min(0), size - 1), weights


def bilinear_corners(spatial_shapes: Tensor, sampling_locations: Tensor, num_tokens: int) -> Corners:
    """Table rows and bilinear weights of the four corners of every sampling location.

    Args:
        spatial_shapes: ``(L, 2)`` long ``(H_l, W_l)``; levels are flattened row-major, one after another.
        sampling_locations: ``(B, Lq, M, L, P, 2)`` as ``(x, y)`` in [0, 1] of each level's map.
        num_tokens: ``S = sum(H_l * W_l)``.

    Returns:
        :class:`Corners`; the weights are differentiable w.r.t. the locations.
    """
    b, _, m, n_levels, _, _ = sampling_locations.shape
    shapes = spatial_shapes.to(sampling_locations.device)
    heights, widths = shapes[:, :1], shapes[:, 1:]
    starts = torch.cumsum(shapes.prod(1), 0) - shapes.prod(1)
    x, y = (sampling_locations * shapes.flip(-1)[:, None, :].to(sampling_locations.dtype) - 0.5).unbind(-1)
    xi, wx = _axis(x, widths)
    yi, wy = _axis(y, heights)
    # row of cell (y, x) of level l, image b, head h: ((b * S + start_l + y * W_l + x) * M + h
    image = torch.arange(b, device=xi.device).view(b, 1, 1, 1, 1, 1) * num_tokens
    head = torch.arange(m, device=xi.device).view(1, 1, m, 1, 1, 1)
    row_of_y = (image + starts.view(n_levels, 1, 1) + yi * widths[..., None]) * m + head
    rows = row_of_y.unsqueeze(-1) + (xi * m).unsqueeze(-2)
    return Corners(rows, wy.unsqueeze(-1), wx.unsqueeze(-2))
