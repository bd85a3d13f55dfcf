"""Fine-tuning from pretrained weights vs training from scratch, on the two built-in synthetic datasets.

Pretrains three small detectors on the shapes dataset with the demo's budget (the same runs as
``benchmarks/tradeoff.py``: DINO, and Lite-DINO H3L1-(2+1)x3 with KDA and with plain deformable
attention (MSDA), ``*-r18-tiny`` backbone and widths, the demo's 6 x 125 steps of 4 images). Then trains on the
glyphs dataset (digits and letters: classes the shapes dataset does not have) for half of that
(``--finetune-epochs`` 3 x 125 steps of 4 of its 500 images, learning rate 10x lower for the last
epoch), with the same recipe in every run and only the starting weights differing:

- ``scratch``: random weights (the demo's initialisation);
- ``pretrained``: the same model pretrained on shapes (``init``: every tensor but the class rows,
  which start fresh since no class name matches);
- ``from DINO``: a Lite-DINO initialised from the pretrained DINO (standard -> Lite: encoder layer
  ``i`` takes DINO's layer ``i``; the narrow low-level FFN and KDA's ``query_proj`` start fresh).

Reports COCO AP, AP50, APs, APm, APl on the glyphs validation split, and each pretrained model's AP on
the shapes validation split. Writes ``finetune.md`` and ``finetune.json`` to ``--out``; datasets and
runs go to ``--out/finetune-runs/`` (finished runs are reused, interrupted ones resumed).

    python benchmarks/finetune.py [--threads 2] [--models dino h3l1-2x3 h3l1-2x3-msda] [--out benchmarks/results]
    # smoke run: python benchmarks/finetune.py --pretrain-epochs 1 --finetune-epochs 1 --train-images 8 --val-images 4 \\
    #     --finetune-images 8 --image-size 64 --out /tmp/finetune
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from litedetr.data import write_synthetic_dataset
from litedetr.engine import MODEL_FILE, TrainConfig
from litedetr.engine.recipes import DemoRecipe, Variant, dataset_dir, demo_train_config, lite_dino_variants, scaled_recipe, train_or_reuse, variant_recipe

MODELS = ("h3l1-2x3", "dino", "h3l1-2x3-msda")
TABLE_METRICS = ("AP", "AP50", "APs", "APm", "APl")
RUNS_DIR = "finetune-runs"
FINETUNE_SEED = 1
"""Seed of the glyphs dataset (and so of nothing the shapes runs share)."""


@dataclass(frozen=True)
class Start:
    """One fine-tuning run: the model trained on glyphs and the pretrained run it starts from (None: scratch)."""

    model: str
    source: str | None

    @property
    def name(self) -> str:
        return f"{self.model}-{'scratch' if self.source is None else 'from-' + self.source}"

    @property
    def label(self) -> str:
        if self.source is None:
            return "scratch"
        return "pretrained" if self.source == self.model else f"from pretrained {self.source.upper()}"


def plan(models: tuple[str, ...]) -> list[Start]:
    """The fine-tuning runs for ``models``, most telling first: each model pretrained and from scratch, and every
    Lite-DINO also from the pretrained DINO when DINO is among ``models``."""
    starts = []
    for model in models:
        starts += [Start(model, model), Start(model, None)]
        if model != "dino" and "dino" in models:
            starts.append(Start(model, "dino"))
    return starts


def finetune_recipe(pretrain: DemoRecipe, epochs: int, images: int) -> DemoRecipe:
    """``pretrain``'s recipe on the glyphs dataset (``images`` training images, its validation size and image
    size), for ``epochs`` epochs with the learning rate 10x lower for the last."""
    data = dataclasses.replace(pretrain.data, kind="glyphs", num_train=images, seed=FINETUNE_SEED)
    return dataclasses.replace(pretrain, data=data, epochs=epochs, lr_drop=(max(1, epochs - 1),))


def finetune_config(recipe: DemoRecipe, variant: Variant, data: Path, init: Path | None) -> TrainConfig:
    return dataclasses.replace(demo_train_config(variant_recipe(recipe, variant), data, "cpu"), init=None if init is None else str(init))


def _steps(recipe: DemoRecipe) -> int:
    """Optimiser steps of ``recipe``: whole epochs of its training images."""
    return recipe.epochs * (recipe.data.num_train // recipe.batch_size)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown(rows: list[dict[str, Any]], pretrained: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        (
            f"Pretrained on shapes ({meta['pretrain_images']} images, {meta['pretrain_steps']} steps of {meta['batch_size']}); "
            f"trained on glyphs ({meta['finetune_images']} images, {meta['finetune_steps']} steps of {meta['batch_size']}); "
            f"{meta['image_size']}x{meta['image_size']} images, lr {meta['lr']} (10x lower in the last epoch), AP in % on glyphs val."
        ),
        "",
        "| model | start | " + " | ".join(TABLE_METRICS) + " | train s |",
        "|---|---|" + "---:|" * (len(TABLE_METRICS) + 1),
    ]
    for row in rows:
        metrics = " | ".join(_cell(row["metrics"][k]) for k in TABLE_METRICS)
        seconds = "reused" if row["train_seconds"] is None else f"{row['train_seconds']:.0f}"
        lines.append(f"| {row['model_label']} | {row['start']} | {metrics} | {seconds} |")
    lines += ["", "Pretrained models on the shapes validation split (AP / AP50 in %):", ""]
    lines += [f"- {p['label']}: {_cell(p['metrics']['AP'])} / {_cell(p['metrics']['AP50'])}" for p in pretrained.values()]
    return "\n".join(lines) + "\n"


def main() -> None:
    default = DemoRecipe()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), metavar="NAME", help=f"subset of {', '.join(MODELS)}")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="results folder; runs go to OUT/finetune-runs")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default torch's)")
    parser.add_argument("--pretrain-epochs", type=int, help=f"pretraining epochs (default the demo's {default.epochs})")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="epochs on glyphs (default 3)")
    parser.add_argument("--train-images", type=int, help=f"shapes training images (default {default.data.num_train})")
    parser.add_argument("--val-images", type=int, help=f"validation images of each dataset (default {default.data.num_val})")
    parser.add_argument("--finetune-images", type=int, default=500, help="glyphs training images (default 500)")
    parser.add_argument("--image-size", type=int, help=f"image side in pixels (default {default.image_size})")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    variants = lite_dino_variants()
    models = tuple(m for m in MODELS if m in args.models)
    runs = args.out / RUNS_DIR
    pretrain = scaled_recipe(args.pretrain_epochs, args.train_images, args.val_images, args.image_size)
    finetune = finetune_recipe(pretrain, args.finetune_epochs, args.finetune_images)
    shapes = write_synthetic_dataset(dataset_dir(runs, pretrain.data), pretrain.data)
    glyphs = write_synthetic_dataset(dataset_dir(runs, finetune.data), finetune.data)

    pretrained: dict[str, dict[str, Any]] = {}

    def pretrained_file(model: str) -> Path:
        """The model file of ``model`` pretrained on shapes, trained on first use (so that the first rows come early)."""
        if model not in pretrained:
            start = time.perf_counter()
            metrics, reused = train_or_reuse(demo_train_config(variant_recipe(pretrain, variants[model]), shapes, "cpu"), runs / f"pretrain-{model}")
            pretrained[model] = {"label": variants[model].label, "metrics": metrics, "train_seconds": None if reused else round(time.perf_counter() - start, 1)}
            print(f"pretrained {model} on shapes: AP {_cell(metrics['AP'])} ({'reused' if reused else 'trained'})", flush=True)
        return runs / f"pretrain-{model}" / MODEL_FILE

    rows = []
    for run in plan(models):
        init = None if run.source is None else pretrained_file(run.source)
        start = time.perf_counter()
        metrics, reused = train_or_reuse(finetune_config(finetune, variants[run.model], glyphs, init), runs / run.name)
        seconds = None if reused else round(time.perf_counter() - start, 1)
        rows.append({"run": run.name, "model": run.model, "model_label": variants[run.model].label, "start": run.label, "init": None if init is None else str(init), "metrics": metrics, "train_seconds": seconds})
        print(f"{run.name}: AP {_cell(metrics['AP'])} on glyphs ({'reused' if reused else f'trained in {seconds:.0f} s'})", flush=True)

    meta = {
        "pretrain_images": pretrain.data.num_train,
        "pretrain_steps": _steps(pretrain),
        "finetune_images": finetune.data.num_train,
        "finetune_steps": _steps(finetune),
        "val_images": pretrain.data.num_val,
        "image_size": pretrain.image_size,
        "batch_size": pretrain.batch_size,
        "lr": pretrain.lr,
        "pretrain_lr_drop": list(pretrain.lr_drop),
        "finetune_lr_drop": list(finetune.lr_drop),
        "seed": pretrain.seed,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    table = markdown(rows, pretrained, meta)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "finetune.md").write_text(table)
    (args.out / "finetune.json").write_text(json.dumps({"meta": meta, "pretrained": pretrained, "rows": rows}, indent=2))
    print(f"wrote {args.out / 'finetune.md'}, {args.out / 'finetune.json'}")


if __name__ == "__main__":
    main()
