"""Load the weights of the original code bases: the authors' Lite-DINO, DINO, Deformable DETR, H-DETR.

A checkpoint's layout is recognised from its keys (:func:`detect_layout`); its names are rewritten by
that layout's ordered table of regular expressions (first full match wins), then checked against the
target module: every key must be used and every parameter filled, with equal shapes; otherwise
:class:`ConversionError` names the offending keys.

A standard-encoder checkpoint may initialise a Lite model of its family: encoder layer ``i`` takes
layer ``i``'s weights; what has no source (the narrow low-level FFN, key-aware attention's
``query_proj``) keeps its fresh initialisation and what has no place (plain attention's
``attention_weights`` where the Lite model's attention is key-aware) is dropped; one log line lists both.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from litedetr.models.families import LAYOUTS, layout_family
from litedetr.models.state_dict import fit_problems
from litedetr.nn import MultiScaleDeformableAttention

__all__ = [
    "ConversionError",
    "COMMON_RULES",
    "detect_layout",
    "official_rules",
    "rename_official",
    "standard_encoder_layout",
    "adapt_encoder_weights",
    "fold_keys",
    "load_strictly",
    "load_official_state_dict",
]

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


class ConversionError(ValueError):
    """A state dict that does not fit the target model; the message names the keys."""


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


def _attention_parameters(model: nn.Module, key_aware: bool, names: tuple[str, ...]) -> set[str]:
    """State-dict keys of ``names`` (e.g. ``query_proj``) in every deformable attention of the given kind."""
    return {
        f"{module_name}.{name}.{p}".lstrip(".")
        for module_name, module in model.named_modules()
        if isinstance(module, MultiScaleDeformableAttention) and module.key_aware == key_aware
        for name in names
        for p in ("weight", "bias")
    }


def _standard_into_lite(model: nn.Module, renamed: dict[str, Tensor]) -> tuple[set[str], set[str]]:
    """For a standard-encoder checkpoint and a Lite model: the keys to start fresh and the keys to drop.

    Where the model's attention is key-aware and the checkpoint's is plain (it has ``attention_weights``),
    ``attention_weights`` is dropped and ``query_proj`` starts fresh, also when the checkpoint holds one
    (the Lite-DETR repository's plain attention carries an unused, untrained ``query_proj``).
    """
    own = model.state_dict().keys()
    fresh = {k for k in own - renamed.keys() if re.fullmatch(r"encoder\.layers\.\d+\.ffn_low\..+", k)}
    key_aware = _attention_parameters(model, True, ("query_proj",))
    plain_source = {k for k in key_aware if k.replace(".query_proj.", ".attention_weights.") in renamed}
    fresh |= (key_aware - renamed.keys()) | plain_source
    dropped = {k.replace(".query_proj.", ".attention_weights.") for k in plain_source} | (plain_source & renamed.keys())
    return fresh, dropped


def fold_keys(keys: set[str]) -> str:
    """Keys with their first index folded and ``weight``/``bias`` left out, e.g. ``encoder.layers.{1,3,5}.ffn_low.linear1``."""
    groups: dict[tuple[str, str], set[int]] = {}
    for key in keys:
        key = re.sub(r"\.(weight|bias)$", "", key)
        head, *rest = re.split(r"\.(\d+)\.", key, maxsplit=1)
        index, tail = rest if rest else ("-1", "")
        groups.setdefault((head, tail), set()).add(int(index))
    names = []
    for (head, tail), indices in sorted(groups.items()):
        if indices == {-1}:
            names.append(head)
        else:
            folded = str(*indices) if len(indices) == 1 else "{" + ",".join(map(str, sorted(indices))) + "}"
            names.append(f"{head}.{folded}.{tail}")
    return ", ".join(names)


def adapt_encoder_weights(model: nn.Module, renamed: dict[str, Tensor], standard_source: bool) -> tuple[set[str], set[str]]:
    """Fit a converted state dict's attention and encoder weights to ``model``, in place: the keys to start
    fresh and the keys dropped.

    Drops the unused ``query_proj`` of the authors' plain attention (logged). With a standard-encoder
    source and a Lite model: the narrow low-level FFN and key-aware attention's ``query_proj`` start
    fresh and plain attention's ``attention_weights`` is dropped where the model's attention is key-aware.
    """
    unused = _attention_parameters(model, False, ("query_proj",)) & renamed.keys()
    for key in unused:  # the authors' plain attention holds a query_proj it never uses
        del renamed[key]
    if unused:
        logger.info("dropped %d unused query_proj weights of plain deformable attention", len(unused))
    lite_model = any(re.fullmatch(r"encoder\.layers\.\d+\.ffn_low\..+", k) for k in model.state_dict())
    if not (lite_model and standard_source):
        return set(), set()
    fresh, dropped = _standard_into_lite(model, renamed)
    for key in dropped:
        del renamed[key]
    return fresh, dropped


def load_strictly(model: nn.Module, state: dict[str, Tensor], fresh: set[str] = frozenset()) -> None:
    """Load ``state`` into ``model``, which must fill every tensor but ``fresh`` (kept as initialised), with equal shapes.

    Raises:
        ConversionError: keys missing, left over or of another shape, each listed by name.
    """
    own = model.state_dict()
    problems = fit_problems(model, {**{k: own[k] for k in fresh}, **state})
    if problems:
        raise ConversionError("the checkpoint does not fit this model (another preset or class count?)\n" + "\n".join(problems))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def standard_encoder_layout(layout: str | None) -> bool:
    """Whether checkpoints of ``layout`` have the standard encoder (every token a query in every layer); None: False."""
    return layout is not None and not LAYOUTS[layout][0].lite_encoder


def load_official_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], rules: list[tuple[str, str]] | None = None, layout: str | None = None) -> None:
    """Convert an original code base's ``state_dict`` and load it into ``model``, strictly.

    Args:
        model: a :class:`~litedetr.models.Detector`, or a part of one (e.g. input stage + encoder).
        state_dict: the checkpoint's tensors under the original names.
        rules: the renaming table; default: that of ``layout``.
        layout: one of :data:`~litedetr.models.families.LAYOUTS`; default: :func:`detect_layout`.

    Raises:
        ConversionError: keys unknown to the rules, left over, missing from the checkpoint, or of
            another shape; each listed by name.
    """
    if rules is None:
        layout = layout or detect_layout(state_dict)
        decoder = getattr(model, "decoder", None)
        rules = official_rules(layout, len(decoder.layers) if decoder is not None else 6)
    renamed = rename_official(state_dict, rules)
    fresh, dropped = adapt_encoder_weights(model, renamed, standard_encoder_layout(layout))
    if fresh or dropped:
        logger.info("standard encoder into a Lite model: fresh %s; dropped %s", fold_keys(fresh) or "none", fold_keys(dropped) or "none")
    load_strictly(model, renamed, fresh)
