"""Image-classification datasets listed in a CSV file.

The CSV needs at least the columns ``path`` and ``label`` (extra columns are ignored).
Every problem a user can cause -- missing CSV, missing columns, bad labels, missing
image files -- is reported at construction time with the file, row and value at fault;
corrupt image files are reported when read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from gigapatch.config import Config
from gigapatch.data.csv_table import check_num_classes, read_labelled_csv
from gigapatch.errors import ConfigError, DataError
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
            self.csv_path, self.root, num_classes,
            header_hint=" (at least 'path,label')",
        )
        self._paths, self._labels = rows.paths, rows.labels
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
    (:class:`~gigapatch.data.megapixel_mnist.MegapixelMNISTDataset`). Tasks the model predicts
    (``data.tasks``) must be among the data set's.
    """
    d = cfg.data
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if d.kind == "megapixel_mnist":
        from gigapatch.data.megapixel_mnist import TASKS, MegapixelMNISTDataset

        unknown = [t for t in d.tasks if t not in TASKS]
        if unknown:
            raise ConfigError(
                f"data.tasks {unknown} are not Megapixel MNIST tasks; choose from {list(TASKS)}."
            )
        return MegapixelMNISTDataset(d.root, "train" if split == "train" else "test")
    if len(d.tasks) > 1:
        raise ConfigError(
            f"data.tasks = {d.tasks}: a CSV data set has one label; use at most one task."
        )
    path = d.train_csv if split == "train" else d.val_csv
    if d.kind == "lazy_csv":
        from gigapatch.data.large import LargeImageCSVDataset

        return LargeImageCSVDataset(path, num_classes=d.num_classes)
    if d.kind == "folder":
        from gigapatch.data.large import LargeImageFolderDataset

        return LargeImageFolderDataset(Path(d.root) / ("train" if split == "train" else "val"))
    return CSVImageDataset(path, num_classes=d.num_classes)


def describe_data(cfg: Config) -> str:
    """Where ``cfg``'s training images come from, for messages."""
    return cfg.data.train_csv if cfg.data.kind in ("csv", "lazy_csv") else str(cfg.data.root)
