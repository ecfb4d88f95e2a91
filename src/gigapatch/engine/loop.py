"""One training loop for every method and task.

``train(cfg)`` builds the task and the method named in the config, trains epoch by epoch
(through a :class:`~gigapatch.step.context.StepContext`), validates after each epoch with the
task's metrics, and keeps everything in ``<out_dir>/<name>/``:

- ``config.yaml`` — the resolved config (including settings chosen for a memory budget);
- ``metrics.csv`` — one row per epoch; ``training_curve.png`` — loss and monitored metric;
- ``last.pt`` / ``best.pt`` — checkpoints (atomic writes; ``resume=True`` continues from
  ``last.pt`` and gives the same result as an uninterrupted run); ``best.pt`` is the epoch
  with the best ``task.monitor``;
- ``summary.json`` — method, task, sizes, best/final metrics, measured peak memory of one
  training step (``peak_memory``, and ``peak_device_memory`` without PatchGD's
  host-resident maps Z: what a GPU would hold), time, throughput and ``world_size``;
  ``train.log`` — the log.

A run directory that already holds a run (``last.pt``, ``best.pt``, ``metrics.csv`` or
``summary.json``) is never overwritten by accident: ``train`` refuses unless it resumes that
run (``resume=True``) or is told to replace it (``overwrite=True``, which deletes the old
run's files first; other files in the directory are left alone).

Several processes (torchrun): each takes its share of every batch (the processes' batches
together are one batch of ``world_size`` × ``train.batch_size`` images), gradients are
synchronised once per update, validation metrics are reduced over all processes, and only
rank 0 writes the run directory and logs.

Reproducibility: every epoch reseeds the RNGs from ``(seed, epoch, rank)``, and the data
order depends only on ``(seed, epoch)``, so epoch e does not depend on how the run got there
nor on the number of DataLoader workers.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from gigapatch.config import Config, config_from_dict, save_config
from gigapatch.core.errors import ConfigError, TrainingDiverged
from gigapatch.core.files import remove_orphans, write_json
from gigapatch.core.units import format_bytes, parse_bytes
from gigapatch.data.batch import batches, make_loader
from gigapatch.data.datasets import check_images, describe_data, open_dataset
from gigapatch.engine import distributed
from gigapatch.engine.checkpoint import load_checkpoint, save_checkpoint
from gigapatch.engine.reporting import TensorBoardLog, plot_curves, write_metrics
from gigapatch.io.readers import ImageReader
from gigapatch.memory.budget import fit_to_budget
from gigapatch.memory.tracker import measure_step_peaks
from gigapatch.methods import Method, create_method
from gigapatch.step import StepContext, autocast, make_optimizer, make_scheduler
from gigapatch.tasks import Task, create_task

log = logging.getLogger("gigapatch")

__all__ = ["RUN_FILES", "evaluate", "loader_for", "resolve_device", "seed_everything", "train"]

#: The files a run writes into its directory (``--overwrite`` deletes these, nothing else).
RUN_FILES = ("last.pt", "best.pt", "metrics.csv", "summary.json", "config.yaml", "train.log",
             "training_curve.png")
#: Files whose presence means the directory holds a run.
_RUN_MARKERS = ("last.pt", "best.pt", "metrics.csv", "summary.json")


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


def loader_for(ds: Dataset, cfg: Config, task: Task, *, shuffle: bool, epoch: int = 0,
               place: distributed.Dist | None = None) -> DataLoader:
    """The loader of this process's share of ``ds``; its order depends on ``(seed, epoch)``."""
    place = place or distributed.Dist()
    return make_loader(ds, cfg.train.batch_size, task.collate, shuffle=shuffle,
                       seed=cfg.seed * 100_003 + epoch, num_workers=cfg.data.num_workers,
                       rank=place.rank, world=place.world)


@torch.inference_mode()
def evaluate(method: Method, task: Task, loader: DataLoader, *, precision: str = "32",
             progress: bool = False) -> dict[str, float]:
    """The task's metrics and the mean loss of ``method`` on ``loader`` (eval mode, the
    configured precision); with several processes, reduced over all of them."""
    was_training = method.training
    method.eval()
    metrics = task.metrics().to(method.device)
    loss_sum, n = 0.0, 0
    bar = tqdm(total=len(loader), desc="eval", leave=False, disable=not progress)
    for images, targets in batches(loader):
        with autocast(precision, method.device):
            output = method.predict(images)
            loss = task.loss(output, targets)
        count = task.batch_size(targets)
        loss_sum += float(loss) * count
        n += count
        metrics.update(_float(output), targets)
        bar.update()
    bar.close()
    method.train(was_training)
    loss_sum, n = distributed.all_sum([loss_sum, float(n)], method.device)
    values = {k: float(v) for k, v in metrics.compute().items()}
    return {**values, "loss": loss_sum / max(1.0, n)}


def _float(output: Any) -> Any:
    """Outputs as float32 for the metrics (bf16 logits otherwise lose their ties)."""
    if isinstance(output, torch.Tensor):
        return output.float()
    if isinstance(output, dict):
        return {k: _float(v) for k, v in output.items()}
    return output


def _image_size(ds: Dataset) -> tuple[int, int, int]:
    img, _ = ds[0]
    if isinstance(img, ImageReader):
        h, w, c = img.shape
        return c, h, w
    return tuple(img.shape)  # type: ignore[return-value]


class _Forward(logging.Handler):
    """Hands records at or above its level to the root logger's handlers (what propagation
    would have done at the logger's original level)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger().handle(record)


def _claim(run_dir: Path, resume: bool, overwrite: bool, main: bool) -> None:
    """Refuse to write over a run held in ``run_dir`` unless resuming it or told to
    overwrite it (then, on the main process, delete that run's files)."""
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other: --resume continues the run "
                          f"in {run_dir}, --overwrite replaces it. Choose one.")
    if resume:
        return
    held = [f for f in _RUN_MARKERS if (run_dir / f).exists()]
    if not held:
        return
    if not overwrite:
        raise ConfigError(
            f"the run directory {run_dir} already holds a run ({', '.join(held)}); training "
            "again would overwrite it. Continue it with --resume (train(cfg, resume=True)), "
            "give this run another name (--name NAME, or name=... in the config), or replace "
            "the old run with --overwrite (train(cfg, overwrite=True))."
        )
    if main:
        for f in RUN_FILES:
            (run_dir / f).unlink(missing_ok=True)
        log.info("--overwrite: deleted the previous run's files in %s", run_dir)


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train ``cfg`` and return the summary dict (also written to ``summary.json``).

    ``resume``: continue the run in ``<out_dir>/<name>`` from its ``last.pt``. ``overwrite``:
    replace a run already there (without it, an existing run is refused with a
    :class:`ConfigError`). Under torchrun (``WORLD_SIZE`` > 1) joins the process group first
    and leaves it at the end; every process returns the same summary. ``cfg`` itself is left
    as it is: the run works on a copy (what the data fill in, e.g. ``data.category_ids``, goes
    to the run's saved config)."""
    cfg = copy.deepcopy(cfg).validate()
    place, device = distributed.setup(resolve_device(cfg.train.device))
    run_dir = Path(cfg.train.out_dir) / cfg.name
    try:
        _claim(run_dir, resume, overwrite, place.main)
    except BaseException:
        if place.enabled:
            distributed.teardown()
        raise
    handler: logging.Handler | None = None
    level, propagate, forward = log.level, log.propagate, None
    if not place.main:
        log.setLevel(logging.WARNING)  # only rank 0 logs progress
    elif log.getEffectiveLevel() > logging.INFO:
        # Started from Python with logging at WARNING (the default): train.log still gets
        # the INFO lines; what reaches the caller's handlers stays as it was.
        forward = _Forward(log.getEffectiveLevel())
        log.setLevel(logging.INFO)
        log.propagate = False
        log.addHandler(forward)
    if place.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        for orphan in remove_orphans(run_dir):  # left by a write that a crash interrupted
            log.info("removed the unfinished file %s", orphan)
    try:
        return _train(cfg, run_dir, resume, place, device)
    finally:
        log.setLevel(level)
        log.propagate = propagate
        if forward is not None:
            log.removeHandler(forward)
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        if place.enabled:
            distributed.teardown()


def _train(cfg: Config, run_dir: Path, resume: bool, place: distributed.Dist,
           device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] | None = None
    if resume:
        state = load_checkpoint(run_dir / "last.pt")
        saved = config_from_dict(state["config"], source=f"{run_dir / 'last.pt'}")
        saved.train.epochs = cfg.train.epochs  # a resumed run may be extended
        cfg = saved
    seed_everything(cfg.seed)
    task = create_task(cfg)

    train_ds, val_ds = open_dataset(cfg, "train"), open_dataset(cfg, "val")
    for split, ds in (("train", train_ds), ("val", val_ds)):  # headers, before any epoch
        check_images(ds, cfg.data.in_chans, describe_data(cfg, split), progress=place.main)
    c, h, w = _image_size(train_ds)
    if state is None and cfg.train.memory_budget is not None:
        fit_to_budget(cfg, (c, h, w), parse_bytes(cfg.train.memory_budget), device)

    method = create_method(cfg, task).to(device)
    method.set_run_dir(run_dir)
    ddp = distributed.wrap(method, place, device, cfg.train.sync_batchnorm)
    optimizer = make_optimizer(method, cfg, method.encoder_parameters())
    ctx = StepContext(method, optimizer, precision=cfg.train.precision,
                      grad_clip=cfg.train.grad_clip, ddp=ddp, device=device)
    per_process = math.ceil(len(train_ds) / place.world)
    steps_per_epoch = math.ceil(per_process / cfg.train.batch_size)
    if cfg.train.max_train_batches is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.train.max_train_batches)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    method.set_epoch_length(steps_per_epoch)

    history: list[dict[str, Any]] = []
    start_epoch, best_value, best_epoch = 0, None, -1
    peak_memory: int | None = None
    peak_device: int | None = None  # without the host-resident maps Z (what a GPU holds)
    train_seconds, images_seen = 0.0, 0
    if state is not None:
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ctx.load_state_dict(state.get("context", {}))
        method.load_training_state(state.get("method_state", {}))
        start_epoch = state["epoch"] + 1
        best_value, best_epoch = state["best_value"], state["best_epoch"]
        history = state["history"]
        peak_memory = state["peak_memory_bytes"]
        peak_device = state.get("peak_device_memory_bytes", peak_memory)
        train_seconds, images_seen = state["train_seconds"], state["images_seen"]
        best_value, best_epoch = _best_on_disk(run_dir, best_value, best_epoch)
        log.info("resumed %s from epoch %d", run_dir / "last.pt", start_epoch)
    if place.main:
        save_config(cfg, run_dir / "config.yaml")
    log.info(
        "%s: task=%s method=%s encoder=%s images %dx%dx%d, %d train / %d val, device %s%s",
        cfg.name, cfg.task.kind, cfg.method.name, cfg.model.encoder, c, h, w, len(train_ds),
        len(val_ds), device, f", {place.world} processes" if place.enabled else "",
    )

    val_loader = loader_for(val_ds, cfg, task, shuffle=False, place=place)
    progress = cfg.train.progress and place.main
    board = (TensorBoardLog(run_dir, start_epoch * steps_per_epoch + 1 if resume else None)
             if cfg.train.logger == "tensorboard" and place.main else None)
    for epoch in range(start_epoch, cfg.train.epochs):
        seed_everything(cfg.seed * 1_000_003 + epoch + 7_919 * place.rank)
        method.train()
        loader = loader_for(train_ds, cfg, task, shuffle=True, epoch=epoch, place=place)
        t0 = time.perf_counter()
        loss_sum, n_batches, n_images = 0.0, 0, 0
        bar = tqdm(total=steps_per_epoch, desc=f"{cfg.name} epoch {epoch + 1}/{cfg.train.epochs}",
                   disable=not progress, leave=False)
        for i, (images, targets) in enumerate(batches(loader)):
            if i >= steps_per_epoch:
                break
            images = method.host_transform(images)
            measure = peak_memory is None and cfg.train.measure_memory and (
                i == 1 or steps_per_epoch == 1
            )
            try:
                if measure:
                    out: dict[str, float] = {}

                    def step() -> None:
                        out["loss"] = method.train_step(images, targets, ctx)

                    peaks = measure_step_peaks(
                        step, model=method, optimizer=optimizer, device=device
                    )
                    peak_memory, peak_device = peaks.total, peaks.device
                    loss = out["loss"]
                    log.info("peak memory of one training step: %s%s", format_bytes(peak_memory),
                             f" ({format_bytes(peak_device)} without the host-resident maps Z)"
                             if peaks.host_maps else "")
                else:
                    loss = method.train_step(images, targets, ctx)
            except TrainingDiverged as err:
                raise _diverged(cfg, run_dir, epoch, i, str(err)) from None
            scheduler.step()
            if board is not None:
                board.step(epoch * steps_per_epoch + i + 1, loss)
            loss_sum += loss
            n_batches += 1
            n_images += images.shape[0]
            bar.update()
            bar.set_postfix(loss=f"{loss_sum / n_batches:.3f}")
        bar.close()
        loss_sum, n_batches, n_images = distributed.all_sum(
            [loss_sum, float(n_batches), float(n_images)], device)
        epoch_train_seconds = time.perf_counter() - t0
        train_seconds += epoch_train_seconds
        images_seen += int(n_images)

        validated = (epoch + 1) % cfg.train.val_every == 0 or epoch + 1 == cfg.train.epochs
        val = evaluate(method, task, val_loader, precision=cfg.train.precision,
                       progress=progress) if validated else {}
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(1.0, n_batches),
            **({"val_loss": val["loss"]} if validated else {}),
            "lr": optimizer.param_groups[0]["lr"],
            **({"encoder_lr": optimizer.param_groups[1]["lr"]}
               if len(optimizer.param_groups) > 1 else {}),
            "epoch_seconds": time.perf_counter() - t0,
            "images_per_second": n_images / epoch_train_seconds if epoch_train_seconds else 0.0,
            **{f"val_{k}": v for k, v in val.items() if k != "loss"},
        }
        stats = method.epoch_stats(lambda counts: distributed.all_sum(counts, method.device))
        row.update(stats)
        history.append(row)
        if validated:
            log.info(
                "epoch %d/%d  train_loss %.4f  val_loss %.4f  val_%s %.4f  (%.1fs)",
                epoch + 1, cfg.train.epochs, row["train_loss"], row["val_loss"], task.monitor,
                val[task.monitor], row["epoch_seconds"],
            )
        else:
            log.info("epoch %d/%d  train_loss %.4f  (%.1fs; validated every %d epochs)",
                     epoch + 1, cfg.train.epochs, row["train_loss"], row["epoch_seconds"],
                     cfg.train.val_every)
        if stats:
            log.info("epoch %d/%d  %s", epoch + 1, cfg.train.epochs,
                     "  ".join(f"{k} {v:.4g}" for k, v in stats.items()))
        if not all(bool(torch.isfinite(p).all()) for p in method.parameters()):
            raise _diverged(cfg, run_dir, epoch, steps_per_epoch - 1, "a parameter is not finite")
        improved = validated and task.better(val[task.monitor], best_value)
        if improved:
            best_value, best_epoch = val[task.monitor], epoch + 1
        if place.main:
            ckpt = {
                "model": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "context": ctx.state_dict(),
                "epoch": epoch,
                "best_value": best_value,
                "best_epoch": best_epoch,
                "history": history,
                "config": cfg.to_dict(),
                "peak_memory_bytes": peak_memory,
                "peak_device_memory_bytes": peak_device,
                "train_seconds": train_seconds,
                "images_seen": images_seen,
            }
            if improved:  # best.pt first: last.pt never names a best epoch best.pt lacks
                save_checkpoint(ckpt, run_dir / "best.pt")
            # the method's own state (e.g. PatchGD's Z cache) only in last.pt; with several
            # processes each holds its own part, rebuilt after a resume
            extra = method.training_state() if not place.enabled else {}
            save_checkpoint({**ckpt, "method_state": extra} if extra else ckpt,
                            run_dir / "last.pt")
            write_metrics(history, run_dir / "metrics.csv")
            if board is not None:
                board.epoch(row, peak_memory, (epoch + 1) * steps_per_epoch)
            plot_curves(history, run_dir / "training_curve.png", cfg.name, task.monitor)
        distributed.barrier()

    if board is not None:
        board.close()
    summary = _summary(cfg, task, method, history, best_value, best_epoch, (h, w))
    summary.update({
        "peak_memory_bytes": peak_memory,
        "peak_memory": format_bytes(peak_memory) if peak_memory is not None else None,
        "peak_device_memory_bytes": peak_device,
        "peak_device_memory": format_bytes(peak_device) if peak_device is not None else None,
        "memory_budget": cfg.train.memory_budget,
        "precision": cfg.train.precision,
        "train_seconds": round(train_seconds, 3),
        "images_per_second": round(images_seen / train_seconds, 3) if train_seconds else None,
        "device": str(device),
        "world_size": place.world,
        "run_dir": str(run_dir),
    })
    if place.main:
        write_json(run_dir / "summary.json", summary)
    return summary


def _best_on_disk(run_dir: Path, best_value: float | None, best_epoch: int
                  ) -> tuple[float | None, int]:
    """The best epoch and value as ``best.pt`` itself records them.

    ``best.pt`` is written before ``last.pt``, so a crash between the two leaves a
    ``best.pt`` one epoch ahead of what ``last.pt`` names; ``best.pt`` is then the truth (the
    resumed run retrains that epoch and keeps ``best.pt`` unless it does better). A missing
    ``best.pt`` is rewritten by the next epoch."""
    path = run_dir / "best.pt"
    if not path.is_file():
        if best_epoch > 0:
            log.warning("%s is missing (last.pt names epoch %d); the next epoch writes it",
                        path, best_epoch)
        return None, -1
    saved = load_checkpoint(path)
    epoch, value = saved["epoch"] + 1, saved["best_value"]
    if epoch != best_epoch:
        log.warning("%s holds epoch %d where last.pt names epoch %d (a crash between the two "
                    "writes); keeping best.pt's epoch %d as the best", path, epoch, best_epoch,
                    epoch)
    return value, epoch


def _diverged(cfg: Config, run_dir: Path, epoch: int, step: int, what: str) -> TrainingDiverged:
    """The error that stops a run whose loss or gradients became NaN/inf."""
    kept = (f"{run_dir / 'last.pt'} keeps the last finite state (epoch {epoch}) and best.pt "
            "the best epoch before it" if epoch > 0 else "no checkpoint was written (epoch 1 did not "
            "finish)")
    t = cfg.train
    return TrainingDiverged(
        f"training diverged in epoch {epoch + 1}, step {step + 1}: {what}. Stopped; {kept}. "
        f"Try a lower train.lr (now {t.lr:g}), gradient clipping (train.grad_clip=1.0"
        f"{'' if t.grad_clip is None else f', now {t.grad_clip:g}'}), a longer warm-up "
        f"(train.warmup_epochs, now {t.warmup_epochs:g})"
        + (f" or train.precision=32 (now {t.precision})" if t.precision != "32" else "")
        + "; then train again with --overwrite or under a new name."
    )


def _summary(cfg: Config, task: Task, method: Method, history: list[dict[str, Any]],
             best_value: float | None, best_epoch: int, hw: tuple[int, int]
             ) -> dict[str, Any]:
    """The run's facts and figures: best and final held-out metrics."""
    h, w = hw
    best = history[best_epoch - 1] if 0 < best_epoch <= len(history) else {}
    last = history[-1] if history else {}
    metrics = [k[len("val_"):] for k in last if k.startswith("val_") and k != "val_loss"]
    out: dict[str, Any] = {
        "name": cfg.name,
        "task": cfg.task.kind,
        "method": cfg.method.name,
        "encoder": cfg.model.encoder,
        "image_size": h if h == w else [h, w],
        "input_size": h if h == w else [h, w],
        **method.summary(hw),
        "epochs": cfg.train.epochs,
        "monitor": task.monitor,
        "best_value": best_value,
        "best_epoch": best_epoch,
    }
    for m in metrics:
        out[f"val_{m}"] = best.get(f"val_{m}")
        out[f"final_val_{m}"] = last.get(f"val_{m}")
    heads = getattr(task, "heads", [])
    if len(heads) > 1 and history:
        out["tasks"] = heads
        out["best_epoch_task_accuracy"] = {t: best.get(f"val_accuracy_{t}") for t in heads}
        out["final_task_accuracy"] = {t: last.get(f"val_accuracy_{t}") for t in heads}
    return out
