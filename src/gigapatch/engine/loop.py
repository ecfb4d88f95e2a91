"""One training loop for every method.

``train(cfg)`` builds the method named in the config, trains it epoch by epoch, validates after
each epoch (torchmetrics accuracy), and keeps everything in ``<out_dir>/<name>/``:

- ``config.yaml`` — the resolved config (including settings chosen for a memory budget);
- ``metrics.csv`` — one row per epoch; ``training_curve.png`` — loss and accuracy curves;
- ``last.pt`` / ``best.pt`` — checkpoints (atomic writes; ``resume=True`` continues from
  ``last.pt`` and gives the same result as an uninterrupted run);
- ``summary.json`` — method, sizes, best/final accuracy, measured peak memory of one
  training step, time and throughput; ``train.log`` — the log.

Reproducibility: every epoch reseeds the RNGs from ``(seed, epoch)``, so data order, patch
sampling and dropout of epoch e do not depend on how the run got there.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from gigapatch.engine.checkpoint import (
    atomic_write,
    load_checkpoint,
    save_checkpoint,
    write_json,
    write_text,
)
from gigapatch.config import Config, config_from_dict, save_config
from gigapatch.data.datasets import describe_data, open_dataset
from gigapatch.data.batch import LazyBatch
from gigapatch.core.errors import ConfigError, DataError
from gigapatch.io.readers import ImageReader
from gigapatch.core.units import format_bytes, parse_bytes
from gigapatch.memory.tracker import measure_step_peak
from gigapatch.methods.base import Method, create_method
from gigapatch.tasks import Targets, TaskMetrics, batch_len

log = logging.getLogger("gigapatch")

METRIC_FIELDS = ["epoch", "train_loss", "val_loss", "val_accuracy", "lr", "epoch_seconds"]


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device = {name!r} is not a device; use auto, cpu or cuda.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = cuda but no CUDA device is available; use auto or cpu.")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def collate(
    batch: list[tuple[torch.Tensor | ImageReader, Targets]],
) -> tuple[torch.Tensor | LazyBatch, Targets]:
    """Stack ``(C, H, W)`` images and their labels (tensors, or dicts of them per task);
    lazy readers become a :class:`~gigapatch.data.batch.LazyBatch` (read on demand).
    Differing image sizes give a clear error."""
    if isinstance(batch[0][0], ImageReader):
        return LazyBatch([b[0] for b in batch]), default_collate([b[1] for b in batch])
    shapes = {tuple(img.shape) for img, _ in batch}
    if len(shapes) > 1:
        raise DataError(
            f"images in one batch differ in size {sorted(shapes)}; resize them to one size "
            "or use batch_size 1."
        )
    return torch.stack([b[0] for b in batch]), default_collate([b[1] for b in batch])


def make_loader(ds: Dataset, cfg: Config, shuffle: bool, epoch: int = 0) -> DataLoader:
    """A DataLoader whose order depends only on ``(seed, epoch)``."""
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    return DataLoader(
        ds,
        batch_size=cfg.train.batch_size,
        shuffle=shuffle,
        generator=g,
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
        persistent_workers=False,
    )


def make_optimizer(method: Method, cfg: Config) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD over all parameters of the method."""
    t = cfg.train
    params = [p for p in method.parameters() if p.requires_grad]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine/linear decay to 0 (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.inference_mode()
def evaluate(method: Method, loader: DataLoader, progress: bool = False) -> dict[str, float]:
    """Accuracy (torchmetrics) and mean loss of ``method`` on ``loader``.

    Returns ``accuracy`` (the main task's) and ``loss``; with several tasks also
    ``accuracy_<task>`` for each (see :class:`gigapatch.tasks.TaskMetrics`).
    """
    was_training = method.training
    method.eval()
    metrics = TaskMetrics(method.tasks, method.num_classes, method.multilabel, method.device)
    loss_sum, n = 0.0, 0
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=not progress):
        logits = method.predict(images)
        count = batch_len(targets)
        loss_sum += float(method.loss(logits, targets)) * count
        n += count
        metrics.update(logits, targets)
    method.train(was_training)
    return {**metrics.compute(), "loss": loss_sum / max(1, n)}


def _image_size(ds: Dataset) -> tuple[int, int, int]:
    img, _ = ds[0]
    if isinstance(img, ImageReader):
        h, w, c = img.shape
        return c, h, w
    return tuple(img.shape)  # type: ignore[return-value]


def train(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg`` and return the summary dict (also written to ``summary.json``)."""
    cfg.validate()
    run_dir = Path(cfg.train.out_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        return _train(cfg, run_dir, resume)
    finally:
        log.removeHandler(handler)
        handler.close()


def _train(cfg: Config, run_dir: Path, resume: bool) -> dict[str, Any]:
    device = resolve_device(cfg.train.device)
    state: dict[str, Any] | None = None
    if resume:
        state = load_checkpoint(run_dir / "last.pt")
        saved = config_from_dict(state["config"], source=f"{run_dir / 'last.pt'}")
        saved.train.epochs = cfg.train.epochs  # a resumed run may be extended
        cfg = saved
    seed_everything(cfg.seed)

    train_ds, val_ds = open_dataset(cfg, "train"), open_dataset(cfg, "val")
    c, h, w = _image_size(train_ds)
    if c != cfg.data.in_chans:
        raise ConfigError(
            f"images in {describe_data(cfg)} have {c} channel(s) but data.in_chans = "
            f"{cfg.data.in_chans}; set data.in_chans={c}."
        )

    if state is None and cfg.train.memory_budget is not None:
        from gigapatch.memory.budget import fit_to_budget

        fit_to_budget(cfg, (c, h, w), parse_bytes(cfg.train.memory_budget), device)

    method = create_method(cfg).to(device)
    optimizer = make_optimizer(method, cfg)
    steps_per_epoch = math.ceil(len(train_ds) / cfg.train.batch_size)
    if cfg.train.max_train_batches is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_train_batches)
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup = round(cfg.train.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.train.schedule)
    )

    history: list[dict[str, Any]] = []
    start_epoch, best_acc, best_epoch = 0, -1.0, -1
    peak_memory: int | None = None
    train_seconds, images_seen = 0.0, 0
    if state is not None:
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
        best_acc, best_epoch = state["best_accuracy"], state["best_epoch"]
        history = state["history"]
        peak_memory = state["peak_memory_bytes"]
        train_seconds, images_seen = state["train_seconds"], state["images_seen"]
        log.info("resumed %s from epoch %d", run_dir / "last.pt", start_epoch)
    save_config(cfg, run_dir / "config.yaml")
    log.info(
        "%s: method=%s encoder=%s images %dx%dx%d, %d train / %d val, device %s",
        cfg.name, cfg.method.name, cfg.model.encoder, c, h, w, len(train_ds), len(val_ds), device,
    )

    val_loader = make_loader(val_ds, cfg, shuffle=False)
    for epoch in range(start_epoch, cfg.train.epochs):
        seed_everything(cfg.seed * 1_000_003 + epoch)
        method.train()
        loader = make_loader(train_ds, cfg, shuffle=True, epoch=epoch)
        t0 = time.perf_counter()
        loss_sum, n_batches, n_images = 0.0, 0, 0
        bar = tqdm(
            loader,
            total=steps_per_epoch,
            desc=f"{cfg.name} epoch {epoch + 1}/{cfg.train.epochs}",
            disable=not cfg.train.progress,
            leave=False,
        )
        for i, (images, targets) in enumerate(bar):
            if i >= steps_per_epoch:
                break
            images = method.host_transform(images)
            measure = peak_memory is None and cfg.train.measure_memory and (
                i == 1 or steps_per_epoch == 1
            )
            if measure:
                out: dict[str, float] = {}

                def step() -> None:
                    out["loss"] = method.train_step(images, targets, optimizer)

                peak_memory = measure_step_peak(
                    step, model=method, optimizer=optimizer, device=device
                )
                loss = out["loss"]
                log.info("peak memory of one training step: %s", format_bytes(peak_memory))
            else:
                loss = method.train_step(images, targets, optimizer)
            scheduler.step()
            loss_sum += loss
            n_batches += 1
            n_images += images.shape[0]
            bar.set_postfix(loss=f"{loss_sum / n_batches:.3f}")
        bar.close()
        epoch_train_seconds = time.perf_counter() - t0
        train_seconds += epoch_train_seconds
        images_seen += n_images

        val = evaluate(method, val_loader, progress=cfg.train.progress)
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(1, n_batches),
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": time.perf_counter() - t0,
            **{f"val_{k}": v for k, v in val.items() if k.startswith("accuracy_")},
        }
        history.append(row)
        log.info(
            "epoch %d/%d  train_loss %.4f  val_loss %.4f  val_acc %.4f  (%.1fs)",
            epoch + 1, cfg.train.epochs, row["train_loss"], row["val_loss"],
            row["val_accuracy"], row["epoch_seconds"],
        )
        improved = val["accuracy"] > best_acc
        if improved:
            best_acc, best_epoch = val["accuracy"], epoch + 1
        ckpt = {
            "model": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "best_accuracy": best_acc,
            "best_epoch": best_epoch,
            "history": history,
            "config": cfg.to_dict(),
            "peak_memory_bytes": peak_memory,
            "train_seconds": train_seconds,
            "images_seen": images_seen,
        }
        save_checkpoint(ckpt, run_dir / "last.pt")
        if improved:
            save_checkpoint(ckpt, run_dir / "best.pt")
        _write_metrics(history, run_dir / "metrics.csv")
        _plot_curves(history, run_dir / "training_curve.png", cfg.name)

    summary = {
        "name": cfg.name,
        "method": cfg.method.name,
        "encoder": cfg.model.encoder,
        "image_size": h if h == w else [h, w],
        "input_size": _input_size(cfg, h, w),
        "patch_size": cfg.method.patch_size if cfg.method.name != "full" else None,
        "global_context": cfg.method.global_context if cfg.method.name != "full" else None,
        "epochs": cfg.train.epochs,
        "val_accuracy": best_acc,
        "best_epoch": best_epoch,
        "final_val_accuracy": history[-1]["val_accuracy"] if history else None,
        **(
            {"tasks": cfg.data.tasks,
             "best_epoch_task_accuracy": _task_accuracy(history[best_epoch - 1], cfg.data.tasks),
             "final_task_accuracy": _task_accuracy(history[-1], cfg.data.tasks)}
            if len(cfg.data.tasks) > 1 and history else {}
        ),
        "peak_memory_bytes": peak_memory,
        "peak_memory": format_bytes(peak_memory) if peak_memory is not None else None,
        "memory_budget": cfg.train.memory_budget,
        "train_seconds": round(train_seconds, 3),
        "images_per_second": round(images_seen / train_seconds, 3) if train_seconds else None,
        "device": str(device),
        "run_dir": str(run_dir),
    }
    write_json(run_dir / "summary.json", summary)
    return summary


def _task_accuracy(row: dict[str, Any], tasks: list[str]) -> dict[str, float | None]:
    """``{task: held-out accuracy}`` of one epoch's row of the history."""
    return {t: row.get(f"val_accuracy_{t}") for t in tasks}


def _input_size(cfg: Config, h: int, w: int) -> int | list[int]:
    """Side (or H, W) of what the network sees: downsampled for ``full`` if configured."""
    d = cfg.method.downsample_to
    if cfg.method.name == "full" and d is not None and max(h, w) > d:
        from gigapatch.methods.full import downsampled_size

        h, w = downsampled_size(h, w, d)
    return h if h == w else [h, w]


def _write_metrics(history: list[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    extra = [k for k in history[0] if k not in METRIC_FIELDS] if history else []
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS + extra)
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buf.getvalue())


def _plot_curves(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    a1.plot(epochs, [r["val_loss"] for r in history], "s-", label="validation")
    a1.set_xlabel("epoch")
    a1.set_ylabel("cross-entropy")
    a1.legend()
    a2.plot(epochs, [100 * r["val_accuracy"] for r in history], "o-", color="C2")
    a2.set_xlabel("epoch")
    a2.set_ylabel("validation accuracy (%)")
    a2.set_ylim(0, 100)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
