"""IPS on Megapixel MNIST: held-out accuracy on a CPU, and memory flat in the number of patches.

1. **Accuracy.** Generates the CPU-sized Megapixel MNIST of ``configs/megapixel_mnist_ips_cpu.yaml``
   (500² canvases, 6 noise patterns: the paper's 50 per 1500² at the same density; 10,000
   train / 500 held-out; seeded) unless present, trains IPS with that config and reports the
   held-out accuracy of every task after the last epoch (target: ``majority`` ≥ 90 %), and at
   the best epoch, with the epochs and the time.
2. **Memory.** Peak memory of one IPS training step at N = 900 patches (1500², patch 50) and at
   N = 14,400 (6000²) with the same M and I (target: ratio ≤ 1.1): measured for real with the
   CPU config at batch 1, and estimated (fake tensors, nothing allocated; byte-equal to the
   measurement on CPU) for the paper's reference config (``configs/megapixel_mnist_ips.yaml``:
   ResNet-18 to layer2, M = I = 100, batch 16).

Writes ``benchmarks/results/ips_megapixel_mnist.{json,md}``.

    python benchmarks/ips_megapixel_mnist.py                 # ~40 min on 1 CPU thread (12 epochs)
    python benchmarks/ips_megapixel_mnist.py --memory-only   # ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from gigapatch.config import Config, load_config
from gigapatch.core.units import format_bytes
from gigapatch.engine.checkpoint import load_method
from gigapatch.engine.loop import train
from gigapatch.memory.budget import measure_method_peak
from gigapatch.memory.estimates import estimate_step_peak
from gigapatch.synth.megapixel_mnist import (DIGIT_SIDE, MegapixelMNISTDataset,
                                             generate_megapixel_mnist)

from bench_data import write_results  # benchmarks/: run as scripts

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CPU_CONFIG = ROOT / "configs" / "megapixel_mnist_ips_cpu.yaml"
GPU_CONFIG = ROOT / "configs" / "megapixel_mnist_ips.yaml"
DATA = {"side": 500, "n_noise": 6, "n_train": 10000, "n_test": 500, "seed": 0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=ROOT / "data" / "megapixel-mnist-cpu")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the CPU config, e.g. train.epochs=5")
    p.add_argument("--memory-only", action="store_true", help="skip the training run")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    return p.parse_args(argv)


def ensure_data(data_dir: Path) -> None:
    """Generate the benchmark's data set unless the same one is already there."""
    meta = data_dir / "meta.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        if all(m.get(k) == v for k, v in DATA.items()):
            print(f"using {data_dir}")
            return
    generate_megapixel_mnist(data_dir, **DATA)


def train_run(args: argparse.Namespace) -> dict[str, Any]:
    ensure_data(args.data_dir)
    cfg = load_config(CPU_CONFIG, [
        f"data.root={args.data_dir}", f"train.out_dir={args.runs}", "train.progress=false",
        *args.set,
    ])
    start = time.perf_counter()
    summary = train(cfg, overwrite=True)  # the benchmark owns its run directory
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)
    summary["selection"] = selection_quality(Path(summary["run_dir"]) / "last.pt", args.data_dir)
    summary["settings"] = {
        "canvas": DATA["side"], "noise": DATA["n_noise"], "n_train": DATA["n_train"],
        "n_test": DATA["n_test"], "patch": cfg.method.patch_size, "M": cfg.method.memory_size,
        "I": cfg.method.iter_size, "encoder": cfg.model.encoder, "D": cfg.model.latent_dim,
        "heads": cfg.model.attn_heads, "epochs": cfg.train.epochs,
        "batch": cfg.train.batch_size, "lr": cfg.train.lr,
    }
    return summary


def digit_cells(boxes: torch.Tensor, digit_yx: torch.Tensor) -> torch.Tensor:
    """Which patches touch a digit: grid boxes ``(N, 4)`` ``(y, x, h, w)`` and digit corners
    ``(K, 2)`` → ``(N,)`` bool."""
    y, x, h, w = boxes.unbind(1)
    dy, dx = digit_yx[:, 0, None], digit_yx[:, 1, None]  # (K, 1)
    overlap = (dy < y + h) & (dy + DIGIT_SIDE > y) & (dx < x + w) & (dx + DIGIT_SIDE > x)
    return overlap.any(dim=0)


def selection_quality(checkpoint: Path, data_dir: Path, batch: int = 20) -> dict[str, float]:
    """How well the trained selection finds the digits on the held-out images: the share of
    selected patches that touch a digit (precision), the share of digit patches selected
    (recall), and the share of all patches that touch a digit (what random picks would get)."""
    method, _, _ = load_method(checkpoint)
    method.eval()
    ds = MegapixelMNISTDataset(data_dir, "test")
    torch.manual_seed(0)
    hits = selected = relevant = total = 0
    for start in range(0, len(ds), batch):
        idx = range(start, min(start + batch, len(ds)))
        images = torch.stack([ds[i][0] for i in idx])
        grid = method.grid(images)
        cells = method.select(images, grid)  # (b, M)
        boxes = grid.boxes()
        for row, i in zip(cells, idx):
            digits = digit_cells(boxes, torch.from_numpy(ds.records[i].digit_yx).long())
            hits += int(digits[row].sum())
            selected += len(row)
            relevant += int(digits.sum())
            total += grid.num_patches
    return {"precision": hits / selected, "recall": hits / relevant, "base_rate": relevant / total}


def memory_rows() -> list[dict[str, Any]]:
    """Peak step memory at N = 900 and N = 14,400 patches, same M and I."""
    rows = []
    for label, path, measure, batch in (("CPU config (measured)", CPU_CONFIG, True, 1),
                                        ("paper config (estimated)", GPU_CONFIG, False, 16)):
        cfg: Config = load_config(path)
        cfg.train.batch_size = batch  # measuring batch 16 at 6000² would take minutes on a CPU
        peaks = {}
        for side in (1500, 6000):
            shape = (1, side, side)
            est = estimate_step_peak(cfg, shape)
            peaks[side] = measure_method_peak(cfg, shape) if measure else est
            print(f"{label:<26} {side}² (N = {(side // 50) ** 2:>6}): {format_bytes(peaks[side])}"
                  f" (estimate {format_bytes(est)})", flush=True)
        rows.append({
            "config": label, "encoder": cfg.model.encoder, "M": cfg.method.memory_size,
            "I": cfg.method.iter_size, "batch": cfg.train.batch_size,
            "peak_900": peaks[1500], "peak_14400": peaks[6000],
            "ratio": peaks[6000] / peaks[1500],
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"threads": args.threads}
    results["memory"] = memory_rows()
    if not args.memory_only:
        results["training"] = train_run(args)
    lines = ["| config | M | I | batch | peak at N = 900 | peak at N = 14,400 | ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in results["memory"]:
        lines.append(f"| {r['config']}, {r['encoder']} | {r['M']} | {r['I']} | {r['batch']} | "
                     f"{format_bytes(r['peak_900'])} | {format_bytes(r['peak_14400'])} | "
                     f"{r['ratio']:.3f} |")
    if "training" in results:
        t = results["training"]
        final, best = t["final_task_accuracy"], t["best_epoch_task_accuracy"]
        lines += ["", f"| task | held-out accuracy, last epoch ({t['epochs']}) | "
                  f"at the best epoch ({t['best_epoch']}) |", "|---|---|---|"]
        lines += [f"| {task} | {100 * v:.1f} % | {100 * best[task]:.1f} % |"
                  for task, v in final.items()]
        sel = t["selection"]
        lines += ["", f"settings: {t['settings']}; best epoch {t['best_epoch']}; "
                  f"training {t['train_seconds']:.0f} s, wall {t['wall_seconds']:.0f} s", "",
                  f"held-out selection (last epoch): {100 * sel['precision']:.1f} % of the "
                  f"selected patches touch a digit ({100 * sel['base_rate']:.1f} % of all "
                  f"patches do); {100 * sel['recall']:.1f} % of the digit patches are selected"]
    write_results(args.out, "ips_megapixel_mnist", results, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
