"""Segmentation data sets: images with one mask each, listed in a CSV or in two folders.

Layouts:

- a CSV with columns ``path`` and ``mask`` (``data.mask_column``), paths relative to the CSV;
- a folder with ``images/`` and ``masks/`` (``data.mask_dir``) holding files with matching
  names (stems; extensions may differ, e.g. ``01.tif`` and ``01.png``), the DRIVE-style
  layout; ``data.kind: folder`` reads ``root/train`` and ``root/val``.

Items are ``(image, mask)``: decoded whole (``uint8 (C, H, W)`` and ``int64 (H, W)``;
``lazy=False``, ``data.kind: csv``), or lazy readers (an
:class:`~gigapatch.io.readers.ImageReader` and a :class:`~gigapatch.data.masks.MaskReader`;
``data.kind: lazy_csv`` / ``folder``) that the methods read window by window.

Checked when the set is built, from headers only: every file exists, every mask has one
channel and the size of its image (the message names both files and both sizes).

**Pyramid level** (``data.level`` / ``data.mpp``, lazy sets only): images are read at that
level (:func:`~gigapatch.io.resolution.at_resolution`) and each mask is presented at the
level's size, by nearest-neighbour sampling when it was drawn at full resolution
(:class:`~gigapatch.data.masks.MaskReader`). A mask may have either size: the image's level 0
or the chosen level.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from gigapatch.core.errors import DataError
from gigapatch.data.masks import MaskReader
from gigapatch.io.image import read_image
from gigapatch.io.readers import SUPPORTED_EXTENSIONS, ImageReader, open_image
from gigapatch.io.resolution import at_resolution

__all__ = ["SegmentationDataset", "segmentation_csv", "segmentation_folder"]

_MAX_LISTED = 5


def _listing(items: list[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


class SegmentationDataset(Dataset):
    """Pairs ``(image path, mask path)`` with masks of ``num_classes`` class ids.

    Args:
        pairs: ``(image, mask)`` paths.
        num_classes: class ids are ``0..num_classes-1`` (0 = background).
        lazy: items are readers (``True``) or decoded tensors (``False``).
        where: what lists the pairs (a CSV, a folder), for messages.
        level, mpp: read at this pyramid level, or the level for this many microns per pixel
            (lazy sets; see the module doc).
    """

    def __init__(self, pairs: list[tuple[Path, Path]], num_classes: int, *, lazy: bool,
                 where: str, level: int | None = None, mpp: float | None = None) -> None:
        if not pairs:
            raise DataError(f"{where} lists no images; it needs at least one image and mask.")
        if not lazy and (level is not None or mpp is not None):
            raise ValueError("a pyramid level needs lazy=True (data.kind lazy_csv or folder)")
        self.where, self.lazy, self.num_classes = where, lazy, num_classes
        self.level, self.mpp = level, mpp
        missing = [p for pair in pairs for p in pair if not p.is_file()]
        if missing:
            raise DataError(f"{where} lists {len(missing)} file(s) that do not exist: "
                            f"{_listing(missing)}.")
        self._paths = [p for p, _ in pairs]
        self._masks = [m for _, m in pairs]
        wrong = []
        for image, mask in pairs:  # headers only
            full = open_image(image)
            sizes = {tuple(full.shape[:2]),
                     tuple(at_resolution(full, self.level, self.mpp).shape[:2])}
            mask_shape = MaskReader(mask, num_classes).shape
            if tuple(mask_shape) not in sizes:
                wrong.append(f"{mask} is {mask_shape[0]}×{mask_shape[1]} but {image.name} is "
                             + " or ".join(f"{h}×{w}" for h, w in sorted(sizes, reverse=True)))
        if wrong:
            at = " (or of the level read, data.level / data.mpp)" if self.at_level else ""
            raise DataError(f"{len(wrong)} mask(s) listed in {where} differ in size from their "
                            f"image: {_listing(wrong)}. A mask must have its image's size "
                            f"(H×W){at}.")

    @property
    def at_level(self) -> bool:
        """Whether images are read at a pyramid level other than as stored (level/mpp set)."""
        return self.level is not None or self.mpp is not None

    @property
    def paths(self) -> list[Path]:
        """The image paths, in order (a copy)."""
        return list(self._paths)

    @property
    def mask_paths(self) -> list[Path]:
        """The mask paths, in order (a copy)."""
        return list(self._masks)

    def reader(self, index: int) -> ImageReader:
        """A lazy reader of image ``index`` (header only), at the set's level."""
        return at_resolution(open_image(self._paths[index]), self.level, self.mpp)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if self.lazy:
            reader = self.reader(index)
            return reader, MaskReader(self._masks[index], self.num_classes, reader.shape[:2])
        mask = MaskReader(self._masks[index], self.num_classes)
        array = read_image(self._paths[index])  # (H, W, C) uint8
        image = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        return image, torch.from_numpy(mask.read())


def segmentation_csv(csv_path: str | Path, num_classes: int, *, lazy: bool,
                     path_column: str = "path", mask_column: str = "mask",
                     level: int | None = None, mpp: float | None = None
                     ) -> SegmentationDataset:
    """The pairs listed in a CSV (paths relative to its folder); ``level``/``mpp`` as in
    :class:`SegmentationDataset`.

    Raises:
        DataError: the CSV is missing or lacks a column; a row has an empty cell; a file is
            missing; a mask is RGB or differs in size from its image.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"segmentation CSV not found: {csv_path}. It lists images and masks "
                        f"with columns {path_column},{mask_column}.")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        lacking = [c for c in (path_column, mask_column) if c not in columns]
        if lacking:
            raise DataError(f"segmentation CSV {csv_path} lacks column(s) {lacking}; found "
                            f"{columns}. It needs {path_column},{mask_column} (data.mask_column"
                            " names the mask column).")
        pairs = []
        for line, row in enumerate(reader, start=2):
            image, mask = (row.get(path_column) or "").strip(), (row.get(mask_column) or "").strip()
            if not image or not mask:
                raise DataError(f"segmentation CSV {csv_path}, line {line}: empty "
                                f"{path_column if not image else mask_column!r}.")
            pairs.append((csv_path.parent / image, csv_path.parent / mask))
    return SegmentationDataset(pairs, num_classes, lazy=lazy, where=str(csv_path), level=level,
                               mpp=mpp)


def segmentation_folder(root: str | Path, num_classes: int, *, lazy: bool = True,
                        mask_dir: str = "masks", level: int | None = None,
                        mpp: float | None = None) -> SegmentationDataset:
    """The pairs of ``root/images/*`` and ``root/<mask_dir>/*`` with matching stems;
    ``level``/``mpp`` as in :class:`SegmentationDataset`.

    Raises:
        DataError: a folder is missing or empty, or an image has no mask (or a mask no
            image); the message lists them.
    """
    root = Path(root)
    images_dir, masks_dir = root / "images", root / mask_dir
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise DataError(f"segmentation folder {d} not found: {root} needs images/ and "
                            f"{mask_dir}/ with matching file names (data.mask_dir names the "
                            "masks folder).")

    def files(d: Path) -> dict[str, Path]:
        return {p.stem: p for p in sorted(d.iterdir())
                if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS}

    images, masks = files(images_dir), files(masks_dir)
    lone_images = [images[s].name for s in images if s not in masks]
    lone_masks = [masks[s].name for s in masks if s not in images]
    if lone_images or lone_masks:
        parts = []
        if lone_images:
            parts.append(f"images without a mask in {masks_dir}: {_listing(lone_images)}")
        if lone_masks:
            parts.append(f"masks without an image in {images_dir}: {_listing(lone_masks)}")
        raise DataError(f"{root}: " + "; ".join(parts) + ". Masks match images by file name "
                        "(without the extension).")
    pairs = [(images[s], masks[s]) for s in sorted(images)]
    return SegmentationDataset(pairs, num_classes, lazy=lazy, where=str(root), level=level,
                               mpp=mpp)
