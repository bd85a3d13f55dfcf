"""One training step of the demo's model in float32 and under bf16 autocast, side by side, with the CPU's capability.

Whether bf16 pays on a CPU depends on its instructions: with AVX-512 BF16 or AMX it is native, on AVX2
it is emulated and a step is several times slower than in float32. ``litedetr demo`` picks the
precision by :func:`litedetr.engine.precision.cpu_bf16_native`; this benchmark measures both, so
the choice can be checked on any machine.

A step is the trainer's own (:meth:`litedetr.engine.Trainer.time_steps`: loading a batch, forward
under autocast for bf16, backward, gradient clipping and an AdamW step) on the demo's model and
training settings (:class:`litedetr.tools.demo.DemoRecipe`), on one batch of the demo's synthetic
160x160 images. Each precision trains its own trainer from the same initial weights; the timed steps
alternate between them (float32, bf16, float32, ...), so both see the same machine load. Prints a
table and writes ``train_step.json`` to ``--out`` (``train_step_avx2_emulated.json`` when the ATen
and oneDNN instruction sets are lowered by environment variables).

    python benchmarks/train_step.py [--steps 10] [--threads 2] [--out benchmarks/results]
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
from pathlib import Path

import torch

from litedetr.data import write_synthetic_dataset
from litedetr.engine import Trainer
from litedetr.engine.precision import cpu_bf16_native, resolve_precision
from litedetr.engine.recipes import DemoRecipe, demo_train_config

PRECISIONS = {"float32": False, "bf16": True}
"""Name -> TrainConfig.amp (bf16 autocast on the CPU)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per precision (after 2 untimed ones)")
    parser.add_argument("--batch-size", type=int, default=DemoRecipe.batch_size)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = dataclasses.replace(DemoRecipe(), batch_size=args.batch_size, workers=0)
    warmup = 2
    times: dict[str, list[float]] = {name: [] for name in PRECISIONS}
    with tempfile.TemporaryDirectory() as tmp:
        spec = dataclasses.replace(recipe.data, num_train=4 * args.batch_size, num_val=1)
        config = demo_train_config(recipe, write_synthetic_dataset(Path(tmp) / "data", spec), "cpu")
        trainers = {name: Trainer(dataclasses.replace(config, amp=amp), Path(tmp) / name) for name, amp in PRECISIONS.items()}
        for i in range(warmup + args.steps):
            for name, trainer in trainers.items():
                seconds = trainer.time_steps(1, warmup=0)
                if i >= warmup:
                    times[name] += seconds

    native, why = cpu_bf16_native()
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": native,
        "reason": why,
        "demo_choice": resolve_precision("auto", "cpu").name,
        "processor": platform.processor() or platform.machine(),
        "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ},
        "threads": args.threads,
        "torch": torch.__version__,
        "model": recipe.model,
        "batch_size": args.batch_size,
        "image_size": recipe.image_size,
        "steps": args.steps,
        "median_step_s": median,
        "p90_step_s": {name: sorted(t)[max(0, round(0.9 * len(t)) - 1)] for name, t in times.items()},
        "bf16_over_float32": median["bf16"] / median["float32"],
    }
    print(f"CPU capability {result['cpu_capability']}, {args.threads} threads: {why}")
    print(f"{'precision':>10}  {'median s/step':>13}  {'p90 s/step':>10}")
    for name in PRECISIONS:
        print(f"{name:>10}  {median[name]:>13.3f}  {result['p90_step_s'][name]:>10.3f}")
    print(f"bf16 / float32 step time: {result['bf16_over_float32']:.2f}x; the demo trains in {result['demo_choice']}")
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if not result["env"] else "_" + result["cpu_capability"].lower() + "_emulated"
    path = args.out / f"train_step{suffix}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
