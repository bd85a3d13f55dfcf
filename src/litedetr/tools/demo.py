"""``litedetr demo``: the whole pipeline on the CPU in minutes, with nothing to download.

It writes the synthetic dataset, trains a small Lite-DINO on it, evaluates it with pycocotools,
draws its predictions on validation images and compares the encoder's GFLOPs with a standard
encoder's. Training follows a fixed schedule (the same steps on every machine); only on a machine
too slow to fit it in the time cap does it shorten every epoch, and it says so. Running it again in
the same ``--out`` resumes an interrupted run (or just reports a finished one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from litedetr.data import CocoDetection, find_split, write_synthetic_dataset
from litedetr.engine import CHECKPOINT, MODEL_FILE, TrainConfig, Trainer
from litedetr.engine.recipes import DemoRecipe, demo_train_config
from litedetr.models import Detector
from litedetr.models.config import EncoderConfig
from litedetr.tools.args import float_in, int_at_least
from litedetr.models.flops import count_flops
from litedetr.tools.predict import predict_files
from litedetr.tools.train import format_metrics

__all__ = ["DemoRecipe", "demo_train_config", "fit_budget", "run_demo", "add_arguments"]

logger = logging.getLogger(__name__)

PREDICTION_THRESHOLD = 0.3
TOP_IF_NONE = 3
"""Drawn predictions: detections scoring at least the threshold; an image with none gets its best three."""


def encoder_gflops(model: Detector, size: int) -> dict[str, float]:
    """Encoder GFLOPs of ``model`` and of the same detector with a standard 6-layer encoder, at ``size``."""
    config = model.config
    standard = dataclasses.replace(config, encoder=EncoderConfig(num_layers=6, d_ffn=config.encoder.d_ffn, key_aware=False))
    lite = count_flops(model, (size, size)).components["encoder"]
    dense = count_flops(Detector(standard), (size, size)).components["encoder"]
    return {"lite_encoder": lite, "standard_encoder": dense, "ratio": lite / dense}


def fit_budget(config: TrainConfig, recipe: DemoRecipe) -> dict[str, Any]:
    """The recipe's fixed schedule, cut only where it would not fit ``recipe.train_minutes`` here.

    Returns ``epoch_batches`` (0: whole epochs), ``planned_batches`` (the recipe's), ``cut`` and the
    seconds per step measured for the decision (on a throwaway trainer)."""
    full = -(-len(CocoDetection(config.train_annotations, config.train_images)) // config.batch_size)
    planned = min(full, recipe.epoch_batches or full)
    schedule: dict[str, Any] = {"budget_minutes": recipe.train_minutes, "planned_batches": planned, "cut": False}
    batches = planned
    if recipe.train_minutes is not None:
        with tempfile.TemporaryDirectory() as scratch:
            step_s = statistics.median(Trainer(config, scratch).time_steps(recipe.probe_steps))
        schedule["probe_step_s"] = round(step_s, 3)
        batches = min(planned, max(1, int(recipe.train_minutes * 60 / step_s / config.epochs)))
        if batches < planned:
            schedule["cut"] = True
            logger.warning(
                "at %.2f s per step the schedule's %d steps would not fit the %.0f-min cap: cut to %d of %d batches per epoch (%d steps)",
                step_s, planned * config.epochs, recipe.train_minutes, batches, planned, batches * config.epochs,
            )  # fmt: skip
    logger.info("schedule: %d epochs of %d batches (%d steps)", config.epochs, batches, batches * config.epochs)
    return {**schedule, "epoch_batches": 0 if batches == full else batches}


def run_demo(out: Path, recipe: DemoRecipe = DemoRecipe(), device: str = "cpu") -> dict[str, Any]:
    """Run the demo into ``out``; returns the summary also written to ``out/summary.json``.

    The schedule chosen for the budget is kept in ``out/schedule.json``, so that a resumed run trains
    on with the schedule it started with (a run without that file trains whole epochs).
    """
    started = time.perf_counter()
    data = write_synthetic_dataset(out / "data", recipe.data)
    run_dir, schedule_file = out / "run", out / "schedule.json"
    resume = (run_dir / CHECKPOINT).exists()
    config = demo_train_config(recipe, data, device)
    if resume:
        schedule = json.loads(schedule_file.read_text()) if schedule_file.exists() else {"budget_minutes": None, "epoch_batches": config.epoch_batches, "cut": False}
    else:
        schedule = fit_budget(config, recipe)
        schedule_file.write_text(json.dumps(schedule, indent=2))
    config = dataclasses.replace(config, epoch_batches=schedule["epoch_batches"])
    trainer = Trainer(config, run_dir, resume=resume)
    full = -(-len(trainer.train_set) // config.batch_size)
    result = trainer.fit()
    if result.interrupted:
        raise KeyboardInterrupt
    metrics = result.metrics or trainer.evaluate()
    trained = time.perf_counter()

    model = Detector.from_checkpoint(run_dir / MODEL_FILE, device=device)
    val_images = sorted(find_split(data, "val").images.iterdir())[: recipe.predicted_images]
    drawn = predict_files(model, val_images, out / "predictions", threshold=PREDICTION_THRESHOLD, top_if_none=TOP_IF_NONE)
    gflops = encoder_gflops(model, recipe.image_size)
    summary = {
        "metrics": {k: metrics[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")},
        "model": recipe.model,
        "config": model.config.to_dict(),
        "encoder_gflops": gflops,
        "image_size": recipe.image_size,
        "train_steps": result.steps,
        "schedule": {"epochs": config.epochs, **schedule, "batches_per_epoch": config.epoch_batches or full, "full_batches_per_epoch": full},
        "seed": recipe.seed,
        "predictions": {
            "images": len(drawn),
            "threshold": PREDICTION_THRESHOLD,
            "detections": sum(len(e["detections"]) for e in drawn if not e.get("below_threshold")),
            "images_below_threshold": sum(1 for e in drawn if e.get("below_threshold")),
        },
        "precision": trainer.precision.name,
        "precision_reason": trainer.precision.reason,
        "seconds": {"train_and_eval": round(trained - started, 1), "total": round(time.perf_counter() - started, 1)},
        "threads": torch.get_num_threads(),
        "files": {
            "dataset": str(data),
            "model": str(run_dir / MODEL_FILE),
            "checkpoint": str(run_dir / CHECKPOINT),
            "log": str(run_dir / "log.jsonl"),
            "curves": str(run_dir / "curves.png"),
            "detections": str(run_dir / "detections_val.json"),
            "predictions": str(out / "predictions"),
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run(args: argparse.Namespace) -> int:
    recipe = dataclasses.replace(DemoRecipe(), seed=args.seed)
    if args.epochs is not None:
        recipe = dataclasses.replace(recipe, epochs=args.epochs, lr_drop=(max(1, args.epochs - 1),))
    if args.minutes is not None:
        recipe = dataclasses.replace(recipe, train_minutes=args.minutes or None)
    summary = run_demo(args.out, recipe, args.device)
    g = summary["encoder_gflops"]
    schedule = summary["schedule"]
    print(
        f"\nLite-DINO ({summary['model']}) trained for {summary['train_steps']} steps (seed {summary['seed']}) on the synthetic dataset"
        f" in {summary['seconds']['total'] / 60:.1f} min"
    )
    print(f"precision: {summary['precision_reason']}")
    print(f"{schedule['epochs']} epochs of {schedule['batches_per_epoch']} batches (of {schedule['full_batches_per_epoch']} in the training split)")
    if schedule.get("cut"):  # a run started by an older litedetr has no "cut"
        print(
            f"  cut from {schedule['planned_batches']} batches per epoch: this machine's {schedule['probe_step_s']:.2f} s per step would not fit"
            f" the {schedule['budget_minutes']:.0f}-min cap; lift the cap with --minutes 0"
        )
    print("COCO box metrics on its validation split:")
    print(format_metrics(summary["metrics"]))
    print(
        f"encoder GFLOPs at {summary['image_size']}x{summary['image_size']}: Lite {g['lite_encoder']:.2f} vs standard {g['standard_encoder']:.2f} "
        f"({1 - g['ratio']:.0%} fewer)"
    )
    drawn = summary["predictions"]
    print(f"predictions drawn on {drawn['images']} validation images: {drawn['detections']} detections scoring >= {drawn['threshold']}")
    if drawn["images_below_threshold"]:
        print(
            f"  {drawn['images_below_threshold']} of them had no detection scoring >= {drawn['threshold']}: their best {TOP_IF_NONE} are drawn instead"
            " (scores on the labels)"
        )
    files = summary["files"]
    print(f"model: {files['model']}\npredictions drawn: {files['predictions']}/\ncurves: {files['curves']}\nsummary: {args.out / 'summary.json'}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``litedetr demo``; sets ``func``."""
    p.add_argument("--out", type=Path, default=Path("litedetr-demo"), help="where everything goes (default ./litedetr-demo)")
    p.add_argument("--epochs", type=int_at_least(1), help=f"training epochs (default {DemoRecipe.epochs}; the learning rate drops 10x for the last one)")
    p.add_argument(
        "--minutes", type=float_in(0),
        help=f"cap on the training minutes: a slower machine cuts every epoch to fit (default {DemoRecipe.train_minutes:.0f}; 0: no cap)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=DemoRecipe.seed, help=f"training seed: initial weights and batch order (default {DemoRecipe.seed}; the dataset stays the same)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)
