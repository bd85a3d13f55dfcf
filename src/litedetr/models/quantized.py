"""INT8 post-training quantisation of the graphs ``litedetr export`` writes: ONNX Runtime's dynamic
quantisation of the linear layers, and OpenVINO's static quantisation (NNCF) calibrated on images.

The quantised graphs keep the float32 graph's inputs, outputs and metadata, so
:class:`~litedetr.models.exported.ExportedDetector` runs them unchanged. ONNX Runtime and OpenVINO/NNCF
are optional (``pip install 'litedetr[export]'`` or ``'litedetr[openvino]'``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from litedetr.models.config import DetectorConfig
from litedetr.models.exported import METADATA_KEY, graph_input, require
from litedetr.models.inputs import find_images, to_image_tensor

__all__ = ["CALIBRATION_IMAGES", "calibration_inputs", "quantize_onnx", "quantize_openvino"]

logger = logging.getLogger(__name__)

CALIBRATION_IMAGES = 100
"""How many images OpenVINO's static INT8 quantisation calibrates on by default (NNCF's advice: ~300; 100 keep a small model's export quick)."""


def quantize_onnx(path: str | os.PathLike, out: str | os.PathLike, reduce_range: bool = True) -> Path:
    """INT8 post-training dynamic quantisation (ONNX Runtime) of the graph at ``path``, written to ``out``.

    Every ``MatMul``/``Gemm`` with a constant weight (the linear layers: projections, FFNs, heads) gets
    INT8 weights, per output channel, and its input is quantised per call (``MatMulInteger``); the
    convolutions, the deformable sampling and the post-processing stay float32. Inputs, outputs and
    the metadata are those of the float32 graph, so :class:`~litedetr.models.exported.ExportedDetector`
    runs it unchanged (ONNX Runtime and OpenVINO). ``reduce_range``: 7-bit weights, which CPUs without
    VNNI need to multiply 8-bit values without saturating (a graph may run on another CPU than the one
    that wrote it); ``False`` keeps the full 8 bits.
    """
    quantization = require("onnxruntime.quantization")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    quantizer_log = logging.getLogger()  # onnxruntime's quantiser advises pre-processing on the root logger
    level = quantizer_log.level
    quantizer_log.setLevel(logging.ERROR)
    try:
        quantization.quantize_dynamic(
            str(path), str(out), op_types_to_quantize=["MatMul", "Gemm"], per_channel=True, reduce_range=reduce_range,
            weight_type=quantization.QuantType.QInt8,
        )  # fmt: skip
    finally:
        quantizer_log.setLevel(level)
    logger.info("quantised %s to INT8 linear layers: %s", path, out)
    return out


def calibration_inputs(
    folder: str | os.PathLike, config: DetectorConfig, canvas: tuple[int, int], dynamic_size: bool, count: int = CALIBRATION_IMAGES
) -> list[np.ndarray]:
    """The first ``count`` images of ``folder`` (sorted) as ``(1, 3, h, w)`` inputs of a graph exported from a
    ``config`` model at ``canvas``: resized and normalised as the model does (:func:`~litedetr.models.exported.graph_input`).
    Unreadable images and images that do not fit the canvas are skipped, with a count logged; none left is an error."""
    inputs, skipped = [], []
    for path in find_images([folder]):
        if len(inputs) == count:
            break
        try:
            inputs.append(graph_input(to_image_tensor(path), config, canvas, dynamic_size)[None].numpy())
        except ValueError as err:
            skipped.append(str(err))
    if skipped:
        logger.warning("calibration: skipped %d image(s) of %s, e.g. %s", len(skipped), folder, skipped[0])
    if not inputs:
        raise ValueError(f"{folder}: no image to calibrate on ({len(skipped)} skipped: {skipped[0] if skipped else 'none found'})")
    return inputs


def quantize_openvino(path: str | os.PathLike, out: str | os.PathLike, calibration: list[np.ndarray]) -> Path:
    """INT8 post-training static quantisation (OpenVINO's NNCF) of the OpenVINO IR at ``path``, written to ``out`` (``.xml``).

    NNCF measures every activation's range on the ``calibration`` inputs (:func:`calibration_inputs`) and
    inserts INT8 quantisation before the convolutions and matrix products (the backbone, the projections,
    FFNs and heads; transformer preset: softmax and the attention's sums stay float32), so OpenVINO runs
    them as INT8 arithmetic. Inputs, outputs and the metadata are those of the float32 graph
    (:class:`~litedetr.models.exported.ExportedDetector` runs it unchanged).
    """
    ov, nncf = require("openvino"), require("nncf")
    model = ov.Core().read_model(str(path))
    quantized = nncf.quantize(model, nncf.Dataset(calibration), subset_size=len(calibration), model_type=nncf.ModelType.TRANSFORMER)
    quantized.set_rt_info(model.get_rt_info([METADATA_KEY]).astype(str), [METADATA_KEY])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    logger.info("quantised %s to INT8 (NNCF, %d calibration images): %s", path, len(calibration), out)
    return out
