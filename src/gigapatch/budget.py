"""Measure a method's training-step memory on a synthetic batch, and fit settings to a budget.

Measurements run real training steps on a throwaway copy of the method (random ``uint8``
images of the requested shape), under :func:`gigapatch.memory.measure_step_peak`, with the
global RNG state restored afterwards so that fitting never changes a run's results.
"""

from __future__ import annotations

import copy
import logging

import torch

from gigapatch.config import Config
from gigapatch.errors import ConfigError
from gigapatch.memory import format_bytes, measure_step_peak

log = logging.getLogger("gigapatch")

#: Granularity (pixels) of the input side chosen for ``full`` under a memory budget.
_SIDE_STEP = 4
#: Smallest input side tried.
_MIN_SIDE = 16


def measure_method_peak(
    cfg: Config, image_shape: tuple[int, int, int], device: torch.device | str = "cpu"
) -> int:
    """Peak bytes of one training step of ``cfg``'s method on images ``(C, H, W)``.

    A batch of ``cfg.train.batch_size`` random images is used; the first step (which creates
    the optimizer state) is not measured, the second is.
    """
    from gigapatch.methods.base import create_method
    from gigapatch.train import make_optimizer

    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        cfg = copy.deepcopy(cfg)
        method = create_method(cfg).to(device).train()
        optimizer = make_optimizer(method, cfg)
        b = cfg.train.batch_size
        images = torch.randint(0, 256, (b, *image_shape), dtype=torch.uint8)
        images = method.host_transform(images)
        targets = torch.randint(0, cfg.data.num_classes, (b,))
        method.train_step(images, targets, optimizer)
        peak = measure_step_peak(
            lambda: method.train_step(images, targets, optimizer),
            model=method,
            optimizer=optimizer,
            device=device,
        )
    return peak


def fit_to_budget(
    cfg: Config, image_shape: tuple[int, int, int], budget: int, device: torch.device | str
) -> Config:
    """Adjust ``cfg`` in place so that one training step fits in ``budget`` bytes.

    - ``full`` without ``downsample_to``: the largest input side (multiple of 4 px) that fits.
    - otherwise: check that the configured setting fits.

    Raises :class:`ConfigError` saying what would fit when nothing does.
    """
    c, h, w = image_shape
    if cfg.method.name == "full" and cfg.method.downsample_to is None:
        side = _largest_fitting_side(cfg, image_shape, budget, device)
        if side < max(h, w):
            cfg.method.downsample_to = side
            log.info(
                "memory budget %s: full-image training downsampled to longer side %d "
                "(full resolution %d needs more)",
                format_bytes(budget), side, max(h, w),
            )
        return cfg
    peak = measure_method_peak(cfg, image_shape, device)
    if peak > budget:
        raise ConfigError(
            f"{cfg.method.name} with these settings needs {format_bytes(peak)} per training step "
            f"at {h}×{w}, over the memory budget of {format_bytes(budget)}. Lower "
            "train.batch_size, method.sample_fraction or method.patch_size, use a smaller "
            "encoder, or raise train.memory_budget."
        )
    log.info(
        "memory budget %s: %s needs %s per step, fits",
        format_bytes(budget), cfg.method.name, format_bytes(peak),
    )
    return cfg


def _largest_fitting_side(
    cfg: Config, image_shape: tuple[int, int, int], budget: int, device: torch.device | str
) -> int:
    """Binary search for the largest longer side (a multiple of ``_SIDE_STEP``) that fits."""
    c, h, w = image_shape
    longest, unit = max(h, w), _SIDE_STEP

    def peak_at(side: int) -> int:
        trial = copy.deepcopy(cfg)
        trial.method.downsample_to = side if side < longest else None
        return measure_method_peak(trial, (c, h, w), device)

    if peak_at(longest) <= budget:
        return longest
    smallest = peak_at(_MIN_SIDE)
    if smallest > budget:
        raise ConfigError(
            f"full-image training does not fit the memory budget of {format_bytes(budget)} even "
            f"downsampled to {_MIN_SIDE} px ({format_bytes(smallest)}). Raise train.memory_budget, "
            "lower train.batch_size or use a smaller encoder."
        )
    lo, hi = _MIN_SIDE // unit, -(-longest // unit)  # in units; lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if peak_at(unit * mid) <= budget:
            lo = mid
        else:
            hi = mid
    return unit * lo
