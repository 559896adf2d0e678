"""Optimisers and learning-rate schedules, as plain functions of the stage config.

Official (reference §4.1-4.2): Adam (not AdamW), weight decay 5e-7, betas (0.95, 0.999), no warmup, and
`MultiStepLR(milestones=range(start, 1000, step), gamma)` stepped once per *epoch*: epochs 1..start run at lr, then
the lr is multiplied by gamma every `step` epochs. We express that as a per-optimizer-step `LambdaLR` whose factor
only changes at epoch boundaries, so one scheduler (and one checkpointed state) serves both the official step
schedule and the AdamW + warmup + cosine option.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch


def step_decay(epoch: int, start: int, every: int, gamma: float) -> float:
    """Factor for 0-based `epoch`: gamma ** (number of milestones in range(start, 1000, every) that are <= epoch)."""
    if epoch < start:
        return 1.0
    return gamma ** ((epoch - start) // every + 1)


def warmup_cosine(step: int, warmup: int, total: int, min_factor: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to `min_factor` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(groups: Iterable[dict[str, Any]], stage: Any) -> torch.optim.Optimizer:
    """Adam (official, L2 weight decay) or AdamW (decoupled), over parameter groups that may carry their own lr.

    On CUDA the fused implementation: one kernel for all parameters, and it takes the GradScaler's non-finite flag
    on the device, so skipping a step (train/loop.py) needs no host sync."""
    cls = torch.optim.Adam if stage.optimizer == "adam" else torch.optim.AdamW
    groups = list(groups)
    fused = all(p.is_cuda for g in groups for p in g["params"]) or None
    return cls(groups, lr=stage.lr, weight_decay=stage.weight_decay, betas=tuple(stage.betas), fused=fused)


def make_scheduler(optimizer: torch.optim.Optimizer, stage: Any,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-optimizer-step scheduler for `stage.schedule`: 'step' (official) or 'cosine'."""
    total = stage.epochs * steps_per_epoch
    if stage.schedule == "step":
        def factor(step: int) -> float:
            return step_decay(step // steps_per_epoch, stage.lr_start_epoch, stage.lr_step, stage.lr_decay)
    else:
        def factor(step: int) -> float:
            return warmup_cosine(step, stage.warmup_steps, total, stage.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
