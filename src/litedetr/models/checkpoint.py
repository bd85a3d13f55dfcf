"""Model files: safetensors weights with the config as JSON in the file's metadata (no pickled code).

Also reads the authors' released ``.pth`` checkpoints (the state dict under ``model``) through the
name conversion in :mod:`litedetr.models.convert`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from litedetr.models.config import DetectorConfig, config_from_dict, get_config
from litedetr.models.convert import ConversionError, load_official_state_dict
from litedetr.models.detector import Detector
from litedetr.models.state_dict import fit_problems

__all__ = ["save_model", "load_model", "read_config", "load_official_checkpoint", "convert_official_checkpoint", "CONFIG_KEY"]

logger = logging.getLogger(__name__)

CONFIG_KEY = "litedetr_config"
FORMAT_KEY = "litedetr_format"
FORMAT_VERSION = "1"


def save_model(model: Detector, path: str | os.PathLike) -> Path:
    """Write ``model``'s weights and config to ``path`` (safetensors), atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {CONFIG_KEY: json.dumps(model.config.to_dict()), FORMAT_KEY: FORMAT_VERSION}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_config(path: str | os.PathLike) -> DetectorConfig:
    """The config stored in a litedetr model file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a litedetr model file (safetensors): {err}") from None
    if CONFIG_KEY not in metadata:
        raise ValueError(f"{path}: safetensors file without a litedetr config (was it written by litedetr?)")
    return config_from_dict(json.loads(metadata[CONFIG_KEY]))


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> Detector:
    """Build the detector a model file describes and load its weights (strictly, naming any mismatch)."""
    config = read_config(path)
    model = Detector(config)
    state = load_file(str(path), device="cpu")
    problems = fit_problems(model, state)
    if problems:
        raise ValueError(f"{path}: the weights do not fit the file's own config\n" + "\n".join(problems))
    model.load_state_dict(state)
    return model.to(device).eval()


def _read_official(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an authors' checkpoint (``{"model": state_dict, ...}`` or a bare state dict)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict with the state dict under 'model'")
    return state


def load_official_checkpoint(path: str | os.PathLike, preset: str, device: str | torch.device = "cpu", **overrides) -> Detector:
    """Build ``preset`` and load an authors' Lite-DINO checkpoint into it (names converted).

    Raises:
        ConversionError: the checkpoint does not fit the preset (keys named).
    """
    state = _read_official(path)
    config = get_config(preset, **overrides)
    class_weight = state.get("class_embed.0.weight")
    if class_weight is not None and class_weight.shape[0] != config.num_classes:
        raise ConversionError(
            f"{path}: the checkpoint has {class_weight.shape[0]} classes, preset {preset!r} {config.num_classes}; pass num_classes"
        )
    model = Detector(config)
    load_official_state_dict(model, state)
    logger.info("loaded %s (%d tensors) as %s", path, len(state), preset)
    return model.to(device).eval()


def convert_official_checkpoint(path: str | os.PathLike, preset: str, out: str | os.PathLike, **overrides) -> Detector:
    """Convert an authors' Lite-DINO checkpoint into a litedetr model file for ``preset``.

    Raises:
        ConversionError: the checkpoint does not fit the preset (keys named).
    """
    model = load_official_checkpoint(path, preset, **overrides)
    save_model(model, out)
    logger.info("wrote %s", out)
    return model
