"""The family registry: each family of the paper, in one row.

Deformable DETR (fundamentalvision/Deformable-DETR, "++ two-stage"), DINO (IDEA-Research/DINO and
the authors' Lite-DETR code) and H-DETR (HDETR/H-Deformable-DETR, two-stage hybrid branch) share
the backbone, the input stage, the encoders and the decoder loop. A :class:`Family` row holds all
that is particular to one: its :class:`FamilyDesign` (where its code base differs from the others,
each difference checked against ../shared/fixtures, made by running those code bases), the
:class:`~litedetr.models.DetectorConfig` fields of its base preset, and the released checkpoint
layouts that load into it. The presets (:mod:`litedetr.models.config`), the parts
(:func:`litedetr.models.parts.build_parts`) and the checkpoint conversion
(:mod:`litedetr.weights.keys`) are derived from :data:`FAMILIES`; a new family is one more row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from litedetr.models.criterion import DEFAULT_WEIGHTS, DEFORMABLE_WEIGHTS
from litedetr.models.query_selection import BoxEmbeddingQuerySelection, MixedQuerySelection, QuerySelection

__all__ = ["CheckpointLayout", "Family", "FamilyDesign", "FAMILIES", "LAYOUTS", "get_family", "layout_family"]

CodeBase = Literal["dino", "deformable-detr"]


@dataclass(frozen=True)
class FamilyDesign:
    """What a family's code base fixes, as opposed to the sizes a :class:`DetectorConfig` sets.

    Attributes:
        position_offset: added to the cumulative count of the sine position embedding (-0.5 or 0).
        selection: the two-stage query selection part.
        anchor_query_position: each decoder layer computes its query position from its reference box
            (DINO's ``ref_point_head``) instead of taking ``pos_trans``'s fixed one.
        shared_heads: one class and one box head for all decoder layers.
        decoder_norm: a LayerNorm on every decoder layer's output.
        inverse_sigmoid_eps: clamp of the inverse sigmoid of reference boxes.
        loss_weights: weights of ``loss_class``, ``loss_bbox``, ``loss_giou``.
        giou_eps: added to union and enclosing area in GIoU (matching cost and loss).
        binary_encoder_targets: encoder proposals are supervised with every label set to class 0.
        denoising: the code base has DINO's contrastive denoising queries (``dn_number``).
    """

    position_offset: float
    selection: type[QuerySelection]
    anchor_query_position: bool
    shared_heads: bool
    decoder_norm: bool
    inverse_sigmoid_eps: float
    loss_weights: Mapping[str, float]
    giou_eps: float
    binary_encoder_targets: bool
    denoising: bool


@dataclass(frozen=True)
class CheckpointLayout:
    """A released code base's checkpoint layout (its state-dict key names) that litedetr converts.

    Attributes:
        name: the layout's name, as :func:`~litedetr.weights.keys.detect_layout` returns it.
        repository: the code base that writes it.
        lite_encoder: its encoder is Lite DETR's (``False``: the standard one, every token a query in every layer).
    """

    name: str
    repository: str
    lite_encoder: bool


@dataclass(frozen=True)
class Family:
    """One family: its design, its base preset's config fields and its checkpoint layouts.

    Attributes:
        name: the ``DetectorConfig.family`` value and the presets' prefix (``dino-r50``, ``lite-dino-r50-...``).
        code_base: the code base whose key names its checkpoints use (H-DETR is built on Deformable DETR's).
        design: see :class:`FamilyDesign`.
        defaults: the :class:`DetectorConfig` fields of the family's base preset that differ from the
            dataclass's defaults (which are DINO's); ``encoder`` maps to :class:`EncoderConfig` fields.
        layouts: the checkpoint layouts that load into this family.
    """

    name: str
    code_base: CodeBase
    design: FamilyDesign
    defaults: Mapping[str, Any]
    layouts: tuple[CheckpointLayout, ...]


_DEFORMABLE = FamilyDesign(
    position_offset=-0.5,
    selection=BoxEmbeddingQuerySelection,
    anchor_query_position=False,
    shared_heads=False,
    decoder_norm=False,
    inverse_sigmoid_eps=1e-5,
    loss_weights=DEFORMABLE_WEIGHTS,
    giou_eps=0.0,
    binary_encoder_targets=True,
    denoising=False,
)

_DINO = FamilyDesign(
    position_offset=0.0,
    selection=MixedQuerySelection,
    anchor_query_position=True,
    shared_heads=True,
    decoder_norm=True,
    inverse_sigmoid_eps=1e-3,
    loss_weights=DEFAULT_WEIGHTS,
    giou_eps=1e-6,
    binary_encoder_targets=False,
    denoising=True,
)

_ROWS = (
    # two-stage Deformable DETR with iterative box refinement: content and anchors from the encoder's top-k
    Family(
        name="deformable-detr",
        code_base="deformable-detr",
        design=_DEFORMABLE,
        defaults=MappingProxyType(
            dict(
                encoder={"d_ffn": 1024},
                decoder_ffn=1024,
                dropout=0.1,
                num_queries=300,
                num_select=100,
                learned_query_content=False,
                look_forward_twice=False,
                pe_temperature=10000.0,
            )
        ),
        layouts=(CheckpointLayout("deformable-detr", "fundamentalvision/Deformable-DETR", lite_encoder=False),),
    ),
    # DINO: contrastive denoising, mixed query selection, look forward twice
    Family(
        name="dino",
        code_base="dino",
        design=_DINO,
        defaults=MappingProxyType(dict(dn_number=100)),
        layouts=(
            CheckpointLayout("lite-dino", "IDEA-Research/Lite-DETR", lite_encoder=True),
            CheckpointLayout("dino", "IDEA-Research/DINO", lite_encoder=False),
        ),
    ),
    # H-DETR is Deformable DETR's code base with a hybrid branch; its differences are config fields
    # (mixed selection, look forward twice, a one-to-many group of 1500 queries), not code
    Family(
        name="h-detr",
        code_base="deformable-detr",
        design=_DEFORMABLE,
        defaults=MappingProxyType(dict(num_queries=300, num_select=100, one_to_many_queries=1500, one_to_many_repeat=6, pe_temperature=10000.0)),
        layouts=(CheckpointLayout("h-detr", "HDETR/H-Deformable-DETR", lite_encoder=False),),
    ),
)

FAMILIES: Mapping[str, Family] = MappingProxyType({row.name: row for row in _ROWS})
"""Every family by name."""

LAYOUTS: Mapping[str, tuple[CheckpointLayout, Family]] = MappingProxyType({layout.name: (layout, row) for row in _ROWS for layout in row.layouts})
"""Every checkpoint layout litedetr converts, by name, with the family it loads into."""


def get_family(name: str) -> Family:
    """The family ``name``; a ``ValueError`` naming the known ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def layout_family(layout: str) -> Family:
    """The family checkpoints of ``layout`` (one of :data:`LAYOUTS`) load into."""
    return LAYOUTS[layout][1]
