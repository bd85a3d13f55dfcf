"""CPU latency against what a user would pick instead: Hugging Face transformers' RT-DETR R50-vd and
D-FINE against Lite-DINO R50 and DINO R50, each on PyTorch, ONNX Runtime and OpenVINO, side by side.

Every (model, backend) pair runs one inference call on the same random 640x640 image in turn, within
every repeat, after one untimed call each, so that load from other processes falls on all of them
alike; ``--threads`` intra-op threads everywhere. Random weights (latency does not depend on them):
our presets with their COCO heads (91 classes), transformers' models built from their default configs
with 80 labels (``RTDetrConfig()`` is RT-DETR R50-vd; ``DFineConfig()`` is D-FINE with an HGNetV2
backbone), nothing downloaded. What a call covers:

- ours, ``pytorch``: ``model(images)`` as a user calls it (batching, the detector, post-processing);
  ``onnxruntime`` / ``openvino``: the graph ``litedetr export`` writes (normalised images in, boxes,
  scores and labels out: post-processing included), float32 weights;
- transformers', ``pytorch``: ``model(pixel_values=...)`` (logits and boxes; their post-processing,
  a sigmoid and a top-k, is not timed); ``onnxruntime`` / ``openvino``: that call exported with the
  TorchScript-based exporter at opset 17 (their deformable attention lowers to ``GridSample``);
- everyone's ``pytorch-bf16``: the ``pytorch`` call under bf16 autocast, and ``openvino-bf16``: the
  OpenVINO graph with bf16 inference precision; only on CPUs that compute bf16 natively (AVX-512 BF16
  or AMX, :func:`litedetr.engine.precision.cpu_bf16_native`), otherwise reported with the reason. What
  bf16 costs in AP is measured on a trained model by ``benchmarks/quantization.py``;
- everyone's ``onnxruntime-int8``: the same ONNX graph with INT8 linear layers
  (:func:`litedetr.models.quantized.quantize_onnx`, ONNX Runtime's dynamic quantisation) in ONNX Runtime.
  What it costs in AP is measured on a trained model by ``benchmarks/quantization.py``.

A pair that cannot be built, exported or run here is reported with its one-line reason instead of a
time. Prints a table (ms, and each model's best backend against RT-DETR R50-vd's best) and writes
``peers.json`` and ``peers.md`` to ``--out``. Needs ``pip install -e ".[peers]"`` (transformers,
ONNX Runtime, OpenVINO).

    python benchmarks/peers.py [--size 640 640] [--repeats 5] [--threads 2]
        [--models rtdetr-r50vd dfine lite-dino-r50-h3l1-2x3 lite-dino-r50-h2l2-2x3 dino-r50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from litedetr.bench.timing import bench_model, interleaved_ms, load_averages, run_environment, write_results
from litedetr.engine.precision import cpu_bf16_native
from litedetr.models.exported import InferencePrecision, openvino_cpu_config, require
from litedetr.models.image_batch import IMAGENET_MEAN, IMAGENET_STD
from litedetr.models.quantized import quantize_onnx
from litedetr.tools.export import export_onnx, normalized_scene

# this folder's kernels.py would shadow the `kernels` package that transformers imports
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

BACKENDS = ("pytorch", "onnxruntime", "openvino", "onnxruntime-int8", "pytorch-bf16", "openvino-bf16")
HF_MODELS = {"rtdetr-r50vd": ("RTDetrConfig", "RTDetrForObjectDetection"), "dfine": ("DFineConfig", "DFineForObjectDetection")}
DEFAULT_MODELS = ("rtdetr-r50vd", "dfine", "lite-dino-r50-h3l1-2x3", "lite-dino-r50-h2l2-2x3", "dino-r50")
REFERENCE = "rtdetr-r50vd"
OPSET = 17

Call = Callable[[], object]


class _HFOutputs(nn.Module):
    """A transformers detector as ``pixel_values -> (logits, pred_boxes)``, for the ONNX exporter."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values=pixel_values)
        return out.logits, out.pred_boxes


def hf_model(name: str) -> nn.Module:
    """transformers' ``name`` (a key of :data:`HF_MODELS`) from its default config, 80 labels, random weights."""
    transformers = require("transformers")
    config_name, model_name = HF_MODELS[name]
    config = getattr(transformers, config_name)(num_labels=80)
    return getattr(transformers, model_name)(config).eval()


def _graph_call(path: Path, backend: str, images: np.ndarray, threads: int, precision: InferencePrecision = "float32") -> Call:
    """One call of the ONNX graph at ``path`` on ``images`` in ONNX Runtime or OpenVINO (its first input;
    ``precision``: OpenVINO's inference precision)."""
    if backend == "onnxruntime":
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: images}
        return lambda: session.run(None, feed)
    ov = require("openvino")
    compiled = ov.Core().compile_model(str(path), "CPU", openvino_cpu_config(threads, precision))
    request = compiled.create_infer_request()
    return lambda: request.infer({0: images})


def build_calls(name: str, backends: tuple[str, ...], size: tuple[int, int], threads: int, folder: Path) -> dict[str, Call | str]:
    """Per backend, a call of model ``name`` on one random image, or the reason it cannot run here."""
    images = normalized_scene(1, *size)
    calls: dict[str, Call | str] = {}
    try:
        if name in HF_MODELS:
            model: nn.Module = _HFOutputs(hf_model(name))
            pytorch_call: Call = lambda: model(images)  # noqa: E731
        else:
            model = bench_model(name, size).eval()
            raw = images * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]  # the same image in [0, 1]
            pytorch_call = lambda: model(raw)  # noqa: E731
    except Exception as error:  # noqa: BLE001 - a model that does not build is reported, not fatal
        return dict.fromkeys(backends, f"does not build: {error}".splitlines()[0])
    path, quantized = folder / f"{name}.onnx", folder / f"{name}-int8.onnx"
    bf16, why = cpu_bf16_native()
    for backend in backends:
        if backend.endswith("-bf16") and not bf16:
            calls[backend] = f"not timed: {why}"
            continue
        if backend == "pytorch":
            calls[backend] = torch.no_grad()(pytorch_call)
            continue
        if backend == "pytorch-bf16":
            calls[backend] = torch.no_grad()(torch.autocast("cpu", dtype=torch.bfloat16)(pytorch_call))
            continue
        try:
            if not path.exists():
                if name in HF_MODELS:
                    with torch.no_grad():
                        torch.onnx.export(model, (images,), str(path), dynamo=False, opset_version=OPSET, input_names=["pixel_values"])
                else:
                    export_onnx(model, path, size)
            if backend == "onnxruntime-int8":
                calls[backend] = _graph_call(quantize_onnx(path, quantized), "onnxruntime", images.numpy(), threads)
            else:
                runtime, _, precision = backend.partition("-")
                calls[backend] = _graph_call(path, runtime, images.numpy(), threads, "bf16" if precision else "float32")
        except Exception as error:  # noqa: BLE001 - an export or runtime failure is reported, not fatal
            calls[backend] = f"{backend}: {error}".splitlines()[0][:200]
    return calls


def markdown(result: dict) -> str:
    h, w = result["size"]
    lines = [
        f"One image, {h}x{w}, batch 1, {result['threads']} threads ({result['cpu_capability']}; float32 but where a column says bf16), "
        "random weights; median of "
        f"{result['repeats']} calls, every (model, backend) taking turns. Load averages (1, 5, 15 min) after: "
        + load_averages(result["load_average_after"])
        + ".",
        "",
        "| model | " + " | ".join(f"{b} ms" for b in result["backends"]) + f" | best / {REFERENCE}'s best |",
        "|---|" + "---:|" * (len(result["backends"]) + 1),
    ]
    for name, row in result["models"].items():
        cells = [f"{row[b]:.0f}" if isinstance(row[b], float) else f"- ({row[b]})" for b in result["backends"]]
        ratio = row.get("best_over_reference")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--size", nargs=2, type=int, default=[640, 640], metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size, backends = tuple(args.size), tuple(args.backends)
    with tempfile.TemporaryDirectory() as tmp:
        built = {name: build_calls(name, backends, size, args.threads, Path(tmp)) for name in args.models}
        runnable = {(name, b): call for name, calls in built.items() for b, call in calls.items() if callable(call)}
        times = interleaved_ms(runnable, args.repeats)
    result = {
        "size": list(size),
        "threads": args.threads,
        "repeats": args.repeats,
        "backends": list(backends),
        **run_environment(),
        "models": {},
    }
    for name, calls in built.items():
        result["models"][name] = {b: statistics.median(times[name, b]) if callable(call) else call for b, call in calls.items()}
    best = {name: min((v for v in row.values() if isinstance(v, float)), default=None) for name, row in result["models"].items()}
    for name, row in result["models"].items():
        reference = best.get(REFERENCE)
        row["best_over_reference"] = best[name] / reference if best[name] is not None and reference else None
    table = markdown(result)
    print(table)
    print(f"wrote {write_results(args.out, 'peers', result, table)}")


if __name__ == "__main__":
    main()
