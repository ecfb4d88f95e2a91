"""Patchwise training on Megapixel MNIST, beside IPS: what a patch alone can learn.

Trains ``configs/megapixel_mnist_patchwise_cpu.yaml`` (the data, encoder, patch size, batch,
optimizer and epochs of ``configs/megapixel_mnist_ips_cpu.yaml``; every patch carries its
image's four labels, patch logits pooled per image) on the data set of
``benchmarks/ips_megapixel_mnist.py`` (generated unless present) and reports the held-out
accuracy of every task after the last epoch and at the best epoch, with the time and peak
step memory. With ``--with-ips`` it also trains IPS in the same run (about 40 minutes more)
and puts both in one table; without it the table shows IPS from
``benchmarks/results/ips_megapixel_mnist.json`` when that file holds a training run.

Writes ``benchmarks/results/patchwise_megapixel_mnist.{json,md}``.

    python benchmarks/patchwise_megapixel_mnist.py --threads 1          # ~15 min
    python benchmarks/patchwise_megapixel_mnist.py --threads 1 --with-ips
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from gigapatch.config import load_config
from gigapatch.core.units import format_bytes
from gigapatch.engine.loop import train
from bench_data import write_results  # benchmarks/: run as scripts
from ips_megapixel_mnist import CPU_CONFIG as IPS_CONFIG
from ips_megapixel_mnist import DATA, ROOT, ensure_data

RESULTS = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "configs" / "megapixel_mnist_patchwise_cpu.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=ROOT / "data" / "megapixel-mnist-cpu")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the patchwise config, e.g. method.pool=max")
    p.add_argument("--with-ips", action="store_true", help="also train IPS in this run")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def run(config: Path, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """Train one config on the benchmark data; its summary plus the wall time."""
    cfg = load_config(config, [f"data.root={args.data_dir}", f"train.out_dir={args.runs}",
                               "train.progress=false", *extra])
    start = time.perf_counter()
    summary = train(cfg, overwrite=True)  # the benchmark owns its run directory
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)
    m = cfg.method
    summary["settings"] = {"method": m.name, "patch": m.patch_size, "encoder": cfg.model.encoder,
                           "epochs": cfg.train.epochs, "batch": cfg.train.batch_size,
                           "sample_fraction": m.sample_fraction, "pool": m.pool,
                           "patch_weighting": m.patch_weighting}
    return summary


def table(runs: dict[str, dict[str, Any]]) -> list[str]:
    """One row per task, one column per method (last epoch; best epoch in brackets)."""
    names = list(runs)
    lines = ["| task | " + " | ".join(f"{n}: last epoch (best epoch)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    tasks = list(next(iter(runs.values()))["final_task_accuracy"])
    for task in tasks:
        cells = [f"{100 * r['final_task_accuracy'][task]:.1f} % "
                 f"({100 * r['best_epoch_task_accuracy'][task]:.1f} %)" for r in runs.values()]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    for n, r in runs.items():
        lines.append("")
        lines.append(f"{n}: {r['settings']}; best epoch {r['best_epoch']}; training "
                     f"{r['train_seconds']:.0f} s ({r['images_per_second']:.0f} images/s), peak "
                     f"step memory {format_bytes(r['peak_memory_bytes'])}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ensure_data(args.data_dir)
    runs: dict[str, dict[str, Any]] = {"patchwise": run(CONFIG, args, args.set)}
    source = "not in this run (pass --with-ips, or see benchmarks/ips_megapixel_mnist.py)"
    if args.with_ips:
        runs["ips"] = run(IPS_CONFIG, args, [])
        source = "this run"
    else:
        ips = RESULTS / "ips_megapixel_mnist.json"
        saved = json.loads(ips.read_text()).get("training") if ips.is_file() else None
        if saved:
            runs["ips"] = saved
            source = str(ips.relative_to(ROOT))
    results = {"threads": args.threads, "data": DATA, "runs": runs, "ips_from": source}
    write(results, args.out)
    return 0


def write(results: dict[str, Any], out: Path) -> None:
    """``patchwise_megapixel_mnist.{json,md}`` in ``out``, and the table on stdout."""
    lines = table(results["runs"]) + ["", f"IPS: {results['ips_from']}; "
                                      f"{results['threads']} thread(s)."]
    write_results(out, "patchwise_megapixel_mnist", results, lines)


if __name__ == "__main__":
    raise SystemExit(main())
