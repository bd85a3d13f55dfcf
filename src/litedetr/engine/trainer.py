"""The training loop: data, optimiser, schedule, mixed precision, EMA, checkpoints, evaluation, logs.

A run directory holds::

    checkpoint.pt       everything needed to resume exactly (written atomically)
    model.safetensors   the latest weights (the EMA weights when EMA is on), for eval/predict/export
    train_config.json   the run's TrainConfig
    log.jsonl           one JSON object per optimiser step (weighted loss sum, the last decoder
                        layer's class/L1/GIoU terms, gradient norm, lr), per evaluation and per
                        cut of the schedule by ``max_train_minutes``
    detections_val.json the last evaluation's detections (COCO results format)
    curves.png          training loss and validation AP
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from litedetr.data.coco import CocoDetection
from litedetr.engine import distributed
from litedetr.engine.config import TrainConfig
from litedetr.engine.ema import ModelEMA
from litedetr.engine.evaluate import evaluate
from litedetr.engine.optim import build_optimizer, scheduled_optimizer, set_learning_rates
from litedetr.engine.plots import plot_curves
from litedetr.engine.precision import resolve_precision
from litedetr.engine.run_log import LOG_FILE, RunLog
from litedetr.engine.setup import build_datasets, build_loader, build_run_model, checked_model, set_up_process
from litedetr.engine.signals import install_stop_handlers, restore_handlers
from litedetr.engine.state import load_state, rank_rng_state, rng_state, save_state, set_rng_state
from litedetr.engine.time_cap import BatchClock, batches_that_fit, schedule_length
from litedetr.models import Detector
from litedetr.ops import cpu_kernels
from litedetr.weights import save_model
from litedetr.weights.state_dict import fit_problems

__all__ = ["Trainer", "TrainingDiverged", "TrainResult", "CHECKPOINT", "MODEL_FILE"]

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
MODEL_FILE = "model.safetensors"
_RESUMABLE_CHANGES = {"epochs", "eval_every", "workers", "device", "checkpoint_every", "init", "init_weights", "max_train_minutes"}
"""TrainConfig fields a resumed run may change (``init`` is read only when a run starts)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """Attributes:
    epochs_done: completed epochs; ``interrupted``: stopped by a signal (resume to continue).
    metrics: the last evaluation's COCO metrics (empty without validation data).
    """

    out: Path
    epochs_done: int
    steps: int
    interrupted: bool = False
    metrics: dict[str, float | None] = field(default_factory=dict)


class Trainer:
    """Trains ``config`` into ``out``; with ``resume`` it continues from ``out/checkpoint.pt``.

    The collaborators are built from ``config`` unless given:

    Args:
        model: the detector to train instead of ``config.model`` (with ``config.model_overrides``,
            ``init`` and ``backbone_weights``, which are then not used); its classes must be the
            training set's. A resumed run loads its checkpoint into it.
        datasets: the training set and the validation set (or None) instead of those ``config`` names.
        optimizer: the optimiser instead of AdamW over DINO's parameter groups (``config.lr``,
            ``lr_backbone``, ``weight_decay``), built over ``model``'s parameters (pass ``model`` too). The
            schedule (``lr_schedule``, ``lr_drop``, ``warmup_steps``) scales each group's rate as given; a
            resumed run loads its state.
    """

    def __init__(
        self,
        config: TrainConfig,
        out: str | Path,
        resume: bool = False,
        *,
        model: Detector | None = None,
        datasets: tuple[CocoDetection, CocoDetection | None] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        if optimizer is not None and model is None:
            raise ValueError("an optimizer is built over a model's parameters: pass that model too")
        self.config, self.out = config, Path(out)
        self.device = torch.device(config.device)
        set_up_process(config, self.device)
        self.train_set, self.val_set = build_datasets(config) if datasets is None else datasets
        model = build_run_model(config, self.train_set, resume) if model is None else checked_model(model, self.train_set)
        self.model: Detector = model.to(self.device)
        if config.freeze_backbone:
            self.model.backbone.requires_grad_(False)
        self.optimizer = build_optimizer(self.model, config) if optimizer is None else scheduled_optimizer(optimizer, self.model)
        loader_batches = len(build_loader(self.config, self.train_set, True, 0, 0))
        self.planned_batches = min(loader_batches, config.epoch_batches) if config.epoch_batches else loader_batches
        """Batches per epoch of the schedule as configured."""
        self.epoch_batches = self.planned_batches
        """Batches per epoch from now on: fewer than planned once ``max_train_minutes`` cut the schedule."""
        self.train_seconds = 0.0
        """Seconds spent in training steps so far, over every resume (what ``max_train_minutes`` caps)."""
        self._batch_seconds: list[float] = []
        self.precision = resolve_precision(config.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.dtype == torch.float16)
        self.ema = ModelEMA(self.model, config.ema_decay) if config.ema_decay else None
        self.epoch, self.batches_done, self.step = 0, 0, 0
        self.total_steps = self._schedule_length()
        """Optimiser steps of the whole run (the learning-rate schedule's length)."""
        self.run_log = RunLog(self.out)
        self._stop = threading.Event()
        if resume:
            self._resume()
        elif (self.out / CHECKPOINT).exists():
            raise ValueError(f"{self.out} already holds a run ({CHECKPOINT}); pass --resume to continue it or choose another --out")
        self.net = DistributedDataParallel(self.model) if distributed.is_distributed() else self.model

    # -- checkpoints -------------------------------------------------------------------------------

    def _state(self, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "step": self.step,
            "rng": rngs,
            "train_config": json.dumps(self.config.to_dict()),
            "history": json.dumps(self.history),
            "schedule": {"epoch_batches": self.epoch_batches, "train_seconds": self.train_seconds},
        }

    def save(self) -> None:
        """Write the resume checkpoint and the model file (rank 0; the others wait)."""
        rngs = distributed.all_gather_objects(rng_state())  # every rank's own random state
        if distributed.is_main():
            save_state(self.out / CHECKPOINT, self._state(rngs))
            save_model(self.ema.module if self.ema else self.model, self.out / MODEL_FILE)
        distributed.barrier()

    def _resume(self) -> None:
        path = self.out / CHECKPOINT
        if not path.exists():
            raise ValueError(f"{path}: nothing to resume (no checkpoint in {self.out})")
        state = load_state(path)
        saved = json.loads(state["train_config"])
        changed = self.config.changed_fields(saved, _RESUMABLE_CHANGES)
        if changed:
            raise ValueError(f"{path}: the checkpoint was trained with other settings ({', '.join(changed)}); resume with the same ones")
        problems = fit_problems(self.model, state["model"])
        if problems:
            raise ValueError(f"{path}: the checkpoint's weights do not fit the model\n" + "\n".join(problems))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema and state["ema"]:
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.batches_done, self.step = state["epoch"], state["batches_done"], state["step"]
        schedule = state.get("schedule")  # absent in checkpoints older than the time cap: never cut
        if schedule is not None:
            self.epoch_batches, self.train_seconds = schedule["epoch_batches"], schedule["train_seconds"]
        self.total_steps = self._schedule_length()
        self.run_log.restore(json.loads(state["history"]))
        set_rng_state(rank_rng_state(state["rng"], path))
        logger.info("resumed %s at epoch %d, batch %d (step %d)", path, self.epoch, self.batches_done, self.step)

    # -- the schedule ------------------------------------------------------------------------------

    def _schedule_length(self) -> int:
        return schedule_length(self.step, self.epoch, self.batches_done, self.config.epochs, self.epoch_batches, self.config.accumulate)

    def _fit_time_cap(self) -> None:
        """After an epoch: fit the epochs left to ``max_train_minutes`` at the median batch time of the epoch
        just trained (the same decision on every rank): cut them to the batches that fit, or, after a cut,
        give back batches (up to the planned ones) when a later epoch ran faster. Logged as a ``schedule``
        record with the batches before (``previous_batches``) and after (``epoch_batches``)."""
        cap, epochs_left = self.config.max_train_minutes, self.config.epochs - self.epoch
        if cap is None or epochs_left <= 0 or not self._batch_seconds:
            return
        timing = distributed.all_reduce_mean({"batch_s": statistics.median(self._batch_seconds), "trained_s": self.train_seconds})
        batches = min(self.planned_batches, batches_that_fit(cap, timing["trained_s"], timing["batch_s"], epochs_left, self.config.accumulate))
        previous = self.epoch_batches
        if batches == previous:
            return
        self.epoch_batches = batches
        self.total_steps = self._schedule_length()
        self.run_log.write({"kind": "schedule", "epoch": self.epoch, "step": self.step, "epoch_batches": batches, "previous_batches": previous,
                   "planned_batches": self.planned_batches, "batch_seconds": round(timing["batch_s"], 4),
                   "trained_seconds": round(timing["trained_s"], 1), "cap_minutes": cap})  # fmt: skip
        if distributed.is_main():
            logger.warning(
                "%.1f of the %g-min cap spent after epoch %d at %.2f s per batch: the %d epochs left %s to %d of %d batches each",
                timing["trained_s"] / 60, cap, self.epoch, timing["batch_s"], epochs_left,
                "are cut" if batches < previous else "get back batches, up", batches, self.planned_batches,
            )  # fmt: skip

    # -- the loop ----------------------------------------------------------------------------------

    @property
    def history(self) -> list[dict[str, Any]]:
        """The run's records so far (see :mod:`litedetr.engine.run_log`), over every resume."""
        return self.run_log.records

    def _diverged_message(self, what: str) -> str:
        kept = f"the last good checkpoint {self.out / CHECKPOINT} is kept" if (self.out / CHECKPOINT).exists() else "no checkpoint was written yet"
        hint = "Lower the learning rate" + (" or train without --amp" if self.config.amp else "")
        return f"{what} at epoch {self.epoch + 1}, step {self.step + 1}; {kept}. {hint}."

    def _check_finite(self, loss: torch.Tensor, losses: dict[str, torch.Tensor]) -> None:
        """Stop every rank with :class:`TrainingDiverged` when any rank's loss is NaN or infinite.

        One host sync per step, after the all-reduce, so that all ranks raise together, each with the same
        message naming the ranks and loss terms that were not finite.
        """
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if distributed.is_distributed():
            torch.distributed.all_reduce(bad)
        if not bad.item():
            return
        terms = sorted(key for key, value in losses.items() if not torch.isfinite(value).all())
        found = distributed.all_gather_objects((loss.item(), terms))
        where = "; ".join(
            f"{value}" + (f" on rank {rank}" if len(found) > 1 else "") + f" (not finite: {', '.join(names) or 'the sum'})"
            for rank, (value, names) in enumerate(found)
            if not math.isfinite(value)
        )
        raise TrainingDiverged(self._diverged_message(f"the loss became {where}"))

    def _gradient_sync(self, stepping: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces gradients only on the backward before an optimiser step (``no_sync`` between)."""
        if isinstance(self.net, DistributedDataParallel) and not stepping:
            return self.net.no_sync()
        return contextlib.nullcontext()

    def _forward_backward(self, images: list[torch.Tensor], targets: list[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Losses of one batch (under autocast when asked), checked finite on every rank, and their backward."""
        images = [img.to(self.device) for img in images]
        targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        with self.precision.context(self.device):
            losses = self.net(images, targets)
        loss = sum(losses.values())
        self._check_finite(loss, losses)
        self.scaler.scale(loss / self.config.accumulate).backward()
        return loss, losses

    def _optimizer_step(self) -> torch.Tensor:
        """Clip, step, clear the gradients and update the EMA; returns the gradient norm before clipping."""
        set_learning_rates(self.optimizer, self.config, self.step, self.epoch, self.total_steps)
        self.scaler.unscale_(self.optimizer)
        clip = self.config.clip_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip) if clip > 0 else torch.tensor(0.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.update(self.model)
        return grad_norm

    def _train_mode(self) -> None:
        """Training mode; a frozen backbone stays in eval mode (its batch-norm statistics fixed)."""
        self.net.train()
        if self.config.freeze_backbone:
            self.model.backbone.eval()

    def train_batches(self) -> Iterator[tuple[list[torch.Tensor], list[dict[str, Any]]]]:
        """The training batches, epoch after epoch from the first, without end (e.g. to time steps)."""
        return (batch for epoch in itertools.count() for batch in build_loader(self.config, self.train_set, True, epoch, 0))

    def train_step(self, images: list[torch.Tensor], targets: list[dict[str, Any]]) -> torch.Tensor:
        """One optimiser step on one batch, outside the schedule: nothing is counted, logged or written.
        Returns the loss. It trains this trainer's model: measure with a trainer made for it."""
        self._train_mode()
        loss, _ = self._forward_backward(images, targets)
        self._optimizer_step()
        return loss

    def _train_epoch(self) -> None:
        cfg = self.config
        loader = build_loader(self.config, self.train_set, True, self.epoch, self.batches_done * cfg.batch_size)
        self._train_mode()
        batches = min(len(loader), self.epoch_batches - self.batches_done)
        bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", total=batches, unit="batch", disable=not distributed.is_main(), dynamic_ncols=True)
        started = time.perf_counter()
        clock = BatchClock()  # each batch, its loading included: for max_train_minutes
        self._batch_seconds = clock.seconds
        epoch_end = self.batches_done + batches
        for images, targets in bar:
            # a step every `accumulate` batches, and one at the epoch's end with what is left (nothing leaks into the next epoch)
            stepping = (self.batches_done + 1) % cfg.accumulate == 0 or self.batches_done + 1 == epoch_end
            with self._gradient_sync(stepping):
                loss, losses = self._forward_backward(images, targets)
            self.batches_done += 1
            if not stepping:
                self.train_seconds += clock.lap()
                continue
            left_over = self.batches_done % cfg.accumulate
            if left_over:  # the losses were divided by `accumulate`: make this step the mean over its own batches
                for p in self.model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(cfg.accumulate / left_over)
            grad_norm = self._optimizer_step()
            self.step += 1
            final_layer = {k: v.item() for k, v in losses.items() if k in ("loss_class", "loss_bbox", "loss_giou")}
            values = distributed.all_reduce_mean({"loss": loss.item(), "grad_norm": float(grad_norm), **final_layer})
            bar.set_postfix(loss=f"{values['loss']:.3f}")
            lrs = {group["name"]: group["lr"] for group in self.optimizer.param_groups}
            main_lr = lrs.get("rest", next(iter(lrs.values())))  # DINO's groups' main rate, or a given optimiser's first
            self.run_log.write({"kind": "train", "epoch": self.epoch, "step": self.step, "lr": main_lr, "lr_groups": lrs, **values,
                       "seconds": round(time.perf_counter() - started, 3)})  # fmt: skip
            self.train_seconds += clock.lap()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save()
            if self._stop_requested():
                return
            if self.batches_done == self.epoch_batches:
                break
        bar.close()
        self.epoch, self.batches_done = self.epoch + 1, 0

    def _stop_requested(self) -> bool:
        """Whether any rank got SIGTERM/SIGINT (all ranks stop at the same step)."""
        flag = torch.tensor(1.0 if self._stop.is_set() else 0.0)
        if distributed.is_distributed():
            flag = flag.to(self.device)
            torch.distributed.all_reduce(flag)
        return bool(flag.item())

    def evaluate(self) -> dict[str, float | None]:
        """COCO metrics of the model (its EMA when on) on the validation set; logged and written as detections."""
        if self.val_set is None:
            raise ValueError("no validation data: set val_annotations and val_images to evaluate")
        loader = build_loader(self.config, self.val_set, False, 0, 0)
        model = self.ema.module if self.ema else self.model
        metrics = evaluate(model, loader, self.device, self.out / "detections_val.json")
        self.run_log.write({"kind": "eval", "epoch": self.epoch, "step": self.step, **{k: v for k, v in metrics.items() if v is not None}})
        if distributed.is_main():
            logger.info("epoch %d: AP %.3f AP50 %.3f", self.epoch, metrics["AP"] or 0.0, metrics["AP50"] or 0.0)
        return metrics

    def fit(self) -> TrainResult:
        """Train to ``config.epochs``; stops cleanly (checkpoint written) on SIGTERM/SIGINT."""
        self.out.mkdir(parents=True, exist_ok=True)
        if distributed.is_main():
            (self.out / "train_config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
            stale = self.out / LOG_FILE
            if self.step == 0 and stale.exists():  # a run killed before its first checkpoint: its steps are trained again
                logger.warning("%s: left by a run stopped before its first checkpoint; started again", stale)
                stale.unlink()
        self.run_log.open()
        if distributed.is_main():
            logger.info("precision: %s", self.precision.reason)
        if self.device.type == "cpu":
            cpu_kernels.prepare()  # a first build of the C++ kernels takes about a minute: not a training step's time
        previous = install_stop_handlers(self._stop)
        metrics: dict[str, float | None] = {}
        try:
            while self.epoch < self.config.epochs:
                self._train_epoch()
                if self._stop.is_set() or self._stop_requested():
                    self.save()
                    logger.warning("stopped by a signal at epoch %d, step %d; %s written", self.epoch, self.step, self.out / CHECKPOINT)
                    return TrainResult(self.out, self.epoch, self.step, interrupted=True)
                self._fit_time_cap()
                self.save()
                last = self.epoch == self.config.epochs
                if self.val_set is not None and (last or self.epoch % self.config.eval_every == 0):
                    metrics = self.evaluate()
        finally:
            restore_handlers(previous)
            self.run_log.close()
        if distributed.is_main():
            plot_curves(self.history, self.out / "curves.png")
        return TrainResult(self.out, self.epoch, self.step, metrics=metrics)
