"""Accuracy vs encoder cost on the synthetic dataset: DINO and Lite-DINO variants, with and without KDA.

Trains DINO (standard 6-layer encoder, plain deformable attention) and Lite-DINO H3L1-(2+1)x3,
H3L1-(6+1)x1 and H2L2-(2+1)x3, each with key-aware deformable attention (KDA, in the encoder and the
decoder's cross-attention) and with plain multi-scale deformable attention (MSDA): 7 models by
default, as the paper compares them; ``--models`` can add each shape with KDA plus query-only logits
(``h3l1-2x3-ql``, ``kda_query_logits``: KDA as ``litedetr train`` and the demo train it from scratch).
All with the ResNet-18 tiny presets' backbone and widths, on the built-in
synthetic dataset, with the demo's budget (:class:`litedetr.engine.recipes.DemoRecipe`: dataset, image size, epochs, batch size,
learning rate and its drop, seed; the same TrainConfig the demo builds). As with ``litedetr demo
--epochs``, another ``--epochs`` keeps the demo's learning-rate drop epoch.

For each model: COCO box AP, AP50, APs, APm, APl on the validation split; encoder GFLOPs at the
training image size (``count_flops``); CPU encoder latency, measured after all training, side by
side in one process with the same threads (every model's encoder in turn within each repeat, on
the tokens of the same validation image, without autograd; median). Writes ``tradeoff.md``,
``tradeoff.json`` and ``tradeoff.png`` (AP vs encoder GFLOPs) to ``--out``; the dataset and one
training run per model go to ``--out/tradeoff-runs/``. A run that finished is reused, an
interrupted one resumed, so a second invocation only measures. Each full-budget run takes about
10-20 minutes on two cores. With several ``--seeds`` (training seeds: the initial weights and the batch
order; the dataset stays the same) every model trains once per seed and each metric is reported as the
median and the range over the seeds; GFLOPs and latency are those of the first seed's model.
``--add-results`` adds the seeds of earlier results files (another session's or machine's runs of the same
budget, checked) to each model's seeds, so more seeds can be trained later and reported together;
``--amp`` sets the precision (the demo's ``auto``: bf16 where the CPU computes it natively, else float32).

    python benchmarks/tradeoff.py [--models dino h3l1-2x3 h3l1-2x3-msda ...] [--seeds 0 1 2] [--epochs 8] [--threads 2]
        [--amp auto|off|bf16] [--add-results benchmarks/results/tradeoff_....json ...] [--out benchmarks/results]
    # smoke run: python benchmarks/tradeoff.py --epochs 1 --train-images 8 --val-images 4 --image-size 128 --out /tmp/tradeoff
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from litedetr.bench.flops import count_flops
from litedetr.bench.runs import PAPER_VARIANTS, dataset_dir, lite_dino_variants, median_spread, percent, scaled_recipe, train_or_reuse, variant_recipe
from litedetr.bench.timing import encoder_run, interleaved_ms
from litedetr.data import CocoDetection, find_split, write_synthetic_dataset
from litedetr.engine import MODEL_FILE
from litedetr.engine.precision import resolve_precision
from litedetr.engine.recipes import DemoRecipe, demo_train_config
from litedetr.weights import load_model

TABLE_METRICS = ("AP", "AP50", "APs", "APm", "APl")
MARKERS = {"KDA": ("o", "tab:blue"), "MSDA": ("s", "tab:orange"), "KDA + query logits": ("^", "tab:green")}
"""Plot marker and colour of each attention kind."""


def _kind(row: dict[str, Any]) -> str:
    """The attention kind of a result row, a key of :data:`MARKERS` (rows from before query logits have no flag)."""
    return "KDA + query logits" if row.get("kda_query_logits") else "KDA" if row["key_aware"] else "MSDA"


RUNS_DIR = "tradeoff-runs"


def run_dir(runs: Path, name: str, seed: int) -> Path:
    """Where model ``name`` trains with training seed ``seed`` (seed 0: ``runs/name``, as before seeds were chosen)."""
    return runs / (name if seed == 0 else f"{name}-seed{seed}")


def seed_median(per_seed: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Each metric's median over the seeds' runs (None where a run has none)."""
    return {k: None if any(m[k] is None for m in per_seed) else statistics.median(m[k] for m in per_seed) for k in per_seed[0]}


def added_seed_metrics(
    files: list[Path], budget: dict[str, Any], seeds: list[int], names: list[str]
) -> tuple[dict[str, dict[int, dict[str, float | None]]], list[dict[str, Any]]]:
    """Per-seed metrics of models ``names`` from earlier results ``files`` (``tradeoff.json`` written by
    this script with the same ``budget``, the ``meta`` fields of the data and schedule), for seeds this run
    (``seeds``) did not train, and a record of where each came from.

    Raises:
        ValueError: a file is unreadable, measured another budget (the fields named), or gives a seed
            twice for one model (this run included).
    """
    added: dict[str, dict[int, dict[str, float | None]]] = {name: {} for name in names}
    sources = []
    for file in files:
        try:
            earlier = json.loads(file.read_text())
            rows, their_meta = earlier["rows"], earlier["meta"]
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"--add-results {file}: not a tradeoff.json ({error})") from None
        differ = [key for key in budget if their_meta.get(key) != budget[key]]
        if differ:
            raise ValueError(f"--add-results {file}: measured another budget ({', '.join(f'{k} {their_meta.get(k)} != {budget[k]}' for k in differ)})")
        taken: dict[str, list[int]] = {}
        for row in rows:
            if row["name"] not in added:
                continue
            for seed_text, metrics in row["seed_metrics"].items():
                seed = int(seed_text)
                if seed in seeds or seed in added[row["name"]]:
                    raise ValueError(f"--add-results {file}: {row['name']} seed {seed} is given twice")
                added[row["name"]][seed] = metrics
                taken.setdefault(row["name"], []).append(seed)
        sources.append({"file": str(file), "seeds": taken, **{k: their_meta.get(k) for k in ("threads", "torch", "machine", "amp", "precision")}})
    seed_sets = {name: sorted(seeds) for name, seeds in added.items()}
    if len({tuple(seeds) for seeds in seed_sets.values()}) > 1:
        raise ValueError(f"--add-results: the files give the models different seeds ({seed_sets}); every model needs the same seeds")
    return added, sources


def _provenance(meta: dict[str, Any]) -> str:
    """The table's words on the precision trained in and on the seeds added from earlier results files."""
    text = f" Trained here in {meta['precision']}." if meta.get("precision") else ""
    for source in meta.get("added_results", []):
        seeds = sorted({seed for per_model in source["seeds"].values() for seed in per_model})
        precision = source.get("precision") or "precision not recorded"
        text += f" Seeds {', '.join(map(str, seeds))} from {Path(source['file']).name} ({precision}, {source.get('threads')} threads)."
    return text


def _cell(row: dict[str, Any], metric: str) -> str:
    values = [m[metric] for m in row["seed_metrics"].values()]
    return percent(values[0]) if len(values) == 1 else median_spread(values)


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results table with a line on the budget it was measured with; with several seeds each metric is ``median [min-max]``."""
    size = meta["image_size"]
    seeds = meta["seeds"]
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"training seeds {', '.join(map(str, seeds))} (median [min-max])"
    lines = [
        (
            f"Synthetic dataset ({meta['train_images']} train / {meta['val_images']} val images), {meta['epochs']} epoch(s), "
            f"{size}x{size} images, {seed_text}; encoder GFLOPs and CPU latency at {size}x{size} "
            f"(batch 1, {meta['threads']} threads, median of {meta['repeats']}). AP in %."
        )
        + _provenance(meta),
        "",
        "| model | " + " | ".join(TABLE_METRICS) + " | encoder GFLOPs | encoder latency (ms) |",
        "|---|" + "---:|" * (len(TABLE_METRICS) + 2),
    ]
    for row in rows:
        metrics = " | ".join(_cell(row, k) for k in TABLE_METRICS)
        lines.append(f"| {row['label']} | {metrics} | {row['encoder_gflops']:.3f} | {row['encoder_latency_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """AP vs encoder GFLOPs, one point per model labelled without the ``Lite-DINO`` prefix (circles: KDA,
    squares: MSDA, triangles: KDA plus query-only logits)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    middle = (min(r["encoder_gflops"] for r in rows) + max(r["encoder_gflops"] for r in rows)) / 2
    for row in rows:
        kind = _kind(row)
        gflops, ap = row["encoder_gflops"], 100 * (row["metrics"]["AP"] or 0.0)
        ax.scatter(gflops, ap, marker=MARKERS[kind][0], color=MARKERS[kind][1], zorder=3)
        right = gflops > middle  # labels point inwards, so that none runs off the plot
        ax.annotate(
            row["label"].removeprefix("Lite-DINO "),
            (gflops, ap),
            textcoords="offset points",
            xytext=(-5 if right else 5, 4),
            ha="right" if right else "left",
            fontsize=7,
        )
    for kind in MARKERS:
        if any(_kind(row) == kind for row in rows):
            ax.scatter([], [], marker=MARKERS[kind][0], color=MARKERS[kind][1], label=kind)
    ax.set_xlabel("encoder GFLOPs")
    ax.set_ylabel("AP (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main() -> None:
    names = list(lite_dino_variants())
    default = DemoRecipe()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", choices=names, default=list(PAPER_VARIANTS), metavar="NAME", help=f"among {', '.join(names)} (default the first 7, no -ql)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[default.seed], help=f"training seeds (default the demo's {default.seed})")
    parser.add_argument("--epochs", type=int, help=f"training epochs (default the demo's {default.epochs})")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="results folder; runs go to OUT/tradeoff-runs")
    parser.add_argument("--threads", type=int, help="torch intra-op threads for training and timing (default torch's)")
    parser.add_argument("--repeats", type=int, default=20, help="timed encoder calls per model (default 20)")
    parser.add_argument("--train-images", type=int, help=f"training images (default {default.data.num_train})")
    parser.add_argument("--val-images", type=int, help=f"validation images (default {default.data.num_val})")
    parser.add_argument("--image-size", type=int, help=f"training and measuring side in pixels (default {default.image_size})")
    parser.add_argument("--amp", choices=("auto", "off", "bf16"), default=default.amp, help=f"training precision (default the demo's {default.amp})")
    parser.add_argument(
        "--add-results", type=Path, nargs="+", default=[], metavar="JSON", help="earlier tradeoff.json files whose seeds join these models' seeds"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    recipe = dataclasses.replace(scaled_recipe(args.epochs, args.train_images, args.val_images, args.image_size), amp=args.amp)
    budget = {
        "train_images": recipe.data.num_train,
        "val_images": recipe.data.num_val,
        "dataset_image_size": list(recipe.data.image_size),
        "image_size": recipe.image_size,
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "lr": recipe.lr,
        "lr_drop": list(recipe.lr_drop),
    }
    try:
        added, added_from = added_seed_metrics(args.add_results, budget, args.seeds, args.models)
    except ValueError as error:
        parser.error(str(error))
    chosen = [lite_dino_variants()[name] for name in names if name in args.models]
    runs = args.out / RUNS_DIR
    data = write_synthetic_dataset(dataset_dir(runs, recipe.data), recipe.data)

    trained: dict[tuple[str, int], tuple[dict[str, float | None], bool, float]] = {}
    for variant in chosen:
        for seed in args.seeds:
            start = time.perf_counter()
            config = demo_train_config(variant_recipe(dataclasses.replace(recipe, seed=seed), variant), data, "cpu")
            metrics, reused = train_or_reuse(config, run_dir(runs, variant.name, seed))
            seconds = time.perf_counter() - start
            trained[variant.name, seed] = (metrics, reused, seconds)
            print(f"{variant.name} seed {seed}: AP {percent(metrics['AP'])} ({'reused' if reused else f'trained in {seconds:.0f} s'})", flush=True)

    val = find_split(data, "val")
    image = CocoDetection(val.annotations, val.images)[0][0]
    models = [load_model(run_dir(runs, v.name, args.seeds[0]) / MODEL_FILE) for v in chosen]
    times = interleaved_ms({i: encoder_run(m, image[None], train=False) for i, m in enumerate(models)}, args.repeats)
    latencies = [statistics.median(times[i]) for i in range(len(models))]
    size = (recipe.image_size, recipe.image_size)
    rows = []
    for variant, model, latency in zip(chosen, models, latencies):
        per_seed = {seed: trained[variant.name, seed] for seed in args.seeds}
        seed_metrics = {**{seed: metrics for seed, (metrics, _, _) in per_seed.items()}, **added[variant.name]}
        seed_metrics = dict(sorted(seed_metrics.items()))
        rows.append({
            "name": variant.name,
            "label": variant.label,
            "preset": variant.preset,
            "encoder": dataclasses.asdict(model.config.encoder),
            "key_aware": model.config.encoder.key_aware,
            "decoder_key_aware": model.config.decoder_key_aware,
            "kda_query_logits": model.config.kda_query_logits,
            "metrics": seed_median(list(seed_metrics.values())),
            "seed_metrics": seed_metrics,
            "encoder_gflops": count_flops(model, size).components["encoder"],
            "encoder_latency_ms": latency,
            "reused_run": {seed: reused for seed, (_, reused, _) in per_seed.items()},
            "train_seconds": {seed: None if reused else round(seconds, 1) for seed, (_, reused, seconds) in per_seed.items()},
            "run": {seed: str(run_dir(runs, variant.name, seed)) for seed in args.seeds},
        })  # fmt: skip

    meta = {
        **budget,
        "seeds": sorted({seed for row in rows for seed in row["seed_metrics"]}),
        "trained_seeds": list(args.seeds),
        "added_results": added_from,
        "amp": args.amp,
        "precision": resolve_precision(args.amp, "cpu").reason,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "dataset": str(data),
    }
    table = markdown(rows, meta)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tradeoff.md").write_text(table)
    (args.out / "tradeoff.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    title = f"Synthetic dataset, {recipe.epochs} epoch(s) at {recipe.image_size}x{recipe.image_size}: AP vs encoder GFLOPs"
    plot(rows, args.out / "tradeoff.png", title)
    print(f"wrote {args.out / 'tradeoff.md'}, {args.out / 'tradeoff.json'}, {args.out / 'tradeoff.png'}")


if __name__ == "__main__":
    main()
