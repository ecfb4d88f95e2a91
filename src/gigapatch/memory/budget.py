"""Measure a method's training-step memory, and fit its settings to a memory budget.

:func:`measure_method_peak` runs real training steps on a throwaway copy of the method (random
``uint8`` images of the requested shape) under :func:`gigapatch.memory.measure_step_peak`,
with the global RNG state restored afterwards so that fitting never changes a run's results.

:func:`fit_to_budget` chooses the largest setting whose step fits a budget:

the method names the settings it can shrink (:attr:`~gigapatch.methods.base.Method.budget_knobs`):

- ``input_side`` (``full``): the largest input side (a multiple of 4 px, from 16 px up to
  full resolution);
- ``k``, ``fill_chunk`` (``patchgd``, ``patchwise``): first the most patches per (inner)
  step k (up to the configured ``sample_fraction``), then the largest no-grad chunk (up to
  ``method.fill_chunk``: PatchGD's fill, patchwise's scoring and prediction). k matters for
  learning, the chunk only for speed, hence this order.

Candidates are priced with fake-tensor estimates (:class:`gigapatch.memory.estimates.StepEstimator`,
no memory allocated, byte-equal to the CPU measurement), falling back to real measurements for
steps fake tensors cannot run (detection: FCOS's target assignment has data-dependent shapes).
Where the method says its step's device memory does not grow with the image
(:meth:`~gigapatch.methods.base.Method.step_proxy`: PatchGD-seg/-det, ``tiled``), the real
steps run on a small proxy canvas with the same k, and the host-resident maps Z are scaled to
the real grid's cells, so fitting costs seconds, not a real step per candidate on the whole
image. On CUDA the estimate does not see cuDNN/cuBLAS workspaces or allocator fragmentation,
so :data:`CUDA_HEADROOM` of the budget is kept free.

On the CPU, PatchGD's host maps Z count in the budget unless ``train.budget_counts_host_maps``
is off (then the budget is priced as a GPU would hold the step; on CUDA Z never counts).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch

from gigapatch.config import Config
from gigapatch.core.errors import ConfigError
from gigapatch.core.units import format_bytes
from gigapatch.memory.tracker import StepPeaks, measure_step_peaks
from gigapatch.core.grid import PatchGrid
from gigapatch.memory.estimates import EstimateError, StepEstimator
from gigapatch.methods import METHODS, create_method
from gigapatch.step import StepContext, make_optimizer
from gigapatch.tasks import create_task

log = logging.getLogger("gigapatch")

#: Granularity (pixels) of the input side chosen for ``full`` under a memory budget.
_SIDE_STEP = 4
#: Smallest input side tried.
_MIN_SIDE = 16
#: Share of a CUDA budget kept free for what estimates do not see (workspaces, fragmentation).
CUDA_HEADROOM = 0.10


def measure_method_peaks(
    cfg: Config, image_shape: tuple[int, int, int], device: torch.device | str = "cpu"
) -> StepPeaks:
    """Peaks of one training step of ``cfg``'s method on images ``(C, H, W)``: in all,
    without the host-resident maps, and of those maps (:class:`~gigapatch.memory.tracker.StepPeaks`).

    A batch of ``cfg.train.batch_size`` random images is used; the first step (which creates
    the optimizer state) is not measured, the second is.
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        cfg = copy.deepcopy(cfg)
        task = create_task(cfg)
        method = create_method(cfg, task).to(device).train()
        optimizer = make_optimizer(method, cfg, method.encoder_parameters())
        ctx = StepContext(method, optimizer, precision=cfg.train.precision,
                          grad_clip=cfg.train.grad_clip, device=device)
        b = cfg.train.batch_size
        images = torch.randint(0, 256, (b, *image_shape), dtype=torch.uint8)
        images = method.host_transform(images)
        targets = task.random_targets(b, tuple(image_shape[1:]))
        method.train_step(images, targets, ctx)
        return measure_step_peaks(lambda: method.train_step(images, targets, ctx),
                                  model=method, optimizer=optimizer, device=device)


def measure_method_peak(
    cfg: Config, image_shape: tuple[int, int, int], device: torch.device | str = "cpu",
    exclude_host_maps: bool = False,
) -> int:
    """Peak bytes of one training step of ``cfg``'s method on images ``(C, H, W)`` (see
    :func:`measure_method_peaks`). ``exclude_host_maps`` (CPU): without PatchGD's
    host-resident Z (what a GPU would hold; see
    :func:`~gigapatch.memory.tracker.measure_step_peak`).
    """
    peaks = measure_method_peaks(cfg, image_shape, device)
    return peaks.device if exclude_host_maps else peaks.total


def fit_to_budget(
    cfg: Config, image_shape: tuple[int, int, int], budget: int, device: torch.device | str
) -> Config:
    """Adjust ``cfg`` in place so that one training step on ``(C, H, W)`` fits ``budget`` bytes.

    - knob ``input_side`` (``full``) without ``downsample_to``: the largest input side (multiple of 4 px) that fits;
      full resolution when it fits.
    - knobs ``k``, ``fill_chunk`` (``patchgd``): the largest k ≤ the configured one (``method.sample_fraction`` is lowered;
      with ``inner_steps`` unset, J = ⌈1/s⌉ grows so an epoch still covers the grid), then the
      largest ``method.fill_chunk`` ≤ the configured one.
    - no knobs: check that the configured setting fits.

    Logs what it chose and why. Raises :class:`ConfigError` saying what the smallest setting
    needs and what to change when nothing fits.
    """
    device = torch.device(device)
    usable = int(budget * (1 - CUDA_HEADROOM)) if device.type == "cuda" else budget
    pricer = _Pricer(cfg, image_shape, device)
    knobs = METHODS.get(cfg.method.name).budget_knobs
    if knobs == ("input_side",) and cfg.method.downsample_to is None:
        _fit_input_side(cfg, image_shape, budget, usable, pricer)
    elif knobs == ("k", "fill_chunk"):
        _fit_k_and_chunk(cfg, image_shape, budget, usable, pricer)
    else:
        _check_fits(cfg, image_shape, budget, usable, pricer)
    return cfg


class _Pricer:
    """Peak bytes of ``cfg``'s step under changed method settings: estimated, else measured
    (on the method's proxy canvas where it has one)."""

    def __init__(self, cfg: Config, image_shape: tuple[int, int, int], device: torch.device):
        self.cfg, self.shape, self.device = cfg, image_shape, device
        #: Price without the host maps (CPU with ``train.budget_counts_host_maps`` off).
        self.device_only = not cfg.train.budget_counts_host_maps
        self._estimator = None
        self._measure = False
        self._told_proxy = False
        self.cache: dict[tuple[tuple[str, Any], ...], int] = {}

    def __call__(self, **settings: Any) -> int:
        key = tuple(sorted(settings.items()))
        if key not in self.cache:
            self.cache[key] = self._price(settings)
        return self.cache[key]

    def _price(self, settings: dict[str, Any]) -> int:
        if not self._measure:
            try:
                if self._estimator is None:
                    self._estimator = StepEstimator(self.cfg, self.device)
                est = self._estimator.estimate(self.shape, **settings)
                return est.device_peak if self.device_only else est.peak
            except EstimateError as err:
                log.info("memory budget: %s; measuring real steps instead", err)
                self._measure = True
        peaks = self.measure(settings)
        return peaks.device if self.device_only else peaks.total

    def measure(self, settings: dict[str, Any]) -> StepPeaks:
        """Real peaks with ``settings``: on the method's proxy canvas (host maps scaled to
        the real grid), else on the real image shape."""
        trial = copy.deepcopy(self.cfg)
        for key, value in settings.items():
            setattr(trial.method, key, value)
        proxy = METHODS.get(trial.method.name).step_proxy(trial, self.shape)
        shape = self.shape if proxy is None else proxy.shape
        told = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in settings.items())
        log.info("memory budget: measuring one %s step (%s) on a %d×%d canvas",
                 trial.method.name, told or "as configured", shape[1], shape[2])
        if proxy is None:
            return measure_method_peaks(trial, self.shape, self.device)
        if not self._told_proxy:
            log.info("memory budget: %s's device memory does not grow with the image; "
                     "measuring its steps on a %d×%d canvas with the same k (host maps "
                     "scaled ×%.4g to the real grid)", trial.method.name, proxy.shape[1],
                     proxy.shape[2], proxy.cell_ratio)
            self._told_proxy = True
        for key, value in proxy.settings.items():
            setattr(trial.method, key, value)
        peaks = measure_method_peaks(trial, proxy.shape, self.device)
        return peaks.with_host_maps_scaled(proxy.cell_ratio)


def _largest(lo: int, hi: int, fits: Any) -> int:
    """Largest ``v`` in ``[lo, hi]`` with ``fits(v)``, given ``fits(lo)`` (monotone)."""
    if fits(hi):
        return hi
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _fit_input_side(
    cfg: Config, image_shape: tuple[int, int, int], budget: int, usable: int, price: _Pricer
) -> None:
    """The largest input side that fits. Measured steps are priced from the smallest side
    up, doubling, then bisected: a step on the full-resolution image (what the budget is
    there to avoid) is only run when every smaller doubling fits."""
    h, w = image_shape[1:]
    longest, unit = max(h, w), _SIDE_STEP

    def peak_at(side: int) -> int:
        return price(downsample_to=side if side < longest else None)

    smallest = peak_at(_MIN_SIDE)
    if smallest > usable:
        raise ConfigError(
            f"full-image training does not fit the memory budget of {format_bytes(budget)} even "
            f"downsampled to {_MIN_SIDE} px ({format_bytes(smallest)}). Raise train.memory_budget "
            f"to at least {format_bytes(_needed(smallest, price.device))}, lower "
            "train.batch_size or use a smaller encoder."
        )
    top = -(-longest // unit) - 1  # in units of 4 px, below full resolution
    lo, hi = _MIN_SIDE // unit, None  # lo fits; hi (when found) does not
    while hi is None and lo < top:
        trial = min(2 * lo, top)
        if peak_at(unit * trial) <= usable:
            lo = trial
        else:
            hi = trial
    if hi is None:  # every side below full resolution fits
        if peak_at(longest) <= usable:
            log.info(
                "memory budget %s: full-image training at full resolution %d×%d needs %s, fits",
                format_bytes(budget), h, w, format_bytes(peak_at(longest)),
            )
            return
        hi = top + 1
    units = _largest(lo, hi - 1, lambda u: peak_at(unit * u) <= usable)
    side = unit * units
    cfg.method.downsample_to = side
    log.info(
        "memory budget %s: full-image training downsampled to longer side %d px (%s per step);"
        " %d px would need %s (full resolution: %d px)",
        format_bytes(budget), side, format_bytes(peak_at(side)), side + unit,
        format_bytes(peak_at(side + unit)), longest,
    )


def _fit_k_and_chunk(
    cfg: Config, image_shape: tuple[int, int, int], budget: int, usable: int, price: _Pricer
) -> None:
    h, w = image_shape[1:]
    m, name = cfg.method, cfg.method.name
    kind = METHODS.get(name)
    n = PatchGrid(h, w, m.patch_size, None if kind.trains_stride_free else m.stride).num_patches
    k_max = max(1, min(n, round(m.sample_fraction * n)))
    chunk_max = max(1, m.fill_chunk)

    def frac(k: int) -> float:
        return k / n if k < k_max else m.sample_fraction

    def peak(k: int, chunk: int) -> int:
        return price(sample_fraction=frac(k), fill_chunk=chunk)

    wanted = peak(k_max, chunk_max)
    if wanted <= usable:
        log.info(
            "memory budget %s: %s at %d×%d with k=%d of %d %s and fill_chunk %d needs %s, fits",
            format_bytes(budget), name, h, w, k_max, n, kind.k_means, chunk_max,
            format_bytes(wanted),
        )
        return
    smallest = peak(1, 1)
    if smallest > usable:
        raise ConfigError(
            f"{name} does not fit the memory budget of {format_bytes(budget)} at {h}×{w} even "
            f"with k=1 ({kind.k_means}) and fill_chunk 1: that needs {format_bytes(smallest)}"
            f" (the configured k={k_max}, fill_chunk {chunk_max} needs {format_bytes(wanted)}). "
            f"Raise train.memory_budget to at least {format_bytes(_needed(smallest, price.device))}"
            ", or lower train.batch_size, method.patch_size or model.latent_dim, or use a "
            "smaller encoder."
        )
    k = _largest(1, k_max, lambda v: peak(v, 1) <= usable)
    chunk = _largest(1, chunk_max, lambda v: peak(k, v) <= usable)
    old_fraction, old_chunk = m.sample_fraction, m.fill_chunk
    m.sample_fraction, m.fill_chunk = frac(k), chunk
    steps = m.inner_steps if m.inner_steps is not None else math.ceil(1 / m.sample_fraction)
    why = (
        f"k={k + 1} needs {format_bytes(peak(k + 1, 1))}" if k < k_max
        else f"fill_chunk {chunk + 1} needs {format_bytes(peak(k, chunk + 1))}"
    )
    log.info(
        "memory budget %s: %s at %d×%d (%d patches) uses k=%d %s (configured %d; "
        "sample_fraction %.4g → %.4g%s) and fill_chunk %d (configured %d): %s per step; %s",
        format_bytes(budget), name, h, w, n, k, kind.k_means, k_max, old_fraction,
        m.sample_fraction, f", {steps} inner steps" if kind.has_inner_steps else "",
        chunk, old_chunk, format_bytes(peak(k, chunk)), why,
    )


def _check_fits(
    cfg: Config, image_shape: tuple[int, int, int], budget: int, usable: int, price: _Pricer
) -> None:
    h, w = image_shape[1:]
    peak = price()
    if peak > usable:
        raise ConfigError(
            f"{cfg.method.name} with these settings needs {format_bytes(peak)} per training step "
            f"at {h}×{w}, over the memory budget of {format_bytes(budget)}. Lower "
            "train.batch_size or the method's patch settings, use a smaller encoder, or raise "
            f"train.memory_budget to at least {format_bytes(_needed(peak, price.device))}."
        )
    log.info(
        "memory budget %s: %s needs %s per step, fits",
        format_bytes(budget), cfg.method.name, format_bytes(peak),
    )


def _needed(peak: int, device: torch.device) -> int:
    """The budget that leaves room for ``peak`` (plus the CUDA headroom on CUDA)."""
    return math.ceil(peak / (1 - CUDA_HEADROOM)) if device.type == "cuda" else peak
