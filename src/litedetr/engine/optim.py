"""The optimiser and its learning-rate schedule, as DINO trains: AdamW over three parameter groups,
a 10x drop at each milestone epoch, and an optional linear warm-up over the first optimiser steps."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from litedetr.engine.config import TrainConfig

__all__ = ["build_optimizer", "warm_up"]


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


def build_optimizer(model: nn.Module, config: TrainConfig) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.MultiStepLR]:
    """AdamW over :func:`_param_groups` (fused where the parameters' device has the kernel) and its
    per-epoch schedule (10x drops at ``config.lr_drop``)."""
    groups = _param_groups(model, config)
    devices = {p.device.type for group in groups for p in group["params"]}
    fused = bool(devices) and devices <= set(FUSED_DEVICES) and all(p.is_floating_point() for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.lr_drop), gamma=0.1)


def warm_up(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.MultiStepLR, config: TrainConfig, step: int, epoch: int) -> None:
    """During the first ``warmup_steps`` optimiser steps (and at the first one after), set each group's
    learning rate to its scheduled value (``initial_lr`` dropped at every milestone passed) times
    ``(step + 1) / warmup_steps``, at most 1."""
    warmup = config.warmup_steps
    if not warmup or step > warmup:
        return
    factor = min(1.0, (step + 1) / warmup)
    drops = sum(1 for milestone in config.lr_drop if epoch >= milestone)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * scheduler.gamma**drops * factor
