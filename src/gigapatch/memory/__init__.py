"""Memory: measure a training step's peak (:mod:`.tracker`), estimate it without allocating
(:mod:`.estimates`), fit a method's settings to a budget (:mod:`.budget`), tabulate and plot
it (:mod:`.report`)."""

from __future__ import annotations


import torch

from gigapatch.config import Config
from gigapatch.memory.estimates import estimate_step_peak
from gigapatch.memory.tracker import TensorMemoryTracker, measure_step_peak, persistent_bytes

__all__ = ["TensorMemoryTracker", "estimate", "measure_step_peak", "persistent_bytes"]


def estimate(
    cfg: Config,
    image_shape: tuple[int, int, int],
    device: torch.device | str = "cpu",
    *,
    exact: bool = False,
) -> int:
    """Peak bytes of one training step of ``cfg``'s method on images ``(C, H, W)``, estimated
    without allocating anything (fake tensors); seconds even at 65,536².

    Same as :func:`gigapatch.memory.estimates.estimate_step_peak` (see that module for what is
    counted); compare :func:`gigapatch.memory.budget.measure_method_peak` for the real step::

        >>> format_bytes(estimate(cfg, (3, 8192, 8192)))  # full-image ResNet-50, batch 1
        '108 GiB'
    """
    return estimate_step_peak(cfg, image_shape, device, exact=exact)


