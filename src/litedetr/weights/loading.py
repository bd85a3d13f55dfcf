"""Weights into detectors, on one pipeline: litedetr's model files and the original code bases' checkpoints.

Two loaders:

- :func:`load_model`: a litedetr model file, as the detector it describes.
- :func:`load_checkpoint`: a checkpoint of an original code base (the authors' Lite-DINO, DINO,
  Deformable DETR or H-DETR ``.pth``) or a litedetr model file, into a preset of its family; with
  ``class_names`` (the class map), into a detector of those classes.

Every path runs these steps (:func:`init_from_checkpoint` is the whole pipeline, in place); without a
class map (:func:`load_model`, :func:`load_checkpoint` without ``class_names``) step 2 keeps the rows as they are:

1. **Read** the state dict under our names (:func:`read_source`; the original names are renamed by
   the tables in :mod:`litedetr.weights.keys`), with the checkpoint's family, class names and encoder kind.
2. **Classes**: the class-dependent tensors (the decoder's class heads, the encoder proposals' class
   head, the denoising label embedding) are adapted to the model's classes: a class whose name matches
   one of the checkpoint's (:func:`~litedetr.weights.classes.class_key`) takes that class's row; the
   other rows keep the fresh model's initialisation (the focal-loss prior bias). A model whose classes
   are not named takes the checkpoint's rows one to one when the counts match. Where the family
   supervises the proposals with binary targets (Deformable DETR, H-DETR), row 0 of the proposal class
   head is the objectness score: it always takes the checkpoint's row 0.
3. **Encoder**: a standard-encoder checkpoint into a Lite model of its family (:mod:`litedetr.weights.lite_encoder`).
4. **Load strictly**: every other tensor is copied bit-exactly; a missing, left-over or mis-shaped key
   is a :class:`~litedetr.weights.state_dict.ConversionError` naming it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from litedetr.models.config import DetectorConfig, get_config
from litedetr.models.detector import Detector
from litedetr.models.families import get_family, layout_family
from litedetr.weights.classes import COCO_NUM_CLASSES, adapt_class_tensor, class_key, coco_class_names, match_classes
from litedetr.weights.files import read_config, read_model_file
from litedetr.weights.keys import detect_layout, is_class_tensor, official_rules, rename_official, standard_encoder_layout
from litedetr.weights.lite_encoder import adapt_encoder_weights
from litedetr.weights.official import TRAINING_CHECKPOINT_HINT, check_decoder_depth, is_training_checkpoint, read_official_checkpoint, read_official_state
from litedetr.weights.state_dict import NOT_FITTING, ConversionError, fold_keys, load_strictly

__all__ = [
    "load_model",
    "load_checkpoint",
    "init_from_checkpoint",
    "load_official_state_dict",
    "read_source",
    "Source",
    "InitReport",
    "checkpoint_family",
]

logger = logging.getLogger(__name__)

_CLASS_HEAD = "heads.class_heads.0.weight"


@dataclass
class Source:
    """A checkpoint as read (step 1).

    Attributes:
        state: its tensors under our names.
        kind: ``"litedetr"`` or the original layout (``"dino"``, ``"lite-dino"``, ...).
        family: the family it is of.
        class_names: the name of each of its class rows (empty where unknown).
        standard_encoder: whether its encoder is the standard one (every token a query in every layer).
    """

    state: dict[str, Tensor]
    kind: str
    family: str
    class_names: tuple[str, ...]
    standard_encoder: bool


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


def _checkpoint_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    return path


def checkpoint_family(path: str | os.PathLike) -> str:
    """The family of a checkpoint the loaders can read, without building a model (to check arguments early).

    Raises:
        ValueError: the file is missing, or not a checkpoint of a known kind (named).
    """
    path = _checkpoint_file(path)
    if path.suffix == ".safetensors":
        return read_config(path).family
    return layout_family(read_official_state(path)[1]).name


def read_source(path: str | os.PathLike, config: DetectorConfig, weights: str = "auto") -> Source:
    """Step 1: a litedetr model file or an original ``.pth`` under our names, for a model of ``config``.

    Raises:
        ConversionError: the checkpoint is of another family than ``config``, or its decoder of another depth.
    """
    path = _checkpoint_file(path)
    if path.suffix == ".safetensors":
        own, state = read_model_file(path)
        source = Source(state, "litedetr", own.family, own.class_names, own.encoder.kind == "standard")
    else:
        official, layout = read_official_state(path, weights)
        family = layout_family(layout).name
        if family == config.family:
            check_decoder_depth(path, official, layout, config.num_decoder_layers)
        state = rename_official(official, official_rules(layout, config.num_decoder_layers))
        bias = state.get("heads.class_heads.0.bias")
        names = coco_class_names() if bias is not None and len(bias) == COCO_NUM_CLASSES else ()
        source = Source(state, layout, family, names, standard_encoder_layout(layout))
    if source.family != config.family:
        raise ConversionError(
            f"{path}: a {source.family} checkpoint ({source.kind}), but the model is of the {config.family} family; pick a preset of its family"
        )
    return source


def _load(
    model: nn.Module, state: dict[str, Tensor], standard_source: bool, fresh: set[str] = frozenset(), context: str = NOT_FITTING
) -> tuple[set[str], set[str]]:
    """Steps 3 and 4: fit the encoder's weights, then load strictly (``context``: the error's first line); the keys left fresh and those dropped."""
    encoder_fresh, dropped = adapt_encoder_weights(model, state, standard_source)
    load_strictly(model, state, set(fresh) | encoder_fresh, context)
    return set(fresh) | encoder_fresh, dropped


def load_official_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], rules: list[tuple[str, str]] | None = None, layout: str | None = None) -> None:
    """An original code base's ``state_dict``, already in memory, into ``model`` with its classes as they are (steps 1, 3, 4).

    Args:
        model: a :class:`~litedetr.models.Detector`, or a part of one (e.g. input stage + encoder).
        state_dict: the checkpoint's tensors under the original names.
        rules: the renaming table; default: that of ``layout``.
        layout: one of :data:`~litedetr.models.families.LAYOUTS`; default: :func:`~litedetr.weights.keys.detect_layout`.

    Raises:
        ConversionError: keys unknown to the rules, left over, missing from the checkpoint, or of
            another shape; each listed by name.
    """
    if rules is None:
        layout = layout or detect_layout(state_dict)
        decoder = getattr(model, "decoder", None)
        rules = official_rules(layout, len(decoder.layers) if decoder is not None else 6)
    fresh, dropped = _load(model, rename_official(state_dict, rules), standard_encoder_layout(layout))
    if fresh or dropped:
        logger.info("standard encoder into a Lite model: fresh %s; dropped %s", fold_keys(fresh) or "none", fold_keys(dropped) or "none")


def init_from_checkpoint(model: nn.Module, path: str | os.PathLike, weights: str = "auto") -> InitReport:
    """The pipeline (see the module): copy a checkpoint into a freshly built detector, its class rows carried over by name.

    Args:
        model: a :class:`~litedetr.models.Detector` as built (its classes named in ``model.config.class_names``).
        path: a litedetr model file (``.safetensors``) or an original code base's ``.pth``.
        weights: of a ``.pth`` holding both, the EMA (``auto``, ``ema``) or the model weights (``model``).

    Raises:
        ConversionError: the checkpoint is of another family or architecture (the keys are named).
        ValueError: the file is missing or unreadable.
    """
    config: DetectorConfig = model.config
    source = read_source(path, config, weights)
    state, report = source.state, InitReport(source=source.kind)
    mapping = match_classes(config.class_names, source.class_names)
    if not config.class_names and _CLASS_HEAD in state and state[_CLASS_HEAD].shape[0] == config.num_classes:
        mapping = {i: i for i in range(config.num_classes)}  # our classes unnamed: the same count carries row by row
    binary = get_family(config.family).design.binary_encoder_targets
    own = model.state_dict()
    for key in [k for k in state if is_class_tensor(k)]:
        theirs = state.pop(key)
        if key in own:
            state[key] = adapt_class_tensor(key, own[key], theirs, mapping, config.num_classes, binary)
        else:
            report.dropped.add(key)
    report.fresh, dropped = _load(model, state, source.standard_encoder, {k for k in own if is_class_tensor(k)} - state.keys())
    report.dropped |= dropped
    report.copied = len(state)
    report.classes_kept = [(config.class_name(i), source.class_names[j] if source.class_names else str(j)) for i, j in sorted(mapping.items())]
    report.classes_new = [config.class_name(i) for i in range(config.num_classes) if i not in mapping]
    _log(Path(path), report, config.num_classes)
    return report


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> Detector:
    """The detector a litedetr model file describes, its weights loaded strictly (any mismatch named), in eval mode.

    Raises:
        ValueError: the file is missing, not a litedetr model file (a ``.pth`` says which loader it needs),
            or its weights do not fit its own config.
    """
    path = _checkpoint_file(path)
    if path.suffix in (".pth", ".pt"):
        if is_training_checkpoint(path):
            raise ValueError(f"{path}: {TRAINING_CHECKPOINT_HINT}")
        raise ValueError(
            f"{path}: a .pth checkpoint does not store its architecture; pass its preset (load_checkpoint(path, preset); --preset on the command line)"
        )
    config, state = read_model_file(path)
    model = Detector(config)
    _load(model, state, config.encoder.kind == "standard", context=f"{path}: the weights do not fit the file's own config")
    return model.to(device).eval()


def load_checkpoint(
    path: str | os.PathLike,
    preset: str,
    *,
    class_names: Sequence[str] | None = None,
    weights: str = "auto",
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> Detector:
    """A checkpoint of another code base (or a litedetr model file) as a detector of ``preset``, in eval mode.

    Args:
        path: a ``.pth`` released by the authors' Lite-DINO, IDEA-Research/DINO,
            fundamentalvision/Deformable-DETR (two-stage) or HDETR/H-Deformable-DETR (state dict bare or
            under ``model``, EMA or not), or a litedetr model file.
        preset: a preset of the checkpoint's family: the one it was trained as (e.g. ``deformable-detr-r50``),
            or a Lite preset of its family to start from a standard-encoder checkpoint.
        class_names: the class map: the detector's classes, each taking the checkpoint's row of the same
            name (others start fresh; see the module). None: the checkpoint's own classes, every row
            loaded (a released 91-row COCO head gets COCO's names and category ids).
        weights: of a checkpoint holding both, the EMA (``auto``, ``ema``) or the model weights (``model``).
        device: where the model goes.
        overrides: :class:`~litedetr.models.DetectorConfig` fields to change in ``preset``.

    Raises:
        ConversionError: the checkpoint fits no known layout, is of another family, or does not fit the preset (keys named).
        ValueError: the file is missing or unreadable, or it is a training checkpoint.
    """
    path = _checkpoint_file(path)
    if class_names is not None:
        names = tuple(class_names)
        model = Detector(get_config(preset, **{"num_classes": len(names), "class_names": names, **overrides}))
        init_from_checkpoint(model, path, weights)
    elif path.suffix == ".safetensors":  # the file's own classes, every row by name (or one to one when unnamed)
        own = read_config(path)
        classes = {"num_classes": own.num_classes, "class_names": own.class_names, "category_ids": own.category_ids}
        model = Detector(get_config(preset, **{**classes, **overrides}))
        init_from_checkpoint(model, path, weights)
    else:
        config, state, layout = read_official_checkpoint(path, preset, weights, **overrides)
        model = Detector(config)
        load_official_state_dict(model, state, layout=layout)
        logger.info("loaded %s (%s layout, %d tensors) as %s", path, layout, len(state), preset)
    return model.to(device).eval()


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
