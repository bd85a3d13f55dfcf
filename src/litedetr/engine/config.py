"""The typed configuration of a training run."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from litedetr.data.transforms import AugmentConfig

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; stored in its checkpoints so a resume can check it.

    Optimisation follows DINO: AdamW with ``lr`` (``lr_backbone`` for the backbone, ``lr`` x
    ``lr_sampling_mult`` for the deformable sampling offsets), a 10x drop at each epoch in
    ``lr_drop``, gradient-norm clipping. ``batch_size`` is per process; the effective batch is
    ``batch_size x accumulate x processes``.

    Attributes:
        model: preset name; ``model_overrides`` change its :class:`DetectorConfig` fields.
        backbone_weights: ImageNet weights for the backbone (``"imagenet"`` or a local file).
        init: a trained checkpoint to start the model from (a litedetr model file or a released
            ``.pth`` of the preset's family): class rows are carried over by class name, the optimiser
            and schedule start fresh. Read only when the run starts (a resume ignores it).
        init_weights: of an ``init`` holding a model and its EMA, the EMA (``auto``, ``ema``) or the model.
        freeze_backbone: keep the backbone's weights (and batch-norm statistics) as they start.
        train_annotations, train_images, val_annotations, val_images: COCO-format data
            (``val_*`` empty: no evaluation).
        image_sizes: training short sides, one drawn per batch; evaluation uses the largest.
        max_size: longest image side after resizing.
        amp: ``True``: autocast (bf16 on the CPU; fp16 with a gradient scaler on CUDA); on a CPU without
            native bf16 it is several times slower than float32, and the trainer warns. ``"bf16"``:
            bf16 autocast without a scaler (CPU, or a GPU of compute capability 8.0+); ``"fp16"``: fp16
            with a gradient scaler (CUDA only). ``"auto"``: autocast only where the device computes it
            natively (:mod:`litedetr.engine.precision`).
        ema_decay: keep an exponential moving average of the weights (``None``: off); evaluation and
            the final model file then use the average.
        epoch_batches: batches per epoch and process (0: the whole dataset). Each epoch draws them
            from its own shuffled order, so a shorter epoch still sees different images each time;
            a way to fit a schedule of ``epochs`` and ``lr_drop`` into a time budget.
        max_train_minutes: a cap on the minutes of training steps (data loading, forward, backward,
            optimiser; evaluations not counted), ``None``: no cap. The first epoch trains whole; after
            each epoch the epochs left are cut to the batches that fit the time left, at the median
            batch time of the epoch just trained; after a cut, a later epoch that ran faster gives
            batches back (never beyond ``epoch_batches``). Each change is logged (a
            ``"schedule"`` record in ``log.jsonl``) and kept in the resume checkpoint; the
            learning-rate drops stay at their epochs (a cosine schedule is shortened to the new end).
        lr_schedule: ``"step"``: a 10x drop at each epoch of ``lr_drop`` (DINO's); ``"cosine"``: every
            group's rate decays along half a cosine from its value to 1% of it over all the run's
            optimiser steps (``lr_drop`` unused).
        warmup_steps: the learning rate of every group rises linearly over the first this many
            optimiser steps, from ``1/warmup_steps`` of its scheduled value to all of it (0: no warm-up).
        eval_every: evaluate every this many epochs (and after the last).
        checkpoint_every: also write the resume checkpoint every this many optimiser steps (0: only
            at the end of each epoch).
        deterministic: ``torch.use_deterministic_algorithms``. CPU: bit-exact reruns on AVX2 (an AVX-512 AMX Xeon differed by ~3e-7). CUDA: every op
            deterministic or refused by torch (``CUBLAS_WORKSPACE_CONFIG=:4096:8`` is set unless set),
            the Triton attention kernels untuned and without float atomics in their backward.
    """

    model: str
    train_annotations: str
    train_images: str
    val_annotations: str = ""
    val_images: str = ""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    backbone_weights: str | None = None
    init: str | None = None
    init_weights: str = "auto"
    freeze_backbone: bool = False
    epochs: int = 12
    epoch_batches: int = 0
    max_train_minutes: float | None = None
    batch_size: int = 2
    accumulate: int = 1
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    lr_sampling_mult: float = 0.1
    weight_decay: float = 1e-4
    lr_drop: tuple[int, ...] = (11,)
    lr_schedule: Literal["step", "cosine"] = "step"
    warmup_steps: int = 0
    clip_norm: float = 0.1
    image_sizes: tuple[int, ...] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    max_size: int = 1333
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    amp: bool | Literal["auto", "bf16", "fp16"] = False
    ema_decay: float | None = None
    workers: int = 2
    seed: int = 42
    eval_every: int = 1
    checkpoint_every: int = 0
    deterministic: bool = False
    device: str = "cpu"

    DATASET_FIELDS: ClassVar[frozenset[str]] = frozenset({"num_classes", "class_names", "category_ids", "min_size", "max_size"})
    """DetectorConfig fields that come from the dataset and the image sizes, never from ``model_overrides``."""

    def __post_init__(self) -> None:
        reserved = sorted(set(self.model_overrides) & self.DATASET_FIELDS)
        if reserved:
            raise ValueError(f"model overrides {reserved} come from the dataset and the image sizes; leave them out")
        for name in ("epochs", "batch_size", "accumulate", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr_schedule not in ("step", "cosine"):
            raise ValueError(f"lr_schedule must be 'step' or 'cosine', got {self.lr_schedule!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.epoch_batches < 0 or self.epoch_batches % self.accumulate:
            raise ValueError(f"epoch_batches must be 0 (whole epochs) or a positive multiple of accumulate ({self.accumulate}), got {self.epoch_batches}")
        if self.max_train_minutes is not None and not self.max_train_minutes > 0:
            raise ValueError(f"max_train_minutes must be > 0 (None: no cap), got {self.max_train_minutes}")
        if self.init is not None and self.backbone_weights is not None:
            raise ValueError("init and backbone_weights exclude each other: the checkpoint's backbone would replace the ImageNet weights")
        if not self.image_sizes or min(self.image_sizes) < 32:
            raise ValueError(f"image_sizes must be short sides >= 32 px, got {self.image_sizes}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def changed_fields(self, saved: dict[str, Any], ignore: frozenset[str] | set[str] = frozenset()) -> list[str]:
        """The fields (but ``ignore``) whose values differ from ``saved`` (:meth:`to_dict` of an earlier run;
        fields newer than it count as their defaults)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        return sorted(k for k, v in self.to_dict().items() if k not in ignore and json.dumps(saved.get(k, defaults.get(k))) != json.dumps(v))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        data["augment"] = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.get("augment", {}).items()})
        for key in ("lr_drop", "image_sizes"):
            data[key] = tuple(data[key])
        return cls(**data)
