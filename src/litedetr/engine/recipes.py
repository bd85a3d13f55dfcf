"""Training recipes shared by the demo and the benchmarks, and runs that are reused once finished.

- :class:`SmallDataRecipe` (:data:`SMALL_DATA`): ``litedetr train --small-data``, the demo's model
  changes and learning rates for a user's small dataset.
- :class:`DemoRecipe` and :func:`demo_train_config`: ``litedetr demo``'s budget on the synthetic
  dataset, also the trade-off and fine-tuning benchmarks' (:func:`scaled_recipe` shrinks it).
- :class:`Variant` and :func:`lite_dino_variants`: DINO and the Lite-DINO shapes of the paper, each with
  KDA and with plain deformable attention, on the ``*-r18-tiny`` backbone and widths.
- :func:`train_or_reuse`: train a run, or reuse a finished run with the same settings (resume an
  unfinished one), so that a benchmark can be stopped and started again.
- :func:`run_in_parallel`: independent runs as subprocesses, a few at a time.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from litedetr.data import AugmentConfig, SyntheticSpec, find_split
from litedetr.engine.config import TrainConfig
from litedetr.engine.run_log import read_log
from litedetr.engine.state import load_state, read_train_config
from litedetr.engine.trainer import CHECKPOINT, Trainer
from litedetr.models import get_config

__all__ = [
    "FROM_SCRATCH",
    "SmallDataRecipe",
    "SMALL_DATA",
    "DemoRecipe",
    "demo_train_config",
    "scaled_recipe",
    "Variant",
    "lite_dino_variants",
    "variant_recipe",
    "dataset_dir",
    "train_or_reuse",
    "finished_run_metrics",
    "RUN_PLACE_FIELDS",
    "run_in_parallel",
    "COCO_METRICS",
]

DINO_PRESET = "dino-r18-tiny"
LITE_PRESET = "lite-dino-r18-tiny-h3l1-2x3"
LITE_SHAPES = {"h3l1-2x3": (3, 2, 3), "h3l1-6x1": (3, 6, 1), "h2l2-2x3": (2, 2, 3)}
"""Short name -> (high-level scales H, high-level updates per block A, blocks B) of HL-(A+1)xB."""
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


FROM_SCRATCH: tuple[tuple[str, Any], ...] = (("kda_zero_query", True),)
"""The :class:`DetectorConfig` changes of every training run from random weights (``litedetr train``
without ``--init``; the demo): KDA's ``query_proj`` starts at zero, so its first attention is uniform, as
plain deformable attention's, instead of the authors' random (Xavier) one. On the demo it brought
KDA level with MSDA over seeds 0-2 (``benchmarks/training_study.py``). Initialisation only: a
checkpoint's weights replace it."""


@dataclass(frozen=True)
class SmallDataRecipe:
    """``litedetr train --small-data``: the demo's recipe for a user's dataset of a few hundred or thousand images.

    What ``benchmarks/training_study.py`` found trains a DETR on such data (and the demo trains with):

    - ``training``: changes of the losses and training queries only, so every released checkpoint
      still loads: 100 denoising queries (``dn_number``), every encoder token's proposal matched
      one-to-many (``encoder_one_to_many``), classification losses weighted 8 (``class_loss_weight``);
    - ``scratch``: for a model that does not start from a trained detector (no ``--init``), whose
      weights these change: 200 queries (100 detections kept), content queries taken from the
      selected encoder features (``learned_query_content=False``), queries selected among distinct
      proposals (``query_nms`` 0.7: one overlapped above IoU 0.7 by a higher-scoring one is passed
      over) and :data:`FROM_SCRATCH`'s uniform first attention of KDA;
    - ``random_backbone``: for a backbone without ImageNet weights (nor ``--init``): batch norm trains
      (``backbone_trainable_norm``);
    - ``lr`` for every part but the backbone, which takes ``backbone_lr``, or with ImageNet weights
      ``lr x imagenet_backbone_ratio`` (DETR's 1/10; not measured here: no ImageNet weights offline).
    """

    training: tuple[tuple[str, Any], ...] = (("dn_number", 100), ("encoder_one_to_many", 6), ("class_loss_weight", 8.0))
    scratch: tuple[tuple[str, Any], ...] = (("num_queries", 200), ("num_select", 100), ("learned_query_content", False), ("query_nms", 0.7), *FROM_SCRATCH)
    random_backbone: tuple[tuple[str, Any], ...] = (("backbone_trainable_norm", True),)
    lr: float = 4e-4
    backbone_lr: float = 1e-3
    imagenet_backbone_ratio: float = 0.1

    def model_overrides(self, init: bool = False, backbone_weights: bool = False) -> dict[str, Any]:
        """The :class:`DetectorConfig` changes for a run that starts from a trained detector (``init``), from
        ImageNet backbone weights (``backbone_weights``) or from random weights (neither)."""
        overrides = dict(self.training)
        if not init:
            overrides.update(self.scratch)
            if not backbone_weights:
                overrides.update(self.random_backbone)
        return overrides

    def lr_backbone(self, backbone_weights: bool = False) -> float:
        return self.lr * self.imagenet_backbone_ratio if backbone_weights else self.backbone_lr


SMALL_DATA = SmallDataRecipe()


@dataclass(frozen=True)
class DemoRecipe:
    """What the demo trains: the same fixed schedule on every machine, about ten minutes on two CPU cores.

    The backbone starts from random weights, so it trains with batch norm (``backbone_trainable_norm``)
    and at ``lr_backbone``, 2.5x the rest's ``lr``; 100 denoising queries (up to 5 groups) speed up learning, and
    every encoder token's proposal is matched one-to-many (``encoder_one_to_many``), which keeps the
    query selection from locking onto one level; 200 queries (100 detections kept) instead of the
    tiny presets' 60 find more of the up to 20 objects per image, classification losses weighted 8
    (DINO's 1, Deformable DETR's 2) and content queries taken from the selected encoder features
    (DINO's "pure" query selection: ``learned_query_content=False``) speed up telling the shapes apart,
    the queries are selected among distinct proposals (``query_nms``: the one-to-many encoder loss
    teaches several tokens per object the same box, and plain top-k would spend queries on those copies),
    and KDA starts with uniform attention (:data:`FROM_SCRATCH`) (``benchmarks/training_study.py``). Images are
    160x160; each of the ``epochs`` epochs trains ``epoch_batches`` batches drawn from its own
    shuffle of the 1000 images (900 steps); the learning rate drops 10x for the last epoch, a
    twelfth of the steps (the model is still learning at the full rate; an earlier drop costs AP);
    the validation split
    is evaluated after every ``eval_every`` epochs (and the last). ``amp="auto"`` trains under bf16
    autocast where the CPU computes bf16 natively and in float32 elsewhere
    (:func:`litedetr.engine.precision.resolve_precision`).

    ``train_minutes`` is only a cap for much slower machines (``TrainConfig.max_train_minutes``): the
    first epoch trains whole; after each epoch, where the epochs left would not fit the minutes left at
    the batch time just measured, they are cut to the batches that do (keeping the learning-rate drop
    before the last epoch), and the demo says so. ``None``: no cap.
    """

    model: str = "lite-dino-r18-tiny-h3l1-2x3"
    model_overrides: tuple[tuple[str, Any], ...] = tuple(SMALL_DATA.model_overrides().items())
    data: SyntheticSpec = SyntheticSpec(num_train=1000, num_val=100, image_size=(160, 160), seed=0)
    image_size: int = 160
    epochs: int = 12
    epoch_batches: int = 75
    batch_size: int = 4
    lr: float = SMALL_DATA.lr
    lr_backbone: float = SMALL_DATA.backbone_lr
    lr_drop: tuple[int, ...] = (11,)
    amp: bool | Literal["auto"] = "auto"
    workers: int = 1
    seed: int = 0
    eval_every: int = 1
    predicted_images: int = 6
    train_minutes: float | None = 12.0


def demo_train_config(recipe: DemoRecipe, data: Path, device: str) -> TrainConfig:
    """The training run of ``recipe`` on the synthetic dataset at ``data`` (also the trade-off benchmark's budget)."""
    train, val = find_split(data, "train"), find_split(data, "val")
    return TrainConfig(
        model=recipe.model,
        train_annotations=str(train.annotations),
        train_images=str(train.images),
        val_annotations=str(val.annotations),
        val_images=str(val.images),
        model_overrides=dict(recipe.model_overrides),
        epochs=recipe.epochs,
        epoch_batches=recipe.epoch_batches,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        lr_backbone=recipe.lr_backbone,
        lr_drop=recipe.lr_drop,
        image_sizes=(recipe.image_size,),
        max_size=recipe.image_size,
        augment=AugmentConfig(crop_prob=0.0),
        amp=recipe.amp,
        workers=recipe.workers,
        seed=recipe.seed,
        eval_every=recipe.eval_every,
        device=device,
    )


@dataclass(frozen=True)
class Variant:
    """One model of the comparison: a preset and the :class:`DetectorConfig` fields it changes."""

    name: str
    """Short name for ``--models``: ``dino``, ``h3l1-2x3``, ``h3l1-2x3-msda``, ..."""
    label: str
    preset: str
    overrides: dict[str, Any]


def lite_dino_variants() -> dict[str, Variant]:
    """The 7 models by short name: DINO, then each Lite shape with KDA and with MSDA."""
    found = {"dino": Variant("dino", "DINO (standard encoder, MSDA)", DINO_PRESET, {})}
    base = get_config(LITE_PRESET)
    for shape, (high, updates, blocks) in LITE_SHAPES.items():
        for key_aware in (True, False):
            encoder = dataclasses.replace(base.encoder, n_high=high, high_updates=updates, blocks=blocks, key_aware=key_aware)
            name = shape if key_aware else f"{shape}-msda"
            label = f"Lite-DINO H{high}L{base.n_levels - high}-({updates}+1)x{blocks} {'KDA' if key_aware else 'MSDA'}"
            found[name] = Variant(name, label, LITE_PRESET, {"encoder": encoder, "decoder_key_aware": key_aware})
    return found


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

    A finished run with the same settings is reused; an unfinished one is resumed (the trainer
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
        if state["epoch"] == config.epochs and not config.changed_fields(json.loads(state["train_config"]), {"workers", "device"}):
            metrics = _final_metrics(run_dir, config.epochs)
            if metrics is not None:
                return metrics, True
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
