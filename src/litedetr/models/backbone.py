"""Backbones that turn images into the C3, C4, C5 feature maps (strides 8, 16, 32).

A backbone starts from random weights, from a local weights file, or from its published ImageNet
weights (``weights="imagenet"``): torchvision's ``IMAGENET1K_V1`` for the ResNets and timm's
``swin_tiny_patch4_window7_224.ms_in1k`` for Swin-T, cached in torch hub's checkpoints folder
(``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``) and downloaded
there only when absent (:func:`fetch_imagenet_weights`).
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
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from litedetr.models.state_dict import fit_problems

__all__ = [
    "level_sizes",
    "ResNetBackbone",
    "SwinBackbone",
    "build_backbone",
    "BACKBONES",
    "IMAGENET",
    "ImageNetWeights",
    "WeightsUnavailable",
    "imagenet_weights",
    "fetch_imagenet_weights",
    "backbone_weights_file",
]

logger = logging.getLogger(__name__)

_RESNET_CHANNELS = {
    "resnet18": (128, 256, 512),
    "resnet34": (128, 256, 512),
    "resnet50": (512, 1024, 2048),
    "resnet101": (512, 1024, 2048),
}
_SWIN_NAMES = {"swin_t": "swin_tiny_patch4_window7_224"}
BACKBONES = (*_RESNET_CHANNELS, *_SWIN_NAMES)
"""Names accepted by :func:`build_backbone`."""

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
    if name in _RESNET_CHANNELS:
        weights = torchvision.models.get_model_weights(name)["IMAGENET1K_V1"]
        return ImageNetWeights(f"torchvision {type(weights).__name__}.IMAGENET1K_V1", weights.url, os.path.basename(urlparse(weights.url).path))
    if name in _SWIN_NAMES:
        from huggingface_hub import hf_hub_url  # a dependency of timm

        tag = f"{_SWIN_NAMES[name]}.ms_in1k"
        repo = _import_timm().models.get_pretrained_cfg(tag).hf_hub_id
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


def _log_loaded(name: str, weights: str | os.PathLike[str], path: Path) -> None:
    what = imagenet_weights(name).description if str(weights) == IMAGENET else "weights"
    logger.info("%s backbone: loaded %s from %s", name, what, path)


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


def _check_fits(module: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Raise ``ValueError`` naming every missing, unexpected or mis-shaped key."""
    problems = fit_problems(module, state_dict)
    if problems:
        raise ValueError(f"{source} does not fit {type(module).__name__}:\n  " + "\n  ".join(problems))


def level_sizes(height: int, width: int, n_levels: int) -> list[tuple[int, int]]:
    """``(H, W)`` of each of the encoder's ``n_levels`` levels (strides 8, 16, 32, then the input stage's extra
    stride-2 levels) for an image of ``height x width``, as the backbones and the input stage compute them:
    every stride-2 step (ResNet's stem, pooling and stages; the extra levels' 3x3 convolution) rounds up."""
    sizes, h, w = [], height, width
    for _ in range(3):  # to stride 8
        h, w = -(-h // 2), -(-w // 2)
    for _ in range(n_levels):
        sizes.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    return sizes


class ResNetBackbone(nn.Module):
    """torchvision ResNet; by default with frozen batch norm and the stem and ``layer1`` frozen, as in DETR.

    Args:
        name: ``resnet18``, ``resnet34``, ``resnet50`` or ``resnet101``.
        weights: ``None`` (random init), ``"imagenet"`` (torchvision's ``IMAGENET1K_V1``, see
            :func:`fetch_imagenet_weights`) or a local file holding a torchvision ImageNet state dict
            of the same architecture (its ``fc.*`` classifier entries are ignored).
        trainable_norm: ordinary batch norm and every layer trained: for training from scratch,
            where frozen statistics of a random network would leave the features unnormalised.

    Attributes:
        out_channels: channels of C3, C4, C5.
        strides: ``(8, 16, 32)``.
    """

    strides: tuple[int, ...] = (8, 16, 32)

    def __init__(self, name: str = "resnet50", weights: str | os.PathLike[str] | None = None, trainable_norm: bool = False) -> None:
        super().__init__()
        if name not in _RESNET_CHANNELS:
            raise ValueError(f"unknown ResNet {name!r}; choose one of {sorted(_RESNET_CHANNELS)}")
        self.out_channels: tuple[int, ...] = _RESNET_CHANNELS[name]
        body = getattr(torchvision.models, name)(weights=None, norm_layer=nn.BatchNorm2d if trainable_norm else FrozenBatchNorm2d)
        del body.fc, body.avgpool
        path = backbone_weights_file(name, weights)
        if path is not None:
            self._load(body, path)
            _log_loaded(name, weights, path)
        self.body = body
        if not trainable_norm:
            self._freeze_stem_and_layer1()

    @staticmethod
    def _load(body: nn.Module, path: Path) -> None:
        """Load all but the classifier; batch norm's step counters (trainable norm only) stay the model's own."""
        counters = {k: v for k, v in body.state_dict().items() if k.endswith("num_batches_tracked")}
        state_dict = _load_weights_file(path)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")} | counters
        _check_fits(body, state_dict, str(path))
        body.load_state_dict(state_dict)

    def _freeze_stem_and_layer1(self) -> None:
        for name, parameter in self.body.named_parameters():
            if not name.startswith(("layer2.", "layer3.", "layer4.")):
                parameter.requires_grad_(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``(B, 3, H, W)`` -> ``[C3 (B, out_channels[0], H/8, W/8), C4 (.., H/16, ..), C5 (.., H/32, ..)]``."""
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(images))))
        c2 = b.layer1(x)
        c3 = b.layer2(c2)
        c4 = b.layer3(c3)
        c5 = b.layer4(c4)
        return [c3, c4, c5]


def _import_timm():
    try:
        import timm
    except ImportError as err:
        raise ImportError("SwinBackbone needs the optional dependency timm: pip install timm") from err
    return timm


class SwinBackbone(nn.Module):
    """Swin Transformer (tiny) from ``timm``: its last three stages as C3, C4, C5 in NCHW.

    The input is zero-padded at the bottom and right to a multiple of the patch size (4), so any
    image size works; map sizes are then ``ceil(H / stride)``.

    Args:
        name: ``swin_t``.
        weights: ``None`` (random init), ``"imagenet"`` (timm's ``swin_tiny_patch4_window7_224.ms_in1k``,
            see :func:`fetch_imagenet_weights`) or a local file holding a state dict of timm's
            ``swin_tiny_patch4_window7_224`` classifier, or of the original Swin release, which timm's
            checkpoint filter converts (``head.*`` and the final ``norm.*`` entries are ignored).

    Attributes:
        out_channels: ``(192, 384, 768)``.
        strides: ``(8, 16, 32)``.
    """

    strides: tuple[int, ...] = (8, 16, 32)
    patch_size: int = 4

    def __init__(self, name: str = "swin_t", weights: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        if name not in _SWIN_NAMES:
            raise ValueError(f"unknown Swin {name!r}; choose one of {sorted(_SWIN_NAMES)}")
        timm = _import_timm()
        self.body = timm.create_model(_SWIN_NAMES[name], pretrained=False, features_only=True, out_indices=(1, 2, 3), strict_img_size=False)
        self.out_channels: tuple[int, ...] = tuple(self.body.feature_info.channels())
        self._channels_last = getattr(self.body, "output_fmt", "NCHW") == "NHWC"
        path = backbone_weights_file(name, weights)
        if path is not None:
            self._load(_SWIN_NAMES[name], path)
            _log_loaded(name, weights, path)

    def _load(self, architecture: str, path: Path) -> None:
        """Convert with timm's checkpoint filter, rename the classifier's ``layers.N.`` to the feature
        extractor's ``layers_N.`` and load."""
        from timm.models.swin_transformer import checkpoint_filter_fn

        with torch.device("meta"):  # only the shapes of a classifier, for the filter
            classifier = _import_timm().create_model(architecture, pretrained=False)
        try:
            converted = checkpoint_filter_fn(_load_weights_file(path), classifier)
        except AttributeError as err:  # a relative position table of a block the model lacks
            raise ValueError(f"{path} does not fit {architecture}: {err}") from None
        state_dict = {_feature_key(k): v for k, v in converted.items() if not k.startswith(("head.", "norm."))}
        _check_fits(self.body, state_dict, str(path))
        self.body.load_state_dict(state_dict)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``(B, 3, H, W)`` -> ``[C3 (B, 192, H/8, W/8), C4 (B, 384, H/16, W/16), C5 (B, 768, H/32, W/32)]``."""
        h, w = images.shape[-2:]
        images = F.pad(images, (0, -w % self.patch_size, 0, -h % self.patch_size))
        features = self.body(images)
        if self._channels_last:
            features = [feature.permute(0, 3, 1, 2).contiguous() for feature in features]
        return features


def _feature_key(key: str) -> str:
    if key.startswith("layers."):
        stage, rest = key[len("layers.") :].split(".", 1)
        return f"layers_{stage}.{rest}"
    return key


def build_backbone(name: str, weights: str | os.PathLike[str] | None = None, trainable_norm: bool = False) -> ResNetBackbone | SwinBackbone:
    """Backbone by name (one of :data:`BACKBONES`).

    ``weights``: ``None`` (random init), ``"imagenet"`` (the published ImageNet weights, from the
    cache or downloaded: :func:`fetch_imagenet_weights`) or a local weights file.
    ``trainable_norm`` (ResNets only) trains batch norm and every layer, for training from scratch.
    """
    if name in _RESNET_CHANNELS:
        return ResNetBackbone(name, weights, trainable_norm)
    if trainable_norm:
        raise ValueError(f"backbone_trainable_norm applies to ResNets, not {name!r} (Swin uses layer norm, always trained)")
    if name in _SWIN_NAMES:
        return SwinBackbone(name, weights)
    raise ValueError(f"unknown backbone {name!r}; choose one of {list(BACKBONES)}")
