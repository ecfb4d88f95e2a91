"""Peak training-step memory versus image size: full-image GD, PatchGD, PatchGD + global context.

For each encoder and image side, one training step (batch 1, patch 256, the same k patches per
inner step at every size) is

* **measured** (real step on random images, :func:`gigapatch.memory.budget.measure_method_peak`) at
  the small sides given by ``--measure`` (CPU: a few seconds each), and
* **estimated** with fake tensors (:func:`gigapatch.memory.estimates.estimate_table`, nothing
  allocated) at every side up to 65,536².

Writes ``benchmarks/results/memory_vs_size.{csv,json}`` and prints a table plus two ratios:
PatchGD's peak at the largest side over its peak at 1024² (target ≤ 1.10: memory set by the
patch, not the image) and full-image over PatchGD at 4096² (target ≥ 30).

    python benchmarks/memory_vs_size.py                      # ~3 min on 1 CPU thread
    python benchmarks/memory_vs_size.py --cuda               # + CUDA-device estimates
    python benchmarks/memory_vs_size.py --measure none --encoders resnet50   # estimates only
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from gigapatch.memory.budget import measure_method_peak  # noqa: E402
from gigapatch.config import Config  # noqa: E402
from gigapatch.core.grid import PatchGrid  # noqa: E402
from gigapatch.memory.estimates import estimate_table, fraction_for_k  # noqa: E402
from gigapatch.core.units import format_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_SIDES = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
DEFAULT_MEASURE = ["mobilenet_v2=512,1024", "resnet50=512"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoders", nargs="+", default=["resnet50", "mobilenet_v2"])
    p.add_argument("--methods", nargs="+", default=["full", "patchgd", "patchgd+concat"],
                   help="method names; patchgd+add / patchgd+concat add global context")
    p.add_argument("--sides", nargs="+", type=int, default=DEFAULT_SIDES)
    p.add_argument("--measure", nargs="+", default=DEFAULT_MEASURE,
                   help="ENCODER=SIDE,SIDE… to also measure for real ('none': no measurement)")
    p.add_argument("--patch", type=int, default=256)
    p.add_argument("--k", type=int, default=4, help="patches per inner step, at every size")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--latent-dim", type=int, default=32)
    p.add_argument("--head", default="conv")
    p.add_argument("--head-width", type=int, default=16)
    p.add_argument("--fill-chunk", type=int, default=16)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--cuda", action="store_true",
                   help="also estimate for a CUDA device (device tensors only; no GPU needed)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ratio-small", type=int, default=1024)
    p.add_argument("--ratio-compare", type=int, default=4096)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def base_config(args: argparse.Namespace, encoder: str) -> Config:
    cfg = Config(name="memory_vs_size")
    cfg.data.in_chans = 3
    cfg.data.num_classes = args.num_classes
    cfg.model.encoder = encoder
    cfg.model.latent_dim = args.latent_dim
    cfg.model.head = args.head
    cfg.model.head_width = args.head_width
    cfg.method.patch_size = args.patch
    cfg.method.fill_chunk = args.fill_chunk
    cfg.train.batch_size = args.batch
    return cfg.validate()


def method_config(cfg: Config, method: str, side: int, k: int) -> Config:
    cfg = copy.deepcopy(cfg)
    base, _, context = method.partition("+")
    cfg.method.name = base
    cfg.method.global_context = context or "none"
    cfg.method.sample_fraction = fraction_for_k(side, cfg.method.patch_size, k)
    return cfg


def measure_plan(specs: list[str]) -> dict[str, list[int]]:
    if specs == ["none"]:
        return {}
    plan: dict[str, list[int]] = {}
    for spec in specs:
        name, _, sides = spec.partition("=")
        plan[name] = [int(s) for s in sides.split(",") if s]
    return plan


def available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure(cfg: Config, side: int, estimated: int) -> tuple[int | None, str]:
    """Real peak of one step, or None and why not (too big for this machine, out of memory)."""
    avail = available_bytes()
    need = estimated + cfg.train.batch_size * 3 * side * side
    if avail is not None and need > 0.5 * avail:
        return None, f"skipped: needs ~{format_bytes(need)}"
    try:
        return measure_method_peak(cfg, (3, side, side), "cpu"), "measured"
    except (MemoryError, RuntimeError) as err:
        if isinstance(err, MemoryError) or "out of memory" in str(err).lower():
            return None, "out of memory"
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = measure_plan(args.measure)
    devices = ["cpu", "cuda"] if args.cuda else ["cpu"]
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for encoder in args.encoders:
        cfg = base_config(args, encoder)
        est: dict[tuple[str, str, int], dict[str, Any]] = {}
        for device in devices:
            for r in estimate_table(cfg, args.sides, args.methods, device=device,
                                    patches_per_step=args.k):
                est[(device, r["method"], r["side"])] = r
        for method in args.methods:
            for side in args.sides:
                grid = PatchGrid(side, side, args.patch)
                patchgd = method.startswith("patchgd")
                k = min(args.k, grid.num_patches)
                e = est[("cpu", method, side)]
                row: dict[str, Any] = {
                    "encoder": encoder,
                    "method": method,
                    "side": side,
                    "patches": grid.num_patches if patchgd else None,
                    "k": k if patchgd else None,
                    "inner_steps": math.ceil(grid.num_patches / k) if patchgd else None,
                    "estimated_bytes": e["estimated_bytes"],
                    "persistent_bytes": e["persistent_bytes"],
                    "input_bytes": e["input_bytes"],
                    "estimate_seconds": e["seconds"],
                    "estimated_cuda_bytes": (
                        est[("cuda", method, side)]["estimated_bytes"] if args.cuda else None
                    ),
                    "measured_bytes": None,
                    "measure_status": "not requested",
                    "measure_seconds": None,
                    "estimate_error": None,
                }
                if side in plan.get(encoder, []):
                    t = time.perf_counter()
                    mcfg = method_config(cfg, method, side, args.k)
                    peak, status = measure(mcfg, side, e["estimated_bytes"])
                    row["measure_seconds"] = round(time.perf_counter() - t, 2)
                    row["measured_bytes"], row["measure_status"] = peak, status
                    if peak:
                        row["estimate_error"] = e["estimated_bytes"] / peak - 1
                rows.append(row)
                print(_line(row), flush=True)
    ratios = compute_ratios(rows, args)
    elapsed = time.perf_counter() - start
    write_results(args, rows, ratios, elapsed)
    print_table(rows, ratios, args, elapsed)
    return 0


def compute_ratios(
    rows: list[dict[str, Any]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """PatchGD largest/small side (target ≤ 1.10) and full/PatchGD at the compare side (≥ 30)."""
    peak = {(r["encoder"], r["method"], r["side"]): r for r in rows}
    largest = max(args.sides)
    out: list[dict[str, Any]] = []
    for encoder in args.encoders:
        for method in [m for m in args.methods if m.startswith("patchgd")]:
            for key, label in (("estimated_bytes", "cpu"), ("estimated_cuda_bytes", "cuda")):
                big = peak.get((encoder, method, largest), {}).get(key)
                small = peak.get((encoder, method, args.ratio_small), {}).get(key)
                if big and small:
                    out.append({
                        "encoder": encoder, "ratio": f"{method} {largest}²/{args.ratio_small}²",
                        "device": label, "value": big / small, "target": "<= 1.10",
                        "ok": big / small <= 1.10,
                    })
                full = peak.get((encoder, "full", args.ratio_compare), {}).get(key)
                ours = peak.get((encoder, method, args.ratio_compare), {}).get(key)
                if full and ours:
                    out.append({
                        "encoder": encoder,
                        "ratio": f"full/{method} at {args.ratio_compare}²",
                        "device": label, "value": full / ours, "target": ">= 30",
                        "ok": full / ours >= 30,
                    })
    return out


def _fmt(n: int | None) -> str:
    return "—" if n is None else format_bytes(n)


def _line(r: dict[str, Any]) -> str:
    meas = _fmt(r["measured_bytes"]) if r["measured_bytes"] else r["measure_status"]
    err = "" if r["estimate_error"] is None else f" ({r['estimate_error']:+.1%})"
    cuda = "" if r["estimated_cuda_bytes"] is None else f"  cuda {_fmt(r['estimated_cuda_bytes'])}"
    return (f"{r['encoder']:<13} {r['method']:<15} {r['side']:>6}²  estimated "
            f"{_fmt(r['estimated_bytes']):>10}{cuda}  measured {meas}{err}")


def print_table(
    rows: list[dict[str, Any]], ratios: list[dict[str, Any]], args: argparse.Namespace,
    elapsed: float,
) -> None:
    print()
    print(f"Peak memory of one training step (batch {args.batch}, patch {args.patch}, "
          f"k = {args.k}, latent_dim {args.latent_dim}, head {args.head}/{args.head_width}, "
          f"fill_chunk {args.fill_chunk}); estimate = fake tensors, CPU accounting")
    for encoder in args.encoders:
        print(f"\n{encoder}")
        header = f"{'side':>7} " + "".join(f"{m:>17}" for m in args.methods)
        print(header)
        for side in args.sides:
            cells = []
            for m in args.methods:
                r = next(x for x in rows if x["encoder"] == encoder and x["method"] == m
                         and x["side"] == side)
                cell = _fmt(r["estimated_bytes"])
                if r["measured_bytes"]:
                    cell += f" [{r['estimate_error']:+.0%}]"
                cells.append(f"{cell:>17}")
            print(f"{side:>6}² " + "".join(cells))
    print("\n[±x%] = estimate vs measured where measured. Ratios:")
    for q in ratios:
        print(f"  {q['encoder']:<13} {q['ratio']:<32} ({q['device']}) {q['value']:8.3f}  "
              f"target {q['target']}: {'ok' if q['ok'] else 'MISSED'}")
    print(f"\n{len(rows)} rows in {elapsed:.0f} s → {args.out}/memory_vs_size.csv/.json")


def write_results(
    args: argparse.Namespace, rows: list[dict[str, Any]], ratios: list[dict[str, Any]],
    elapsed: float,
) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "memory_vs_size.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    meta = {
        "settings": settings,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "seconds": round(elapsed, 1),
    }
    (args.out / "memory_vs_size.json").write_text(
        json.dumps({"meta": meta, "ratios": ratios, "rows": rows}, indent=2) + "\n"
    )


if __name__ == "__main__":
    sys.exit(main())
