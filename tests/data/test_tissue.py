"""Tests for gigapatch.data.tissue: Otsu, background modes, grid geometry, sparse MNIST canvases."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gigapatch.data import tissue
from gigapatch.synth.gigapixel import generate_gigapixel, gigapixel_record
from gigapatch.core.grid import PatchGrid
from gigapatch.synth.megapixel_mnist import render_image
from gigapatch.data.tissue import foreground_mask, otsu_threshold
from gigapatch.core.errors import ConfigError
from gigapatch.io.readers import open_image

H, W = 200, 300  # multiples of 4: the 3-level pyramids below are exact box means


def _box(image: np.ndarray, f: int) -> np.ndarray:
    """Mean of f x f blocks (H, W divisible by f), any number of trailing channels."""
    h, w = image.shape[0] // f, image.shape[1] // f
    blocks = image.reshape(h, f, w, f, *image.shape[2:]).astype(np.float64)
    return np.round(blocks.mean(axis=(1, 3))).astype(image.dtype)


def write_pyramid(path: Path, image: np.ndarray, levels: int = 3) -> Path:
    """Tiled TIFF, level 0 + SubIFDs of 2x, 4x ... box means."""
    photometric = "rgb" if image.ndim == 3 else "minisblack"
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(32, 32), subifds=levels - 1, photometric=photometric)
        for level in range(1, levels):
            tif.write(_box(image, 2**level), tile=(32, 32), subfiletype=1,
                      photometric=photometric)
    return path


def make_canvas(
    cells: list[tuple[int, int]], patch: int, background: int, content: int, seed: int = 0
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """An H x W image with faint noise around ``background`` and one 8 x 8 blob of value
    ``content`` (on the 4-px grid) inside each listed cell of a non-overlapping grid.
    Returns the image and the blobs' boxes (y, x, h, w)."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 16, size=(H, W))
    image = (background + (noise if background < 128 else -noise)).astype(np.uint8)
    blobs = []
    for i, j in cells:
        y0, x0 = i * patch, j * patch
        y = y0 + 4 * int(rng.integers(0, (min(patch, H - y0) - 8) // 4 + 1))
        x = x0 + 4 * int(rng.integers(0, (min(patch, W - x0) - 8) // 4 + 1))
        image[y : y + 8, x : x + 8] = content
        blobs.append((y, x, 8, 8))
    return image, blobs


def expected_mask(grid: PatchGrid, blobs: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Cells whose box meets a blob."""
    mask = np.zeros(grid.shape, dtype=bool)
    for index in range(grid.num_patches):
        y, x, p, _ = grid.box(index)
        for by, bx, bh, bw in blobs:
            if by < y + p and y < by + bh and bx < x + p and x < bx + bw:
                mask[divmod(index, grid.cols)] = True
    return mask


CELLS = [(0, 0), (1, 3), (2, 8), (3, 1), (6, 9), (6, 4), (4, 6)]  # (6, *): the padded last row


@pytest.mark.parametrize(
    ("bg_value", "content", "modes"),
    [(0, 220, ("dark", "auto")), (245, 40, ("bright", "auto"))],
    ids=["dark-background", "bright-background"],
)
def test_mask_marks_exactly_the_cells_with_content(tmp_path, bg_value, content, modes) -> None:
    image, blobs = make_canvas(CELLS, 32, bg_value, content)
    reader = open_image(write_pyramid(tmp_path / "img.tif", image))
    grid = PatchGrid(H, W, 32)
    expected = expected_mask(grid, blobs)
    assert expected.sum() == len(CELLS) and grid.shape == (7, 10)
    for mode in modes:
        mask = foreground_mask(reader, 32, background=mode)  # level 2 (4x): best_level(32)
        assert mask.dtype == bool and mask.shape == grid.shape
        np.testing.assert_array_equal(mask, expected, err_msg=mode)
    wrong = "bright" if modes[0] == "dark" else "dark"
    assert foreground_mask(reader, 32, background=wrong).sum() > len(CELLS)  # the background


@pytest.mark.parametrize(("patch", "stride"), [(32, 16), (48, 20), (64, 64), (40, 12)])
def test_overlapping_grids_match_patch_grid(tmp_path, patch: int, stride: int) -> None:
    image, blobs = make_canvas(CELLS, 32, 0, 200, seed=1)
    reader = open_image(write_pyramid(tmp_path / "img.tif", image))
    grid = PatchGrid(H, W, patch, stride)
    for level in (0, 1, 2):
        mask = foreground_mask(reader, patch, stride, level=level, background="dark")
        assert mask.shape == grid.shape
        if stride % 2**level == 0 and patch % 2**level == 0:  # footprints on whole pixels
            np.testing.assert_array_equal(mask, expected_mask(grid, blobs), err_msg=str(level))
        else:  # footprints rounded outwards: never misses content
            assert mask[expected_mask(grid, blobs)].all()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("bright", [False, True], ids=["dark", "bright"])
def test_strip_by_strip_any_dtype(tmp_path, monkeypatch, dtype, bright: bool) -> None:
    """Levels read in many strips (here 2 rows each) give the same mask, for every dtype."""
    image, blobs = make_canvas(CELLS, 32, 245 if bright else 0, 30 if bright else 220, seed=3)
    scaled = image.astype(dtype) * (257 if dtype == np.uint16 else 1)
    if dtype == np.float32:
        scaled = scaled / np.float32(255)
    np.save(tmp_path / "img.npy", scaled)
    reader = open_image(tmp_path / "img.npy")
    expected = expected_mask(PatchGrid(H, W, 32), blobs)
    whole = foreground_mask(reader, 32)
    monkeypatch.setattr(tissue, "_STRIP_PIXELS", 2 * W + 17)
    assert len(tissue._strips(reader, 0)) == H // 2
    np.testing.assert_array_equal(foreground_mask(reader, 32), expected)
    np.testing.assert_array_equal(whole, expected)


def test_rgb_tissue_on_glass(tmp_path: Path) -> None:
    gray, blobs = make_canvas(CELLS, 32, 240, 0, seed=2)
    image = np.stack([gray, gray, gray], axis=-1)
    tissue = gray == 0
    image[tissue] = (190, 90, 160)  # pink-purple stain on white glass
    reader = open_image(write_pyramid(tmp_path / "slide.tif", image))
    assert reader.shape[2] == 3
    np.testing.assert_array_equal(
        foreground_mask(reader, 32), expected_mask(PatchGrid(H, W, 32), blobs)
    )


def test_min_fraction_and_threshold(tmp_path: Path) -> None:
    image, _ = make_canvas([(0, 0)], 32, 0, 200)
    image[32:64, 32:64] = 200  # cell (1, 1) full
    reader = open_image(write_pyramid(tmp_path / "img.tif", image))
    any_mask = foreground_mask(reader, 32, background="dark")
    assert any_mask[0, 0] and any_mask[1, 1] and any_mask.sum() == 2
    half = foreground_mask(reader, 32, background="dark", min_fraction=0.5)
    assert half[1, 1] and half.sum() == 1
    # threshold 0 on a dark background: every non-black pixel (the faint noise too)
    assert foreground_mask(reader, 32, threshold=0, background="dark", level=0).all()
    assert not foreground_mask(reader, 32, threshold=250, background="dark").any()


def test_uniform_image_has_no_foreground(tmp_path: Path) -> None:
    path = tmp_path / "flat.npy"
    np.save(path, np.full((100, 100), 7, dtype=np.uint8))
    assert not foreground_mask(open_image(path), 25).any()


def test_otsu_threshold_splits_two_modes() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.integers(10, 40, 500), rng.integers(150, 200, 100)])
    t = otsu_threshold(values.astype(np.uint8))
    assert 39 <= t < 150
    t_float = otsu_threshold(values.astype(np.float32) / 255)
    assert 39 / 255 <= t_float < 150 / 255
    assert otsu_threshold(np.zeros(10, dtype=np.uint8)) is None


def _digit_dir(directory: Path) -> Path:
    """IDX digits whose every pixel is 20..255 (so a block mean of 4 x 4 px with any digit
    pixel rounds to >= 1)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10, dtype=np.uint8), 10)
    images = rng.integers(20, 256, size=(len(labels), 28, 28)).astype(np.uint8)
    for name, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        header = struct.pack(">HBB", 0, 0x08, array.ndim)
        header += struct.pack(f">{array.ndim}I", *array.shape)
        (directory / name).write_bytes(header + array.tobytes())
    return directory


def test_sparse_mnist_canvas(tmp_path: Path) -> None:
    """On a generated gigapixel canvas, threshold 0 keeps exactly the cells with any
    non-black pixel, at level 0 and at the default (4x) level."""
    digits = _digit_dir(tmp_path)
    generate_gigapixel(tmp_path / "data", n_train=1, n_test=0, side=1024, tile=128, n_noise=8,
                       levels=3, digits_source=digits, progress=False)
    image = render_image(gigapixel_record(tmp_path / "data", "train", 0))
    reader = open_image(tmp_path / "data" / "train" / "000000.tiff")
    expected = image.reshape(16, 64, 16, 64).max(axis=(1, 3)) > 0
    assert 5 <= expected.sum() < 64  # 5 digits, 8 noise patches: mostly empty
    exact = foreground_mask(reader, 64, level=0, threshold=0, background="dark")
    np.testing.assert_array_equal(exact, expected)
    coarse = foreground_mask(reader, 64, threshold=0)  # auto: black border -> dark; level 2
    np.testing.assert_array_equal(coarse, expected)


def test_invalid_arguments(tmp_path: Path) -> None:
    path = tmp_path / "img.npy"
    np.save(path, np.zeros((64, 64), dtype=np.uint8))
    reader = open_image(path)
    with pytest.raises(ConfigError, match="background"):
        foreground_mask(reader, 16, background="white")
    with pytest.raises(ConfigError, match="level=3"):
        foreground_mask(reader, 16, level=3)
    with pytest.raises(ConfigError, match="patch_size 128"):
        foreground_mask(reader, 128)
    with pytest.raises(ConfigError, match="min_fraction"):
        foreground_mask(reader, 16, min_fraction=2)
