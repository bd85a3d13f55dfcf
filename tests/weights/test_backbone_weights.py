"""Backbone weights: from files and from the ImageNet cache (never the network), bit-exactly, every problem named."""

import logging
import re
import shutil
import socket
import urllib.error

import pytest
import torch
import torchvision

from litedetr.models.backbone import ResNetBackbone, SwinBackbone, build_backbone
from litedetr.weights import WeightsUnavailable, load_backbone_weights
from litedetr.weights.backbone import DOWNLOAD_TIMEOUT_S, imagenet_weights


def with_weights(backbone, weights):
    """``backbone`` after :func:`load_backbone_weights`, which must name the file it read."""
    path = load_backbone_weights(backbone, weights)
    assert path.is_file()
    return backbone


def _imagenet_style_resnet18_file(tmp_path, path=None):
    """A random torchvision ResNet-18 (random batch-norm statistics too) saved with ``torch.save``."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    path = path or tmp_path / "resnet18.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(reference.state_dict(), path)
    return reference.eval(), path


def test_resnet_weights_file_round_trip(tmp_path):
    reference, path = _imagenet_style_resnet18_file(tmp_path)
    backbone = with_weights(ResNetBackbone("resnet18"), str(path))
    ours = backbone.body.state_dict()
    theirs = reference.state_dict()
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=0, msg=key)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        c5 = backbone(images)[-1]
        r = reference
        x = r.maxpool(r.relu(r.bn1(r.conv1(images))))
        expected = r.layer4(r.layer3(r.layer2(r.layer1(x))))
    torch.testing.assert_close(c5, expected, rtol=1e-4, atol=1e-5)
    assert not backbone.body.conv1.weight.requires_grad


def test_resnet_bad_weights_file_names_keys(tmp_path):
    _, path = _imagenet_style_resnet18_file(tmp_path)
    state_dict = torch.load(path, weights_only=True)
    del state_dict["layer3.0.conv2.weight"]
    state_dict["layer9.weight"] = torch.zeros(1)
    state_dict["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    bad = tmp_path / "bad.pth"
    torch.save(state_dict, bad)
    with pytest.raises(ValueError) as info:
        with_weights(ResNetBackbone("resnet18"), str(bad))
    message = str(info.value)
    assert "missing keys (1):\n    layer3.0.conv2.weight" in message
    assert "unexpected keys (no place in the model) (1):\n    layer9.weight" in message
    assert "conv1.weight: file (64, 3, 3, 3) vs model (64, 3, 7, 7)" in message


def test_resnet_weights_of_another_depth_are_rejected(tmp_path):
    _, path = _imagenet_style_resnet18_file(tmp_path)
    with pytest.raises(ValueError, match=r"missing keys \(80\):\s+layer1\.2\.bn1\.bias"):
        with_weights(ResNetBackbone("resnet34"), str(path))


def test_weights_file_must_hold_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="expected a state dict"):
        with_weights(ResNetBackbone("resnet18"), str(path))


def test_swin_shapes_and_weights_round_trip(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    classifier = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    path = tmp_path / "swin_t.pth"
    torch.save(classifier.state_dict(), path)

    backbone = with_weights(build_backbone("swin_t"), str(path))
    assert isinstance(backbone, SwinBackbone)
    assert backbone.out_channels == (192, 384, 768)
    assert backbone.strides == (8, 16, 32)
    torch.testing.assert_close(
        backbone.body.state_dict()["layers_2.blocks.3.mlp.fc1.weight"],
        classifier.state_dict()["layers.2.blocks.3.mlp.fc1.weight"],
        rtol=0,
        atol=0,
    )
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 100, 130))
    # padded to 100 x 132 (a multiple of the patch size), then ceil(size / stride)
    assert [tuple(f.shape) for f in features] == [(1, 192, 13, 17), (1, 384, 7, 9), (1, 768, 4, 5)]


def test_swin_bad_weights_file(tmp_path):
    pytest.importorskip("timm")
    path = tmp_path / "bad.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(96, 3, 4, 4), "extra.bias": torch.zeros(3)}, path)
    with pytest.raises(ValueError) as info:
        with_weights(SwinBackbone(), str(path))
    message = str(info.value)
    assert "missing keys (" in message and "more" in message.split("unexpected keys")[0]
    assert "unexpected keys (no place in the model) (1):\n    extra.bias" in message


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty ``TORCH_HOME``; a download fails the test unless the test replaces the downloader."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise AssertionError(f"a test tried to download {args}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch"


def test_imagenet_weights_are_torchvisions_v1_and_timms_in1k():
    names = ("resnet18", "resnet34", "resnet50", "resnet101")
    assert [imagenet_weights(n).file_name for n in names] == [
        "resnet18-f37072fd.pth",
        "resnet34-b627a593.pth",
        "resnet50-0676ba61.pth",
        "resnet101-63fe2227.pth",
    ]
    assert imagenet_weights("resnet50").url == "https://download.pytorch.org/models/resnet50-0676ba61.pth"
    assert imagenet_weights("resnet101").description == "torchvision ResNet101_Weights.IMAGENET1K_V1"
    swin = imagenet_weights("swin_t")
    assert swin.url == "https://huggingface.co/timm/swin_tiny_patch4_window7_224.ms_in1k/resolve/main/model.safetensors"
    assert (swin.file_name, swin.description) == ("swin_tiny_patch4_window7_224.ms_in1k.safetensors", "timm swin_tiny_patch4_window7_224.ms_in1k")
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        imagenet_weights("vgg16")


def test_imagenet_resnet_comes_from_the_cache_bit_exactly(torch_home, caplog):
    cached = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    reference, _ = _imagenet_style_resnet18_file(None, cached)
    with caplog.at_level(logging.INFO, logger="litedetr"):
        backbone = with_weights(build_backbone("resnet18"), "imagenet")
    theirs = reference.state_dict()
    for key, value in backbone.body.state_dict().items():
        assert torch.equal(value, theirs[key]), key
    assert f"resnet18 backbone: loaded torchvision ResNet18_Weights.IMAGENET1K_V1 from {cached}" in caplog.messages


def test_imagenet_weights_are_downloaded_once_into_the_cache(torch_home, tmp_path, monkeypatch):
    reference, source = _imagenet_style_resnet18_file(tmp_path)
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix, socket.getdefaulttimeout()))
        shutil.copy(source, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    with_weights(build_backbone("resnet18"), "imagenet")
    backbone = with_weights(build_backbone("resnet18", trainable_norm=True), "imagenet")
    cached = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert calls == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", str(cached), "f37072fd", DOWNLOAD_TIMEOUT_S)]
    assert torch.equal(backbone.body.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert torch.equal(backbone.body.bn1.running_var, reference.bn1.running_var)


def test_weights_that_are_neither_imagenet_nor_a_file(tmp_path):
    with pytest.raises(ValueError, match=r"^backbone weights 'ImageNet': neither 'imagenet' nor an existing file$"):
        with_weights(build_backbone("resnet18"), "ImageNet")
    with pytest.raises(ValueError, match="missing.pth': neither 'imagenet' nor an existing file"):
        with_weights(build_backbone("swin_t"), tmp_path / "missing.pth")


@pytest.fixture(scope="module")
def swin_classifier():
    timm = pytest.importorskip("timm")
    torch.manual_seed(1)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)


def _assert_body_equals_classifier(backbone, classifier):
    theirs = classifier.state_dict()
    ours = backbone.body.state_dict()
    assert len(ours) == len(theirs) - 4, "all but head.fc.* and norm.*"
    for key, value in ours.items():
        assert torch.equal(value, theirs[re.sub(r"^layers_(\d+)\.", r"layers.\1.", key)]), key


def test_imagenet_swin_comes_from_the_cache_bit_exactly(torch_home, swin_classifier):
    from safetensors.torch import save_file

    cached = torch_home / "hub" / "checkpoints" / "swin_tiny_patch4_window7_224.ms_in1k.safetensors"
    cached.parent.mkdir(parents=True)
    save_file(swin_classifier.state_dict(), cached)
    _assert_body_equals_classifier(with_weights(build_backbone("swin_t"), "imagenet"), swin_classifier)


def test_swin_weights_of_the_original_release_are_converted(tmp_path, swin_classifier):
    """The original checkpoints sit under 'model', downsample at the end of a stage and keep index buffers."""
    original = {
        re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", key).replace("head.fc.", "head."): value
        for key, value in swin_classifier.state_dict().items()
    }
    assert "layers.0.downsample.reduction.weight" in original
    original["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": original}, path)
    _assert_body_equals_classifier(with_weights(SwinBackbone(), path), swin_classifier)


@pytest.mark.parametrize(
    "failure, reason",
    [
        (urllib.error.URLError(socket.gaierror(-2, "Name or service not known")), "Name or service not known"),
        (TimeoutError("timed out"), "timed out"),
        (RuntimeError('invalid hash value (expected "0676ba61", got "1234abcd")'), "invalid hash value"),
    ],
)
def test_unavailable_imagenet_weights_stop_with_one_line_naming_url_and_file(torch_home, monkeypatch, failure, reason):
    def failing_download(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch.hub, "download_url_to_file", failing_download)
    timeout_before = socket.getdefaulttimeout()
    with pytest.raises(WeightsUnavailable) as info:
        with_weights(build_backbone("resnet50"), "imagenet")
    message = str(info.value)
    cached = torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    assert "\n" not in message and reason in message and isinstance(info.value, ValueError)
    assert message.startswith("resnet50: the ImageNet weights are not in the cache and the download failed (")
    assert message.endswith(
        f"download https://download.pytorch.org/models/resnet50-0676ba61.pth and save it as {cached}, or give that file's path instead of 'imagenet'"
    )
    assert info.value.__cause__ is None and info.value.__suppress_context__, "no network traceback attached"
    assert socket.getdefaulttimeout() == timeout_before and not cached.exists()
