"""Backbones that turn images into the C3, C4, C5 feature maps (strides 8, 16, 32).

Nothing here downloads weights: models start from random initialisation unless a local weights
file is given.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from litedetr.models.state_dict import fit_problems
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["ResNetBackbone", "SwinBackbone", "build_backbone", "BACKBONES"]

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


def _load_weights_file(weights_path: str) -> dict[str, Tensor]:
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


class ResNetBackbone(nn.Module):
    """torchvision ResNet; by default with frozen batch norm and the stem and ``layer1`` frozen, as in DETR.

    Args:
        name: ``resnet18``, ``resnet34``, ``resnet50`` or ``resnet101``.
        weights_path: optional local file holding a torchvision ImageNet state dict of the same
            architecture (its ``fc.*`` classifier entries are ignored). ``None``: random init.
        trainable_norm: ordinary batch norm and every layer trained: for training from scratch,
            where frozen statistics of a random network would leave the features unnormalised.

    Attributes:
        out_channels: channels of C3, C4, C5.
        strides: ``(8, 16, 32)``.
    """

    strides: tuple[int, ...] = (8, 16, 32)

    def __init__(self, name: str = "resnet50", weights_path: str | None = None, trainable_norm: bool = False) -> None:
        super().__init__()
        if name not in _RESNET_CHANNELS:
            raise ValueError(f"unknown ResNet {name!r}; choose one of {sorted(_RESNET_CHANNELS)}")
        self.out_channels: tuple[int, ...] = _RESNET_CHANNELS[name]
        body = getattr(torchvision.models, name)(weights=None, norm_layer=nn.BatchNorm2d if trainable_norm else FrozenBatchNorm2d)
        del body.fc, body.avgpool
        if weights_path is not None:
            self._load(body, weights_path)
        self.body = body
        if not trainable_norm:
            self._freeze_stem_and_layer1()

    @staticmethod
    def _load(body: nn.Module, weights_path: str) -> None:
        state_dict = _load_weights_file(weights_path)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
        _check_fits(body, state_dict, weights_path)
        body.load_state_dict(state_dict)
        logger.info("loaded ResNet weights from %s", weights_path)

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
        weights_path: optional local file holding the state dict of timm's
            ``swin_tiny_patch4_window7_224`` classifier (its ``head.*`` and final ``norm.*`` entries
            are ignored). ``None``: random init. timm is never asked for pretrained weights.

    Attributes:
        out_channels: ``(192, 384, 768)``.
        strides: ``(8, 16, 32)``.
    """

    strides: tuple[int, ...] = (8, 16, 32)
    patch_size: int = 4

    def __init__(self, name: str = "swin_t", weights_path: str | None = None) -> None:
        super().__init__()
        if name not in _SWIN_NAMES:
            raise ValueError(f"unknown Swin {name!r}; choose one of {sorted(_SWIN_NAMES)}")
        timm = _import_timm()
        self.body = timm.create_model(
            _SWIN_NAMES[name], pretrained=False, features_only=True, out_indices=(1, 2, 3), strict_img_size=False
        )
        self.out_channels: tuple[int, ...] = tuple(self.body.feature_info.channels())
        self._channels_last = getattr(self.body, "output_fmt", "NCHW") == "NHWC"
        if weights_path is not None:
            self._load(weights_path)

    def _load(self, weights_path: str) -> None:
        """Rename the classifier's ``layers.N.`` to the feature extractor's ``layers_N.`` and load."""
        state_dict = {
            _feature_key(k): v
            for k, v in _load_weights_file(weights_path).items()
            if not k.startswith(("head.", "norm."))
        }
        _check_fits(self.body, state_dict, weights_path)
        self.body.load_state_dict(state_dict)
        logger.info("loaded Swin weights from %s", weights_path)

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


def build_backbone(name: str, weights_path: str | None = None, trainable_norm: bool = False) -> ResNetBackbone | SwinBackbone:
    """Backbone by name (one of :data:`BACKBONES`), randomly initialised unless ``weights_path`` is given.

    ``trainable_norm`` (ResNets only) trains batch norm and every layer, for training from scratch.
    """
    if name in _RESNET_CHANNELS:
        return ResNetBackbone(name, weights_path, trainable_norm)
    if trainable_norm:
        raise ValueError(f"backbone_trainable_norm applies to ResNets, not {name!r} (Swin uses layer norm, always trained)")
    if name in _SWIN_NAMES:
        return SwinBackbone(name, weights_path)
    raise ValueError(f"unknown backbone {name!r}; choose one of {list(BACKBONES)}")
