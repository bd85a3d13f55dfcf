"""The three families of the paper as choices of detector parts.

Deformable DETR (fundamentalvision/Deformable-DETR, "++ two-stage"), DINO (IDEA-Research/DINO and
the authors' Lite-DETR code) and H-DETR (HDETR/H-Deformable-DETR, two-stage hybrid branch) share
the backbone, the input stage, the encoders and the decoder loop. Where their code bases differ (each
difference checked against ../shared/fixtures, made by running those code bases) is one
:class:`FamilyDesign`; :func:`build_parts` turns a config into the parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import nn

from litedetr.models.backbone import build_backbone
from litedetr.models.config import DetectorConfig
from litedetr.models.criterion import DEFAULT_WEIGHTS, DEFORMABLE_WEIGHTS, SetCriterion
from litedetr.models.heads import PredictionHeads
from litedetr.models.matcher import HungarianMatcher
from litedetr.models.query_selection import MixedQuerySelection, PosTransQuerySelection, QuerySelection
from litedetr.models.training_queries import Denoising, OneToManyGroup, TrainingQueries
from litedetr.nn import DeformableEncoder, EncoderInput, KeyAwareOptions, LiteEncoder, MultiScaleDeformableAttention
from litedetr.nn.decoder import AnchorQueryPosition, DeformableDecoder, StaticQueryPosition

__all__ = ["FamilyDesign", "FAMILY_DESIGNS", "DetectorParts", "build_parts"]


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
    """

    position_offset: float
    selection: type[QuerySelection]
    anchor_query_position: bool
    shared_heads: bool
    decoder_norm: bool
    inverse_sigmoid_eps: float
    loss_weights: dict[str, float]
    giou_eps: float
    binary_encoder_targets: bool


_DEFORMABLE = FamilyDesign(
    position_offset=-0.5,
    selection=PosTransQuerySelection,
    anchor_query_position=False,
    shared_heads=False,
    decoder_norm=False,
    inverse_sigmoid_eps=1e-5,
    loss_weights=DEFORMABLE_WEIGHTS,
    giou_eps=0.0,
    binary_encoder_targets=True,
)

FAMILY_DESIGNS: dict[str, FamilyDesign] = {
    "deformable-detr": _DEFORMABLE,
    "dino": FamilyDesign(
        position_offset=0.0,
        selection=MixedQuerySelection,
        anchor_query_position=True,
        shared_heads=True,
        decoder_norm=True,
        inverse_sigmoid_eps=1e-3,
        loss_weights=DEFAULT_WEIGHTS,
        giou_eps=1e-6,
        binary_encoder_targets=False,
    ),
    # H-DETR is Deformable DETR's code base with a hybrid branch; its differences are config flags
    # (mixed selection, look forward twice, one-to-many queries), not code
    "h-detr": _DEFORMABLE,
}


class DetectorParts(NamedTuple):
    """A detector's parts, in the order data flows through them."""

    backbone: nn.Module
    input_stage: EncoderInput
    encoder: DeformableEncoder
    query_selection: QuerySelection
    training_queries: TrainingQueries
    decoder: DeformableDecoder
    heads: PredictionHeads
    criterion: SetCriterion


def _kda(config: DetectorConfig) -> KeyAwareOptions:
    return KeyAwareOptions(key_proj=config.kda_key_proj, zero_query=config.kda_zero_query)


def _encoder(config: DetectorConfig) -> DeformableEncoder:
    enc = config.encoder
    common = dict(d_model=config.d_model, n_levels=config.n_levels, n_heads=config.n_heads, n_points=config.n_points)
    attention = dict(dropout=config.dropout, key_aware=enc.key_aware, kda=_kda(config))
    if enc.kind == "lite":
        schedule = dict(n_high=enc.n_high, high_updates=enc.high_updates, blocks=enc.blocks, d_ffn_low=enc.d_ffn_low)
        return LiteEncoder(d_ffn=enc.d_ffn, **attention, **schedule, **common)
    return DeformableEncoder(enc.num_layers, d_ffn=enc.d_ffn, **attention, **common)


def _init_transformer(*modules: nn.Module) -> None:
    """Xavier-uniform for every matrix, then deformable attention's own initialisation (as all three code bases)."""
    for module in modules:
        for p in module.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in module.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.reset_parameters()


def _training_queries(config: DetectorConfig) -> TrainingQueries:
    if config.dn_number:
        return Denoising(config.d_model, config.num_classes, config.dn_number, config.dn_label_noise_ratio, config.dn_box_noise_scale)
    if config.one_to_many_queries:
        return OneToManyGroup(config.one_to_many_queries)
    return TrainingQueries()


def build_parts(config: DetectorConfig, backbone_weights: str | None = None) -> DetectorParts:
    """The parts of ``config``'s detector, freshly initialised (see :class:`FamilyDesign`)."""
    design, d = FAMILY_DESIGNS[config.family], config.d_model
    backbone = build_backbone(config.backbone, backbone_weights, config.backbone_trainable_norm)
    input_stage = EncoderInput(tuple(backbone.out_channels), d, config.n_levels, config.pe_temperature, config.pe_temperature, design.position_offset)
    num_content = config.num_queries + config.one_to_many_queries if config.learned_query_content else None
    decoder = DeformableDecoder(
        config.decoder_layers,
        d,
        config.n_levels,
        config.n_heads,
        config.n_points,
        config.decoder_ffn,
        config.dropout,
        config.decoder_key_aware,
        _kda(config),
        query_position=AnchorQueryPosition(d) if design.anchor_query_position else StaticQueryPosition(),
        norm=nn.LayerNorm(d) if design.decoder_norm else nn.Identity(),
        look_forward_twice=config.look_forward_twice,
        inverse_sigmoid_eps=design.inverse_sigmoid_eps,
    )
    encoder = _encoder(config)
    _init_transformer(encoder, decoder)
    criterion = SetCriterion(
        config.num_classes,
        HungarianMatcher(cost_class=config.match_class_cost, giou_eps=design.giou_eps),
        weight_dict={**design.loss_weights, **({} if config.class_loss_weight is None else {"loss_class": config.class_loss_weight})},
        one_to_many_repeat=config.one_to_many_repeat,
        one_to_many_weight=config.one_to_many_weight,
        encoder_one_to_many=config.encoder_one_to_many,
        binary_encoder_targets=design.binary_encoder_targets,
        giou_eps=design.giou_eps,
    )
    return DetectorParts(
        backbone=backbone,
        input_stage=input_stage,
        encoder=encoder,
        query_selection=design.selection(d, config.num_classes, num_content, dense=config.encoder_one_to_many > 0, query_nms=config.query_nms),
        training_queries=_training_queries(config),
        decoder=decoder,
        heads=PredictionHeads(d, config.num_classes, config.decoder_layers, design.shared_heads, design.inverse_sigmoid_eps),
        criterion=criterion,
    )
