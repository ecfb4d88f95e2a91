"""PatchGD for detection: per-level maps Z stitched from the patches' FPN maps, the FCOS head
on windows around the re-encoded patches, boxes matched in image pixels."""

import copy

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F

from gigapatch.config import Config
from gigapatch.core.errors import ConfigError
from gigapatch.data.batch import LazyBatch
from gigapatch.engine.loop import train
from gigapatch.io.readers import open_image
from gigapatch.memory.budget import measure_method_peak
from gigapatch.methods.base import create_method
from gigapatch.models.detection import PixelGroupNorm
from gigapatch.synth.detection import generate_detection

#: Boxes (xyxy, image pixels of a 128² image cut into 64² patches) on and across patch borders.
BOXES = torch.tensor([[50.0, 20, 80, 44],    # across the vertical border x = 64
                      [20.0, 56, 40, 72],    # across the horizontal border y = 64
                      [52.0, 52, 76, 76],    # over the corner shared by all four patches
                      [90.0, 90, 110, 118],  # inside the last patch
                      [4.0, 70, 60, 124]])   # a large one in the lower-left patch
LABELS = torch.tensor([1, 2, 3, 1, 2])


def _cfg(**method) -> Config:
    cfg = Config()
    cfg.task.kind = "detect"
    cfg.data.num_classes, cfg.data.in_chans = 3, 1
    cfg.model.encoder = "fcos_tiny"
    cfg.method.name, cfg.method.patch_size, cfg.method.fill_chunk = "patchgd", 64, 3
    for k, v in method.items():
        setattr(cfg.method, k, v)
    return cfg.validate()


def _targets(b: int) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": BOXES.clone(), "labels": LABELS.clone()} for _ in range(b)]


def _stitched(method, images):
    """θ1 (backbone + FPN) applied patch by patch, each level's blocks laid out on the grid:
    ``[(B, F, Hz_l, Wz_l)]`` (with gradients)."""
    geos = method.level_geometry(images)
    grid = geos[0].grid
    maps = method.net.features(method.prepare(grid.patches(images).flatten(0, 1)))
    b, out = images.shape[0], []
    for m, geo in zip(maps, geos):
        q, c = geo.q, m.shape[1]
        out.append(m.view(b, grid.rows, grid.cols, c, q, q).permute(0, 3, 1, 4, 2, 5)
                   .reshape(b, c, grid.rows * q, grid.cols * q))
    return out


def _whole_map_head(method, images):
    """θ2 (FCOS head) over the whole stitched maps (+ the global maps, upsampled): the head
    dict over all anchors, the anchors (torchvision's generator) and the anchors per level."""
    maps = _stitched(method, images)
    if method.cfg.method.global_context == "add":
        g = method.net.features(method.prepare(method.global_patch(images)))
        maps = [z + F.interpolate(gl, size=z.shape[-2:], mode="bilinear", align_corners=False)
                for z, gl in zip(maps, g)]
    head = method.net.head(maps)
    size = tuple(s * method.net.strides[0] for s in maps[0].shape[-2:])
    anchors = method.net._anchors(maps, [size] * images.shape[0])
    return head, anchors, [m.shape[2] * m.shape[3] for m in maps], maps


def test_pixel_group_norm_normalises_each_pixel_and_matches_group_norm_on_one_pixel():
    torch.manual_seed(0)
    norm = PixelGroupNorm(64, groups=32).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 64, 5, 7, dtype=torch.float64)
    gn = torch.nn.GroupNorm(32, 64).double()
    gn.load_state_dict(norm.state_dict())
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 64, 1, 1)  # each pixel alone
    want = gn(pixels).view(2, 5, 7, 64).permute(0, 3, 1, 2)
    torch.testing.assert_close(norm(x), want)
    y = x.clone()
    y[:, :, 0, 0] += 100  # another pixel changes: this one's output does not
    torch.testing.assert_close(norm(y)[:, :, 3, 4], norm(x)[:, :, 3, 4])


def test_level_maps_stitched_from_patches_equal_the_fpn_patch_by_patch():
    torch.manual_seed(1)
    method = create_method(_cfg()).double().eval()
    images = torch.randint(0, 256, (2, 1, 128, 192), dtype=torch.uint8)  # 2×3 grid
    geos = method.level_geometry(images)
    assert [g.q for g in geos] == [16, 8, 4, 2] and method.net.halo == 5
    with torch.no_grad():
        zs = method.fill_levels(images, geos)
        for got, want in zip(zs, _stitched(method, images)):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("global_context", ["none", "add"])
def test_full_sampling_equals_autograd_through_the_head_over_the_stitched_maps(
        global_context, no_step):
    """k = N, J = 1: window by window, PatchGD-det's loss and gradients (θ1 and θ2) equal
    autograd through the FCOS head over the whole stitched maps, with FCOS's own anchors and
    loss (float64), boxes on and across patch borders included."""
    torch.manual_seed(2)
    method = create_method(_cfg(sample_fraction=1.0, inner_steps=1,
                                global_context=global_context)).double().train()
    reference = copy.deepcopy(method)
    images = torch.randint(0, 256, (2, 1, 128, 128), dtype=torch.uint8)
    targets = _targets(2)
    loss = method.train_step(images, targets, no_step)
    head, anchors, per_level, _ = _whole_map_head(reference, images)
    want = reference.net.fcos.compute_loss(reference._box_targets(targets), head, anchors,
                                           per_level)
    total = sum(want.values())
    total.backward()
    assert loss == pytest.approx(float(total.detach()), rel=1e-9)
    for name, p in reference.named_parameters():
        if p.grad is not None:
            got = dict(method.named_parameters())[name].grad
            torch.testing.assert_close(got, p.grad, rtol=1e-6, atol=1e-9, msg=name)
    assert any(n.startswith("net.fcos.backbone") for n, p in method.named_parameters()
               if p.grad is not None and p.grad.abs().sum() > 0)  # θ1 learns


@pytest.mark.parametrize("cells", [[0], [1], [2], [0, 3]])
def test_boxes_across_patch_borders_are_learnt_from_each_patch_holding_their_anchors(cells):
    """A window's loss is FCOS's loss over the whole map's anchors of that patch, matched
    against all boxes of the image in image pixels (not clipped): a box cut by a border is
    learnt from each side, regressing the whole box."""
    torch.manual_seed(3)
    method = create_method(_cfg()).double().eval()
    images = torch.randint(0, 256, (1, 1, 128, 128), dtype=torch.uint8)
    targets = method._box_targets(_targets(1))
    geos = method.level_geometry(images)
    with torch.no_grad():
        zs = method.fill_levels(images, geos)
        windows = method.level_windows(zs, geos, [0] * len(cells), cells)
        got = method.window_losses(windows, geos, cells, targets)
        head, anchors, per_level, maps = _whole_map_head(method, images)
        # the whole map's anchors of those patches' blocks, level by level
        keep, start = [], 0
        for geo, m in zip(geos, maps):
            wz = m.shape[-1]
            for cell in cells:
                y, x = geo.origin(cell)
                rows = torch.arange(y, y + geo.q)[:, None] * wz + torch.arange(x, x + geo.q)
                keep.append(start + rows.flatten())
            start += m.shape[2] * m.shape[3]
        keep = torch.cat(keep)
        sub = {k: v[:, keep] for k, v in head.items()}
        want = method.net.fcos.compute_loss(targets, sub, [anchors[0][keep]],
                                            [len(cells) * g.q * g.q for g in geos])
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=key)
    assert got["bbox_regression"] > 0  # each of these patches holds anchors of a cut box


def test_a_patchgd_detection_run_trains_predicts_and_reports_map(tmp_path, detection_config):
    generate_detection(tmp_path / "det", n_train=4, n_test=2, side=128, scale_range=(14, 40),
                       digits_per_image=(2, 3), progress=False)
    cfg = detection_config(tmp_path / "det", tmp_path / "runs", "patchgd", name="pgd")
    cfg.method.patch_size, cfg.method.sample_fraction, cfg.method.inner_steps = 64, 0.5, 2
    cfg.method.global_context = "add"
    summary = train(cfg.validate())
    assert 0 <= summary["val_map"] <= 1
    assert summary["strides"] == [4, 8, 16, 32] and summary["head_halo"] == 5


def test_prediction_from_disk_equals_prediction_in_memory(tmp_path):
    torch.manual_seed(4)
    method = create_method(_cfg(global_context="add")).eval()
    with torch.no_grad():  # some confident outputs, so that detections exist
        method.net.head.classification_head.cls_logits.bias.fill_(0.0)
    pixels = np.random.default_rng(0).integers(0, 256, (192, 128), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", pixels, tile=(64, 64))
    with torch.no_grad():
        lazy = method.predict(LazyBatch([open_image(tmp_path / "a.tif")]))[0]
        memory = method.predict(torch.from_numpy(pixels)[None, None])[0]
    assert len(memory["boxes"]) == 100  # FCOS's detections_per_img
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(lazy[key], memory[key])
    assert (memory["boxes"][:, 2] <= 128).all() and (memory["boxes"][:, 3] <= 192).all()


def test_device_memory_stays_flat_as_the_image_grows():
    """Z lives on the host: what a GPU would hold (the CPU measurement without the host maps)
    is the same at 256² and 1,024² for the same patch size and k; the host maps are Z."""
    peaks = {}
    for side in (256, 1024):
        cfg = _cfg(sample_fraction=2 / (side // 64) ** 2, inner_steps=2, fill_chunk=8)
        cfg.train.batch_size = 1
        peaks[side] = (measure_method_peak(cfg, (1, side, side), exclude_host_maps=True),
                       measure_method_peak(cfg, (1, side, side)))
    (small, _), (large, total) = peaks[256], peaks[1024]
    assert large <= 1.02 * small, peaks
    z_bytes = 64 * sum((1024 // s) ** 2 for s in (4, 8, 16, 32)) * 4  # F = 64, float32
    assert total - large >= 0.95 * z_bytes, peaks


def test_bad_detection_settings_are_refused():
    with pytest.raises(ConfigError, match="global_context: add"):
        create_method(_cfg(global_context="concat"))
    with pytest.raises(ConfigError, match="multiple of the coarsest FPN stride"):
        create_method(_cfg(patch_size=48))
    with pytest.raises(ConfigError, match="method.stride unset"):
        create_method(_cfg(stride=32))
