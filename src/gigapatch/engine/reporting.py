"""What a run writes besides checkpoints: ``metrics.csv`` and ``training_curve.png``."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from gigapatch.core.files import write_text
from gigapatch.plots import plt, save_figure

__all__ = ["METRIC_FIELDS", "plot_curves", "write_metrics"]

#: The first columns of ``metrics.csv``; the task's metrics (``val_<name>``) follow.
METRIC_FIELDS = ["epoch", "train_loss", "val_loss", "lr", "epoch_seconds"]


def write_metrics(history: list[dict[str, Any]], path: Path) -> None:
    """One row per epoch: :data:`METRIC_FIELDS`, then every other key of the rows."""
    buf = io.StringIO()
    extra = [k for k in history[0] if k not in METRIC_FIELDS] if history else []
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS + extra)
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buf.getvalue())


def plot_curves(history: list[dict[str, Any]], path: Path, title: str, monitor: str) -> None:
    """Loss curves (train, validation) and the monitored validation metric per epoch."""
    epochs = [r["epoch"] for r in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    a1.plot(epochs, [r["val_loss"] for r in history], "s-", label="validation")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.legend()
    key = f"val_{monitor}"
    values = [r.get(key) for r in history]
    percent = monitor.startswith("accuracy")
    a2.plot(epochs, [100 * v if percent else v for v in values], "o-", color="C2")
    a2.set_xlabel("epoch")
    a2.set_ylabel(f"validation {monitor}" + (" (%)" if percent else ""))
    if percent:
        a2.set_ylim(0, 100)
    fig.suptitle(title)
    save_figure(fig, path)
