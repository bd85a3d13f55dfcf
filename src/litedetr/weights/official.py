"""The original code bases' released ``.pth`` checkpoints: unwrapping their state dict (model or EMA,
bare or DDP-wrapped), recognising their layout, and checking them against a preset.

Their keys are renamed to ours by the tables in :mod:`litedetr.weights.keys` and loaded by :mod:`litedetr.weights.loading`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import Any

import torch

from litedetr.models.config import DetectorConfig, get_config
from litedetr.models.families import LAYOUTS, layout_family
from litedetr.weights.classes import COCO_NUM_CLASSES, coco_class_names
from litedetr.weights.keys import detect_layout, official_decoder_depth
from litedetr.weights.state_dict import ConversionError

__all__ = [
    "WEIGHTS", "TRAINING_CHECKPOINT_HINT",
    "is_training_checkpoint", "read_official_state", "check_decoder_depth", "read_official_checkpoint",
]  # fmt: skip

logger = logging.getLogger(__name__)

TRAINING_CHECKPOINT_HINT = "a litedetr training checkpoint (for `train --resume`): load the model.safetensors its run wrote beside it"


def _training_checkpoint(checkpoint: Any) -> bool:
    return isinstance(checkpoint, dict) and "train_config" in checkpoint and "model" in checkpoint


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a litedetr run's ``checkpoint.pt`` (read memory-mapped, tensors untouched)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return _training_checkpoint(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    except Exception:  # not a torch file, or one this reader cannot map: not ours
        return False


WEIGHTS = ("auto", "ema", "model")
"""Which weights of a checkpoint that holds both a model and its EMA: ``auto`` (the EMA), or either one."""
_MODEL_KEYS = ("model", "state_dict")
_EMA_KEYS = ("ema_model", "model_ema", "ema", "state_dict_ema")


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _unwrap(path: str | os.PathLike, checkpoint: Any, weights: str) -> dict[str, torch.Tensor]:
    """The state dict ``weights`` picks from a checkpoint as people save them: bare, or under ``model`` /
    ``state_dict`` and an EMA's ``ema_model`` / ``model_ema`` / ``ema`` / ``state_dict_ema``, with or
    without DDP's ``module.`` prefix. Says which one was read."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if _is_state_dict(checkpoint):
        found, key = {"": checkpoint}, ""
    elif isinstance(checkpoint, dict):
        found = {k: checkpoint[k] for k in (*_EMA_KEYS, *_MODEL_KEYS) if _is_state_dict(checkpoint.get(k))}
        ema = [k for k in _EMA_KEYS if k in found]
        model = [k for k in _MODEL_KEYS if k in found]
        wanted = {"auto": ema + model, "ema": ema, "model": model}[weights]
        if not wanted:
            kind = {"ema": "EMA weights", "model": "model weights"}.get(weights, "state dict")
            searched = ", ".join(_EMA_KEYS if weights == "ema" else _MODEL_KEYS + _EMA_KEYS)
            raise ValueError(f"{path}: no {kind} under any of {searched}; its keys: {', '.join(map(str, list(checkpoint)[:8]))}")
        key = wanted[0]
        if ema and model:
            other = "model" if key in ema else "ema"
            logger.info("%s: read the weights under %r (it also holds %r; weights=%r picks those)", path, key, (model if other == "model" else ema)[0], other)
        elif key not in ("model", ""):
            logger.info("%s: read the weights under %r", path, key)
    else:
        raise ValueError(f"{path}: expected a state dict, or a dict holding one under {', '.join(_MODEL_KEYS + _EMA_KEYS)}")
    state = found[key]
    if all(k.startswith("module.") for k in state):  # saved from a DDP- or EMA-wrapped model
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _read_official(path: str | os.PathLike, weights: str = "auto") -> dict[str, torch.Tensor]:
    """The state dict of an authors' checkpoint (see :func:`_unwrap` for the wrappers and ``weights``)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if _training_checkpoint(checkpoint):
        raise ValueError(f"{path}: {TRAINING_CHECKPOINT_HINT}, not an original code base's checkpoint")
    return _unwrap(path, checkpoint, weights)


def read_official_state(path: str | os.PathLike, weights: str = "auto") -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of a checkpoint of an original code base (under its own names) and its layout;
    ``weights``: the EMA or the model weights where it holds both (:data:`WEIGHTS`).

    Raises:
        ConversionError: the checkpoint fits none of :data:`~litedetr.models.families.LAYOUTS`.
    """
    state = _read_official(path, weights)
    layout = detect_layout(state)
    if layout is None:
        shown = ", ".join(list(state)[:8])
        raise ConversionError(
            f"{path}: not a checkpoint of a known layout ({', '.join(LAYOUTS)}): it has neither transformer.enc_out_class_embed.weight "
            f"(DINO, Lite-DINO) nor transformer.pos_trans.weight (two-stage Deformable DETR, H-DETR); its first keys: {shown}"
        )
    return state, layout


def check_decoder_depth(path: str | os.PathLike, state: dict[str, torch.Tensor], layout: str, decoder_layers: int) -> None:
    """Refuse, by name, a model whose decoder depth differs from the checkpoint's (:func:`~litedetr.weights.keys.official_decoder_depth`)."""
    found = official_decoder_depth(state, layout)
    if found is not None and found[0] != decoder_layers:
        depth, last = found
        raise ConversionError(
            f"{path}: the checkpoint's decoder has {depth} layers (class_embed.0-{last}), the model {decoder_layers}; set num_decoder_layers={depth}"
        )


def read_official_checkpoint(
    path: str | os.PathLike, preset: str, weights: str = "auto", **overrides: Any
) -> tuple[DetectorConfig, dict[str, torch.Tensor], str]:
    """The config of ``preset`` (with ``overrides``), the checkpoint's state dict and its layout.

    The checkpoint may be the authors' Lite-DINO, IDEA-Research/DINO, fundamentalvision/Deformable-DETR
    (two-stage) or HDETR/H-Deformable-DETR (two-stage); its layout must be of the preset's family.
    A 91-row class head (the released COCO checkpoints) gets COCO's names and category ids, unless
    ``overrides`` name the classes. ``weights``: see :func:`read_official_state`.

    Raises:
        ConversionError: the checkpoint fits no known layout, is of another family, or has another class count.
    """
    state, layout = read_official_state(path, weights)
    config = get_config(preset, **overrides)
    if layout_family(layout).name != config.family:
        raise ConversionError(f"{path}: a {layout} checkpoint, but preset {preset!r} is of the {config.family} family")
    check_decoder_depth(path, state, layout, config.num_decoder_layers)
    class_weight = state.get("class_embed.0.weight")
    if class_weight is not None and class_weight.shape[0] != config.num_classes:
        raise ConversionError(f"{path}: the checkpoint has {class_weight.shape[0]} classes, preset {preset!r} {config.num_classes}; pass num_classes")
    if class_weight is not None and class_weight.shape[0] == COCO_NUM_CLASSES and not config.class_names and not config.category_ids:
        # a released COCO checkpoint: its rows are COCO's category ids, so they name themselves
        config = dataclasses.replace(config, class_names=coco_class_names(), category_ids=tuple(range(COCO_NUM_CLASSES)))
    return config, state, layout
