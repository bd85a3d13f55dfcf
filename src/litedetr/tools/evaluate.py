"""``litedetr eval``: COCO box metrics of a model file, or of a graph from ``litedetr export``, on a COCO-format dataset."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from litedetr.data import CocoDetection, collate
from litedetr.engine import evaluate
from litedetr.engine.precision import inference_autocast
from litedetr.models import ExportedDetector
from litedetr.models.exported import Backend, InferencePrecision
from litedetr.tools.args import add_runtime_arguments, int_at_least
from litedetr.tools.train import add_data_arguments, format_metrics, resolve_data
from litedetr.weights import load_model, read_config
from litedetr.weights.classes import class_key

__all__ = ["add_arguments", "evaluate_model_file"]

logger = logging.getLogger(__name__)


class _GraphModel:
    """An exported graph in :func:`~litedetr.engine.evaluate`'s model interface: a batch of images ->
    every detection of the graph's top-k (no threshold), as a PyTorch detector in eval mode returns them."""

    training = False

    def __init__(self, detector: ExportedDetector):
        self.detector = detector

    def eval(self) -> _GraphModel:
        return self

    def train(self, mode: bool = True) -> _GraphModel:
        return self

    def __call__(self, images: list[torch.Tensor]) -> list[dict]:
        return self.detector.predict(images, threshold=0.0, batch_size=len(images))


def evaluate_model_file(
    checkpoint: str | Path,
    annotations: str | Path,
    images: str | Path,
    out: Path | None = None,
    batch_size: int = 2,
    device: str = "cpu",
    workers: int = 2,
    backend: Backend = "pytorch",
    precision: InferencePrecision = "float32",
) -> dict[str, float | None]:
    """COCO metrics of the model in ``checkpoint`` on a dataset; writes ``metrics.json`` and detections to ``out``.

    ``backend``: ``pytorch`` for a litedetr model file; ``onnxruntime`` or ``openvino`` for a graph
    written by ``litedetr export`` (float32 or ``--int8``), which runs on the CPU. ``precision``:
    ``"bf16"`` runs PyTorch under bf16 autocast and OpenVINO in bf16 (ONNX Runtime refuses it).

    A model whose config carries category ids covering the dataset's (e.g. a released COCO
    checkpoint's 91 rows, which are COCO's ids), under the same names where both name them, is
    scored by category id, whatever the two class counts; otherwise labels pair with the dataset's
    categories in order, and the counts must match.

    Raises:
        ValueError: the model's classes cannot be paired with the dataset's categories (named).
    """
    graph = None
    if backend != "pytorch":
        if device != "cpu":
            raise ValueError(f"--backend {backend} runs an exported graph on the CPU; leave out --device")
        graph = ExportedDetector(checkpoint, backend, precision=precision)
    config = graph.config if graph is not None else read_config(checkpoint)
    dataset = CocoDetection(annotations, images)
    category_ids = None
    named = dict(zip(config.category_ids, config.class_names)) if config.class_names else {}
    same_names = all(not named.get(i) or class_key(named[i]) == class_key(name) for i, name in zip(dataset.category_ids, dataset.class_names))
    if config.category_ids and set(dataset.category_ids) <= set(config.category_ids) and same_names:
        category_ids = config.category_ids
        logger.info("%s: scored by category id (%d model classes, %d dataset categories)", checkpoint, config.num_classes, dataset.num_classes)
    elif config.num_classes != dataset.num_classes:
        missing = sorted(set(dataset.category_ids) - set(config.category_ids))[:5] if config.category_ids else None
        raise ValueError(
            f"{checkpoint}: the model has {config.num_classes} classes, {annotations} has {dataset.num_classes} categories"
            + (f", and the model's category ids lack the dataset's {missing}" if missing else "")
        )
    elif config.class_names and config.class_names != dataset.class_names:
        logger.warning("%s: class names %s differ from the dataset's %s (labels are matched by order)", checkpoint, config.class_names, dataset.class_names)
    model = _GraphModel(graph) if graph is not None else load_model(checkpoint, device)
    loader = DataLoader(dataset, batch_size, num_workers=workers, collate_fn=collate)
    results = out / "detections.json" if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    with inference_autocast(precision if graph is None else "float32", device):
        metrics = evaluate(model, loader, torch.device(device), results, category_ids)
    if out is not None:
        (out / "metrics.json").write_text(json.dumps({"checkpoint": str(checkpoint), "annotations": str(annotations), "metrics": metrics}, indent=2))
    return metrics


def run(args: argparse.Namespace) -> int:
    annotations, images = resolve_data(args, "val", args.out / "synthetic-data")
    metrics = evaluate_model_file(args.checkpoint, annotations, images, args.out, args.batch_size, args.device, args.workers, args.backend, args.precision)
    print(format_metrics(metrics))
    print(f"metrics and detections written to {args.out}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``litedetr eval``; sets ``func``."""
    p.add_argument(
        "--checkpoint", required=True, help="a litedetr model file (.safetensors), e.g. RUN_DIR/model.safetensors; with --backend, an exported graph"
    )
    add_runtime_arguments(p)
    add_data_arguments(p, ("val",))
    p.add_argument("--out", type=Path, default=Path("litedetr-eval"), help="where metrics.json and detections.json go")
    p.add_argument("--batch-size", type=int_at_least(1), default=2)
    p.add_argument("--workers", type=int_at_least(0), default=2)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)
