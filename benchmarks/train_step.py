"""One training step of DINO and of the Lite-DINO with KDA and with plain deformable attention (MSDA),
in float32 and under bf16 autocast, side by side and alternating in one process.

Two suites:

- ``demo`` (default): four ``*-r18-tiny`` models with the demo's training settings
  (:class:`litedetr.engine.recipes.DemoRecipe`: 160x160 images, batch 4): DINO, Lite-DINO
  H3L1-(2+1)x3 with KDA plus query logits (the demo's model), with KDA as the authors train it and
  with MSDA.
- ``r50``: ``dino-r50`` and ``lite-dino-r50-h3l1-2x3`` with KDA and with MSDA, each preset's own
  training settings (frozen stem, layer 1 and batch norm), 640x640 images, batch 2.

A step is the trainer's own (loading a batch, then :meth:`litedetr.engine.Trainer.train_step`: forward
under autocast for bf16, backward, gradient clipping and a fused AdamW step) on one synthetic batch.
Every (model, precision) gets its own trainer from the same seed; the timed steps take turns
(model 1 float32, model 1 bf16, model 2 float32, ...), so all see the same machine load. Whether
bf16 pays depends on the CPU: with AVX-512 BF16 or AMX it is native, on AVX2 it is emulated and
several times slower than float32 (``--precisions float32`` skips it there). In the same rotation each
model's encoder runs alone, forward and backward, on the input-stage tokens of one batch
(:func:`litedetr.bench.timing.encoder_run`): the step less its encoder, over DINO's step, is the least
a Lite step could cost against DINO's if its encoder took no time at all. Prints a table with each
step's ratio to DINO's and KDA's (with and without query logits) to MSDA's, and writes ``train_step[_<suite>].json`` to ``--out``
(``_<capability>_emulated`` added when the ATen and oneDNN instruction sets are lowered by
environment variables).

    python benchmarks/train_step.py [--suite demo|r50] [--steps 10] [--threads 2] [--precisions float32 bf16]
    # emulate an AVX2 CPU on an AVX-512 one: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/train_step.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from litedetr.bench.runs import Variant, lite_dino_variants, variant_recipe
from litedetr.bench.timing import bench_images, encoder_run
from litedetr.data import write_synthetic_dataset
from litedetr.engine import Trainer
from litedetr.engine.precision import cpu_bf16_native, resolve_precision
from litedetr.engine.recipes import DemoRecipe, demo_train_config
from litedetr.models import get_config

PRECISIONS = {"float32": False, "bf16": True}
"""Name -> TrainConfig.amp (bf16 autocast on the CPU)."""


@dataclass(frozen=True)
class Suite:
    models: tuple[Variant, ...]
    """Named ``dino``, ``lite-kda`` and ``lite-msda`` (and in the demo suite ``lite-kda-ql``)."""
    image_size: int
    batch_size: int
    demo_settings: bool
    """True: the demo's model overrides and learning rates; False: each preset's own."""


def _demo_models() -> tuple[Variant, ...]:
    variants = lite_dino_variants()
    names = {"dino": "dino", "h3l1-2x3-ql": "lite-kda-ql", "h3l1-2x3": "lite-kda", "h3l1-2x3-msda": "lite-msda"}
    return tuple(dataclasses.replace(variants[name], name=key) for name, key in names.items())


def _r50_models() -> tuple[Variant, ...]:
    lite = "lite-dino-r50-h3l1-2x3"
    msda = {"encoder": dataclasses.replace(get_config(lite).encoder, key_aware=False), "decoder_key_aware": False}
    return (
        Variant("dino", "DINO R50 (standard encoder, MSDA)", "dino-r50", {}),
        Variant("lite-kda", "Lite-DINO R50 H3L1-(2+1)x3 KDA", lite, {}),
        Variant("lite-msda", "Lite-DINO R50 H3L1-(2+1)x3 MSDA", lite, msda),
    )


SUITES = {
    "demo": lambda: Suite(_demo_models(), DemoRecipe.image_size, DemoRecipe.batch_size, True),
    "r50": lambda: Suite(_r50_models(), 640, 2, False),
}


def _recipe(suite: Suite, model: Variant, batch_size: int) -> DemoRecipe:
    """The demo's recipe training ``model`` on one synthetic batch size of the suite's images."""
    recipe = DemoRecipe()
    spec = dataclasses.replace(recipe.data, num_train=4 * batch_size, num_val=1, image_size=(suite.image_size, suite.image_size))
    recipe = dataclasses.replace(recipe, data=spec, image_size=suite.image_size, batch_size=batch_size, workers=0)
    if not suite.demo_settings:
        recipe = dataclasses.replace(recipe, model_overrides=())
    return variant_recipe(recipe, model)


def _ratio(times: dict[str, float], key: str, over: str) -> float | None:
    return times[key] / times[over] if key in times and over in times else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="demo")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model and precision (after 2 untimed ones)")
    parser.add_argument("--batch-size", type=int, help="default: the suite's (demo 4, r50 2)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    suite = SUITES[args.suite]()
    batch_size = args.batch_size or suite.batch_size
    warmup = 2
    times: dict[tuple[str, str], list[float]] = {}
    encoder_times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        trainers: dict[tuple[str, str], Trainer] = {}
        for model in suite.models:
            recipe = _recipe(suite, model, batch_size)
            data = write_synthetic_dataset(Path(tmp) / "data", recipe.data)
            config = demo_train_config(recipe, data, "cpu")
            if not suite.demo_settings:
                config = dataclasses.replace(config, lr_backbone=config.lr / 10)
            for precision in args.precisions:
                trainers[model.name, precision] = Trainer(dataclasses.replace(config, amp=PRECISIONS[precision]), Path(tmp) / f"{model.name}-{precision}")
                times[model.name, precision] = []
                encoder_times[model.name, precision] = []
        batches = {key: trainer.train_batches() for key, trainer in trainers.items()}
        images = bench_images(batch_size, (suite.image_size, suite.image_size))
        encoders = {key: encoder_run(t.model, images, train=True, autocast=torch.bfloat16 if key[1] == "bf16" else None) for key, t in trainers.items()}
        for i in range(warmup + args.steps):
            for key, trainer in trainers.items():
                start = time.perf_counter()
                trainer.train_step(*next(batches[key]))
                middle = time.perf_counter()
                encoders[key]()
                if i >= warmup:
                    times[key].append(middle - start)
                    encoder_times[key].append(time.perf_counter() - middle)

    native, why = cpu_bf16_native()
    median = {precision: {m.name: statistics.median(times[m.name, precision]) for m in suite.models} for precision in args.precisions}
    encoder = {precision: {m.name: statistics.median(encoder_times[m.name, precision]) for m in suite.models} for precision in args.precisions}
    p90 = {precision: {m.name: sorted(times[m.name, precision])[max(0, round(0.9 * args.steps) - 1)] for m in suite.models} for precision in args.precisions}
    result = {
        "suite": args.suite,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": native,
        "reason": why,
        "demo_choice": resolve_precision("auto", "cpu").name,
        "processor": platform.processor() or platform.machine(),
        "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ},
        "threads": args.threads,
        "load_average_after": os.getloadavg(),
        "torch": torch.__version__,
        "models": {m.name: {"label": m.label, "preset": m.preset} for m in suite.models},
        "batch_size": batch_size,
        "image_size": suite.image_size,
        "steps": args.steps,
        "median_step_s": median,
        "p90_step_s": p90,
        "over_dino": {p: {m.name: _ratio(median[p], m.name, "dino") for m in suite.models} for p in args.precisions},
        "median_encoder_s": encoder,
        "encoder_over_dino": {p: {m.name: _ratio(encoder[p], m.name, "dino") for m in suite.models} for p in args.precisions},
        "step_without_encoder_over_dino": {
            p: {m.name: (median[p][m.name] - encoder[p][m.name]) / median[p]["dino"] for m in suite.models} for p in args.precisions
        },
        "kda_over_msda": {p: _ratio(median[p], "lite-kda", "lite-msda") for p in args.precisions},
        "kda_query_logits_over_msda": {p: _ratio(median[p], "lite-kda-ql", "lite-msda") for p in args.precisions},
    }
    if set(PRECISIONS) <= set(args.precisions):
        result["bf16_over_float32"] = {m.name: median["bf16"][m.name] / median["float32"][m.name] for m in suite.models}
    print(f"CPU capability {result['cpu_capability']}, {args.threads} threads, {suite.image_size}x{suite.image_size}, batch {batch_size}: {why}")
    width = max(len(m.label) for m in suite.models)
    print(f"{'model':<{width}} {'precision':>9} {'median s':>9} {'p90 s':>7} {'/ DINO':>7} {'encoder s':>10} {'/ DINO':>7} {'rest / DINO step':>17}")
    for model in suite.models:
        for precision in args.precisions:
            ratio, enc = result["over_dino"][precision][model.name], result["encoder_over_dino"][precision][model.name]
            rest = result["step_without_encoder_over_dino"][precision][model.name]
            step = f"{median[precision][model.name]:>9.3f} {p90[precision][model.name]:>7.3f} {ratio:>6.2f}x"
            print(f"{model.label:<{width}} {precision:>9} {step} {encoder[precision][model.name]:>10.3f} {enc:>6.2f}x {rest:>16.2f}x")
    for precision in args.precisions:
        with_logits = result["kda_query_logits_over_msda"][precision]
        print(
            f"{precision}: KDA / MSDA step time {result['kda_over_msda'][precision]:.2f}x"
            + (f", KDA + query logits / MSDA {with_logits:.2f}x" if with_logits else "")
        )
    if "bf16_over_float32" in result:
        print(
            "bf16 / float32 step time: "
            + ", ".join(f"{k} {v:.2f}x" for k, v in result["bf16_over_float32"].items())
            + f"; the demo trains in {result['demo_choice']}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    name = "train_step" if args.suite == "demo" else f"train_step_{args.suite}"
    suffix = "" if not result["env"] else "_" + result["cpu_capability"].lower() + "_emulated"
    path = args.out / f"{name}{suffix}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
