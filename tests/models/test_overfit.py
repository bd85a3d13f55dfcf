"""Each detector family, with either encoder, overfits four synthetic images on the CPU.

Requirement: within < 90 s per test, the summed loss falls by > 10x and, for every ground-truth box,
the best-scoring prediction of its class overlaps it with IoU > 0.8.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from litedetr import build_model
from litedetr.ops import box_iou

SIZE = 64
FILLED, RING = 0, 1


def synthetic_images(size: int = SIZE) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Four textured images with 1-3 non-overlapping objects: filled squares-ish (class 0) and rings (class 1)."""
    g = torch.Generator().manual_seed(1234)
    palette = torch.tensor([[0.9, 0.15, 0.1], [0.1, 0.3, 0.9], [0.95, 0.85, 0.1], [0.1, 0.75, 0.2]])
    images, targets = [], []
    for labels in [(FILLED,), (RING, FILLED), (FILLED, RING), (RING, FILLED, RING)]:
        texture = F.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=(size, size), mode="bilinear", align_corners=False)[0]
        img = 0.35 + 0.3 * texture + 0.08 * torch.rand(3, size, size, generator=g)
        boxes: list[list[int]] = []
        for label in labels:
            while True:
                w, h = (int(v) for v in torch.randint(size * 3 // 16, size * 7 // 16, (2,), generator=g))
                x0, y0 = int(torch.randint(2, size - w - 2, (1,), generator=g)), int(torch.randint(2, size - h - 2, (1,), generator=g))
                if all(x0 >= b[2] + 4 or b[0] >= x0 + w + 4 or y0 >= b[3] + 4 or b[1] >= y0 + h + 4 for b in boxes):
                    break
            colour = palette[int(torch.randint(len(palette), (1,), generator=g))][:, None, None]
            img[:, y0 : y0 + h, x0 : x0 + w] = colour
            if label == RING:
                t = max(3, min(w, h) // 5)
                img[:, y0 + t : y0 + h - t, x0 + t : x0 + w - t] = 0.35 + 0.3 * texture[:, y0 + t : y0 + h - t, x0 + t : x0 + w - t]
            boxes.append([x0, y0, x0 + w, y0 + h])
        images.append(img.clamp(0, 1))
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return images, targets


def best_ious(preds: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> list[float]:
    """Per ground-truth box, the IoU with its class's top predictions, paired one to one (best pairing)."""
    ious = []
    for label in target["labels"].unique():
        gt = target["boxes"][target["labels"] == label]
        keep = preds["labels"] == label
        if not keep.any():
            return [0.0] * len(target["boxes"])
        top = preds["boxes"][keep][preds["scores"][keep].argsort(descending=True)[: len(gt)]]
        iou = box_iou(top, gt)[0]
        pairing = max(itertools.permutations(range(len(top)), len(gt)), key=lambda p: min(iou[i, j] for j, i in enumerate(p)), default=())
        ious += [iou[i, j].item() for j, i in enumerate(pairing)] + [0.0] * (len(gt) - len(pairing))
    return ious


CASES = {
    "deformable-detr-r18-tiny": dict(steps=150),
    "lite-deformable-detr-r18-tiny-h3l1-2x3": dict(steps=150),
    "dino-r18-tiny": dict(steps=200, dn_box_noise_scale=0.2),
    "lite-dino-r18-tiny-h3l1-2x3": dict(steps=200, dn_box_noise_scale=0.2),
    "h-detr-r18-tiny": dict(steps=260, one_to_many_queries=40),
    "lite-h-detr-r18-tiny-h3l1-2x3": dict(steps=260, one_to_many_queries=40),
}


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(CASES))
def test_tiny_preset_overfits_four_images(preset):
    torch.manual_seed(0)
    random.seed(0)
    images, targets = synthetic_images()
    settings = dict(CASES[preset])
    steps = settings.pop("steps")
    model = build_model(preset, num_classes=2, min_size=(SIZE,), max_size=SIZE, num_queries=20, num_select=20, **settings)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=1e-4, fused=True)
    history = []
    for step in range(steps):
        if step == int(0.8 * steps):
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        history.append(loss.item())
    final = sum(history[-5:]) / 5
    assert final < history[0] / 10, f"{preset}: loss {history[0]:.3f} -> {final:.3f}"
    model.eval()
    with torch.no_grad():
        preds = model(images)
    ious = [iou for p, t in zip(preds, targets) for iou in best_ious(p, t)]
    assert len(ious) == 8 and min(ious) > 0.8, f"{preset}: IoUs {[round(i, 3) for i in ious]}"
