"""Start a new model from a trained checkpoint: fine-tuning on another dataset, or a Lite model from a standard one.

:func:`init_from_checkpoint` reads any checkpoint litedetr can read (its own model files, and the
released ``.pth`` files of the authors' Lite-DINO, DINO, Deformable DETR and H-DETR) into a freshly
built detector of the same family:

- Every tensor that is not class-dependent is copied, strictly: a missing, left-over or mis-shaped key
  is a :class:`~litedetr.models.convert.ConversionError` naming it (another architecture).
- The class-dependent tensors (the decoder's class heads, the encoder proposals' class head, the
  denoising label embedding) are adapted to the model's classes: a class whose name matches one of the
  checkpoint's (:func:`~litedetr.models.coco_classes.class_key`: case, spaces, underscores and hyphens
  ignored; VOC's names of COCO classes accepted) takes that class's row; the other rows keep the fresh
  model's initialisation (the focal-loss prior bias). The released ``.pth`` files are COCO's 91-id
  layout, whose 80 names ship with litedetr; a litedetr model file names its own classes. A model
  whose classes are not named takes the checkpoint's rows one to one when the counts match.
- Where the family supervises the encoder's proposals with binary targets (Deformable DETR, H-DETR),
  row 0 of the proposal class head is the objectness score: it always takes the checkpoint's row 0.
- A standard-encoder checkpoint initialises a Lite model of its family (encoder layer ``i`` takes
  layer ``i``; see :func:`~litedetr.models.convert.adapt_encoder_weights`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from litedetr.models.checkpoint import check_decoder_depth, read_config, read_model_file, read_official_state
from litedetr.models.coco_classes import COCO_NUM_CLASSES, class_key, coco_class_names
from litedetr.models.config import DetectorConfig
from litedetr.models.convert import (
    ConversionError,
    adapt_encoder_weights,
    fold_keys,
    load_strictly,
    official_rules,
    rename_official,
    standard_encoder_layout,
)
from litedetr.models.families import get_family, layout_family

__all__ = ["InitReport", "init_from_checkpoint", "checkpoint_family", "match_classes", "CLASS_TENSORS"]

logger = logging.getLogger(__name__)

CLASS_TENSORS = (
    r"heads\.class_heads\.\d+\.(weight|bias)",
    r"query_selection\.class_head\.(weight|bias)",
    r"training_queries\.label_embed\.weight",
)
"""Our names of the tensors with one row per class (the label embedding has one more, DINO's extra label)."""

_OBJECTNESS_HEAD = r"query_selection\.class_head\.(weight|bias)"
_LABEL_EMBED = r"training_queries\.label_embed\.weight"


@dataclass
class InitReport:
    """What :func:`init_from_checkpoint` did.

    Attributes:
        source: the checkpoint's kind: ``"litedetr"`` or the original layout (``"dino"``, ...).
        copied: tensors copied whole.
        classes_kept: ``(our class, the checkpoint's class)`` of each class that kept its rows.
        classes_new: our classes that start fresh.
        fresh: tensors without a source that start fresh (standard -> Lite; class tensors the checkpoint lacks).
        dropped: the checkpoint's tensors without a place in the model.
    """

    source: str
    copied: int = 0
    classes_kept: list[tuple[str, str]] = field(default_factory=list)
    classes_new: list[str] = field(default_factory=list)
    fresh: set[str] = field(default_factory=set)
    dropped: set[str] = field(default_factory=set)


def _is_class_tensor(key: str) -> bool:
    return any(re.fullmatch(p, key) for p in CLASS_TENSORS)


def match_classes(ours: Sequence[str], theirs: Sequence[str]) -> dict[int, int]:
    """``{our label: their label}`` for each of our class names that one of theirs matches (:func:`class_key`)."""
    index: dict[str, int] = {}
    for j, name in enumerate(theirs):
        if name:
            index.setdefault(class_key(name), j)
    return {i: index[class_key(name)] for i, name in enumerate(ours) if class_key(name) in index}


def checkpoint_family(path: str | os.PathLike) -> str:
    """The family of a checkpoint :func:`init_from_checkpoint` can read, without building a model (to check arguments early).

    Raises:
        ValueError: the file is missing, or not a checkpoint of a known kind (named).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return read_config(path).family
    return layout_family(read_official_state(path)[1]).name


def _read_source(path: Path, config: DetectorConfig, weights: str) -> tuple[dict[str, Tensor], str, tuple[str, ...], bool]:
    """The checkpoint's state dict under our names, its kind, its class names and whether its encoder is standard."""
    if path.suffix == ".safetensors":
        source, state = read_model_file(path)
        family, kind, names, standard = source.family, "litedetr", source.class_names, source.encoder.kind == "standard"
    else:
        official, kind = read_official_state(path, weights)
        family, standard = layout_family(kind).name, standard_encoder_layout(kind)
        if family == config.family:
            check_decoder_depth(path, official, kind, config.num_decoder_layers)
        state = rename_official(official, official_rules(kind, config.num_decoder_layers))
        bias = state.get("heads.class_heads.0.bias")
        names = coco_class_names() if bias is not None and len(bias) == COCO_NUM_CLASSES else ()
    if family != config.family:
        raise ConversionError(f"{path}: a {family} checkpoint ({kind}), but the model is of the {config.family} family; pick a preset of its family")
    return state, kind, names, standard


def _adapt_class_tensor(key: str, ours: Tensor, theirs: Tensor, mapping: dict[int, int], num_classes: int, binary_proposals: bool) -> Tensor:
    """``ours`` (as freshly initialised) with the rows ``mapping`` carries over from ``theirs``."""
    if ours.shape[1:] != theirs.shape[1:]:
        raise ConversionError(f"{key}: checkpoint {tuple(theirs.shape)} vs model {tuple(ours.shape)}: another width (d_model)")
    adapted = ours.detach().clone()
    for i, j in mapping.items():
        adapted[i] = theirs[j]
    if re.fullmatch(_LABEL_EMBED, key):  # DINO's extra label row, after the classes
        adapted[num_classes:] = theirs[theirs.shape[0] - (ours.shape[0] - num_classes) :]
    if binary_proposals and re.fullmatch(_OBJECTNESS_HEAD, key):
        adapted[0] = theirs[0]
    return adapted


def init_from_checkpoint(model: nn.Module, path: str | os.PathLike, weights: str = "auto") -> InitReport:
    """Copy a trained checkpoint into a freshly built detector, adapting the class-dependent tensors (see the module).

    Args:
        model: a :class:`~litedetr.models.Detector` as built (its classes named in ``model.config.class_names``).
        path: a litedetr model file (``.safetensors``) or an original code base's ``.pth``.
        weights: of a ``.pth`` holding both, the EMA (``auto``, ``ema``) or the model weights (``model``).

    Raises:
        ConversionError: the checkpoint is of another family or architecture (the keys are named).
        ValueError: the file is missing or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    config: DetectorConfig = model.config
    state, kind, their_names, standard = _read_source(path, config, weights)
    report = InitReport(source=kind)
    mapping = match_classes(config.class_names, their_names)
    their_count = state["heads.class_heads.0.weight"].shape[0] if "heads.class_heads.0.weight" in state else None
    if not config.class_names and their_count == config.num_classes:  # our classes unnamed: the same count carries row by row
        mapping = {i: i for i in range(config.num_classes)}
    binary = get_family(config.family).design.binary_encoder_targets
    own = model.state_dict()
    for key in [k for k in state if _is_class_tensor(k)]:
        theirs = state.pop(key)
        if key in own:
            state[key] = _adapt_class_tensor(key, own[key], theirs, mapping, config.num_classes, binary)
        else:
            report.dropped.add(key)
    report.fresh = {k for k in own if _is_class_tensor(k)} - state.keys()
    fresh, dropped = adapt_encoder_weights(model, state, standard)
    report.fresh |= fresh
    report.dropped |= dropped
    load_strictly(model, state, report.fresh)
    report.copied = len(state)
    report.classes_kept = [(config.class_name(i), their_names[j] if their_names else str(j)) for i, j in sorted(mapping.items())]
    report.classes_new = [config.class_name(i) for i in range(config.num_classes) if i not in mapping]
    _log(path, report, config.num_classes)
    return report


def _names(names: list[str], limit: int = 12) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _log(path: Path, report: InitReport, num_classes: int) -> None:
    kept = [ours if class_key(ours) == class_key(theirs) else f"{ours} (= {theirs})" for ours, theirs in report.classes_kept]
    logger.info(
        "initialised from %s (%s): %d tensors; %d of %d classes carried over%s; new: %s%s%s",
        path,
        report.source,
        report.copied,
        len(kept),
        num_classes,
        f" ({_names(kept)})" if kept else "",
        _names(report.classes_new) or "none",
        f"; fresh: {fold_keys(report.fresh)}" if report.fresh else "",
        f"; dropped: {fold_keys(report.dropped)}" if report.dropped else "",
    )
