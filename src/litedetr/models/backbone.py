"""Backbones that turn images into the C3, C4, C5 feature maps (strides 8, 16, 32).

A backbone is built with random weights; :func:`litedetr.weights.backbone.load_backbone_weights`
loads its published ImageNet weights or a local weights file into it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["level_sizes", "ResNetBackbone", "SwinBackbone", "build_backbone", "BACKBONES", "RESNET_CHANNELS", "SWIN_ARCHITECTURES", "import_timm"]

RESNET_CHANNELS = {
    "resnet18": (128, 256, 512),
    "resnet34": (128, 256, 512),
    "resnet50": (512, 1024, 2048),
    "resnet101": (512, 1024, 2048),
}
"""Channels of C3, C4, C5 of each ResNet."""
SWIN_ARCHITECTURES = {"swin_t": "swin_tiny_patch4_window7_224"}
"""timm's architecture of each Swin."""
BACKBONES = (*RESNET_CHANNELS, *SWIN_ARCHITECTURES)
"""Names accepted by :func:`build_backbone`."""


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


def conv_frozen_norm(x: Tensor, conv: nn.Conv2d, norm: FrozenBatchNorm2d) -> Tensor:
    """``norm(conv(x))`` as one convolution: the frozen batch norm's per-channel scale folded into the
    convolution's weights (computed on every call, so the module's parameters and checkpoints stay as
    they are, and gradients reach the weights), its shift as the bias. The same result up to float
    rounding, without two element-wise passes over the output (and, under autocast, their casts); the
    weights are handed to the convolution channels-last, the layout oneDNN runs fastest on the CPU."""
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    weight = (conv.weight * scale[:, None, None, None]).contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, weight, norm.bias - norm.running_mean * scale, conv.stride, conv.padding, conv.dilation, conv.groups)


def _folded_block(block: BasicBlock | Bottleneck, x: Tensor) -> Tensor:
    """A torchvision residual block with its frozen batch norms folded (:func:`conv_frozen_norm`)."""
    out = F.relu(conv_frozen_norm(x, block.conv1, block.bn1), inplace=True)
    if isinstance(block, Bottleneck):
        out = F.relu(conv_frozen_norm(out, block.conv2, block.bn2), inplace=True)
        out = conv_frozen_norm(out, block.conv3, block.bn3)
    else:
        out = conv_frozen_norm(out, block.conv2, block.bn2)
    identity = x if block.downsample is None else conv_frozen_norm(x, block.downsample[0], block.downsample[1])
    return F.relu(out + identity, inplace=True)


class ResNetBackbone(nn.Module):
    """torchvision ResNet; by default with frozen batch norm and the stem and ``layer1`` frozen, as in DETR.

    With frozen batch norm each norm is folded into the convolution before it on every call
    (:func:`conv_frozen_norm`; the parameters are unchanged) and the maps are channels-last (timings
    in the README's notes on the training step).

    Args:
        name: ``resnet18``, ``resnet34``, ``resnet50`` or ``resnet101``.
        trainable_norm: ordinary batch norm and every layer trained: for training from scratch,
            where frozen statistics of a random network would leave the features unnormalised.

    Attributes:
        name: the ResNet's name.
        body: torchvision's ResNet without its classifier (``avgpool``, ``fc``).
        out_channels: channels of C3, C4, C5.
        strides: ``(8, 16, 32)``.
    """

    strides: tuple[int, ...] = (8, 16, 32)

    def __init__(self, name: str = "resnet50", trainable_norm: bool = False) -> None:
        super().__init__()
        if name not in RESNET_CHANNELS:
            raise ValueError(f"unknown ResNet {name!r}; choose one of {sorted(RESNET_CHANNELS)}")
        self.name = name
        self.out_channels: tuple[int, ...] = RESNET_CHANNELS[name]
        body = getattr(torchvision.models, name)(weights=None, norm_layer=nn.BatchNorm2d if trainable_norm else FrozenBatchNorm2d)
        del body.fc, body.avgpool
        self.body = body
        if not trainable_norm:
            self._freeze_stem_and_layer1()

    def _freeze_stem_and_layer1(self) -> None:
        for name, parameter in self.body.named_parameters():
            if not name.startswith(("layer2.", "layer3.", "layer4.")):
                parameter.requires_grad_(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``(B, 3, H, W)`` -> ``[C3 (B, out_channels[0], H/8, W/8), C4 (.., H/16, ..), C5 (.., H/32, ..)]``."""
        b = self.body
        if not isinstance(b.bn1, FrozenBatchNorm2d):
            x = b.maxpool(b.relu(b.bn1(b.conv1(images))))
            c2 = b.layer1(x)
            c3 = b.layer2(c2)
            c4 = b.layer3(c3)
            return [c3, c4, b.layer4(c4)]
        x = images.contiguous(memory_format=torch.channels_last)
        x = b.maxpool(F.relu(conv_frozen_norm(x, b.conv1, b.bn1), inplace=True))
        features = []
        for layer in (b.layer1, b.layer2, b.layer3, b.layer4):
            for block in layer:
                x = _folded_block(block, x)
            features.append(x)
        return features[1:]


def import_timm():
    """The optional dependency timm, or an ImportError saying how to install it."""
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

    Attributes:
        name: the Swin's name.
        body: timm's feature extractor of its last three stages.
        out_channels: ``(192, 384, 768)``.
        strides: ``(8, 16, 32)``.
    """

    strides: tuple[int, ...] = (8, 16, 32)
    patch_size: int = 4

    def __init__(self, name: str = "swin_t") -> None:
        super().__init__()
        if name not in SWIN_ARCHITECTURES:
            raise ValueError(f"unknown Swin {name!r}; choose one of {sorted(SWIN_ARCHITECTURES)}")
        self.name = name
        self.body = import_timm().create_model(SWIN_ARCHITECTURES[name], pretrained=False, features_only=True, out_indices=(1, 2, 3), strict_img_size=False)
        self.out_channels: tuple[int, ...] = tuple(self.body.feature_info.channels())
        self._channels_last = getattr(self.body, "output_fmt", "NCHW") == "NHWC"

    def forward(self, images: Tensor) -> list[Tensor]:
        """``(B, 3, H, W)`` -> ``[C3 (B, 192, H/8, W/8), C4 (B, 384, H/16, W/16), C5 (B, 768, H/32, W/32)]``."""
        h, w = images.shape[-2:]
        images = F.pad(images, (0, -w % self.patch_size, 0, -h % self.patch_size))
        features = self.body(images)
        if self._channels_last:
            features = [feature.permute(0, 3, 1, 2).contiguous() for feature in features]
        return features


def build_backbone(name: str, trainable_norm: bool = False) -> ResNetBackbone | SwinBackbone:
    """Backbone by name (one of :data:`BACKBONES`), with random weights.

    ``trainable_norm`` (ResNets only) trains batch norm and every layer, for training from scratch.
    """
    if name in RESNET_CHANNELS:
        return ResNetBackbone(name, trainable_norm)
    if trainable_norm:
        raise ValueError(f"backbone_trainable_norm applies to ResNets, not {name!r} (Swin uses layer norm, always trained)")
    if name in SWIN_ARCHITECTURES:
        return SwinBackbone(name)
    raise ValueError(f"unknown backbone {name!r}; choose one of {list(BACKBONES)}")
