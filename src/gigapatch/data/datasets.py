"""Image-classification datasets listed in a CSV file.

The CSV needs at least the columns ``path`` and ``label``; other columns are ignored unless
``data.tasks`` names them (one column per task, see :mod:`gigapatch.data.task_columns`).
Every problem a user can cause -- missing CSV, missing columns, bad labels, missing
image files -- is reported at construction time with the file, row and value at fault;
corrupt image files are reported when read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from gigapatch.config import Config
from gigapatch.data.augment import AugmentedDataset
from gigapatch.data.detection import DetectionDataset, read_box_csv, read_coco
from gigapatch.data.large import LargeImageCSVDataset, LargeImageFolderDataset
from gigapatch.data.segmentation import SegmentationDataset, segmentation_csv, segmentation_folder
from gigapatch.data.task_columns import LABEL_TASK, TaskColumns
from gigapatch.core.errors import ConfigError, DataError
from gigapatch.io.image import read_image
from gigapatch.synth.megapixel_mnist import TASKS, MegapixelMNISTDataset

__all__ = ["CSVImageDataset", "check_images", "describe_data", "open_dataset"]

_MAX_LISTED = 5  # files named in one message

class CSVImageDataset(LargeImageCSVDataset):
    """Images and integer labels listed in a CSV with columns ``path,label``, decoded whole.

    The same CSV handling (and the same errors, naming the file, line and value) as
    :class:`~gigapatch.data.large.LargeImageCSVDataset`, which this is; only the items
    differ: ``(image, label)`` with ``image`` a ``uint8`` tensor of shape ``(C, H, W)`` (C = 1
    grayscale or 3 RGB, see :func:`gigapatch.io.image.read_image`) and ``label`` an ``int64``
    tensor of shape ``()``. For images that fit in memory; larger ones use
    ``data.kind: lazy_csv``.
    """

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image uint8 (C, H, W), label int64 ())``; DataError names a corrupt file."""
        array = read_image(self._paths[index])  # (H, W, C) uint8
        image = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        return image, torch.tensor(self._labels[index], dtype=torch.int64)


def open_dataset(cfg: Config, split: str) -> Dataset:
    """The ``"train"`` or ``"val"`` data set that ``cfg.data`` describes.

    ``kind: csv`` reads ``train_csv``/``val_csv`` (:class:`CSVImageDataset`, decoded whole);
    ``kind: lazy_csv`` lists the same CSVs but yields lazy readers that methods read patch by
    patch (:class:`~gigapatch.data.large.LargeImageCSVDataset`; tiled TIFF, slides, …);
    ``kind: folder`` reads ``root/<class>/<image>`` lazily
    (:class:`~gigapatch.data.large.LargeImageFolderDataset`, ``root/train`` and ``root/val``);
    ``kind: megapixel_mnist`` renders the ``train``/``test`` split of ``root``
    (:class:`~gigapatch.synth.megapixel_mnist.MegapixelMNISTDataset`). Tasks the model predicts
    (``data.tasks``) must be among the data set's: for CSVs, columns of the CSV (``label`` is
    the label column; :class:`~gigapatch.data.task_columns.TaskColumns`).
    """
    d = cfg.data
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    ds = _open(cfg, split)
    if split == "train" and d.augment:
        return AugmentedDataset(ds, d.augment, dense=cfg.task.kind == "segment",
                                boxes=cfg.task.kind == "detect")
    return ds


def _open(cfg: Config, split: str) -> Dataset:
    d = cfg.data
    if cfg.task.kind == "segment":
        return _segmentation(cfg, split)
    if cfg.task.kind == "detect":
        return _detection(cfg, split)
    if d.kind == "megapixel_mnist":
        unknown = [t for t in d.tasks if t not in TASKS]
        if unknown:
            raise ConfigError(
                f"data.tasks {unknown} are not Megapixel MNIST tasks; choose from {list(TASKS)}."
            )
        return MegapixelMNISTDataset(d.root, "train" if split == "train" else "test")
    if d.kind == "folder":
        if d.tasks:
            raise ConfigError(
                f"data.tasks = {d.tasks}: a folder data set has one label (its sub-folder); "
                "leave data.tasks empty, or list the images in a CSV with one column per task."
            )
        folder = LargeImageFolderDataset(Path(d.root) / ("train" if split == "train" else "val"))
        folder.level, folder.mpp = d.level, d.mpp
        return folder
    path = d.train_csv if split == "train" else d.val_csv
    extra = [t for t in d.tasks if t != LABEL_TASK]  # task columns besides `label`
    columns = {"root": d.image_root, "path_column": d.path_column,
               "label_column": d.label_column, "suffix": d.path_suffix}
    if d.kind == "lazy_csv":
        ds: Any = LargeImageCSVDataset(path, num_classes=d.num_classes, extra_columns=extra,
                                       **columns)
        ds.level, ds.mpp = d.level, d.mpp
    else:
        ds = CSVImageDataset(path, num_classes=d.num_classes, extra_columns=extra, **columns)
    return TaskColumns(ds, d.tasks, d.multilabel, d.num_classes) if d.tasks else ds


def _segmentation(cfg: Config, split: str) -> Dataset:
    d = cfg.data
    if d.kind == "folder":
        return segmentation_folder(Path(d.root) / split, d.num_classes, mask_dir=d.mask_dir,
                                   level=d.level, mpp=d.mpp)
    if d.kind in ("csv", "lazy_csv"):
        return segmentation_csv(d.train_csv if split == "train" else d.val_csv, d.num_classes,
                                lazy=d.kind == "lazy_csv", mask_column=d.mask_column,
                                level=d.level, mpp=d.mpp)
    raise ConfigError(f"data.kind = {d.kind!r} has no masks; for task.kind = segment use csv, "
                      "lazy_csv (path,mask CSVs) or folder (images/ + masks/).")


def _detection(cfg: Config, split: str) -> Dataset:
    d = cfg.data
    if d.kind not in ("csv", "lazy_csv"):
        raise ConfigError(f"data.kind = {d.kind!r} has no boxes; for task.kind = detect use csv "
                          "or lazy_csv with a COCO JSON (or a path,x0,y0,x1,y1,label CSV) as "
                          "data.train_csv / data.val_csv.")
    path = Path(d.train_csv if split == "train" else d.val_csv)
    read = read_coco if path.suffix.lower() == ".json" else read_box_csv
    records = read(path, d.image_root)
    top = max(records.category_ids)
    if path.suffix.lower() != ".json" and top > d.num_classes:
        raise DataError(f"{path} has category id {top}, above data.num_classes = "
                        f"{d.num_classes}; set data.num_classes to the number of categories.")
    if path.suffix.lower() == ".json" and records.num_classes != d.num_classes:
        raise DataError(f"{path} has {records.num_classes} categories but data.num_classes = "
                        f"{d.num_classes}; set data.num_classes: {records.num_classes}.")
    if path.suffix.lower() == ".json":
        if not d.category_ids:  # labels 1..K ↔ these ids, kept in the run's config
            d.category_ids = list(records.category_ids)
        elif list(records.category_ids) != list(d.category_ids):
            raise DataError(f"{path} lists category ids {records.category_ids}, but the model's "
                            f"labels stand for {d.category_ids} (data.category_ids, from the "
                            "training JSON): give the held-out JSON the same 'categories'.")
    return DetectionDataset(records, lazy=d.kind == "lazy_csv")


def describe_data(cfg: Config, split: str = "train") -> str:
    """Where ``cfg``'s ``train`` or ``val`` images come from, for messages."""
    d = cfg.data
    if d.kind in ("csv", "lazy_csv"):
        return d.train_csv if split == "train" else d.val_csv
    sub = {"folder": {"train": "train", "val": "val"},
           "megapixel_mnist": {"train": "train", "val": "test"}}.get(d.kind, {}).get(split, "")
    return str(Path(d.root) / sub) if sub else str(d.root)


def check_images(ds: Dataset, in_chans: int, where: str, *, progress: bool = True) -> int:
    """Check every image ``ds`` will give against ``in_chans`` channels of 8-bit pixels,
    from the file headers (no pixels are decoded), before any training or evaluation starts.

    Images decoded whole (``data.kind: csv``) become 1 channel (grayscale modes) or 3 (RGB;
    alpha dropped, 16-bit scaled to 8), so only their channel count is checked; images read
    lazily must also be ``uint8``. Data sets without image files (Megapixel MNIST renders
    1-channel canvases) are checked by their first item. Returns the number of images checked.

    Raises:
        DataError: naming up to five offending files (and how many more), their channels or
            pixel type, ``where`` they are listed, and what to change.
    """
    base = getattr(ds, "base", ds)  # TaskColumns wraps the CSV set
    if not hasattr(base, "reader"):
        image, _ = ds[0]
        c = image.shape[0] if isinstance(image, torch.Tensor) else image.shape[2]
        if c != in_chans:
            raise DataError(f"images of {where} have {c} channel(s) but the model takes "
                            f"{in_chans}; set data.in_chans={c} (or use a matching checkpoint).")
        return 1
    decoded = isinstance(base, CSVImageDataset) or (
        isinstance(base, (SegmentationDataset, DetectionDataset)) and not base.lazy)
    wrong: list[str] = []
    not_8bit: list[str] = []
    n = len(base)
    for i in tqdm(range(n), desc="checking image headers", unit="img", leave=False,
                  disable=not progress or n < 2000):
        reader = base.reader(i)
        c = reader.shape[2]
        if decoded:
            c = 1 if c == 1 else 3
        elif reader.dtype != np.uint8:
            not_8bit.append(f"{reader.path} ({reader.dtype})")
        if c != in_chans:
            wrong.append(f"{reader.path} ({c} channel{'s' if c != 1 else ''})")
    if wrong:
        raise DataError(
            f"{len(wrong)} of the {n} images listed in {where} do not have the "
            f"{in_chans} channel(s) the model takes (data.in_chans = {in_chans}): "
            f"{_listing(wrong)}. Convert them (e.g. to {'grayscale' if in_chans == 1 else 'RGB'}"
            "), or set data.in_chans to the channels of all images (every split must match)."
        )
    if not_8bit:
        raise DataError(
            f"{len(not_8bit)} of the {n} images listed in {where} are not 8-bit: "
            f"{_listing(not_8bit)}. gigapatch trains on uint8 pixels: convert them (e.g. "
            "rescale 16-bit to 0..255)."
        )
    return n


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")
