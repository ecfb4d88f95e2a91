"""Segmentation masks: one per image, the same size as the image, read lazily like images.

A mask holds one integer class id per pixel (0 = background). Binary masks may be written
0/255 (the usual PNG convention): with ``num_classes == 2``, 255 reads as class 1. Formats:

- PNG/GIF/BMP/JPEG-less Pillow formats: single-band modes ``1``, ``L``, ``P`` (palette
  *indices* are the class ids, as in VOC-style masks), ``I;16``, ``I``; decoded whole when read
  (small masks);
- TIFF (tiled, pyramidal or not) and ``.npy``: read window by window through
  :func:`gigapatch.io.readers.open_image`, so a gigapixel mask never loads whole.

**At a pyramid level** (``data.level`` / ``data.mpp``): the images are read at a coarser level
than the masks were drawn at. A :class:`MaskReader` given the level's ``size`` presents the
mask at that size by nearest-neighbour sampling from the mask's full resolution (level-pixel
``i`` takes mask row ``⌊(i + ½)·H / h⌋``; no averaging, which would invent class ids at
borders), reading only the mask rows and columns under the window, band by band. A mask
written at the level's size is read as it is.

Values are checked where they are read: a value that is no class id raises a
:class:`~gigapatch.core.errors.DataError` naming the file, the value and where it is. RGB masks
are refused when the data set is built (from the header).

:class:`Masks` is what a batch's targets become (:meth:`gigapatch.tasks.segment.Segment.collate`):
the masks of ``B`` images, in memory or as readers, cropped window by window; pixels past the
image border read as :data:`IGNORE`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gigapatch.core.errors import DataError
from gigapatch.io.readers import ImageReader, open_image

__all__ = ["IGNORE", "MaskReader", "Masks", "class_ids"]

#: Target value of pixels that do not count (past the image border).
IGNORE = -1

_PILLOW_MASKS = {".png", ".gif", ".bmp"}
_ONE_BAND = {"1", "L", "P", "I;16", "I;16L", "I;16B", "I;16N", "I"}


def class_ids(values: np.ndarray, num_classes: int, path: Path | str, y0: int = 0,
              x0: int = 0) -> np.ndarray:
    """Mask pixels ``(h, w)`` (any integer dtype) → class ids ``int64 (h, w)``.

    With ``num_classes == 2``, 255 becomes 1 (0/255 binary masks). ``y0, x0``: where the
    window starts in the mask, for the message.

    Raises:
        DataError: a value outside ``0..num_classes-1``, naming the file, value and pixel.
    """
    if values.dtype.kind not in "biu":
        raise DataError(f"mask {path} holds {values.dtype} values; a mask holds integer class "
                        "ids (0 = background).")
    ids = values.astype(np.int64)
    if num_classes == 2:
        ids[ids == 255] = 1
    bad = (ids < 0) | (ids >= num_classes)
    if bad.any():
        y, x = (int(v) for v in np.argwhere(bad)[0])
        found = np.unique(ids[bad])
        raise DataError(
            f"mask {path}: value {int(ids[y, x])} at pixel (y={y0 + y}, x={x0 + x}) is not a class "
            f"id in 0..{num_classes - 1} (data.num_classes = {num_classes}; values found "
            f"outside: {found[:8].tolist()}). Use class ids 0..{num_classes - 1} (binary masks "
            "may use 0/255 with num_classes 2), or raise data.num_classes."
        )
    return ids


#: Rows of the presented mask sampled per read of the full-resolution mask (bounds the
#: window read from the file to ``_BAND · H / h`` rows).
_BAND = 256


class MaskReader:
    """A lazy, picklable mask: ``shape`` ``(H, W)`` from the header; :meth:`read` returns
    class ids for a window. Pillow formats are decoded whole on each read (small masks);
    TIFF and ``.npy`` masks read only the window.

    ``size``: present the mask at ``(h, w)``, the size of the pyramid level the image is read
    at (see the module doc); ``shape`` is then ``size`` and :attr:`file_shape` the file's own.

    Raises (on construction):
        DataError: the file is missing or unreadable, or has several channels (an RGB mask).
    """

    def __init__(self, path: str | os.PathLike[str], num_classes: int,
                 size: tuple[int, int] | None = None) -> None:
        self.path, self.num_classes = Path(path), num_classes
        self._reader: ImageReader | None = None
        if not self.path.is_file():
            raise DataError(f"mask file not found: {self.path}. Every image needs a mask of "
                            "the same size.")
        if self.path.suffix.lower() in _PILLOW_MASKS:
            try:
                with Image.open(self.path) as img:
                    mode, (w, h) = img.mode, img.size
            except (OSError, SyntaxError, ValueError) as e:
                raise DataError(f"mask {self.path} cannot be read: {e}.") from None
            channels = 1 if mode in _ONE_BAND else len(mode)
            self.mode = mode
        else:
            self._reader = open_image(self.path)
            h, w, channels = self._reader.shape
            self.mode = str(self._reader.dtype)
        if channels != 1:
            raise DataError(
                f"mask {self.path} has {channels} channels (mode {self.mode}); a mask holds one "
                "class id per pixel. Save it as a single-channel (grayscale or palette) image "
                "of class ids."
            )
        self.file_shape = (h, w)
        self.shape = (h, w) if size is None else (int(size[0]), int(size[1]))

    def read(self, y: int = 0, x: int = 0, h: int | None = None, w: int | None = None
             ) -> np.ndarray:
        """Class ids ``int64 (h, w)`` of the window (default: the whole mask) at
        :attr:`shape`; the window must lie inside it."""
        H, W = self.shape
        h = H - y if h is None else h
        w = W - x if w is None else w
        if self.shape == self.file_shape:
            return self._read_file(y, x, h, w)
        rows = _nearest(y, h, H, self.file_shape[0])
        cols = _nearest(x, w, W, self.file_shape[1])
        out = np.empty((h, w), dtype=np.int64)
        if not w:
            return out
        for i in range(0, h, _BAND):
            r = rows[i : i + _BAND]
            block = self._read_file(int(r[0]), int(cols[0]), int(r[-1] - r[0]) + 1,
                                    int(cols[-1] - cols[0]) + 1)
            out[i : i + _BAND] = block[np.ix_(r - r[0], cols - cols[0])]
        return out

    def _read_file(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Class ids ``int64 (h, w)`` of a window of the file at its own resolution."""
        if self._reader is None:
            try:
                with Image.open(self.path) as img:
                    values = np.asarray(img)[y : y + h, x : x + w]
            except (OSError, SyntaxError, ValueError) as e:
                raise DataError(f"mask {self.path} cannot be decoded: {e}.") from None
        else:
            values = self._reader.read_region(y, x, h, w)[..., 0]
        return class_ids(values, self.num_classes, self.path, y, x)


def _nearest(start: int, count: int, size: int, full: int) -> np.ndarray:
    """Rows (or columns) of a ``full``-long axis that pixels ``start .. start + count - 1`` of
    the same axis presented ``size`` long sample: ``⌊(i + ½)·full / size⌋``, ``int64 (count,)``."""
    i = np.arange(start, start + count, dtype=np.int64)
    return np.minimum((2 * i + 1) * full // (2 * size), full - 1)


class Masks:
    """The masks of a batch of ``B`` images: ``(B, H, W)`` int64 in memory, or readers.

    Args:
        items: per image a ``(H, W)`` int64 tensor or a :class:`MaskReader`, all one size.
    """

    def __init__(self, items: Sequence[torch.Tensor | MaskReader]) -> None:
        if not items:
            raise ValueError("a batch of masks needs at least one mask")
        sizes = {tuple(m.shape[-2:]) for m in items}
        if len(sizes) > 1:
            raise DataError(f"masks in one batch differ in size {sorted(sizes)}; use "
                            "train.batch_size 1 or images of one size.")
        self.items = list(items)
        h, w = self.items[0].shape[-2:]
        self.shape = torch.Size((len(self.items), h, w))

    def __len__(self) -> int:
        return len(self.items)

    def _window(self, b: int, y: int, x: int, h: int, w: int) -> torch.Tensor:
        item = self.items[b]
        if isinstance(item, torch.Tensor):
            return item[y : y + h, x : x + w].long()
        return torch.from_numpy(item.read(y, x, h, w))

    def full(self) -> torch.Tensor:
        """Every mask whole: ``(B, H, W)`` int64 (memory ∝ H·W)."""
        _, h, w = self.shape
        return torch.stack([self._window(b, 0, 0, h, w) for b in range(len(self))])

    def crop(self, image: torch.Tensor | list[int], boxes: torch.Tensor,
             size: tuple[int, int] | None = None) -> torch.Tensor:
        """Windows of the masks: ``image`` ``(P,)`` (which mask; a tensor or a list),
        ``boxes`` ``(P, 4)`` as ``(y, x, h, w)`` in pixels, all the same ``h, w`` (or
        ``size``, which then wins: known shapes keep memory estimates exact) →
        ``(P, h, w)`` int64; pixels past the border are :data:`IGNORE`. Only the windows are
        read."""
        _, H, W = self.shape
        h, w = size if size is not None else (int(boxes[0, 2]), int(boxes[0, 3]))
        out = torch.full((len(image), h, w), IGNORE, dtype=torch.int64)
        images = image if isinstance(image, list) else image.tolist()
        for i, (b, box) in enumerate(zip(images, boxes.tolist())):
            y, x = box[0], box[1]
            y0, y1, x0, x1 = max(y, 0), min(y + h, H), max(x, 0), min(x + w, W)
            if y0 < y1 and x0 < x1:
                out[i, y0 - y : y1 - y, x0 - x : x1 - x] = self._window(b, y0, x0, y1 - y0,
                                                                        x1 - x0)
        return out
