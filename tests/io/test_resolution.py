"""data.level / data.mpp: a pyramid level presented as level 0, chosen by microns per pixel."""

import pickle

import numpy as np
import pytest
import tifffile

from gigapatch.config import Config
from gigapatch.core.errors import ConfigError, DataError
from gigapatch.data.datasets import open_dataset
from gigapatch.io.readers import open_image
from gigapatch.io.resolution import LevelView, at_resolution, base_mpp


def _pyramid(path, mpp=0.25, description=None, side=256):
    """A 3-level tiled pyramid (SubIFDs) with level-0 resolution ``mpp`` µm/px (cm tags)."""
    rng = np.random.default_rng(0)
    levels = [rng.integers(0, 255, (side >> i, side >> i, 3), dtype=np.uint8) for i in range(3)]
    extra = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"} if mpp else {}
    with tifffile.TiffWriter(path) as tif:
        tif.write(levels[0], tile=(64, 64), subifds=2, photometric="rgb",
                  description=description, **extra)
        for level in levels[1:]:
            tif.write(level, tile=(32, 32), subfiletype=1, photometric="rgb")
    return levels


def test_mpp_from_tiff_tags_and_the_level_it_chooses(tmp_path):
    levels = _pyramid(tmp_path / "s.tiff", mpp=0.25)
    reader = open_image(tmp_path / "s.tiff")
    assert base_mpp(reader) == pytest.approx(0.25)
    assert at_resolution(reader, mpp=0.1) is reader  # finer than level 0: level 0
    half = at_resolution(reader, mpp=0.5)
    assert isinstance(half, LevelView) and half.offset == 1
    assert at_resolution(reader, mpp=0.9).offset == 1  # never coarser than asked
    assert at_resolution(reader, mpp=1.0).offset == 2
    assert base_mpp(half) == pytest.approx(0.5)
    assert half.shape == (128, 128, 3) and half.levels == [(128, 128), (64, 64)]
    assert half.downsamples == [1.0, 2.0]
    np.testing.assert_array_equal(half.read_region(10, 20, 30, 40), levels[1][10:40, 20:60])
    np.testing.assert_array_equal(half.read_region(0, 0, 64, 64, level=1), levels[2])
    again = pickle.loads(pickle.dumps(half))  # crosses into DataLoader workers
    np.testing.assert_array_equal(again.read_region(5, 5, 8, 8), levels[1][5:13, 5:13])


def test_aperio_description_wins_and_missing_metadata_is_refused(tmp_path):
    _pyramid(tmp_path / "a.tiff", mpp=None,
             description="Aperio Image Library v12.0.15\n256x256 [0,0 256x256] JPEG/RGB Q=70"
                         "|AppMag = 40|MPP = 0.2520|Filename = a")
    assert base_mpp(open_image(tmp_path / "a.tiff")) == pytest.approx(0.252)
    _pyramid(tmp_path / "none.tiff", mpp=None)
    reader = open_image(tmp_path / "none.tiff")
    assert base_mpp(reader) is None
    with pytest.raises(DataError, match=r"none\.tiff has no resolution metadata.*data\.level"):
        at_resolution(reader, mpp=0.5)
    with pytest.raises(DataError, match=r"3 level\(s\).*data\.level = 3 does not exist"):
        at_resolution(reader, level=3)
    with pytest.raises(ConfigError, match="choose one"):
        at_resolution(reader, level=1, mpp=0.5)


def test_openslide_reports_the_same_mpp(tmp_path):
    pytest.importorskip("openslide")
    _pyramid(tmp_path / "s.tiff", mpp=0.25)
    reader = open_image(tmp_path / "s.tiff", backend="openslide")
    assert base_mpp(reader) == pytest.approx(0.25, rel=1e-3)


def test_a_lazy_data_set_reads_at_the_configured_level(tmp_path):
    levels = _pyramid(tmp_path / "s.tiff", mpp=0.25)
    (tmp_path / "train.csv").write_text("image_id,grade\ns,2\n")
    cfg = Config()
    cfg.data.kind, cfg.data.train_csv, cfg.data.val_csv = "lazy_csv", *[str(tmp_path / "train.csv")] * 2
    cfg.data.path_column, cfg.data.label_column, cfg.data.path_suffix = "image_id", "grade", ".tiff"
    cfg.data.num_classes, cfg.data.in_chans, cfg.data.mpp = 3, 3, 0.5
    reader, label = open_dataset(cfg.validate(), "train")[0]
    assert int(label) == 2 and reader.shape == (128, 128, 3)
    np.testing.assert_array_equal(reader.read_region(0, 0, 128, 128), levels[1])
    cfg.data.kind = "csv"
    with pytest.raises(ConfigError, match="lazy_csv or folder"):
        cfg.validate()


def test_segmentation_reads_images_and_masks_at_the_level_and_detection_refuses(tmp_path):
    levels = _pyramid(tmp_path / "s.tiff", mpp=0.25)
    ids = (np.arange(256)[:, None] // 7 + np.arange(256)[None] // 3) % 4
    tifffile.imwrite(tmp_path / "m.tiff", ids.astype(np.uint8), tile=(64, 64))
    (tmp_path / "seg.csv").write_text("path,mask\ns.tiff,m.tiff\n")
    cfg = Config()
    cfg.task.kind, cfg.data.kind, cfg.data.mpp = "segment", "lazy_csv", 0.5
    cfg.data.train_csv = cfg.data.val_csv = str(tmp_path / "seg.csv")
    cfg.data.num_classes, cfg.data.in_chans = 4, 3
    reader, mask = open_dataset(cfg.validate(), "train")[0]
    np.testing.assert_array_equal(reader.read_region(0, 0, 128, 128), levels[1])
    np.testing.assert_array_equal(mask.read(), ids[1::2, 1::2])  # nearest: pixel centres
    cfg.task.kind = "detect"
    with pytest.raises(ConfigError, match="not supported for detection"):
        cfg.validate()
