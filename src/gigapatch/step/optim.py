"""Optimizers and learning-rate schedules, for any ``nn.Module``."""

from __future__ import annotations

import math

import torch
from torch import nn

from gigapatch.config import Config

__all__ = ["lr_factor", "make_optimizer", "make_scheduler"]


def make_optimizer(module: nn.Module, cfg: Config,
                   encoder: list[nn.Parameter] | None = None) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD (``train.optimizer``) over the trainable parameters of ``module``.

    With ``train.encoder_lr`` set, the ``encoder`` parameters (θ1) form a second group at
    that rate (the PatchGD reference code's separate rates); the first group, at
    ``train.lr``, holds the rest (θ2, heads). The schedule scales both alike.
    """
    t = cfg.train
    trainable = [p for p in module.parameters() if p.requires_grad]
    groups: list[dict[str, object]] = [{"params": trainable}]
    if t.encoder_lr is not None and encoder:
        mine = {id(p) for p in encoder}
        groups = [{"params": [p for p in trainable if id(p) not in mine]},
                  {"params": [p for p in trainable if id(p) in mine], "lr": t.encoder_lr}]
        groups = [g for g in groups if g["params"]]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine/linear decay to 0 (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-batch schedule: ``train.warmup_epochs`` of linear warm-up, then ``train.schedule``."""
    total = steps_per_epoch * cfg.train.epochs
    warmup = round(cfg.train.warmup_epochs * steps_per_epoch)
    schedule = cfg.train.schedule
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, schedule)
    )
