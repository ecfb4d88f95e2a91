import pytest
import torch

from gigapatch.core.grid import PatchGrid
from gigapatch.core.errors import ConfigError


@pytest.mark.parametrize(
    "h,w,p,s",
    [(64, 64, 16, None), (50, 37, 16, None), (64, 48, 16, 8), (45, 61, 20, 7), (32, 32, 32, None)],
)
def test_round_trip_is_exact(h, w, p, s):
    grid = PatchGrid(h, w, p, s)
    images = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8)
    patches = grid.patches(images)
    assert patches.shape == (2, grid.num_patches, 3, p, p)
    assert torch.equal(grid.assemble(patches), images)
    floats = torch.rand(2, 3, h, w, dtype=torch.float64)
    assert torch.equal(grid.assemble(grid.patches(floats)), floats)


def test_grid_covers_every_pixel_and_pads_last_row():
    grid = PatchGrid(50, 37, 16)
    assert grid.shape == (4, 3)
    assert grid.padded_size == (64, 48)
    # the last row/column is padded, never dropped
    img = torch.arange(50 * 37, dtype=torch.float32).view(1, 1, 50, 37)
    patches = grid.patches(img, value=-1.0)
    assert (patches >= 0).sum() == 50 * 37


def test_boxes_match_patch_contents():
    grid = PatchGrid(40, 56, 16, 12)
    img = torch.rand(1, 1, 40, 56)
    padded = grid.pad(img)
    patches = grid.patches(img)
    boxes = grid.boxes()
    assert boxes.shape == (grid.num_patches, 4)
    for idx in range(grid.num_patches):
        y, x, hh, ww = grid.box(idx)
        assert tuple(boxes[idx].tolist()) == (y, x, hh, ww)
        assert torch.equal(patches[0, idx], padded[0, :, y : y + hh, x : x + ww])


def test_cell_of_pixel_contains_the_pixel():
    grid = PatchGrid(50, 37, 16, 10)
    for y, x in [(0, 0), (49, 36), (25, 12), (15, 30)]:
        by, bx, bh, bw = grid.box(grid.cell_of_pixel(y, x))
        assert by <= y < by + bh and bx <= x < bx + bw


def test_gather_copies_only_selected_patches():
    grid = PatchGrid(64, 64, 16)
    img = torch.rand(3, 2, 64, 64)
    idx = torch.tensor([[0, 5, 15], [3, 3, 7], [15, 0, 1]])
    got = grid.gather(img, idx)
    assert got.shape == (3, 3, 2, 16, 16)
    all_patches = grid.patches(img)
    for b in range(3):
        assert torch.equal(got[b], all_patches[b, idx[b]])


def test_patch_view_is_a_view_without_padding():
    grid = PatchGrid(64, 64, 16)
    img = torch.rand(1, 1, 64, 64)
    view = grid.patch_view(img)
    assert view.untyped_storage().data_ptr() == img.untyped_storage().data_ptr()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(height=20, width=40, patch_size=32), "larger than the image"),
        (dict(height=64, width=64, patch_size=16, stride=17), "stride"),
        (dict(height=64, width=64, patch_size=0), "patch_size"),
    ],
)
def test_bad_geometry_is_a_clear_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PatchGrid(**kwargs)
