"""Image-classification datasets listed in a CSV file.

The CSV needs at least the columns ``path`` and ``label``; other columns are ignored unless
``data.tasks`` names them (one column per task, see :mod:`gigapatch.data.task_columns`).
Every problem a user can cause -- missing CSV, missing columns, bad labels, missing
image files -- is reported at construction time with the file, row and value at fault;
corrupt image files are reported when read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from gigapatch.config import Config
from gigapatch.data.csv_table import check_num_classes, read_labelled_csv
from gigapatch.data.task_columns import LABEL_TASK, TaskColumns
from gigapatch.core.errors import ConfigError, DataError
from gigapatch.io.image import read_image

__all__ = ["CSVImageDataset", "describe_data", "open_dataset"]

REQUIRED_COLUMNS = ("path", "label")
_MAX_LISTED = 5  # missing files named in one error message


class CSVImageDataset(Dataset):
    """Images and integer labels listed in a CSV with columns ``path,label``.

    Args:
        csv_path: the CSV file (UTF-8, optional BOM; header row required).
        root: directory that relative image paths are resolved against; defaults to the
            CSV's directory. Absolute paths in the CSV are used as they are.
        num_classes: if given, every label must be in ``[0, num_classes)``; otherwise labels
            must be >= 0 and ``num_classes`` is inferred as ``max(label) + 1``.
        extra_columns: more columns to keep as text (the tasks of
            :class:`~gigapatch.data.task_columns.TaskColumns`); see :meth:`extra_column`.

    Items are ``(image, label)``: ``image`` is a ``uint8`` tensor of shape ``(C, H, W)``
    (C = 1 grayscale or 3 RGB, see :func:`gigapatch.io.image.read_image`), ``label`` an
    ``int64`` tensor of shape ``()``.

    Raises:
        DataError: the CSV is missing or empty, lacks a column, has a non-integer or
            out-of-range label, or lists image files that do not exist.
        ConfigError: ``num_classes`` is not a positive integer.
    """

    def __init__(
        self,
        csv_path: str | os.PathLike[str],
        root: str | os.PathLike[str] | None = None,
        num_classes: int | None = None,
        extra_columns: Sequence[str] = (),
    ) -> None:
        self.csv_path = Path(csv_path)
        num_classes = check_num_classes(num_classes)
        if not self.csv_path.is_file():
            raise DataError(
                f"Dataset CSV not found: {self.csv_path}. Check the path, or generate the "
                "dataset first (e.g. UltraMNIST)."
            )
        self.root = Path(root) if root is not None else self.csv_path.parent
        if not self.root.is_dir():
            raise DataError(
                f"Image root directory not found: {self.root} (for {self.csv_path}). Check root."
            )
        rows = read_labelled_csv(
            self.csv_path, self.root, num_classes, extra_columns=tuple(extra_columns),
            header_hint=" (at least 'path,label')",
        )
        self._paths, self._labels, self._extras = rows.paths, rows.labels, rows.extras
        self._num_classes = num_classes if num_classes is not None else max(rows.labels) + 1
        self._check_files_exist()

    def _check_files_exist(self) -> None:
        """DataError naming the listed image files that do not exist (a stat per file)."""
        missing = [path for path in self._paths if not path.is_file()]
        if missing:
            shown = ", ".join(str(p) for p in missing[:_MAX_LISTED])
            more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
            raise DataError(
                f"Dataset CSV {self.csv_path} lists {len(missing)} image file(s) that do not "
                f"exist: {shown}{more}. Check the paths (relative to {self.root}) or regenerate "
                "the dataset."
            )

    @property
    def num_classes(self) -> int:
        """Number of classes: as given, or ``max(label) + 1``."""
        return self._num_classes

    def extra_column(self, name: str) -> list[str]:
        """All values of the extra column ``name`` (stripped text), in CSV order (a copy)."""
        return list(self._extras[name])

    @property
    def labels(self) -> list[int]:
        """The label of every item, in CSV order (a copy)."""
        return list(self._labels)

    @property
    def paths(self) -> list[Path]:
        """The resolved image path of every item, in CSV order (a copy)."""
        return list(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

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
    if d.kind == "megapixel_mnist":
        from gigapatch.synth.megapixel_mnist import TASKS, MegapixelMNISTDataset

        unknown = [t for t in d.tasks if t not in TASKS]
        if unknown:
            raise ConfigError(
                f"data.tasks {unknown} are not Megapixel MNIST tasks; choose from {list(TASKS)}."
            )
        return MegapixelMNISTDataset(d.root, "train" if split == "train" else "test")
    if d.kind == "folder":
        from gigapatch.data.large import LargeImageFolderDataset

        if d.tasks:
            raise ConfigError(
                f"data.tasks = {d.tasks}: a folder data set has one label (its sub-folder); "
                "leave data.tasks empty, or list the images in a CSV with one column per task."
            )
        return LargeImageFolderDataset(Path(d.root) / ("train" if split == "train" else "val"))
    path = d.train_csv if split == "train" else d.val_csv
    extra = [t for t in d.tasks if t != LABEL_TASK]  # task columns besides `label`
    if d.kind == "lazy_csv":
        from gigapatch.data.large import LargeImageCSVDataset

        ds: Any = LargeImageCSVDataset(path, num_classes=d.num_classes, extra_columns=extra)
    else:
        ds = CSVImageDataset(path, num_classes=d.num_classes, extra_columns=extra)
    return TaskColumns(ds, d.tasks, d.multilabel, d.num_classes) if d.tasks else ds


def describe_data(cfg: Config) -> str:
    """Where ``cfg``'s training images come from, for messages."""
    return cfg.data.train_csv if cfg.data.kind in ("csv", "lazy_csv") else str(cfg.data.root)
