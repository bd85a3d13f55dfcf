"""benchmarks/tradeoff.py: the model configs (the paper's 7 and KDA plus query logits), the demo's budget, and reuse of finished runs (no training)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import benchmark_script

from litedetr.bench.flops import count_flops
from litedetr.engine import CHECKPOINT
from litedetr.engine.recipes import DemoRecipe, demo_train_config
from litedetr.engine.state import save_state
from litedetr.models import get_config
from litedetr.weights import build_model


@pytest.fixture(scope="module")
def tradeoff():
    with benchmark_script("tradeoff") as module:
        yield module


def test_seven_paper_models_and_three_with_query_logits_with_intended_encoders(tradeoff):
    found = tradeoff.lite_dino_variants()
    assert tradeoff.PAPER_VARIANTS == ("dino", "h3l1-2x3", "h3l1-2x3-msda", "h3l1-6x1", "h3l1-6x1-msda", "h2l2-2x3", "h2l2-2x3-msda")
    assert set(found) == {*tradeoff.PAPER_VARIANTS, "h3l1-2x3-ql", "h3l1-6x1-ql", "h2l2-2x3-ql"}
    configs = {name: get_config(v.preset, **v.overrides) for name, v in found.items()}
    for shape in ("h3l1-2x3", "h3l1-6x1", "h2l2-2x3"):  # KDA plus query logits: KDA's model and the one flag
        assert configs[f"{shape}-ql"] == dataclasses.replace(configs[shape], kda_query_logits=True) and not configs[shape].kda_query_logits
    assert configs["dino"] == get_config("dino-r18-tiny")
    assert configs["h3l1-2x3"] == get_config("lite-dino-r18-tiny-h3l1-2x3")
    assert configs["dino"].encoder.kind == "standard" and not configs["dino"].encoder.key_aware
    for name, (high, updates, blocks) in {"h3l1-2x3": (3, 2, 3), "h3l1-6x1": (3, 6, 1), "h2l2-2x3": (2, 2, 3)}.items():
        for full, kda in ((name, True), (f"{name}-msda", False)):
            enc = configs[full].encoder
            assert (enc.kind, enc.n_high, enc.high_updates, enc.blocks) == ("lite", high, updates, blocks)
            assert enc.key_aware is kda and configs[full].decoder_key_aware is kda
    others = {"encoder", "decoder_key_aware", "kda_query_logits"}
    for config in configs.values():  # same backbone, widths, queries and decoder everywhere
        assert {k: v for k, v in config.to_dict().items() if k not in others} == {k: v for k, v in configs["dino"].to_dict().items() if k not in others}
        assert config.backbone == "resnet18"
    for name, v in found.items():  # each name trains its own attention, whatever the recipe's from-scratch default
        trained = get_config(v.preset, **dict(tradeoff.variant_recipe(DemoRecipe(), v).model_overrides))
        assert trained.kda_query_logits is name.endswith("-ql") and trained.kda_zero_query


def test_encoder_gflops_order(tradeoff):
    gflops = {}
    for name, v in tradeoff.lite_dino_variants().items():
        gflops[name] = count_flops(build_model(v.preset, num_classes=5, **v.overrides), (128, 128)).components["encoder"]
    lite = [name for name in gflops if name != "dino"]
    assert all(gflops[name] < gflops["dino"] for name in lite)
    for shape in ("h3l1-2x3", "h3l1-6x1", "h2l2-2x3"):
        assert gflops[f"{shape}-msda"] < gflops[shape]  # KDA's q.k products
        assert gflops[shape] <= gflops["h3l1-2x3"]


def test_budget_is_the_demos(tradeoff):
    assert tradeoff.scaled_recipe() == DemoRecipe()
    small = tradeoff.scaled_recipe(epochs=1, train_images=8, val_images=4, image_size=64)
    assert (small.epochs, small.data.num_train, small.data.num_val, small.image_size) == (1, 8, 4, 64)
    scale = 64 / DemoRecipe.image_size  # the demo's dataset images scale with the training size
    assert small.data.image_size == tuple(round(side * scale) for side in DemoRecipe.data.image_size)
    assert (small.lr, small.batch_size, small.lr_drop, small.seed) == (DemoRecipe.lr, DemoRecipe.batch_size, DemoRecipe.lr_drop, DemoRecipe.seed)


def test_finished_run_is_reused_and_longer_run_refused(tradeoff, tiny_synthetic, tmp_path):
    variant = tradeoff.lite_dino_variants()["h2l2-2x3-msda"]
    config = demo_train_config(tradeoff.variant_recipe(tradeoff.scaled_recipe(epochs=2, image_size=64), variant), tiny_synthetic, "cpu")
    assert config.model_overrides["encoder"] == variant.overrides["encoder"]
    run = tmp_path / "run"
    run.mkdir()
    state = {"model": {}, "train_config": json.dumps(config.to_dict()), "epoch": 2, "history": "[]"}
    save_state(run / CHECKPOINT, state)
    evaluation = {"kind": "eval", "epoch": 2, "step": 4, "AP": 0.25, "AP50": 0.5, "AP75": 0.2, "APs": 0.1, "APm": 0.3}
    (run / "log.jsonl").write_text(json.dumps({"kind": "train", "epoch": 0, "step": 1, "loss": 3.0}) + "\n" + json.dumps(evaluation) + "\n")
    metrics, reused = tradeoff.train_or_reuse(config, run)
    assert reused and metrics == {"AP": 0.25, "AP50": 0.5, "AP75": 0.2, "APs": 0.1, "APm": 0.3, "APl": None}
    save_state(run / CHECKPOINT, {**state, "epoch": 3})
    with pytest.raises(ValueError, match="more than the 2"):
        tradeoff.train_or_reuse(config, run)


def test_several_seeds_train_apart_and_report_median_and_range(tradeoff, tmp_path):
    assert tradeoff.run_dir(tmp_path, "h2l2-2x3", 0) == tmp_path / "h2l2-2x3"  # seed 0's runs from before --seeds are reused
    assert tradeoff.run_dir(tmp_path, "h2l2-2x3", 2) == tmp_path / "h2l2-2x3-seed2"
    per_seed = [{"AP": 0.30, "APl": None}, {"AP": 0.50, "APl": 0.2}, {"AP": 0.41, "APl": 0.3}]
    assert tradeoff.seed_median(per_seed) == {"AP": 0.41, "APl": None}
    row = {"label": "Lite-DINO H2L2-(2+1)x3 KDA", "encoder_gflops": 0.197, "encoder_latency_ms": 10.6}
    metrics = {"AP": 0.3, "AP50": 0.5, "APs": 0.1, "APm": 0.4, "APl": None}
    meta = {"image_size": 160, "train_images": 1000, "val_images": 100, "epochs": 12, "threads": 2, "repeats": 20}
    three = tradeoff.markdown(
        [{**row, "seed_metrics": {s: {**metrics, "AP": ap} for s, ap in zip((0, 1, 2), (0.3, 0.512, 0.49))}}], {**meta, "seeds": [0, 1, 2]}
    )
    assert "training seeds 0, 1, 2 (median [min-max])" in three
    assert (
        three.splitlines()[-1]
        == "| Lite-DINO H2L2-(2+1)x3 KDA | 49.0 [30.0-51.2] | 50.0 [50.0-50.0] | 10.0 [10.0-10.0] | 40.0 [40.0-40.0] | - | 0.197 | 10.6 |"
    )
    one = tradeoff.markdown([{**row, "seed_metrics": {0: metrics}}], {**meta, "seeds": [0]})
    assert ", seed 0;" in one and one.splitlines()[-1] == "| Lite-DINO H2L2-(2+1)x3 KDA | 30.0 | 50.0 | 10.0 | 40.0 | - | 0.197 | 10.6 |"


def _results_file(path, meta, seeds_by_model):
    rows = [{"name": name, "seed_metrics": {str(s): {"AP": ap, "AP50": 2 * ap} for s, ap in seeds.items()}} for name, seeds in seeds_by_model.items()]
    path.write_text(json.dumps({"meta": meta, "rows": rows}))
    return path


def test_seeds_of_earlier_results_join_and_the_budget_must_match(tradeoff, tmp_path):
    budget = {"train_images": 1000, "val_images": 100, "dataset_image_size": [160, 160], "image_size": 160, "epochs": 12, "batch_size": 4, "lr": 4e-4}
    budget["lr_drop"] = [11]
    earlier = {**budget, "seeds": [0, 1, 2], "threads": 2, "torch": "2.14.1"}  # written before precision was recorded
    both = {"h2l2-2x3-ql": {0: 0.50, 1: 0.52, 2: 0.51}, "h2l2-2x3-msda": {0: 0.49, 1: 0.51, 2: 0.52}, "dino": {0: 0.4}}
    file = _results_file(tmp_path / "earlier.json", earlier, both)
    added, sources = tradeoff.added_seed_metrics([file], budget, [3, 4], ["h2l2-2x3-ql", "h2l2-2x3-msda"])
    assert added == {name: {s: {"AP": ap, "AP50": 2 * ap} for s, ap in both[name].items()} for name in ("h2l2-2x3-ql", "h2l2-2x3-msda")}
    assert sources == [{"file": str(file), "seeds": {"h2l2-2x3-ql": [0, 1, 2], "h2l2-2x3-msda": [0, 1, 2]}, "threads": 2, "torch": "2.14.1",
                        "machine": None, "amp": None, "precision": None}]  # fmt: skip
    meta = {"image_size": 160, "train_images": 1000, "val_images": 100, "epochs": 12, "threads": 1, "repeats": 20, "seeds": [0, 1, 2, 3, 4]}
    meta |= {"precision": "bf16 autocast: native", "added_results": sources}
    row = {"label": "x", "encoder_gflops": 0.2, "encoder_latency_ms": 10.0, "seed_metrics": {s: {k: 0.5 for k in tradeoff.TABLE_METRICS} for s in range(5)}}
    first_line = tradeoff.markdown([row], meta).splitlines()[0]
    assert first_line.endswith("Trained here in bf16 autocast: native. Seeds 0, 1, 2 from earlier.json (precision not recorded, 2 threads).")
    with pytest.raises(ValueError, match=r"another budget \(epochs 12 != 8\)"):
        tradeoff.added_seed_metrics([file], {**budget, "epochs": 8}, [3], ["h2l2-2x3-ql"])
    with pytest.raises(ValueError, match="h2l2-2x3-ql seed 2 is given twice"):
        tradeoff.added_seed_metrics([file], budget, [2, 3], ["h2l2-2x3-ql"])
    with pytest.raises(ValueError, match="h2l2-2x3-ql seed 0 is given twice"):
        tradeoff.added_seed_metrics([file, file], budget, [3], ["h2l2-2x3-ql"])
    with pytest.raises(ValueError, match="different seeds"):
        tradeoff.added_seed_metrics([file], budget, [3], ["h2l2-2x3-ql", "dino"])
    with pytest.raises(ValueError, match="not a tradeoff.json"):
        tradeoff.added_seed_metrics([tmp_path / "missing.json"], budget, [3], ["dino"])
