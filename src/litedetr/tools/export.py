"""``litedetr export``: one ONNX graph from normalised images to boxes, scores and labels.

The graph (TorchScript-based exporter, opset 17 for ``GridSample``) takes ``images (B, 3, h, w)``
float32, normalised with the ImageNet mean and std (see :mod:`litedetr.models.image_batch`), and
returns the top ``num_select`` (query, class) pairs per image: ``boxes (B, N, 4)`` float32 xyxy in
pixels of the input (origin at its top-left corner), clipped to it as ``Detector.predict`` clips,
``scores (B, N)`` float32 sigmoid probabilities, descending, ``labels (B, N)`` int64 class indices
(``config.class_names`` / ``config.category_ids`` name them). The batch size is free.

Parity with PyTorch (:func:`query_parity`): every query's logits and box agree to float32 rounding
given the same ranking of the encoder's proposals. The ranking itself can differ where two proposals'
selection scores are nearer than that rounding (PyTorch reorders them too with another thread count),
and DINO-style models take each query's content by rank, so such a swap changes the final top-k.

The encoder's geometry (level offsets, reference points, proposals) is fixed by the map sizes, so
the graph holds one canvas size ``H x W``: without ``dynamic_size`` the input must be exactly
``H x W``; with it, any ``h <= H``, ``w <= W`` is padded (bottom/right) onto the canvas inside the
graph with the matching padding mask, as the PyTorch model pads a batch. Resize images to fit the
canvas first (e.g. with :func:`litedetr.models.image_batch.resized_size`); larger inputs are cropped.

The graph is always traced on the CPU, with the Triton kernels switched off
(:func:`~litedetr.ops.custom_ops.triton_disabled`): a model on a GPU is exported from a CPU copy, so
the tracer records ``GridSample`` and never meets a Triton custom op.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from litedetr.models import Detector
from litedetr.models.exported import METADATA_KEY, OUTPUT_NAMES, Backend, graph_metadata, graph_runner, onnx_session, require
from litedetr.models.image_batch import IMAGENET_MEAN, IMAGENET_STD
from litedetr.models.quantized import CALIBRATION_IMAGES, calibration_inputs, quantize_onnx, quantize_openvino
from litedetr.ops import TRACED_SAMPLING, box_cxcywh_to_xyxy, traced_sampling
from litedetr.ops.custom_ops import triton_disabled
from litedetr.tools.args import int_at_least, load_detector, size_type
from litedetr.tools.draw import synthetic_scene

__all__ = [
    "OUTPUT_NAMES",
    "OnnxDetector",
    "QueryProbe",
    "add_arguments",
    "compare_with_runtime",
    "export_openvino",
    "cpu_model",
    "export_onnx",
    "normalized_scene",
    "onnx_session",
    "query_parity",
    "spread_class_logits",
]

logger = logging.getLogger(__name__)

OPSET = 17


class OnnxDetector(nn.Module):
    """The traceable inference path of a :class:`Detector`: normalised images -> top-k detections.

    Args:
        model: the detector (eval mode).
        canvas: ``(H, W)`` the map sizes are built for; inputs are padded onto it.
    """

    def __init__(self, model: Detector, canvas: tuple[int, int]):
        super().__init__()
        self.model, self.canvas = model, canvas

    def raw_outputs(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """``(B, 3, h, w)`` normalised, padded onto the canvas -> the detector's raw outputs and ``(w, h, w, h)``
        of the input in pixels (what the normalised boxes scale by)."""
        height, width = self.canvas
        h, w = images.shape[2], images.shape[3]
        canvas = F.pad(images, (0, width - w, 0, height - h))
        rows = torch.arange(height, device=images.device)[:, None] >= h
        cols = torch.arange(width, device=images.device)[None, :] >= w
        mask = (rows | cols).expand(images.shape[0], -1, -1)
        outputs = self.model.forward_features(self.model.backbone(canvas), mask)
        valid_w, valid_h = (~cols).sum().to(images.dtype), (~rows).sum().to(images.dtype)
        return outputs, torch.stack([valid_w, valid_h, valid_w, valid_h])

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, 3, h, w)`` normalised -> ``boxes (B, N, 4)`` xyxy pixels of the input, clipped to it,
        ``scores (B, N)`` descending, ``labels (B, N)``."""
        outputs, scale = self.raw_outputs(images)
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        num_classes = logits.shape[-1]
        scores, index = logits.sigmoid().flatten(1).topk(self.model.config.num_select, dim=1)
        labels, query = index % num_classes, index // num_classes
        picked = box_cxcywh_to_xyxy(boxes).gather(1, query[..., None].expand(-1, -1, 4)).clamp(0, 1)
        return picked * scale, scores, labels


class QueryProbe(OnnxDetector):
    """Diagnostic graph for parity checks: normalised images -> per-query ``logits (B, Q, K)``, ``boxes
    (B, Q, 4)`` normalised cxcywh (before any top-k) and ``tokens (B, Q)`` int64, the encoder token
    each query was selected from, in the order the top-k ranked them.

    In PyTorch, ``ranking`` (a ``tokens`` tensor) replaces the top-k's own choice, and ``scores`` keeps
    the last run's selection scores ``(B, S)``.
    """

    def __init__(self, model: Detector, canvas: tuple[int, int], ranking: Tensor | None = None):
        super().__init__(model, canvas)
        self.ranking, self.scores = ranking, None

    def _select(self, scores: Tensor, k: int, boxes: Tensor | None) -> Tensor:
        self.scores = scores
        if self.ranking is not None:
            return self.ranking[:, :k]
        selection = self.model.query_selection
        return type(selection).select(selection, scores, k, boxes)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        selection, picked = self.model.query_selection, []
        selection.select = lambda scores, k, boxes=None: picked.append(self._select(scores, k, boxes)) or picked[-1]
        try:
            outputs, _ = self.raw_outputs(images)
        finally:
            del selection.select  # back to the class's method
        return outputs["pred_logits"], outputs["pred_boxes"], picked[0]


def spread_class_logits(model: Detector, seed: int = 1) -> Detector:
    """Redraw every class head as a trained model's spreads its logits (weights N(0, 0.1), biases
    N(-3, 0.5)), in place, so that a randomly initialised model's scores are not all nearly equal and
    parity checks do not hinge on ties; returns ``model``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.out_features == model.config.num_classes:
                module.weight.copy_(0.1 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=generator) - 3)
    return model


def query_parity(
    model: Detector, inputs: Tensor | list[Tensor], canvas: tuple[int, int], folder: str | os.PathLike, sampling: str = "grid_sample"
) -> dict[str, float]:
    """onnxruntime against PyTorch per query, before any top-k, on ``inputs``: one or several
    ``(B, 3, h, w)`` normalised batches (sizes up to the canvas), through one graph; the worst of them.

    The two rank the encoder's proposals by scores equal to float32 rounding, so proposals whose scores
    are nearer than that can come out in another order; where the query content is a learned embedding
    taken by rank (DINO's mixed query selection, H-DETR's), such a swap changes those queries' outputs
    and then the final top-k. So the per-query outputs are compared with PyTorch run on onnxruntime's
    ranking, and the ranking is compared apart. ``sampling``: how the graph samples (:func:`export_onnx`).

    Returns:
        ``logits`` and ``boxes_px``: the largest differences per query given the same ranking (boxes
        in pixels of the canvas); ``reordered``: how many query positions PyTorch's own top-k fills
        with another token (over all inputs); ``reordered_gap``: the largest selection-score gap
        between the two tokens at such a position (0 when none).
    """
    probe = QueryProbe(cpu_model(model), canvas).eval()
    path = _trace(probe, Path(folder) / "query_probe.onnx", canvas, ("logits", "boxes", "tokens"), True, sampling)
    session = onnx_session(path)
    height, width = canvas
    worst = {"logits": 0.0, "boxes_px": 0.0, "reordered": 0, "reordered_gap": 0.0}
    for images in [inputs] if isinstance(inputs, Tensor) else inputs:
        ort_logits, ort_boxes, ort_tokens = session.run(None, {"images": images.numpy()})
        with torch.no_grad(), triton_disabled():
            probe.ranking = None
            _, _, tokens = probe(images)
            scores = probe.scores
            probe.ranking = torch.from_numpy(ort_tokens)
            logits, boxes, _ = probe(images)
        moved = tokens != probe.ranking
        gaps = (scores.gather(1, tokens) - scores.gather(1, probe.ranking)).abs()[moved]
        scale = torch.tensor([width, height, width, height], dtype=boxes.dtype)
        worst = {
            "logits": max(worst["logits"], float((torch.from_numpy(ort_logits) - logits).abs().max())),
            "boxes_px": max(worst["boxes_px"], float(((torch.from_numpy(ort_boxes) - boxes).abs() * scale).max())),
            "reordered": worst["reordered"] + int(moved.sum()),
            "reordered_gap": max([worst["reordered_gap"], *gaps.tolist()]),
        }
    return worst


def _on_cpu(model: nn.Module) -> bool:
    return all(t.device.type == "cpu" for t in itertools.chain(model.parameters(), model.buffers()))


def cpu_model(model: Detector) -> Detector:
    """``model`` in eval mode if it lives on the CPU; else an eval-mode CPU copy (built from its config and
    weights, so no second copy is made on the GPU); the caller's model is left where it is."""
    if _on_cpu(model):
        return model.eval()
    copied = Detector(model.config)
    copied.load_state_dict({name: t.cpu() for name, t in model.state_dict().items()})
    return copied.eval()


def _trace(wrapper: OnnxDetector, path: Path, size: tuple[int, int], output_names: tuple[str, ...], dynamic_size: bool, sampling: str) -> Path:
    """Trace ``wrapper`` (in eval mode, on the CPU) to an ONNX file at ``path`` for ``size = (H, W)`` canvases,
    with the Triton kernels off and the deformable sampling recorded as ``sampling``
    (:func:`~litedetr.ops.traced_sampling`); the batch is free, and with ``dynamic_size`` the height and width too."""
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    dynamic_axes = {"images": axes, **{name: {0: "batch"} for name in output_names}}
    with warnings.catch_warnings(), torch.no_grad(), triton_disabled(), traced_sampling(sampling):
        warnings.simplefilter("ignore")  # tracer warnings: the map sizes become constants, by design
        torch.onnx.export(
            wrapper, (torch.zeros(1, 3, *size),), str(path), dynamo=False, opset_version=OPSET,
            input_names=["images"], output_names=list(output_names), dynamic_axes=dynamic_axes,
        )  # fmt: skip
    return path


def export_onnx(model: Detector, path: str | os.PathLike, size: tuple[int, int], dynamic_size: bool = False, sampling: str = "grid_sample") -> Path:
    """Write ``model``'s inference graph for ``size = (H, W)`` canvases to ``path`` and check it with ``onnx.checker``.

    Traced from :func:`cpu_model` with the Triton kernels off, wherever ``model`` lives. ``sampling``: the
    deformable attention's sampling as ``"grid_sample"`` (``GridSample``, the faster in ONNX Runtime and
    OpenVINO on the CPU) or ``"gather"`` (``Gather`` and ``MatMul``, for runtimes without a ``GridSample``
    they run correctly, e.g. TensorRT); see :func:`~litedetr.ops.traced_sampling`.

    Raises:
        ValueError: ``sampling`` is neither.
    """
    onnx = require("onnx")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _trace(OnnxDetector(cpu_model(model), size).eval(), path, size, OUTPUT_NAMES, dynamic_size, sampling)
    graph = onnx.load(str(path))
    entry = graph.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, graph_metadata(model.config, size, dynamic_size)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))
    logger.info("exported %s (%dx%d%s)", path, *size, ", dynamic size" if dynamic_size else "")
    return path


def export_openvino(model: Detector, path: str | os.PathLike, size: tuple[int, int], dynamic_size: bool = False, sampling: str = "grid_sample") -> Path:
    """Write ``model``'s graph as OpenVINO IR (``path``: the ``.xml``; its weights go beside it as ``.bin``),
    converted from the ONNX graph of :func:`export_onnx` (and its ``sampling``), with the same metadata."""
    ov = require("openvino")
    path = Path(path)
    with tempfile.TemporaryDirectory() as scratch:
        converted = ov.convert_model(str(export_onnx(model, Path(scratch) / "model.onnx", size, dynamic_size, sampling)))
    converted.set_rt_info(graph_metadata(model.config, size, dynamic_size), [METADATA_KEY])
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(converted, str(path), compress_to_fp16=False)  # float32 weights, as exported
    logger.info("converted to OpenVINO IR %s", path)
    return path


def normalized_scene(batch: int, height: int, width: int, seed: int = 0) -> Tensor:
    """``(B, 3, H, W)`` ImageNet-normalised synthetic scenes (:func:`~litedetr.tools.draw.synthetic_scene`)."""
    images = [torch.from_numpy(np.array(synthetic_scene(height, width, seed + i))).permute(2, 0, 1).float() / 255 for i in range(batch)]
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (torch.stack(images) - mean) / std


def compare_with_runtime(
    model: Detector, path: str | os.PathLike, images: Tensor, canvas: tuple[int, int], backend: Backend = "onnxruntime"
) -> dict[str, float]:
    """Max abs differences between the graph at ``path`` run in ``backend`` and PyTorch (on the CPU) on
    ``images (B, 3, h, w)`` (boxes in pixels, scores) and the fraction of equal labels."""
    with torch.no_grad():
        boxes, scores, labels = OnnxDetector(cpu_model(model), canvas)(images)
    got_boxes, got_scores, got_labels = graph_runner(path, backend)(images.numpy())
    return {
        "boxes": float(np.abs(got_boxes - boxes.numpy()).max()),
        "scores": float(np.abs(got_scores - scores.numpy()).max()),
        "labels_equal": float((got_labels == labels.numpy()).mean()),
    }


def run(args: argparse.Namespace) -> int:
    if args.calibration and not (args.int8 and args.format == "openvino"):
        raise ValueError("--calibration is for OpenVINO's static INT8: use it with --format openvino --int8")
    if args.int8 and args.format == "openvino" and not args.calibration:
        raise ValueError("--format openvino --int8 calibrates on images: give --calibration FOLDER (e.g. your training images)")
    model = load_detector(args.checkpoint, args.preset)
    write, backend = (export_openvino, "openvino") if args.format == "openvino" else (export_onnx, "onnxruntime")
    with tempfile.TemporaryDirectory() as scratch:
        if args.int8 and args.format == "openvino":
            calibration = calibration_inputs(args.calibration, model.config, args.size, args.dynamic_size, args.calibration_images)
            float32 = export_openvino(model, Path(scratch) / "float32.xml", args.size, args.dynamic_size, args.sampling)
            path = quantize_openvino(float32, args.out, calibration)
        elif args.int8:
            path = quantize_onnx(export_onnx(model, Path(scratch) / "float32.onnx", args.size, args.dynamic_size, args.sampling), args.out)
        else:
            path = write(model, args.out, args.size, args.dynamic_size, args.sampling)
    h, w = args.size
    check_size = (h * 3 // 4, w) if args.dynamic_size else (h, w)
    scene = normalized_scene(1, *check_size)
    diff = compare_with_runtime(model, path, scene, args.size, backend)
    inputs = f"images (B, 3, <={h}, <={w})" if args.dynamic_size else f"images (B, 3, {h}, {w})"
    print(f"wrote {path}: {inputs} normalised -> boxes (B, {model.config.num_select}, 4) xyxy px clipped, scores, labels"
          + ((" (INT8, NNCF)" if args.format == "openvino" else " (INT8 linear layers)") if args.int8 else ""))  # fmt: skip
    print(f"{backend} vs PyTorch on a {check_size[0]}x{check_size[1]} test scene: max |boxes| {diff['boxes']:.2e} px, "
          f"max |scores| {diff['scores']:.2e}, labels equal {diff['labels_equal']:.0%}")  # fmt: skip
    if args.int8:
        print("INT8 weights move scores and boxes by design: measure the AP change on your validation data (`litedetr eval`)")
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        parity = query_parity(model, scene, args.size, scratch, args.sampling)
    print(f"per query before the top-k, given the same ranking of the proposals: max |logits| {parity['logits']:.1e}, "
          f"max |boxes| {parity['boxes_px']:.1e} px; {parity['reordered']} query positions ranked otherwise by proposals "
          f"whose scores differ by at most {parity['reordered_gap']:.1e} (below float32 rounding: PyTorch reorders them too "
          "with another thread count)")  # fmt: skip
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``litedetr export``; sets ``func``."""
    p.add_argument("--checkpoint", required=True, help="a litedetr .safetensors model file (or an authors' .pth with --preset)")
    p.add_argument("--preset", help="the preset of an authors' .pth checkpoint")
    p.add_argument("--format", choices=["onnx", "openvino"], default="onnx", help="ONNX (.onnx) or OpenVINO IR (.xml + .bin); default onnx")
    p.add_argument("--size", type=size_type(32), required=True, help="input canvas HxW, e.g. 800x1333")
    p.add_argument("--dynamic-size", action="store_true", help="accept any input up to HxW (padded onto the canvas in the graph)")
    p.add_argument("--sampling", choices=TRACED_SAMPLING, default="grid_sample",
                   help="the deformable attention's sampling in the graph: GridSample (default; the faster in ONNX Runtime and OpenVINO "
                   "on the CPU) or gather (Gather and MatMul, no GridSample: for runtimes that lack it or compile it wrongly, e.g. TensorRT)")  # fmt: skip
    p.add_argument("--int8", action="store_true",
                   help="INT8: with --format onnx the linear layers (ONNX Runtime dynamic quantisation); with --format openvino "
                   "convolutions and linear layers, weights and activations (NNCF static quantisation, needs --calibration)")  # fmt: skip
    p.add_argument("--calibration", help="a folder of images like those the model will see, for --format openvino --int8")
    p.add_argument("--calibration-images", type=int_at_least(1), default=CALIBRATION_IMAGES,
                   help=f"how many of them to calibrate on (default {CALIBRATION_IMAGES})")  # fmt: skip
    p.add_argument("--out", required=True, help="output file: .onnx, or .xml for OpenVINO")
    p.set_defaults(func=run)
