"""IPS: selection = top-M by attention, no graph in the selection, memory flat in N."""

from __future__ import annotations

import copy

import pytest
import torch

from gigapatch.memory.budget import measure_method_peak
from gigapatch.config import Config
from gigapatch.core.errors import ConfigError
from gigapatch.memory.estimates import estimate_step_peak
from gigapatch.methods.base import create_method
from gigapatch.models.attention import sinusoidal_2d
from gigapatch.step import StepContext

TASKS = ["majority", "max", "top", "multi"]


def _cfg(memory=5, iters=3, heads=4, tasks=(), **method) -> Config:
    cfg = Config()
    cfg.method.name = "ips"
    cfg.data.num_classes = 10
    cfg.data.tasks = list(tasks)
    cfg.data.multilabel = ["multi"] if "multi" in tasks else []
    cfg.model.latent_dim = 16
    cfg.model.attn_heads = heads
    cfg.method.patch_size = 16
    cfg.method.memory_size = memory
    cfg.method.iter_size = iters
    for key, value in method.items():
        setattr(cfg.method, key, value)
    return cfg.validate()


def _images(b=2, side=64, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 1, side, side), generator=g, dtype=torch.uint8)


def _all_cells(method, images):
    grid = method.grid(images)
    cells = torch.arange(grid.num_patches).expand(images.shape[0], -1)
    return grid, cells


@pytest.mark.parametrize("tasks", [(), tuple(TASKS)])
def test_with_m_at_least_n_ips_is_attention_pooling_over_all_patches(tasks):
    torch.manual_seed(0)
    method = create_method(_cfg(memory=40, iters=3, tasks=tasks)).eval()  # N = 16 ≤ M
    images = _images()
    with torch.no_grad():
        got = method.predict(images)
        grid, cells = _all_cells(method, images)
        feats = method.encoder(method.prepare(grid.patches(images).flatten(0, 1)))  # (B·N, D)
        feats = feats.view(2, 16, -1) + sinusoidal_2d(cells // 4, cells % 4, 16)
        pooled, _ = method.pool(feats)
        ref = {t: head(pooled[:, i]) for i, (t, head) in enumerate(method.classifiers.items())}
    if not tasks:
        got, ref = {"label": got}, ref
    assert set(got) == set(ref)
    for task in ref:
        torch.testing.assert_close(got[task], ref[task], rtol=1e-5, atol=1e-5)


def test_one_head_one_task_selects_the_global_top_m():
    torch.manual_seed(1)
    method = create_method(_cfg(memory=5, iters=3, heads=1)).eval()
    images = _images(side=96)  # N = 36: 1 buffer fill + 11 chunks of 3
    with torch.no_grad():
        grid, cells = _all_cells(method, images)
        scores = method.scores(method.embed(grid.taker(images), grid, cells))  # (B, N): all
        want = scores.topk(5, dim=1).indices.sort(dim=1).values
        got = method.select(images, grid).sort(dim=1).values
    assert torch.equal(got, want)


def _reference_select(method, images, grid, order):
    """The documented algorithm, one image at a time with plain Python lists."""
    m, step = method.cfg.method.memory_size, method.cfg.method.iter_size
    out = []
    for b in range(images.shape[0]):
        img, kept = images[b : b + 1], order[b, :m].tolist()
        for start in range(m, grid.num_patches, step):
            cand = kept + order[b, start : start + step].tolist()
            emb = method.embed(grid.taker(img), grid, torch.tensor([cand]))
            s = method.scores(emb)[0]
            kept = [cand[i] for i in s.topk(m).indices.tolist()]
        out.append(sorted(kept))
    return out


def test_several_heads_and_tasks_follow_the_documented_iterations():
    torch.manual_seed(2)
    method = create_method(_cfg(memory=4, iters=5, heads=4, tasks=TASKS)).eval()
    images = _images(side=80)  # N = 25
    grid = method.grid(images)
    with torch.no_grad():
        torch.manual_seed(7)
        got = method.select(images, grid)
        torch.manual_seed(7)
        order = torch.argsort(torch.rand(2, grid.num_patches), dim=1)  # the same shuffle
        want = _reference_select(method, images, grid, order)
    assert got.sort(dim=1).values.tolist() == want
    assert got.shape == (2, 4) and all(len(set(row)) == 4 for row in got.tolist())


def test_selection_builds_no_graph_and_runs_in_eval_mode():
    method = create_method(_cfg(tasks=TASKS)).train()
    seen = []
    method.encoder.register_forward_hook(
        lambda mod, inp, out: seen.append((torch.is_grad_enabled(), mod.training, out.requires_grad))
    )
    cells = method.select(_images(), None)
    assert seen and all(s == (False, False, False) for s in seen)
    assert method.training and method.encoder.training  # mode restored
    assert not cells.requires_grad and cells.dtype == torch.long


def test_train_step_learns_from_the_selected_patches_only():
    torch.manual_seed(3)
    method = create_method(_cfg(memory=3, iters=4, tasks=TASKS)).train()
    opt = torch.optim.SGD(method.parameters(), lr=0.0)
    shapes = []
    method.encoder.register_forward_hook(
        lambda mod, inp, out: shapes.append((torch.is_grad_enabled(), tuple(inp[0].shape)))
    )
    targets = {"majority": torch.tensor([1, 2]), "max": torch.tensor([3, 4]),
               "top": torch.tensor([0, 1]), "multi": torch.zeros(2, 10)}
    loss = method.train_step(_images(), targets, StepContext(method, opt))
    assert loss > 0
    with_grad = [s for g, s in shapes if g]
    assert with_grad == [(2 * 3, 1, 16, 16)]  # one re-encoding of B·M patches
    assert max(s[0] for g, s in shapes if not g) <= 2 * (3 + 4)  # chunks of B·(M+I) at most


def test_peak_memory_does_not_grow_with_the_number_of_patches():
    cfg = _cfg(memory=8, iters=8, tasks=TASKS)
    cfg.train.batch_size = 2
    small = measure_method_peak(cfg, (1, 128, 128))  # N = 64
    big = measure_method_peak(cfg, (1, 512, 512))  # N = 1024
    assert big <= 1.1 * small, (small, big)
    assert estimate_step_peak(cfg, (1, 512, 512)) == big  # and the estimate agrees


def test_estimate_shortcut_runs_few_selection_chunks_without_changing_the_peak():
    cfg = _cfg(memory=4, iters=5, tasks=TASKS)  # 25 patches on 80²: 5 selection chunks
    from gigapatch.memory.estimates import estimate_step

    fast = estimate_step(cfg, (1, 80, 80))
    assert fast.peak == estimate_step(cfg, (1, 80, 80), exact=True).peak
    assert fast.peak == measure_method_peak(cfg, (1, 80, 80))


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="divisible by model.attn_heads = 3"):
        create_method(_cfg(heads=3))
    with pytest.raises(ConfigError, match="by 4"):
        cfg = _cfg(heads=2)
        cfg.model.latent_dim = 18
        create_method(cfg)
    cfg = _cfg()
    cfg.method.memory_size = 0
    with pytest.raises(Exception, match="memory_size"):
        copy.deepcopy(cfg).validate()


def test_selection_reuse_scans_the_previous_top_m_and_a_share_of_the_rest(monkeypatch):
    """``selection_refresh = r``: a training step scans the image's previous M cells plus
    ⌈r·N⌉ others; with one head, r = 1 gives the exact (global) top-M."""
    torch.manual_seed(0)
    method = create_method(_cfg(memory=4, iters=3, heads=1, selection_refresh=0.25)).eval()
    images = _images(b=2, side=64)  # N = 16
    with torch.no_grad():
        exact = method.select(images)
        previous = exact.flip(1)
        method.cfg.method.selection_refresh = 1.0
        again = method.select(images, previous=previous)
    assert torch.equal(exact.sort(1).values, again.sort(1).values)

    method.cfg.method.selection_refresh = 0.25
    scanned = []
    real = type(method).embed_patches
    monkeypatch.setattr(type(method), "embed_patches", lambda self, patches, grid, cells:
                        scanned.append(cells.shape[1]) or real(self, patches, grid, cells))
    ctx = StepContext(method, torch.optim.SGD(method.parameters(), lr=0.01))
    targets = torch.tensor([1, 2])
    method.train()
    method.train_step(images, targets, ctx)  # first visit: all 16 cells scanned
    first = sum(scanned[:-1])  # (the last embed is the learning pass over M)
    scanned.clear()
    method.train_step(images, targets, ctx)  # then M + ⌈0.25·16⌉ = 8
    assert first == 16 and sum(scanned[:-1]) == 8 and scanned[-1] == 4
    assert len(method.selections) == 2 and method.training_state()["selections"]
