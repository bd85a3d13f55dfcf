"""A detector's parts, built from its config and its family's design.

:func:`build_parts` turns a :class:`~litedetr.models.DetectorConfig` into the parts that
:class:`~litedetr.models.Detector` wires, making each choice its family's
:class:`~litedetr.models.families.FamilyDesign` fixes (see :mod:`litedetr.models.families`).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from litedetr.models.backbone import build_backbone
from litedetr.models.config import DetectorConfig
from litedetr.models.criterion import SetCriterion
from litedetr.models.families import get_family
from litedetr.models.heads import PredictionHeads
from litedetr.models.matcher import HungarianMatcher
from litedetr.models.query_selection import QuerySelection
from litedetr.models.training_queries import Denoising, NoTrainingQueries, OneToManyGroup, TrainingQueries
from litedetr.nn import DeformableEncoder, EncoderInput, KeyAwareOptions, LiteEncoder, MultiScaleDeformableAttention
from litedetr.nn.decoder import AnchorQueryPosition, DeformableDecoder, StaticQueryPosition

__all__ = ["DetectorParts", "build_parts"]


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
    return KeyAwareOptions(key_proj=config.kda_key_proj, zero_query=config.kda_zero_query, query_logits=config.kda_query_logits)


def _encoder(config: DetectorConfig) -> DeformableEncoder:
    enc = config.encoder
    common = dict(d_model=config.d_model, n_levels=config.num_levels, n_heads=config.num_heads, n_points=config.num_points)
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
    return NoTrainingQueries()


def build_parts(config: DetectorConfig) -> DetectorParts:
    """The parts of ``config``'s detector, freshly initialised (see :class:`~litedetr.models.families.FamilyDesign`)."""
    design, d = get_family(config.family).design, config.d_model
    backbone = build_backbone(config.backbone, config.backbone_trainable_norm)
    input_stage = EncoderInput(
        tuple(backbone.out_channels),
        d_model=d,
        n_levels=config.num_levels,
        temperature_h=config.pe_temperature,
        temperature_w=config.pe_temperature,
        position_offset=design.position_offset,
    )
    num_content = config.num_queries + config.one_to_many_queries if config.learned_query_content else None
    decoder = DeformableDecoder(
        config.num_decoder_layers,
        d_model=d,
        n_levels=config.num_levels,
        n_heads=config.num_heads,
        n_points=config.num_points,
        d_ffn=config.decoder_ffn,
        dropout=config.dropout,
        key_aware=config.decoder_key_aware,
        kda=_kda(config),
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
        heads=PredictionHeads(d, config.num_classes, config.num_decoder_layers, design.shared_heads, design.inverse_sigmoid_eps),
        criterion=criterion,
    )
