"""Model files: safetensors weights with the config as JSON in the file's metadata (no pickled code).

Also reads the original code bases' released ``.pth`` checkpoints (the state dict under ``model``)
and checks them against a preset. Building the detector from what is read is
:mod:`litedetr.models.detector`'s (this module does not import it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from litedetr.models.coco_classes import COCO_NUM_CLASSES, coco_class_names
from litedetr.models.config import DetectorConfig, config_from_dict, get_config
from litedetr.models.convert import ConversionError, detect_layout, rename_official
from litedetr.models.families import LAYOUTS, layout_family

__all__ = [
    "save_model", "atomic_write", "read_config", "read_model_file", "read_official_checkpoint", "read_official_state",
    "is_training_checkpoint", "check_decoder_depth",
    "WEIGHTS",
    "CONFIG_KEY",
]  # fmt: skip

logger = logging.getLogger(__name__)

CONFIG_KEY = "litedetr_config"
FORMAT_KEY = "litedetr_format"
FORMAT_VERSION = "2"
"""2: the detector as parts (``query_selection``, ``heads``, ``training_queries``); 1: DINO's names at the top level."""

_V1_NAMES = [
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
"""Format 1's names -> format 2's (format 1 wrote DINO-family files with these names)."""


def save_model(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a :class:`~litedetr.models.Detector`'s weights and config to ``path`` (safetensors), atomically (temp file + rename)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {CONFIG_KEY: json.dumps(model.config.to_dict()), FORMAT_KEY: FORMAT_VERSION}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it to ``path``: a crash leaves any
    old file whole. The file gets the mode a plain ``open`` would give it (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _metadata(path: str | os.PathLike) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a litedetr model file (safetensors): {err}") from None
    if CONFIG_KEY not in metadata:
        raise ValueError(f"{path}: safetensors file without a litedetr config (was it written by litedetr?)")
    return metadata


def read_config(path: str | os.PathLike) -> DetectorConfig:
    """The config stored in a litedetr model file."""
    return config_from_dict(json.loads(_metadata(path)[CONFIG_KEY]))


def _upgrade(path: str | os.PathLike, version: str, config: DetectorConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of an older format under today's names."""
    if version == FORMAT_VERSION:
        return state
    if version != "1":
        raise ValueError(f"{path}: model file format {version!r}, this litedetr reads {FORMAT_VERSION} and 1; upgrade litedetr")
    if config.family != "dino":
        raise ValueError(
            f"{path}: a {config.family} model written by litedetr before 0.2, whose {config.family} was not the original "
            "architecture (DINO's decoder); its weights do not carry over: train it again"
        )
    return rename_official(state, _V1_NAMES)


def read_model_file(path: str | os.PathLike) -> tuple[DetectorConfig, dict[str, torch.Tensor]]:
    """The config and the state dict (under today's names) of a litedetr model file."""
    metadata = _metadata(path)
    config = config_from_dict(json.loads(metadata[CONFIG_KEY]))
    return config, _upgrade(path, metadata.get(FORMAT_KEY, "1"), config, load_file(str(path), device="cpu"))


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
    """Refuse, by name, a model whose decoder depth differs from the checkpoint's.

    The depth is read from the class heads: ``class_embed.0 .. N`` is one per decoder layer in DINO
    and Lite-DINO, and one more (the proposals') in two-stage Deformable DETR and H-DETR.
    """
    heads = [int(m.group(1)) for key in state if (m := re.fullmatch(r"class_embed\.(\d+)\.weight", key))]
    if not heads:
        return
    depth = max(heads) + (1 if layout_family(layout).code_base == "dino" else 0)
    if depth != decoder_layers:
        raise ConversionError(
            f"{path}: the checkpoint's decoder has {depth} layers (class_embed.0-{max(heads)}), the model {decoder_layers}; set num_decoder_layers={depth}"
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
