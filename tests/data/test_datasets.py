"""Tests for gigapatch.data.datasets.CSVImageDataset."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gigapatch.data.datasets import CSVImageDataset
from gigapatch.synth.ultramnist import generate_ultramnist
from gigapatch.core.errors import ConfigError, DataError
from gigapatch.io.image import write_png


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture()
def images(tmp_path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "img/a.png": rng.integers(0, 256, (6, 5), dtype=np.uint8),
        "img/b.png": rng.integers(0, 256, (6, 5, 3), dtype=np.uint8),
        "img/c.png": rng.integers(0, 256, (6, 5), dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_png(tmp_path / name, array)
    return arrays


def test_items_are_chw_uint8_and_int64_labels(tmp_path: Path, images: dict) -> None:
    csv_path = _write_csv(tmp_path / "data.csv", "path,label,note\nimg/a.png,0,x\nimg/b.png,2,y\n")
    dataset = CSVImageDataset(csv_path)
    assert len(dataset) == 2 and dataset.labels == [0, 2] and dataset.num_classes == 3

    image, label = dataset[0]
    assert image.dtype == torch.uint8 and image.shape == (1, 6, 5)
    assert label.dtype == torch.int64 and label.shape == () and label.item() == 0
    np.testing.assert_array_equal(image[0].numpy(), images["img/a.png"])

    image, label = dataset[1]
    assert image.shape == (3, 6, 5) and label.item() == 2
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), images["img/b.png"])


def test_root_and_absolute_paths(tmp_path: Path, images: dict) -> None:
    csv_dir = tmp_path / "lists"
    csv_dir.mkdir()
    absolute = tmp_path / "img" / "c.png"
    csv_path = _write_csv(csv_dir / "d.csv", f"path,label\nimg/a.png,1\n{absolute},0\n")
    with pytest.raises(DataError, match="lists/img/a.png"):  # default root: the CSV's folder
        CSVImageDataset(csv_path)
    dataset = CSVImageDataset(csv_path, root=tmp_path, num_classes=5)
    assert dataset.num_classes == 5 and dataset.paths == [tmp_path / "img/a.png", absolute]
    np.testing.assert_array_equal(dataset[1][0][0].numpy(), images["img/c.png"])


def test_missing_csv(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as info:
        CSVImageDataset(tmp_path / "absent.csv")
    assert "absent.csv" in str(info.value)


def test_missing_column_lists_found_columns(tmp_path: Path, images: dict) -> None:
    csv_path = _write_csv(tmp_path / "d.csv", "file,class\nimg/a.png,0\n")
    with pytest.raises(DataError, match="lacks column") as info:
        CSVImageDataset(csv_path)
    assert "['file', 'class']" in str(info.value) and str(csv_path) in str(info.value)


def test_label_out_of_range_names_line_value_and_range(tmp_path: Path, images: dict) -> None:
    csv_path = _write_csv(tmp_path / "d.csv", "path,label\nimg/a.png,0\nimg/b.png,3\n")
    with pytest.raises(DataError, match=r"line 3: label 3 is out of range \[0, 3\)"):
        CSVImageDataset(csv_path, num_classes=3)
    assert CSVImageDataset(csv_path, num_classes=4).num_classes == 4


def test_negative_and_non_integer_labels(tmp_path: Path, images: dict) -> None:
    with pytest.raises(DataError, match="line 2: label '-1' is not a class index"):
        CSVImageDataset(_write_csv(tmp_path / "neg.csv", "path,label\nimg/a.png,-1\n"))
    with pytest.raises(DataError, match="line 3: label 'cat' is not a class index"):
        CSVImageDataset(_write_csv(tmp_path / "cat.csv", "path,label\nimg/a.png,1\nimg/b.png,cat\n"))
    with pytest.raises(DataError, match="label '2.5' is not a class index"):
        CSVImageDataset(_write_csv(tmp_path / "frac.csv", "path,label\nimg/a.png,2.5\n"))


@pytest.mark.parametrize("text", ["1_0", "+1", "\u0663", "1e1"])
def test_labels_are_plain_digits_only(tmp_path: Path, images: dict, text: str) -> None:
    """Python's int() reads "1_0" as 10 and "\u0663" (Arabic-Indic three) as 3: refused."""
    with pytest.raises(DataError, match="is not a class index"):
        CSVImageDataset(_write_csv(tmp_path / "u.csv", f"path,label\nimg/a.png,{text}\n"))
    assert CSVImageDataset(_write_csv(tmp_path / "ok.csv", "path,label\nimg/a.png, 12 \n")).labels == [12]


def test_missing_image_file_is_named(tmp_path: Path, images: dict) -> None:
    csv_path = _write_csv(tmp_path / "d.csv", "path,label\nimg/a.png,0\nimg/gone.png,1\n")
    with pytest.raises(DataError, match="1 image file") as info:
        CSVImageDataset(csv_path)
    assert str(tmp_path / "img/gone.png") in str(info.value)


def test_corrupt_png_is_named_when_read(tmp_path: Path, images: dict) -> None:
    (tmp_path / "img/bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage garbage")
    dataset = CSVImageDataset(_write_csv(tmp_path / "d.csv", "path,label\nimg/bad.png,0\n"))
    with pytest.raises(DataError, match="cannot be decoded") as info:
        dataset[0]
    assert str(tmp_path / "img/bad.png") in str(info.value)


def test_header_only_csv_and_bad_num_classes(tmp_path: Path) -> None:
    csv_path = _write_csv(tmp_path / "d.csv", "path,label\n")
    with pytest.raises(DataError, match="no rows"):
        CSVImageDataset(csv_path)
    with pytest.raises(ConfigError, match="num_classes=0"):
        CSVImageDataset(csv_path, num_classes=0)


def test_loads_a_generated_ultramnist_split(tmp_path: Path) -> None:
    digits = tmp_path / "digits"  # a tiny synthetic MNIST IDX source: 5 digits per value
    digits.mkdir()
    labels = np.repeat(np.arange(10, dtype=np.uint8), 5)
    pixels = np.random.default_rng(0).integers(1, 256, (50, 28, 28), dtype=np.uint8)
    for name, array in (("train-images-idx3-ubyte", pixels), ("train-labels-idx1-ubyte", labels)):
        header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
        (digits / name).write_bytes(header + array.tobytes())
    generate_ultramnist(tmp_path / "um", n_train=4, n_test=2, side=64, scale_range=(0.5, 1.0),
                        digits_source=digits, progress=False)
    dataset = CSVImageDataset(tmp_path / "um" / "train.csv", num_classes=10)
    images, labels = next(iter(DataLoader(dataset, batch_size=4)))
    assert images.shape == (4, 1, 64, 64) and images.dtype == torch.uint8
    assert labels.tolist() == dataset.labels
