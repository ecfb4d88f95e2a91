"""Several processes: torchrun's environment, process groups, DistributedDataParallel.

Launch with ``torchrun --standalone --nproc_per_node=N -m gigapatch train --config …`` (one
machine) or with torchrun's ``--nnodes``/``--node-rank``/``--rdzv-endpoint`` (several).
torchrun sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; :func:`setup` joins the group
(``gloo`` on CPU, ``nccl`` on CUDA, each process on GPU ``LOCAL_RANK``).

The method is wrapped with ``broadcast_buffers=False`` (PatchGD runs several forwards per
backward) and without unused-parameter search (every parameter is used in every step).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["Dist", "all_sum", "barrier", "setup", "teardown", "wrap"]


@dataclass(frozen=True)
class Dist:
    """This process's place: ``rank`` of ``world`` (``local_rank`` on its machine)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """Whether there are several processes."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the one that writes the run directory and logs)."""
        return self.rank == 0


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join torchrun's process group if ``WORLD_SIZE`` > 1; returns the place and the device
    (CUDA: ``cuda:LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


def teardown() -> None:
    """Leave the process group (if joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, place: Dist, device: torch.device, sync_batchnorm: bool
         ) -> DistributedDataParallel | None:
    """``module`` in DistributedDataParallel (BatchNorm layers made SyncBatchNorm first if
    ``sync_batchnorm``), or ``None`` with one process."""
    if not place.enabled:
        return None
    if sync_batchnorm:
        nn.SyncBatchNorm.convert_sync_batchnorm(module)
    ids = [device.index] if device.type == "cuda" else None
    # Buffers are not re-broadcast at every forward (PatchGD runs several per backward).
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all processes (the values themselves with one)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    """Wait for every process (no-op with one)."""
    if dist.is_initialized():
        dist.barrier()
