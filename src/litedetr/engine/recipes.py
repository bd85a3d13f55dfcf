"""Training recipes: what ``litedetr train`` changes for training from scratch and for small data, and the demo's.

- :data:`FROM_SCRATCH`: the model changes of every run from random weights.
- :class:`SmallDataRecipe` (:data:`SMALL_DATA`): ``litedetr train --small-data``, the demo's model
  changes and learning rates for a user's small dataset.
- :class:`DemoRecipe` and :func:`demo_train_config`: ``litedetr demo``'s budget on the synthetic
  dataset, also the trade-off and fine-tuning benchmarks' (:mod:`litedetr.bench.runs` shrinks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from litedetr.data import AugmentConfig, SyntheticSpec, find_split
from litedetr.engine.config import TrainConfig

__all__ = ["FROM_SCRATCH", "SmallDataRecipe", "SMALL_DATA", "DemoRecipe", "demo_train_config", "LITE_PRESET"]

LITE_PRESET = "lite-dino-r18-tiny-h3l1-2x3"
"""The demo's model."""


FROM_SCRATCH: tuple[tuple[str, Any], ...] = (("kda_zero_query", True), ("kda_query_logits", True))
"""The :class:`DetectorConfig` changes of every training run from random weights (``litedetr train``
without ``--init``; the demo), both for KDA:

- ``kda_zero_query``: KDA's ``query_proj`` starts at zero, so its first attention is uniform, as plain
  deformable attention's, instead of the authors' random (Xavier) one (initialisation only: a
  checkpoint's weights replace it);
- ``kda_query_logits``: KDA's logits take a per-point term predicted from the query as well as
  ``q.k / sqrt(D)`` (zero at the start). It adds a linear layer per KDA layer (5-7% of the encoder's
  GFLOPs) and 1.3-1.4 AP by the median of seeds 0-2 in each Lite shape the trade-off benchmark
  measures (``benchmarks/results/tradeoff_query_logits_avx2_*``).

Models without KDA layers (DINO, MSDA Lite) build the same with or without them."""


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
      over) and :data:`FROM_SCRATCH`'s uniform first attention and query logits of KDA;
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
    and KDA starts with uniform attention and adds query-only logits (:data:`FROM_SCRATCH`) (``benchmarks/training_study.py``,
    ``benchmarks/tradeoff.py``). Images are
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
