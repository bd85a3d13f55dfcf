"""Benchmark runs on the demo's budget: the models compared, the budget scaled, and runs reused once finished.

- :class:`Variant` and :func:`lite_dino_variants`: DINO and the Lite-DINO shapes of the paper, each with
  KDA, with plain deformable attention and with KDA plus query-only logits (``kda_query_logits``), on
  the ``*-r18-tiny`` backbone and widths; :data:`PAPER_VARIANTS` names the first seven.
- :func:`scaled_recipe`, :func:`variant_recipe`: the demo's recipe with another budget or model.
- :func:`train_or_reuse`: train a run, or reuse a finished run with the same settings (resume an
  unfinished one), so that a benchmark can be stopped and started again.
- :func:`run_in_parallel`: independent runs as subprocesses, a few at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litedetr.data import SyntheticSpec
from litedetr.engine.config import TrainConfig
from litedetr.engine.recipes import LITE_PRESET, DemoRecipe
from litedetr.engine.run_log import read_log
from litedetr.engine.state import load_state, read_train_config
from litedetr.engine.trainer import CHECKPOINT, Trainer
from litedetr.models import get_config

__all__ = [
    "scaled_recipe",
    "Variant",
    "lite_dino_variants",
    "PAPER_VARIANTS",
    "variant_recipe",
    "dataset_dir",
    "train_or_reuse",
    "finished_run_metrics",
    "RUN_PLACE_FIELDS",
    "run_in_parallel",
    "COCO_METRICS",
    "percent",
    "median_spread",
]

DINO_PRESET = "dino-r18-tiny"
LITE_SHAPES = {"h3l1-2x3": (3, 2, 3), "h3l1-6x1": (3, 6, 1), "h2l2-2x3": (2, 2, 3)}
"""Short name -> (high-level scales H, high-level updates per block A, blocks B) of HL-(A+1)xB."""
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclass(frozen=True)
class Variant:
    """One model of the comparison: a preset and the :class:`DetectorConfig` fields it changes."""

    name: str
    """Short name for ``--models``: ``dino``, ``h3l1-2x3``, ``h3l1-2x3-msda``, ..."""
    label: str
    preset: str
    overrides: dict[str, Any]


def lite_dino_variants() -> dict[str, Variant]:
    """The 10 models by short name: DINO, then each Lite shape with KDA as the authors train it
    (``h3l1-2x3``), with MSDA (``h3l1-2x3-msda``) and with KDA plus query-only logits (``h3l1-2x3-ql``:
    ``kda_query_logits``, not in the authors' code, :data:`~litedetr.engine.recipes.FROM_SCRATCH`'s
    default). Each variant sets ``kda_query_logits`` itself, so a name trains the same model whatever
    the recipe's default (it changes nothing in DINO and MSDA, which have no KDA layer).
    :data:`PAPER_VARIANTS` names the first two kinds."""
    found = {"dino": Variant("dino", "DINO (standard encoder, MSDA)", DINO_PRESET, {"kda_query_logits": False})}
    base = get_config(LITE_PRESET)
    kinds = (("", "KDA", True, False), ("-msda", "MSDA", False, False), ("-ql", "KDA + query logits", True, True))
    for shape, (high, updates, blocks) in LITE_SHAPES.items():
        for suffix, attention, key_aware, query_logits in kinds:
            encoder = dataclasses.replace(base.encoder, n_high=high, high_updates=updates, blocks=blocks, key_aware=key_aware)
            label = f"Lite-DINO H{high}L{base.num_levels - high}-({updates}+1)x{blocks} {attention}"
            overrides = {"encoder": encoder, "decoder_key_aware": key_aware, "kda_query_logits": query_logits}
            found[shape + suffix] = Variant(shape + suffix, label, LITE_PRESET, overrides)
    return found


PAPER_VARIANTS = ("dino", "h3l1-2x3", "h3l1-2x3-msda", "h3l1-6x1", "h3l1-6x1-msda", "h2l2-2x3", "h2l2-2x3-msda")
"""The trade-off benchmark's default models: DINO and each Lite shape with KDA and with MSDA, as the paper compares them."""


def scaled_recipe(epochs: int | None = None, train_images: int | None = None, val_images: int | None = None, image_size: int | None = None) -> DemoRecipe:
    """The demo's recipe with the given budget changes; the dataset's images scale with ``image_size``."""
    recipe = DemoRecipe()
    size = image_size or recipe.image_size
    data_h, data_w = recipe.data.image_size
    data = dataclasses.replace(
        recipe.data,
        num_train=train_images or recipe.data.num_train,
        num_val=val_images or recipe.data.num_val,
        image_size=(round(data_h * size / recipe.image_size), round(data_w * size / recipe.image_size)),
    )
    return dataclasses.replace(recipe, data=data, image_size=size, epochs=epochs or recipe.epochs)


def variant_recipe(recipe: DemoRecipe, variant: Variant) -> DemoRecipe:
    """``recipe`` training ``variant`` (the recipe's own model overrides kept, the variant's on top)."""
    overrides = {**dict(recipe.model_overrides), **variant.overrides}
    return dataclasses.replace(recipe, model=variant.preset, model_overrides=tuple(overrides.items()))


def dataset_dir(runs: Path, spec: SyntheticSpec) -> Path:
    """One folder per dataset spec, so runs trained on another dataset never pass for this one's."""
    h, w = spec.image_size
    kind = "" if spec.kind == "shapes" else f"{spec.kind}-"
    return runs / f"data-{kind}{spec.num_train}-{spec.num_val}-{h}x{w}-max{spec.max_objects}-seed{spec.seed}"


def _final_metrics(run_dir: Path, epochs: int) -> dict[str, float | None] | None:
    """The evaluation logged after the last epoch (``None`` when the run stopped before it)."""
    evals = [r for r in read_log(run_dir, "eval") if r["epoch"] == epochs]
    return {k: evals[-1].get(k) for k in COCO_METRICS} if evals else None


RUN_PLACE_FIELDS = frozenset({"workers", "device", "eval_every", "train_annotations", "train_images", "val_annotations", "val_images"})
"""TrainConfig fields that set where a run reads its data and how often it evaluates, not the weights it
trains: evaluation draws no random number and changes no weight (a run evaluated after every epoch logged
the same losses, bit for bit, as one evaluated after the last)."""


def finished_run_metrics(config: TrainConfig, run_dir: Path) -> dict[str, float | None]:
    """The final metrics of the finished run in ``run_dir`` (e.g. one of ``benchmarks/training_study.py``'s,
    or a ``litedetr demo``'s run folder) when it trained what ``config`` trains: the same settings but
    :data:`RUN_PLACE_FIELDS`, the same model once preset and overrides are resolved, on a synthetic dataset
    written from the same spec. Its time cap may differ where it cut nothing.

    Raises:
        ValueError: the run is missing or unreadable, trained other settings (named), or did not finish.
    """
    saved = TrainConfig.from_dict(read_train_config(run_dir / CHECKPOINT))
    changed = config.changed_fields(saved.to_dict(), RUN_PLACE_FIELDS | {"model", "model_overrides", "max_train_minutes"})
    if read_log(run_dir, "schedule"):
        changed.append("schedule (epochs cut by its time cap)")
    if get_config(config.model, **config.model_overrides) != get_config(saved.model, **saved.model_overrides):
        changed.append("model")
    specs = [Path(c.train_images).parent / "spec.json" for c in (config, saved)]
    if not all(spec.exists() for spec in specs) or specs[0].read_text() != specs[1].read_text():
        changed.append("dataset (not written from the same synthetic spec)")
    if changed:
        raise ValueError(f"{run_dir} trained other settings: {', '.join(changed)}")
    metrics = _final_metrics(run_dir, config.epochs)
    if metrics is None:
        raise ValueError(f"{run_dir} has not finished its {config.epochs} epochs")
    return metrics


def train_or_reuse(config: TrainConfig, run_dir: Path) -> tuple[dict[str, float | None], bool]:
    """Metrics of ``config`` trained in ``run_dir`` and whether they come from an earlier, finished run.

    A finished run with the same settings is reused (:func:`finished_run_metrics`: also where its dataset
    folder has moved, when written from the same spec); an unfinished one is resumed (the trainer
    refuses other settings).

    Raises:
        ValueError: ``run_dir`` holds a run trained for more epochs than ``config.epochs``.
        SystemExit: training was stopped by a signal (its checkpoint is written; run again to resume).
    """
    checkpoint = run_dir / CHECKPOINT
    if checkpoint.exists():
        state = load_state(checkpoint)
        if state["epoch"] > config.epochs:
            raise ValueError(f"{run_dir} holds a run of {state['epoch']} epochs, more than the {config.epochs} asked for; use another --out")
        if state["epoch"] == config.epochs:
            with contextlib.suppress(ValueError):  # not reusable: resumed below, where the trainer names what differs
                return finished_run_metrics(config, run_dir), True
    trainer = Trainer(config, run_dir, resume=checkpoint.exists())
    result = trainer.fit()
    if result.interrupted:
        raise SystemExit(f"stopped by a signal; {checkpoint} is written, run the same command again to resume")
    metrics = result.metrics or trainer.evaluate()
    return {k: metrics.get(k) for k in COCO_METRICS}, False


def run_in_parallel(commands: Sequence[tuple[list[str], Path]], jobs: int) -> list[int]:
    """Run each ``(command, log file)`` as a subprocess, at most ``jobs`` at a time, its output to its
    log file; returns the exit codes in the order of ``commands``."""
    running: dict[int, subprocess.Popen] = {}
    codes: dict[int, int] = {}
    for index, (command, log) in enumerate(commands):
        while len(running) >= jobs:
            time.sleep(2)
            codes.update({i: p.returncode for i, p in running.items() if p.poll() is not None})
            running = {i: p for i, p in running.items() if i not in codes}
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            running[index] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    codes.update({i: p.wait() for i, p in running.items()})
    return [codes[i] for i in range(len(commands))]


def percent(value: float | None) -> str:
    """A metric given as a fraction, in % to one decimal (``-`` when there is none)."""
    return "-" if value is None else f"{100 * value:.1f}"


def median_spread(values: Sequence[float | None]) -> str:
    """``median [min-max]`` of fractions, in %; ``-`` when any run has no value."""
    if any(v is None for v in values):
        return "-"
    return f"{percent(statistics.median(values))} [{percent(min(values))}-{percent(max(values))}]"
