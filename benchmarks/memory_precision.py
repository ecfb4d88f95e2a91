"""Peak training-step memory in float32, bf16 and with activation checkpointing.

ResNet-50, batch 1, RGB, patch 256, k = 4 patches per inner step (PatchGD), latent 32, conv
head of width 16, ``fill_chunk`` 16, J = ⌈1/s⌉ inner steps (the README memory table's settings), at 512² (measured
and estimated on the CPU) and 4,096² (estimated). Each row is one setting of
``train.precision`` / ``model.checkpoint_activations``.

    python benchmarks/memory_precision.py      # ~2 min on 1 CPU thread

Writes ``benchmarks/results/memory_precision.{csv,md}``.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from gigapatch.config import Config  # noqa: E402
from gigapatch.core.units import format_bytes  # noqa: E402
from gigapatch.memory import estimate  # noqa: E402
from gigapatch.memory.budget import measure_method_peak  # noqa: E402
from gigapatch.memory.estimates import fraction_for_k  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = [("32", False), ("bf16", False), ("32", True), ("bf16", True)]


def config(method: str, side: int, precision: str, checkpointing: bool) -> Config:
    cfg = Config(name="memory_precision")
    cfg.data.in_chans, cfg.data.num_classes = 3, 10
    cfg.model.encoder, cfg.model.latent_dim, cfg.model.head_width = "resnet50", 32, 16
    cfg.model.checkpoint_activations = checkpointing
    cfg.method.name, cfg.method.patch_size, cfg.method.fill_chunk = method, 256, 16
    cfg.method.sample_fraction = fraction_for_k(side, 256, 4)
    cfg.train.batch_size, cfg.train.precision = 1, precision
    return cfg.validate()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--measure-side", type=int, default=512)
    p.add_argument("--estimate-side", type=int, default=4096)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for method in ("full", "patchgd"):
        for precision, ckpt in SETTINGS:
            small = config(method, args.measure_side, precision, ckpt)
            measured = measure_method_peak(small, (3, args.measure_side, args.measure_side))
            est_small = estimate(small, (3, args.measure_side, args.measure_side))
            big = config(method, args.estimate_side, precision, ckpt)
            est_big = estimate(big, (3, args.estimate_side, args.estimate_side))
            rows.append({"method": method, "precision": precision, "checkpointing": ckpt,
                         "measured_small": measured, "estimated_small": est_small,
                         "estimated_big": est_big})
            print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "memory_precision.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    s, b = args.measure_side, args.estimate_side
    lines = [f"| method | precision | activation checkpointing | {s:,}² measured | {s:,}² "
             f"estimated | {b:,}² estimated |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['precision']} | {'yes' if r['checkpointing'] else 'no'}"
                     f" | {format_bytes(r['measured_small'])} | {format_bytes(r['estimated_small'])}"
                     f" | {format_bytes(r['estimated_big'])} |")
    (args.out / "memory_precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
