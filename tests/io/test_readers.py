"""Tests for gigapatch.io.readers: lazy region reads from TIFF pyramids, slides, PNG/JPEG, .npy."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import gigapatch.io.readers as readers_module
from gigapatch.core.errors import DataError, GigapatchError
from gigapatch.io.readers import SUPPORTED_EXTENSIONS, ImageReader, open_image

try:
    import openslide
except (ImportError, OSError):  # the optional extra gigapatch[slides] (OSError: no library)
    openslide = None

needs_openslide = pytest.mark.skipif(
    openslide is None, reason="openslide not installed (pip install 'gigapatch[slides]')"
)

Levels = list[np.ndarray]  # level arrays (H, W, C), level 0 first


# -- test images ---------------------------------------------------------------------------
def _noise(shape: tuple[int, ...], dtype: type = np.uint8, seed: int = 0) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.random.default_rng(seed).integers(0, info.max, shape, dtype=dtype, endpoint=True)


def _smooth(height: int, width: int, channels: int) -> np.ndarray:
    """A smooth uint8 image (JPEG reproduces it within a few grey levels)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    planes = [128 + 100 * np.sin(yy / (40 + 8 * c) + xx / (50 + 6 * c)) for c in range(channels)]
    return np.stack(planes, axis=-1).round().astype(np.uint8)


def _pyramid(image: np.ndarray, n: int) -> Levels:
    """Level l = every 2**l-th pixel; keeps the channel axis: (H, W) -> (H, W, 1)."""
    image = image if image.ndim == 3 else image[:, :, None]
    return [np.ascontiguousarray(image[:: 2**i, :: 2**i]) for i in range(n)]


def _tiff_array(level: np.ndarray) -> np.ndarray:
    return level[:, :, 0] if level.shape[2] == 1 else level


def _photometric(level: np.ndarray) -> str:
    return "minisblack" if level.shape[2] == 1 else "rgb"


def write_subifd_pyramid(path: Path, levels: Levels, **kwargs) -> Path:
    """Level 0 in the main IFD, reduced levels in its SubIFDs (the OME/QuPath layout)."""
    kwargs.setdefault("tile", (32, 32))
    with tifffile.TiffWriter(path, bigtiff=kwargs.pop("bigtiff", False)) as tif:
        tif.write(_tiff_array(levels[0]), subifds=len(levels) - 1,
                  photometric=_photometric(levels[0]), **kwargs)
        for level in levels[1:]:
            kwargs.pop("metadata", None)
            tif.write(_tiff_array(level), subfiletype=1, photometric=_photometric(level), **kwargs)
    return path


def write_chain_pyramid(path: Path, levels: Levels, **kwargs) -> Path:
    """Every level as a page of the main IFD chain, reduced ones flagged (the vips layout)."""
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(levels):
            tif.write(_tiff_array(level), tile=(32, 32), subfiletype=1 if i else 0,
                      photometric=_photometric(level), **kwargs)
    return path


def write_fake_svs(path: Path, levels: Levels) -> Path:
    """A tiled pyramid with Aperio descriptions: OpenSlide reads it with its 'aperio' driver."""
    height, width = levels[0].shape[:2]
    head = "Aperio Image Library v12.0.5\r\n"
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(levels):
            text = f"{width}x{height} [0,0 {width}x{height}] (64x64) RAW|AppMag = 20|MPP = 0.5"
            tif.write(level, tile=(64, 64), compression="zlib", photometric="rgb",
                      description=head + (text if i == 0 else f"level {i}"), metadata=None)
    return path


# -- every backend: (writer, expected levels, exact?) --------------------------------------
def _case_tiff_subifds_zlib_rgb(tmp: Path) -> tuple[Path, Levels]:
    levels = _pyramid(_noise((200, 136, 3)), 3)
    return write_subifd_pyramid(tmp / "sub.tif", levels, compression="zlib"), levels


def _case_tiff_chain_lzw_gray(tmp: Path) -> tuple[Path, Levels]:
    levels = _pyramid(_noise((150, 100)), 3)
    return write_chain_pyramid(tmp / "chain.tiff", levels, compression="lzw"), levels


def _case_ome_bigtiff_zstd_uint16_planar(tmp: Path) -> tuple[Path, Levels]:
    image = _noise((2, 120, 90), np.uint16)  # two channels, stored planar (C, Y, X)
    path = tmp / "planar.ome.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(image, tile=(32, 32), subifds=1, compression="zstd",
                  metadata={"axes": "CYX"})
        tif.write(image[:, ::2, ::2], tile=(32, 32), subfiletype=1, compression="zstd")
    return path, _pyramid(image.transpose(1, 2, 0), 2)


def _case_ome_tiff_deflate_rgb(tmp: Path) -> tuple[Path, Levels]:
    levels = _pyramid(_noise((96, 160, 3), seed=2), 2)
    path = write_subifd_pyramid(tmp / "rgb.ome.tiff", levels, compression="deflate",
                                metadata={"axes": "YXS"})
    return path, levels


def _case_bigtiff_float32_striped(tmp: Path) -> tuple[Path, Levels]:
    image = np.random.default_rng(3).normal(size=(70, 50, 2)).astype(np.float32)
    path = tmp / "striped.btf"
    tifffile.imwrite(path, image, bigtiff=True, rowsperstrip=16, compression="zlib",
                     photometric="minisblack", planarconfig="contig")
    return path, [image]


def _case_png_gray(tmp: Path) -> tuple[Path, Levels]:
    image = _noise((45, 61))
    Image.fromarray(image).save(tmp / "gray.png")
    return tmp / "gray.png", [image[:, :, None]]


def _case_png_rgb(tmp: Path) -> tuple[Path, Levels]:
    image = _noise((45, 61, 3))
    Image.fromarray(image).save(tmp / "rgb.PNG")
    return tmp / "rgb.PNG", [image]


def _case_png_uint16(tmp: Path) -> tuple[Path, Levels]:
    image = _noise((33, 20), np.uint16)
    Image.fromarray(image).save(tmp / "deep.png")
    return tmp / "deep.png", [image[:, :, None]]


def _case_jpeg_rgb(tmp: Path) -> tuple[Path, Levels]:
    Image.fromarray(_smooth(48, 72, 3)).save(tmp / "photo.jpg", quality=90)
    with Image.open(tmp / "photo.jpg") as img:  # reference: Pillow's own full decode
        return tmp / "photo.jpg", [np.asarray(img.convert("RGB"))]


def _case_jpeg_gray(tmp: Path) -> tuple[Path, Levels]:
    Image.fromarray(_smooth(40, 56, 1)[:, :, 0]).save(tmp / "gray.jpeg", quality=90)
    with Image.open(tmp / "gray.jpeg") as img:
        return tmp / "gray.jpeg", [np.asarray(img)[:, :, None]]


def _case_npy_gray(tmp: Path) -> tuple[Path, Levels]:
    image = _noise((37, 29))
    np.save(tmp / "gray.npy", image)
    return tmp / "gray.npy", [image[:, :, None]]


def _case_npy_float_fortran(tmp: Path) -> tuple[Path, Levels]:
    image = np.asfortranarray(np.random.default_rng(4).normal(size=(31, 27, 4)).astype(np.float32))
    np.save(tmp / "multi.npy", image)
    return tmp / "multi.npy", [np.ascontiguousarray(image)]


CASES: dict[str, Callable[[Path], tuple[Path, Levels]]] = {
    "tiff-subifds-zlib-rgb": _case_tiff_subifds_zlib_rgb,
    "tiff-chain-lzw-gray": _case_tiff_chain_lzw_gray,
    "ome-bigtiff-zstd-uint16-planar": _case_ome_bigtiff_zstd_uint16_planar,
    "ome-tiff-deflate-rgb": _case_ome_tiff_deflate_rgb,
    "bigtiff-float32-striped": _case_bigtiff_float32_striped,
    "png-gray": _case_png_gray,
    "png-rgb": _case_png_rgb,
    "png-uint16": _case_png_uint16,
    "jpeg-rgb": _case_jpeg_rgb,
    "jpeg-gray": _case_jpeg_gray,
    "npy-gray": _case_npy_gray,
    "npy-float-fortran": _case_npy_float_fortran,
}


def _regions(height: int, width: int, seed: int) -> list[tuple[int, int, int, int]]:
    """Corners, borders, single pixels, the whole level and random boxes, all inside."""
    boxes = [(0, 0, height, width), (0, 0, 1, 1), (height - 1, width - 1, 1, 1),
             (0, width - min(width, 7), min(height, 5), min(width, 7)),
             (height - min(height, 9), 0, min(height, 9), min(width, 11))]
    rng = np.random.default_rng(seed)
    for _ in range(6):
        h, w = rng.integers(1, height + 1), rng.integers(1, width + 1)
        boxes.append((int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)),
                      int(h), int(w)))
    return boxes


def _check_all_levels(reader: ImageReader, levels: Levels) -> None:
    assert reader.levels == [lv.shape[:2] for lv in levels]
    assert reader.shape == levels[0].shape and reader.dtype == levels[0].dtype
    for index, level in enumerate(levels):
        for y, x, h, w in _regions(*level.shape[:2], seed=index):
            got = reader.read_region(y, x, h, w, level=index)
            assert got.shape == (h, w, level.shape[2]) and got.dtype == level.dtype
            assert got.flags.c_contiguous and got.flags.writeable
            np.testing.assert_array_equal(got, level[y : y + h, x : x + w])


@pytest.mark.parametrize("case", sorted(CASES))
def test_read_region_equals_slicing_on_every_level(tmp_path: Path, case: str) -> None:
    path, levels = CASES[case](tmp_path)
    with open_image(path) as reader:
        assert reader.backend == SUPPORTED_EXTENSIONS[path.suffix.lower()]
        _check_all_levels(reader, levels)
        assert reader.downsamples[0] == 1.0 and reader.downsamples == sorted(reader.downsamples)
    assert not reader.is_open


def test_jpeg_compressed_tiff_pyramid(tmp_path: Path) -> None:
    levels = _pyramid(_smooth(160, 128, 3), 3)
    path = write_subifd_pyramid(tmp_path / "jpeg.tif", levels, compression="jpeg", tile=(64, 64))
    with tifffile.TiffFile(path) as tif:  # tifffile's full decode of each level: exact reference
        decoded = [lv.asarray() for lv in tif.series[0].levels]
    with open_image(path) as reader:
        _check_all_levels(reader, decoded)
        for index, level in enumerate(levels):  # lossy, but close to what was written
            got = reader.read_region(0, 0, *level.shape[:2], level=index)
            assert np.abs(got.astype(int) - level).mean() < 3


def test_levels_downsamples_and_best_level(tmp_path: Path) -> None:
    levels = _pyramid(_noise((150, 100)), 3)  # 150x100, 75x50, 38x25
    reader = open_image(write_chain_pyramid(tmp_path / "p.tif", levels))
    assert reader.levels == [(150, 100), (75, 50), (38, 25)]
    assert reader.downsamples[:2] == [1.0, 2.0]
    assert reader.downsamples[2] == pytest.approx((150 / 38 + 100 / 25) / 2)  # 3.97
    assert [reader.best_level(d) for d in (0.25, 1, 1.9, 2, 3.9, 4, 100)] == [0, 0, 0, 1, 1, 2, 2]
    for bad in (0, -2, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive finite"):
            reader.best_level(bad)
    # a thumbnail of about 1/4 size: the coarsest level at or below it, read whole
    level = reader.best_level(4)
    thumb = reader.read_region(0, 0, *reader.levels[level], level=level)
    np.testing.assert_array_equal(thumb, levels[2])


def test_single_level_image_has_one_level(tmp_path: Path) -> None:
    path, _ = _case_png_rgb(tmp_path)
    reader = open_image(path)
    assert reader.levels == [(45, 61)] and reader.downsamples == [1.0]
    assert reader.best_level(16) == 0


# -- borders and padding -----------------------------------------------------------------------
@pytest.mark.parametrize("case", ["tiff-subifds-zlib-rgb", "png-gray", "npy-float-fortran"])
def test_regions_past_the_border_error_or_zero_pad(tmp_path: Path, case: str) -> None:
    path, levels = CASES[case](tmp_path)
    reader = open_image(path)
    level = len(levels) - 1
    image = levels[level]
    height, width = image.shape[:2]
    with pytest.raises(ValueError, match="pad=True") as info:
        reader.read_region(height - 4, width - 4, 8, 8, level=level)
    assert str(path) in str(info.value) and f"{height}x{width}" in str(info.value)
    with pytest.raises(ValueError, match="reaches outside"):
        reader.read_region(-1, 0, 2, 2, level=level)

    padded = np.zeros((height + 20, width + 20, image.shape[2]), image.dtype)
    padded[10 : 10 + height, 10 : 10 + width] = image  # the image with a 10-pixel zero margin
    for y, x, h, w in [(height - 4, width - 4, 8, 8), (-3, -5, 9, 11), (-10, -10, height + 20,
                       width + 20), (height, 0, 4, 4), (-10, width, 10, 10), (2, 3, 4, 5)]:
        got = reader.read_region(y, x, h, w, level=level, pad=True)
        assert got.shape == (h, w, image.shape[2]) and got.dtype == image.dtype
        np.testing.assert_array_equal(got, padded[y + 10 : y + 10 + h, x + 10 : x + 10 + w])


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    path, _ = _case_tiff_subifds_zlib_rgb(tmp_path)
    reader = open_image(path)
    with pytest.raises(ValueError, match=r"level=3 is out of range .* 3 level\(s\)"):
        reader.read_region(0, 0, 4, 4, level=3)
    with pytest.raises(ValueError, match="must be >= 1"):
        reader.read_region(0, 0, 0, 4)
    with pytest.raises(TypeError, match="y must be an integer"):
        reader.read_region(1.5, 0, 4, 4)
    np.testing.assert_array_equal(reader.read_region(np.int64(1), 2, 3, 4),
                                  reader.read_region(1, 2, 3, 4))
    with pytest.raises(ValueError, match="backend='bmp' is unknown"):
        open_image(path, backend="bmp")


# -- only the needed tiles are read ----------------------------------------------------------------
def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The tile indices tifffile decodes from now on, in order (a list filled as it goes)."""
    decoded: list[int] = []
    make_decode = tifffile.TiffPage.decode.func  # a cached_property building the decoder

    def counting_decoder(page):
        decode = make_decode(page)

        def counting(data, index, **kwargs):
            decoded.append(index)
            return decode(data, index, **kwargs)

        return counting

    monkeypatch.setattr(tifffile.TiffPage, "decode", property(counting_decoder))
    return decoded


def test_patches_smaller_than_a_tile_decode_each_tile_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    yy, xx = np.mgrid[0:512, 0:768]
    image = ((yy // 3 + xx // 5) % 251).astype(np.uint8)  # 2 × 3 tiles of 256²
    tifffile.imwrite(tmp_path / "t.tif", image, tile=(256, 256), compression="jpeg")
    want = tifffile.imread(tmp_path / "t.tif")  # JPEG is lossy: compare with its own decode
    decoded = _count_decodes(monkeypatch)
    reader = open_image(tmp_path / "t.tif")
    for y in range(0, 512, 64):  # a 64² patch grid, row-major: 16 patches per tile
        for x in range(0, 768, 64):
            np.testing.assert_array_equal(reader.read_region(y, x, 64, 64)[:, :, 0],
                                          want[y : y + 64, x : x + 64])
    assert sorted(decoded) == list(range(6))  # each tile once
    decoded.clear()
    reader.read_region(0, 0, 256, 512)  # whole tiles: not kept, decoded again
    assert sorted(decoded) == [0, 1]
    monkeypatch.setattr(readers_module, "TILE_CACHE_BYTES", 256 * 256)  # room for one tile
    decoded.clear()
    small = open_image(tmp_path / "t.tif")
    for x in (0, 256, 0):  # tile 0, tile 1 (evicts 0), tile 0 again
        np.testing.assert_array_equal(small.read_region(0, x, 64, 64)[:, :, 0],
                                      want[:64, x : x + 64])
    assert decoded == [0, 1, 0]


@pytest.mark.parametrize("path_kind", ["direct", "zarr"])
def test_small_region_of_a_large_tiled_tiff_reads_only_its_tiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path_kind: str
) -> None:
    yy, xx = np.mgrid[0:4096, 0:4096]
    image = ((yy // 3 + xx // 5) % 251).astype(np.uint8)  # 4096², 16x16 tiles of 256²
    path = tmp_path / "large.tif"
    tifffile.imwrite(path, image, tile=(256, 256), compression="zlib")
    if path_kind == "zarr":  # the general path, for layouts the direct one does not take
        monkeypatch.setattr(readers_module, "_direct_tile_page", lambda level: None)
    monkeypatch.setattr(readers_module, "TILE_CACHE_BYTES", 0)  # every read decodes
    decoded = _count_decodes(monkeypatch)
    reader = open_image(path)

    np.testing.assert_array_equal(reader.read_region(1024, 2048, 64, 64)[:, :, 0],
                                  image[1024:1088, 2048:2112])
    assert decoded == [4 * 16 + 8]  # inside one tile
    decoded.clear()
    np.testing.assert_array_equal(reader.read_region(1000, 2000, 64, 64)[:, :, 0],
                                  image[1000:1064, 2000:2064])
    assert sorted(decoded) == [3 * 16 + 7, 3 * 16 + 8, 4 * 16 + 7, 4 * 16 + 8]  # 2 x 2 tiles
    decoded.clear()
    reader.read_region(4000, 4000, 200, 200, pad=True)
    assert decoded == [16 * 16 - 1]  # the bottom-right tile only; the rest is padding


# -- lazy, per-process handles ---------------------------------------------------------------------
@pytest.mark.parametrize("case", ["tiff-subifds-zlib-rgb", "png-rgb", "npy-gray"])
def test_fresh_reader_holds_no_handle_and_pickles(tmp_path: Path, case: str) -> None:
    path, levels = CASES[case](tmp_path)
    reader = open_image(path)
    assert not reader.is_open and reader._handle is None  # metadata only
    expected = levels[0][3:9, 2:7]
    np.testing.assert_array_equal(reader.read_region(3, 2, 6, 5), expected)
    assert reader.is_open

    clone = pickle.loads(pickle.dumps(reader))  # the open handle is not pickled
    assert not clone.is_open and clone.levels == reader.levels and clone.dtype == reader.dtype
    np.testing.assert_array_equal(clone.read_region(3, 2, 6, 5), expected)
    assert clone.is_open

    reader.close()
    assert not reader.is_open
    np.testing.assert_array_equal(reader.read_region(3, 2, 6, 5), expected)  # reopens
    reader.close()
    clone.close()


class _RegionDataset(Dataset):
    """Reads boxes from one shared reader; reports whether this process had a handle before."""

    def __init__(self, reader: ImageReader, boxes: list[tuple[int, int, int, int]]) -> None:
        self.reader, self.boxes = reader, boxes

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool, bool, int]:
        had_handle = self.reader.is_open
        region = torch.from_numpy(self.reader.read_region(*self.boxes[index]))
        return region, had_handle, self.reader.is_open, os.getpid()


def _check_workers_read_like_the_main_process(reader: ImageReader) -> None:
    height, width = reader.shape[:2]
    boxes = [(y, x, 16, 16) for y in range(0, height - 16, 23) for x in range(0, width - 16, 29)]
    expected = [reader.read_region(*box) for box in boxes]  # main process: handle now open
    assert reader.is_open
    loader = DataLoader(_RegionDataset(reader, boxes), batch_size=None, num_workers=2,
                        multiprocessing_context="fork")
    first_seen: dict[int, bool] = {}
    for want, (got, had_handle, has_handle, pid) in zip(expected, loader, strict=True):
        np.testing.assert_array_equal(got.numpy(), want)
        assert pid != os.getpid() and has_handle
        first_seen.setdefault(pid, had_handle)
    # each worker inherited the parent's open handle through fork, ignored it, opened its own
    assert first_seen and not any(first_seen.values())
    np.testing.assert_array_equal(reader.read_region(*boxes[0]), expected[0])  # parent unharmed


def test_dataloader_workers_open_their_own_handles(tmp_path: Path) -> None:
    path, _ = _case_tiff_subifds_zlib_rgb(tmp_path)
    with open_image(path) as reader:
        _check_workers_read_like_the_main_process(reader)


# -- errors name the file ---------------------------------------------------------------------------
def test_missing_file_and_unsupported_extension(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as info:
        open_image(tmp_path / "absent.tif")
    assert str(tmp_path / "absent.tif") in str(info.value)
    (tmp_path / "scan.bmp").write_bytes(b"BM")
    with pytest.raises(DataError, match="unsupported extension '.bmp'") as info:
        open_image(tmp_path / "scan.bmp")
    assert ".tif" in str(info.value) and ".npy" in str(info.value) and ".svs" in str(info.value)
    with pytest.raises(DataError, match="directory"):
        open_image(tmp_path)


def test_truncated_tiff_is_refused_at_open(tmp_path: Path) -> None:
    path, _ = _case_tiff_subifds_zlib_rgb(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError) as info:
        open_image(path)
    assert str(path) in str(info.value)
    assert "truncated" in str(info.value)


def test_corrupt_tile_data_is_reported_at_read(tmp_path: Path) -> None:
    image = _noise((64, 64))
    path = tmp_path / "bad_tile.tif"
    tifffile.imwrite(path, image, tile=(32, 32), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[3], tif.pages[0].databytecounts[3]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\xff" * count  # not a zlib stream any more
    path.write_bytes(bytes(data))
    reader = open_image(path)
    np.testing.assert_array_equal(reader.read_region(0, 0, 32, 32)[:, :, 0], image[:32, :32])
    with pytest.raises(DataError, match="cannot be decoded at level 0") as info:
        reader.read_region(40, 40, 8, 8)  # tile 3: bottom right
    assert str(path) in str(info.value) and "corrupt or truncated" in str(info.value)


def test_garbage_and_unsupported_tiffs(tmp_path: Path) -> None:
    (tmp_path / "junk.tif").write_bytes(b"this is not a tiff at all" * 10)
    with pytest.raises(DataError, match="cannot be read") as info:
        open_image(tmp_path / "junk.tif")
    assert str(tmp_path / "junk.tif") in str(info.value)
    tifffile.imwrite(tmp_path / "stack.tif", _noise((3, 16, 16)), photometric="minisblack",
                     metadata={"axes": "ZYX"})
    with pytest.raises(DataError, match="axes 'ZYX'"):
        open_image(tmp_path / "stack.tif")


@pytest.mark.parametrize("case", ["png-rgb", "jpeg-rgb"])
def test_truncated_png_and_jpeg(tmp_path: Path, case: str) -> None:
    path, _ = CASES[case](tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt") as info:  # at open, or at the first read
        open_image(path).read_region(0, 0, 4, 4)
    assert str(path) in str(info.value)
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="cannot be decoded as PNG or JPEG") as info:
        open_image(path)
    assert str(path) in str(info.value)


def test_truncated_and_unsuitable_npy(tmp_path: Path) -> None:
    path, _ = _case_npy_gray(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="cannot be memory-mapped") as info:
        open_image(path)
    assert str(path) in str(info.value)
    np.save(tmp_path / "vector.npy", np.arange(10))
    with pytest.raises(DataError, match=r"shape \(10,\)"):
        open_image(tmp_path / "vector.npy")


def test_png_pixel_limit_is_deliberate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, levels = _case_png_rgb(tmp_path)  # 45 x 61 = 2745 pixels
    with pytest.raises(DataError, match="max_pixels=2745") as info:
        open_image(path, max_pixels=2000)
    assert str(path) in str(info.value) and "tiled" in str(info.value)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow would refuse (> 2 x 1000)
    with pytest.raises(DataError, match="MAX_IMAGE_PIXELS"):
        open_image(path)
    reader = open_image(path, max_pixels=2745)  # raised for this reader only
    np.testing.assert_array_equal(reader.read_region(0, 0, 45, 61), levels[0])
    assert Image.MAX_IMAGE_PIXELS == 1000  # Pillow's global guard untouched
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's "no limit" is honoured
    assert open_image(path).shape == (45, 61, 3)
    with pytest.raises(ValueError, match="max_pixels"):
        open_image(path, max_pixels=0)


# -- OpenSlide (optional extra) ---------------------------------------------------------------------
def test_missing_openslide_says_how_to_install(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_fake_svs(tmp_path / "slide.svs", _pyramid(_noise((128, 128, 3)), 2))
    monkeypatch.setitem(__import__("sys").modules, "openslide", None)  # import fails
    with pytest.raises(GigapatchError, match=r"gigapatch\[slides\]") as info:
        open_image(path)
    assert str(path) in str(info.value) and "backend='tiff'" in str(info.value)
    # tifffile reads the same SVS without OpenSlide
    assert open_image(path, backend="tiff").shape == (128, 128, 3)


@needs_openslide
def test_openslide_reads_an_aperio_svs(tmp_path: Path) -> None:
    levels = _pyramid(_noise((256, 192, 3), seed=5), 3)
    path = write_fake_svs(tmp_path / "slide.svs", levels)
    with open_image(path) as reader:
        assert reader.backend == "openslide" and reader.downsamples == [1.0, 2.0, 4.0]
        _check_all_levels(reader, levels)
        got = reader.read_region(250, 190, 10, 10, pad=True)  # zeros outside, not background
        np.testing.assert_array_equal(got[:6, :2], levels[0][250:, 190:])
        assert not got[6:].any() and not got[:, 2:].any()
        _check_workers_read_like_the_main_process(reader)
    with open_image(path, backend="tiff") as by_tifffile:  # both backends agree
        np.testing.assert_array_equal(by_tifffile.read_region(10, 20, 100, 90),
                                      levels[0][10:110, 20:110])


@needs_openslide
def test_openslide_reads_a_generic_tiled_pyramid(tmp_path: Path) -> None:
    levels = _pyramid(_noise((160, 96, 3), seed=6), 3)
    path = write_chain_pyramid(tmp_path / "generic.tif", levels, compression="zlib")
    reader = open_image(path, backend="openslide")
    assert openslide.OpenSlide(str(path)).properties["openslide.vendor"] == "generic-tiff"
    _check_all_levels(reader, levels)
    clone = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(clone.read_region(5, 6, 7, 8, level=1), levels[1][5:12, 6:14])


@needs_openslide
def test_openslide_corrupt_slide(tmp_path: Path) -> None:
    (tmp_path / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 20)
    with pytest.raises(DataError) as info:
        open_image(tmp_path / "broken.svs")
    assert str(tmp_path / "broken.svs") in str(info.value)
