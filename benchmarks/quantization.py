"""INT8 against float32 on a trained detector: the AP each way of running it reaches on the demo's
validation split, and its latency, in one table.

The model (``--model``, a litedetr model file, e.g. ``litedetr-demo/model.safetensors`` after
``litedetr demo``) is exported once at the size its validation images resize to, and run as:

- ``pytorch``: the model file itself (float32);
- ``onnxruntime`` / ``openvino``: the float32 graph of ``litedetr export``;
- ``onnxruntime-int8``: that graph with INT8 linear layers (:func:`litedetr.models.quantized.quantize_onnx`:
  ONNX Runtime's dynamic quantisation, per-channel 7-bit weights, inputs quantised per call), and
  ``onnxruntime-int8-full``: the same with full 8-bit weights (exact only on CPUs with VNNI);
- ``openvino-int8``: the 7-bit INT8 graph in OpenVINO;
- ``pytorch-bf16``: the model file under bf16 autocast, and ``openvino-bf16``: the float32 graph in
  OpenVINO with bf16 inference precision (``--precision bf16`` of ``litedetr eval`` / ``predict``);
  they pay only on CPUs with AVX-512 BF16 or AMX, and elsewhere run emulated (slow) or in float32;
- ``openvino-int8-nncf``: the float32 OpenVINO IR quantised by NNCF (:func:`litedetr.models.quantized.quantize_openvino`:
  static INT8 of convolutions and matrix products, weights and activations), calibrated on the first 100
  training images (``litedetr export --format openvino --int8 --calibration``).

AP and AP50 come from ``litedetr eval``'s path (:func:`litedetr.tools.evaluate.evaluate_model_file`,
pycocotools) on every validation image; latency is one validation image per call, batch 1, the
variants taking turns within every repeat (:func:`litedetr.bench.timing.interleaved_ms`), median.
``--data``: the COCO-format folder the model was validated on (default: the demo's synthetic dataset,
generated into ``--work``). Writes ``quantization.json`` and ``quantization.md`` to ``--out``. Needs
``pip install -e ".[export,openvino]"`` (NNCF comes with ``openvino``).

    python benchmarks/quantization.py --model litedetr-demo/model.safetensors [--data DIR] [--repeats 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from functools import partial
from pathlib import Path

import torch

from litedetr.bench.timing import interleaved_ms, load_averages, run_environment, write_results
from litedetr.data import CocoDetection, find_split, write_synthetic_dataset
from litedetr.engine.precision import inference_autocast
from litedetr.engine.recipes import DemoRecipe
from litedetr.models import Detector
from litedetr.models.exported import InferencePrecision, graph_runner
from litedetr.models.image_batch import resize_and_normalize
from litedetr.models.quantized import calibration_inputs, quantize_onnx, quantize_openvino
from litedetr.tools.evaluate import evaluate_model_file
from litedetr.tools.export import export_onnx, export_openvino
from litedetr.weights import load_model

VARIANTS = {
    # name: (graph: None for the model file, "float32", "int8", "int8-full" or "int8-nncf"; runtime; precision)
    "pytorch": (None, "pytorch", "float32"),
    "onnxruntime": ("float32", "onnxruntime", "float32"),
    "openvino": ("float32", "openvino", "float32"),
    "onnxruntime-int8": ("int8", "onnxruntime", "float32"),
    "onnxruntime-int8-full": ("int8-full", "onnxruntime", "float32"),
    "openvino-int8": ("int8", "openvino", "float32"),
    "openvino-int8-nncf": ("int8-nncf", "openvino", "float32"),
    "pytorch-bf16": (None, "pytorch", "bf16"),
    "openvino-bf16": ("float32", "openvino", "bf16"),
}
REFERENCE = "pytorch"


def write_graphs(model: Detector, size: tuple[int, int], folder: Path, graphs: set[str], data: Path) -> dict[str, Path]:
    """The ``graphs`` (of ``float32``, ``int8``, ``int8-full``, ``int8-nncf``) of ``model`` at ``size``, in ``folder``;
    NNCF calibrates on the training images of the dataset at ``data``."""
    float32 = export_onnx(model, folder / "float32.onnx", size)
    written = {"float32": float32}
    if "int8" in graphs:
        written["int8"] = quantize_onnx(float32, folder / "int8.onnx", reduce_range=True)
    if "int8-full" in graphs:
        written["int8-full"] = quantize_onnx(float32, folder / "int8-full.onnx", reduce_range=False)
    if "int8-nncf" in graphs:
        inputs = calibration_inputs(find_split(data, "train").images, model.config, size, dynamic_size=False)
        written["int8-nncf"] = quantize_openvino(export_openvino(model, folder / "float32.xml", size), folder / "int8-nncf.xml", inputs)
    return written


@torch.no_grad()
def _predict(model: Detector, image: torch.Tensor, precision: InferencePrecision) -> list[dict]:
    with inference_autocast(precision, "cpu"):
        return model([image])


def markdown(result: dict) -> str:
    h, w = result["size"]
    lines = [
        f"`{result['model']}` on {result['images']} validation images ({h}x{w} after resizing); latency: one image, batch 1, "
        f"{result['threads']} threads ({result['cpu_capability']}), median of {result['repeats']} calls, the variants taking turns. "
        "Load averages (1, 5, 15 min) after: " + load_averages(result["load_average_after"]) + ".",
        "",
        f"| variant | AP | AP50 | AP change vs {REFERENCE} | ms | speed-up vs {REFERENCE} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    reference = result["variants"][REFERENCE]
    for name, row in result["variants"].items():
        lines.append(
            f"| {name} | {100 * row['AP']:.1f} | {100 * row['AP50']:.1f} | {100 * (row['AP'] - reference['AP']):+.1f} | "
            f"{row['ms']:.1f} | {reference['ms'] / row['ms']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a trained litedetr model file (.safetensors)")
    parser.add_argument("--data", type=Path, help="COCO-format dataset folder with a val split (default: the demo's)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("quantization-work"), help="where the demo's dataset is generated")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not args.model.is_file():
        raise SystemExit(f"{args.model}: no such model file (train one with `litedetr demo`)")
    torch.set_num_threads(args.threads)
    data = args.data or write_synthetic_dataset(args.work / "data", DemoRecipe().data)
    val = find_split(data, "val")
    dataset = CocoDetection(val.annotations, val.images)
    model = load_model(args.model).eval()
    image = dataset[0][0].float() / 255
    sample = resize_and_normalize(image, max(model.config.min_size), model.config.max_size)
    size = tuple(sample.shape[1:])
    variants = [name for name in VARIANTS if name in args.variants or name == REFERENCE]
    with tempfile.TemporaryDirectory() as tmp:
        graphs = write_graphs(model, size, Path(tmp), {VARIANTS[name][0] for name in variants}, data)
        metrics, calls = {}, {}
        for name in variants:
            graph, runtime, precision = VARIANTS[name]
            checkpoint = args.model if graph is None else graphs[graph]
            metrics[name] = evaluate_model_file(checkpoint, val.annotations, val.images, None, 4, "cpu", 0, runtime, precision)
            if graph is None:
                calls[name] = partial(_predict, model, image, precision)
            else:
                run, feed = graph_runner(checkpoint, runtime, args.threads, precision), sample[None].numpy()
                calls[name] = lambda run=run, feed=feed: run(feed)
        times = interleaved_ms(calls, args.repeats)
    result = {
        "model": str(args.model),
        "data": str(data),
        "images": len(dataset),
        "size": list(size),
        "threads": args.threads,
        "repeats": args.repeats,
        **run_environment(),
        "variants": {name: {**metrics[name], "ms": statistics.median(times[name])} for name in variants},
    }
    table = markdown(result)
    print(table)
    print(f"wrote {write_results(args.out, 'quantization', result, table)}")


if __name__ == "__main__":
    main()
