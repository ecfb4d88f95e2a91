"""Training steps of each method in float64, in one process or as one rank of several.

Run by ``tests/engine/test_distributed.py`` under ``torchrun --nproc_per_node=2`` (each rank
takes every second image of the batch and writes its weights, and PatchGD's Z-cache figures),
and imported by the test for the one-process reference with the whole batch. Not a test
module itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from gigapatch.config import Config
from gigapatch.engine import distributed
from gigapatch.methods import Method, create_method
from gigapatch.step import StepContext, make_optimizer

METHODS = ("full", "patchgd", "ips")
BATCH = 4  # images per step in all (each of 2 ranks takes 2)
STEPS = 3


def config(method: str) -> Config:
    """64² images, 16-px patches (N = 16); PatchGD k = 4, J = 4 (k·J = N, accumulated);
    IPS M = 6 of 16 with one attention head (exact top-M whatever the order)."""
    cfg = Config(name=f"ddp_{method}", seed=0)
    cfg.data.num_classes = 3
    cfg.model.latent_dim = 8
    cfg.model.head_width = 8
    cfg.model.attn_heads = 1
    cfg.method.name = method
    cfg.method.patch_size = 16
    cfg.method.sample_fraction = 0.25
    cfg.method.inner_steps = 4
    cfg.method.fill_chunk = 5
    cfg.method.memory_size = 6
    cfg.method.iter_size = 4
    cfg.train.optimizer = "adamw"
    cfg.train.lr = 1e-2
    return cfg.validate()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same ``STEPS`` batches ``(BATCH, 1, 64, 64)`` uint8 with labels in every process."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (BATCH, 1, 64, 64), generator=g, dtype=torch.uint8),
             torch.randint(0, 3, (BATCH,), generator=g)) for _ in range(STEPS)]


def _trained(cfg: Config, data: list[tuple[torch.Tensor, torch.Tensor]], rank: int,
             world: int) -> tuple[Method, int]:
    """``cfg``'s method in float64 after one step on each batch of ``data``; rank ``rank`` of
    ``world`` takes images ``rank::world`` (as :class:`gigapatch.data.batch.ShardedSampler`
    shards a batch). Also the count of DDP's gradient all-reduces (one per bucket each; 0
    with one rank)."""
    syncs = [0]
    torch.manual_seed(0)
    method = create_method(cfg).double()
    ddp = None
    if world > 1:
        ddp = distributed.wrap(method, distributed.Dist(rank, world), torch.device("cpu"), False)

        def counting(state, bucket):  # noqa: ANN001, ANN202 - DDP checks real annotations
            syncs[0] += 1
            return allreduce_hook(None, bucket)

        ddp.register_comm_hook(None, counting)
    ctx = StepContext(method, make_optimizer(method, cfg), ddp=ddp)
    for step, (images, targets) in enumerate(data):
        torch.manual_seed(100 + step + 7 * rank)  # ranks sample different cells
        method.train_step(method.host_transform(images[rank::world]), targets[rank::world], ctx)
    return method, syncs[0]


def train_steps(method_name: str, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """Weights after ``STEPS`` float64 steps (:func:`_trained` on :func:`batches`); with
    several ranks, ``"syncs"`` counts DDP's gradient all-reduces."""
    method, syncs = _trained(config(method_name), batches(), rank, world)
    out = {k: v.detach().clone() for k, v in method.state_dict().items()}
    return {**out, "syncs": torch.tensor(syncs)}


def cache_stats(rank: int = 0, world: int = 1) -> dict[str, float]:
    """PatchGD's ``epoch_stats`` (counts summed over the ranks) after ``STEPS`` float64
    steps on the first batch again and again, with ``method.z_cache: refresh`` and
    ``z_max_age: 0``: from the second step on, every cached cell is re-encoded and its change
    measured. Each rank keeps its own cache of its images."""
    cfg = config("patchgd")
    cfg.method.z_cache, cfg.method.z_max_age = "refresh", 0
    method, _ = _trained(cfg.validate(), [batches()[0]] * STEPS, rank, world)
    return method.epoch_stats(lambda counts: distributed.all_sum(counts, torch.device("cpu")))


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    result: dict = {name: train_steps(name, rank, world) for name in METHODS}
    result["cache_stats"] = cache_stats(rank, world)
    if rank == 0:
        torch.save(result, Path(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
