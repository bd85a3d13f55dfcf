"""litedetr's model files: safetensors weights with the config as JSON in the file's metadata (no pickled code).

Files of format 1 (litedetr before 0.2) are read under today's names (:data:`~litedetr.weights.keys.FORMAT_1_RULES`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from litedetr.models.config import DetectorConfig, config_from_dict
from litedetr.weights.keys import FORMAT_1_RULES, rename_official

__all__ = ["save_model", "atomic_write", "read_config", "read_model_file", "CONFIG_KEY", "FORMAT_VERSION"]

CONFIG_KEY = "litedetr_config"
FORMAT_KEY = "litedetr_format"
FORMAT_VERSION = "2"
"""2: the detector as parts (``query_selection``, ``heads``, ``training_queries``); 1: DINO's names at the top level."""


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
    return rename_official(state, FORMAT_1_RULES)


def read_model_file(path: str | os.PathLike) -> tuple[DetectorConfig, dict[str, torch.Tensor]]:
    """The config and the state dict (under today's names) of a litedetr model file."""
    metadata = _metadata(path)
    config = config_from_dict(json.loads(metadata[CONFIG_KEY]))
    return config, _upgrade(path, metadata.get(FORMAT_KEY, "1"), config, load_file(str(path), device="cpu"))
