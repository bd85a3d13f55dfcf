"""One training step of the demo's model in float32 and under bf16 autocast, side by side, with the CPU's capability.

Whether bf16 pays on a CPU depends on its instructions: with AVX-512 BF16 or AMX it is native, on AVX2
it is emulated and a step is several times slower than in float32. ``litedetr demo`` picks the
precision by :func:`litedetr.engine.precision.cpu_bf16_native`; this benchmark measures both, so
the choice can be checked on any machine.

A step is what the trainer does for one batch of the demo: the demo's model and optimiser settings
(:class:`litedetr.tools.demo.DemoRecipe`), a batch of ``--batch-size`` synthetic 160x160 images
through the training transform, forward (under autocast for bf16), backward, gradient clipping and
an AdamW step. Both precisions train their own copy of the same initial weights on the same batches;
the timed steps alternate between them (float32, bf16, float32, ...), so both see the same machine
load. Prints a table and writes ``train_step.json`` to ``--out``.

    python benchmarks/train_step.py [--steps 10] [--threads 2] [--out benchmarks/results]
    # emulate an AVX2 CPU on an AVX-512 one: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/train_step.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from litedetr.data import CocoDetection, SyntheticSpec, collate, find_split, write_synthetic_dataset
from litedetr.data.transforms import train_transform
from litedetr.engine.precision import cpu_bf16_native, resolve_precision
from litedetr.models import build_model
from litedetr.tools.demo import DemoRecipe, demo_train_config

PRECISIONS = {"float32": None, "bf16": torch.bfloat16}


def demo_batches(recipe: DemoRecipe, root: Path, count: int, batch_size: int) -> tuple[list[Any], int]:
    """``count`` training batches of the demo's data pipeline, and its class count."""
    spec = SyntheticSpec(num_train=count * batch_size, num_val=1, image_size=recipe.data.image_size, seed=recipe.data.seed)
    data = write_synthetic_dataset(root, spec)
    config = demo_train_config(recipe, data, "cpu")
    train = find_split(data, "train")
    dataset = CocoDetection(train.annotations, train.images, train_transform(config.augment), seed=recipe.seed)
    batches = [collate([dataset[i * batch_size + j] for j in range(batch_size)]) for i in range(count)]
    return batches, dataset.num_classes


class Step:
    """One precision's model, optimiser and training step (forward, backward, clip, AdamW)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None, recipe: DemoRecipe):
        self.model, self.dtype = model.train(), dtype
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-4)

    def __call__(self, images: list[torch.Tensor], targets: list[dict[str, Any]]) -> float:
        context = torch.autocast("cpu", dtype=self.dtype) if self.dtype else nullcontext()
        with context:
            loss = sum(self.model(images, targets).values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 0.1)
        self.optimizer.step()
        return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per precision (after 2 untimed ones)")
    parser.add_argument("--batch-size", type=int, default=DemoRecipe.batch_size)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = DemoRecipe()
    warmup = 2
    with tempfile.TemporaryDirectory() as tmp:
        batches, num_classes = demo_batches(recipe, Path(tmp), warmup + args.steps, args.batch_size)
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.model, num_classes=num_classes, min_size=(recipe.image_size,), max_size=recipe.image_size, **dict(recipe.model_overrides))
    steps = {name: Step(copy.deepcopy(model), dtype, recipe) for name, dtype in PRECISIONS.items()}
    times: dict[str, list[float]] = {name: [] for name in PRECISIONS}
    losses: dict[str, list[float]] = {name: [] for name in PRECISIONS}
    for i, (images, targets) in enumerate(batches):
        for name, step in steps.items():
            start = time.perf_counter()
            losses[name].append(step(images, targets))
            if i >= warmup:
                times[name].append(time.perf_counter() - start)

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
        "first_losses": {name: values[:3] for name, values in losses.items()},
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
