"""The optimiser and its learning-rate schedule: AdamW over DINO's three parameter groups, a 10x drop
at each milestone epoch (DINO's) or a cosine decay over every optimiser step, and an optional linear
warm-up over the first optimiser steps."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from litedetr.engine.config import TrainConfig

__all__ = ["COSINE_FLOOR", "build_optimizer", "scheduled_optimizer", "lr_factor", "set_learning_rates"]

COSINE_FLOOR = 0.01
"""The fraction of each group's learning rate that the cosine schedule ends at."""


def _param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """DINO's three groups: backbone, deformable sampling offsets, everything else."""
    groups: dict[str, list[nn.Parameter]] = {"backbone": [], "sampling": [], "rest": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = "backbone" if name.startswith("backbone.") else "sampling" if "sampling_offsets" in name else "rest"
        groups[key].append(param)
    lrs = {"backbone": config.lr_backbone, "sampling": config.lr * config.lr_sampling_mult, "rest": config.lr}
    return [{"params": params, "lr": lrs[key], "name": key} for key, params in groups.items() if params]


FUSED_DEVICES = ("cpu", "cuda")
"""Devices where AdamW's fused implementation runs: one kernel over every parameter instead of a Python
loop of small ops (on 2 CPU cores, the demo model's step 4x faster: 20 ms against 80 ms)."""


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`_param_groups` (fused where the parameters' device has the kernel); each group's
    ``initial_lr`` is its rate before the schedule (:func:`set_learning_rates` sets it every step)."""
    groups = _param_groups(model, config)
    devices = {p.device.type for group in groups for p in group["params"]}
    fused = bool(devices) and devices <= set(FUSED_DEVICES) and all(p.is_floating_point() for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


def scheduled_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """A given ``optimizer`` made ready for the schedule: each group's ``initial_lr`` (its rate as given) and a
    ``name`` for the log (``group<i>`` where it has none) set where absent.

    Raises:
        ValueError: it updates tensors that are not ``model``'s parameters (built over another model?).
    """
    own = {id(p) for p in model.parameters()}
    foreign = sum(1 for group in optimizer.param_groups for p in group["params"] if id(p) not in own)
    if foreign:
        raise ValueError(f"the optimizer updates {foreign} tensors that are not the model's parameters: build it over the model you pass")
    for i, group in enumerate(optimizer.param_groups):
        group.setdefault("initial_lr", group["lr"])
        group.setdefault("name", f"group{i}")
    return optimizer


def lr_factor(config: TrainConfig, step: int, epoch: int, total_steps: int) -> float:
    """What multiplies each group's initial learning rate at optimiser step ``step`` (0-based) of epoch
    ``epoch``, in a run of ``total_steps`` steps.

    ``config.lr_schedule == "step"``: 0.1 for every milestone of ``config.lr_drop`` reached;
    ``"cosine"``: from 1 down to :data:`COSINE_FLOOR` along half a cosine over the steps after the
    warm-up. Either way times ``(step + 1) / warmup_steps`` during the warm-up.
    """
    warmup = config.warmup_steps
    if config.lr_schedule == "cosine":
        progress = min(1.0, max(0, step - warmup) / max(1, total_steps - 1 - warmup))
        factor = COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        factor = 0.1 ** sum(1 for milestone in config.lr_drop if epoch >= milestone)
    return factor * min(1.0, (step + 1) / warmup) if warmup else factor


def set_learning_rates(optimizer: torch.optim.Optimizer, config: TrainConfig, step: int, epoch: int, total_steps: int) -> None:
    """Set every group's learning rate for optimiser step ``step`` (its ``initial_lr`` times :func:`lr_factor`)."""
    factor = lr_factor(config, step, epoch, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
