"""Load weights saved by the authors' code (IDEA-Research/Lite-DETR, the DINO code base).

Their names are rewritten by an ordered table of regular expressions (first full match wins), then
checked against the target module: every key must be used and every parameter filled, with equal
shapes; otherwise :class:`ConversionError` names the offending keys.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from litedetr.models.state_dict import fit_problems
from litedetr.nn import MultiScaleDeformableAttention

__all__ = ["ConversionError", "OFFICIAL_RULES", "rename_official", "load_official_state_dict"]

logger = logging.getLogger(__name__)

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
_TOP_LEVEL = {
    r"backbone\.0\.body": "backbone.body",
    r"transformer\.decoder\.norm": "decoder.norm",
    r"transformer\.decoder\.ref_point_head": "decoder.ref_point_head",
    r"transformer\.tgt_embed": "query_content",
    r"transformer\.enc_output": "enc_output",
    r"transformer\.enc_output_norm": "enc_output_norm",
    r"transformer\.enc_out_bbox_embed": "enc_box_head",
    r"transformer\.enc_out_class_embed": "enc_class_head",
    r"label_enc": "label_embed",
    # the authors hold one class head and one box head shared by all decoder layers, under several names
    r"(?:transformer\.decoder\.)?class_embed\.\d+": "class_head",
    r"(?:transformer\.decoder\.)?bbox_embed\.\d+": "box_head",
}

OFFICIAL_RULES: list[tuple[str, str]] = [
    (r"transformer\.level_embed", "input_stage.level_embed"),
    (r"input_proj\.(\d+)\.([01])\.(weight|bias)", r"input_stage.input_proj.\1.\2.\3"),
    *(
        (rf"transformer\.encoder\.layers\.(\d+)\.{theirs}\.(.+)", rf"encoder.layers.\1.{ours}.\2")
        for theirs, ours in _ENCODER_LAYER_PARTS.items()
    ),
    *(
        (rf"transformer\.decoder\.layers\.(\d+)\.{theirs}\.(.+)", rf"decoder.layers.\1.{ours}.\2")
        for theirs, ours in _DECODER_LAYER_PARTS.items()
    ),
    *((rf"{theirs}\.(.+)", rf"{ours}.\1") for theirs, ours in _TOP_LEVEL.items()),
]
"""``(pattern, replacement)`` pairs from the authors' key names to ours."""


class ConversionError(ValueError):
    """A state dict that does not fit the target model; the message names the keys."""


def rename_official(state_dict: Mapping[str, Tensor], rules: list[tuple[str, str]] = OFFICIAL_RULES) -> dict[str, Tensor]:
    """Rewrite the authors' key names to ours.

    Several of their names may map to one of ours (a head shared by all decoder layers); those
    tensors must be equal. Raises :class:`ConversionError` listing keys no rule knows.
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
        raise ConversionError("\n".join(["per-layer heads that are not shared (only shared heads are supported):", *unshared]))
    return renamed


def _unused_query_projections(model: nn.Module) -> set[str]:
    """The authors' plain attention also holds a ``query_proj`` it never uses: names to drop."""
    return {
        f"{name}.query_proj.{p}".lstrip(".")
        for name, module in model.named_modules()
        if isinstance(module, MultiScaleDeformableAttention) and not module.key_aware
        for p in ("weight", "bias")
    }


def load_official_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], rules: list[tuple[str, str]] = OFFICIAL_RULES
) -> None:
    """Convert the authors' ``state_dict`` and load it into ``model``, strictly.

    Raises:
        ConversionError: keys unknown to the rules, left over, missing from the checkpoint, or of
            another shape; each listed by name.
    """
    renamed = rename_official(state_dict, rules)
    unused = _unused_query_projections(model) & renamed.keys()
    for key in unused:
        del renamed[key]
    if unused:
        logger.info("dropped %d unused query_proj weights of plain deformable attention", len(unused))
    problems = fit_problems(model, renamed)
    if problems:
        raise ConversionError("the checkpoint does not fit this model (another preset or class count?)\n" + "\n".join(problems))
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in renamed.items()})
