"""Fine-tuning from pretrained weights vs training from scratch, on the two built-in synthetic datasets.

Pretrains small detectors on the shapes dataset with the demo's recipe and budget
(:class:`litedetr.engine.recipes.DemoRecipe`, the same runs as ``benchmarks/tradeoff.py``), by default
DINO and Lite-DINO H3L1-(2+1)x3 with KDA plus query logits (``h3l1-2x3-ql``: KDA as ``litedetr train``
trains it from scratch) and with plain deformable attention (MSDA); ``h3l1-2x3`` is KDA as the authors
train it. All with the ``*-r18-tiny`` backbone and widths, the demo's model changes, 12 x 75 steps of 4
images. Then trains on the glyphs dataset
(digits and letters: classes the shapes dataset does not have) for ``--finetune-epochs`` 3 x 125
steps of 4 of its 500 images (learning rate 10x lower for the last epoch), with the same recipe in
every run and only the starting weights differing:

- ``scratch``: random weights (the demo's initialisation);
- ``pretrained``: the same model pretrained on shapes (``init``: every tensor but the class rows,
  which start fresh since no class name matches);
- ``from DINO``: a Lite-DINO initialised from the pretrained DINO (standard -> Lite: encoder layer
  ``i`` takes DINO's layer ``i``; the narrow low-level FFN and KDA's ``query_proj`` start fresh).

Every run is repeated for each training seed of ``--seeds`` (the seed draws the initial weights and
orders the batches; the datasets stay the same); each seed's runs are one subprocess, ``--jobs`` of
them at a time. Reports COCO AP, AP50, APs, APm, APl on the glyphs validation split as the median and
range over the seeds, in how many seeds each start beat the same model from scratch, and each
pretrained model's AP on the shapes validation split. ``--pretrained-runs MODEL=PATTERN`` takes a model's
pretraining from finished runs elsewhere instead of training it again (``{seed}`` in ``PATTERN``: the
training seed), e.g. the training study's runs of the same recipe; each must have trained exactly what
this benchmark would (:func:`litedetr.bench.runs.finished_run_metrics`). Writes ``finetune.md`` and ``finetune.json`` to
``--out``; datasets and runs go to ``--out/finetune-runs/`` (``seed<N>/`` per seed; finished runs are
reused, interrupted ones resumed).

    python benchmarks/finetune.py [--seeds 0 1 2] [--jobs 3 --threads 1] [--models h3l1-2x3-ql dino h3l1-2x3-msda h3l1-2x3] [--out benchmarks/results]
    python benchmarks/finetune.py --models h3l1-2x3 h3l1-2x3-msda \\
        --pretrained-runs h3l1-2x3=study/demo-query-nms-seed{seed}-steps150 h3l1-2x3-msda=study/demo-msda-query-nms-seed{seed}-steps150
    # smoke run: python benchmarks/finetune.py --pretrain-epochs 1 --finetune-epochs 1 --train-images 8 --val-images 4 \\
    #     --finetune-images 8 --image-size 128 --out /tmp/finetune
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from litedetr.bench.runs import (
    Variant,
    dataset_dir,
    finished_run_metrics,
    lite_dino_variants,
    median_spread,
    percent,
    run_in_parallel,
    scaled_recipe,
    train_or_reuse,
    variant_recipe,
)
from litedetr.data import write_synthetic_dataset
from litedetr.engine import MODEL_FILE, TrainConfig
from litedetr.engine.recipes import DemoRecipe, demo_train_config

MODELS = ("h3l1-2x3-ql", "h3l1-2x3", "dino", "h3l1-2x3-msda")
DEFAULT_MODELS = ("h3l1-2x3-ql", "dino", "h3l1-2x3-msda")
"""The demo's model as litedetr trains it from scratch (KDA plus query logits), DINO, and the demo's model with MSDA."""
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
    size), for ``epochs`` whole epochs with the learning rate 10x lower for the last."""
    data = dataclasses.replace(pretrain.data, kind="glyphs", num_train=images, seed=FINETUNE_SEED)
    return dataclasses.replace(pretrain, data=data, epochs=epochs, epoch_batches=0, lr_drop=(max(1, epochs - 1),))


def finetune_config(recipe: DemoRecipe, variant: Variant, data: Path, init: Path | None) -> TrainConfig:
    return dataclasses.replace(demo_train_config(variant_recipe(recipe, variant), data, "cpu"), init=None if init is None else str(init))


def _steps(recipe: DemoRecipe) -> int:
    """Optimiser steps of ``recipe``: its epochs of ``epoch_batches`` batches (at most the whole dataset)."""
    batches = recipe.data.num_train // recipe.batch_size
    return recipe.epochs * (min(batches, recipe.epoch_batches) if recipe.epoch_batches else batches)


def seed_runs(
    pretrain: DemoRecipe, finetune: DemoRecipe, models: tuple[str, ...], data_root: Path, runs: Path, pretrained_runs: dict[str, str] | None = None
) -> dict[str, Any]:
    """Every run of one training seed (``pretrain.seed``) in ``runs``: the pretraining on shapes, then
    the fine-tuning runs of :func:`plan` on glyphs; both datasets are already written under ``data_root``.
    ``pretrained_runs``: model -> folder pattern of finished pretraining runs to take instead of training
    (``{seed}``: ``pretrain.seed``)."""
    variants = lite_dino_variants()
    shapes, glyphs = dataset_dir(data_root, pretrain.data), dataset_dir(data_root, finetune.data)
    pretrained: dict[str, dict[str, Any]] = {}

    def pretrained_file(model: str) -> Path:
        """The model file of ``model`` pretrained on shapes, trained on first use (so that the first rows come early)."""
        reuse = (pretrained_runs or {}).get(model)
        run_dir = Path(reuse.format(seed=pretrain.seed)) if reuse else runs / f"pretrain-{model}"
        if model not in pretrained:
            config = demo_train_config(variant_recipe(pretrain, variants[model]), shapes, "cpu")
            start = time.perf_counter()
            if reuse:
                try:
                    metrics, reused = finished_run_metrics(config, run_dir), True
                except ValueError as err:  # a folder that did not train what this benchmark would
                    raise SystemExit(f"--pretrained-runs {model}: {err}") from None
            else:
                metrics, reused = train_or_reuse(config, run_dir)
            pretrained[model] = {
                "label": variants[model].label, "metrics": metrics, "run": str(run_dir),
                "train_seconds": None if reused else round(time.perf_counter() - start, 1),
            }  # fmt: skip
            print(f"pretrained {model} on shapes: AP {percent(metrics['AP'])} ({'reused from ' + str(run_dir) if reused else 'trained'})", flush=True)
        return run_dir / MODEL_FILE

    rows = []
    for run in plan(models):
        init = None if run.source is None else pretrained_file(run.source)
        start = time.perf_counter()
        metrics, reused = train_or_reuse(finetune_config(finetune, variants[run.model], glyphs, init), runs / run.name)
        seconds = None if reused else round(time.perf_counter() - start, 1)
        rows.append(
            {"run": run.name, "model": run.model, "model_label": variants[run.model].label, "start": run.label, "metrics": metrics, "train_seconds": seconds}
        )
        print(f"{run.name}: AP {percent(metrics['AP'])} on glyphs ({'reused' if reused else f'trained in {seconds:.0f} s'})", flush=True)
    return {"seed": pretrain.seed, "pretrained": pretrained, "rows": rows}


def summarize(per_seed: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Per fine-tuning run (and per pretrained model): each metric over the seeds, and for every start
    but scratch, in how many seeds its AP beat the same model's from scratch."""
    rows = []
    for first in per_seed[0]["rows"]:
        runs = [next(r for r in seed["rows"] if r["run"] == first["run"]) for seed in per_seed]
        scratch = [next(r for r in seed["rows"] if r["model"] == first["model"] and r["start"] == "scratch") for seed in per_seed]
        beats = None if first["start"] == "scratch" else sum(r["metrics"]["AP"] > s["metrics"]["AP"] for r, s in zip(runs, scratch))
        rows.append({
            **{k: first[k] for k in ("run", "model", "model_label", "start")},
            "metrics": {k: [r["metrics"][k] for r in runs] for k in first["metrics"]},
            "beats_scratch": beats,
        })  # fmt: skip
    pretrained = {
        model: {"label": first["label"], "metrics": {k: [seed["pretrained"][model]["metrics"][k] for seed in per_seed] for k in first["metrics"]}}
        for model, first in per_seed[0]["pretrained"].items()
    }
    return rows, pretrained


def markdown(rows: list[dict[str, Any]], pretrained: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    seeds = len(meta["seeds"])
    lines = [
        (
            f"Pretrained on shapes ({meta['pretrain_images']} images, {meta['pretrain_steps']} steps of {meta['batch_size']}); "
            f"trained on glyphs ({meta['finetune_images']} images, {meta['finetune_steps']} steps of {meta['batch_size']}); "
            f"{meta['image_size']}x{meta['image_size']} images, lr {meta['lr']} (backbone {meta['lr_backbone']}; 10x lower in the last epoch), "
            "the demo's model "
            f"changes; training seeds {', '.join(map(str, meta['seeds']))}. AP in % on glyphs val, median [min-max] over the seeds; "
            f"beats scratch: in how many seeds the start's AP is above the same model's from scratch."
        ),
        "",
        "| model | start | " + " | ".join(TABLE_METRICS) + " | beats scratch |",
        "|---|---|" + "---:|" * (len(TABLE_METRICS) + 1),
    ]
    for row in rows:
        metrics = " | ".join(median_spread(row["metrics"][k]) for k in TABLE_METRICS)
        beats = "-" if row["beats_scratch"] is None else f"{row['beats_scratch']} of {seeds}"
        lines.append(f"| {row['model_label']} | {row['start']} | {metrics} | {beats} |")
    lines += ["", "Pretrained models on the shapes validation split (AP / AP50 in %, median [min-max]):", ""]
    lines += [f"- {p['label']}: {median_spread(p['metrics']['AP'])} / {median_spread(p['metrics']['AP50'])}" for p in pretrained.values()]
    return "\n".join(lines) + "\n"


def parse_pretrained_runs(items: list[str], models: tuple[str, ...], parser: argparse.ArgumentParser) -> dict[str, str]:
    """``MODEL=PATTERN`` items as a dict; a model not among ``models``, a repeat or a pattern without
    ``{seed}`` is a usage error."""
    found: dict[str, str] = {}
    for item in items:
        model, sep, pattern = item.partition("=")
        if not sep or model not in models or model in found or "{seed}" not in pattern:
            parser.error(f"--pretrained-runs {item!r}: expected MODEL=PATTERN once per model, MODEL one of {', '.join(models)}, PATTERN with {{seed}}")
        found[model] = pattern
    return found


WORKER_OPTIONS = ("out", "threads", "pretrain_epochs", "finetune_epochs", "train_images", "val_images", "finetune_images", "image_size")
"""The options a seed's worker process takes over from the command line (besides ``--models``)."""


def _worker_arguments(args: argparse.Namespace) -> list[str]:
    forwarded = ["--models", *args.models]
    if args.pretrained_runs:
        forwarded += ["--pretrained-runs", *args.pretrained_runs]
    for name in WORKER_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            forwarded += [f"--{name.replace('_', '-')}", str(value)]
    return forwarded


def main() -> None:
    default = DemoRecipe()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", choices=MODELS, default=list(DEFAULT_MODELS), metavar="NAME",
        help=f"among {', '.join(MODELS)} (default {' '.join(DEFAULT_MODELS)})",
    )  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained at a time, each in a subprocess (default 1)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="results folder; runs go to OUT/finetune-runs")
    parser.add_argument("--threads", type=int, help="torch intra-op threads of each seed's process (default torch's)")
    parser.add_argument("--pretrain-epochs", type=int, help=f"pretraining epochs (default the demo's {default.epochs})")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="epochs on glyphs (default 3)")
    parser.add_argument("--train-images", type=int, help=f"shapes training images (default {default.data.num_train})")
    parser.add_argument("--val-images", type=int, help=f"validation images of each dataset (default {default.data.num_val})")
    parser.add_argument("--finetune-images", type=int, default=500, help="glyphs training images (default 500)")
    parser.add_argument("--image-size", type=int, help=f"image side in pixels (default {default.image_size})")
    parser.add_argument(
        "--pretrained-runs", nargs="+", metavar="MODEL=PATTERN",
        help="take MODEL's pretraining from the finished run in folder PATTERN ({seed}: the training seed) instead of training it",
    )  # fmt: skip
    parser.add_argument("--seed-run", type=int, help=argparse.SUPPRESS)  # one seed's runs, in a worker process
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    models = tuple(m for m in MODELS if m in args.models)
    pretrained_runs = parse_pretrained_runs(args.pretrained_runs or [], models, parser)
    runs = args.out / RUNS_DIR
    pretrain = scaled_recipe(args.pretrain_epochs, args.train_images, args.val_images, args.image_size)
    finetune = finetune_recipe(pretrain, args.finetune_epochs, args.finetune_images)
    if args.seed_run is not None:
        seed = args.seed_run
        result = seed_runs(
            dataclasses.replace(pretrain, seed=seed), dataclasses.replace(finetune, seed=seed), models, runs, runs / f"seed{seed}", pretrained_runs
        )
        (runs / f"seed{seed}" / "result.json").write_text(json.dumps(result, indent=2))
        return

    write_synthetic_dataset(dataset_dir(runs, pretrain.data), pretrain.data)  # once, before the workers
    write_synthetic_dataset(dataset_dir(runs, finetune.data), finetune.data)
    commands = [([sys.executable, __file__, *_worker_arguments(args), "--seed-run", str(seed)], runs / f"seed{seed}.log") for seed in args.seeds]
    print(f"training seeds {args.seeds}, {args.jobs} at a time; logs in {runs}/seed*.log", flush=True)
    failed = [seed for seed, code in zip(args.seeds, run_in_parallel(commands, args.jobs)) if code]
    if failed:
        raise SystemExit(f"the runs of seeds {failed} failed or stopped (see {runs}/seed*.log); run the same command again to resume")
    rows, pretrained = summarize([json.loads((runs / f"seed{seed}" / "result.json").read_text()) for seed in args.seeds])

    meta = {
        "pretrain_images": pretrain.data.num_train,
        "pretrain_steps": _steps(pretrain),
        "finetune_images": finetune.data.num_train,
        "finetune_steps": _steps(finetune),
        "val_images": pretrain.data.num_val,
        "image_size": pretrain.image_size,
        "batch_size": pretrain.batch_size,
        "lr": pretrain.lr,
        "lr_backbone": pretrain.lr_backbone,
        "pretrain_lr_drop": list(pretrain.lr_drop),
        "finetune_lr_drop": list(finetune.lr_drop),
        "model_overrides": dict(pretrain.model_overrides),
        "seeds": args.seeds,
        "pretrained_runs": pretrained_runs,
        "jobs": args.jobs,
        "threads": args.threads or torch.get_num_threads(),
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
