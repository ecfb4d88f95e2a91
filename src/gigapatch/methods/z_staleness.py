"""How stale a cached latent grid is, and a refresh share that follows it.

A cached cell's embedding was computed by an older θ1. When the cache re-encodes a cell it
has both values, so the change ``‖z_new − z_old‖ / ‖z_new‖`` of each re-encoded cell comes
for free: it is the error the cell carried while it was cached. The cells re-encoded by
``method.z_refresh`` are the oldest of their image, so their change is the image's worst
staleness.

- :class:`Staleness` sums those changes over an epoch (``z_staleness`` in the history: the
  mean change of the re-encoded cached cells; ``z_refreshed``: the share of the cached cells
  re-encoded by the fill, besides the k·J cells with gradients).
- :class:`AdaptiveShare` (``method.z_tolerance``) sets the share re-encoded per visit from
  that change: doubled (up to every cell) while the batch's re-encoded cells changed by more
  than the tolerance, cut by a quarter (down to ``method.z_refresh``) while they changed by
  less than half of it. It starts at every cell, so the first epochs, while θ1 moves
  fastest, fill exactly until the change is measured small: a warm-up the run finds itself.
"""

from __future__ import annotations

import torch


def relative_change(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per cell ``‖new − old‖ / ‖new‖`` over all but the first dimension: ``(P, ...)`` twice →
    ``(P,)`` float32 (0 where both are zero)."""
    new, old = new.flatten(1).float(), old.to(new.device).flatten(1).float()
    return (new - old).norm(dim=1) / new.norm(dim=1).clamp_min(1e-12)


class Staleness:
    """An epoch's sums of the re-encoded cached cells' changes (see the module doc)."""

    def __init__(self) -> None:
        self.change_sum, self.measured, self.cached = 0.0, 0, 0

    def add(self, change: torch.Tensor, cached: int) -> None:
        """Count one fill: ``change`` ``(P,)`` of its re-encoded cached cells, out of
        ``cached`` cached cells it found."""
        self.change_sum += float(change.sum())
        self.measured += int(change.numel())
        self.cached += cached

    def epoch_stats(self) -> dict[str, float]:
        """``z_staleness`` and ``z_refreshed`` of the fills since the last call (none when no
        cached cell was found), and a fresh count."""
        out = ({"z_staleness": self.change_sum / max(1, self.measured),
                "z_refreshed": self.measured / self.cached} if self.cached else {})
        self.change_sum, self.measured, self.cached = 0.0, 0, 0
        return out


class AdaptiveShare:
    """The share of an image's cached cells re-encoded per visit, between ``floor``
    (``method.z_refresh``) and 1, steered by the measured change against ``tolerance``
    (``method.z_tolerance``; see the module doc)."""

    def __init__(self, floor: float, tolerance: float) -> None:
        self.floor, self.tolerance, self.share = floor, tolerance, 1.0

    def update(self, change: float) -> None:
        """After a fill whose re-encoded cached cells changed by ``change`` on average."""
        if change > self.tolerance:
            self.share = min(1.0, 2 * self.share)
        elif change < self.tolerance / 2:
            self.share = max(self.floor, 0.75 * self.share)

    def state_dict(self) -> dict[str, float]:
        return {"share": self.share}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.share = float(state.get("share", 1.0))
