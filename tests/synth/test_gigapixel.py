"""Tests for gigapatch.synth.gigapixel: TIFF pixels vs in-memory render, pyramid, memory, CLI."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile

from gigapatch.cli import main
from gigapatch.synth.gigapixel import (
    CSV_COLUMNS,
    generate_gigapixel,
    gigapixel_record,
    ips_noise,
    level_sizes,
    parse_multi,
)
from gigapatch.synth.megapixel_mnist import (
    generate_megapixel_mnist,
    load_megapixel_mnist,
    render_image,
)
from gigapatch.core.errors import ConfigError, DataError
from gigapatch.io.readers import open_image

SIDE, TILE, NOISE = 2048, 256, 300


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0))


@pytest.fixture(scope="module")
def digit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """IDX digit source of blocky random digits (every pixel 20..255): fast to load."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10, dtype=np.uint8), 20)
    coarse = rng.integers(20, 256, size=(len(labels), 7, 7))
    images = np.kron(coarse, np.ones((4, 4), dtype=np.int64)).astype(np.uint8)
    directory = tmp_path_factory.mktemp("digits")
    _write_idx(directory / "train-images-idx3-ubyte", images)
    _write_idx(directory / "train-labels-idx1-ubyte", labels)
    return directory


@pytest.fixture(scope="module")
def dataset(digit_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gigapixel")
    generate_gigapixel(out, n_train=2, n_test=1, side=SIDE, tile=TILE, n_noise=NOISE, levels=4,
                       seed=5, digits_source=digit_dir, progress=False)
    return out


def box_mean(image: np.ndarray, f: int) -> np.ndarray:
    """Reference pyramid level: round-half-up mean of f x f blocks, zeros past the edge."""
    h, w = -(-image.shape[0] // f), -(-image.shape[1] // f)
    padded = np.zeros((h * f, w * f), dtype=np.int64)
    padded[: image.shape[0], : image.shape[1]] = image
    sums = padded.reshape(h, f, w, f).sum(axis=(1, 3))
    return ((sums + f * f // 2) // (f * f)).astype(np.uint8)


def _tiff(root: Path, split: str, index: int) -> Path:
    return root / split / f"{index:06d}.tiff"


def _all_files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


# ----------------------------------------------------------------------------- pixels


@pytest.mark.parametrize(("split", "index"), [("train", 0), ("train", 1), ("test", 0)])
def test_every_level_equals_the_in_memory_render(dataset: Path, split: str, index: int) -> None:
    image = render_image(gigapixel_record(dataset, split, index))
    reader = open_image(_tiff(dataset, split, index))
    assert reader.levels == [(s, s) for s in level_sizes(SIDE, 4)]
    for level, (h, w) in enumerate(reader.levels):
        got = reader.read_region(0, 0, h, w, level=level)[:, :, 0]
        np.testing.assert_array_equal(got, box_mean(image, 2**level), err_msg=f"level {level}")
    assert image.any() and image.max() >= 204  # digits and noise were drawn


def test_file_is_a_tiled_compressed_pyramidal_bigtiff(dataset: Path) -> None:
    path = _tiff(dataset, "train", 0)
    reader = open_image(path)
    assert reader.backend == "tiff" and reader.shape == (SIDE, SIDE, 1)
    assert reader.dtype == np.uint8
    assert reader.downsamples == [1.0, 2.0, 4.0, 8.0]
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (TILE, TILE)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert len(page.subifds) == 3
        for level in tif.series[0].levels[1:]:
            assert level.keyframe.is_tiled and level.keyframe.tilewidth == TILE
    assert path.stat().st_size < SIDE * SIDE // 10  # compressed (mostly black)


def test_records_are_those_of_megapixel_mnist(dataset: Path, digit_dir: Path, tmp_path: Path):
    generate_megapixel_mnist(tmp_path, n_train=2, n_test=1, side=SIDE, n_noise=NOISE, seed=5,
                             digits_source=digit_dir, progress=False)
    for split, count in (("train", 2), ("test", 1)):
        split_records = load_megapixel_mnist(tmp_path, split)
        for i in range(count):
            a, b = split_records[i], gigapixel_record(dataset, split, i)
            np.testing.assert_array_equal(a.digit_yx, b.digit_yx)
            np.testing.assert_array_equal(a.digit_indices, b.digit_indices)
            np.testing.assert_array_equal(a.noise_yx, b.noise_yx)
            np.testing.assert_array_equal(a.noise_images, b.noise_images)
            assert a.labels["majority"] == b.labels["majority"]


def test_csv_and_meta(dataset: Path) -> None:
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["dataset"] == "gigapixel_mnist" and meta["level_sizes"] == [2048, 1024, 512, 256]
    assert meta["tile"] == TILE and meta["n_noise"] == NOISE and meta["compression"] == "zlib"
    for split, count in (("train", 2), ("test", 1)):
        with open(dataset / f"{split}.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert list(rows[0]) == list(CSV_COLUMNS) and len(rows) == count
        for i, row in enumerate(rows):
            record = gigapixel_record(dataset, split, i)
            assert row["path"] == f"{split}/{i:06d}.tiff"
            assert int(row["label"]) == int(row["majority"]) == record.majority
            assert (int(row["max"]), int(row["top"])) == (record.max, record.top)
            np.testing.assert_array_equal(parse_multi(row["multi"]), record.multi)


def test_same_arguments_give_identical_files(digit_dir: Path, tmp_path: Path) -> None:
    args = {"n_train": 1, "n_test": 1, "side": 600, "tile": 128, "n_noise": 40,
            "digits_source": digit_dir, "progress": False}
    generate_gigapixel(tmp_path / "a", seed=1, **args)
    generate_gigapixel(tmp_path / "b", seed=1, workers=2, **args)  # threads: same bytes
    generate_gigapixel(tmp_path / "c", seed=2, **args)
    assert _all_files(tmp_path / "a") == _all_files(tmp_path / "b")
    assert _all_files(tmp_path / "a") != _all_files(tmp_path / "c")


def test_memory_does_not_grow_with_the_image(digit_dir: Path, tmp_path: Path) -> None:
    """A 4096^2 image (16 MiB of pixels) costs what a 1024^2 one does: tiles, not images."""
    args = {"n_train": 1, "n_test": 0, "tile": 256, "n_noise": 50, "digits_source": digit_dir,
            "progress": False}
    generate_gigapixel(tmp_path / "warm", side=512, **args)  # imports, codec set-up
    peaks = {}
    for side in (1024, 4096):
        tracemalloc.start()
        try:
            generate_gigapixel(tmp_path / str(side), side=side, **args)
            peaks[side] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peaks[4096] <= 1.5 * peaks[1024], peaks
    assert peaks[4096] < 4096 * 4096 // 4, peaks  # far below one level-0 image


def test_digit_scale_upscales_the_canvas(digit_dir: Path, tmp_path: Path) -> None:
    generate_gigapixel(tmp_path, n_train=1, n_test=0, side=560, tile=64, n_noise=30,
                       digit_scale=2, levels=3, digits_source=digit_dir, progress=False)
    record = gigapixel_record(tmp_path, "train", 0)
    assert record.side == 280
    image = np.repeat(np.repeat(render_image(record), 2, axis=0), 2, axis=1)
    reader = open_image(_tiff(tmp_path, "train", 0))
    assert reader.levels == [(560, 560), (280, 280), (140, 140)]
    for level, (h, w) in enumerate(reader.levels):
        got = reader.read_region(0, 0, h, w, level=level)[:, :, 0]
        np.testing.assert_array_equal(got, box_mean(image, 2**level))


@pytest.mark.parametrize("compression", ["zstd", "jpeg", "none"])
def test_other_codecs(compression: str, digit_dir: Path, tmp_path: Path) -> None:
    generate_gigapixel(tmp_path, n_train=1, n_test=0, side=700, tile=128, n_noise=40,
                       compression=compression, digits_source=digit_dir, progress=False)
    image = render_image(gigapixel_record(tmp_path, "train", 0))
    got = open_image(_tiff(tmp_path, "train", 0)).read_region(0, 0, 700, 700)[:, :, 0]
    if compression == "jpeg":
        assert np.abs(got.astype(int) - image).mean() < 3
    else:
        np.testing.assert_array_equal(got, image)


def test_level_sizes_and_noise_density() -> None:
    assert level_sizes(65536) == [65536, 32768, 16384, 8192, 4096, 2048, 1024]
    assert level_sizes(1000) == [1000]
    assert level_sizes(1500, 3) == [1500, 750, 375]
    assert ips_noise(1500) == 50 and ips_noise(65536) == 95444


def test_parse_multi() -> None:
    expected = np.zeros(10, dtype=np.uint8)
    expected[[2, 5, 7]] = 1
    np.testing.assert_array_equal(parse_multi("2 5 7"), expected)
    assert parse_multi("").sum() == 0
    with pytest.raises(DataError, match="'x'"):
        parse_multi("1 x")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tile": 100}, "multiple of 16"),
        ({"side": 601, "digit_scale": 2}, "not a multiple of digit_scale"),
        ({"side": 100}, "side=100"),
        ({"compression": "lzw"}, "compression='lzw'"),
        ({"levels": 40}, "levels=40"),
        ({"quality": 0}, "quality=0"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str, tmp_path: Path) -> None:
    args = {"n_train": 1, "n_test": 0, "side": 600, "tile": 128, "progress": False, **kwargs}
    with pytest.raises(ConfigError, match=match):
        generate_gigapixel(tmp_path, **args)
    assert not (tmp_path / "meta.json").exists()


def test_record_errors(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="out of range"):
        gigapixel_record(dataset, "test", 1)
    with pytest.raises(DataError, match="meta.json not found"):
        gigapixel_record(tmp_path, "train", 0)


def test_cli(digit_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["data", "gigapixel", "--out", str(tmp_path), "--side", "512", "--n-train", "2",
                 "--n-test", "1", "--tile", "128", "--compression", "zstd", "--noise", "20",
                 "--seed", "3", "--mnist-dir", str(digit_dir), "--quiet"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["level_sizes"] == [512] and summary["compression"] == "zstd"
    assert _tiff(tmp_path, "test", 0).is_file() and (tmp_path / "train.csv").is_file()
    assert main(["data", "gigapixel", "--out", str(tmp_path), "--tile", "100", "--quiet"]) == 2
