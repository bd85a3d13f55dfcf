"""Every checkpoint key name litedetr knows, as ordered tables of regular expressions (first full match wins).

- The original code bases' names (:func:`official_rules`; the layout is recognised from the keys,
  :func:`detect_layout`): the authors' Lite-DINO, IDEA-Research/DINO, fundamentalvision/Deformable-DETR
  and HDETR/H-Deformable-DETR.
- litedetr's model file format 1 (:data:`FORMAT_1_RULES`).
- Our tensors with one row per class (:data:`CLASS_TENSORS`) and the Lite encoder's narrow FFN (:data:`LITE_FFN`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from litedetr.models.families import LAYOUTS, layout_family
from litedetr.weights.state_dict import ConversionError

__all__ = [
    "COMMON_RULES",
    "FORMAT_1_RULES",
    "CLASS_TENSORS",
    "LABEL_EMBED",
    "OBJECTNESS_HEAD",
    "LITE_FFN",
    "detect_layout",
    "official_rules",
    "rename_official",
    "standard_encoder_layout",
    "official_decoder_depth",
    "is_class_tensor",
]

_ENCODER_LAYER_PARTS = {
    "self_attn": "self_attn",
    "norm1": "norm",
    "linear1": "ffn.linear1",
    "linear2": "ffn.linear2",
    "norm2": "ffn.norm",
    "linear12": "ffn_low.linear1",
    "linear22": "ffn_low.linear2",
    "norm22": "ffn_low.norm",
}
_DECODER_LAYER_PARTS = {
    "cross_attn": "cross_attn",
    "norm1": "norm_cross",
    "self_attn": "self_attn",
    "norm2": "norm_self",
    "linear1": "ffn.linear1",
    "linear2": "ffn.linear2",
    "norm3": "ffn.norm",
}

COMMON_RULES: list[tuple[str, str]] = [
    (r"backbone\.0\.body\.(.+)", r"backbone.body.\1"),
    (r"transformer\.level_embed", "input_stage.level_embed"),
    (r"input_proj\.(\d+)\.([01])\.(weight|bias)", r"input_stage.input_proj.\1.\2.\3"),
    *((rf"transformer\.encoder\.layers\.(\d+)\.{theirs}\.(.+)", rf"encoder.layers.\1.{ours}.\2") for theirs, ours in _ENCODER_LAYER_PARTS.items()),
    *((rf"transformer\.decoder\.layers\.(\d+)\.{theirs}\.(.+)", rf"decoder.layers.\1.{ours}.\2") for theirs, ours in _DECODER_LAYER_PARTS.items()),
    (r"transformer\.enc_output\.(.+)", r"query_selection.enc_output.\1"),
    (r"transformer\.enc_output_norm\.(.+)", r"query_selection.enc_output_norm.\1"),
]
"""``(pattern, replacement)`` pairs every layout shares: backbone, input stage, encoder and decoder layers."""

_DINO_RULES = [
    (r"transformer\.decoder\.norm\.(.+)", r"decoder.norm.\1"),
    (r"transformer\.decoder\.ref_point_head\.(.+)", r"decoder.query_position.mlp.\1"),
    (r"transformer\.tgt_embed\.(.+)", r"query_selection.content.\1"),
    (r"transformer\.enc_out_class_embed\.(.+)", r"query_selection.class_head.\1"),
    (r"transformer\.enc_out_bbox_embed\.(.+)", r"query_selection.box_head.\1"),
    (r"label_enc\.(.+)", r"training_queries.label_embed.\1"),
    # one class head and one box head shared by all decoder layers, saved under several names
    (r"(?:transformer\.decoder\.)?class_embed\.\d+\.(.+)", r"heads.class_heads.0.\1"),
    (r"(?:transformer\.decoder\.)?bbox_embed\.\d+\.(.+)", r"heads.box_heads.0.\1"),
]


def _deformable_rules(num_decoder_layers: int) -> list[tuple[str, str]]:
    """Deformable DETR / H-DETR: per-layer heads ``N < num_decoder_layers``; head ``N = num_decoder_layers``
    scores the encoder's proposals. Each is saved twice (also under ``transformer.decoder.``)."""
    last = num_decoder_layers
    return [
        (r"transformer\.pos_trans\.(.+)", r"query_selection.pos_trans.\1"),
        (r"transformer\.pos_trans_norm\.(.+)", r"query_selection.pos_trans_norm.\1"),
        (r"query_embed\.(.+)", r"query_selection.content.\1"),
        (rf"(?:transformer\.decoder\.)?class_embed\.{last}\.(.+)", r"query_selection.class_head.\1"),
        (rf"(?:transformer\.decoder\.)?bbox_embed\.{last}\.(.+)", r"query_selection.box_head.\1"),
        (r"(?:transformer\.decoder\.)?class_embed\.(\d+)\.(.+)", r"heads.class_heads.\1.\2"),
        (r"(?:transformer\.decoder\.)?bbox_embed\.(\d+)\.(.+)", r"heads.box_heads.\1.\2"),
    ]


def detect_layout(state_dict: Mapping[str, Tensor]) -> str | None:
    """The code base a state dict comes from (one of :data:`~litedetr.models.families.LAYOUTS`), from its distinguishing keys; None if none fits.

    Raises:
        ConversionError: a layout litedetr does not load (single-stage Deformable DETR), named.
    """
    keys = state_dict.keys()
    if "transformer.pos_trans.weight" in keys:
        if "query_embed.weight" not in keys:
            return "deformable-detr"
        width = state_dict["transformer.pos_trans.weight"].shape[0] // 2
        if state_dict["query_embed.weight"].shape[-1] != width:
            raise ConversionError("query_embed holds position and content (2 x d_model): a single-stage Deformable DETR; litedetr loads two-stage ones")
        return "h-detr"
    if "transformer.enc_out_class_embed.weight" in keys or "transformer.tgt_embed.weight" in keys:
        # the Lite encoder's narrow low-level FFN (linear12/linear22/norm22); not query_proj, which the authors'
        # attention has in their repository's standard encoder too (plain attention leaves it unused)
        lite = any(re.search(r"\.linear12\.", k) for k in keys if k.startswith("transformer.encoder."))
        return "lite-dino" if lite else "dino"
    if any(k.startswith("transformer.reference_points.") for k in keys):
        raise ConversionError("transformer.reference_points: a single-stage Deformable DETR; litedetr loads two-stage ones")
    return None


_CODE_BASE_RULES = {"dino": lambda num_decoder_layers: _DINO_RULES, "deformable-detr": _deformable_rules}
"""The key names particular to each code base (:attr:`~litedetr.models.families.Family.code_base`)."""


def official_rules(layout: str | None, num_decoder_layers: int = 6) -> list[tuple[str, str]]:
    """The renaming table of ``layout`` (None: only :data:`COMMON_RULES`, for parts of a detector)."""
    if layout is None:
        return list(COMMON_RULES)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return [*COMMON_RULES, *_CODE_BASE_RULES[layout_family(layout).code_base](num_decoder_layers)]


def rename_official(state_dict: Mapping[str, Tensor], rules: list[tuple[str, str]]) -> dict[str, Tensor]:
    """Rewrite the original key names to ours by ``rules``.

    Several of their names may map to one of ours (a head saved twice, or shared by all decoder
    layers); those tensors must be equal. Raises :class:`ConversionError` listing keys no rule knows.
    """
    compiled = [(re.compile(p), r) for p, r in rules]
    renamed, unknown, unshared = {}, [], []
    for key, value in state_dict.items():
        for pattern, replacement in compiled:
            if pattern.fullmatch(key):
                ours = pattern.sub(replacement, key)
                if ours in renamed and not torch.equal(renamed[ours], value):
                    unshared.append(f"{key} (differs from the other tensor for {ours})")
                renamed[ours] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError("\n".join(["keys in the checkpoint that no conversion rule knows:", *unknown]))
    if unshared:
        title = "tensors saved under several names that differ (e.g. per-layer heads where this layout shares them):"
        raise ConversionError("\n".join([title, *unshared]))
    return renamed


def standard_encoder_layout(layout: str | None) -> bool:
    """Whether checkpoints of ``layout`` have the standard encoder (every token a query in every layer); None: False."""
    return layout is not None and not LAYOUTS[layout][0].lite_encoder


def official_decoder_depth(state_dict: Mapping[str, Tensor], layout: str) -> tuple[int, int] | None:
    """``(decoder layers, highest class head index)`` of an original checkpoint, read from its class heads
    (``class_embed.0 .. N``: one per decoder layer in DINO and Lite-DINO, one more, the proposals', in
    two-stage Deformable DETR and H-DETR); None without class heads."""
    heads = [int(m.group(1)) for key in state_dict if (m := re.fullmatch(r"class_embed\.(\d+)\.weight", key))]
    if not heads:
        return None
    return max(heads) + (1 if layout_family(layout).code_base == "dino" else 0), max(heads)


FORMAT_1_RULES = [
    (r"enc_output\.(.+)", r"query_selection.enc_output.\1"),
    (r"enc_output_norm\.(.+)", r"query_selection.enc_output_norm.\1"),
    (r"enc_class_head\.(.+)", r"query_selection.class_head.\1"),
    (r"enc_box_head\.(.+)", r"query_selection.box_head.\1"),
    (r"query_content\.(.+)", r"query_selection.content.\1"),
    (r"class_head\.(.+)", r"heads.class_heads.0.\1"),
    (r"box_head\.(.+)", r"heads.box_heads.0.\1"),
    (r"label_embed\.(.+)", r"training_queries.label_embed.\1"),
    (r"decoder\.ref_point_head\.(.+)", r"decoder.query_position.mlp.\1"),
    (r"(.+)", r"\1"),
]
"""litedetr's model file format 1 -> format 2 (format 1 wrote DINO-family files with DINO's names at the top level)."""

OBJECTNESS_HEAD = r"query_selection\.class_head\.(weight|bias)"
"""The encoder proposals' class head (its row 0 is the objectness score where a family's proposal targets are binary)."""
LABEL_EMBED = r"training_queries\.label_embed\.weight"
"""Denoising's label embedding: one row per class and DINO's extra label after them."""
CLASS_TENSORS = (r"heads\.class_heads\.\d+\.(weight|bias)", OBJECTNESS_HEAD, LABEL_EMBED)
"""Our names of the tensors with one row per class."""
LITE_FFN = r"encoder\.layers\.\d+\.ffn_low\..+"
"""The Lite encoder's narrow FFN of the low-level tokens (a standard encoder has none)."""


def is_class_tensor(key: str) -> bool:
    """Whether ``key`` is one of :data:`CLASS_TENSORS`."""
    return any(re.fullmatch(p, key) for p in CLASS_TENSORS)
