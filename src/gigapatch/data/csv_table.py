"""Read a CSV that lists images and their integer labels, with errors that name the culprit.

Shared by the in-memory (:class:`~gigapatch.data.datasets.CSVImageDataset`) and the lazy
(:class:`~gigapatch.data.large.LargeImageCSVDataset`) data sets.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gigapatch.core.errors import ConfigError, DataError

__all__ = ["LabelledRows", "check_num_classes", "read_labelled_csv", "split_table"]


@dataclass
class LabelledRows:
    """What a labelled CSV lists: resolved ``paths``, integer ``labels`` and the text of any
    ``extras`` columns (``{column: [value per row]}``), in row order."""

    paths: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    extras: dict[str, list[str]] = field(default_factory=dict)


def check_num_classes(num_classes: Any) -> int | None:
    """``num_classes`` as an int (or ``None``); ConfigError unless a positive integer."""
    if num_classes is not None and (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, (int, np.integer))
        or num_classes < 1
    ):
        raise ConfigError(f"num_classes={num_classes!r} is invalid; use an integer >= 1.")
    return None if num_classes is None else int(num_classes)


def read_labelled_csv(
    csv_path: Path,
    root: Path,
    num_classes: int | None,
    *,
    path_column: str = "path",
    label_column: str = "label",
    suffix: str = "",
    extra_columns: Sequence[str] = (),
    header_hint: str = "",
) -> LabelledRows:
    """Parse and validate the rows of ``csv_path`` (UTF-8, optional BOM, header row).

    Paths (plus ``suffix``) are resolved against ``root`` unless absolute. Labels must be
    integers in ``[0, num_classes)`` (``>= 0`` without ``num_classes``).

    Raises:
        DataError: unreadable CSV, missing columns (``header_hint`` is appended to the
            message), an empty path, a bad label (with its line), or no rows at all.
    """
    rows = LabelledRows(extras={name: [] for name in extra_columns})
    needed = [path_column, label_column, *extra_columns]
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, skipinitialspace=True)
            fields = [name.strip() for name in (reader.fieldnames or [])]
            missing = [c for c in needed if c not in fields]
            if missing:
                raise DataError(
                    f"Dataset CSV {csv_path} lacks column(s) {missing}; found columns "
                    f"{fields}. The first line must be a header naming them{header_hint}."
                )
            reader.fieldnames = fields
            for row in reader:
                line = reader.line_num
                path_text = (row.get(path_column) or "").strip()
                if not path_text:
                    raise DataError(
                        f"Dataset CSV {csv_path}, line {line}: empty {path_column!r}. Every "
                        "row needs an image path."
                    )
                label_text = (row.get(label_column) or "").strip()
                rows.labels.append(
                    _parse_label(csv_path, label_column, label_text, line, num_classes)
                )
                for name in extra_columns:
                    rows.extras[name].append((row.get(name) or "").strip())
                path = Path(path_text + suffix)
                rows.paths.append(path if path.is_absolute() else root / path)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"Dataset CSV {csv_path} is not valid UTF-8 text ({exc}). Save it as UTF-8."
        ) from exc
    except csv.Error as exc:
        raise DataError(f"Dataset CSV {csv_path} cannot be parsed: {exc}.") from exc
    if not rows.labels:
        raise DataError(
            f"Dataset CSV {csv_path} has no rows below its header; it must list at least one "
            "image."
        )
    return rows


def _parse_label(
    csv_path: Path, column: str, text: str, line: int, num_classes: int | None
) -> int:
    """The integer label on CSV line ``line``; DataError if not an integer in range."""
    digits = text.strip()
    if not (digits.isascii() and digits.isdigit()):  # int() would take "1_0", " +3", "٣"
        raise DataError(
            f"Dataset CSV {csv_path}, line {line}: {column} {text!r} is not a class index. "
            "Labels must be plain non-negative integers 0, 1, 2, ..."
        )
    label = int(digits)
    if label < 0 or (num_classes is not None and label >= num_classes):
        upper = "num_classes" if num_classes is None else str(num_classes)
        raise DataError(
            f"Dataset CSV {csv_path}, line {line}: {column} {label} is out of range "
            f"[0, {upper}). Fix the label"
            + (" (or, when training, set data.num_classes)." if num_classes is not None
               else ".")
        )
    return label


def split_table(csv_path: str | Path, val_fraction: float = 0.2, *, stratify: str | None = None,
                seed: int = 0, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Split a CSV's rows into ``<stem>_train.csv`` and ``<stem>_val.csv`` (same columns),
    next to it unless ``out_dir`` (relative image paths then need ``data.image_root``).

    ``stratify``: a column whose every value is split in the same proportion (e.g. PANDA's
    ``isup_grade``), each value's rows shuffled with ``seed``; a value with one row goes to
    training. Returns the two paths. DataError on a missing file, column, or an empty split.
    """
    csv_path = Path(csv_path)
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction = {val_fraction} must be between 0 and 1.")
    if not csv_path.is_file():
        raise DataError(f"no CSV {csv_path}.")
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, skipinitialspace=True)
        fields = [f.strip() for f in reader.fieldnames or []]
        reader.fieldnames = fields
        rows = list(reader)
    if stratify is not None and stratify not in fields:
        raise DataError(f"{csv_path} has no column {stratify!r} to stratify by (columns "
                        f"{fields}).")
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row[stratify] if stratify else "", []).append(i)
    rng = np.random.default_rng(seed)
    val: set[int] = set()
    for members in groups.values():
        order = rng.permutation(members).tolist()
        val.update(order[: int(round(val_fraction * len(order))) if len(order) > 1 else 0])
    if not val or len(val) == len(rows):
        raise DataError(f"{csv_path}: {len(rows)} rows cannot be split {1 - val_fraction:.0%} / "
                        f"{val_fraction:.0%} with both parts non-empty.")
    out = Path(out_dir) if out_dir is not None else csv_path.parent
    out.mkdir(parents=True, exist_ok=True)
    paths = out / f"{csv_path.stem}_train.csv", out / f"{csv_path.stem}_val.csv"
    for path, keep in zip(paths, (False, True)):
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(r for i, r in enumerate(rows) if (i in val) == keep)
    return paths
