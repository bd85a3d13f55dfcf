"""The three families against their original code bases (../shared/fixtures): predictions, training
forward, released checkpoints' keys, and each family's choice of parts."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections.abc import Callable

import pytest
import torch
from conftest import load_fixture, random_checkpoint

from litedetr.models import Detector, get_config
from litedetr.models.criterion import DEFAULT_WEIGHTS, DEFORMABLE_WEIGHTS
from litedetr.models.matcher import HungarianMatcher
from litedetr.models.postprocess import postprocess
from litedetr.models.query_selection import BoxEmbeddingQuerySelection, MixedQuerySelection
from litedetr.nn.decoder import AnchorQueryPosition, StaticQueryPosition
from litedetr.weights import ConversionError, build_model, load_checkpoint, load_model, save_model
from litedetr.weights.keys import detect_layout, official_rules, rename_official
from litedetr.weights.loading import load_official_state_dict

FAMILY_FIXTURES = {
    "deformable-detr-r50": "deformable_detr_two_stage_seed0.pt",
    "dino-r50": "dino_4scale_seed0.pt",
    "h-detr-r50": "h_detr_two_stage_seed0.pt",
}
TOLERANCE = 1e-4
TIE_GAP = 1e-5
"""Proposal scores closer than this are ties within float32 noise: the encoder memory agrees with the
original to ~5e-6, so which of two tied proposals ranks first is a coin toss on either side."""


def fixture_model(preset: str, fixture: dict) -> Detector:
    """``preset`` narrowed as the fixture's model (FFN width and query counts from its ``official_args``)."""
    args = fixture["official_args"]
    overrides = dict(num_queries=args.get("num_queries", args.get("num_queries_one2one")), decoder_ffn=args["dim_feedforward"])
    if "num_queries_one2many" in args:
        overrides["one_to_many_queries"] = args["num_queries_one2many"]
    if "num_select" in args:
        overrides["num_select"] = args["num_select"]
    base = get_config(preset)
    config = get_config(preset, encoder=dataclasses.replace(base.encoder, d_ffn=args["dim_feedforward"]), **overrides)
    model = Detector(config).eval()
    state = {k: v.float() for k, v in fixture["state_dict_without_backbone_body"].items()}
    state.update({"backbone.0." + k.removeprefix("backbone."): v for k, v in model.state_dict().items() if k.startswith("backbone.")})
    load_official_state_dict(model, state)
    return model


def max_error(ours: dict, theirs: dict, suffix: str = "") -> float:
    return max((ours[key] - theirs[key + suffix]).abs().max().item() for key in ("pred_logits", "pred_boxes"))


def best_over_tied_orders(model: Detector, run: Callable[[], float]) -> tuple[float, int]:
    """The smallest error of ``run`` over the orders of near-tied proposals (adjacent scores within
    :data:`TIE_GAP`, the last selected one included), and how many swaps that took."""
    selection = model.query_selection
    select = selection.select
    recorded = []
    selection.select = lambda scores, k, boxes=None: recorded.append((scores, k)) or select(scores, k, boxes)
    try:
        error = run()
        scores, k = recorded[0]
        order = torch.topk(scores, min(k + 1, scores.shape[1]), dim=1)
        gaps = order.values[:, :-1] - order.values[:, 1:]
        # equal scores come from identical proposals (padding), whose order changes nothing
        ties = [(b, i) for b, i in ((gaps > 0) & (gaps < TIE_GAP)).nonzero().tolist() if i < k]
        best = (error, 0)
        for n in range(1, min(len(ties), 3) + 1):
            for swaps in itertools.combinations(ties, n):
                indices = order.indices.clone()
                for b, i in swaps:
                    indices[b, [i, i + 1]] = indices[b, [i + 1, i]]
                selection.select = lambda scores, k, boxes=None, chosen=indices: chosen[:, :k]
                best = min(best, (run(), n))
        return best
    finally:
        selection.select = select


@pytest.mark.parametrize("preset", list(FAMILY_FIXTURES))
def test_reproduces_the_original_code_base(preset):
    f = load_fixture(FAMILY_FIXTURES[preset])
    model = fixture_model(preset, f)
    features = [feat for feat, _ in f["backbone_features"]]
    outputs = {}

    def run() -> float:
        with torch.no_grad():
            outputs["out"] = model.forward_features(features, f["image_mask"])
        out = outputs["out"]
        errors = [max_error(out, f)]
        errors += [max_error(a, b) for a, b in zip(out["aux_outputs"], f.get("aux_outputs", []), strict=False)]
        if "enc_outputs" in f:
            errors.append(max_error(out["enc_outputs"], f["enc_outputs"]))
        return max(errors)

    error, swaps = best_over_tied_orders(model, run)
    assert error < TOLERANCE, f"max |error| {error:.2e} ({swaps} tied proposals swapped)"
    if "aux_outputs" in f:
        assert len(outputs["out"]["aux_outputs"]) == len(f["aux_outputs"]) == 5
    with torch.no_grad():
        tokens = model.input_stage(features, f["image_mask"])
        memory = model.encoder(tokens.src, tokens.pos, tokens.spatial_shapes, tokens.valid_ratios, tokens.padding_mask)
    assert (memory - f["encoder_memory"]).abs().max().item() < TOLERANCE
    with torch.no_grad():
        out = model.forward_features(features, f["image_mask"])
    for ours, theirs in zip(postprocess(out["pred_logits"], out["pred_boxes"], f["image_sizes"], model.config.num_select), f["postprocessed"]):
        assert torch.equal(ours["labels"], theirs["labels"])
        torch.testing.assert_close(ours["scores"], theirs["scores"], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], atol=1e-2, rtol=0)


def test_h_detr_hybrid_training_forward():
    """Training mode: 30 one-to-one and 150 one-to-many queries, masked from each other, as H-DETR's training forward."""
    f = load_fixture("h_detr_two_stage_seed0.pt")
    model = fixture_model("h-detr-r50", f).train()
    hybrid = f["hybrid_train_forward"]
    features = [feat for feat, _ in f["backbone_features"]]

    def run() -> float:
        with torch.no_grad():
            out = model.forward_features(features, f["image_mask"], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2)
        assert out["pred_logits"].shape[1] == hybrid["num_queries_one2one"]
        assert out["one_to_many"]["pred_logits"].shape[1] == hybrid["num_queries_one2many"]
        return max(max_error(out, hybrid), max_error(out["one_to_many"], hybrid, "_one2many"))

    error, swaps = best_over_tied_orders(model, run)
    assert error < TOLERANCE, f"max |error| {error:.2e} ({swaps} tied proposals swapped)"


@pytest.mark.parametrize(
    "layout,preset,count",
    [
        ("deformable-detr", "deformable-detr-r50", 630),
        ("h-detr", "h-detr-r50", 631),
        ("dino", "dino-r50", 626),
        ("lite-dino", "lite-dino-r50-h3l1-2x3", 644),
    ],
)
def test_every_key_of_a_released_checkpoint_loads(tmp_path, layout, preset, count):
    state, ours = random_checkpoint(layout, torch.Generator().manual_seed(0))
    assert len(state) == count and detect_layout(state) == layout
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state}, path)
    model = load_checkpoint(path, preset)
    loaded = model.state_dict()
    assert set(ours) <= set(loaded)
    for key, value in ours.items():
        assert torch.equal(loaded[key], value), key
    # and every one of our tensors came from the checkpoint (the backbone's batch-norm statistics included)
    assert not [k for k in loaded if k not in ours and not k.endswith("num_batches_tracked")]


def test_per_layer_heads_are_distinct_modules():
    state, _ = random_checkpoint("deformable-detr", torch.Generator().manual_seed(1))
    model = build_model("deformable-detr-r50")
    load_official_state_dict(model, state)
    for i in range(6):
        assert torch.equal(model.heads.class_heads[i].weight, state[f"class_embed.{i}.weight"])
        assert torch.equal(model.heads.box_heads[i].layers[2].bias, state[f"transformer.decoder.bbox_embed.{i}.layers.2.bias"])
    assert torch.equal(model.query_selection.class_head.weight, state["class_embed.6.weight"])
    assert len({id(h) for h in model.decoder.layers}) == 6 and len(model.heads.class_heads) == 6


def test_a_checkpoint_of_another_family_or_layout_is_named(tmp_path):
    state, _ = random_checkpoint("deformable-detr", torch.Generator().manual_seed(0))
    path = tmp_path / "deformable.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ConversionError, match="a deformable-detr checkpoint, but preset 'dino-r50' is of the dino family"):
        load_checkpoint(path, "dino-r50")
    single_stage = {"backbone.0.body.conv1.weight": torch.zeros(64, 3, 7, 7), "transformer.reference_points.weight": torch.zeros(2, 256)}
    torch.save({"model": single_stage}, path)
    with pytest.raises(ConversionError, match="single-stage Deformable DETR"):
        load_checkpoint(path, "deformable-detr-r50")
    torch.save({"model": {"detr.weight": torch.zeros(1)}}, path)
    with pytest.raises(ConversionError, match="not a checkpoint of a known layout.*first keys: detr.weight"):
        load_checkpoint(path, "deformable-detr-r50")


def test_the_deformable_detr_heads_are_not_shared_by_a_dino_model():
    state, _ = random_checkpoint("deformable-detr", torch.Generator().manual_seed(0))
    with pytest.raises(ConversionError):
        load_official_state_dict(build_model("dino-r50"), state, layout="dino")


@pytest.mark.parametrize(
    "layout,preset",
    [("dino", "lite-dino-r50-h3l1-2x3"), ("deformable-detr", "lite-deformable-detr-r50-h2l2-2x3"), ("h-detr", "lite-h-detr-r50-h3l1-3x2")],
)
def test_a_standard_checkpoint_initialises_its_lite_preset(tmp_path, caplog, layout, preset):
    state, ours = random_checkpoint(layout, torch.Generator().manual_seed(0))
    path = tmp_path / "standard.pth"
    torch.save({"model": state}, path)
    fresh_model = build_model(preset)
    with caplog.at_level(logging.INFO, logger="litedetr.weights.loading"):
        model = load_checkpoint(path, preset)
    loaded = model.state_dict()
    # encoder layer i takes layer i; what has no source keeps a fresh initialisation, listed in one line
    for key, value in ours.items():
        if ".attention_weights." not in key:
            assert torch.equal(loaded[key], value), key
    fresh = [k for k in loaded if k not in ours and not k.endswith("num_batches_tracked")]
    assert fresh and all(".ffn_low." in k or ".query_proj." in k for k in fresh)
    assert any(".ffn_low." in k for k in fresh)
    assert {tuple(fresh_model.state_dict()[k].shape) for k in fresh} == {tuple(loaded[k].shape) for k in fresh}
    (line,) = [r.getMessage() for r in caplog.records if "standard encoder into a Lite model" in r.getMessage()]
    all_token_layers = ",".join(str(i) for i, first in enumerate(model.encoder.query_levels) if first == 0)
    assert f"encoder.layers.{{{all_token_layers}}}.ffn_low.linear1," in line and "self_attn.attention_weights" in line


def test_a_lite_detr_repository_checkpoint_with_the_standard_encoder_is_detected_by_its_structure(tmp_path):
    """The authors' repository trains DINO's standard encoder too; its plain attention carries a
    ``query_proj`` it never uses. The narrow low-level FFN, not ``query_proj``, tells a Lite encoder."""
    state, ours = random_checkpoint("dino", torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    unused = {
        key.replace(".attention_weights.", ".query_proj."): torch.randn((256, 256) if key.endswith("weight") else (256,), generator=g)
        for key in state
        if ".attention_weights." in key
    }
    state.update(unused)
    assert detect_layout(state) == "dino"
    path = tmp_path / "lite_detr_repo_standard.pth"
    torch.save({"model": state}, path)
    standard = load_checkpoint(path, "dino-r50").state_dict()
    assert all(torch.equal(standard[k], v) for k, v in ours.items())
    lite = load_checkpoint(path, "lite-dino-r50-h3l1-2x3").state_dict()
    never_trained = rename_official(unused, official_rules("dino"))
    assert len(never_trained) == 2 * (6 + 6) and set(never_trained) <= set(lite)
    for key, value in never_trained.items():  # KDA's query_proj starts fresh
        assert not torch.equal(lite[key], value), key
    assert all(torch.equal(lite[k], v) for k, v in ours.items() if k in lite and ".attention_weights." not in k)


def test_a_lite_checkpoint_does_not_load_into_a_standard_preset():
    state, _ = random_checkpoint("lite-dino", torch.Generator().manual_seed(0))
    with pytest.raises(ConversionError, match="ffn_low"):
        load_official_state_dict(build_model("dino-r50"), state)


def test_family_parts():
    parts = {name: build_model(f"{name}-r18-tiny") for name in ("deformable-detr", "dino", "h-detr")}
    dino, deformable, hybrid = parts["dino"], parts["deformable-detr"], parts["h-detr"]
    assert isinstance(dino.query_selection, MixedQuerySelection) and isinstance(dino.decoder.query_position, AnchorQueryPosition)
    for model in (deformable, hybrid):
        assert isinstance(model.query_selection, BoxEmbeddingQuerySelection) and isinstance(model.decoder.query_position, StaticQueryPosition)
        assert len(model.heads.class_heads) == model.config.num_decoder_layers and model.input_stage.position_offset == -0.5
        assert model.criterion.weight_dict == DEFORMABLE_WEIGHTS and model.criterion.binary_encoder_targets
        assert model.criterion.giou_eps == 0.0 and model.decoder.inverse_sigmoid_eps == 1e-5
    assert deformable.query_selection.content is None and hybrid.query_selection.content.num_embeddings == 60 + 120
    assert not deformable.decoder.look_forward_twice and hybrid.decoder.look_forward_twice
    assert len(dino.heads.class_heads) == 1 and dino.criterion.weight_dict == DEFAULT_WEIGHTS and dino.criterion.giou_eps == 1e-6
    assert dino.decoder.inverse_sigmoid_eps == 1e-3 and dino.input_stage.position_offset == 0.0
    assert get_config("h-detr-r50").pe_temperature == get_config("deformable-detr-r50").pe_temperature == 10000.0


def test_deformable_detr_supervises_every_token_proposal_with_binary_targets():
    model = build_model("deformable-detr-r18-tiny", num_classes=3, num_queries=10, num_select=10).train()
    features = model.backbone(torch.rand(1, 3, 64, 64))
    box = torch.tensor([[25 / 64, 20 / 64, 30 / 64, 20 / 64]])
    with torch.no_grad():
        out = model.forward_features(features, torch.zeros(1, 64, 64, dtype=torch.bool), [{"boxes": box, "labels": torch.tensor([2])}])
        as_two, as_zero = (model.criterion(out, [{"boxes": box, "labels": torch.tensor([c])}]) for c in (2, 0))
    assert out["enc_outputs"]["pred_logits"].shape == (1, 8 * 8 + 4 * 4 + 2 * 2 + 1, 3)
    # the proposals' targets are binary (class 0 whatever the label); the decoder's are the labels
    assert as_two["loss_class_enc"] == as_zero["loss_class_enc"] and as_two["loss_class"] != as_zero["loss_class"]
    assert "loss_class_dn" not in as_two and "loss_class_o2m" not in as_two


def test_format_1_model_files_of_dino_are_read(tmp_path):
    from safetensors.torch import save_file

    from litedetr.weights.files import CONFIG_KEY, FORMAT_KEY
    from litedetr.weights.keys import FORMAT_1_RULES

    model = build_model("dino-r18-tiny", num_classes=3).eval()
    path = save_model(model, tmp_path / "v2.safetensors")
    inverse = {"query_selection.enc_output.": "enc_output.", "query_selection.enc_output_norm.": "enc_output_norm.",
               "query_selection.class_head.": "enc_class_head.", "query_selection.box_head.": "enc_box_head.",
               "query_selection.content.": "query_content.", "heads.class_heads.0.": "class_head.", "heads.box_heads.0.": "box_head.",
               "training_queries.label_embed.": "label_embed.", "decoder.query_position.mlp.": "decoder.ref_point_head."}  # fmt: skip
    old = {}
    for key, value in model.state_dict().items():
        for new, previous in inverse.items():
            if key.startswith(new):
                key = previous + key.removeprefix(new)
                break
        old[key] = value.contiguous()
    assert len(FORMAT_1_RULES) == len(inverse) + 1
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(old, str(tmp_path / "v1.safetensors"), metadata={CONFIG_KEY: metadata[CONFIG_KEY], FORMAT_KEY: "1"})
    loaded = load_model(tmp_path / "v1.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    config = json.loads(metadata[CONFIG_KEY])
    config["family"], config["dn_number"] = "deformable-detr", 0
    save_file(old, str(tmp_path / "v1d.safetensors"), metadata={CONFIG_KEY: json.dumps(config), FORMAT_KEY: "1"})
    with pytest.raises(ValueError, match="was not the original architecture"):
        load_model(tmp_path / "v1d.safetensors")


def test_convert_command_for_each_family(tmp_path):
    from litedetr.cli import main as cli_main

    for layout, preset in (("deformable-detr", "deformable-detr-r50"), ("h-detr", "h-detr-r50")):
        state, ours = random_checkpoint(layout, torch.Generator().manual_seed(2))
        checkpoint, out = tmp_path / f"{layout}.pth", tmp_path / f"{layout}.safetensors"
        torch.save({"model": state}, checkpoint)
        assert cli_main(["convert", str(checkpoint), "--preset", preset, "--out", str(out)]) == 0
        loaded = load_model(out).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in ours.items())


def test_a_converted_h_detr_model_file_reproduces_the_code_base(tmp_path):
    """Through a conversion to our model file: the same predictions as the original code."""
    f = load_fixture("h_detr_two_stage_seed0.pt")
    reference = fixture_model("h-detr-r50", f)
    checkpoint = tmp_path / "h_detr.pth"
    state = {k: v.float() for k, v in f["state_dict_without_backbone_body"].items()}
    state.update({"backbone.0." + k.removeprefix("backbone."): v for k, v in reference.state_dict().items() if k.startswith("backbone.")})
    torch.save({"model": state}, checkpoint)
    c = reference.config
    overrides = dict(encoder=c.encoder, decoder_ffn=c.decoder_ffn, num_queries=c.num_queries, one_to_many_queries=c.one_to_many_queries)
    save_model(load_checkpoint(checkpoint, "h-detr-r50", **overrides), tmp_path / "h_detr.safetensors")
    model = load_model(tmp_path / "h_detr.safetensors")
    with torch.no_grad():
        out = model.forward_features([feat for feat, _ in f["backbone_features"]], f["image_mask"])
    assert max_error(out, f) < TOLERANCE


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(family="detr"), "unknown family 'detr'"),
        (dict(family="deformable-detr"), "denoising queries .* exist in the dino family only"),
        (dict(one_to_many_queries=100), "one kind of training-only queries"),
    ],
)
def test_impossible_family_choices_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_config("dino-r50", **overrides)


@pytest.mark.parametrize("name", ["lite-dino-r18-tiny-h3l1-2x3", "h-detr-r18-tiny"])
def test_encoder_one_to_many_supervises_every_token_in_training_only(name):
    """The option adds ``*_enc_dense`` losses over all S tokens; weights, inference and the other losses stay."""
    images = [torch.rand(3, 96, 96)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0], [40.0, 30.0, 90.0, 90.0]]), "labels": torch.tensor([0, 2])}]
    models = {}
    for repeat in (0, 4):
        torch.manual_seed(0)
        models[repeat] = build_model(name, num_classes=3, min_size=(96,), max_size=96, encoder_one_to_many=repeat)
    assert models[0].state_dict().keys() == models[4].state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), models[4].state_dict().values()))
    losses = {}
    for repeat, model in models.items():
        torch.manual_seed(1)
        losses[repeat] = model.train()(images, targets)
    dense = {key for key in losses[4] if key.endswith("_enc_dense")}
    assert dense == {"loss_class_enc_dense", "loss_bbox_enc_dense", "loss_giou_enc_dense"}
    assert losses[0].keys() == losses[4].keys() - dense
    for key, value in losses[0].items():
        torch.testing.assert_close(losses[4][key], value)
    captured = []
    handle = models[4].query_selection.register_forward_hook(lambda module, inputs, output: captured.append(output[1]))
    models[4](images, targets)
    tokens = 12 * 12 + 6 * 6 + 3 * 3 + 2 * 2  # strides 8, 16, 32, 64 of a 96-px image
    assert captured[-1]["dense"]["pred_logits"].shape == (1, tokens, 3)
    models[4].eval()
    with torch.no_grad():
        models[4](images)
    handle.remove()
    assert "dense" not in captured[-1]
    with torch.no_grad():
        eval_outputs = [model.eval()(images) for model in models.values()]
    torch.testing.assert_close(eval_outputs[0], eval_outputs[1])
    with pytest.raises(ValueError, match="encoder_one_to_many"):
        get_config(name, encoder_one_to_many=-1)


@pytest.mark.parametrize("name,family_weight", [("lite-dino-r18-tiny-h3l1-2x3", 1.0), ("h-detr-r18-tiny", 2.0)])
def test_class_loss_weight_scales_every_classification_term_and_nothing_else(name, family_weight):
    images = [torch.rand(3, 96, 96)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0], [40.0, 30.0, 90.0, 90.0]]), "labels": torch.tensor([0, 2])}]
    losses = {}
    for weight in (None, 3.0):
        torch.manual_seed(0)
        model = build_model(name, num_classes=3, min_size=(96,), max_size=96, class_loss_weight=weight, encoder_one_to_many=2).train()
        torch.manual_seed(1)
        losses[weight] = model(images, targets)
    assert losses[None].keys() == losses[3.0].keys()
    classes = [key for key in losses[None] if key.startswith("loss_class")]
    assert len(classes) > 5 and any(key.endswith("_enc_dense") for key in classes)
    for key, value in losses[None].items():
        scale = 3.0 / family_weight if key.startswith("loss_class") else 1.0
        torch.testing.assert_close(losses[3.0][key], scale * value)
    with pytest.raises(ValueError, match="class_loss_weight must be > 0"):
        get_config(name, class_loss_weight=0.0)


def test_match_class_cost_sets_the_matchers_class_weight_and_can_change_the_assignment():
    default = build_model("lite-dino-r18-tiny-h3l1-2x3", num_classes=3)
    weighted = build_model("lite-dino-r18-tiny-h3l1-2x3", num_classes=3, match_class_cost=8.0)
    assert (default.criterion.matcher.cost_class, weighted.criterion.matcher.cost_class) == (2.0, 8.0)
    assert (weighted.criterion.matcher.cost_bbox, weighted.criterion.matcher.cost_giou) == (5.0, 2.0)
    # query 0 has the better box but the wrong class; query 1 a slightly worse box and the right class
    outputs = {
        "pred_logits": torch.tensor([[[4.0, -4.0, -4.0], [-4.0, 4.0, -4.0]]]),
        "pred_boxes": torch.tensor([[[0.50, 0.50, 0.20, 0.20], [0.52, 0.50, 0.20, 0.20]]]),
    }
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.50, 0.50, 0.20, 0.20]])}]
    chosen = {cost: int(HungarianMatcher(cost_class=cost)(outputs, targets)[0][0]) for cost in (0.0, 2.0, 8.0)}
    assert chosen == {0.0: 0, 2.0: 1, 8.0: 1}
    with pytest.raises(ValueError, match="match_class_cost must be >= 0"):
        get_config("lite-dino-r18-tiny-h3l1-2x3", match_class_cost=-1.0)


def test_key_aware_options_reach_every_kda_layer_and_survive_a_model_file(tmp_path):
    authors = build_model("lite-dino-r18-tiny-h3l1-2x3", num_classes=3)
    model = build_model("lite-dino-r18-tiny-h3l1-2x3", num_classes=3, kda_key_proj=True, kda_zero_query=True)
    layers = [m for m in model.modules() if getattr(m, "key_aware", False)]
    assert len(layers) == len(model.encoder.layers) + model.config.num_decoder_layers  # every encoder and decoder layer
    assert all(m.query_proj.weight.abs().sum() == 0 for m in layers)
    added = set(model.state_dict()) - set(authors.state_dict())
    assert added == {f"{m}.key_proj.{p}" for m, mod in model.named_modules() if getattr(mod, "key_aware", False) for p in ("weight", "bias")}
    assert set(authors.state_dict()) <= set(model.state_dict())
    with torch.no_grad():
        for m in layers:
            m.query_proj.weight.normal_()  # trained weights, not the start
    loaded = load_model(save_model(model, tmp_path / "kda.safetensors"))
    assert (loaded.config.kda_key_proj, loaded.config.kda_zero_query) == (True, True)
    for name, tensor in model.state_dict().items():  # the file's weights win over the zero start
        torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)
