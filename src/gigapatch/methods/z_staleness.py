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
- :func:`fit_affine` / :func:`apply_affine` (``method.z_correct``): most of θ1's drift acts on
  Z as an affine map of the channels, so the old → new pairs of the re-encoded cells give a
  map (least squares, a ridge towards "no change") that brings the other cached cells of the
  same age close to what θ1 would give now. :class:`BucketMaps` keeps one map per age bucket
  from the decayed sums of the recent fills' pairs, so every bucket has one, not only the
  bucket being re-encoded. A bucket's map from the fills before, measured on this fill's
  pairs, gives the error the mapped cells keep (``z_residual``, held out); with
  ``z_tolerance`` that, not the raw change, steers the share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def relative_change(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per cell ``‖new − old‖ / ‖new‖`` over all but the first dimension: ``(P, ...)`` twice →
    ``(P,)`` float32 (0 where both are zero)."""
    new, old = new.flatten(1).float(), old.to(new.device).flatten(1).float()
    return (new - old).norm(dim=1) / new.norm(dim=1).clamp_min(1e-12)


def affine_sums(old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The normal equations' sums of the pairs ``old``, ``new`` ``(P, C)``: ``[old, 1]ᵀ[old,
    1]`` ``(C + 1, C + 1)`` and ``[old, 1]ᵀ new`` ``(C + 1, C)``, float32 on ``new``'s device
    (sums of several batches' pairs add up)."""
    x = old.to(new.device).float()
    x = torch.cat([x, torch.ones(len(x), 1, device=x.device)], 1)  # (P, C + 1)
    return x.T @ x, x.T @ new.float()


def solve_affine(gram: torch.Tensor, cross: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """The affine map ``W`` ``(C + 1, C)`` of :func:`affine_sums`' sums: least squares with a
    ridge of ``ridge`` × the mean channel energy pulling ``W`` towards the identity (no
    change), so that few or alike pairs cannot give a wild map. Batched too: ``(K, C + 1,
    C + 1)`` and ``(K, C + 1, C)`` sums → ``K`` maps ``(K, C + 1, C)``, each with its own
    ridge, in one solve."""
    c = cross.shape[-1]
    energy = gram.diagonal(dim1=-2, dim2=-1)[..., :c].mean(-1).clamp_min(1e-12)
    alpha = (ridge * energy)[..., None, None]  # () or (K, 1, 1)
    pull = torch.eye(c + 1, device=gram.device)
    pull[c, c] = 0  # the offset is not pulled
    prior = torch.eye(c + 1, c, device=gram.device)  # [I; 0]: new = old
    return torch.linalg.solve(gram + alpha * pull, cross + alpha * prior)


def fit_affine(old: torch.Tensor, new: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """The affine map ``W`` ``(C + 1, C)`` with ``[old, 1] @ W ≈ new`` for the pairs ``old``,
    ``new`` ``(P, C)`` (on ``new``'s device, float32; :func:`solve_affine`)."""
    return solve_affine(*affine_sums(old, new), ridge)


def apply_affine(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``[z, 1] @ w``: ``(P, C)`` and ``(C + 1, C)`` → ``(P, C)`` in ``z``'s dtype, on ``w``'s
    device."""
    x = z.to(w.device).float()
    return (x @ w[:-1] + w[-1]).to(z.dtype)


class Staleness:
    """An epoch's sums of the re-encoded cached cells' changes (see the module doc)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.change_sum, self.measured, self.cached, self.corrected = 0.0, 0, 0, 0
        self.residual_sum, self.checked = 0.0, 0

    def add(self, change: torch.Tensor, cached: int, corrected: int = 0,
            residual: torch.Tensor | None = None) -> None:
        """Count one fill: ``change`` ``(P,)`` of its re-encoded cached cells, out of
        ``cached`` cached cells it found, ``corrected`` of them mapped by ``z_correct``,
        whose check left ``residual`` ``(R,)``."""
        self.change_sum += float(change.sum())
        self.measured += int(change.numel())
        self.cached += cached
        self.corrected += corrected
        if residual is not None:
            self.residual_sum += float(residual.sum())
            self.checked += int(residual.numel())

    def epoch_stats(self, correcting: bool = False,
                    total: Callable[[list[float]], list[float]] = list) -> dict[str, float]:
        """``z_staleness`` and ``z_refreshed`` (and with ``correcting`` ``z_corrected``, the
        share of the cached cells mapped, and ``z_residual``, the mean change the check's map
        left) of the fills since the last call (none when no cached cell was found), and a
        fresh count. The counts are first summed by ``total`` (over the processes, each
        with its own cache)."""
        change_sum, measured, cached, corrected, residual_sum, checked = total(
            [self.change_sum, self.measured, self.cached, self.corrected, self.residual_sum,
             self.checked])
        out = ({"z_staleness": change_sum / max(1, measured),
                "z_refreshed": measured / cached} if cached else {})
        if cached and correcting:
            out["z_corrected"] = corrected / cached
            if checked:
                out["z_residual"] = residual_sum / checked
        self._reset()
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


#: :class:`BucketMaps`: each fill keeps this much of the pairs' weight of the fills before
#: (a memory of about ten batches, over which θ1 moves little).
MAP_DECAY = 0.9
#: :class:`BucketMaps`: a bucket whose own pairs weigh too little borrows those of up to this
#: many buckets on each side (cells encoded a little earlier or later).
MAP_REACH = 4


class BucketMaps:
    """``method.z_correct``'s affine maps, one per bucket of encoding steps, fitted on the
    decayed sums (:func:`affine_sums`) of every recent fill's old → new pairs of that bucket,
    so a bucket's kept cells are mapped even by a fill that re-encodes none of its cells.
    Buckets whose pairs' weight fell below one pair are dropped. The sums live on the pairs'
    device (host after :meth:`load_state_dict` until the next pairs come).

    A bucket's map is solved once and kept until new pairs come: the decay scales the sums
    and the ridge (a share of their energy) alike, which leaves the map as it was.

    The oldest buckets hold few cells, so few pairs: late in a long run about a sixth of
    the cached cells, the stalest, sat in buckets whose own pairs weighed less than a map needs.
    Such a bucket borrows the pairs of its neighbours (the nearest ``reach`` buckets on each
    side, widening one bucket at a time until they weigh enough): cells encoded a little
    earlier or later, by nearly the same θ1."""

    def __init__(self, decay: float = MAP_DECAY, reach: int = MAP_REACH) -> None:
        self.decay, self.reach = decay, reach
        #: bucket → [gram (C + 1, C + 1), cross (C + 1, C), weight in pairs, its map
        #: (C + 1, C) or None until solved]
        self.sums: dict[int, list[Any]] = {}

    def step(self) -> None:
        """A new fill: the earlier pairs weigh ``decay`` times as much."""
        for bucket in list(self.sums):
            entry = self.sums[bucket]
            entry[0], entry[1], entry[2] = (entry[0] * self.decay, entry[1] * self.decay,
                                            entry[2] * self.decay)
            if entry[2] < 1:
                del self.sums[bucket]

    def add(self, bucket: int, old: torch.Tensor, new: torch.Tensor) -> None:
        """This fill's pairs ``old``, ``new`` ``(P, C)`` of cells encoded in ``bucket``."""
        gram, cross = affine_sums(old, new)
        entry = self.sums.get(bucket)
        if entry is None:
            self.sums[bucket] = [gram, cross, float(len(old)), None]
        else:
            entry[0] = entry[0].to(gram.device) + gram
            entry[1] = entry[1].to(cross.device) + cross
            entry[2] += len(old)
            entry[3] = None  # solved again when next asked for

    def map(self, bucket: int, min_pairs: float) -> torch.Tensor | None:
        """``bucket``'s map ``(C + 1, C)`` (:func:`solve_affine`; :meth:`maps`), or ``None``
        while its pairs, and its neighbours' within :attr:`reach`, weigh less than
        ``min_pairs``."""
        return self.maps([bucket], min_pairs).get(bucket)

    def maps(self, buckets: list[int], min_pairs: float,
             device: torch.device | None = None) -> dict[int, torch.Tensor]:
        """:meth:`map` of each of ``buckets`` that has one, ``{bucket: (C + 1, C)}`` on
        ``device`` (default the sums'): from its own pairs when they weigh ``min_pairs``
        (solved once, kept until new pairs come), else from its neighbours' too (see the
        class doc; none if even ``reach`` buckets on each side weigh too little). The maps
        to solve are solved together, in one batched solve."""
        own = [b for b in buckets if b in self.sums and self.sums[b][2] >= min_pairs]
        todo = [b for b in own if self.sums[b][3] is None]
        pooled = [(b, sums) for b in buckets if b not in own
                  for sums in [self._pooled(b, min_pairs)] if sums is not None]
        at = next((e[0].device for e in self.sums.values()), None)
        solved = self._solve([(self.sums[b][0], self.sums[b][1]) for b in todo]
                             + [sums for _, sums in pooled], at)
        for b, w in zip(todo, solved):
            self.sums[b][3] = w
        out = {b: self.sums[b][3] for b in own}
        out.update((b, w) for (b, _), w in zip(pooled, solved[len(todo):]))
        return out if device is None else {b: w.to(device) for b, w in out.items()}

    def _pooled(self, bucket: int, min_pairs: float
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The summed sums of ``bucket`` and its nearest neighbours, widened one bucket on
        each side at a time up to :attr:`reach` until they weigh ``min_pairs``; ``None`` if
        they never do."""
        weight = self.sums[bucket][2] if bucket in self.sums else 0.0
        for r in range(1, self.reach + 1):  # the weights first: the sums are added once
            weight += sum(self.sums[b][2] for b in (bucket - r, bucket + r) if b in self.sums)
            if weight >= min_pairs:
                near = [self.sums[b] for b in range(bucket - r, bucket + r + 1)
                        if b in self.sums]
                at = near[0][0].device
                return (torch.stack([e[0].to(at) for e in near]).sum(0),
                        torch.stack([e[1].to(at) for e in near]).sum(0))
        return None

    @staticmethod
    def _solve(sums: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device | None
               ) -> list[torch.Tensor]:
        """:func:`solve_affine` of each pair of ``sums``, in one batched solve on ``device``."""
        if not sums:
            return []
        grams = torch.stack([g.to(device) for g, _ in sums])
        crosses = torch.stack([x.to(device) for _, x in sums])
        return list(solve_affine(grams, crosses).unbind(0))

    def state_dict(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, float,
                                            torch.Tensor | None]]:
        return {b: (g.cpu(), x.cpu(), n, None if w is None else w.cpu())
                for b, (g, x, n, w) in self.sums.items()}

    def load_state_dict(self, state: dict[int, tuple[Any, ...]]) -> None:
        """:meth:`state_dict`'s buckets (or an earlier version's, without the maps: solved
        when first asked for)."""
        self.sums = {int(b): [e[0], e[1], float(e[2]), e[3] if len(e) > 3 else None]
                     for b, e in state.items()}
