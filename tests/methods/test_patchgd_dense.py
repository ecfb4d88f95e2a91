"""Dense PatchGD (segmentation): exact window gradients, stitched Z, memory off the device."""

import copy

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F

from gigapatch.config import Config
from gigapatch.core.errors import ConfigError
from gigapatch.core.sampling import sample_cells
from gigapatch.data.batch import LazyBatch
from gigapatch.io.readers import open_image
from gigapatch.io.image import write_mask_blocks
from gigapatch.memory.budget import measure_method_peak
from gigapatch.memory.estimates import estimate_step_peak
from gigapatch.methods.base import create_method
from gigapatch.step import StepContext


def _cfg(**method) -> Config:
    cfg = Config()
    cfg.task.kind = "segment"
    cfg.data.num_classes, cfg.data.in_chans = 3, 1
    cfg.model.encoder, cfg.model.latent_dim = "tiny_unet", 4
    cfg.model.head_width, cfg.model.head_layers = 6, 2
    cfg.method.name, cfg.method.patch_size, cfg.method.z_stride = "patchgd", 16, 4
    cfg.method.fill_chunk = 5
    for k, v in method.items():
        setattr(cfg.method, k, v)
    return cfg.validate()


def _grads(method, images, targets):
    grads = {}
    ctx = StepContext(method, torch.optim.SGD(method.parameters(), lr=0.0))
    ctx.step = lambda: grads.update({n: p.grad.clone() for n, p in method.named_parameters()
                                     if p.grad is not None})
    method.train_step(images, targets, ctx)
    return grads


def _stitched(method, images):
    """θ1 applied patch by patch, blocks laid out on the grid: Z ``(B, C, Hz, Wz)``."""
    geo = method.geometry(images)
    grid, q = geo.grid, geo.q
    blocks = method.encode_map(grid.patches(images).flatten(0, 1))  # (B·N, C, q, q)
    b, c = images.shape[0], blocks.shape[1]
    return blocks.view(b, grid.rows, grid.cols, c, q, q).permute(0, 3, 1, 4, 2, 5).reshape(
        b, c, grid.rows * q, grid.cols * q)


def _whole_map_logits(method, images):
    """θ2 over the whole zero-padded map [Z, G, pooled Z], upsampled to pixels."""
    z = _stitched(method, images)
    hz, wz = z.shape[-2:]
    parts = [z]
    mode = method.cfg.method.global_context
    if mode != "none":
        g = F.interpolate(method.encode_map(method.global_patch(images)), size=(hz, wz),
                          mode="bilinear", align_corners=False)
        parts = [z + g] if mode == "add" else [z, g]
    if method.cfg.method.z_pool == "gated":  # Σ σ(a·z + c) z / Σ σ(a·z + c) over the map
        w = torch.sigmoid(method.z_pool.gate(z))
        pooled = (w * z).sum(dim=(2, 3), keepdim=True) / w.sum(dim=(2, 3), keepdim=True)
    elif method.cfg.method.z_pool == "share":  # log shares, objects' relative to the top one
        logs = torch.softmax(z, dim=1).mean(dim=(2, 3), keepdim=True).log()
        pooled = torch.cat([logs[:, :1], logs[:, 1:] - logs[:, 1:].amax(dim=1, keepdim=True)], 1)
    else:
        pooled = z.mean(dim=(2, 3), keepdim=True)
    parts.append(pooled.expand_as(z))
    if method.cfg.method.z_pool == "share":  # each pixel's agreement with the summary
        parts.append((torch.softmax(z, dim=1)[:, 1:] * pooled[:, 1:]).sum(dim=1, keepdim=True))
    h = method.head.halo
    out = method.head(F.pad(torch.cat(parts, dim=1), (h, h, h, h)), pooled.flatten(1))
    s = method.cfg.method.z_stride
    out = F.interpolate(out, size=(hz * s, wz * s), mode="bilinear", align_corners=False)
    return out[..., : images.shape[-2], : images.shape[-1]]


@pytest.mark.parametrize("global_context,z_pool,film", [
    ("none", "mean", False), ("add", "mean", False), ("concat", "mean", False),
    ("concat", "gated", False), ("concat", "gated", True), ("concat", "share", True)])
def test_full_sampling_equals_autograd_through_the_whole_map(global_context, z_pool, film):
    """k = N, J = 1: window by window, PatchGD-seg's gradients equal autograd through θ2 over
    the stitched θ1(patches) of the whole (padded) image (float64), the gate and the FiLM
    modulation included."""
    torch.manual_seed(0)
    cfg = _cfg(sample_fraction=1.0, inner_steps=1, global_context=global_context, z_pool=z_pool)
    cfg.model.head_film = film
    method = create_method(cfg).double()
    if z_pool == "gated":  # away from its zero start, so that the gate's gradient is tested
        torch.nn.init.normal_(method.z_pool.gate.weight)
    if film:  # likewise away from the identity
        torch.nn.init.normal_(method.head.film.weight, std=0.3)
        torch.nn.init.normal_(method.head.film.bias, std=0.3)
    reference = copy.deepcopy(method)
    images = torch.randint(0, 256, (2, 1, 40, 52), dtype=torch.uint8)  # 3×4 grid, padded
    masks = method.task.random_targets(2, (40, 52))
    got = _grads(method, images, masks)
    reference.task.loss(_whole_map_logits(reference, images), masks).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-6, atol=1e-10, msg=name)


@pytest.mark.parametrize("z_pool,film", [("mean", False), ("gated", False), ("gated", True),
                                         ("share", True)])
def test_stitched_z_and_prediction_equal_the_whole_map(z_pool, film):
    torch.manual_seed(1)
    cfg = _cfg(global_context="concat", z_pool=z_pool)
    cfg.model.head_film = film
    method = create_method(cfg).double().eval()
    if z_pool == "gated":
        torch.nn.init.normal_(method.z_pool.gate.weight)
    if film:
        torch.nn.init.normal_(method.head.film.weight, std=0.3)
    images = torch.randint(0, 256, (2, 1, 40, 52), dtype=torch.uint8)
    with torch.no_grad():
        geo = method.geometry(images)
        torch.testing.assert_close(method.fill_map(images, geo), _stitched(method, images))
        torch.testing.assert_close(method.predict(images), _whole_map_logits(method, images))


def test_loss_windows_are_the_re_encoded_patches_and_their_halo():
    torch.manual_seed(2)
    method = create_method(_cfg(sample_fraction=0.25, inner_steps=2))
    images = torch.randint(0, 256, (1, 1, 64, 64), dtype=torch.uint8)  # 4×4 grid, k = 4
    masks = method.task.random_targets(1, (64, 64))
    seen, heads = [], []
    real_loss = method.task.loss
    method.task.loss = lambda out, t, window=None: seen.append(window) or real_loss(out, t, window)
    method.head.register_forward_hook(lambda m, inp, out: heads.append(inp[0].shape))
    encoded = []
    real_encode = method.encode_map
    method.encode_map = lambda x: encoded.append(x.shape[0]) or real_encode(x)
    torch.manual_seed(9)
    _grads(method, images, masks)
    torch.manual_seed(9)
    order = sample_cells(1, 16, 8)
    grid = method.geometry(images).grid
    for j, (image, boxes) in enumerate(seen):
        cells = order[0, 4 * j : 4 * j + 4]
        assert torch.equal(boxes, grid.boxes()[cells])  # the loss covers exactly those patches
    q, halo = 16 // 4, method.head.halo
    assert heads == [torch.Size([4, 2 * 4, q + 2 * (halo + 1), q + 2 * (halo + 1)])] * 2  # [Z, P]
    assert encoded[-2:] == [4, 4]  # the inner steps re-encode k patches each


@pytest.mark.parametrize("z_pool", ["mean", "gated"])
def test_device_memory_stays_flat_as_the_image_grows(z_pool):
    """Z lives on the host: the device holds θ's state and the k windows, not the map."""
    cfg = _cfg(sample_fraction=4 / 64, inner_steps=2, fill_chunk=16, z_pool=z_pool)
    cfg.method.patch_size, cfg.train.batch_size = 32, 1
    small = estimate_step_peak(cfg, (1, 256, 256), device="cuda")  # N = 64
    big = copy.deepcopy(cfg)
    big.method.sample_fraction = 4 / 4096  # the same k = 4 at N = 4096 (2048²)
    large = estimate_step_peak(big, (1, 2048, 2048), device="cuda")
    assert large <= 1.2 * small, (small, large)


def test_bad_dense_settings_are_refused():
    with pytest.raises(ConfigError, match="multiple of method.z_stride"):
        create_method(_cfg(z_stride=3))
    with pytest.raises(ConfigError, match="leave method.stride unset"):
        create_method(_cfg(stride=8))


def test_streamed_mask_blocks_equal_the_prediction(tmp_path):
    torch.manual_seed(4)
    method = create_method(_cfg(global_context="add")).double().eval()
    images = torch.randint(0, 256, (1, 1, 40, 52), dtype=torch.uint8)
    with torch.no_grad():
        block, blocks = method.mask_blocks(images)
        path = write_mask_blocks(tmp_path / "m.tiff", (40, 52), block,
                                 ((y, x, ids.numpy()) for y, x, ids in blocks))
        want = method.predict(images)[0].argmax(dim=0)
    got = torch.from_numpy(tifffile.imread(path)).long()
    assert block == 16 and torch.equal(got, want)


def test_z_on_disk_gives_the_same_map():
    torch.manual_seed(5)
    method = create_method(_cfg()).eval()
    images = torch.randint(0, 256, (1, 1, 48, 48), dtype=torch.uint8)
    on_disk = copy.deepcopy(method)
    on_disk.cfg.method.z_on_disk = True
    with torch.no_grad():
        geo = method.geometry(images)
        torch.testing.assert_close(on_disk.fill_map(images, geo), method.fill_map(images, geo))
        torch.testing.assert_close(on_disk.predict(images), method.predict(images))


@pytest.mark.parametrize("z_pool", ["mean", "gated"])
def test_the_cpu_estimate_prices_the_step_within_a_fraction_of_a_percent(z_pool):
    """Fake tensors cannot see which cells were sampled nor the boxes' values; the windows
    have known shapes, so the estimate stays within 0.5 % of the measurement, never below."""
    cfg = _cfg(sample_fraction=4 / 16, inner_steps=2, global_context="concat", z_pool=z_pool)
    cfg.train.batch_size = 2
    measured = measure_method_peak(cfg, (1, 64, 64))
    estimated = estimate_step_peak(cfg, (1, 64, 64))
    assert measured <= estimated <= 1.005 * measured, (measured, estimated)


def test_skip_background_samples_only_cells_with_content(tmp_path):
    array = np.zeros((64, 64), np.uint8)
    array[4:28, 36:60] = 255  # content in cell 1 only (patch 32: a 2×2 grid)
    tifffile.imwrite(tmp_path / "a.tif", array, tile=(16, 16))
    cfg = _cfg(sample_fraction=1 / 4, inner_steps=1)
    cfg.method.patch_size = 32
    cfg.data.skip_background = True
    method = create_method(cfg)
    seen = []
    real_loss = method.task.loss
    method.task.loss = lambda out, t, window=None: seen.append(window) or real_loss(out, t, window)
    masks = method.task.random_targets(1, (64, 64))
    for seed in range(5):
        torch.manual_seed(seed)
        _grads(method, LazyBatch([open_image(tmp_path / "a.tif")]), masks)
    assert {tuple(w[1][0].tolist()) for w in seen} == {(0, 32, 32, 32)}
