"""Detectors: the authors' Lite-DINO reproduced end to end, checkpoint conversion, API, training outputs."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch
from conftest import FIXTURES, load_fixture
from safetensors.torch import save_file

from litedetr import build_model
from litedetr.cli import main as cli_main
from litedetr.models import Detector, get_config
from litedetr.models.postprocess import postprocess
from litedetr.weights import ConversionError, load_checkpoint, load_model, read_config, save_model
from litedetr.weights.loading import load_official_state_dict

FIXTURE_OVERRIDES = dict(num_queries=30, num_select=30, decoder_ffn=128)


def fixture_config():
    base = get_config("lite-dino-r50-h3l1-2x3")
    return dataclasses.replace(base, encoder=dataclasses.replace(base.encoder, d_ffn=128), **FIXTURE_OVERRIDES)


def authors_state_dict(fixture: dict, model: Detector) -> dict[str, torch.Tensor]:
    """The fixture's weights plus (any) ResNet body under the authors' names."""
    state = {k: v.float() for k, v in fixture["state_dict_without_backbone_body"].items()}
    state.update({"backbone.0." + k.removeprefix("backbone."): v for k, v in model.state_dict().items() if k.startswith("backbone.")})
    return state


def test_lite_dino_reproduces_authors_predictions():
    f = load_fixture("lite_dino_h3l1_2x3_seed0.pt")
    model = Detector(fixture_config()).eval()
    load_official_state_dict(model, authors_state_dict(f, model))
    with torch.no_grad():
        out = model.forward_features([feat for feat, _ in f["backbone_features"]], f["image_mask"])
    assert (out["pred_logits"] - f["pred_logits"]).abs().max().item() < 1e-4
    assert (out["pred_boxes"] - f["pred_boxes"]).abs().max().item() < 1e-4
    for ours, theirs in zip(postprocess(out["pred_logits"], out["pred_boxes"], f["image_sizes"], 30), f["postprocessed"]):
        assert torch.equal(ours["labels"], theirs["labels"])
        torch.testing.assert_close(ours["scores"], theirs["scores"], atol=1e-6, rtol=0)
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], atol=1e-3, rtol=0)


def official_keys() -> dict[str, list[int]]:
    path = FIXTURES / "official_lite_dino_r50_state_dict_keys.json"
    if not path.exists():
        pytest.skip(f"{path} is not present")
    return json.loads(path.read_text())


def test_every_key_of_the_released_checkpoints_is_converted():
    keys = official_keys()
    state = {k: torch.zeros(shape) for k, shape in keys.items()}
    model = build_model("lite-dino-r50-h3l1-2x3")
    load_official_state_dict(model, state)  # raises on unknown, left-over, missing or mis-shaped keys
    assert len(keys) == 644


def test_checkpoint_of_another_schedule_is_refused_by_name():
    state = {k: torch.zeros(shape) for k, shape in official_keys().items()}
    with pytest.raises(ConversionError, match=r"encoder\.layers\.1\.ffn_low\.linear1\.weight"):
        load_official_state_dict(build_model("lite-dino-r50-h3l1-6x1"), state)


def test_convert_command_round_trip(tmp_path):
    f = load_fixture("lite_dino_h3l1_2x3_seed0.pt")
    reference = Detector(fixture_config()).eval()
    checkpoint = tmp_path / "r50_s3ex3.pth"
    torch.save({"model": authors_state_dict(f, reference), "args": argparse.Namespace(enc_scale=3)}, checkpoint)
    out = tmp_path / "converted.safetensors"
    save_model(load_checkpoint(checkpoint, "lite-dino-r50-h3l1-2x3", encoder=fixture_config().encoder, **FIXTURE_OVERRIDES), out)
    model = load_model(out)
    with torch.no_grad():
        preds = model.forward_features([feat for feat, _ in f["backbone_features"]], f["image_mask"])
    assert (preds["pred_logits"] - f["pred_logits"]).abs().max().item() < 1e-4
    assert cli_main(["convert", str(checkpoint), "--preset", "lite-dino-r50-h3l1-2x3", "--out", str(tmp_path / "x.safetensors")]) == 2


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 96, 128, generator=g), torch.rand(3, 120, 90, generator=g)]


def small(name: str, **overrides) -> Detector:
    torch.manual_seed(0)
    return build_model(name, num_classes=3, min_size=(96,), max_size=128, num_queries=20, num_select=10, **overrides)


def test_eval_returns_boxes_scores_labels_per_image(images):
    model = small("lite-dino-r18-tiny-h3l1-2x3").eval()
    with torch.no_grad():
        preds = model(images)
    assert len(preds) == 2
    for p, img in zip(preds, images):
        assert p["boxes"].shape == (10, 4) and p["scores"].shape == (10,) and p["labels"].shape == (10,)
        assert bool((p["scores"][:-1] >= p["scores"][1:]).all()) and p["labels"].max() < 3
        assert torch.isfinite(p["boxes"]).all()
        # boxes are in the original image's pixels: centres lie inside it
        centres = (p["boxes"][:, :2] + p["boxes"][:, 2:]) / 2
        assert bool((centres >= 0).all() and (centres[:, 0] <= img.shape[2]).all() and (centres[:, 1] <= img.shape[1]).all())


def targets_for(images):
    return [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 50.0], [30.0, 40.0, 90.0, 80.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[5.0, 5.0, 40.0, 100.0]]), "labels": torch.tensor([1])},
    ]


@pytest.mark.parametrize(
    "name,present,absent",
    [
        ("dino-r18-tiny", ["loss_class_dn", "loss_bbox_dn_0", "loss_giou_enc"], ["loss_class_o2m"]),
        ("lite-h-detr-r18-tiny-h3l1-2x3", ["loss_class_o2m", "loss_bbox_1_o2m"], ["loss_class_dn"]),
        ("lite-deformable-detr-r18-tiny-h3l1-2x3", ["loss_class", "loss_giou_1", "loss_bbox_enc"], ["loss_class_dn", "loss_class_o2m"]),
    ],
)
def test_training_losses_of_each_family(images, name, present, absent):
    model = small(name, one_to_many_queries=40) if "h-detr" in name else small(name)
    model.train()
    losses = model(images, targets_for(images))
    assert set(present) <= set(losses) and not set(absent) & set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > 0.9 * len(grads)


def test_one_to_many_branch_only_in_training(images):
    model = small("h-detr-r18-tiny", one_to_many_queries=40)
    features = model.backbone(torch.stack([torch.rand(3, 96, 96), torch.rand(3, 96, 96)]))
    mask = torch.zeros(2, 96, 96, dtype=torch.bool)
    model.train()
    train_out = model.forward_features(features, mask, [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "labels": torch.tensor([1])}] * 2)
    assert train_out["one_to_many"]["pred_logits"].shape == (2, 40, 3) and train_out["pred_logits"].shape == (2, 20, 3)
    model.eval()
    with torch.no_grad():
        eval_out = model.forward_features(features, mask)
    assert "one_to_many" not in eval_out and eval_out["pred_logits"].shape == (2, 20, 3)


def test_one_to_one_queries_do_not_see_one_to_many_queries():
    """Changing the one-to-many group's content leaves the one-to-one predictions unchanged."""
    model = small("h-detr-r18-tiny", one_to_many_queries=40)
    features = model.backbone(torch.rand(1, 3, 96, 96))
    mask = torch.zeros(1, 96, 96, dtype=torch.bool)
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "labels": torch.tensor([1])}]
    model.train()
    with torch.no_grad():
        before = model.forward_features(features, mask, targets)["pred_logits"]
        model.query_selection.content.weight[20:] += 1.0
        after = model.forward_features(features, mask, targets)["pred_logits"]
    torch.testing.assert_close(before, after)


def test_predictions_do_not_depend_on_the_rest_of_the_batch():
    model = small("lite-dino-r18-tiny-h3l1-2x3").eval()
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(3, 96, 96, generator=g), torch.rand(3, 96, 96, generator=g)
    with torch.no_grad():
        alone, batched = model([a])[0], model([a, b])[0]
    for key in ("boxes", "scores"):
        torch.testing.assert_close(alone[key], batched[key], atol=1e-4, rtol=1e-4)
    assert torch.equal(alone["labels"], batched["labels"])


@pytest.mark.parametrize("name", ["deformable-detr-r18-tiny", "dino-r18-tiny", "h-detr-r18-tiny", "lite-dino-r18-tiny-h3l1-2x3"])
def test_the_transformer_reads_only_an_images_own_tokens(name):
    """Everything after the input stage (encoder, query selection, decoder, heads) ignores padding: an
    image's tokens padded in a batch with a larger image, with junk in the padding, give the outputs of
    the image alone. Sizes are multiples of the coarsest stride (64), so every level's padding mask
    covers exactly the padded tokens. Three things see the padding by design, as in the original code
    bases (see ``Detector.predict``), and the test takes each out: the input stage (the backbone's
    border features, the group norm's statistics), whose output it replaces; the two-stage top-k, which
    ranks padded tokens by the class head of their zeroed memory, so that they can take query slots
    (the H-DETR fixture's padded batch selects some), and which it restricts to the image's tokens;
    DINO's positional queries, which its decoder computes from boxes in the padded frame (scaled by the
    finest level's valid ratio), and which it computes in the image's frame."""
    model = small(name).eval()
    g = torch.Generator().manual_seed(2)
    alone_image, batch = torch.randn(1, 3, 128, 192, generator=g), torch.randn(2, 3, 256, 256, generator=g)
    mask = torch.ones(2, 256, 256, dtype=torch.bool)
    mask[0, :128, :192], mask[1] = False, False
    seen = []

    def put_alone_tokens_into_the_batch(module, inputs, tokens):
        if not seen:
            seen.append(tokens)
            return tokens
        alone, src = seen[0], 10 * torch.randn(tokens.src.shape, generator=g)
        src[1] = tokens.src[1]
        start, first = 0, 0
        for (h, w), (height, width) in zip(alone.spatial_shapes, tokens.spatial_shapes):
            own = slice(start, start + h * w)
            src[0, first : first + height * width].view(height, width, -1)[:h, :w] = alone.src[0, own].view(h, w, -1)
            padding = tokens.padding_mask[0, first : first + height * width].view(height, width)
            assert not padding[:h, :w].any() and padding.sum() == height * width - h * w
            pos = tokens.pos[0, first : first + height * width].view(height, width, -1)[:h, :w]
            torch.testing.assert_close(pos, alone.pos[0, own].view(h, w, -1))
            start, first = start + h * w, first + height * width
        frame.append(tokens.valid_ratios[:, 0].repeat(1, 2)[:, None])  # (B, 1, 4) finest level's (w, h, w, h)
        return dataclasses.replace(tokens, src=src)

    frame, padding, select = [torch.ones(1, 1, 4)], [], model.query_selection.select
    model.input_stage.register_forward_hook(put_alone_tokens_into_the_batch)
    model.input_stage.register_forward_hook(lambda module, inputs, tokens: padding.append(tokens.padding_mask))
    model.query_selection.select = lambda scores, k, boxes=None: select(scores.masked_fill(padding[-1], float("-inf")), k, boxes)
    model.decoder.query_position.register_forward_pre_hook(lambda module, args: (args[0] / frame[-1], *args[1:]))
    with torch.no_grad():
        alone = model.forward_features(model.backbone(alone_image), torch.zeros(1, 128, 192, dtype=torch.bool))
        batched = model.forward_features(model.backbone(batch), mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(batched[key][:1], alone[key], atol=1e-5, rtol=1e-4)


def test_predict_batches_images_by_size_so_equal_sizes_predict_as_alone():
    """Batched in input order, image 0 would be padded to image 1's size and its boxes would move; by size,
    images 0 and 2 share a batch without padding."""
    model = small("lite-dino-r18-tiny-h3l1-2x3").eval()
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 64, 128, generator=g), torch.rand(3, 96, 96, generator=g), torch.rand(3, 64, 128, generator=g)]
    together = model.predict(images, threshold=0.0, batch_size=2)
    for image, got in zip(images, together):
        alone = model.predict(image, threshold=0.0)[0]
        for key in ("boxes", "scores"):
            torch.testing.assert_close(got[key], alone[key], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        padded = model([images[0], images[1]])[0]
    assert (padded["boxes"] - together[0]["boxes"]).abs().max() > 1e-2  # what batching by size avoids


@pytest.mark.parametrize(
    "target,message",
    [
        ({"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([7])}, r"target 0: labels must lie in \[0, 3\)"),
        ({"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]] * 2), "labels": torch.tensor([0, -1])}, r"target 0: labels must lie in \[0, 3\), got \[-1, 0\]"),
        ({"boxes": torch.tensor([[5.0, 1.0, 5.0, 9.0]]), "labels": torch.tensor([0])}, "target 0: boxes must have x1 > x0"),
        ({"boxes": torch.zeros(2, 4), "labels": torch.tensor([0])}, "target 0: boxes must be"),
    ],
)
def test_bad_targets_are_named(images, target, message):
    model = small("dino-r18-tiny").train()
    with pytest.raises(ValueError, match=message):
        model(images[:1], [target])


def test_a_target_per_image_is_required(images):
    model = small("dino-r18-tiny").train()
    with pytest.raises(ValueError, match="1 targets given for 2 images"):
        model(images[:2], [{"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([0])}])


def test_a_bad_target_is_named_by_its_image(images):
    model = small("dino-r18-tiny").train()
    good = {"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([0])}
    with pytest.raises(ValueError, match="target 1: boxes must have x1 > x0"):
        model(images[:2], [good, {"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0], [2.0, 9.0, 8.0, 3.0]]), "labels": torch.tensor([0, 1])}])


def test_images_without_objects_train(images):
    model = small("dino-r18-tiny").train()
    losses = model(images, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2)
    total = sum(losses.values())
    assert torch.isfinite(total)
    box_terms = [name for name in losses if "bbox" in name or "giou" in name]
    class_terms = [name for name in losses if "class" in name]
    assert box_terms and class_terms and len(box_terms) + len(class_terms) == len(losses)
    assert all(losses[name].item() == 0.0 for name in box_terms), {name: losses[name].item() for name in box_terms}  # nothing to match
    assert all(losses[name].item() > 0.0 for name in class_terms)  # every query is pushed towards "no object"
    total.backward()
    # every trainable parameter takes part (DDP needs them all), with a finite gradient
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    not_finite = [name for name, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not missing and not not_finite, (missing, not_finite)


def test_save_and_load_round_trip(tmp_path, images):
    model = small("lite-h-detr-r18-tiny-h3l1-2x3").eval()
    path = save_model(model, tmp_path / "model.safetensors")
    assert read_config(path) == model.config
    loaded = load_model(path)
    with torch.no_grad():
        for a, b in zip(model(images), loaded(images)):
            torch.testing.assert_close(a["boxes"], b["boxes"])
    assert not list(tmp_path.glob("*.tmp"))


def test_loading_a_foreign_file_says_so(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="without a litedetr config"):
        load_model(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a litedetr model file"):
        load_model(tmp_path / "junk.safetensors")


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model preset 'dino-r51'"):
        build_model("dino-r51")
