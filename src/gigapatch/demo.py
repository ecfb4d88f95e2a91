"""``gigapatch demo``: PatchGD at full resolution vs downsampled and patchwise training.

1. Generates an UltraMNIST set (unless already there): small digits on large canvases, the
   kind of detail that downsampling destroys.
2. States one memory budget for a training step. ``full`` is fitted to it by
   :func:`gigapatch.memory.budget.fit_to_budget` (the largest input side that fits); ``patchgd`` runs
   at full resolution and is checked against the same budget.
3. Trains both with the same encoder, epochs and optimizer, and prints a side-by-side table
   (held-out accuracy, measured peak training-step memory, time), also written to
   ``<out>/results.md``, ``results.json`` and ``results.png``.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gigapatch.config import Config
from gigapatch.core.files import write_json, write_text
from gigapatch.core.units import format_bytes
from gigapatch.engine.loop import train
from gigapatch.plots import plt, save_figure
from gigapatch.synth.ultramnist import generate_ultramnist

log = logging.getLogger("gigapatch")


@dataclass
class DemoSettings:
    """Everything the demo fixes: data, shared model/optimizer, budget, per-method settings."""

    side: int = 256
    n_train: int = 3000
    n_test: int = 500
    digits_per_image: tuple[int, int] = (1, 1)
    scale_range: tuple[float, float] = (0.5, 0.75)
    num_classes: int = 10
    data_seed: int = 0
    epochs: int = 10
    batch_size: int = 16
    lr: float = 3e-3
    memory_budget: str = "10MiB"
    patch_size: int = 64
    sample_fraction: float = 1 / 16
    inner_steps: int = 4
    accumulate: bool = True
    fill_chunk: int = 16
    latent_dim: int = 32
    head: str = "linear"
    head_pool: str = "max"
    patchwise_sample_fraction: float = 0.5
    patchwise_pool: str = "max"


QUICK = DemoSettings(side=128, n_train=48, n_test=24, epochs=1, batch_size=8,
                     memory_budget="6MiB", patch_size=32, sample_fraction=1 / 16)


def demo_configs(s: DemoSettings, data_dir: Path, out_dir: Path) -> list[Config]:
    """The three run configs: ``full`` (downsampled to the budget), ``patchgd``, ``patchwise``."""
    base = Config(seed=0)
    base.data.train_csv = str(data_dir / "train.csv")
    base.data.val_csv = str(data_dir / "test.csv")
    base.data.num_classes = s.num_classes
    base.data.in_chans = 1
    base.model.encoder = "tiny_cnn"
    base.model.latent_dim = s.latent_dim
    base.model.head_width = s.latent_dim
    base.model.head = s.head
    base.model.head_pool = s.head_pool
    base.train.epochs = s.epochs
    base.train.batch_size = s.batch_size
    base.train.lr = s.lr
    base.train.warmup_epochs = 0.3
    base.train.memory_budget = s.memory_budget
    base.train.out_dir = str(out_dir)

    full = copy.deepcopy(base)
    full.name = "full_downsampled"
    full.method.name = "full"

    pgd = copy.deepcopy(base)
    pgd.name = "patchgd"
    pgd.method.name = "patchgd"
    pgd.method.patch_size = s.patch_size
    pgd.method.sample_fraction = s.sample_fraction
    pgd.method.inner_steps = s.inner_steps
    pgd.method.fill_chunk = s.fill_chunk
    pgd.method.accumulate = s.accumulate

    pw = copy.deepcopy(base)
    pw.name = "patchwise"
    pw.method.name = "patchwise"
    pw.method.patch_size = s.patch_size
    pw.method.sample_fraction = s.patchwise_sample_fraction
    pw.method.pool = s.patchwise_pool
    pw.method.fill_chunk = s.fill_chunk
    return [full.validate(), pgd.validate(), pw.validate()]


def _ensure_data(s: DemoSettings, data_dir: Path) -> None:
    wanted = dict(
        n_train=s.n_train, n_test=s.n_test, side=s.side,
        digits_per_image=list(s.digits_per_image), scale_range=list(s.scale_range),
        num_classes=s.num_classes, seed=s.data_seed,
    )
    stamp = data_dir / "demo.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        log.info("using the demo data already in %s", data_dir)
        return
    log.info("generating UltraMNIST demo data in %s", data_dir)
    generate_ultramnist(
        data_dir, n_train=s.n_train, n_test=s.n_test, side=s.side,
        digits_per_image=s.digits_per_image, scale_range=s.scale_range,
        num_classes=s.num_classes, seed=s.data_seed,
    )
    write_json(stamp, wanted)


def results_table(summaries: list[dict[str, Any]], budget: str) -> str:
    """A Markdown table of the demo's runs."""
    lines = [
        f"| method | input seen by the network | held-out accuracy | peak step memory "
        f"(budget {budget}) | train time | images/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in summaries:
        seen = r["input_size"]
        seen = f"{seen}×{seen} px" if isinstance(seen, int) else f"{seen[0]}×{seen[1]} px"
        if r["method"] == "patchgd":
            seen += f" (patches of {r['patch_size']} px)"
        elif r["method"] == "patchwise":
            seen += f" (each patch of {r['patch_size']} px alone, {r['pool']}-pooled)"
        lines.append(
            f"| {r['method']} | {seen} | {100 * r['final_val_accuracy']:.1f} % | "
            f"{format_bytes(r['peak_memory_bytes'])} | {r['train_seconds']:.0f} s | "
            f"{r['images_per_second']:.1f} |"
        )
    return "\n".join(lines)


def _plot(summaries: list[dict[str, Any]], path: Path) -> None:
    names = [f"{r['method']}\n{r['input_size']} px" for r in summaries]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
    colors = [f"C{i}" for i in (1, 0, 2)][: len(summaries)]
    a1.bar(names, [100 * r["final_val_accuracy"] for r in summaries], color=colors)
    a1.set_ylabel("held-out accuracy (%)")
    a1.set_ylim(0, 100)
    a2.bar(names, [r["peak_memory_bytes"] / 2**20 for r in summaries], color=colors)
    a2.set_ylabel("peak training-step memory (MiB)")
    save_figure(fig, path)


def run_demo(
    out_dir: str | Path = "runs/demo",
    data_dir: str | Path = "data/ultramnist-demo",
    quick: bool = False,
    settings: DemoSettings | None = None,
) -> list[dict[str, Any]]:
    """Run the demo; returns the run summaries (full, patchgd, patchwise)."""
    s = settings or (QUICK if quick else DemoSettings())
    out_dir, data_dir = Path(out_dir), Path(data_dir)
    t0 = time.perf_counter()
    _ensure_data(s, data_dir)
    summaries = []
    for cfg in demo_configs(s, data_dir, out_dir):
        log.info("training %s …", cfg.name)
        summaries.append(train(cfg, overwrite=True))  # the demo owns its runs
    table = results_table(summaries, s.memory_budget)
    text = (
        f"UltraMNIST {s.side}×{s.side}, {s.digits_per_image[0]}–{s.digits_per_image[1]} digits "
        f"of {28 * s.scale_range[0]:.0f}–{28 * s.scale_range[1]:.0f} px, {s.n_train} train / "
        f"{s.n_test} held-out images, tiny_cnn encoder, {s.epochs} epochs, one memory budget "
        f"of {s.memory_budget} per training step.\n\n{table}\n"
    )
    write_text(out_dir / "results.md", text)
    write_json(out_dir / "results.json", {"settings": s.__dict__, "runs": summaries})
    _plot(summaries, out_dir / "results.png")
    print("\n" + text)
    print(f"(demo took {time.perf_counter() - t0:.0f} s; runs, curves and checkpoints in {out_dir})")
    return summaries
