"""COCO evaluation: our metrics equal pycocotools' own, through the whole evaluate() path."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from conftest import coco_box, coco_image, write_coco
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader

from litedetr.data import CocoDetection, collate
from litedetr.engine import coco_metrics, evaluate
from litedetr.engine.evaluate import METRIC_NAMES

CATEGORIES = [{"id": 3, "name": "a"}, {"id": 8, "name": "b"}]
# three 200x300 images with small, medium and large boxes of both categories; ids not contiguous
GT_BOXES = {
    1: [(3, [10, 10, 20, 20]), (8, [50, 60, 80, 70]), (3, [100, 20, 150, 160])],
    2: [(8, [5, 5, 25, 15]), (8, [200, 100, 60, 60])],
    4: [(3, [30, 40, 120, 110])],
}


@pytest.fixture
def dataset(tmp_path) -> CocoDetection:
    images = [coco_image(i, 200, 300) for i in GT_BOXES]
    flat = [(i, c, b) for i, boxes in GT_BOXES.items() for c, b in boxes]
    anns = [coco_box(n + 1, i, c, b) for n, (i, c, b) in enumerate(flat)]
    return CocoDetection(*write_coco(tmp_path, images, anns, CATEGORIES))


def pycocotools_stats(annotation_file, detections) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
        evaluator = COCOeval(gt, gt.loadRes(detections), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def detections(shift: float = 0.0, drop: int = 0, score_noise: bool = False) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for image_id, boxes in GT_BOXES.items():
        for k, (category, (x, y, w, h)) in enumerate(boxes):
            score = float(rng.uniform(0.3, 1.0)) if score_noise else 0.9 - 0.1 * k
            out.append({"image_id": image_id, "category_id": category, "bbox": [x + shift * w, y, w, h], "score": score})
    return out[drop:]


def as_metrics(stats: np.ndarray) -> dict:
    return {name: (float(v) if v >= 0 else None) for name, v in zip(METRIC_NAMES, stats)}


def test_perfect_detections_score_one(dataset):
    metrics = coco_metrics(dataset.annotations, detections())
    assert [metrics[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")] == pytest.approx([1.0] * 7)


@pytest.mark.parametrize("case", [dict(shift=0.3), dict(shift=0.6, score_noise=True), dict(drop=2), dict(shift=0.1, drop=4, score_noise=True)])
def test_metrics_equal_pycocotools(dataset, case):
    dets = detections(**case)
    ours = coco_metrics(dataset.annotations, dets)
    assert ours == as_metrics(pycocotools_stats(dataset.annotations, dets))
    assert ours["AP"] < 1.0


def test_no_detections_scores_zero(dataset):
    assert set(coco_metrics(dataset.annotations, []).values()) == {0.0}


class Oracle(nn.Module):
    """Returns the ground truth of each image (found by its size and content order) as detections."""

    def __init__(self, dataset: CocoDetection, shift: float):
        super().__init__()
        self.queue = [(s.boxes, s.labels) for s in dataset.samples]
        self.shift = shift

    def forward(self, images):
        out = []
        for _ in images:
            boxes, labels = self.queue.pop(0)
            boxes = boxes.clone()
            boxes[:, [0, 2]] += self.shift * (boxes[:, 2:3] - boxes[:, 0:1])
            out.append({"boxes": boxes, "scores": torch.linspace(0.9, 0.5, len(labels)), "labels": labels})
        return out


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_evaluate_maps_labels_and_boxes_back_to_coco(dataset, tmp_path, shift):
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate)
    metrics = evaluate(Oracle(dataset, shift), loader, torch.device("cpu"), tmp_path / "dets.json")
    written = json.loads((tmp_path / "dets.json").read_text())
    assert {d["category_id"] for d in written} == {3, 8}
    assert metrics == as_metrics(pycocotools_stats(dataset.annotations, written))
    assert (metrics["AP"] == pytest.approx(1.0)) == (shift == 0)
