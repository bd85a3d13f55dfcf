"""``litedetr eval``: COCO box metrics of a model file on a COCO-format dataset."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from litedetr.data import CocoDetection, collate
from litedetr.engine import evaluate
from litedetr.models import load_model, read_config
from litedetr.tools.args import int_at_least
from litedetr.tools.train import add_data_arguments, format_metrics, resolve_data

__all__ = ["add_arguments", "evaluate_model_file"]

logger = logging.getLogger(__name__)


def evaluate_model_file(
    checkpoint: str | Path, annotations: str | Path, images: str | Path, out: Path | None = None, batch_size: int = 2, device: str = "cpu", workers: int = 2
) -> dict[str, float | None]:
    """COCO metrics of the model in ``checkpoint`` on a dataset; writes ``metrics.json`` and detections to ``out``.

    Raises:
        ValueError: the model's class count differs from the dataset's categories.
    """
    config = read_config(checkpoint)
    dataset = CocoDetection(annotations, images)
    if config.num_classes != dataset.num_classes:
        raise ValueError(f"{checkpoint}: the model has {config.num_classes} classes, {annotations} has {dataset.num_classes} categories")
    if config.class_names and config.class_names != dataset.class_names:
        logger.warning("%s: class names %s differ from the dataset's %s (labels are matched by order)", checkpoint, config.class_names, dataset.class_names)
    model = load_model(checkpoint, device)
    loader = DataLoader(dataset, batch_size, num_workers=workers, collate_fn=collate)
    results = out / "detections.json" if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    metrics = evaluate(model, loader, torch.device(device), results)
    if out is not None:
        (out / "metrics.json").write_text(json.dumps({"checkpoint": str(checkpoint), "annotations": str(annotations), "metrics": metrics}, indent=2))
    return metrics


def run(args: argparse.Namespace) -> int:
    annotations, images = resolve_data(args, "val", args.out / "synthetic-data")
    metrics = evaluate_model_file(args.checkpoint, annotations, images, args.out, args.batch_size, args.device, args.workers)
    print(format_metrics(metrics))
    print(f"metrics and detections written to {args.out}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``litedetr eval``; sets ``func``."""
    p.add_argument("--checkpoint", required=True, help="a litedetr model file (.safetensors), e.g. RUN_DIR/model.safetensors")
    add_data_arguments(p, ("val",))
    p.add_argument("--out", type=Path, default=Path("litedetr-eval"), help="where metrics.json and detections.json go")
    p.add_argument("--batch-size", type=int_at_least(1), default=2)
    p.add_argument("--workers", type=int_at_least(0), default=2)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)
