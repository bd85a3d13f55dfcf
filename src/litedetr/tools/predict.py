"""``litedetr predict``: detect objects in images and write the boxes (JSON) and annotated pictures (PNG).

Output in ``--out``: ``predictions.json``, one list entry per image in input order::

    [{"image": "photos/a.jpg", "width": 640, "height": 480, "drawing": "a.png",
      "detections": [{"box": [x0, y0, x1, y1], "score": 0.91, "label": 15, "name": "cat", "category_id": 17}, ...]}, ...]

with boxes in pixels of the original image, ``label`` the model's class index and ``category_id`` the
training dataset's category id (when the model file holds them: models trained by litedetr 0.2 do),
and ``<image stem>.png`` per image (``-2``, ``-3`` ... appended when stems repeat) with the boxes,
class names and scores drawn.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from litedetr.engine.precision import inference_autocast
from litedetr.models import Detector, ExportedDetector
from litedetr.models.inputs import SIZE_WINDOW_BATCHES, find_images, load_image
from litedetr.tools.args import add_runtime_arguments, float_in, int_at_least, load_detector
from litedetr.tools.draw import draw_detections
from litedetr.weights import WEIGHTS

__all__ = ["predict_files", "add_arguments"]

logger = logging.getLogger(__name__)


def _unique_names(paths: list[Path]) -> list[str]:
    names, seen = [], {}
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        names.append(path.stem if seen[path.stem] == 1 else f"{path.stem}-{seen[path.stem]}")
    return names


def _readable(paths: list[Path], names: list[str], strict: bool) -> list[tuple[Path, str, Image.Image]]:
    """The images of ``paths`` that can be read; the others are logged and left out (raised with ``strict``)."""
    readable = []
    for path, name in zip(paths, names):
        try:
            readable.append((path, name, load_image(path)))
        except ValueError as err:
            if strict:
                raise
            logger.warning("skipped %s", err)
    return readable


def predict_files(
    model: Detector | ExportedDetector,
    paths: list[Path],
    out: Path,
    threshold: float = 0.3,
    batch_size: int = 4,
    strict: bool = False,
    top_if_none: int = 0,
) -> list[dict[str, Any]]:
    """Detect, draw ``<stem>.png`` per image and write ``predictions.json`` into ``out``; returns the JSON's entries.

    An image that cannot be read is skipped with a warning (no entry); with ``strict`` it stops the run.
    Where no detection of an image reaches ``threshold``, its ``top_if_none`` best ones are drawn and
    listed instead, and its entry says so (``"below_threshold": true``), so that a weak model still shows
    what it finds.
    """
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    names = _unique_names(paths)
    window = SIZE_WINDOW_BATCHES * batch_size  # read a few batches at a time, so that predict can batch them by size
    for start in range(0, len(paths), window):
        chunk = _readable(paths[start : start + window], names[start : start + window], strict)
        if not chunk:
            continue
        images = [image for _, _, image in chunk]
        for (path, name, image), result in zip(chunk, model.predict(images, 0.0 if top_if_none else threshold, batch_size)):
            keep = result["scores"] >= threshold
            below = not bool(keep.any()) and top_if_none > 0
            if below:
                keep = torch.arange(len(keep)) < top_if_none  # scores come sorted, best first
            result = {k: v[keep] if torch.is_tensor(v) else [n for n, kept in zip(v, keep.tolist()) if kept] for k, v in result.items()}
            drawing = f"{name}.png"
            draw_detections(image, result["boxes"], result["scores"], result["labels"], result["names"]).save(out / drawing)
            ids = model.config.category_ids
            detections = [
                {"box": [round(v, 2) for v in box], "score": round(score, 4), "label": label, "name": cls} | ({"category_id": ids[label]} if ids else {})
                for box, score, label, cls in zip(result["boxes"].tolist(), result["scores"].tolist(), result["labels"].tolist(), result["names"])
            ]
            entry = {"image": str(path), "width": image.width, "height": image.height, "drawing": drawing, "detections": detections}
            entries.append(entry | ({"below_threshold": True} if below else {}))
    (out / "predictions.json").write_text(json.dumps(entries, indent=1))
    return entries


def run(args: argparse.Namespace) -> int:
    if args.backend == "pytorch":
        model: Detector | ExportedDetector = load_detector(args.checkpoint, args.preset, args.device, args.weights)
    elif args.preset or args.device != "cpu":
        raise ValueError(f"--preset and --device apply to PyTorch checkpoints; --backend {args.backend} runs an exported graph on the CPU")
    else:
        model = ExportedDetector(args.checkpoint, args.backend, precision=args.precision)
    paths = find_images(args.images)
    with inference_autocast(args.precision if args.backend == "pytorch" else "float32", args.device):
        entries = predict_files(model, paths, Path(args.out), args.threshold, args.batch_size, args.strict)
    if not entries:
        raise ValueError(f"none of the {len(paths)} images could be read (named above)")
    total = sum(len(e["detections"]) for e in entries)
    skipped = f" ({len(paths) - len(entries)} unreadable images skipped, named above)" if len(entries) < len(paths) else ""
    print(f"{len(entries)} images{skipped}, {total} detections with score >= {args.threshold}: {Path(args.out) / 'predictions.json'} and one PNG per image")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``litedetr predict``; sets ``func``."""
    p.add_argument("images", nargs="+", help="image files and/or directories of images")
    p.add_argument(
        "--checkpoint", required=True, help="a litedetr .safetensors model file (or an authors' .pth with --preset); with --backend, an exported graph"
    )
    add_runtime_arguments(p)
    p.add_argument("--preset", help="the preset of an authors' .pth checkpoint, e.g. lite-dino-r50-h3l1-2x3")
    p.add_argument("--weights", choices=WEIGHTS, default="auto", help="of a .pth holding a model and its EMA: the EMA (auto, ema) or the model")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--threshold", type=float_in(0, 1), default=0.3, help="keep detections scoring at least this (default 0.3)")
    p.add_argument("--batch-size", type=int_at_least(1), default=4, help="images per forward pass (default 4)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it with a warning")
    p.set_defaults(func=run)
