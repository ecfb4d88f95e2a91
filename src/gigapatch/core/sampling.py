"""Random cell orders for patch sampling (PatchGD's inner steps, IPS's shuffled selection)."""

from __future__ import annotations

import math

import torch

__all__ = ["sample_cells", "shuffled_cells"]


def shuffled_cells(batch: int, num_cells: int, mask: torch.Tensor | None = None,
                   first: torch.Tensor | None = None) -> torch.Tensor:
    """A random order of the cells per image ``(batch, num_cells)``; with a foreground
    ``mask`` ``(batch, num_cells)`` the foreground cells come first (in random order); the
    cells ``first`` ``(batch, n)`` (if given) come before all others, in their order."""
    keys = torch.rand(batch, num_cells)
    if mask is not None:
        keys = keys + (~mask).float()  # background keys in [1, 2): after every foreground key
    if first is not None:  # keys in [-2, -1): before everything, in the given order
        rank = torch.arange(first.shape[1], dtype=keys.dtype) / max(1, first.shape[1])
        keys.scatter_(1, first, (rank - 2).expand(batch, -1).contiguous())
    return torch.argsort(keys, dim=1)


def sample_cells(batch: int, num_cells: int, count: int, device: torch.device | None = None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Random cell indices ``(batch, count)``, each row without repetition while it can.

    Rows are concatenations of independent random orders of ``range(num_cells)``, so the
    first ``num_cells`` entries of a row are distinct; with a foreground ``mask`` each order
    lists the foreground cells first. Uses the global torch RNG.
    """
    reps = math.ceil(count / num_cells)
    perms = [shuffled_cells(batch, num_cells, mask) for _ in range(reps)]
    return torch.cat(perms, dim=1)[:, :count].to(device)
