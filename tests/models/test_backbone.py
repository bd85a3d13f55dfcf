"""Backbones: shapes, strides, frozen parts and batch norm (their weights: tests/weights/test_backbone_weights.py)."""

import sys

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from litedetr.models.backbone import ResNetBackbone, SwinBackbone, build_backbone


@pytest.fixture(scope="module")
def r18() -> ResNetBackbone:
    return ResNetBackbone("resnet18")


def test_resnet18_shapes_and_strides(r18):
    assert r18.out_channels == (128, 256, 512)
    assert r18.strides == (8, 16, 32)
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = r18(images)
    assert [f.shape for f in features] == [(2, c, 64 // s, 96 // s) for c, s in zip(r18.out_channels, r18.strides)]


def test_resnet50_channels_and_shapes():
    backbone = build_backbone("resnet50")
    assert isinstance(backbone, ResNetBackbone)
    assert backbone.out_channels == (512, 1024, 2048)
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == [512, 1024, 2048]
    assert [f.shape[-1] for f in features] == [8, 4, 2]


def test_resnet_uses_frozen_batch_norm_and_freezes_stem_and_layer1(r18):
    norms = [m for m in r18.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert norms and not any(isinstance(m, torch.nn.BatchNorm2d) for m in r18.modules())
    for name, parameter in r18.body.named_parameters():
        trainable = name.split(".")[0] in {"layer2", "layer3", "layer4"}
        assert parameter.requires_grad == trainable, name
    assert not hasattr(r18.body, "fc")


def test_resnet_frozen_params_get_no_gradient(r18):
    r18.zero_grad()
    sum(f.sum() for f in r18(torch.randn(1, 3, 32, 32))).backward()
    assert r18.body.conv1.weight.grad is None
    assert r18.body.layer1[0].conv1.weight.grad is None
    assert r18.body.layer2[0].conv1.weight.grad is not None


def _module_chain(backbone: ResNetBackbone, images: torch.Tensor) -> list[torch.Tensor]:
    """torchvision's own modules one after the other, frozen batch norms as separate ops: the reference."""
    b = backbone.body
    x = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(images)))))
    c3 = b.layer2(x)
    c4 = b.layer3(c3)
    return [c3, c4, b.layer4(c4)]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_folded_frozen_norms_give_the_module_chains_outputs_and_gradients(name):
    """The forward folds each frozen batch norm into its convolution (per call); with statistics far
    from the identity, outputs and every trainable weight's gradient match torchvision's modules in float64."""
    backbone = ResNetBackbone(name).double()
    g = torch.Generator().manual_seed(0)
    for norm in (m for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d)):
        for buffer, low, high in ((norm.weight, 0.5, 1.5), (norm.running_var, 0.2, 2.0), (norm.bias, -1, 1), (norm.running_mean, -1, 1)):
            buffer.copy_(torch.rand(buffer.shape, generator=g, dtype=buffer.dtype) * (high - low) + low)
    images = torch.randn(2, 3, 48, 64, generator=g, dtype=torch.float64)
    features, reference = backbone(images), _module_chain(backbone, images)
    for ours, theirs in zip(features, reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    trainable = [p for p in backbone.parameters() if p.requires_grad]

    def weighted_sum(maps: list[torch.Tensor]) -> torch.Tensor:
        return sum((f * torch.linspace(-1, 1, f.numel(), dtype=f.dtype).view_as(f)).sum() for f in maps)

    ours, theirs = (torch.autograd.grad(weighted_sum(maps), trainable) for maps in (features, reference))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_unknown_backbone_names():
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        build_backbone("vgg16")
    with pytest.raises(ValueError, match="unknown ResNet"):
        ResNetBackbone("resnet152")


def test_swin_without_timm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match="pip install timm"):
        SwinBackbone()


def test_trainable_norm_trains_batch_norm_and_every_layer():
    frozen, trainable = ResNetBackbone("resnet18"), ResNetBackbone("resnet18", trainable_norm=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    assert not all(p.requires_grad for p in frozen.parameters())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in trainable.modules()) == 20
    assert all(p.requires_grad for p in trainable.parameters())
    trainable.train()
    before = trainable.body.bn1.running_mean.clone()
    trainable(torch.rand(2, 3, 64, 64))
    assert not torch.equal(before, trainable.body.bn1.running_mean), "batch statistics must update in training"


@pytest.mark.parametrize("size", [(97, 131), (64, 64), (300, 451)])
def test_level_sizes_are_what_the_backbone_and_input_stage_give(size):
    from litedetr.models.backbone import level_sizes
    from litedetr.weights import build_model

    model = build_model("dino-r18-tiny").eval()
    with torch.no_grad():
        tokens = model.input_stage(model.backbone(torch.rand(1, 3, *size)), torch.zeros(1, *size, dtype=torch.bool))
    assert level_sizes(*size, 4) == [tuple(s) for s in tokens.spatial_shapes]
    assert level_sizes(*size, 2) == level_sizes(*size, 4)[:2]
