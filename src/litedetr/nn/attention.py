"""Multi-scale deformable attention module, plain (MSDA) or key-aware (KDA)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from litedetr.ops import key_aware_attention_weights, ms_deform_attn, ms_deform_attn_key_aware
from litedetr.ops.geometry import SpatialShapes, shapes_tensor

__all__ = ["MultiScaleDeformableAttention", "KeyAwareOptions", "sampling_locations", "AttentionCapture"]

AttentionCapture = Callable[[Tensor, Tensor], None]
"""``capture(locations (B, Lq, M, L, P, 2), weights (B, Lq, M, L, P))``, see :attr:`MultiScaleDeformableAttention.capture`."""


def sampling_locations(reference_points: Tensor, offsets: Tensor, spatial_shapes: SpatialShapes) -> Tensor:
    """Sampling locations from reference points and predicted offsets.

    Args:
        reference_points: ``(B, Lq, L, 2)`` points ``(x, y)`` or ``(B, Lq, L, 4)`` boxes ``(cx, cy, w, h)``,
            normalised to [0, 1].
        offsets: ``(B, Lq, M, L, P, 2)``, in pixels of each level for points, in units of
            ``box size / (2 P)`` for boxes (the deformable-DETR convention).
        spatial_shapes: ``(H_l, W_l)`` per level (:data:`~litedetr.ops.geometry.SpatialShapes`).

    Returns:
        ``(B, Lq, M, L, P, 2)`` locations ``(x, y)`` in [0, 1] (outside the map where offsets lead out).
    """
    ref = reference_points[:, :, None, :, None]
    if reference_points.shape[-1] == 2:
        normalizer = shapes_tensor(spatial_shapes, offsets.device).flip(-1).to(offsets.dtype)  # (W_l, H_l)
        return ref + offsets / normalizer[None, None, None, :, None, :]
    if reference_points.shape[-1] == 4:
        n_points = offsets.shape[-2]
        return ref[..., :2] + offsets / n_points * ref[..., 2:] * 0.5
    raise ValueError(f"reference points must end in 2 (points) or 4 (boxes), got shape {tuple(reference_points.shape)}")


@dataclass(frozen=True)
class KeyAwareOptions:
    """How KDA layers are built and start; the defaults are the authors' Lite DETR.

    Attributes:
        key_proj: keys from their own linear projection of the maps (``key_proj``, the authors'
            ``proj_key=True``) instead of the projected values, which then serve only as values.
        zero_query: ``query_proj`` starts at zero, so every query's first attention is uniform over
            its ``L*P`` samples (where plain deformable attention starts) instead of random.
        query_logits: the logits are ``q.k / sqrt(D)`` plus a term per head, level and point predicted
            from the query alone (``attention_weights``, plain deformable attention's linear layer,
            zero at the start): the weights can prefer levels and points as plain deformable
            attention's do, and the keys still decide among the samples. Not in the authors' code.
    """

    key_proj: bool = False
    zero_query: bool = False
    query_logits: bool = False


class MultiScaleDeformableAttention(nn.Module):
    """Each query attends to ``n_points`` sampled locations per head and level around its reference.

    Plain deformable attention predicts the attention weights with a linear layer on the query.
    Key-aware deformable attention (``key_aware=True``, Lite DETR) samples keys together with the
    values and weights them by a softmax of ``q.k / sqrt(d_head)`` over all levels and points; keys are
    the projected values (the authors' ``proj_key=False``), so it adds only ``query_proj``.

    Args:
        d_model: channels ``C``.
        n_levels: feature levels ``L``.
        n_heads: heads ``M`` (``C`` must be divisible by it).
        n_points: sampling points ``P`` per head and level.
        key_aware: KDA instead of plain deformable attention.
        kda: :class:`KeyAwareOptions` of a KDA layer (ignored without ``key_aware``).

    Attributes:
        capture: an optional :data:`AttentionCapture` callback (None by default), called by ``forward``
            with the sampling locations and the attention weights it applied (KDA: the softmax of
            ``q.k``, computed again for the callback). For inspection tools (``litedetr explain``).
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        key_aware: bool = False,
        kda: KeyAwareOptions = KeyAwareOptions(),
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.key_aware = key_aware
        self.kda = kda if key_aware else KeyAwareOptions()
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        if key_aware:
            self.query_proj = nn.Linear(d_model, d_model)
            if self.kda.key_proj:
                self.key_proj = nn.Linear(d_model, d_model)
        if not key_aware or self.kda.query_logits:
            self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.capture: AttentionCapture | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' initialisation: offsets start on a ring of directions, one per head, ``i+1`` pixels out for point ``i``."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid[:, None, None, :] * torch.arange(1, self.n_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.expand(-1, self.n_levels, -1, -1).reshape(-1))
        if self.key_aware:
            (nn.init.zeros_ if self.kda.zero_query else nn.init.xavier_uniform_)(self.query_proj.weight)
            nn.init.zeros_(self.query_proj.bias)
        if not self.key_aware or self.kda.query_logits:
            nn.init.zeros_(self.attention_weights.weight)
            nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj, *([self.key_proj] if self.kda.key_proj else [])):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def sampling(self, query: Tensor, reference_points: Tensor, spatial_shapes: SpatialShapes) -> Tensor:
        """``(B, Lq, C)`` queries -> ``(B, Lq, M, L, P, 2)`` sampling locations in [0, 1]."""
        b, lq, _ = query.shape
        offsets = self.sampling_offsets(query).view(b, lq, self.n_heads, self.n_levels, self.n_points, 2)
        return sampling_locations(reference_points, offsets, spatial_shapes)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: SpatialShapes,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            query: ``(B, Lq, C)`` (position embedding already added).
            reference_points: ``(B, Lq, L, 2)`` points or ``(B, Lq, L, 4)`` boxes in [0, 1].
            value: ``(B, S, C)`` the flattened multi-scale maps (keys too, for KDA).
            spatial_shapes: ``(H_l, W_l)`` per level, ``sum(H_l * W_l) == S``: a tuple of int pairs
                (:data:`~litedetr.ops.geometry.LevelShapes`, as the model passes them) or an ``(L, 2)`` tensor.
            padding_mask: ``(B, S)`` bool, True = padding; padded keys/values are zero.

        Returns:
            ``(B, Lq, C)``.
        """
        b, lq, _ = query.shape
        if reference_points.shape[:3] != (b, lq, self.n_levels):
            raise ValueError(f"reference points {tuple(reference_points.shape)} do not fit {b} x {lq} queries, {self.n_levels} levels")
        v = self._project(self.value_proj, value, padding_mask)
        locations = self.sampling(query, reference_points, spatial_shapes)
        if self.key_aware:
            q = self.query_proj(query).view(b, lq, self.n_heads, -1)
            k = self._project(self.key_proj, value, padding_mask) if self.kda.key_proj else v
            bias = self._point_logits(query) if self.kda.query_logits else None
            out = ms_deform_attn_key_aware(q, k, v, spatial_shapes, locations, bias)
            if self.capture is not None:
                self.capture(locations, key_aware_attention_weights(q, k, spatial_shapes, locations, bias))
        else:
            weights = self._point_logits(query).flatten(3).softmax(-1).view(b, lq, self.n_heads, self.n_levels, self.n_points)
            out = ms_deform_attn(v, spatial_shapes, locations, weights)
            if self.capture is not None:
                self.capture(locations, weights)
        return self.output_proj(out)

    def _point_logits(self, query: Tensor) -> Tensor:
        """``(B, Lq, C)`` queries -> ``(B, Lq, M, L, P)`` logits predicted from the query alone (``attention_weights``)."""
        return self.attention_weights(query).view(*query.shape[:2], self.n_heads, self.n_levels, self.n_points)

    def _project(self, proj: nn.Linear, value: Tensor, padding_mask: Tensor | None) -> Tensor:
        """``(B, S, C)`` maps -> ``(B, S, M, D)`` projected per head, zero at padding."""
        x = proj(value)
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
        return x.view(*value.shape[:2], self.n_heads, -1)
