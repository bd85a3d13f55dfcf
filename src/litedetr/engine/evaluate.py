"""COCO box evaluation through pycocotools, over one or many processes."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from litedetr.data.coco import CocoDetection
from litedetr.engine import distributed

__all__ = ["METRIC_NAMES", "coco_metrics", "detections_to_coco", "evaluate"]

logger = logging.getLogger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
"""The 12 numbers of ``COCOeval.summarize`` in order (fractions; ``None`` where COCO has no such objects)."""


def detections_to_coco(image_id: int, prediction: dict[str, torch.Tensor], category_ids: tuple[int, ...]) -> list[dict[str, Any]]:
    """One image's ``boxes (N, 4)`` xyxy / ``scores`` / ``labels`` -> COCO results entries (``bbox`` as xywh)."""
    boxes = prediction["boxes"].detach().cpu().double()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
    return [
        {"image_id": image_id, "category_id": category_ids[int(label)], "bbox": [round(v, 3) for v in box], "score": round(float(score), 5)}
        for box, score, label in zip(xywh, prediction["scores"].tolist(), prediction["labels"].tolist())
    ]


def coco_metrics(annotations: str | Path | dict[str, Any], detections: list[dict[str, Any]], image_ids: list[int] | None = None) -> dict[str, float | None]:
    """pycocotools' box metrics of ``detections`` (COCO results format) against ``annotations``.

    Args:
        annotations: the ground-truth instances JSON (a path or the loaded dict).
        image_ids: evaluate only these images (default: every image in ``annotations``).
    """
    with contextlib.redirect_stdout(io.StringIO()) as chatter:
        gt = COCO()
        gt.dataset = json.loads(Path(annotations).read_text()) if not isinstance(annotations, dict) else annotations
        gt.createIndex()
        if not detections:
            logger.warning("no detections: every metric is 0")
            return {name: 0.0 for name in METRIC_NAMES}
        dt = gt.loadRes(detections)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    logger.debug("pycocotools:\n%s", chatter.getvalue())
    return {name: (float(v) if v >= 0 else None) for name, v in zip(METRIC_NAMES, np.asarray(evaluator.stats))}


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, results_file: str | Path | None = None, category_ids: tuple[int, ...] | None = None
) -> dict[str, float | None]:
    """Run ``model`` over ``loader`` (a :class:`CocoDetection` loader, sharded over ranks) and score it.

    Label ``i`` is category ``category_ids[i]`` (default: the dataset's own ids, in order). Every rank
    returns the same metrics; rank 0 writes the detections in COCO results format to ``results_file``
    when given.
    """
    dataset: CocoDetection = loader.dataset
    was_training = model.training
    model.eval()
    per_image: dict[int, list[dict[str, Any]]] = {}
    for images, targets in tqdm(loader, desc="eval", unit="batch", leave=False, disable=not distributed.is_main()):
        if not images:
            continue
        predictions = model([img.to(device) for img in images])
        for prediction, target in zip(predictions, targets):
            per_image[target["image_id"]] = detections_to_coco(target["image_id"], prediction, category_ids or dataset.category_ids)
    model.train(was_training)
    for shard in distributed.all_gather_objects(per_image):  # a sharded epoch repeats a few images: keep each once
        per_image.update(shard)
    image_ids = sorted(per_image)
    detections = [d for i in image_ids for d in per_image[i]]
    metrics = coco_metrics(dataset.annotations, detections, image_ids) if distributed.is_main() else None
    if results_file is not None and distributed.is_main():
        Path(results_file).write_text(json.dumps(detections))
    return distributed.all_gather_objects(metrics)[0]
