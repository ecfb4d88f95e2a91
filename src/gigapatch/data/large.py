"""Data sets of large images that hand out lazy readers, not pixels.

A gigapixel slide does not fit in a batch tensor. These data sets yield ``(reader, label)``
where ``reader`` is an :class:`~gigapatch.io.readers.ImageReader` (header read, no file handle
held, picklable): the training method reads the patches it needs with
``reader.read_region(y, x, h, w, level)``. Use :func:`collate_readers` as the DataLoader's
``collate_fn``; readers cross into worker processes and back safely (each process opens its
own handle on its first read).

* :class:`LargeImageCSVDataset` -- images listed in a CSV (``path,label``; any column names,
  e.g. PANDA's ``image_id,isup_grade`` with ``suffix=".tiff"``);
* :class:`LargeImageFolderDataset` -- one sub-folder per class (sorted names -> 0, 1, ...).

Everything a user can get wrong (missing CSV or column, bad label, missing file, unsupported
file type, empty class folder) is reported at construction, naming the file, line and value;
a corrupt image header is reported when its item is fetched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from gigapatch.data.csv_table import check_num_classes, read_labelled_csv
from gigapatch.core.errors import ConfigError, DataError
from gigapatch.io.readers import SUPPORTED_EXTENSIONS, ImageReader, open_image
from gigapatch.io.resolution import at_resolution

__all__ = ["LargeImageCSVDataset", "LargeImageFolderDataset", "collate_readers"]

_MAX_LISTED = 5  # files or rows named in one error message


def collate_readers(
    batch: Sequence[tuple[ImageReader, Any]],
) -> tuple[list[ImageReader], torch.Tensor]:
    """DataLoader ``collate_fn`` for the data sets of this module.

    Args:
        batch: ``B`` items ``(reader, label)``; ``label`` an integer or an integer tensor.

    Returns:
        ``(readers, labels)``: the ``B`` readers in batch order and an ``int64`` tensor of
        shape ``(B,)``.
    """
    readers = [item[0] for item in batch]
    labels = torch.as_tensor([int(item[1]) for item in batch], dtype=torch.int64)
    return readers, labels


def _listing(items: Sequence[Any]) -> str:
    shown = ", ".join(str(item) for item in items[:_MAX_LISTED])
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return shown + more


class _LargeImageDataset(Dataset):
    """Shared part: resolved paths, integer labels, readers opened per item."""

    _paths: list[Path]
    _labels: list[int]
    _num_classes: int
    backend: str | None
    max_pixels: int | None
    #: Pyramid level, or microns per pixel, to read at (``data.level`` / ``data.mpp``; see
    #: :func:`~gigapatch.io.resolution.at_resolution`): the readers' level 0 is that level.
    level: int | None = None
    mpp: float | None = None

    def _check_types(self, where: str) -> None:
        """DataError naming the files whose extension no reader backend handles."""
        if self.backend is not None:
            return
        unknown = [p for p in self._paths if p.suffix.lower() not in SUPPORTED_EXTENSIONS]
        if unknown:
            raise DataError(
                f"{where} lists {len(unknown)} file(s) of a type gigapatch cannot read: "
                f"{_listing(unknown)}. Supported extensions: "
                f"{', '.join(sorted(SUPPORTED_EXTENSIONS))} (pass backend= to force one)."
            )

    @property
    def num_classes(self) -> int:
        """Number of classes: as given, or ``max(label) + 1`` (folders: number of classes)."""
        return self._num_classes

    @property
    def labels(self) -> list[int]:
        """The label of every item, in order (a copy)."""
        return list(self._labels)

    @property
    def paths(self) -> list[Path]:
        """The resolved image path of every item, in order (a copy)."""
        return list(self._paths)

    def reader(self, index: int) -> ImageReader:
        """A fresh lazy reader of item ``index`` (reads the header; holds no file handle).

        Raises:
            DataError: the file vanished or its header is corrupt (the message names it).
        """
        reader = open_image(self._paths[index], backend=self.backend, max_pixels=self.max_pixels)
        return at_resolution(reader, self.level, self.mpp)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> tuple[ImageReader, torch.Tensor]:
        """``(reader, label int64 ())``; the reader reads pixels only when asked."""
        return self.reader(index), torch.tensor(self._labels[index], dtype=torch.int64)


class LargeImageCSVDataset(_LargeImageDataset):
    """Large images and integer labels listed in a CSV; items are lazy readers.

    Args:
        csv_path: the CSV file (UTF-8, optional BOM; header row required).
        root: directory that relative paths are resolved against; default: the CSV's
            directory. Absolute paths are used as they are.
        num_classes: if given, every label must be in ``[0, num_classes)``; otherwise labels
            must be >= 0 and ``num_classes`` is ``max(label) + 1``.
        path_column: column holding the image path (or id, with ``suffix``).
        label_column: column holding the integer class label.
        suffix: appended to every path, e.g. ``".tiff"`` for PANDA's ``image_id`` column.
        extra_columns: more columns to keep, as stripped strings (e.g. the ``max``, ``top``
            and ``multi`` tasks of :mod:`gigapatch.synth.gigapixel`); see :meth:`extras`.
        backend: force a reader backend (see :func:`~gigapatch.io.readers.open_image`);
            default: from each file's extension, checked at construction.
        max_pixels: PNG/JPEG pixel limit passed to :func:`~gigapatch.io.readers.open_image`.

    Items are ``(reader, label)``: an :class:`~gigapatch.io.readers.ImageReader` and an
    ``int64`` tensor of shape ``()``. PANDA::

        LargeImageCSVDataset("train.csv", root="train_images", path_column="image_id",
                             label_column="isup_grade", suffix=".tiff", num_classes=6)

    Raises:
        DataError: the CSV is missing or empty, lacks a column, has an empty path, a
            non-integer or out-of-range label (the message gives the line), or lists files
            that do not exist or whose type no backend reads (the message lists them).
        ConfigError: ``num_classes`` is not a positive integer.
    """

    def __init__(
        self,
        csv_path: str | os.PathLike[str],
        root: str | os.PathLike[str] | None = None,
        num_classes: int | None = None,
        *,
        path_column: str = "path",
        label_column: str = "label",
        suffix: str = "",
        extra_columns: Sequence[str] = (),
        backend: str | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.csv_path = Path(csv_path)
        num_classes = check_num_classes(num_classes)
        if isinstance(extra_columns, str):
            extra_columns = (extra_columns,)
        self.path_column, self.label_column = path_column, label_column
        self.suffix, self.extra_columns = suffix, tuple(extra_columns)
        self.backend, self.max_pixels = backend, max_pixels
        if not self.csv_path.is_file():
            raise DataError(
                f"Dataset CSV not found: {self.csv_path}. Check the path, or generate the "
                "dataset first (e.g. gigapatch data gigapixel --out DIR)."
            )
        self.root = Path(root) if root is not None else self.csv_path.parent
        if not self.root.is_dir():
            raise DataError(
                f"Image root directory not found: {self.root} (for {self.csv_path}). Check root."
            )
        rows = read_labelled_csv(
            self.csv_path, self.root, num_classes, path_column=path_column,
            label_column=label_column, suffix=suffix, extra_columns=self.extra_columns,
            header_hint=" (or pass path_column= / label_column= to use other columns)",
        )
        self._paths, self._labels, self._extras = rows.paths, rows.labels, rows.extras
        self._num_classes = num_classes if num_classes is not None else max(self._labels) + 1
        self._check_types(f"Dataset CSV {self.csv_path}")
        missing = [path for path in self._paths if not path.is_file()]
        if missing:
            raise DataError(
                f"Dataset CSV {self.csv_path} lists {len(missing)} image file(s) that do not "
                f"exist: {_listing(missing)}. Check the paths (relative to {self.root}"
                + (f", with suffix {self.suffix!r}" if self.suffix else "")
                + ") or regenerate the dataset."
            )

    def extras(self, index: int) -> dict[str, str]:
        """The ``extra_columns`` of item ``index``: ``{column: stripped text}``."""
        return {name: values[index] for name, values in self._extras.items()}

    def extra_column(self, name: str) -> list[str]:
        """All values of extra column ``name``, in CSV order (a copy)."""
        if name not in self._extras:
            raise ConfigError(
                f"{name!r} is not one of the extra_columns {list(self._extras)} of this dataset."
            )
        return list(self._extras[name])


class LargeImageFolderDataset(_LargeImageDataset):
    """Large images in one sub-folder per class: ``root/<class>/**/<image>``.

    Classes are the sub-folder names sorted (``classes[i]`` has label ``i``); each class
    folder is searched recursively for files with a supported extension (other files, and
    names starting with ``.``, are ignored), in sorted path order.

    Args:
        root: the directory holding one folder per class.
        extensions: file extensions to take (lower-case, with the dot); default: every
            extension :func:`~gigapatch.io.readers.open_image` reads.
        backend, max_pixels: passed to :func:`~gigapatch.io.readers.open_image`.

    Attributes:
        classes: the class names, sorted; ``class_to_idx``: name -> label;
        samples: ``[(path, label), ...]``.

    Items are ``(reader, label int64 ())`` as in :class:`LargeImageCSVDataset`.

    Raises:
        DataError: ``root`` is not a directory, has no class folders, or a class folder
            holds no image (the message names them).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        extensions: Sequence[str] | None = None,
        *,
        backend: str | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.backend, self.max_pixels = backend, max_pixels
        if extensions is None:
            wanted = set(SUPPORTED_EXTENSIONS)
        else:
            wanted = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
        if not self.root.is_dir():
            raise DataError(
                f"Image folder not found: {self.root}. It must hold one sub-folder per class."
            )
        self.classes = sorted(
            entry.name for entry in self.root.iterdir()
            if entry.is_dir() and not entry.name.startswith(".")
        )
        if not self.classes:
            raise DataError(
                f"Image folder {self.root} has no class sub-folders; put the images of class "
                f"c in {self.root}/c/."
            )
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        empty = []
        for name in self.classes:
            found = sorted(
                path for path in self._walk(self.root / name) if path.suffix.lower() in wanted
            )
            if not found:
                empty.append(name)
            self.samples.extend((path, self.class_to_idx[name]) for path in found)
        if empty:
            raise DataError(
                f"Class folder(s) {_listing([str(self.root / n) for n in empty])} hold no image "
                f"file ({', '.join(sorted(wanted))}). Add images or remove the folder(s)."
            )
        self._paths = [path for path, _ in self.samples]
        self._labels = [label for _, label in self.samples]
        self._num_classes = len(self.classes)

    @staticmethod
    def _walk(directory: Path) -> list[Path]:
        files = []
        for current, dirs, names in os.walk(directory, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            files.extend(Path(current) / n for n in names if not n.startswith("."))
        return files
