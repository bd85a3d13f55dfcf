"""benchmarks/training_study.py: each cell changes what it says, the zero-query start is uniform, the table's statistics."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import benchmark_script

from litedetr.engine.recipes import DemoRecipe
from litedetr.models import get_config
from litedetr.weights import build_model


@pytest.fixture(scope="module")
def study():
    with benchmark_script("training_study") as module:
        yield module


def _config(study, name):
    return get_config(DemoRecipe.model, **{**study.AUTHORS_OVERRIDES, **study.cells()[name].model_overrides})


def test_cells_differ_only_where_named(study):
    configs = {name: _config(study, name) for name in study.cells()}
    assert configs["kda"] == get_config(DemoRecipe.model, backbone_trainable_norm=True, dn_number=100)
    assert configs["kda-zero-query"] == dataclasses.replace(configs["kda"], kda_zero_query=True)
    assert configs["kda"].encoder.key_aware and configs["kda"].decoder_key_aware
    assert configs["demo-query-nms-query-logits"] == get_config(DemoRecipe.model, **dict(DemoRecipe.model_overrides))  # the demo's model
    assert configs["demo-query-nms"] == dataclasses.replace(configs["demo-query-nms-query-logits"], kda_query_logits=False)
    assert configs["demo-kda-zero-query"] == dataclasses.replace(configs["demo-query-nms"], query_nms=None)
    assert configs["recipe-encoder-content-class8"] == dataclasses.replace(configs["demo-kda-zero-query"], kda_zero_query=False)
    assert configs["kda-encoder"].encoder.key_aware and not configs["kda-encoder"].decoder_key_aware
    assert not configs["msda"].encoder.key_aware and not configs["msda"].decoder_key_aware
    assert configs["kda-dense"].encoder_one_to_many == configs["msda-dense"].encoder_one_to_many == study.DENSE_REPEAT > 0
    assert study.cells()["kda-warmup"].train_overrides == study.cells()["msda-warmup"].train_overrides == {"warmup_steps": study.WARMUP_STEPS}
    assert study.cells()["kda-lr1e-4"].train_overrides == {"lr": 1e-4, "lr_backbone": 1e-4}
    authors = configs["kda"].to_dict()
    for name, config in configs.items():  # a cell changes its named fields, and the MSDA cells the attention
        named = set(study.cells()[name].model_overrides)
        changed = {key for key, value in config.to_dict().items() if value != authors[key]}
        assert changed == named - {key for key in named if study.cells()[name].model_overrides[key] == authors[key]}, name
        assert ("msda" in name) == ("encoder" in changed and "decoder_key_aware" in changed), name
        from_demo_model = all(study.cells()[name].model_overrides.get(key) == value for key, value in study.DEMO_MODEL.items())
        assert ("key-proj" in name, "zero-query" in name or from_demo_model) == (config.kda_key_proj, config.kda_zero_query), name
        assert ("query-nms" in name) == (config.query_nms is not None), name
        if name.startswith("msda"):
            assert config == dataclasses.replace(
                configs["msda"], **{k: v for k, v in study.cells()[name].model_overrides.items() if k not in ("encoder", "decoder_key_aware")}
            )


def test_every_cell_trains_the_same_steps_and_evaluates_after_its_last_epoch(study, tiny_synthetic):
    schedules = {}
    for name in study.cells():
        config = study.cell_config(name, seed=3, steps_per_epoch=150, data=tiny_synthetic)
        assert config.epochs * config.epoch_batches * config.batch_size == 6 * 150 * 4, name  # the same images
        assert (config.seed, config.eval_every) == (3, config.epochs), name
        schedules[name] = (config.epochs, config.epoch_batches, config.batch_size, config.lr_drop, config.lr, config.lr_backbone)
    assert schedules["recipe-encoder-content-class8"] == (6, 150, 4, (5,), 4e-4, 4e-4)  # fixed, whatever DemoRecipe becomes
    assert schedules["recipe-encoder-content-class8-late-drop"] == (12, 75, 4, (11,), 4e-4, 4e-4)
    assert schedules["recipe-encoder-content-class8-backbone-lr1e-3-late-drop"] == (12, 75, 4, (11,), 4e-4, 1e-3)
    demo = schedules["recipe-encoder-content-class8-backbone-lr1e-3-late-drop"]
    for name in (n for n in schedules if n.startswith("demo-")):  # the demo's schedule, or it with the named change
        changes = {k: v for k, v in study.cells()[name].train_overrides.items() if study.DEMO_TRAINING.get(k) != v}
        assert set(changes) <= {"batch_size", "lr", "clip_norm"}, name
        expected = (
            demo[0],
            demo[1] * demo[2] // changes.get("batch_size", demo[2]),
            changes.get("batch_size", demo[2]),
            demo[3],
            changes.get("lr", demo[4]),
            demo[5],
        )
        assert schedules[name] == expected, name
    assert schedules["demo-batch2"] == (12, 150, 2, (11,), 4e-4, 1e-3) and schedules["demo-lr6e-4"][4] == 6e-4
    assert study.cell_config("demo-clip1", seed=0, steps_per_epoch=150, data=tiny_synthetic).clip_norm == 1.0
    assert schedules["recipe-batch2"] == (6, 300, 2, (5,), 4e-4, 4e-4)
    assert schedules["recipe-encoder-content-class8-drops45"][3] == (4, 5)


def test_summary_and_table(study):
    assert study._summary([0.3, 0.1, 0.2]) == {"median": 0.2, "min": 0.1, "max": 0.3}
    runs = [
        {"box_l1": {"encoder": e, "decoder": [1.0, d], "denoising": [f, 1.0, g]}}
        for e, d, f, g in ((0.9, 0.5, 1.2, 1.1), (1.0, 0.7, 1.3, 1.2), (0.8, 0.6, 1.4, 1.0))
    ]
    columns = {key: study._summary([study._box_columns(r)[key] for r in runs]) for key in ("enc", "last", "dn_first", "dn_last")}
    row = {"label": "x", **columns, **{k: study._summary(v) for k, v in {"AP50": [0.5, 0.6, 0.4], "AP": [0.2, 0.3, 0.1], "loss_class": [0.4] * 3,
                                                                "loss_bbox": [0.5] * 3, "loss_giou": [0.9, 1.0, 1.1], "finest_share": [1.0, 0.0, 0.5],
                                                                "correct": [0.2, 0.3, 0.25], "wrong_class": [0.5] * 3, "duplicate": [0.2] * 3,
                                                                "background": [0.1, 0.05, 0.0]}.items()}}  # fmt: skip
    meta = {"steps": 300, "batch_size": 4, "steps_per_epoch": 50, "seeds": [0, 1, 2], "precisions": ["bf16"], "cpu_capability": "AVX512"}
    table = study.markdown([row], meta)
    assert "Training precision: bf16 (" in table and "summarised on a CPU of capability AVX512." in table
    assert (
        "| x | 50.0 [40.0-60.0] | 20.0 [10.0-30.0] | 0.400 [0.400-0.400] | 0.500 [0.500-0.500] | 1.000 [0.900-1.100] | 0.50 [0.00-1.00]"
        " | 0.90 -> 0.60 | 1.30 -> 1.10 | 25 / 50 / 20 / 5 |"
    ) in table


def test_runs_from_a_model_file_go_to_their_own_folders(study, tmp_path):
    assert study.run_dir(tmp_path, "kda", 1, 50) == tmp_path / "kda-seed1-steps50"
    assert study.run_dir(tmp_path, "kda", 1, 0, tmp_path / "v01.safetensors") == tmp_path / "kda-init-v01-seed1-stepsfull"


def test_diagnose_counts_the_finest_level_and_every_layer(study, tiny_synthetic, tmp_path):
    """The finest-level share against the top-k of the class logits of every token, read independently."""
    from types import SimpleNamespace

    from litedetr.data import find_split
    from litedetr.weights import save_model

    torch.manual_seed(0)
    model = build_model(DemoRecipe.model, num_classes=5, min_size=(64,), max_size=64, num_queries=20, num_select=20, dn_number=10)
    with torch.no_grad():
        model.encoder.layers[0].self_attn.sampling_offsets.bias.fill_(1e3)  # every sample of the first layer far outside the maps
    save_model(model, tmp_path / "model.safetensors")
    val = find_split(tiny_synthetic, "val")
    config = SimpleNamespace(val_annotations=str(val.annotations), val_images=str(val.images))
    result = study.diagnose(tmp_path / "model.safetensors", config, images=2)

    logits = []
    model.query_selection.class_head.register_forward_hook(lambda module, inputs, output: logits.append(output))
    dataset = study.CocoDetection(config.val_annotations, config.val_images)
    with torch.no_grad():
        model.eval()([dataset[i][0] for i in range(2)])
    scores = logits[0].max(-1).values  # (B, S): every token's, finest level (8 x 8 tokens at 64 px) first
    top = scores.topk(20, dim=1).indices
    assert result["finest_share"] == pytest.approx(float((top < 64).float().mean()))
    l1 = result["box_l1"]
    assert len(l1["decoder"]) == len(l1["denoising"]) == model.config.num_decoder_layers
    assert all(v > 0 for v in [l1["encoder"], *l1["decoder"], *l1["denoising"]])
    layers = len(model.encoder.layers)
    assert len(result["outside_weight"]) == len(result["outside_samples"]) == layers
    assert result["outside_weight"][0] == result["outside_samples"][0] == 1.0
    # the authors' start: point i of each head sits i + 1 cells out along its ring direction, so at 64 px
    # (levels of 8x8, 4x4, 2x2 and 1x1 cells) some samples of every layer lie outside, not all
    assert all(0 < share < 1 for share in result["outside_samples"][1:])


def test_outside_map_follows_bilinear_support(study):
    """A sample is outside only when none of its four corners is in the map: x*W - 0.5 <= -1 or >= W."""
    shapes = [(4, 2)]  # H = 4, W = 2
    x = torch.tensor([-0.26, -0.24, 0.5, 1.24, 1.26])  # pixel coordinates x*2 - 0.5: -1.02, -0.98, 0.5, 1.98, 2.02
    locations = torch.stack([x, torch.full_like(x, 0.5)], -1).view(1, 5, 1, 1, 1, 2)
    assert study._outside_map(locations, shapes).flatten().tolist() == [True, False, False, False, True]
    y = torch.tensor([-0.13, -0.12, 1.12, 1.13])  # y*4 - 0.5: -1.02, -0.98, 3.98, 4.02
    locations = torch.stack([torch.full_like(y, 0.5), y], -1).view(1, 4, 1, 1, 1, 2)
    assert study._outside_map(locations, shapes).flatten().tolist() == [True, False, False, True]


def test_error_breakdown_sorts_each_images_best_detections(study, tmp_path):
    """Image 1 has two objects: its two best detections are one correct and one duplicate (a third, lower,
    is not counted). Image 2 has one: its best is of the wrong class."""
    import json

    annotations = {"annotations": [
        {"image_id": 1, "bbox": [0, 0, 10, 10], "category_id": 1}, {"image_id": 1, "bbox": [50, 50, 10, 10], "category_id": 2},
        {"image_id": 2, "bbox": [0, 0, 20, 20], "category_id": 1},
    ]}  # fmt: skip
    detections = [
        {"image_id": 1, "bbox": [0, 0, 10, 10], "category_id": 1, "score": 0.9},
        {"image_id": 1, "bbox": [1, 0, 10, 10], "category_id": 1, "score": 0.8},
        {"image_id": 1, "bbox": [50, 50, 10, 10], "category_id": 2, "score": 0.1},
        {"image_id": 2, "bbox": [0, 0, 20, 19], "category_id": 3, "score": 0.5},
    ]
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    (tmp_path / "d.json").write_text(json.dumps(detections))
    shares = study.error_breakdown(tmp_path / "d.json", tmp_path / "a.json")
    assert shares == pytest.approx({"correct": 1 / 3, "wrong_class": 1 / 3, "duplicate": 1 / 3, "background": 0.0})
    detections[3]["bbox"] = [100, 100, 5, 5]
    (tmp_path / "d.json").write_text(json.dumps(detections))
    assert study.error_breakdown(tmp_path / "d.json", tmp_path / "a.json")["background"] == pytest.approx(1 / 3)
