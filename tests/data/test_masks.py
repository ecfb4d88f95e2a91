"""Masks: class ids from PNG/TIFF, lazy windows equal in-memory windows, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from gigapatch.core.errors import DataError
from gigapatch.data.masks import IGNORE, MaskReader, Masks, class_ids
from gigapatch.data.segmentation import segmentation_csv, segmentation_folder


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_binary_255_masks_and_out_of_range_values():
    assert class_ids(np.array([[0, 255]], np.uint8), 2, "m.png").tolist() == [[0, 1]]
    with pytest.raises(DataError, match=r"m.png: value 7 at pixel \(y=3, x=5\).*0..3"):
        class_ids(np.array([[0, 7]], np.uint8), 4, "m.png", y0=3, x0=4)
    with pytest.raises(DataError, match="value 255"):
        class_ids(np.array([[255]], np.uint8), 3, "m.png")  # 255 is 1 only for 2 classes


def test_palette_masks_give_their_indices_and_rgb_masks_are_refused(tmp_path):
    ids = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    img = Image.fromarray(ids, "P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    img.save(tmp_path / "p.png")
    assert MaskReader(tmp_path / "p.png", 3).read().tolist() == ids.tolist()
    _png(tmp_path / "rgb.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="rgb.png has 3 channels"):
        MaskReader(tmp_path / "rgb.png", 3)
    with pytest.raises(DataError, match="mask file not found"):
        MaskReader(tmp_path / "gone.png", 3)


def test_lazy_tiff_windows_equal_in_memory_windows(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4, (70, 90)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "m.tif", ids, tile=(32, 32))
    lazy = Masks([MaskReader(tmp_path / "m.tif", 4)] * 2)
    memory = Masks([torch.from_numpy(ids).long()] * 2)
    image = torch.tensor([0, 1, 1])
    boxes = torch.tensor([[0, 0, 32, 32], [40, 60, 32, 32], [-5, 80, 32, 32]])  # past borders
    got, want = lazy.crop(image, boxes), memory.crop(image, boxes)
    assert torch.equal(got, want)
    assert torch.equal(got[1, :30, :30], torch.from_numpy(ids[40:70, 60:90]).long())
    assert (got[1, 30:] == IGNORE).all() and (got[2, :5] == IGNORE).all()
    assert torch.equal(lazy.full(), memory.full())


def test_csv_and_folder_sets_check_sizes_and_pairs(tmp_path):
    img = np.zeros((20, 30), np.uint8)
    _png(tmp_path / "images/a.png", img)
    _png(tmp_path / "images/b.png", img)
    _png(tmp_path / "masks/a.png", np.ones((20, 30), np.uint8))
    with pytest.raises(DataError, match=r"images without a mask .*b.png"):
        segmentation_folder(tmp_path, 2)
    _png(tmp_path / "masks/b.png", np.ones((20, 31), np.uint8))
    with pytest.raises(DataError, match=r"b.png is 20×31 but b.png is 20×30"):
        segmentation_folder(tmp_path, 2)
    _png(tmp_path / "masks/b.png", np.full((20, 30), 255, np.uint8))
    lazy, decoded = segmentation_folder(tmp_path, 2), segmentation_folder(tmp_path, 2, lazy=False)
    assert len(lazy) == 2
    image, mask = decoded[1]
    assert image.shape == (1, 20, 30) and mask.dtype == torch.int64 and (mask == 1).all()
    assert torch.equal(Masks([lazy[1][1]]).full()[0], mask)

    (tmp_path / "s.csv").write_text("path,mask\nimages/a.png,masks/a.png\n")
    assert len(segmentation_csv(tmp_path / "s.csv", 2, lazy=True)) == 1
    (tmp_path / "bad.csv").write_text("path,label\nimages/a.png,1\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) \['mask'\]"):
        segmentation_csv(tmp_path / "bad.csv", 2, lazy=True)
    (tmp_path / "gone.csv").write_text("path,mask\nimages/a.png,masks/zz.png\n")
    with pytest.raises(DataError, match="zz.png"):
        segmentation_csv(tmp_path / "gone.csv", 2, lazy=True)


def test_a_class_id_out_of_range_is_named_when_read(tmp_path):
    _png(tmp_path / "images/a.png", np.zeros((8, 8), np.uint8))
    _png(tmp_path / "masks/a.png", np.full((8, 8), 9, np.uint8))
    ds = segmentation_folder(tmp_path, 3, lazy=False)
    with pytest.raises(DataError, match=r"masks/a.png: value 9 .*0..2"):
        ds[0]


def _nearest_reference(full: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour ``(h, w)`` sample of ``full``: pixel centre (i + ½)·H/h, floored."""
    H, W = full.shape
    rows = [int((i + 0.5) * H / h) for i in range(h)]
    cols = [int((j + 0.5) * W / w) for j in range(w)]
    return full[np.ix_(rows, cols)]


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_a_mask_presented_at_a_level_size_is_its_nearest_sample(tmp_path, monkeypatch, suffix):
    rng = np.random.default_rng(1)
    full = rng.integers(0, 5, (300, 203)).astype(np.uint8)
    path = tmp_path / f"m{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(path, full, tile=(32, 32))
    else:
        _png(path, full)
    monkeypatch.setattr("gigapatch.data.masks._BAND", 7)  # several bands per read
    mask = MaskReader(path, 5, size=(75, 51))  # ×4 in y, ×3.98 in x
    assert mask.shape == (75, 51) and mask.file_shape == (300, 203)
    want = _nearest_reference(full, 75, 51)
    np.testing.assert_array_equal(mask.read(), want)
    np.testing.assert_array_equal(mask.read(10, 20, 33, 17), want[10:43, 20:37])
    assert MaskReader(path, 5, size=(300, 203)).read().tolist() == full.tolist()


def _pyramid_image(path: Path, side: int) -> None:
    """A 2-level tiled TIFF pyramid (SubIFD) of a grey ``side²`` image."""
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.zeros((side, side), np.uint8), tile=(32, 32), subifds=1)
        tif.write(np.zeros((side // 2, side // 2), np.uint8), tile=(32, 32), subfiletype=1)


def test_a_set_at_a_pyramid_level_presents_masks_at_that_level(tmp_path):
    (tmp_path / "images").mkdir()
    _pyramid_image(tmp_path / "images/a.tif", 128)
    _pyramid_image(tmp_path / "images/b.tif", 128)
    full = (np.arange(128)[:, None] // 9 + np.arange(128)[None] // 5) % 3
    _png(tmp_path / "masks/a.png", full.astype(np.uint8))  # drawn at level 0
    _png(tmp_path / "masks/b.png", full[::2, ::2].astype(np.uint8))  # drawn at level 1
    ds = segmentation_folder(tmp_path, 3, level=1)
    for i, want in enumerate((_nearest_reference(full, 64, 64), full[::2, ::2])):
        reader, mask = ds[i]
        assert reader.shape[:2] == (64, 64) and mask.shape == (64, 64)
        np.testing.assert_array_equal(Masks([mask]).full()[0].numpy(), want)
    with pytest.raises(DataError, match=r"b.png is 64×64 but b.tif is 128×128\. A mask"):
        segmentation_folder(tmp_path, 3)  # a level-1 mask needs the level
    _png(tmp_path / "masks/b.png", np.zeros((100, 100), np.uint8))
    with pytest.raises(DataError, match=r"b.png is 100×100 but b.tif is 128×128 or 64×64"):
        segmentation_folder(tmp_path, 3, level=1)
