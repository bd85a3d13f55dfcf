"""``litedetr demo``: the whole pipeline on the CPU in minutes, with nothing to download.

It writes the synthetic dataset, trains a small Lite-DINO on it, evaluates it with pycocotools,
draws its predictions on validation images and compares the encoder's GFLOPs with a standard
encoder's. Training follows a fixed schedule (the same steps on every machine); only on a machine
too slow to fit it in the time cap are the epochs after the first shortened (from the measured batch
times), and it says so. Running it again in the same ``--out`` resumes an interrupted run (or just
reports a finished one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from litedetr.bench.flops import count_flops
from litedetr.data import find_split, write_synthetic_dataset
from litedetr.engine import CHECKPOINT, MODEL_FILE, Trainer
from litedetr.engine.recipes import DemoRecipe, demo_train_config
from litedetr.models import Detector
from litedetr.models.config import EncoderConfig
from litedetr.tools.args import float_in, int_at_least
from litedetr.tools.predict import predict_files
from litedetr.tools.train import format_metrics
from litedetr.weights import load_model

__all__ = ["DemoRecipe", "demo_train_config", "run_demo", "add_arguments"]

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


def trained_schedule(trainer: Trainer, budget_minutes: float | None) -> dict[str, Any]:
    """What ``trainer`` trained (or is training): the batches of each epoch, and each cut of the time cap."""
    cuts = [r for r in trainer.history if r["kind"] == "schedule"]
    per_epoch = [next((c["epoch_batches"] for c in reversed(cuts) if c["epoch"] <= epoch), trainer.planned_batches) for epoch in range(trainer.config.epochs)]
    return {
        "budget_minutes": budget_minutes,
        "planned_batches": trainer.planned_batches,
        "batches_per_epoch": per_epoch,
        "cut": bool(cuts),
        "cuts": cuts,
        "train_seconds": round(trainer.train_seconds, 1),
    }


def run_demo(out: Path, recipe: DemoRecipe = DemoRecipe(), device: str = "cpu") -> dict[str, Any]:
    """Run the demo into ``out``; returns the summary also written to ``out/summary.json``.

    ``recipe.train_minutes`` caps the training steps (:attr:`TrainConfig.max_train_minutes`); a cut is
    kept in the run's checkpoint, so a resumed run trains on with it. A run started before the cap was
    decided during training kept its schedule in ``out/schedule.json`` and resumes with it.
    """
    started = time.perf_counter()
    data = write_synthetic_dataset(out / "data", recipe.data)
    run_dir, legacy_schedule = out / "run", out / "schedule.json"
    resume = (run_dir / CHECKPOINT).exists()
    config = dataclasses.replace(demo_train_config(recipe, data, device), max_train_minutes=recipe.train_minutes)
    if resume and legacy_schedule.exists():
        config = dataclasses.replace(config, epoch_batches=json.loads(legacy_schedule.read_text())["epoch_batches"])
    trainer = Trainer(config, run_dir, resume=resume)
    full = -(-len(trainer.train_set) // config.batch_size)
    result = trainer.fit()
    if result.interrupted:
        raise KeyboardInterrupt
    metrics = result.metrics or trainer.evaluate()
    trained = time.perf_counter()

    model = load_model(run_dir / MODEL_FILE, device)
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
        "schedule": {"epochs": config.epochs, **trained_schedule(trainer, recipe.train_minutes), "full_batches_per_epoch": full},
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
    batches = schedule["batches_per_epoch"]
    print(
        f"{len(batches)} epochs of {', '.join(map(str, batches)) if schedule['cut'] else batches[0]} batches"
        f" (of {schedule['full_batches_per_epoch']} in the training split): {schedule['train_seconds'] / 60:.1f} min of training steps"
    )
    for cut in schedule["cuts"]:
        previous = cut.get("previous_batches", cut["planned_batches"])  # records from before batches could be given back lack it
        change = "cut" if cut["epoch_batches"] < previous else "given back"
        print(
            f"  {change} after epoch {cut['epoch']} from {previous} batches: {cut['trained_seconds'] / 60:.1f} min spent at"
            f" {cut['batch_seconds']:.2f} s per batch, so the {cut['cap_minutes']:g}-min cap left {cut['epoch_batches']} for each later epoch;"
            " lift the cap with --minutes 0"
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
        help=(
            "cap on the minutes of training steps: a slower machine cuts the epochs after the first to fit "
            f"(default {DemoRecipe.train_minutes:.0f}; 0: no cap)"
        ),
    )  # fmt: skip
    p.add_argument(
        "--seed",
        type=int,
        default=DemoRecipe.seed,
        help=f"training seed: initial weights and batch order (default {DemoRecipe.seed}; the dataset stays the same)",
    )
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)
