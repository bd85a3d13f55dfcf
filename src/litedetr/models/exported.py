"""Run a graph written by ``litedetr export`` in ONNX Runtime or OpenVINO, with :meth:`Detector.predict`'s interface.

The graph carries the model's config (class names, image sizes) and its canvas in its metadata
(:data:`METADATA_KEY`), so :class:`ExportedDetector` resizes, normalises and names exactly as the
PyTorch model does. Images that resize to the canvas's size predict as in PyTorch (to float32
rounding); a dynamic-size graph pads smaller ones onto its canvas, which moves their detections as
batching with a larger image does in PyTorch (see :meth:`Detector.predict`): export at the size your
images resize to where that matters. Both runtimes are optional: ``pip install 'litedetr[export]'``
(ONNX Runtime) or ``'litedetr[openvino]'``.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from litedetr.models.config import DetectorConfig, config_from_dict
from litedetr.models.image_batch import resize_and_normalize
from litedetr.models.inputs import ImageInput, as_image_list, batches_by_size
from litedetr.models.postprocess import kept_detections

__all__ = [
    "BACKENDS",
    "Backend",
    "INFERENCE_PRECISIONS",
    "check_inference_precision",
    "InferencePrecision",
    "METADATA_KEY",
    "ExportedDetector",
    "OUTPUT_NAMES",
    "graph_input",
    "graph_metadata",
    "graph_runner",
    "onnx_session",
    "openvino_cpu_config",
    "require",
]

Backend = Literal["pytorch", "onnxruntime", "openvino"]
BACKENDS: tuple[str, ...] = ("pytorch", "onnxruntime", "openvino")
"""Where a model runs: PyTorch (a litedetr model file), or an exported graph in ONNX Runtime or OpenVINO."""

InferencePrecision = Literal["float32", "bf16"]
INFERENCE_PRECISIONS: tuple[str, ...] = ("float32", "bf16")
"""How a model computes at inference: float32, or bf16 (PyTorch autocast, OpenVINO's bf16 inference
precision), which pays only on CPUs with AVX-512 BF16 or AMX (and GPUs that compute bf16)."""

METADATA_KEY = "litedetr"
"""The graph metadata entry holding ``{"config": ..., "canvas": [H, W], "dynamic_size": bool}`` (JSON)."""

OUTPUT_NAMES = ("boxes", "scores", "labels")
"""The graph's outputs, in order."""

_EXTRAS = {"onnx": "export", "onnxruntime": "export", "openvino": "openvino", "nncf": "openvino", "transformers": "peers"}


def require(module: str) -> Any:
    """Import an optional runtime dependency, or fail with how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{module} is not installed: pip install 'litedetr[{_EXTRAS.get(module, 'export')}]'") from None


def graph_metadata(config: DetectorConfig, canvas: tuple[int, int], dynamic_size: bool) -> str:
    """The value stored under :data:`METADATA_KEY` in an exported graph."""
    return json.dumps({"config": config.to_dict(), "canvas": list(canvas), "dynamic_size": dynamic_size})


def _onnx_metadata(path: Path) -> str | None:
    onnx = require("onnx")
    model = onnx.load(str(path), load_external_data=False)
    return next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)


def onnx_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU inference session for ``path`` (``threads``: intra-op threads, default all)."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _openvino_metadata(path: Path) -> str | None:
    model = require("openvino").Core().read_model(str(path))
    return model.get_rt_info([METADATA_KEY]).astype(str) if model.has_rt_info([METADATA_KEY]) else None


def _onnxruntime(path: Path, threads: int | None) -> Callable[[np.ndarray], list[np.ndarray]]:
    if path.suffix != ".onnx":
        raise ValueError(f"{path}: ONNX Runtime runs .onnx graphs (an OpenVINO .xml runs with --backend openvino)")
    session = onnx_session(path, threads)
    return lambda images: session.run(list(OUTPUT_NAMES), {"images": images})


def check_inference_precision(precision: str) -> None:
    """Raise a one-line ``ValueError`` unless ``precision`` is one of :data:`INFERENCE_PRECISIONS`."""
    if precision not in INFERENCE_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(INFERENCE_PRECISIONS)}, got {precision!r}")


def openvino_cpu_config(threads: int | None = None, precision: InferencePrecision = "float32") -> dict[str, Any]:
    """OpenVINO CPU settings. ``precision``: ``"float32"`` (the default) runs the graph in the precision it
    was written in (the CPU plugin otherwise runs float32 graphs in bf16 on CPUs with AVX-512 BF16 or AMX,
    which moved scores by ~1e-2 from PyTorch's); ``"bf16"`` asks for bf16 inference (OpenVINO keeps
    float32 on CPUs without bf16). ``threads``: intra-op threads (default: OpenVINO's)."""
    check_inference_precision(precision)
    hint = {"float32": "f32", "bf16": "bf16"}[precision]
    return {"INFERENCE_PRECISION_HINT": hint, **({} if threads is None else {"INFERENCE_NUM_THREADS": threads})}


def _openvino(path: Path, threads: int | None, precision: InferencePrecision = "float32") -> Callable[[np.ndarray], list[np.ndarray]]:
    ov = require("openvino")
    compiled = ov.Core().compile_model(str(path), "CPU", openvino_cpu_config(threads, precision))
    request = compiled.create_infer_request()

    def run(images: np.ndarray) -> list[np.ndarray]:
        outputs = request.infer({"images": images})
        return [outputs[compiled.output(name)] for name in OUTPUT_NAMES]

    return run


def graph_runner(
    path: str | os.PathLike, backend: Backend, threads: int | None = None, precision: InferencePrecision = "float32"
) -> Callable[[np.ndarray], list[np.ndarray]]:
    """``images (B, 3, h, w)`` float32 normalised -> the graph's ``[boxes, scores, labels]`` in ``backend``
    (``precision``: ``"bf16"`` in OpenVINO only; ONNX Runtime runs the graph as written)."""
    if backend == "openvino":
        return _openvino(Path(path), threads, precision)
    if backend != "onnxruntime":
        raise ValueError(f"backend must be onnxruntime or openvino for an exported graph, got {backend!r}")
    if precision != "float32":
        raise ValueError(f"ONNX Runtime runs the exported graph in float32; {precision} inference is for the pytorch and openvino backends")
    return _onnxruntime(Path(path), threads)


def graph_input(image: Tensor, config: DetectorConfig, canvas: tuple[int, int], dynamic_size: bool) -> Tensor:
    """``(3, H, W)`` in [0, 1] -> an exported graph's ``(3, h, w)`` normalised input, resized as ``config``'s
    model resizes; a ValueError when it does not fit the graph's ``canvas`` (``dynamic_size``: any size up to it)."""
    resized = resize_and_normalize(image, max(config.min_size), config.max_size)
    (h, w), (height, width) = resized.shape[1:], canvas
    if (h, w) != (height, width) and not (dynamic_size and h <= height and w <= width):
        fits = f"at most {height}x{width}" if dynamic_size else f"exactly {height}x{width} (or export with --dynamic-size)"
        raise ValueError(f"an image resized to {h}x{w} does not fit the graph, which takes {fits}")
    return resized


class ExportedDetector:
    """An exported graph (``.onnx`` for ONNX Runtime or OpenVINO, ``.xml`` for OpenVINO) as a detector.

    Args:
        path: the graph, written by ``litedetr export`` (which stores the model's config in it).
        backend: ``"onnxruntime"`` or ``"openvino"``.
        threads: intra-op threads (default: the runtime's).
        precision: ``"float32"``, or ``"bf16"`` (OpenVINO only, see :func:`openvino_cpu_config`).

    Attributes:
        config: the exported model's :class:`DetectorConfig`; ``canvas``: the graph's ``(H, W)``;
        ``dynamic_size``: whether it takes any size up to the canvas.
    """

    def __init__(self, path: str | os.PathLike, backend: Backend = "onnxruntime", threads: int | None = None, precision: InferencePrecision = "float32"):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such exported graph")
        self._run = graph_runner(path, backend, threads, precision)
        metadata = _onnx_metadata(path) if path.suffix == ".onnx" else _openvino_metadata(path)
        if metadata is None:
            raise ValueError(f"{path}: the graph has no litedetr metadata; export it again with this version's `litedetr export`")
        meta = json.loads(metadata)
        self.config = config_from_dict(meta["config"])
        self.canvas: tuple[int, int] = tuple(meta["canvas"])
        self.dynamic_size: bool = meta["dynamic_size"]
        self.backend = backend

    def _input(self, image: Tensor) -> Tensor:
        return graph_input(image, self.config, self.canvas, self.dynamic_size)

    def predict(self, inputs: ImageInput | Sequence[ImageInput], threshold: float = 0.3, batch_size: int = 4) -> list[dict[str, Any]]:
        """As :meth:`litedetr.models.Detector.predict`: per image, in input order, ``boxes (N, 4)`` xyxy
        pixels of the original image (clipped to it), ``scores (N,)`` descending, ``labels (N,)`` and ``names``.

        Images of one resized size share a run of the graph (it pads a batch onto its canvas as one size).
        """
        images = as_image_list(inputs)
        results: list[dict[str, Any]] = [{} for _ in images]
        for batch in batches_by_size(images, batch_size):
            prepared = [(index, image, self._input(image)) for index, image in batch]
            while prepared:
                size = prepared[0][2].shape[1:]
                run = [item for item in prepared if item[2].shape[1:] == size]
                prepared = [item for item in prepared if item[2].shape[1:] != size]
                boxes, scores, labels = self._run(torch.stack([x for _, _, x in run]).numpy())
                for (index, image, resized), b, s, c in zip(run, boxes, scores, labels):
                    (h, w), (height, width) = image.shape[1:], resized.shape[1:]
                    scale = torch.tensor([w / width, h / height, w / width, h / height])
                    results[index] = kept_detections(
                        torch.from_numpy(b) * scale, torch.from_numpy(s), torch.from_numpy(c), (h, w), threshold, self.config.class_name
                    )
        return results
