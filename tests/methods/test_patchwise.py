"""Patchwise training: pooling, equivalence with full-image training, hard-patch mining, memory."""

import copy
import math

import numpy as np
import pytest
import tifffile
import torch

from gigapatch.config import Config
from gigapatch.core.errors import ConfigError
from gigapatch.data.batch import LazyBatch
from gigapatch.io.readers import open_image
from gigapatch.memory.budget import fit_to_budget, measure_method_peak
from gigapatch.memory.estimates import estimate_step_peak
from gigapatch.methods.base import create_method
from gigapatch.core.sampling import sample_cells
from gigapatch.methods.patchwise import blend_weight, pool_patches, repeat_targets
import gigapatch.methods.base as base_module
from gigapatch.core.grid import PatchGrid
from gigapatch.step import StepContext


def _cfg(**method) -> Config:
    cfg = Config()
    cfg.data.num_classes = 4
    cfg.data.in_chans = 1
    cfg.method.name = "patchwise"
    cfg.method.patch_size = 16
    cfg.method.fill_chunk = 5
    for k, v in method.items():
        setattr(cfg.method, k, v)
    return cfg.validate()


def _grads(method, images, targets) -> dict[str, torch.Tensor]:
    grads = {}
    ctx = StepContext(method, torch.optim.SGD(method.parameters(), lr=0.0))
    ctx.step = lambda: grads.update({n: p.grad.clone() for n, p in method.named_parameters()})
    method.train_step(images, targets, ctx)
    return grads


def test_pooling_modes_on_a_constructed_example():
    logits = torch.tensor([[[0.0, 1.0], [2.0, -1.0], [4.0, 3.0]]])  # (B=1, N=3, K=2)
    torch.testing.assert_close(pool_patches(logits, "mean"), torch.tensor([[2.0, 1.0]]))
    torch.testing.assert_close(pool_patches(logits, "max"), torch.tensor([[4.0, 3.0]]))
    lse = torch.tensor([[math.log(math.exp(0) + math.exp(2) + math.exp(4)) - math.log(3),
                         math.log(math.exp(1) + math.exp(-1) + math.exp(3)) - math.log(3)]])
    torch.testing.assert_close(pool_patches(logits, "logsumexp"), lse)
    # Equal logits pool to themselves in every mode.
    same = torch.full((2, 5, 3), 0.7)
    for mode in ("mean", "max", "logsumexp"):
        torch.testing.assert_close(pool_patches(same, mode), torch.full((2, 3), 0.7))
    # A mask keeps only its patches; an image without any keeps all of them.
    mask = torch.tensor([[True, False, True]])
    torch.testing.assert_close(pool_patches(logits, "mean", mask), torch.tensor([[2.0, 2.0]]))
    torch.testing.assert_close(pool_patches(logits, "max", mask[:, [1, 1, 0]]),
                               torch.tensor([[4.0, 3.0]]))
    torch.testing.assert_close(pool_patches(logits, "mean", torch.zeros(1, 3, dtype=torch.bool)),
                               torch.tensor([[2.0, 1.0]]))


def test_targets_follow_their_patches():
    assert repeat_targets(torch.tensor([3, 1]), 2).tolist() == [3, 3, 1, 1]
    out = repeat_targets({"a": torch.tensor([0, 2]), "b": torch.eye(2)}, 3)
    assert out["a"].tolist() == [0, 0, 0, 2, 2, 2]
    assert out["b"].tolist() == [[1, 0]] * 3 + [[0, 1]] * 3


def test_one_patch_covering_the_image_equals_full_image_training():
    """p = image side, k = 1: the same network, loss and gradients as ``full``."""
    torch.manual_seed(0)
    cfg = _cfg(patch_size=32, sample_fraction=1.0)
    patchwise = create_method(cfg).double()
    full_cfg = copy.deepcopy(cfg)
    full_cfg.method.name = "full"
    full = create_method(full_cfg).double()
    full.load_state_dict(patchwise.state_dict())  # the same parameter names: net.*
    images = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    targets = torch.tensor([0, 3, 1])
    got, want = _grads(patchwise, images, targets), _grads(full, images, targets)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)
    patchwise.eval(), full.eval()
    with torch.no_grad():
        torch.testing.assert_close(patchwise.predict(images), full.predict(images))


def test_mean_weighting_is_the_mean_over_every_sampled_patch():
    """k = N: the gradient is autograd through the mean loss over all patches."""
    torch.manual_seed(1)
    method = create_method(_cfg(sample_fraction=1.0)).double()
    images = torch.randint(0, 256, (2, 1, 32, 48), dtype=torch.uint8)  # 2×3 grid
    targets = torch.tensor([2, 0])
    got = _grads(method, images, targets)
    grid = method.grid(images)
    patches = grid.patches(images).flatten(0, 1)  # (B·N, 1, p, p)
    ref = copy.deepcopy(method)
    loss = torch.nn.functional.cross_entropy(ref.patch_outputs(patches), targets.repeat_interleave(6))
    loss.backward()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-8, atol=1e-12, msg=name)


def test_hard_patch_mining_trains_on_the_highest_losses():
    torch.manual_seed(2)
    cfg = _cfg(sample_fraction=1.0, patch_weighting="top_k_loss", hard_fraction=0.25)
    method = create_method(cfg)
    images = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)  # N = 16, kept 4
    targets = torch.tensor([1, 3])
    grid = method.grid(images)
    trained = []
    original = method.patch_outputs

    def spy(patches):
        if torch.is_grad_enabled():
            trained.append(patches.clone())
        return original(patches)

    method.patch_outputs = spy
    method.eval()  # the losses the method ranks by (it scores in eval mode)
    with torch.no_grad():
        out = original(grid.patches(images).flatten(0, 1))
        losses = torch.nn.functional.cross_entropy(
            out, targets.repeat_interleave(16), reduction="none").view(2, 16)
    method.train()
    _grads(method, images, targets)
    (got,) = trained
    assert got.shape == (8, 1, 16, 16)
    want = grid.gather(images, losses.topk(4, dim=1).indices)  # (2, 4, 1, p, p)
    for b in range(2):  # the same patches, in any order
        key = lambda x: x.flatten(1).double().sum(1).sort().values  # noqa: E731
        torch.testing.assert_close(key(got[4 * b : 4 * b + 4]), key(want[b]))


def test_several_label_heads_each_get_their_outputs():
    cfg = _cfg(sample_fraction=0.5, pool="logsumexp")
    cfg.data.tasks = ["majority", "multi"]
    cfg.data.multilabel = ["multi"]
    method = create_method(cfg)
    images = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    targets = {"majority": torch.tensor([1, 2]), "multi": torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0.]])}
    loss = method.train_step(images, targets, StepContext(method, torch.optim.SGD(method.parameters(), lr=0.1)))
    assert math.isfinite(loss)
    method.eval()
    with torch.no_grad():
        out = method.predict(images)
    assert set(out) == {"majority", "multi"} and out["multi"].shape == (2, 4)


def test_lazy_images_give_what_in_memory_images_give(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (40, 50), dtype=np.uint8) for _ in range(2)]
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"{i}.tif")
        tifffile.imwrite(paths[-1], a, tile=(16, 16))
    lazy = LazyBatch([open_image(p) for p in paths])
    tensor = torch.from_numpy(np.stack(arrays))[:, None]
    method = create_method(_cfg(pool="max")).eval()
    with torch.no_grad():
        torch.testing.assert_close(method.predict(lazy), method.predict(tensor))
    targets = torch.tensor([0, 1])
    for images in (lazy, tensor):
        torch.manual_seed(5)
        m = copy.deepcopy(method).train()
        _grads(m, images, targets)


def test_memory_is_flat_in_image_size():
    cfg = _cfg(sample_fraction=4 / 64, patch_size=32)
    cfg.train.batch_size = 1
    small = measure_method_peak(cfg, (1, 256, 256))  # N = 64, k = 4
    big_cfg = copy.deepcopy(cfg)
    big_cfg.method.sample_fraction = 4 / 1024  # the same k = 4 at N = 1024
    big = measure_method_peak(big_cfg, (1, 1024, 1024))
    assert big <= 1.1 * small, (small, big)
    assert estimate_step_peak(big_cfg, (1, 1024, 1024)) == big


def test_budget_lowers_the_patches_per_step():
    cfg = _cfg(sample_fraction=0.5, patch_size=16, fill_chunk=1)
    cfg.train.batch_size = 2
    shape = (1, 128, 128)  # N = 64, k = 32
    at10 = copy.deepcopy(cfg)
    at10.method.sample_fraction = 10 / 64
    budget = measure_method_peak(at10, shape) + 64
    fit_to_budget(cfg, shape, budget, "cpu")
    assert round(cfg.method.sample_fraction * 64) == 10
    assert measure_method_peak(cfg, shape) <= budget


def test_explain_draws_per_patch_probabilities(tmp_path):
    method = create_method(_cfg()).eval()
    images = torch.randint(0, 256, (1, 1, 48, 48), dtype=torch.uint8)
    with torch.no_grad():
        logits, path = method.explain(images, str(tmp_path / "e.png"))
        torch.testing.assert_close(logits, method.predict(images))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="method.pool"):
        _cfg(pool="median")
    with pytest.raises(ConfigError, match="method.patch_weighting"):
        _cfg(patch_weighting="hardest")
    with pytest.raises(ConfigError, match="method.hard_fraction"):
        _cfg(hard_fraction=0.0)


# ---------------------------------------------------------------- segmentation
def _seg_cfg(**method) -> Config:
    cfg = Config()
    cfg.task.kind = "segment"
    cfg.data.num_classes, cfg.data.in_chans = 3, 1
    cfg.model.encoder = "tiny_unet"
    cfg.method.name = "patchwise"
    cfg.method.patch_size = 16
    cfg.method.fill_chunk = 5
    for k, v in method.items():
        setattr(cfg.method, k, v)
    return cfg.validate()


def test_dense_patchwise_with_one_patch_equals_full():
    torch.manual_seed(0)
    cfg = _seg_cfg(patch_size=32, sample_fraction=1.0)
    pw = create_method(cfg).double()
    full_cfg = copy.deepcopy(cfg)
    full_cfg.method.name = "full"
    full = create_method(full_cfg).double()
    full.load_state_dict(pw.state_dict())
    images = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    masks = pw.task.random_targets(2, (32, 32))
    got, want = _grads(pw, images, masks), _grads(full, images, masks)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12, msg=name)


def test_dense_patches_are_trained_against_their_mask_windows():
    torch.manual_seed(3)
    method = create_method(_seg_cfg(sample_fraction=0.25))
    images = torch.randint(0, 256, (2, 1, 48, 64), dtype=torch.uint8)  # 3×4 grid, k = 3
    masks = method.task.random_targets(2, (48, 64))
    seen = []
    real_loss = method.task.loss
    method.task.loss = lambda out, t, window=None: seen.append(window) or real_loss(out, t, window)
    torch.manual_seed(7)
    _grads(method, images, masks)
    (window,) = seen
    image, boxes = window
    assert image.tolist() == [0, 0, 0, 1, 1, 1]
    torch.manual_seed(7)
    cells = sample_cells(2, 12, 3)
    assert torch.equal(boxes, method.grid(images).boxes()[cells.flatten()])


def test_blend_weight_is_positive_symmetric_and_peaks_in_the_centre():
    for p in (7, 8):
        w = blend_weight(p)
        assert (w > 0).all() and torch.equal(w, w.T) and torch.equal(w, w.flip(0))
        assert w.max() == 1.0 and w[p // 2, p // 2] == 1.0 and w[0, 0] == w.min()


def test_sliding_window_of_a_pointwise_network_equals_the_whole_image():
    """Overlapping windows blend to the whole-image output when patches agree where they
    overlap (a pointwise network), at any stride and with padded borders."""
    method = create_method(_seg_cfg(stride=6)).eval()
    conv = torch.nn.Conv2d(1, 3, 1)
    method.net = conv
    images = torch.randint(0, 256, (2, 1, 40, 45), dtype=torch.uint8)
    with torch.no_grad():
        got = method.predict(images)
        want = conv(method.prepare(images))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_dense_patchwise_memory_is_flat_in_image_size():
    cfg = _seg_cfg(sample_fraction=4 / 64, patch_size=32)
    cfg.train.batch_size = 1
    small = measure_method_peak(cfg, (1, 256, 256))
    big_cfg = copy.deepcopy(cfg)
    big_cfg.method.sample_fraction = 4 / 1024
    big = measure_method_peak(big_cfg, (1, 1024, 1024))
    assert big <= 1.1 * small, (small, big)


def _blended_reference(method, images):
    """Every patch's logits times the blend weight, summed over the whole padded image and
    divided by the summed weights: ``(B, K, H, W)``."""
    b, _, h, w = images.shape
    p = method.cfg.method.patch_size
    grid = PatchGrid(h, w, p, method.cfg.method.stride or p // 2)
    ph, pw = grid.padded_size
    out = torch.zeros(b, method.num_classes, ph, pw)
    weight = torch.zeros(ph, pw)
    kernel = blend_weight(p)
    logits = method.patch_outputs(grid.patches(images).flatten(0, 1)).view(
        b, grid.num_patches, method.num_classes, p, p)
    for cell in range(grid.num_patches):
        y, x, _, _ = grid.box(cell)
        out[:, :, y : y + p, x : x + p] += logits[:, cell] * kernel
        weight[y : y + p, x : x + p] += kernel
    return (out / weight)[..., :h, :w]


def test_streamed_mask_blocks_equal_the_whole_blended_prediction(tmp_path, monkeypatch):
    """Prediction band by band (16-row bands, patch 16, stride 6: a patch spans two bands)
    equals blending over the whole image, in memory and from a TIFF read lazily."""
    monkeypatch.setattr(base_module, "MASK_BLOCK", 16)
    torch.manual_seed(4)
    method = create_method(_seg_cfg(stride=6)).eval()
    images = torch.randint(0, 256, (2, 1, 40, 45), dtype=torch.uint8)
    with torch.no_grad():
        want = _blended_reference(method, images)
        torch.testing.assert_close(method.predict(images), want, rtol=1e-5, atol=1e-6)
        path = tmp_path / "image.tiff"
        tifffile.imwrite(path, images[0, 0].numpy(), tile=(16, 16))
        block, blocks = method.mask_blocks(LazyBatch([open_image(path)]))
        ids = torch.zeros(40, 45, dtype=torch.uint8)
        tops = []
        for y, x, part in blocks:
            tops.append(y)
            assert part.shape[0] <= block and part.shape[1] <= block
            ids[y : y + part.shape[0], x : x + part.shape[1]] = part
    assert block == 16 and sorted(set(tops)) == [0, 16, 32]
    assert torch.equal(ids, want[0].argmax(dim=0).to(torch.uint8))
