"""What a run writes besides checkpoints: ``metrics.csv`` and ``training_curve.png``, and
with ``train.logger: tensorboard`` TensorBoard event files (:class:`TensorBoardLog`)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from gigapatch.core.errors import ConfigError
from gigapatch.core.files import write_text
from gigapatch.plots import plt, save_figure

__all__ = ["METRIC_FIELDS", "TensorBoardLog", "Z_CACHE_FIELDS", "plot_curves", "write_metrics"]

#: The first columns of ``metrics.csv``; the task's metrics (``val_<name>``) follow.
METRIC_FIELDS = ["epoch", "train_loss", "val_loss", "lr", "epoch_seconds"]


def write_metrics(history: list[dict[str, Any]], path: Path) -> None:
    """One row per epoch: :data:`METRIC_FIELDS`, then every other key of the rows (empty
    where a row lacks it, e.g. the ``val_*`` of epochs not validated)."""
    buf = io.StringIO()
    extra = list(dict.fromkeys(k for r in history for k in r if k not in METRIC_FIELDS))
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS + extra)
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buf.getvalue())


#: The Z cache's epoch figures (PatchGD's ``method.z_cache``) and their labels in the plot.
Z_CACHE_FIELDS = {"z_staleness": "staleness (mean change of re-encoded cells)",
                  "z_refreshed": "share of cached cells re-encoded",
                  "z_corrected": "share of cached cells mapped (z_correct)",
                  "z_residual": "change left after the map (z_correct)",
                  "z_share": "refresh share (z_tolerance)"}


def plot_curves(history: list[dict[str, Any]], path: Path, title: str, monitor: str) -> None:
    """Loss curves (train, validation) and the monitored validation metric per epoch (the
    validated epochs only, with ``train.val_every`` > 1); with a Z cache, a third panel of its
    :data:`Z_CACHE_FIELDS` per epoch."""
    epochs = [r["epoch"] for r in history]
    checked = [r for r in history if "val_loss" in r]
    cache = [k for k in Z_CACHE_FIELDS if any(k in r for r in history)]
    fig, axes = plt.subplots(1, 3 if cache else 2, figsize=(13.5 if cache else 9, 3.4))
    a1, a2 = axes[:2]
    a1.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    a1.plot([r["epoch"] for r in checked], [r["val_loss"] for r in checked], "s-",
            label="validation")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.legend()
    key = f"val_{monitor}"
    values = [r.get(key) for r in checked]
    percent = monitor.startswith("accuracy")
    a2.plot([r["epoch"] for r in checked], [100 * v if percent else v for v in values], "o-",
            color="C2")
    a2.set_xlabel("epoch")
    a2.set_ylabel(f"validation {monitor}" + (" (%)" if percent else ""))
    if percent:
        a2.set_ylim(0, 100)
    if cache:
        a3 = axes[2]
        for key in cache:
            rows = [r for r in history if key in r]
            a3.plot([r["epoch"] for r in rows], [r[key] for r in rows], "o-",
                    label=Z_CACHE_FIELDS[key])
        a3.set_xlabel("epoch")
        a3.set_ylabel("Z cache")
        a3.legend(fontsize="small")
    fig.suptitle(title)
    save_figure(fig, path)


class TensorBoardLog:
    """``train.logger: tensorboard``: the epoch rows (and the loss of every step) as
    TensorBoard scalars in ``<run>/tensorboard`` (``torch.utils.tensorboard``; the
    ``tensorboard`` extra). ``metrics.csv`` and the PNG curves are written as always.

    Tags: ``loss/train``, ``loss/val``, ``loss/train_step`` (per optimizer step), ``val/<metric>``,
    ``lr/lr`` (and ``lr/encoder_lr``), ``memory/peak_step_MiB``, ``speed/images_per_second``,
    ``time/epoch_seconds``, ``zcache/staleness``, ``zcache/refreshed``, ``zcache/corrected``,
    ``zcache/residual`` and ``zcache/share`` (with PatchGD's ``method.z_cache``), all against the optimizer step (an epoch's values at its last
    step), as TensorBoard users read them. A resumed run drops what the crashed run logged
    after its last checkpoint (``purge_step``: the first step it will redo)."""

    def __init__(self, run_dir: Path, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional extra
        except ImportError:  # pragma: no cover - depends on the environment
            raise ConfigError("train.logger: tensorboard needs the tensorboard package: pip "
                              "install 'gigapatch[tensorboard]' (or use train.logger: csv).") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                    purge_step=purge_step)

    def step(self, step: int, loss: float) -> None:
        self.writer.add_scalar("loss/train_step", loss, step)

    def epoch(self, row: dict[str, Any], peak_memory: int | None, step: int) -> None:
        for key, value in row.items():
            if key == "epoch" or not isinstance(value, (int, float)):
                continue
            tag = {"train_loss": "loss/train", "val_loss": "loss/val", "lr": "lr/lr",
                   "encoder_lr": "lr/encoder_lr", "epoch_seconds": "time/epoch_seconds",
                   "images_per_second": "speed/images_per_second"}.get(key)
            if tag is None and key in Z_CACHE_FIELDS:
                tag = "zcache/" + key.removeprefix("z_")
            if tag is None:
                tag = "val/" + key.removeprefix("val_")
            self.writer.add_scalar(tag, value, step)
        if peak_memory is not None:
            self.writer.add_scalar("memory/peak_step_MiB", peak_memory / 2**20, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
