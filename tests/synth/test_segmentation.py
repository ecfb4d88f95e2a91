"""The segmentation generator: deterministic, masks follow the strokes, PNG and TIFF agree."""

import tracemalloc

import numpy as np
import pytest
import tifffile
from PIL import Image

from gigapatch.core.errors import ConfigError
from gigapatch.synth.segmentation import generate_segmentation


@pytest.fixture(scope="module")
def seg_png(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg_png")
    generate_segmentation(root, n_train=3, n_test=2, side=128, scale_range=(20, 32),
                          progress=False)
    return root


def _read(path):
    return tifffile.imread(path) if str(path).endswith(".tiff") else np.asarray(Image.open(path))


def test_masks_mark_the_digit_strokes_and_the_majority(seg_png):
    for i in range(3):
        image = _read(seg_png / f"train/images/{i:06d}.png")
        digits = _read(seg_png / f"train/masks_digits/{i:06d}.png")
        majority = _read(seg_png / f"train/masks_majority/{i:06d}.png")
        assert set(np.unique(majority)) <= {0, 1} and set(np.unique(digits)) <= set(range(11))
        assert (image[digits > 0] >= 128).all()  # strokes are bright pixels
        assert ((majority > 0) <= (digits > 0)).all()
        classes = np.unique(digits[digits > 0]) - 1
        assert 1 <= len(classes) <= 3  # the majority class and two others
        maj = np.unique(digits[majority > 0]) - 1
        assert len(maj) == 1  # every majority stroke is of one class …
        assert maj[0] in classes


def test_generation_is_deterministic_and_csvs_list_the_pairs(seg_png, tmp_path):
    generate_segmentation(tmp_path, n_train=3, n_test=2, side=128, scale_range=(20, 32),
                          progress=False)
    for rel in ("train/images/000002.png", "test/masks_digits/000001.png", "train_majority.csv"):
        assert (tmp_path / rel).read_bytes() == (seg_png / rel).read_bytes()
    lines = (seg_png / "test_digits.csv").read_text().splitlines()
    assert lines[0] == "path,mask" and lines[1] == "test/images/000000.png,test/masks_digits/000000.png"


def test_tiled_tiff_level_0_equals_the_png_and_has_a_pyramid(seg_png, tmp_path):
    generate_segmentation(tmp_path, n_train=3, n_test=2, side=128, scale_range=(20, 32),
                          png_max_side=64, tile=32, progress=False)
    for sub in ("images", "masks_digits", "masks_majority"):
        png = _read(seg_png / f"train/{sub}/000001.png")
        with tifffile.TiffFile(tmp_path / f"train/{sub}/000001.tiff") as tif:
            page = tif.pages[0]
            assert page.is_tiled and page.tilewidth == 32
            assert np.array_equal(page.asarray(), png)
    assert (tmp_path / "train_digits.csv").read_text().count(".tiff") == 6


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="side 40 is too small"):
        generate_segmentation(tmp_path, side=40, scale_range=(20, 30), progress=False)
    with pytest.raises(ConfigError, match="scale_range"):
        generate_segmentation(tmp_path, scale_range=(4, 30), progress=False)


def test_tiff_canvases_are_written_tile_by_tile_in_flat_memory(seg_png, tmp_path):
    """Writing 16× the pixels (2,048² vs 512², both as tiled TIFF) may not raise the peak of
    Python/numpy allocations by even a quarter of one 2,048² canvas (4 MiB): no canvas, mask
    or level is held whole. (``seg_png`` has loaded the digits already.)"""
    peaks = {}
    for side in (512, 2048):
        tracemalloc.start()
        generate_segmentation(tmp_path / str(side), n_train=1, n_test=0, side=side,
                              scale_range=(20, 32), n_noise=20, png_max_side=256, tile=64,
                              progress=False)
        peaks[side] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    with tifffile.TiffFile(tmp_path / "2048/train/masks_majority/000000.tiff") as tif:
        assert tif.pages[0].shape == (2048, 2048) and tif.pages[0].is_tiled
    assert peaks[2048] < peaks[512] + 2**20, peaks
