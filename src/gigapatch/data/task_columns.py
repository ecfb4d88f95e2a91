"""Several labels per image from a CSV: one column per task.

A labelled CSV (``path,label`` plus more columns) can carry several tasks, e.g. the
``majority,max,top,multi`` columns that :mod:`gigapatch.synth.gigapixel` writes. With
``data.tasks`` set, :class:`TaskColumns` turns the columns named by the tasks into the target
dicts the methods train on. The task ``label`` means the ``label`` column.

Column formats: a single-label task holds one class index; a multi-label task
(``data.multilabel``) holds the classes present, separated by spaces or semicolons (``"2 5 7"``,
empty for none).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from gigapatch.core.errors import DataError

__all__ = ["LABEL_TASK", "TaskColumns", "parse_task_column"]

LABEL_TASK = "label"
"""The task that reads the CSV's ``label`` column."""


def parse_task_column(
    values: Sequence[str], task: str, num_classes: int, multilabel: bool, source: Path
) -> torch.Tensor:
    """Targets of one task from its column's text, one value per row.

    Returns:
        ``int64 (N,)`` class indices, or ``float32 (N, num_classes)`` multi-hot rows for a
        multi-label task.

    Raises:
        DataError: a value that is not a class in ``0..num_classes-1``; names the CSV, the
            column, the data row and the value.
    """
    out = torch.zeros((len(values), num_classes) if multilabel else (len(values),),
                      dtype=torch.float32 if multilabel else torch.int64)
    for row, text in enumerate(values):
        parts = [p for p in re.split(r"[\s;]+", text.strip()) if p]
        ok = all(p.isascii() and p.isdigit() and int(p) < num_classes for p in parts)
        if not ok or (not multilabel and len(parts) != 1):
            kind = ("class indices separated by spaces" if multilabel
                    else "one class index")
            raise DataError(
                f"{source}: column {task!r}, data row {row + 1}: {text!r} is not {kind} in "
                f"0..{num_classes - 1}. Fix the CSV, or set data.num_classes / data.multilabel."
            )
        if multilabel:
            out[row, [int(p) for p in parts]] = 1.0
        else:
            out[row] = int(parts[0])
    return out


class TaskColumns(Dataset):
    """A labelled-CSV data set whose targets are ``{task: tensor}`` read from CSV columns.

    Args:
        base: the data set (items ``(image or reader, label)``); it must have read the task
            columns as ``extra_columns`` (see :meth:`extra_column`) and know its ``labels``.
        tasks: the tasks, in order; ``label`` reads the label column.
        multilabel: the multi-label tasks (multi-hot targets).
        num_classes: classes per task.

    Items are ``(image, {task: int64 () or float32 (num_classes,)})``.
    """

    def __init__(
        self, base: Any, tasks: Sequence[str], multilabel: Sequence[str], num_classes: int
    ) -> None:
        self.base = base
        source = Path(base.csv_path)
        self._targets = {
            task: parse_task_column(
                [str(v) for v in base.labels] if task == LABEL_TASK else base.extra_column(task),
                task, num_classes, task in multilabel, source,
            )
            for task in tasks
        }

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name: str) -> Any:  # paths, num_classes, ... of the wrapped set
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, torch.Tensor]]:
        image, _ = self.base[index]
        return image, {task: values[index] for task, values in self._targets.items()}
