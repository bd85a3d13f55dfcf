"""Geometry of multi-scale token maps: level offsets, valid ratios, reference points, sine embeddings."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "LevelShapes",
    "SpatialShapes",
    "level_shapes",
    "check_token_count",
    "level_starts",
    "shapes_tensor",
    "level_start_index",
    "valid_ratios",
    "encoder_reference_points",
    "sine_position_embedding",
    "box_sine_embedding",
    "encoder_proposals",
]


LevelShapes = tuple[tuple[int, int], ...]
"""``(H_l, W_l)`` of every level as Python ints, finest level first: how the model carries level shapes
(reading them never synchronises a device, and ``torch.compile`` bakes them into the graph)."""

SpatialShapes = LevelShapes | Sequence[Sequence[int]] | Tensor
"""What the ops accept as level shapes: :data:`LevelShapes` (or any sequence of ``(H_l, W_l)`` pairs),
or an ``(L, 2)`` integer tensor."""


def level_shapes(spatial_shapes: SpatialShapes) -> LevelShapes:
    """The one normalisation of level shapes to :data:`LevelShapes`.

    A tensor is read to the host: a device sync on a GPU and a graph break under ``torch.compile``,
    which the model avoids by passing tuples.

    Raises:
        ValueError: not ``(L, 2)`` pairs of positive sizes.
    """
    if isinstance(spatial_shapes, Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.is_floating_point():
            raise ValueError(f"spatial_shapes must be an (L, 2) integer tensor, got {tuple(spatial_shapes.shape)} {spatial_shapes.dtype}")
        spatial_shapes = spatial_shapes.tolist()
    if any(len(pair) != 2 for pair in spatial_shapes):
        raise ValueError(f"spatial_shapes must be (H_l, W_l) pairs, got {spatial_shapes}")
    shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    if not shapes or any(h < 1 or w < 1 for h, w in shapes):
        raise ValueError(f"spatial_shapes must be one or more positive (H_l, W_l), got {shapes}")
    return shapes


def check_token_count(shapes: LevelShapes, num_tokens: int) -> None:
    """Raises ValueError unless the levels ``shapes`` hold ``num_tokens`` tokens in all."""
    covered = sum(h * w for h, w in shapes)
    if covered != num_tokens:
        raise ValueError(f"spatial_shapes {shapes} cover {covered} tokens, input has {num_tokens}")


def level_starts(spatial_shapes: SpatialShapes) -> tuple[int, ...]:
    """Index of each level's first token in the flat sequence, as Python ints."""
    sizes = [h * w for h, w in level_shapes(spatial_shapes)]
    return tuple(sum(sizes[:lvl]) for lvl in range(len(sizes)))


def shapes_tensor(spatial_shapes: SpatialShapes, device: torch.device | str | None = None) -> Tensor:
    """Level shapes as an ``(L, 2)`` long tensor on ``device`` (a tensor is moved, not read).

    Outside ``torch.compile`` the tensor of a tuple is made once per shapes and device and reused,
    so that the model's per-layer calls copy nothing to a GPU (a copy from host memory would wait
    for the device); under ``torch.compile`` it is a constant of the graph. Do not modify it.
    """
    if isinstance(spatial_shapes, Tensor):
        return spatial_shapes.to(device=device, dtype=torch.long)
    shapes, device = level_shapes(spatial_shapes), torch.device(device or "cpu")
    if torch.compiler.is_compiling():
        return torch.tensor(shapes, dtype=torch.long, device=device)
    return _cached_shapes_tensor(shapes, device)


@functools.lru_cache(maxsize=64)
def _cached_shapes_tensor(shapes: LevelShapes, device: torch.device) -> Tensor:
    with torch.inference_mode(False):  # a normal tensor, which autograd may save in later training steps
        return torch.tensor(shapes, dtype=torch.long, device=device)


def level_start_index(spatial_shapes: SpatialShapes) -> Tensor:
    """``(L, 2)`` shapes ``(H_l, W_l)`` -> ``(L,)`` long index of each level's first token in the flat sequence.

    Computed on a tensor's device without reading it; a tuple gives a CPU tensor.
    """
    if not isinstance(spatial_shapes, Tensor):
        return torch.tensor(level_starts(spatial_shapes), dtype=torch.long)
    sizes = spatial_shapes.prod(1)
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def valid_ratios(mask: Tensor) -> Tensor:
    """Fraction of a padded map that holds the image.

    Args:
        mask: ``(B, H, W)`` bool, True = padding (images are padded at the bottom and right).

    Returns:
        ``(B, 2)`` as ``(valid_w / W, valid_h / H)``.
    """
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


def encoder_reference_points(spatial_shapes: SpatialShapes, ratios: Tensor) -> Tensor:
    """Reference point of every token: the centre of its cell, normalised by the image's valid area.

    Args:
        spatial_shapes: ``(H_l, W_l)`` per level (:data:`SpatialShapes`).
        ratios: ``(B, L, 2)`` valid ratios ``(w, h)`` per level.

    Returns:
        ``(B, S, L, 2)`` points ``(x, y)``: each token's point, expressed in every level's
        padded-map coordinates (the deformable-DETR convention).
    """
    points = []
    for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
        ys, xs = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=ratios.device),
            torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=ratios.device),
            indexing="ij",
        )
        ys = ys.reshape(-1)[None] / (ratios[:, None, lvl, 1] * h)
        xs = xs.reshape(-1)[None] / (ratios[:, None, lvl, 0] * w)
        points.append(torch.stack([xs, ys], -1))
    return torch.cat(points, 1)[:, :, None] * ratios[:, None]


def sine_position_embedding(mask: Tensor, num_feats: int = 128, temperature_h: float = 10000.0, temperature_w: float = 10000.0, offset: float = 0.0) -> Tensor:
    """Normalised 2-d sine position embedding: ``(cumsum + offset) / (last + 1e-6) * 2 pi`` per axis.

    Deformable DETR and H-DETR use ``offset=-0.5`` and temperature 10000; DINO ``offset=0`` and 20.

    Args:
        mask: ``(B, H, W)`` bool, True = padding.
        num_feats: channels per axis; the output has ``2 * num_feats``.
        offset: added to the cumulative count before normalising.

    Returns:
        ``(B, 2*num_feats, H, W)``: ``y`` channels first, then ``x``, each as interleaved sin/cos.
    """
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    eps, scale = 1e-6, 2 * math.pi
    y = (y + offset) / (y[:, -1:, :] + eps) * scale
    x = (x + offset) / (x[:, :, -1:] + eps) * scale
    dims = torch.arange(num_feats, dtype=torch.float32, device=mask.device)
    exponent = 2 * torch.div(dims, 2, rounding_mode="floor") / num_feats

    def embed(coord: Tensor, temperature: float) -> Tensor:
        angles = coord[..., None] / temperature**exponent
        return torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=4).flatten(3)

    return torch.cat([embed(y, temperature_h), embed(x, temperature_w)], dim=3).permute(0, 3, 1, 2)


def box_sine_embedding(boxes: Tensor, num_feats: int = 128, temperature: float = 10000.0, y_first: bool = True) -> Tensor:
    """Sine embedding of normalised boxes: DAB-DETR / DINO decoder query positions (``y, x, w, h``
    order), or two-stage Deformable DETR's proposal embedding (``y_first=False``: ``x, y, w, h``).

    Args:
        boxes: ``(..., 4)`` as ``(cx, cy, w, h)`` in [0, 1] (or ``(..., 2)`` points).

    Returns:
        ``(..., num_feats * boxes.shape[-1])``, each coordinate as interleaved sin/cos.
    """
    dims = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    freqs = temperature ** (2 * torch.div(dims, 2, rounding_mode="floor") / num_feats)
    angles = boxes[..., None] * (2 * math.pi) / freqs  # (..., 4, num_feats)
    embed = torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], -1).flatten(-2)
    if y_first:
        embed = embed[..., [1, 0, 2, 3][: boxes.shape[-1]], :]
    return embed.flatten(-2)


def encoder_proposals(memory: Tensor, padding_mask: Tensor, spatial_shapes: SpatialShapes) -> tuple[Tensor, Tensor]:
    """One box proposal per encoder token (two-stage Deformable DETR / DINO).

    Each token proposes a box centred on its cell with side ``0.05 * 2**level`` (normalised to the
    valid image). Padded tokens, and tokens whose proposal has a coordinate outside (0.01, 0.99),
    get a zero memory and an infinite proposal so they are never selected usefully.

    Args:
        memory: ``(B, S, C)`` encoder output.
        padding_mask: ``(B, S)`` True = padding.
        spatial_shapes: ``(H_l, W_l)`` per level (:data:`SpatialShapes`).

    Returns:
        ``(B, S, C)`` masked memory and ``(B, S, 4)`` proposals as inverse-sigmoid ``(cx, cy, w, h)``.
    """
    b = memory.shape[0]
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
        mask = padding_mask[:, start : start + h * w].view(b, h, w)
        valid_h, valid_w = (~mask[:, :, 0]).sum(1), (~mask[:, 0, :]).sum(1)
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=memory.device),
            torch.arange(w, dtype=torch.float32, device=memory.device),
            indexing="ij",
        )
        scale = torch.stack([valid_w, valid_h], -1).view(b, 1, 1, 2)
        centres = (torch.stack([xs, ys], -1)[None] + 0.5) / scale
        sizes = torch.full_like(centres, 0.05 * 2.0**lvl)
        proposals.append(torch.cat([centres, sizes], -1).view(b, -1, 4))
        start += h * w
    boxes = torch.cat(proposals, 1)
    keep = ((boxes > 0.01) & (boxes < 0.99)).all(-1, keepdim=True) & ~padding_mask[..., None]
    logits = torch.log(boxes / (1 - boxes)).masked_fill(~keep, float("inf"))
    return memory.masked_fill(~keep, 0.0), logits
