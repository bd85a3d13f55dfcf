"""The encoder input stage of Deformable DETR / DINO: backbone maps -> flat multi-scale tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from litedetr.ops import sine_position_embedding, valid_ratios
from litedetr.ops.geometry import LevelShapes

__all__ = ["EncoderInput", "MultiScaleTokens", "resize_mask"]


def resize_mask(mask: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Nearest-neighbour resize of a ``(B, H, W)`` bool padding mask to ``size``."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


@dataclass
class MultiScaleTokens:
    """Flattened multi-scale maps, finest level first.

    Attributes:
        src: ``(B, S, C)`` tokens.
        pos: ``(B, S, C)`` sine position embedding + learned level embedding.
        padding_mask: ``(B, S)`` True = padding.
        spatial_shapes: ``(H_l, W_l)`` per level as Python ints (:data:`~litedetr.ops.geometry.LevelShapes`),
            read from the maps' sizes: passing them on costs no device sync and no graph break.
        valid_ratios: ``(B, L, 2)`` ``(w, h)`` fraction of each map that is image.
    """

    src: Tensor
    pos: Tensor
    padding_mask: Tensor
    spatial_shapes: LevelShapes
    valid_ratios: Tensor


class EncoderInput(nn.Module):
    """Projects backbone maps to ``d_model`` channels, adds extra coarser levels, flattens.

    Each backbone map gets a 1x1 conv + GroupNorm(32); each extra level a stride-2 3x3 conv +
    GroupNorm(32) on the previous one (the first on the coarsest backbone map). Position embeddings
    are normalised sines with separate temperatures for y and x and an offset of the cumulative
    count (DINO: 20, 20 and 0; Deformable DETR and H-DETR: 10000, 10000 and -0.5).

    Args:
        in_channels: channels of the backbone maps, finest first (e.g. ``(512, 1024, 2048)`` for C3-C5).
        d_model: token channels, a multiple of 32 (the GroupNorm's groups).
        n_levels: total levels (``len(in_channels)`` + extra levels).
        temperature_h, temperature_w: sine embedding temperatures.
        position_offset: see :func:`~litedetr.ops.sine_position_embedding`.
    """

    def __init__(
        self,
        in_channels: tuple[int, ...] = (512, 1024, 2048),
        d_model: int = 256,
        n_levels: int = 4,
        temperature_h: float = 20.0,
        temperature_w: float = 20.0,
        position_offset: float = 0.0,
    ):
        super().__init__()
        if n_levels < len(in_channels):
            raise ValueError(f"n_levels ({n_levels}) < number of backbone maps ({len(in_channels)})")
        if d_model % 32:
            raise ValueError(f"d_model ({d_model}) must be a multiple of 32: each level is normalised in 32 groups")
        self.d_model, self.n_levels = d_model, n_levels
        self.temperature_h, self.temperature_w, self.position_offset = temperature_h, temperature_w, position_offset
        projections = [nn.Sequential(nn.Conv2d(c, d_model, 1), nn.GroupNorm(32, d_model)) for c in in_channels]
        previous = in_channels[-1]
        for _ in range(n_levels - len(in_channels)):
            projections.append(nn.Sequential(nn.Conv2d(previous, d_model, 3, stride=2, padding=1), nn.GroupNorm(32, d_model)))
            previous = d_model
        self.input_proj = nn.ModuleList(projections)
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        self.num_backbone_levels = len(in_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        nn.init.normal_(self.level_embed)

    def forward(self, features: list[Tensor], image_mask: Tensor) -> MultiScaleTokens:
        """
        Args:
            features: backbone maps ``(B, C_l, H_l, W_l)``, finest first.
            image_mask: ``(B, H, W)`` bool padding mask of the padded image batch (True = padding);
                each level's mask is its nearest-neighbour resize, as in DETR.

        Returns:
            :class:`MultiScaleTokens` over ``n_levels`` levels.
        """
        if len(features) != self.num_backbone_levels:
            raise ValueError(f"expected {self.num_backbone_levels} feature maps, got {len(features)}")
        maps = [proj(f) for proj, f in zip(self.input_proj, features)]
        previous = features[-1]
        for proj in self.input_proj[self.num_backbone_levels :]:
            previous = proj(previous)
            maps.append(previous)
        masks = [resize_mask(image_mask, x.shape[-2:]) for x in maps]
        sine = [sine_position_embedding(m, self.d_model // 2, self.temperature_h, self.temperature_w, self.position_offset) for m in masks]
        pos = [s.to(x.dtype) + self.level_embed[lvl, :, None, None] for lvl, (x, s) in enumerate(zip(maps, sine))]
        return MultiScaleTokens(
            src=torch.cat([x.flatten(2).transpose(1, 2) for x in maps], 1),
            pos=torch.cat([p.flatten(2).transpose(1, 2) for p in pos], 1),
            padding_mask=torch.cat([m.flatten(1) for m in masks], 1),
            spatial_shapes=tuple((x.shape[-2], x.shape[-1]) for x in maps),
            valid_ratios=torch.stack([valid_ratios(m) for m in masks], 1),
        )
