"""Detection on large canvases: PatchGD-det vs downsampled full-image FCOS vs tiled FCOS.

1. **Memory.** Peak memory of one PatchGD-det training step (``fcos_tiny``, patch 256, k = 4)
   at 2,048² and 8,192²: measured on this CPU by the tensor tracker, with and without the
   host-resident per-level maps Z (on CUDA Z stays in host memory, so the peak without it is
   what the GPU would hold; FCOS's loss has data-dependent shapes, so the fake-tensor estimate
   does not apply), plus what Z costs on the host at 65,536².
2. **Accuracy.** Generates ``gigapatch data detection`` canvases (unless present) and trains
   ``full`` (downsampled to fit the memory budget by ``train.memory_budget``), ``tiled`` and
   ``patchgd`` (global context ``add``) with one backbone (``fcos_tiny``), the same budget,
   epochs and optimizer; reports held-out COCO mAP, mAP50, mAP75 and small-object mAP, the
   input each method saw, peak step memory and time, with training curves and an overlay of
   the boxes per method.

Writes ``benchmarks/results/detection/{results.json,results.md}`` (+ overlays).

    python benchmarks/detection.py --memory-only    # ~5 min
    python benchmarks/detection.py --threads 2      # the three runs, ~1 h 15 min here
    python benchmarks/detection.py --no-memory --side 1024 --scale 12 48 --digits 12 24 \
        --n-train 80 --n-test 20 --epochs 16 --inner-steps 4   # small digits on 1,024²
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gigapatch.config import Config
from gigapatch.core.units import format_bytes
from gigapatch.engine.loop import train
from gigapatch.memory.budget import measure_method_peak
from gigapatch.synth.detection import generate_detection

from bench_data import generated_with, with_overrides, write_results  # benchmarks/: run as scripts

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "detection"
DATA = {"side": 512, "n_train": 240, "n_test": 40, "scale_range": (12, 72),
        "digits_per_image": (3, 6), "seed": 0}
BUDGET = "256MiB"
PATCH = 128
METRICS = ("map", "map_50", "map_75", "map_small")


def base_config(data_dir: Path, runs: Path, epochs: int, val_every: int = 1) -> Config:
    """What every method shares: data, backbone, optimizer, epochs, budget (priced as a GPU
    would hold it: PatchGD's host-resident maps Z do not count; their host cost is reported
    apart)."""
    cfg = Config(seed=0)
    cfg.task.kind = "detect"
    cfg.data.kind, cfg.data.skip_background = "lazy_csv", True
    cfg.data.train_csv, cfg.data.val_csv = str(data_dir / "train.json"), str(data_dir / "test.json")
    cfg.data.num_classes, cfg.data.in_chans = 10, 1
    cfg.model.encoder = "fcos_tiny"
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr = epochs, 4, 2e-3
    cfg.train.warmup_epochs, cfg.train.progress = 0.5, False
    cfg.train.memory_budget, cfg.train.budget_counts_host_maps = BUDGET, False
    cfg.train.out_dir, cfg.train.val_every = str(runs), val_every
    return cfg


def method_configs(base: Config, inner_steps: int = 4,
                   patchgd_set: list[str] | None = None) -> list[Config]:
    """The three methods on ``base``; ``patchgd_set``: ``key=value`` overrides of PatchGD's
    config alone (e.g. ``method.z_cache=refresh``)."""
    full = copy.deepcopy(base)
    full.name, full.method.name = "det_full", "full"
    tiled = copy.deepcopy(base)
    tiled.name, tiled.method.name = "det_tiled", "tiled"
    tiled.method.patch_size, tiled.method.sample_fraction, tiled.method.fill_chunk = PATCH, 0.25, 8
    pgd = copy.deepcopy(base)
    pgd.name, pgd.method.name = "det_patchgd", "patchgd"
    pgd.method.patch_size, pgd.method.sample_fraction = PATCH, 0.25
    pgd.method.inner_steps, pgd.method.fill_chunk = inner_steps, 8
    pgd.method.global_context = "add"
    pgd = with_overrides(pgd, patchgd_set, "--patchgd-set")
    return [full.validate(), tiled.validate(), pgd.validate()]


def memory_rows(sides: tuple[int, ...] = (2048, 8192)) -> dict[str, Any]:
    """PatchGD-det step peaks (patch 256, k = 4, J = 2, batch 1) with and without Z."""
    cfg = method_configs(base_config(ROOT / "data", ROOT / "runs", 1), inner_steps=4)[2]
    cfg.method.patch_size, cfg.method.fill_chunk = 256, 16
    cfg.train.batch_size, cfg.train.memory_budget = 1, None
    rows: dict[str, Any] = {"patch": 256, "k": 4, "inner_steps": cfg.method.inner_steps,
                            "channels": 64, "strides": [4, 8, 16, 32]}
    for side in sides:
        trial = copy.deepcopy(cfg)
        trial.method.sample_fraction = 4 / (side // 256) ** 2
        start = time.perf_counter()
        rows[f"device_{side}"] = measure_method_peak(trial, (1, side, side),
                                                     exclude_host_maps=True)
        rows[f"cpu_{side}"] = measure_method_peak(trial, (1, side, side))
        rows[f"seconds_{side}"] = round(time.perf_counter() - start, 1)
        print(f"memory {side}²: device {format_bytes(rows[f'device_{side}'])}, with Z "
              f"{format_bytes(rows[f'cpu_{side}'])}", flush=True)
    rows["device_ratio"] = rows[f"device_{sides[-1]}"] / rows[f"device_{sides[0]}"]
    cells = sum((65536 // s) ** 2 for s in rows["strides"])
    rows["z_host_65536"] = {"fp32": 64 * cells * 4, "bf16": 64 * cells * 2}
    return rows


def _overlay(summary: dict[str, Any], data_dir: Path) -> str:
    """Draw the best checkpoint's boxes on the first held-out image; the picture's path."""
    overlay = OUT / f"overlay_{summary['method']}.png"
    image = data_dir / "test/images/000000.png"
    subprocess.run([sys.executable, "-m", "gigapatch", "predict", str(image),
                    "--checkpoint", str(Path(summary["run_dir"]) / "best.pt"),
                    "--overlay", str(overlay)], check=True, stdout=subprocess.DEVNULL)
    return str(overlay.relative_to(ROOT))


def accuracy_runs(data_dir: Path, runs: Path, methods: list[str], epochs: int,
                  inner_steps: int, val_every: int = 1,
                  patchgd_set: list[str] | None = None) -> list[dict[str, Any]]:
    out = []
    base = base_config(data_dir, runs, epochs, val_every)
    for cfg in method_configs(base, inner_steps, patchgd_set):
        if cfg.method.name not in methods:
            continue
        start = time.perf_counter()
        summary = train(cfg, overwrite=True)  # the benchmark owns its run directories
        summary["wall_seconds"] = round(time.perf_counter() - start, 1)
        summary["overlay"] = _overlay(summary, data_dir)
        out.append(summary)
        print(f"{cfg.method.name:8s} " + " ".join(
            f"{k} {summary.get('final_val_' + k, float('nan')):.3f}" for k in METRICS)
            + f" peak {summary['peak_memory']} {summary['train_seconds']:.0f} s", flush=True)
    return out


def table(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    m = results.get("memory")
    if m:
        lines += [f"PatchGD-det, fcos_tiny, patch {m['patch']}, k = {m['k']}, J = "
                  f"{m['inner_steps']}, batch 1 (measured on this CPU):", "",
                  "| image | device peak (all but the host maps Z) | with Z |", "|---|---|---|"]
        sides = sorted(int(k.split("_")[1]) for k in m if k.startswith("device_")
                       and k != "device_ratio")
        for side in sides:
            lines.append(f"| {side:,}² | {format_bytes(m[f'device_{side}'])} | "
                         f"{format_bytes(m[f'cpu_{side}'])} |")
        lines += ["", f"device ratio {sides[-1]:,}² / {sides[0]:,}²: **{m['device_ratio']:.3f}**;"
                  f" Z on the host at 65,536²: {format_bytes(m['z_host_65536']['fp32'])} (fp32), "
                  f"{format_bytes(m['z_host_65536']['bf16'])} (bf16)."]
    if results.get("runs"):
        lines += ["", "| method | input seen | mAP | mAP50 | mAP75 | mAP small | "
                  "peak step memory | train time |", "|---|---|---|---|---|---|---|---|"]
        for r in results["runs"]:
            seen = r.get("input_size") or r.get("patch_size")
            seen = f"{seen}² px" if isinstance(seen, int) else f"{seen[0]}×{seen[1]} px"
            vals = " | ".join(f"{r.get('final_val_' + k, float('nan')):.3f}" for k in METRICS)
            lines.append(f"| {r['method']} | {seen} | {vals} | {r['peak_memory']} | "
                         f"{r['train_seconds']:.0f} s |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=None,
                   help="default data/detection-bench (-<side> for a side other than 512)")
    p.add_argument("--side", type=int, default=DATA["side"], help="canvas side (px)")
    p.add_argument("--scale", type=int, nargs=2, default=DATA["scale_range"],
                   help="digit heights, min max (px)")
    p.add_argument("--digits", type=int, nargs=2, default=DATA["digits_per_image"],
                   help="digits per canvas, min max")
    p.add_argument("--n-train", type=int, default=DATA["n_train"])
    p.add_argument("--n-test", type=int, default=DATA["n_test"])
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-det")
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--no-memory", action="store_true", help="skip the memory rows")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--inner-steps", type=int, default=2, help="PatchGD-det's J")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--val-every", type=int, default=1,
                   help="validate every N epochs and after the last (tiled's held-out pass "
                        "at 2,048² costs several training epochs)")
    p.add_argument("--patchgd-set", action="append", metavar="KEY=VALUE",
                   help="override PatchGD-det's config alone, e.g. method.z_cache=refresh")
    p.add_argument("--methods", nargs="+", default=["full", "tiled", "patchgd"],
                   help="train only these (run the others in another process, then --collect)")
    p.add_argument("--collect", nargs="+", type=Path, metavar="RUNS_DIR",
                   help="train nothing: tabulate the finished runs found in these folders")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    data = {**DATA, "side": args.side, "scale_range": tuple(args.scale),
            "digits_per_image": tuple(args.digits), "n_train": args.n_train,
            "n_test": args.n_test}
    suffix = "" if args.side == DATA["side"] else f"-{args.side}"
    args.data_dir = args.data_dir or ROOT / "data" / f"detection-bench{suffix}"
    name = ("results" + suffix.replace("-", "_")
            + ("" if len(args.methods) == 3 else f"_{'_'.join(args.methods)}") + ".json")
    saved = OUT / name  # parts not rerun keep their last results
    results: dict[str, Any] = json.loads(saved.read_text()) if saved.is_file() else {}
    results.update({"data": data, "budget": BUDGET, "epochs": args.epochs,
                    "inner_steps": args.inner_steps, "val_every": args.val_every,
                    "patchgd_set": args.patchgd_set or []})
    if not args.no_memory:
        results["memory"] = memory_rows()
    if args.collect:
        found = []
        for method in ("full", "tiled", "patchgd"):
            for folder in args.collect:
                path = folder / f"det_{method}" / "summary.json"
                if path.is_file():
                    summary = json.loads(path.read_text())
                    summary["overlay"] = _overlay(summary, args.data_dir)
                    found.append(summary)
                    break
        results["runs"] = found
    elif not args.memory_only:
        if not generated_with(args.data_dir, data):
            generate_detection(args.data_dir, **data)
        results["runs"] = accuracy_runs(args.data_dir, args.runs, args.methods, args.epochs,
                                        args.inner_steps, args.val_every, args.patchgd_set)
    write_results(OUT, name.removesuffix(".json"), results, table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
