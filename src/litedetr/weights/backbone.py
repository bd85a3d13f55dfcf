"""Backbone weights: a backbone's published ImageNet weights (cached, downloaded when absent) or a local file.

``"imagenet"`` names torchvision's ``IMAGENET1K_V1`` for the ResNets and timm's
``swin_tiny_patch4_window7_224.ms_in1k`` for Swin-T, cached in torch hub's checkpoints folder
(``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``) and downloaded there
only when absent (:func:`fetch_imagenet_weights`). :func:`load_backbone_weights` reads either into a
:class:`~litedetr.models.backbone.ResNetBackbone` or :class:`~litedetr.models.backbone.SwinBackbone`.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

from litedetr.models.backbone import BACKBONES, RESNET_CHANNELS, SWIN_ARCHITECTURES, ResNetBackbone, SwinBackbone, import_timm
from litedetr.weights.state_dict import load_strictly

__all__ = [
    "IMAGENET",
    "ImageNetWeights",
    "WeightsUnavailable",
    "imagenet_weights",
    "fetch_imagenet_weights",
    "backbone_weights_file",
    "load_backbone_weights",
]

logger = logging.getLogger(__name__)

IMAGENET = "imagenet"
"""The ``weights`` value that names a backbone's published ImageNet weights."""

DOWNLOAD_TIMEOUT_S = 30
"""Seconds a download may wait for a connection or for data before it fails."""


class WeightsUnavailable(ValueError):
    """ImageNet weights are not cached and could not be downloaded; the message says what to put where."""


@dataclass(frozen=True)
class ImageNetWeights:
    """A backbone's published ImageNet weights.

    Attributes:
        description: which weights, e.g. ``torchvision ResNet50_Weights.IMAGENET1K_V1``.
        url: where they are downloaded from.
        file_name: their name in the cache folder (a ``-<sha256 prefix>.`` in it is checked on download).
    """

    description: str
    url: str
    file_name: str

    @property
    def path(self) -> Path:
        """The cached file: ``<torch.hub.get_dir()>/checkpoints/<file_name>`` (follows ``TORCH_HOME``)."""
        return Path(torch.hub.get_dir()) / "checkpoints" / self.file_name


def imagenet_weights(name: str) -> ImageNetWeights:
    """The ImageNet weights of backbone ``name`` (one of :data:`BACKBONES`), as its library publishes them."""
    if name in RESNET_CHANNELS:
        weights = torchvision.models.get_model_weights(name)["IMAGENET1K_V1"]
        return ImageNetWeights(f"torchvision {type(weights).__name__}.IMAGENET1K_V1", weights.url, os.path.basename(urlparse(weights.url).path))
    if name in SWIN_ARCHITECTURES:
        from huggingface_hub import hf_hub_url  # a dependency of timm

        tag = f"{SWIN_ARCHITECTURES[name]}.ms_in1k"
        repo = import_timm().models.get_pretrained_cfg(tag).hf_hub_id
        return ImageNetWeights(f"timm {tag}", hf_hub_url(repo, "model.safetensors"), f"{tag}.safetensors")
    raise ValueError(f"unknown backbone {name!r}; choose one of {list(BACKBONES)}")


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Sockets opened inside time out after ``seconds`` of silence (a dead network fails, a slow one goes on)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def fetch_imagenet_weights(name: str) -> Path:
    """The cached file of backbone ``name``'s ImageNet weights, downloaded first when it is absent.

    Raises:
        WeightsUnavailable: the download failed (no network, a wrong hash, ...); one line naming the
            URL and the file to save it as.
    """
    weights = imagenet_weights(name)
    path = weights.path
    if path.is_file():
        return path
    logger.info("downloading %s (%s) from %s to %s", weights.description, name, weights.url, path)
    expected_hash = torch.hub.HASH_REGEX.search(weights.file_name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            torch.hub.download_url_to_file(weights.url, str(path), expected_hash.group(1) if expected_hash else None, progress=True)
    except (OSError, RuntimeError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or err
        raise WeightsUnavailable(
            f"{name}: the ImageNet weights are not in the cache and the download failed ({reason}); "
            f"download {weights.url} and save it as {path}, or give that file's path instead of {IMAGENET!r}"
        ) from None
    return path


def backbone_weights_file(name: str, weights: str | os.PathLike[str] | None) -> Path | None:
    """The local file that ``weights`` names for backbone ``name``.

    ``None``: none (random initialisation); ``"imagenet"``: the cached ImageNet weights
    (:func:`fetch_imagenet_weights`, which downloads them when absent); anything else: a path.

    Raises:
        ValueError: ``weights`` is neither ``"imagenet"`` nor an existing file.
        WeightsUnavailable: ImageNet weights neither cached nor downloadable.
    """
    if weights is None:
        return None
    if str(weights) == IMAGENET:
        return fetch_imagenet_weights(name)
    if not Path(weights).is_file():
        raise ValueError(f"backbone weights {str(weights)!r}: neither {IMAGENET!r} nor an existing file")
    return Path(weights)


def _load_weights_file(weights_path: Path) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save`` file."""
    if weights_path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(weights_path)
    state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        kind = type(state_dict).__name__
        raise ValueError(f"{weights_path}: expected a state dict (a mapping of names to tensors), got {kind}")
    return dict(state_dict)


def _load_resnet(body: nn.Module, path: Path) -> None:
    """A torchvision ResNet state dict into ``body``: all but the classifier (``fc.*``); batch norm's step
    counters (trainable norm only) stay the model's own."""
    counters = {k: v for k, v in body.state_dict().items() if k.endswith("num_batches_tracked")}
    state_dict = _load_weights_file(path)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")} | counters
    load_strictly(body, state_dict, context=f"{path} does not fit {type(body).__name__}:")


def _feature_key(key: str) -> str:
    if key.startswith("layers."):
        stage, rest = key[len("layers.") :].split(".", 1)
        return f"layers_{stage}.{rest}"
    return key


def _load_swin(body: nn.Module, architecture: str, path: Path) -> None:
    """A state dict of timm's Swin classifier, or of the original Swin release, into the feature extractor
    ``body``: converted by timm's checkpoint filter, the classifier's ``layers.N.`` renamed to ``layers_N.``,
    ``head.*`` and the final ``norm.*`` left out."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    with torch.device("meta"):  # only the shapes of a classifier, for the filter
        classifier = import_timm().create_model(architecture, pretrained=False)
    try:
        converted = checkpoint_filter_fn(_load_weights_file(path), classifier)
    except AttributeError as err:  # a relative position table of a block the model lacks
        raise ValueError(f"{path} does not fit {architecture}: {err}") from None
    state_dict = {_feature_key(k): v for k, v in converted.items() if not k.startswith(("head.", "norm."))}
    load_strictly(body, state_dict, context=f"{path} does not fit {type(body).__name__}:")


def load_backbone_weights(backbone: ResNetBackbone | SwinBackbone, weights: str | os.PathLike[str]) -> Path:
    """Load ``weights`` into ``backbone``: ``"imagenet"`` (the published ImageNet weights, from the cache or
    downloaded: :func:`fetch_imagenet_weights`) or a local file of a torchvision ResNet state dict of the same
    architecture, or of timm's ``swin_tiny_patch4_window7_224`` classifier (or the original Swin release).
    The file it read.

    Raises:
        ValueError: ``weights`` is neither ``"imagenet"`` nor an existing file, or the file does not fit (keys named).
        WeightsUnavailable: ImageNet weights neither cached nor downloadable.
    """
    path = backbone_weights_file(backbone.name, weights)
    if isinstance(backbone, SwinBackbone):
        _load_swin(backbone.body, SWIN_ARCHITECTURES[backbone.name], path)
    else:
        _load_resnet(backbone.body, path)
    what = imagenet_weights(backbone.name).description if str(weights) == IMAGENET else "weights"
    logger.info("%s backbone: loaded %s from %s", backbone.name, what, path)
    return path
