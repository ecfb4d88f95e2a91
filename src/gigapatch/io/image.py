"""Reading and writing single images with Pillow.

:func:`read_image` always returns ``uint8`` arrays of shape ``(H, W, C)`` with ``C`` = 1
(grayscale) or 3 (RGB), whatever the file's mode, so callers never branch on modes.
Pillow's decompression-bomb guard stays on: an image above ``PIL.Image.MAX_IMAGE_PIXELS``
is refused with a :class:`~gigapatch.core.errors.DataError` that says how to proceed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from gigapatch.core.errors import DataError
from gigapatch.core.files import atomic_path, atomic_write

__all__ = ["read_image", "write_mask", "write_mask_blocks", "write_png"]

# Modes that become a single grayscale channel; everything else becomes RGB.
_GRAY_MODES = {"1", "L", "LA", "La"}
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file into a ``uint8`` array of shape ``(H, W, C)``.

    ``C`` is 1 for grayscale files (modes ``1``, ``L``, ``LA``; 16-bit ``I;16``/``I``
    scaled from 0..65535 to 0..255) and 3 for everything else (``RGB``; ``RGBA``/``LA``
    lose their alpha channel; palette, CMYK, YCbCr ... are converted to RGB).
    Multi-frame files (GIF, multi-page TIFF) give their first frame.

    Raises:
        DataError: the file is missing, cannot be decoded (corrupt, truncated, not an
            image), is floating point, or exceeds Pillow's decompression-bomb limit.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not an image file" if path.is_dir() else "not found"
        raise DataError(f"Image file {what}: {path}. Check the path (and the CSV that lists it).")
    try:
        with Image.open(path) as img:
            img.load()
            return _to_uint8_hwc(img, path)
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"Image {path} is larger than Pillow's decompression-bomb limit "
            f"(PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels): {exc}. "
            "Store huge images as tiled TIFFs read region by region, or, if you trust the "
            "file, raise PIL.Image.MAX_IMAGE_PIXELS before loading."
        ) from exc
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # UnidentifiedImageError is an OSError; truncated data raises OSError;
        # some plugins raise SyntaxError / ValueError on malformed headers.
        raise DataError(
            f"Image {path} cannot be decoded (corrupt, truncated or not an image file): {exc}. "
            "Re-export or re-download the file, or remove it from the dataset."
        ) from exc


def _to_uint8_hwc(img: Image.Image, path: Path) -> np.ndarray:
    """Convert a loaded Pillow image to ``uint8`` ``(H, W, 1)`` or ``(H, W, 3)``."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        wide = np.array(img, dtype=np.int64)
        gray = (np.clip(wide, 0, 65535) + 128) // 257  # 0..65535 -> 0..255, rounded
        return gray.astype(np.uint8)[:, :, None]
    if mode == "F":
        raise DataError(
            f"Image {path} has floating-point pixels (mode 'F'); gigapatch reads 8-bit or "
            "16-bit images. Convert it to an 8-bit PNG or TIFF first."
        )
    if mode in _GRAY_MODES:
        array = np.array(img.convert("L"))
        return array[:, :, None]
    try:
        if mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        array = np.array(img.convert("RGB"))
    except ValueError as exc:
        raise DataError(
            f"Image {path} has pixel mode {mode!r}, which cannot be converted to RGB ({exc}). "
            "Convert it to an 8-bit RGB or grayscale PNG/TIFF first."
        ) from exc
    return np.ascontiguousarray(array)


def write_png(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write a ``uint8`` array to ``path`` as PNG, atomically.

    Args:
        path: destination file; parent directories are created.
        array: ``uint8`` of shape ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)``.

    The image is written to a temporary file in the same directory and moved into place
    (:func:`gigapatch.core.files.atomic_write`), so a crash never leaves half a PNG at ``path``.
    Output is deterministic: the same array always gives the same bytes.

    Returns:
        The destination path.

    Raises:
        ValueError: ``array`` is not ``uint8`` or has an unsupported shape.
    """
    path = Path(path)
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_png needs a uint8 array, got dtype {array.dtype} for {path}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(
            f"write_png needs shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
            f"got {array.shape} for {path}"
        )
    image = Image.fromarray(np.ascontiguousarray(array))
    atomic_write(path, lambda handle: image.save(handle, format="PNG"))
    return path


def write_mask(path: str | os.PathLike[str], ids: np.ndarray, tile: int = 512) -> Path:
    """Write class ids ``(H, W)`` (0..255) as a PNG, or, for a ``.tif``/``.tiff`` path, a
    tiled TIFF (zlib), atomically."""
    path = Path(path)
    ids = np.asarray(ids)
    if ids.min(initial=0) < 0 or ids.max(initial=0) > 255:
        raise ValueError(f"class ids for {path} must be in 0..255")
    ids = ids.astype(np.uint8)
    if path.suffix.lower() in (".tif", ".tiff"):
        with atomic_path(path) as tmp:
            tifffile.imwrite(tmp, ids, tile=(tile, tile), compression="zlib",
                             photometric="minisblack")
        return path
    return write_png(path, ids)


def _mask_pyramid(base: Path, dst: Path, shape: tuple[int, int], block: int) -> None:
    """Copy the one-level mask TIFF ``base`` to ``dst`` with reduced levels in SubIFDs (as
    slide scanners write them), each every 2nd pixel of the one above (class ids are picked,
    not averaged), down to one tile; read from ``base`` one strip of tiles at a time."""
    import zarr  # noqa: PLC0415 - as gigapatch.io.readers: only for TIFF masks

    sizes = [shape]
    while max(sizes[-1]) > block:
        sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))

    def tiles(level0: Any, f: int, lh: int, lw: int) -> Iterator[np.ndarray]:
        for ty in range(0, lh, block):
            strip = np.asarray(level0[ty * f : (ty + block) * f : f, ::f])  # (≤ block, lw)
            for tx in range(0, lw, block):
                tile = np.zeros((block, block), dtype=np.uint8)
                part = strip[:, tx : tx + block]
                tile[: part.shape[0], : part.shape[1]] = part
                yield tile

    with tifffile.TiffFile(base) as src, \
            tifffile.TiffWriter(dst, bigtiff=shape[0] * shape[1] > 2**31) as out:
        store = src.series[0].aszarr()
        try:
            level0 = zarr.open_array(store, mode="r")
            for i, (lh, lw) in enumerate(sizes):
                extra: dict[str, int] = {"subfiletype": 1} if i else \
                    ({"subifds": len(sizes) - 1} if len(sizes) > 1 else {})
                out.write(tiles(level0, 2**i, lh, lw), shape=(lh, lw), dtype=np.uint8,
                          tile=(block, block), compression="zlib", photometric="minisblack",
                          **extra)
        finally:
            store.close()


def write_mask_blocks(path: str | os.PathLike[str], shape: tuple[int, int], block: int,
                      blocks: Iterable[tuple[int, int, np.ndarray]]) -> Path:
    """Write class ids given block by block in raster order (``(y, x, ids (h, w))``, blocks
    of side ``block``, edge blocks cropped) to ``path``: a ``.tif``/``.tiff`` path is written
    tile by tile (``block`` must be a multiple of 16), never holding the whole mask, then
    given a pyramid of reduced levels (:func:`_mask_pyramid`); other paths are assembled and
    written as PNG (small masks)."""
    path = Path(path)
    h, w = shape
    if path.suffix.lower() in (".tif", ".tiff"):
        if block % 16:
            raise ValueError(f"TIFF tiles must be multiples of 16 px; the block is {block}")

        def tiles() -> Iterator[np.ndarray]:
            for _, _, ids in blocks:
                tile = np.zeros((block, block), dtype=np.uint8)
                ids = np.asarray(ids, dtype=np.uint8)
                tile[: ids.shape[0], : ids.shape[1]] = ids
                yield tile

        with atomic_path(path) as tmp:
            base = tmp.with_name(tmp.name + ".level0")
            try:
                tifffile.imwrite(base, tiles(), shape=(h, w), dtype=np.uint8,
                                 tile=(block, block), compression="zlib",
                                 photometric="minisblack", bigtiff=h * w > 2**31)
                _mask_pyramid(base, tmp, (h, w), block)
            finally:
                base.unlink(missing_ok=True)
        return path
    out = np.zeros((h, w), dtype=np.uint8)
    for y, x, ids in blocks:
        ids = np.asarray(ids, dtype=np.uint8)
        out[y : y + ids.shape[0], x : x + ids.shape[1]] = ids
    return write_png(path, out)
