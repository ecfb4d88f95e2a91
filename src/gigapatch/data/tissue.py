"""Foreground ("tissue") masks over a patch grid, from a low-resolution pyramid level.

Most of a gigapixel slide is empty glass, most of a Megapixel MNIST canvas is black: a patch
method that skips the empty patches saves most of its work. :func:`foreground_mask` says, for
every cell of ``PatchGrid(H, W, patch_size, stride)`` (same rows, columns and row-major
order; the padded last row/column included), whether the patch holds any content:

1. read a low-resolution level (by default the coarsest whose patch footprint is still at
   least 1 px: ``reader.best_level(patch_size)``), strip by strip, as grayscale;
2. split its pixels into two classes with Otsu's threshold ``t`` (or a given ``threshold``);
3. foreground pixels are those on the other side of ``t`` than the background: brighter than
   ``t`` on a *dark* background (``gray > t``: MNIST canvases, fluorescence), darker on a
   *bright* one (``gray <= t``: bright-field pathology, tissue on white glass); ``"auto"``
   takes the background to be the class of the median pixel of the level's border;
4. a cell is foreground if the low-res pixels its footprint touches hold at least one
   foreground pixel, and at least ``min_fraction`` of them.

Memory: a strip of at most 4 Mpx of the level at a time plus the ``(rows, cols)`` counts,
whatever the level's size. A level without two classes (uniform: an empty canvas) has no
foreground.

Mind what averaging does to sparse content: at a downsample of ``d`` a 28-px digit's mean is
diluted ``(d / 28)**2`` times, and once it rounds to 0 no threshold finds it. Pass a finer
``level`` for small objects, and ``threshold=0`` on black canvases to keep every non-black
pixel (Otsu's threshold sits between the bulk of the content and the black, so it may drop
faint cells).
"""

from __future__ import annotations

import numpy as np

from gigapatch.core.grid import PatchGrid
from gigapatch.core.errors import ConfigError
from gigapatch.io.readers import ImageReader

__all__ = ["BACKGROUNDS", "foreground_mask", "otsu_threshold"]

BACKGROUNDS = ("auto", "bright", "dark")
_STRIP_PIXELS = 1 << 22  # pixels read per strip (at most)
_BINS = 256  # histogram bins for non-uint8 images


# ----------------------------------------------------------------------------- Otsu


def _otsu_from_histogram(counts: np.ndarray, values: np.ndarray) -> int | None:
    """Index ``k`` of the last bin of the dark class (bins ``0..k``) maximising the
    between-class variance, or ``None`` if fewer than two bins are occupied."""
    counts = counts.astype(np.float64)
    values = values.astype(np.float64)
    w0 = np.cumsum(counts)[:-1]  # dark class = bins 0..k, for k = 0 .. n-2
    w1 = counts.sum() - w0
    s0 = np.cumsum(counts * values)[:-1]
    s_total = float((counts * values).sum())
    valid = (w0 > 0) & (w1 > 0)
    if not valid.any():
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where(valid, w0 * w1 * (s0 / w0 - (s_total - s0) / w1) ** 2, -1.0)
    return int(np.argmax(between))


def otsu_threshold(gray: np.ndarray) -> float | None:
    """Otsu's threshold of a grayscale array (any shape, any real dtype).

    Returns:
        ``t`` such that ``gray > t`` is the bright class: an integer value for ``uint8``
        (exact, 256 levels), else the upper edge of one of 256 bins over ``[min, max]``;
        ``None`` if the values do not form two classes (all equal).
    """
    gray = np.asarray(gray)
    if gray.dtype == np.uint8:
        k = _otsu_from_histogram(np.bincount(gray.ravel(), minlength=256), np.arange(256))
        return None if k is None else float(k)
    values = gray.astype(np.float64).ravel()
    lo, hi = float(values.min(initial=np.inf)), float(values.max(initial=-np.inf))
    if not lo < hi:
        return None
    counts, edges = np.histogram(values, bins=_BINS, range=(lo, hi))
    k = _otsu_from_histogram(counts, (edges[:-1] + edges[1:]) / 2)
    return None if k is None else float(edges[k + 1])


# ----------------------------------------------------------------------------- reading


def _to_gray(region: np.ndarray) -> np.ndarray:
    """``(h, w, C)`` -> ``(h, w)``: the channel for C = 1 (C = 2: gray + alpha), luminance
    for RGB(A) (``uint8`` stays ``uint8``: (77 R + 150 G + 29 B + 128) >> 8), else the mean."""
    channels = region.shape[2]
    if channels <= 2:
        return region[:, :, 0]
    if channels <= 4:
        rgb = region[:, :, :3]
        if region.dtype == np.uint8:
            weights = np.array([77, 150, 29], dtype=np.uint32)
            return ((rgb @ weights + 128) >> 8).astype(np.uint8)
        return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return region.astype(np.float64).mean(axis=2)


def _strips(reader: ImageReader, level: int) -> list[tuple[int, int]]:
    """Row ranges of about ``_STRIP_PIXELS`` px; a power-of-two height, so that strips never
    straddle the boundary between two rows of (power-of-two) tiles."""
    height, width = reader.levels[level]
    rows = 1 << max(0, (_STRIP_PIXELS // width).bit_length() - 1)
    return [(y, min(y + rows, height)) for y in range(0, height, rows)]


def _read_gray(reader: ImageReader, level: int, y0: int, y1: int) -> np.ndarray:
    width = reader.levels[level][1]
    return _to_gray(reader.read_region(y0, 0, y1 - y0, width, level=level))


def _threshold_and_border(
    reader: ImageReader, level: int, threshold: float | None
) -> tuple[float | None, float]:
    """Otsu's threshold of the level (unless given) and the median of its border pixels."""
    strips = _strips(reader, level)
    border: list[np.ndarray] = []
    counts: np.ndarray | None = None
    lo, hi = np.inf, -np.inf
    is_uint8 = reader.dtype == np.uint8 and reader.shape[2] in (1, 2, 3, 4)
    for index, (y0, y1) in enumerate(strips):
        gray = _read_gray(reader, level, y0, y1)
        border.extend([gray[:, 0], gray[:, -1]])
        if index == 0:
            border.append(gray[0])
        if index == len(strips) - 1:
            border.append(gray[-1])
        if threshold is not None:
            continue
        if is_uint8:
            hist = np.bincount(gray.ravel(), minlength=256)
            counts = hist if counts is None else counts + hist
        else:
            lo, hi = min(lo, float(gray.min())), max(hi, float(gray.max()))
    border_median = float(np.median(np.concatenate(border).astype(np.float64)))
    if threshold is not None:
        return float(threshold), border_median
    if is_uint8:
        assert counts is not None
        k = _otsu_from_histogram(counts, np.arange(256))
        return (None if k is None else float(k)), border_median
    if not lo < hi:
        return None, border_median
    total = np.zeros(_BINS, dtype=np.int64)
    edges = np.linspace(lo, hi, _BINS + 1)
    for y0, y1 in strips:  # second pass: the histogram over the now known range
        total += np.histogram(_read_gray(reader, level, y0, y1), bins=edges)[0]
    k = _otsu_from_histogram(total, (edges[:-1] + edges[1:]) / 2)
    return (None if k is None else float(edges[k + 1])), border_median


# ----------------------------------------------------------------------------- mask


def _footprints(start: np.ndarray, patch: int, full: int, low: int) -> tuple[np.ndarray, ...]:
    """Low-res index ranges ``[first, stop)`` touched by level-0 spans ``[start, start+patch)``
    clipped to ``full`` px, on a level of ``low`` px (never empty)."""
    end = np.minimum(start + patch, full)
    first = start * low // full
    stop = np.minimum(-(-end * low // full), low)
    return first, np.maximum(stop, first + 1)


def foreground_mask(
    reader: ImageReader,
    patch_size: int,
    stride: int | None = None,
    level: int | None = None,
    threshold: float | None = None,
    background: str = "auto",
    min_fraction: float = 0.0,
) -> np.ndarray:
    """Which cells of the patch grid hold content (tissue), from a low-resolution level.

    Args:
        reader: the image (:func:`gigapatch.io.readers.open_image`); any backend, any dtype,
            grayscale or RGB(A) (luminance).
        patch_size, stride: the grid, as ``PatchGrid(H, W, patch_size, stride)`` over level 0.
        level: pyramid level to threshold; ``None``: the coarsest level whose downsample is
            at most ``patch_size`` (a patch still covers >= 1 px), ``reader.best_level``.
        threshold: gray value separating background and content; ``None``: Otsu's threshold
            of the level (:func:`otsu_threshold`). Content is ``gray > threshold`` on a dark
            background, ``gray <= threshold`` on a bright one.
        background: ``"dark"`` (content brighter: black canvases), ``"bright"`` (content
            darker: tissue on glass) or ``"auto"`` (bright if the median border pixel is
            above the threshold).
        min_fraction: a cell needs foreground in at least this fraction (0..1) of the low-res
            pixels its footprint touches inside the image, and in at least one; default 0:
            any foreground pixel.

    Returns:
        ``bool`` array of shape ``(rows, cols)`` of the grid; ``mask.ravel()`` follows the
        grid's row-major cell numbering, ``np.flatnonzero(mask)`` are the cells to keep.

    Raises:
        ConfigError: bad patch size or stride (as :class:`PatchGrid`), level, background,
            threshold or min_fraction.
        DataError: the image cannot be decoded.
    """
    height, width, _ = reader.shape
    grid = PatchGrid(height, width, patch_size, stride)
    if background not in BACKGROUNDS:
        raise ConfigError(
            f"background={background!r} is invalid; use 'dark' (content brighter than the "
            "background, e.g. black canvases), 'bright' (tissue on white glass) or 'auto'."
        )
    if isinstance(min_fraction, bool) or not isinstance(min_fraction, (int, float)) or not (
        0.0 <= min_fraction <= 1.0
    ):
        raise ConfigError(f"min_fraction={min_fraction!r} is invalid; use a number in 0..1.")
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number))
        or not np.isfinite(threshold)
    ):
        raise ConfigError(f"threshold={threshold!r} is invalid; use a finite number or None.")
    if level is None:
        level = reader.best_level(patch_size)
    elif isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not (
        0 <= level < len(reader.levels)
    ):
        raise ConfigError(
            f"level={level!r} is invalid for {reader.path}, which has levels "
            f"0..{len(reader.levels) - 1} of sizes {reader.levels}."
        )
    level = int(level)
    low_h, low_w = reader.levels[level]
    t, border = _threshold_and_border(reader, level, threshold)
    if t is None:
        return np.zeros(grid.shape, dtype=bool)
    bright = background == "bright" or (background == "auto" and border > t)

    s = grid.stride
    r_first, r_stop = _footprints(np.arange(grid.rows) * s, patch_size, height, low_h)
    c_first, c_stop = _footprints(np.arange(grid.cols) * s, patch_size, width, low_w)
    counts = np.zeros(grid.shape, dtype=np.int64)
    for y0, y1 in _strips(reader, level):
        gray = _read_gray(reader, level, y0, y1)
        fg = gray <= t if bright else gray > t
        across = np.zeros((y1 - y0, low_w + 1), dtype=np.int32)
        np.cumsum(fg, axis=1, out=across[:, 1:])
        per_col = across[:, c_stop] - across[:, c_first]  # (strip rows, cols)
        down = np.zeros((y1 - y0 + 1, grid.cols), dtype=np.int64)
        np.cumsum(per_col, axis=0, out=down[1:])
        lo = np.clip(r_first - y0, 0, y1 - y0)
        hi = np.clip(r_stop - y0, 0, y1 - y0)
        counts += down[hi] - down[lo]
    area = (r_stop - r_first)[:, None] * (c_stop - c_first)[None, :]
    return (counts > 0) & (counts >= min_fraction * area)
