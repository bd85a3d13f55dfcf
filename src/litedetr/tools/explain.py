"""``litedetr explain``: where one encoder token looks (the paper's Fig. 5) and the encoder's token schedule.

For a chosen encoder token (``--query N``, a flat index into the multi-scale sequence, finest level
first) or the token nearest the centre of a detection (``--object K``, the K-th by score, on
``--level``), every encoder layer in which that token is a query contributes its deformable (or
KDA) sampling locations and attention weights, captured from the model's forward pass through
:attr:`litedetr.nn.MultiScaleDeformableAttention.capture`. Writes into ``--out``:

- ``attention.png``: rows = those layers, columns = levels; the ``--top`` strongest samples of each
  level over the image, coloured and sized by weight (averaged over heads, so a layer's weights sum to 1);
- ``schedule.png``: which levels are queries in which layer, with the narrow-FFN tokens marked;
- ``explain.json``: the token, and per layer every location (pixels of the original image) and weight.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from torch import Tensor

from litedetr.models import Detector
from litedetr.models.image_batch import batch_images
from litedetr.models.inputs import ImageInput, to_image_tensor
from litedetr.models.postprocess import postprocess
from litedetr.nn import LayerQueries
from litedetr.ops import level_start_index
from litedetr.tools.args import int_at_least, load_detector

__all__ = ["LayerSamples", "Explanation", "capture_encoder_attention", "explain", "plot_attention", "plot_schedule", "add_arguments"]


@dataclass
class LayerSamples:
    """One encoder layer's attention for the explained token.

    Attributes:
        layer: encoder layer index.
        normalized: ``(M, L, P, 2)`` the model's sampling locations ``(x, y)`` in [0, 1] of each level's map.
        pixels: ``(M, L, P, 2)`` the same in pixels of the original image.
        weights: ``(M, L, P)`` attention weights (each head's sum to 1).
    """

    layer: int
    normalized: Tensor
    pixels: Tensor
    weights: Tensor


@dataclass
class Explanation:
    """Attributes:
    token: flat index of the token in the encoder sequence; level, row, col: where it sits.
    token_xy: its cell centre in pixels of the original image.
    spatial_shapes: ``(H_l, W_l)`` per level; strides: each level's stride in input pixels.
    image_size: ``(H, W)`` of the original image.
    schedule: the encoder's queries per layer at these shapes.
    layers: one entry per layer in which the token is a query.
    """

    token: int
    level: int
    row: int
    col: int
    token_xy: tuple[float, float]
    spatial_shapes: list[tuple[int, int]]
    strides: list[int]
    image_size: tuple[int, int]
    schedule: list[LayerQueries]
    layers: list[LayerSamples]


@contextmanager
def capture_encoder_attention(model: Detector) -> Iterator[dict[int, tuple[Tensor, Tensor]]]:
    """While active, every encoder layer's attention stores ``layer -> (locations (B, Lq, M, L, P, 2), weights (B, Lq, M, L, P))``."""
    captured: dict[int, tuple[Tensor, Tensor]] = {}
    layers = list(model.encoder.layers)

    def recorder(index: int):
        return lambda locations, weights: captured.__setitem__(index, (locations.detach(), weights.detach()))

    for i, layer in enumerate(layers):
        layer.self_attn.capture = recorder(i)
    try:
        yield captured
    finally:
        for layer in layers:
            layer.self_attn.capture = None


@torch.no_grad()
def explain(model: Detector, image: ImageInput, query: int | None = None, object_index: int = 0, level: int | None = None) -> Explanation:
    """Sampling locations and weights of one encoder token in every layer where it is a query.

    Args:
        model: the detector.
        image: one image (see :mod:`litedetr.models.inputs`).
        query: flat token index; if None, the token of ``level`` nearest the centre of detection ``object_index``.
        object_index: which detection (by descending score) when ``query`` is None.
        level: level for ``object_index`` (default: the finest level that is a query in every layer).
    """
    model.eval()
    picture = to_image_tensor(image).to(model.input_stage.level_embed.device)
    cfg = model.config
    batch = batch_images([picture], cfg.min_size, cfg.max_size, training=False)
    features = model.backbone(batch.tensors)
    with capture_encoder_attention(model) as captured:
        outputs = model.forward_features(features, batch.mask)
    shapes_t = model.input_stage(features, batch.mask).spatial_shapes
    shapes = list(shapes_t)
    padded_h, padded_w = batch.tensors.shape[-2:]
    strides = [2 ** round(math.log2(padded_w / w)) for _, w in shapes]
    orig_h, orig_w = picture.shape[1:]
    scale_x, scale_y = orig_w / (~batch.mask[0, 0]).sum().item(), orig_h / (~batch.mask[0, :, 0]).sum().item()
    starts = level_start_index(shapes_t).tolist()
    schedule = model.encoder.schedule(shapes_t)

    if query is None:
        level = max(model.encoder.query_levels) if level is None else level
        if not 0 <= level < len(shapes):
            raise ValueError(f"level must be in 0..{len(shapes) - 1}, got {level}")
        detections = postprocess(outputs["pred_logits"], outputs["pred_boxes"], batch.sizes, cfg.num_select)[0]
        if not 0 <= object_index < len(detections["scores"]):
            raise ValueError(f"object must be in 0..{len(detections['scores']) - 1}, got {object_index}")
        x0, y0, x1, y1 = detections["boxes"][object_index].tolist()
        h, w = shapes[level]
        row = min(max(int((y0 + y1) / 2 / scale_y / strides[level]), 0), h - 1)
        col = min(max(int((x0 + x1) / 2 / scale_x / strides[level]), 0), w - 1)
        query = starts[level] + row * w + col
    total = sum(h * w for h, w in shapes)
    if not 0 <= query < total:
        raise ValueError(f"query must be a token index in 0..{total - 1}, got {query}")
    level = max(i for i, start in enumerate(starts) if start <= query)
    row, col = divmod(query - starts[level], shapes[level][1])

    to_pixels = torch.tensor([[w * s * scale_x, h * s * scale_y] for (h, w), s in zip(shapes, strides)])  # (L, 2)
    layers = []
    for step in schedule:
        if step.first_level > level:
            continue
        locations, weights = captured[step.layer]
        index = query - starts[step.first_level]
        normalized = locations[0, index].cpu()
        layers.append(LayerSamples(step.layer, normalized, normalized * to_pixels[None, :, None], weights[0, index].cpu()))
    token_xy = ((col + 0.5) * strides[level] * scale_x, (row + 0.5) * strides[level] * scale_y)
    return Explanation(query, level, row, col, token_xy, shapes, strides, (orig_h, orig_w), schedule, layers)


def _background(image: ImageInput) -> np.ndarray:
    return to_image_tensor(image).permute(1, 2, 0).cpu().numpy()


def plot_attention(explanation: Explanation, image: ImageInput, path: Path, top: int = 16) -> None:
    """The ``top`` strongest samples per layer and level over the image (rows: layers, columns: levels)."""
    rows, cols = len(explanation.layers), len(explanation.spatial_shapes)
    background = _background(image)
    h, w = explanation.image_size
    panel = 3.2
    fig = Figure(figsize=(panel * cols * max(w / h, 0.6) + 1.5, panel * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    heads = explanation.layers[0].weights.shape[0]
    vmax = max(float(s.weights.max()) for s in explanation.layers) / heads
    cmap = colormaps["plasma"]
    for r, samples in enumerate(explanation.layers):
        for lvl in range(cols):
            ax = axes[r, lvl]
            ax.imshow(background, alpha=0.55)
            weights = samples.weights[:, lvl].flatten() / heads
            points = samples.pixels[:, lvl].reshape(-1, 2)
            order = weights.argsort(descending=True)[:top]
            inside = (points[order] >= 0).all(1) & (points[order, 0] <= w) & (points[order, 1] <= h)
            shown = order[inside]
            ax.scatter(points[shown, 0], points[shown, 1], c=weights[shown], cmap=cmap, vmin=0, vmax=vmax,
                       s=20 + 400 * weights[shown] / vmax, edgecolors="white", linewidths=0.6)  # fmt: skip
            ax.plot(*explanation.token_xy, marker="*", color="cyan", markersize=16, markeredgecolor="black")
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            ax.set_xticks([])
            ax.set_yticks([])
            share = float(samples.weights[:, lvl].sum()) / heads
            ax.set_title(f"layer {samples.layer}, stride {explanation.strides[lvl]}: {share:.0%} of weight", fontsize=9)
    fig.colorbar(ScalarMappable(Normalize(0, vmax), cmap), ax=axes, shrink=0.6, label="attention weight (mean over heads)")
    star = Line2D([], [], marker="*", color="cyan", markeredgecolor="black", markersize=14, linestyle="none")
    fig.legend([star], [f"query token {explanation.token} (stride {explanation.strides[explanation.level]})"], loc="outside upper left")
    fig.suptitle(f"Encoder sampling locations: top {top} per level")
    fig.savefig(path, dpi=110)


def plot_schedule(schedule: list[LayerQueries], spatial_shapes: list[tuple[int, int]], strides: list[int], path: Path, token_level: int | None = None) -> None:
    """A layer x level grid: which levels are queries in each layer, and which take the narrow FFN."""
    n_layers, n_levels = len(schedule), len(strides)
    ends = np.cumsum([h * w for h, w in spatial_shapes])
    fig = Figure(figsize=(1.0 * n_layers + 3.6, 0.7 * n_levels + 1.8))
    ax = fig.subplots()
    colors = {"query": "#3b75af", "narrow": "#ef8636", "key": "#e8e8e8"}
    for step in schedule:
        narrow_levels = int((ends <= step.narrow_ffn_tokens).sum())
        for lvl in range(n_levels):
            kind = "key" if lvl < step.first_level else ("narrow" if lvl < narrow_levels else "query")
            ax.add_patch(Rectangle((step.layer, lvl), 0.92, 0.88, color=colors[kind]))
        ax.text(step.layer + 0.46, n_levels + 0.3, f"{step.num_queries / step.num_tokens:.0%}", ha="center", fontsize=9)
    if token_level is not None:
        ax.axhline(token_level + 0.44, color="black", linestyle=":", linewidth=1)
    ax.set_xlim(-0.1, n_layers)
    ax.set_ylim(n_levels + 0.6, -0.1)
    ax.set_xticks([i + 0.46 for i in range(n_layers)], [str(i) for i in range(n_layers)])
    ax.set_yticks([i + 0.44 for i in range(n_levels)], [f"stride {s} ({h}x{w})" for s, (h, w) in zip(strides, spatial_shapes)])
    ax.set_xlabel("encoder layer (bottom: share of tokens that are queries)")
    handles = [Patch(color=colors["query"], label="query (full FFN)"), Patch(color=colors["narrow"], label="query, narrow FFN"),
               Patch(color=colors["key"], label="key/value only")]  # fmt: skip
    if token_level is not None:
        handles.append(Line2D([], [], color="black", linestyle=":", label="explained token's level"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    ax.set_title("Encoder token schedule")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _to_json(explanation: Explanation) -> dict:
    return {
        "token": explanation.token, "level": explanation.level, "row": explanation.row, "col": explanation.col,
        "token_xy": list(explanation.token_xy), "spatial_shapes": explanation.spatial_shapes, "strides": explanation.strides,
        "image_size": list(explanation.image_size),
        "layers": [{"layer": s.layer, "locations_px": s.pixels.tolist(), "weights": s.weights.tolist()} for s in explanation.layers],
    }  # fmt: skip


def run(args: argparse.Namespace) -> int:
    model = load_detector(args.checkpoint, args.preset, args.device)
    result = explain(model, args.image, args.query, args.object, args.level)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_attention(result, args.image, out / "attention.png", args.top)
    plot_schedule(result.schedule, result.spatial_shapes, result.strides, out / "schedule.png", result.level)
    (out / "explain.json").write_text(json.dumps(_to_json(result)))
    print(f"token {result.token} (stride {result.strides[result.level]}, row {result.row}, col {result.col}) is a query in "
          f"{len(result.layers)} of {len(result.schedule)} layers: wrote attention.png, schedule.png, explain.json to {out}")  # fmt: skip
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``litedetr explain``; sets ``func``."""
    p.add_argument("image", help="an image file")
    p.add_argument("--checkpoint", required=True, help="a litedetr .safetensors model file (or an authors' .pth with --preset)")
    p.add_argument("--preset", help="the preset of an authors' .pth checkpoint")
    p.add_argument("--out", required=True, help="output directory")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--query", type=int_at_least(0), help="flat encoder token index (finest level first)")
    which.add_argument("--object", type=int_at_least(0), default=0, help="explain the token at the centre of the K-th detection (default 0)")
    p.add_argument("--level", type=int_at_least(0), help="level of the token for --object (default: the finest level queried in every layer)")
    p.add_argument("--top", type=int_at_least(1), default=16, help="strongest samples drawn per layer and level (default 16)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=run)
