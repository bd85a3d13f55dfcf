"""What a training run is made of, built from its :class:`~litedetr.engine.config.TrainConfig`: the
process set-up, the datasets and their loaders, and the model (each of the latter can be given to the Trainer instead)."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader

from litedetr.data.coco import CocoDetection, collate
from litedetr.data.transforms import train_transform
from litedetr.engine import distributed
from litedetr.engine.config import TrainConfig
from litedetr.engine.sampler import ResumableSampler
from litedetr.engine.signals import leave_stop_signals_to_the_main_process
from litedetr.models import Detector
from litedetr.weights import build_model

__all__ = ["set_up_process", "build_datasets", "build_loader", "build_run_model", "checked_model"]


def set_up_process(config: TrainConfig, device: torch.device) -> None:
    """The process group (under torchrun), deterministic algorithms when asked, and this rank's seed."""
    distributed.init_from_env(device)
    if config.deterministic:
        if device.type == "cuda":  # cuBLAS is deterministic only with a fixed workspace; read at its first call
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(config.seed + distributed.rank())


def checked_model(model: Detector, train_set: CocoDetection) -> Detector:
    """``model``, when its classes are ``train_set``'s."""
    if model.config.num_classes != train_set.num_classes:
        raise ValueError(f"the model has {model.config.num_classes} classes, the training set {train_set.num_classes}")
    return model


def build_datasets(config: TrainConfig) -> tuple[CocoDetection, CocoDetection | None]:
    """The training set (augmented as ``config.augment`` says) and the validation set (None without one)."""
    augment = train_transform(config.augment)
    train = CocoDetection(config.train_annotations, config.train_images, augment, seed=config.seed)
    if not config.val_annotations:
        return train, None
    val = CocoDetection(config.val_annotations, config.val_images)
    if val.category_ids != train.category_ids:
        raise ValueError(f"{config.val_annotations}: categories {list(val.category_ids)} differ from the training set's {list(train.category_ids)}")
    return train, val


def build_run_model(config: TrainConfig, train_set: CocoDetection, resume: bool) -> Detector:
    """``config.model`` for ``train_set``'s classes, started from ``config.init`` unless the run resumes."""
    return build_model(
        config.model,
        backbone_weights=config.backbone_weights,
        init=None if resume else config.init,
        init_weights=config.init_weights,
        num_classes=train_set.num_classes,
        class_names=train_set.class_names,
        category_ids=train_set.category_ids,
        min_size=config.image_sizes,
        max_size=config.max_size,
        **config.model_overrides,
    )


def build_loader(config: TrainConfig, dataset: CocoDetection, shuffle: bool, epoch: int, start: int) -> DataLoader:
    """The batches of ``epoch`` from sample ``start`` on (this rank's share; the same order on every resume)."""
    sampler = ResumableSampler(len(dataset), distributed.world_size(), distributed.rank(), shuffle, config.seed)
    sampler.set_epoch(epoch, start)
    dataset.set_epoch(epoch)
    generator = torch.Generator().manual_seed(config.seed + epoch)  # worker seeds: not drawn from the global RNG
    return DataLoader(
        dataset,
        config.batch_size,
        sampler=sampler,
        num_workers=config.workers,
        collate_fn=collate,
        generator=generator,
        worker_init_fn=leave_stop_signals_to_the_main_process,
    )
