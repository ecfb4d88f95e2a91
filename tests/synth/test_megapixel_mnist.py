"""Tests for gigapatch.synth.megapixel_mnist: layout, labels, pools, rendering, storage, CLI."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gigapatch.cli import main
from gigapatch.synth.megapixel_mnist import (
    DIGIT_POOL_TEST_FRACTION,
    MIN_SIDE,
    MULTI_LABEL_TASKS,
    NOISE_BANK_SIZE,
    NOISE_VALUE_RANGE,
    TASK_CLASSES,
    TASKS,
    MegapixelMNISTDataset,
    MegapixelRecord,
    compute_labels,
    generate_megapixel_mnist,
    load_megapixel_mnist,
    make_noise_patterns,
    render_image,
    render_region,
)
from gigapatch.synth.mnist import load_digits, split_digit_pools
from gigapatch.core.errors import ConfigError, DataError

PER_CLASS = 20  # test pool: 4 per class, train pool: 16 per class
S = 28
SMALL = {"side": 300, "n_noise": 20, "progress": False}


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0))


def _make_digit_dir(directory: Path, seed: int = 0) -> Path:
    """IDX digit source of blocky random images (all pixels 20..255, all different)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10, dtype=np.uint8), PER_CLASS)
    coarse = rng.integers(20, 256, size=(len(labels), 7, 7))
    images = np.kron(coarse, np.ones((4, 4), dtype=np.int64)).astype(np.uint8)  # (N, 28, 28)
    directory.mkdir(parents=True, exist_ok=True)
    _write_idx(directory / "train-images-idx3-ubyte", images)
    _write_idx(directory / "train-labels-idx1-ubyte", labels)
    return directory


@pytest.fixture(scope="module")
def digit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_digit_dir(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def dataset(digit_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("megapixel")
    generate_megapixel_mnist(out, n_train=40, n_test=20, seed=3, digits_source=digit_dir, **SMALL)
    return out


def _records(root: Path, split: str) -> list[MegapixelRecord]:
    return list(load_megapixel_mnist(root, split))


def _naive_window(record: MegapixelRecord, y: int, x: int, h: int, w: int) -> np.ndarray:
    """Reference renderer: paste every patch into a canvas padded by 28 px around the window,
    noise max-blended, then each digit overwriting its box."""
    buf = np.zeros((h + 2 * S, w + 2 * S), dtype=np.uint8)
    corners = np.concatenate([record.noise_yx, record.digit_yx])
    patches = np.concatenate([record.noise_images, record.digit_images])
    is_digit = [False] * len(record.noise_yx) + [True] * len(record.digit_yx)
    for (py, px), patch, digit in zip(corners, patches, is_digit):
        ty, tx = int(py) - y + S, int(px) - x + S
        if 0 <= ty <= h + S and 0 <= tx <= w + S:
            box = buf[ty : ty + S, tx : tx + S]
            buf[ty : ty + S, tx : tx + S] = patch if digit else np.maximum(box, patch)
    return buf[S : S + h, S : S + w]


def _check_record(record: MegapixelRecord, images: np.ndarray, labels: np.ndarray) -> None:
    """Layout rules and labels recomputed from scratch from the placed digits."""
    values = record.digit_values.tolist()
    yx = record.digit_yx.tolist()
    assert len(values) == len(yx) == 5
    majority = values[0]
    assert values[:3] == [majority] * 3 and all(v != majority for v in values[3:])
    for a in range(5):
        assert 0 <= yx[a][0] <= record.side - S and 0 <= yx[a][1] <= record.side - S
        for b in range(a):
            (ya, xa), (yb, xb) = yx[a], yx[b]
            assert abs(ya - yb) >= S or abs(xa - xb) >= S, "digit boxes overlap"
            assert ya != yb, "two digits share the top row"
    assert Counter(values).most_common(1)[0] == (majority, 3)
    assert record.majority == majority
    assert record.max == max(values)
    assert record.top == values[min(range(5), key=lambda k: yx[k][0])]
    assert record.multi.tolist() == [int(c in values) for c in range(10)]
    np.testing.assert_array_equal(labels[record.digit_indices], record.digit_values)
    np.testing.assert_array_equal(images[record.digit_indices], record.digit_images)
    assert ((record.noise_yx >= 0) & (record.noise_yx <= record.side - S)).all()


# ----------------------------------------------------------------------------- constants


def test_tasks_and_classes() -> None:
    assert TASKS == ("majority", "max", "top", "multi")
    assert TASK_CLASSES == {"majority": 10, "max": 10, "top": 10, "multi": 10}
    assert set(MULTI_LABEL_TASKS) == {"multi"}


# ----------------------------------------------------------------------------- generation


def test_same_seed_gives_identical_files_and_pixels(
    dataset: Path, digit_dir: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again"
    generate_megapixel_mnist(again, n_train=40, n_test=20, seed=3, digits_source=digit_dir, **SMALL)
    for name in ("train.npz", "test.npz", "meta.json"):
        assert (again / name).read_bytes() == (dataset / name).read_bytes(), name
    for a, b in zip(_records(dataset, "train")[:5], _records(again, "train")[:5]):
        np.testing.assert_array_equal(render_image(a), render_image(b))


def test_different_seed_gives_different_images(
    dataset: Path, digit_dir: Path, tmp_path: Path
) -> None:
    generate_megapixel_mnist(
        tmp_path, n_train=40, n_test=20, seed=4, digits_source=digit_dir, **SMALL
    )
    a, b = _records(dataset, "train"), _records(tmp_path, "train")
    assert any(not np.array_equal(x.digit_yx, y.digit_yx) for x, y in zip(a, b))
    assert any(not np.array_equal(x.noise_yx, y.noise_yx) for x, y in zip(a, b))
    assert not np.array_equal(render_image(a[0]), render_image(b[0]))


def test_digit_pools_are_disjoint_between_splits(dataset: Path, digit_dir: Path) -> None:
    _, labels = load_digits(digit_dir)
    train_pool, test_pool = split_digit_pools(labels, DIGIT_POOL_TEST_FRACTION, seed=3)
    train = {int(i) for r in _records(dataset, "train") for i in r.digit_indices}
    test = {int(i) for r in _records(dataset, "test") for i in r.digit_indices}
    assert train and test and not train & test
    assert train <= set(train_pool.tolist()) and test <= set(test_pool.tolist())


@pytest.mark.parametrize("split", ["train", "test"])
def test_layout_and_labels_follow_the_placed_digits(
    dataset: Path, digit_dir: Path, split: str
) -> None:
    images, labels = load_digits(digit_dir)
    records = _records(dataset, split)
    assert len(records) == {"train": 40, "test": 20}[split]
    for record in records:
        _check_record(record, images, labels)
        assert len(set(record.digit_indices[:3].tolist())) == 3  # three different images
        assert record.noise_yx.shape == (20, 2) and record.noise_images.shape == (20, S, S)
    counts = np.bincount([r.majority for r in records], minlength=10)
    assert counts.max() - counts.min() <= 1  # balanced majority classes


def test_smallest_side_still_places_five_digits(digit_dir: Path, tmp_path: Path) -> None:
    generate_megapixel_mnist(
        tmp_path, n_train=30, n_test=0, side=MIN_SIDE, n_noise=3, digits_source=digit_dir,
        progress=False,
    )
    images, labels = load_digits(digit_dir)
    for record in _records(tmp_path, "train"):
        _check_record(record, images, labels)


def test_noise_patterns_are_line_strokes() -> None:
    patterns = make_noise_patterns(np.random.default_rng(0), 64)
    assert patterns.shape == (64, S, S) and patterns.dtype == np.uint8
    strokes = patterns[patterns > 0]
    assert strokes.min() >= NOISE_VALUE_RANGE[0] and strokes.max() <= NOISE_VALUE_RANGE[1]
    counts = (patterns > 0).sum(axis=(1, 2))
    assert counts.min() >= 14 and counts.max() <= 2 * 2 * S  # two segments of >= 14 px
    np.testing.assert_array_equal(patterns, make_noise_patterns(np.random.default_rng(0), 64))


def test_compute_labels_refuses_ambiguous_layouts() -> None:
    yx = np.array([[0, 0], [40, 0], [80, 0], [120, 0], [160, 0]])
    labels = compute_labels(np.array([7, 7, 7, 2, 9]), yx)
    assert (labels["majority"], labels["max"], labels["top"]) == (7, 9, 7)
    with pytest.raises(ValueError, match="most frequent"):
        compute_labels(np.array([7, 7, 2, 2, 9]), yx)
    with pytest.raises(ValueError, match="top row"):
        shared_top = np.array([[0, 0], [0, 40], [80, 0], [120, 0], [9, 9]])
        compute_labels(np.array([7, 7, 7, 2, 9]), shared_top)


# ----------------------------------------------------------------------------- rendering


def test_full_render_matches_reference_and_shows_every_digit(dataset: Path) -> None:
    noisy_boxes = 0  # digit boxes that a noise patch overlaps (the overwrite is exercised)
    for record in _records(dataset, "train")[:10]:
        image = render_image(record)
        assert image.shape == (300, 300) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, _naive_window(record, 0, 0, 300, 300))
        covered = np.zeros_like(image, dtype=bool)
        for (y, x), digit in zip(record.digit_yx.tolist(), record.digit_images):
            # noise lies under the digits: a digit's box shows exactly the digit
            np.testing.assert_array_equal(image[y : y + S, x : x + S], digit)
            near = np.abs(record.noise_yx - np.array([y, x])).max(axis=1) < S
            noisy_boxes += int(near.any())
            covered[y : y + S, x : x + S] = True
        for y, x in record.noise_yx.tolist():
            covered[y : y + S, x : x + S] = True
        assert not image[~covered].any()  # black background elsewhere
    assert noisy_boxes > 0


def test_window_render_equals_slice_of_full_render(dataset: Path) -> None:
    rng = np.random.default_rng(0)
    for record in _records(dataset, "test")[:8]:
        full = render_image(record)
        corners = [*record.digit_yx.tolist(), *record.noise_yx[:5].tolist()]
        windows = [(0, 0, 300, 300), (0, 0, 1, 1), (299, 299, 1, 1), (10, 20, 0, 5)]
        for cy, cx in corners:  # windows cutting through a digit or noise patch
            y, x = cy + int(rng.integers(-S, S)), cx + int(rng.integers(-S, S))
            y, x = min(max(y, 0), 299), min(max(x, 0), 299)
            h, w = int(rng.integers(1, 300 - y + 1)), int(rng.integers(1, 300 - x + 1))
            windows.append((y, x, h, w))
        for _ in range(20):
            y, x = (int(v) for v in rng.integers(0, 300, size=2))
            h, w = int(rng.integers(0, 300 - y + 1)), int(rng.integers(0, 300 - x + 1))
            windows.append((y, x, h, w))
        for y, x, h, w in windows:
            window = render_region(record, y, x, h, w)
            assert window.shape == (h, w) and window.dtype == np.uint8
            expected = full[y : y + h, x : x + w]
            np.testing.assert_array_equal(window, expected, err_msg=str((y, x, h, w)))


def test_window_outside_canvas_is_black(dataset: Path) -> None:
    record = _records(dataset, "train")[0]
    padded = np.pad(render_image(record), 120)
    windows = [(-50, -50, 400, 400), (-10, 250, 64, 100), (280, -7, 70, 20), (310, 0, 8, 8)]
    for y, x, h, w in windows:
        expected = padded[y + 120 : y + 120 + h, x + 120 : x + 120 + w]
        np.testing.assert_array_equal(render_region(record, y, x, h, w), expected)
    assert not render_region(record, -10**6, 10**6, 5, 5).any()


@pytest.mark.parametrize(
    "window", [(0.5, 0, 4, 4), (0, 0, -1, 4), (0, 0, 4, True), ("0", 0, 4, 4)]
)
def test_bad_window_raises_config_error(dataset: Path, window: tuple) -> None:
    record = _records(dataset, "train")[0]
    with pytest.raises(ConfigError, match="window"):
        render_region(record, *window)


def test_ten_thousand_px_canvas_renders_by_windows(digit_dir: Path, tmp_path: Path) -> None:
    generate_megapixel_mnist(
        tmp_path, n_train=2, n_test=0, side=10_000, n_noise=200, digits_source=digit_dir,
        progress=False,
    )
    for record in _records(tmp_path, "train"):
        assert record.side == 10_000
        for y, x in [*record.digit_yx.tolist(), *record.noise_yx[:20].tolist()]:
            y0, x0 = max(y - 17, 0), max(x - 23, 0)
            np.testing.assert_array_equal(
                render_region(record, y0, x0, 70, 90), _naive_window(record, y0, x0, 70, 90)
            )
        tile = render_region(record, 9_984, 9_984, 512, 512)  # edge tile of a 512-px tiling
        np.testing.assert_array_equal(tile[:16, :16], _naive_window(record, 9_984, 9_984, 16, 16))
        assert not tile[16:].any() and not tile[:, 16:].any()


def test_render_of_default_size_is_fast(digit_dir: Path, tmp_path: Path) -> None:
    generate_megapixel_mnist(tmp_path, n_train=3, n_test=0, digits_source=digit_dir, progress=False)
    record = _records(tmp_path, "train")[0]
    assert record.side == 1500 and len(record.noise_yx) == 50  # the IPS defaults
    times = []
    for _ in range(7):
        start = time.perf_counter()
        render_image(record)
        times.append(time.perf_counter() - start)
    assert sorted(times)[3] < 0.05


# ----------------------------------------------------------------------------- storage


def test_files_are_small(digit_dir: Path, tmp_path: Path) -> None:
    summary = generate_megapixel_mnist(
        tmp_path, n_train=500, n_test=0, side=1500, n_noise=50, digits_source=digit_dir,
        progress=False,
    )
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["meta.json", "test.npz", "train.npz"]  # no image files, no temporaries
    size = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert summary["bytes"] == size
    assert size < 500 * 1000 + 2 * NOISE_BANK_SIZE * S * S  # < 1 kB per 2.25-megapixel image
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["side"] == 1500 and meta["n_noise"] == 50 and meta["seed"] == 0
    assert meta["digits_source"] == str(digit_dir.resolve())
    assert meta["digit_pool"]["test_fraction"] == DIGIT_POOL_TEST_FRACTION


# ----------------------------------------------------------------------------- dataset


def test_dataset_items_and_default_collate(dataset: Path) -> None:
    ds = MegapixelMNISTDataset(dataset, "train")
    assert len(ds) == 40 and ds.side == 300
    image, targets = ds[5]
    assert image.dtype == torch.uint8 and image.shape == (1, 300, 300)
    assert set(targets) == set(TASKS)
    record = ds.records[5]
    np.testing.assert_array_equal(image[0].numpy(), render_image(record))
    for task in ("majority", "max", "top"):
        assert targets[task].dtype == torch.int64 and targets[task].shape == ()
        assert int(targets[task]) == getattr(record, task)
    assert targets["multi"].dtype == torch.float32 and targets["multi"].shape == (10,)
    assert targets["multi"].sum() == len(set(record.digit_values.tolist()))
    images, batch = next(iter(DataLoader(ds, batch_size=3)))
    assert images.shape == (3, 1, 300, 300) and images.dtype == torch.uint8
    assert batch["majority"].shape == (3,) and batch["multi"].shape == (3, 10)
    with pytest.raises(IndexError):
        ds[40]


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"side": MIN_SIDE - 1}, "too small"),
        ({"side": 1500.0}, "side"),
        ({"side": 10**9}, "too large"),
        ({"n_noise": -1}, "n_noise"),
        ({"n_noise": 10**7}, "n_noise"),
        ({"n_train": -2}, "n_train"),
        ({"n_test": True}, "n_test"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_config_error(
    kwargs: dict, match: str, digit_dir: Path, tmp_path: Path
) -> None:
    args = {"n_train": 2, "n_test": 1, "progress": False, "digits_source": digit_dir} | kwargs
    with pytest.raises(ConfigError, match=match):
        generate_megapixel_mnist(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_output_path_that_is_a_file_raises_config_error(digit_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        generate_megapixel_mnist(tmp_path / "f", n_train=1, digits_source=digit_dir, progress=False)


def test_pool_too_small_raises_data_error(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    labels = np.repeat(np.arange(10, dtype=np.uint8), 4)  # test pool: 1 digit per class
    _write_idx(small / "train-images-idx3-ubyte", np.full((40, S, S), 200, dtype=np.uint8))
    _write_idx(small / "train-labels-idx1-ubyte", labels)
    with pytest.raises(DataError, match="too few digits"):
        generate_megapixel_mnist(
            tmp_path / "o", n_train=1, n_test=1, digits_source=small, progress=False
        )


def _copy(dataset: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(dataset, tmp_path / "copy"))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "missing"])
def test_damaged_split_file_raises_data_error_naming_it(
    dataset: Path, tmp_path: Path, damage: str
) -> None:
    root = _copy(dataset, tmp_path)
    path = root / "train.npz"
    if damage == "garbage":
        path.write_bytes(b"not a zip archive" * 100)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    with pytest.raises(DataError, match="train.npz"):
        MegapixelMNISTDataset(root, "train")
    MegapixelMNISTDataset(root, "test")  # the other split still opens


def test_tampered_arrays_raise_data_error(dataset: Path, tmp_path: Path) -> None:
    root = _copy(dataset, tmp_path)
    path = root / "train.npz"
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    for name, change in [("top", lambda a: (a + 1) % 10), ("noise_yx", lambda a: a + 10_000),
                         ("digit_index", lambda a: a[:, :3])]:
        broken = dict(arrays, **{name: change(arrays[name])})
        np.savez_compressed(path, **broken)
        with pytest.raises(DataError, match="train.npz"):
            load_megapixel_mnist(root, "train")
    with zipfile.ZipFile(path, "w") as archive:  # a valid zip without the arrays
        archive.writestr("other.npy", b"")
    with pytest.raises(DataError, match="lacks the arrays"):
        load_megapixel_mnist(root, "train")


@pytest.mark.parametrize("damage", ["missing", "not json", "wrong dataset", "no side"])
def test_damaged_meta_raises_data_error_naming_it(
    dataset: Path, tmp_path: Path, damage: str
) -> None:
    root = _copy(dataset, tmp_path)
    path = root / "meta.json"
    meta = json.loads(path.read_text())
    if damage == "missing":
        path.unlink()
    elif damage == "not json":
        path.write_text("{ side: 3")
    elif damage == "wrong dataset":
        path.write_text(json.dumps(dict(meta, dataset="ultramnist")))
    else:
        del meta["side"]
        path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="meta.json"):
        load_megapixel_mnist(root, "test")


def test_other_digit_source_or_directory_raises_clear_errors(dataset: Path, tmp_path: Path) -> None:
    other = _make_digit_dir(tmp_path / "other", seed=1)
    with pytest.raises(DataError, match="differs"):
        load_megapixel_mnist(dataset, "train", digits_source=other)
    with pytest.raises(DataError, match="not found"):
        load_megapixel_mnist(tmp_path / "nowhere", "train")
    with pytest.raises(ConfigError, match="split"):
        load_megapixel_mnist(dataset, "val")


# ----------------------------------------------------------------------------- CLI


def test_cli_generates_a_loadable_data_set(digit_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "mm"
    code = main(["data", "megapixel-mnist", "--out", str(out), "--n-train", "4", "--n-test", "2",
                 "--side", "200", "--noise", "5", "--seed", "1", "--mnist-dir", str(digit_dir),
                 "--quiet"])
    captured = capsys.readouterr()
    assert code == 0
    summary = json.loads(captured.out)
    assert summary["n_train"] == 4 and summary["side"] == 200 and summary["n_noise"] == 5
    ds = MegapixelMNISTDataset(out, "test")
    assert len(ds) == 2 and ds[0][0].shape == (1, 200, 200)

    code = main(["data", "megapixel-mnist", "--out", str(out), "--side", "100", "--quiet",
                 "--mnist-dir", str(digit_dir)])
    assert code == 2 and "side=100 is too small" in capsys.readouterr().err


def test_cli_help(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["data", "megapixel-mnist", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: gigapatch data megapixel-mnist" in out and "--noise" in out
