"""A standard encoder's weights into a Lite encoder of the same family, and the authors' unused attention weights.

A standard-encoder checkpoint initialises a Lite model of its family: encoder layer ``i`` takes layer
``i``'s weights; what has no source (the narrow low-level FFN, key-aware attention's ``query_proj``)
keeps its fresh initialisation, and what has no place (plain attention's ``attention_weights`` where the
Lite model's attention is key-aware without ``query_logits``) is dropped. Key-aware attention with
``query_logits`` (``kda_query_logits``) takes plain attention's ``attention_weights`` as its query-only
logits, and starts them at zero from a checkpoint without them (the authors' Lite-DINO).
"""

from __future__ import annotations

import logging
import re
from collections.abc import KeysView

from torch import Tensor, nn

from litedetr.nn import MultiScaleDeformableAttention
from litedetr.weights.keys import LITE_FFN

__all__ = ["adapt_encoder_weights"]

logger = logging.getLogger(__name__)


def _attention_parameters(model: nn.Module, key_aware: bool, names: tuple[str, ...]) -> set[str]:
    """State-dict keys of ``names`` (e.g. ``query_proj``) in every deformable attention of the given kind."""
    return {
        f"{module_name}.{name}.{p}".lstrip(".")
        for module_name, module in model.named_modules()
        if isinstance(module, MultiScaleDeformableAttention) and module.key_aware == key_aware
        for name in names
        for p in ("weight", "bias")
    }


def _standard_into_lite(model: nn.Module, renamed: dict[str, Tensor], own: KeysView[str]) -> tuple[set[str], set[str]]:
    """For a standard-encoder checkpoint and a Lite model: the keys to start fresh and the keys to drop (``own``: the model's state-dict keys).

    Where the model's attention is key-aware and the checkpoint's is plain (it has ``attention_weights``),
    ``attention_weights`` is dropped and ``query_proj`` starts fresh, also when the checkpoint holds one
    (the Lite-DETR repository's plain attention carries an unused, untrained ``query_proj``).
    """
    fresh = {k for k in own - renamed.keys() if re.fullmatch(LITE_FFN, k)}
    key_aware = _attention_parameters(model, True, ("query_proj",))
    plain_source = {k for k in key_aware if k.replace(".query_proj.", ".attention_weights.") in renamed}
    fresh |= (key_aware - renamed.keys()) | plain_source
    dropped = ({k.replace(".query_proj.", ".attention_weights.") for k in plain_source} - own) | (plain_source & renamed.keys())
    return fresh, dropped


def adapt_encoder_weights(model: nn.Module, renamed: dict[str, Tensor], standard_source: bool) -> tuple[set[str], set[str]]:
    """Fit a converted state dict's attention and encoder weights to ``model``, in place: the keys to start
    fresh and the keys dropped.

    Drops the unused ``query_proj`` of the authors' plain attention (logged); the query-only logits of
    key-aware attention with ``query_logits`` start fresh (at zero) where the checkpoint has none. With a
    standard-encoder source and a Lite model: the narrow low-level FFN and key-aware attention's
    ``query_proj`` start fresh and plain attention's ``attention_weights`` is dropped where the model's
    attention is key-aware without ``query_logits``.
    """
    unused = _attention_parameters(model, False, ("query_proj",)) & renamed.keys()
    for key in unused:  # the authors' plain attention holds a query_proj it never uses
        del renamed[key]
    if unused:
        logger.info("dropped %d unused query_proj weights of plain deformable attention", len(unused))
    own = model.state_dict().keys()
    fresh = (_attention_parameters(model, True, ("attention_weights",)) & own) - renamed.keys()
    lite_model = any(re.fullmatch(LITE_FFN, k) for k in own)
    if not (lite_model and standard_source):
        return fresh, set()
    lite_fresh, dropped = _standard_into_lite(model, renamed, own)
    for key in dropped:
        del renamed[key]
    return fresh | lite_fresh, dropped
