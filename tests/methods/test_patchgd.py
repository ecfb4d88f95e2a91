import copy

import pytest
import torch

from gigapatch.memory.budget import measure_method_peak
from gigapatch.config import Config
from gigapatch.methods.base import create_method
from gigapatch.methods.patchgd import sample_cells
from gigapatch.step import StepContext


def _cfg(**method):
    cfg = Config()
    cfg.data.num_classes = 5
    cfg.data.in_chans = 1
    cfg.model.latent_dim = 8
    cfg.model.head_width = 8
    cfg.method.patch_size = 16
    cfg.method.fill_chunk = 5
    for k, v in method.items():
        setattr(cfg.method, k, v)
    return cfg


def _grads_of_one_step(method, images, targets):
    """Parameter gradients PatchGD computes for one batch (before the optimizer step)."""
    grads = {}

    ctx = StepContext(method, torch.optim.SGD(method.parameters(), lr=0.0))
    ctx.step = lambda: grads.update({n: p.grad.clone() for n, p in method.named_parameters()})
    method.train_step(images, targets, ctx)
    return grads


@pytest.mark.parametrize("global_context", ["none", "add", "concat"])
@pytest.mark.parametrize("stride", [None, 12])
def test_full_sampling_equals_plain_autograd(global_context, stride):
    """k = N, J = 1: PatchGD's gradient equals autograd through θ2(stack of θ1(patches))."""
    torch.manual_seed(0)
    cfg = _cfg(sample_fraction=1.0, inner_steps=1, global_context=global_context, stride=stride)
    method = create_method(cfg).double()
    reference = copy.deepcopy(method)
    images = torch.randint(0, 256, (2, 1, 40, 52), dtype=torch.uint8)  # 3×4 grid, padded
    targets = torch.tensor([1, 4])

    got = _grads_of_one_step(method, images, targets)

    grid = reference.grid(images)
    patches = grid.patches(images).flatten(0, 1)  # (B·N, 1, p, p)
    z = reference.encode(patches).view(2, grid.num_patches, -1)
    g = reference.encode(reference.global_patch(images)) if global_context != "none" else None
    reference.task.loss(reference.logits(z, grid, g), targets).backward()

    for name, p in reference.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-12, msg=name)


def test_inner_steps_write_new_embeddings_into_z():
    """With J = 2 and accumulation, step 2 sees step 1's patches re-encoded (same θ1 here)."""
    torch.manual_seed(1)
    cfg = _cfg(sample_fraction=0.5, inner_steps=2)
    method = create_method(cfg).double()
    images = torch.randint(0, 256, (1, 1, 32, 32), dtype=torch.uint8)  # 2×2 grid, k = 2
    grads = _grads_of_one_step(method, images, torch.tensor([2]))
    assert all(torch.isfinite(g).all() for g in grads.values())
    # Accumulated gradient = mean over the 2 inner steps; θ1 unchanged in between, so Z in both
    # steps equals the full encoding and the head's gradient equals the full-batch one.
    ref = create_method(_cfg(sample_fraction=1.0, inner_steps=1)).double()
    ref.load_state_dict(method.state_dict())
    ref_grads = _grads_of_one_step(ref, images, torch.tensor([2]))
    for name in grads:
        if name.startswith("head."):
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=1e-12)


def test_without_accumulation_optimizer_steps_every_inner_step():
    cfg = _cfg(sample_fraction=0.25, inner_steps=4, accumulate=False)
    method = create_method(cfg)
    calls = []
    ctx = StepContext(method, torch.optim.SGD(method.parameters(), lr=0.1))
    ctx.step = lambda: calls.append(1)
    method.train_step(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), torch.tensor([0, 1]), ctx)
    assert len(calls) == 4


def test_sampled_cells_are_distinct_across_inner_steps():
    torch.manual_seed(0)
    order = sample_cells(batch=3, num_cells=20, count=20)
    for row in order:
        assert sorted(row.tolist()) == list(range(20))
    longer = sample_cells(batch=2, num_cells=5, count=12)
    assert longer.shape == (2, 12)
    for row in longer:
        assert sorted(row[:5].tolist()) == list(range(5))


def test_predict_equals_head_over_full_fill():
    torch.manual_seed(0)
    method = create_method(_cfg(global_context="concat")).eval()
    images = torch.randint(0, 256, (2, 1, 48, 48), dtype=torch.uint8)
    with torch.no_grad():
        out = method.predict(images)
        grid = method.grid(images)
        z = method.encode(grid.patches(images).flatten(0, 1)).view(2, grid.num_patches, -1)
        ref = method.logits(z, grid, method.encode(method.global_patch(images)))
    torch.testing.assert_close(out, ref)


def test_patchgd_memory_is_flat_in_image_size_while_full_grows():
    cfg = _cfg(sample_fraction=1 / 16, inner_steps=2)
    cfg.method.patch_size = 32
    cfg.method.fill_chunk = 16
    cfg.train.batch_size = 1
    small = measure_method_peak(cfg, (1, 256, 256))  # N = 64, k = 4
    cfg_big = copy.deepcopy(cfg)
    cfg_big.method.sample_fraction = 4 / 1024  # same k = 4 at N = 1024
    big = measure_method_peak(cfg_big, (1, 1024, 1024))
    assert big <= 1.15 * small, (small, big)

    full = copy.deepcopy(cfg)
    full.method.name = "full"
    full_small = measure_method_peak(full, (1, 256, 256))
    full_big = measure_method_peak(full, (1, 1024, 1024))
    assert full_big >= 8 * full_small, (full_small, full_big)


def test_frozen_encoder_step_equals_the_exact_step_and_caches_z(tiny_config, no_step):
    """θ1 frozen: one θ2 step on the cached Z gives exactly the gradients of PatchGD's J
    inner steps (re-encoding into Z), and a second step reads Z from the cache."""
    import copy

    from gigapatch.data.datasets import CSVImageDataset
    from gigapatch.methods.base import create_method
    from gigapatch.step import StepContext, make_optimizer

    torch.manual_seed(0)
    cfg = copy.deepcopy(tiny_config)
    cfg.model.freeze_encoder, cfg.method.global_context = True, "concat"
    ds = CSVImageDataset(cfg.data.train_csv, num_classes=4)
    images = torch.stack([ds[i][0] for i in range(4)])
    targets = torch.stack([ds[i][1] for i in range(4)])
    fast = create_method(cfg.validate())
    exact = copy.deepcopy(fast)
    exact.cfg = copy.deepcopy(cfg)
    exact.cfg.method.z_cache_budget = "0"
    grads = []
    for m, frozen_path in ((fast, True), (exact, False)):
        m.train()
        m.zero_grad()
        if frozen_path:
            m._frozen_step(images, targets, no_step, m.grid(images), None,
                           *m.plan(m.grid(images)))
        else:  # the general J-step algorithm, with the encoder's weights fixed
            type(m).encoder_frozen = property(lambda self: False)
            try:
                m.train_step(images, targets, no_step)
            finally:
                del type(m).encoder_frozen
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and all(n.startswith("head.") for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
    assert fast.z_cache.misses == 4 and len(fast.z_cache.items) == 4
    opt = make_optimizer(fast, cfg, fast.encoder_parameters())
    fast.train_step(images, targets, StepContext(fast, opt))
    assert fast.z_cache.hits == 4  # no encoder pass on the second step
    with torch.inference_mode():  # cached prediction = θ2 over a fresh fill, same weights
        fast.eval()
        grid = fast.grid(images)
        want = fast.logits(fast.fill(images, grid), grid, fast.encode(fast.global_patch(images)))
        torch.testing.assert_close(fast.predict(images), want)



def test_channels_last_and_a_compiled_fill_give_the_same_z(monkeypatch):
    """``model.channels_last`` and ``model.compile`` change the fill's speed, not its Z (the
    compiled twin is built once, outside the state dict)."""
    cfg = Config()
    cfg.data.num_classes, cfg.data.in_chans = 3, 1
    cfg.model.latent_dim, cfg.method.patch_size, cfg.method.fill_chunk = 8, 16, 5
    torch.manual_seed(0)
    plain = create_method(cfg.validate()).eval()
    images = torch.randint(0, 256, (2, 1, 48, 64), dtype=torch.uint8)
    fast_cfg = copy.deepcopy(cfg)
    fast_cfg.model.channels_last, fast_cfg.model.compile = True, True
    fast = create_method(fast_cfg.validate())
    fast.load_state_dict(plain.state_dict())
    fast.eval()
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    with torch.no_grad():
        want = plain.fill(images, plain.grid(images))
        got = fast.fill(images, fast.grid(images))
        fast.fill(images, fast.grid(images))
    torch.testing.assert_close(got, want)
    assert compiled == [fast.encoder]  # compiled once
    assert set(fast.state_dict()) == set(plain.state_dict())
    conv = next(m for m in fast.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
