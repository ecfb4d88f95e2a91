"""How θ1's drift reaches a cached Z, and how much of it an affine map takes back.

Reads a finished PatchGD run with a Z cache (``method.z_cache: refresh``; its ``last.pt``
holds the cache and its clock, its config names the data). For ``--images`` training images
it compares each cached cell with a fresh fill by the run's final θ1, grouped by the cell's
age (epochs of optimizer steps before the end): the mean relative change ‖new − old‖ / ‖new‖,
and the change left after an affine map (``gigapatch.methods.z_staleness.fit_affine``, the
one ``method.z_correct`` fits) fitted on ``--pairs`` random cells of the same age group from
the first half of the images, measured on the second half. Writes
``benchmarks/results/z_drift.{json,md}`` (keyed by run).

    python benchmarks/z_drift.py runs/bench-zcache-w3s0/zcache_megapixel_refresh  # ~2 min
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from gigapatch.config import config_from_dict
from gigapatch.data.datasets import open_dataset
from gigapatch.engine.checkpoint import load_checkpoint
from gigapatch.methods import create_method
from gigapatch.methods.frozen_cache import image_keys
from gigapatch.methods.z_staleness import apply_affine, fit_affine, relative_change
from gigapatch.tasks import create_task

from bench_data import save_results  # benchmarks/: run as scripts


def drift_rows(run: Path, images: int, pairs: int, seed: int = 0) -> dict[str, Any]:
    """Per age group (whole epochs before the end): cells, mean change, and the change left
    after the fitted affine map (see the module doc)."""
    state = load_checkpoint(run / "last.pt")
    cfg = config_from_dict(state["config"])
    cache = {key: (z, ages) for key, z, ages in state["method_state"].get("z_cache", [])}
    if not cache:
        raise SystemExit(f"{run / 'last.pt'} holds no Z cache: run with method.z_cache: "
                         "refresh (and a cache below method.z_cache_checkpoint).")
    clock = int(state["method_state"]["z_clock"])
    epoch_steps = clock / (state["epoch"] + 1)
    method = create_method(cfg, create_task(cfg))
    method.load_state_dict(state["model"])
    method.train()  # the fill's mode in training (method.fill_mode: train)
    data = open_dataset(cfg, "train")
    old, new, age, image = [], [], [], []
    for i in range(images):
        x = data[i][0][None]
        z, ages = cache[image_keys(x)[0]]
        with torch.no_grad():
            fresh = method.fill(x, method.grid(x))[0]
        keep = ages >= 0
        old.append(z[keep].float())
        new.append(fresh[keep].float())
        age.append(((clock - ages[keep]) / epoch_steps).floor().long())
        image.append(torch.full((int(keep.sum()),), i))
    o, n, a, im = (torch.cat(t) for t in (old, new, age, image))
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for group in sorted(a.unique().tolist()):
        fit = ((a == group) & (im < images // 2)).nonzero().flatten()
        test = (a == group) & (im >= images // 2)
        if len(fit) <= o.shape[1] or not test.any():
            continue
        pick = fit[torch.randperm(len(fit), generator=gen)[:pairs]]
        w = fit_affine(o[pick], n[pick])
        rows.append({"age_epochs": group, "cells": int(test.sum()), "fit_pairs": len(pick),
                     "change": float(relative_change(n[test], o[test]).mean()),
                     "after_affine": float(relative_change(n[test],
                                                           apply_affine(o[test], w)).mean())})
        print(f"age {group}–{group + 1} epochs: {rows[-1]['cells']} cells, change "
              f"{rows[-1]['change']:.3f} → {rows[-1]['after_affine']:.3f} after the map",
              flush=True)
    return {"run": str(run), "images": images, "pairs": pairs, "clock": clock, "rows": rows}


def table(results: dict[str, Any]) -> list[str]:
    lines = []
    for r in results.values():
        lines += ["", f"{r['run']} ({r['images']} training images, half fit / half measured, "
                  f"{r['pairs']} random pairs per age group):", "",
                  "| age (epochs before the end) | cells measured | change ‖new − old‖ / ‖new‖ "
                  "| after the affine map |", "|---|---|---|---|"]
        lines += [f"| {row['age_epochs']}–{row['age_epochs'] + 1} | {row['cells']} | "
                  f"{row['change']:.3f} | {row['after_affine']:.3f} |" for row in r["rows"]]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run directory with last.pt (PatchGD, z_cache)")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--pairs", type=int, default=160,
                   help="random cells per age group the map is fitted on")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    save_results("z_drift", {str(args.run): drift_rows(args.run, args.images, args.pairs)},
                 table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
