"""Gigapixel training from disk on a CPU: peak process RSS at 8,192² vs 65,536², and IO rates.

1. Writes a synthetic data set of tiled, pyramidal, zlib-compressed BigTIFFs (Megapixel-MNIST
   style digits; ``gigapatch.synth.gigapixel``) at 8,192² and at 65,536² (4.3 gigapixels) unless
   present: 2 training + 1 held-out image each.
2. For each side and each method (PatchGD, IPS), runs ``gigapatch train`` for one epoch in a
   fresh process (batch 1, data read patch by patch through the lazy readers) and records the
   process's peak RSS (``os.wait4``), the time and the patches read.
3. Runs ``gigapatch predict --explain`` (PatchGD saliency heat map) on a 65,536² image, also in
   a fresh process, for its peak RSS.
4. IO: random 512² patches read per second through ``read_region`` versus raw tile decodes per
   second of the same file (``tifffile`` decoding the tile bytes directly: the IO ceiling).

Targets: peak RSS ≤ 4 GiB at 65,536², RSS(65,536²) / RSS(8,192²) ≤ 1.25.
Writes ``benchmarks/results/gigapixel.{json,md}``.

    python benchmarks/gigapixel.py            # ~1 h 10 min on 2 CPU cores (8 min writing data)
    python benchmarks/gigapixel.py --sides 8192   # a quick look (~2 min)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from gigapatch.config import Config, save_config
from gigapatch.core.units import format_bytes
from gigapatch.io.readers import open_image
from gigapatch.synth.gigapixel import generate_gigapixel

from bench_data import write_results  # benchmarks/: run as scripts

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PATCH = 512

METHODS = {
    "patchgd": [
        "method.name=patchgd", f"method.patch_size={PATCH}", "method.inner_steps=2",
        "method.fill_chunk=16", "model.head=conv", "model.head_width=16",
    ],
    "ips": [
        "method.name=ips", f"method.patch_size={PATCH}", "method.memory_size=8",
        "method.iter_size=32", "model.attn_heads=4",
    ],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sides", nargs="+", type=int, default=[8192, 65536])
    p.add_argument("--data", type=Path, default=ROOT / "data" / "gigapixel")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-gigapixel")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--k", type=int, default=4, help="PatchGD patches per inner step")
    p.add_argument("--io-patches", type=int, default=200)
    p.add_argument("--io-only", action="store_true",
                   help="only re-measure the IO rates (data must exist), keeping earlier runs")
    return p.parse_args(argv)


def ensure_data(root: Path, side: int, results: dict[str, Any]) -> Path:
    """The data set for one side (generated unless its meta.json is there); records the
    write time (when written here) and the mean file size in ``results["data"]``."""
    out = root / str(side)
    seconds = None
    if not (out / "meta.json").is_file():
        t = time.perf_counter()
        generate_gigapixel(out, n_train=2, n_test=1, side=side, tile=PATCH,
                           compression="zlib", seed=0)
        seconds = time.perf_counter() - t
    files = sorted(out.glob("*/*.tiff"))
    results.setdefault("data", {})[str(side)] = {
        "images": len(files), "write_seconds": seconds,
        "mean_file_bytes": sum(f.stat().st_size for f in files) / max(1, len(files)),
    }
    print(f"{out}: {json.dumps(results['data'][str(side)])}", flush=True)
    return out


def run_rss(cmd: list[str]) -> dict[str, Any]:
    """Run ``cmd`` in a fresh process and return its peak RSS (``wait4``), time and output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    t = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=devnull)
        stdout = proc.stdout.read() if proc.stdout else b""
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "seconds": round(time.perf_counter() - t, 1),
        "code": proc.returncode,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux: KiB
        "stdout": stdout.decode(),
    }


def train_cmd(method: str, data: Path, runs: Path, side: int, k: int) -> list[str]:
    n = (side // PATCH) ** 2
    sets = [
        "data.kind=lazy_csv", f"data.train_csv={data / 'train.csv'}",
        f"data.val_csv={data / 'test.csv'}", "data.num_classes=10", "data.in_chans=1",
        "model.encoder=tiny_cnn_small", "model.latent_dim=32",
        "train.epochs=1", "train.batch_size=1", "train.progress=false",
        f"train.out_dir={runs}", "train.warmup_epochs=0", *METHODS[method],
    ]
    if method == "patchgd":
        sets.append(f"method.sample_fraction={k / n}")
    cmd = [sys.executable, "-m", "gigapatch.cli", "train", "--config", str(_base_config(runs)),
           "--name", f"{method}_{side}", "--overwrite"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _base_config(runs: Path) -> Path:
    path = runs / "base.yaml"
    runs.mkdir(parents=True, exist_ok=True)
    save_config(Config(name="gigapixel"), path)
    return path


def io_rates(path: Path, count: int) -> dict[str, float]:
    """Random 512² patches/s through ``read_region`` vs raw tile decodes/s of the same file."""
    reader = open_image(path)
    h, w = reader.shape[:2]
    reader.read_region(0, 0, PATCH, PATCH)  # opens the file once, as a worker does
    rng = np.random.default_rng(0)
    ys = rng.integers(0, h // PATCH, count) * PATCH
    xs = rng.integers(0, w // PATCH, count) * PATCH
    t = time.perf_counter()
    for y, x in zip(ys.tolist(), xs.tolist()):
        reader.read_region(y, x, PATCH, PATCH)
    patches_per_s = count / (time.perf_counter() - t)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        fh = tif.filehandle
        idx = rng.integers(0, len(page.dataoffsets), count).tolist()
        t = time.perf_counter()
        for i in idx:
            fh.seek(page.dataoffsets[i])
            data = fh.read(page.databytecounts[i])
            page.decode(data, i)
        tiles_per_s = count / (time.perf_counter() - t)
    return {"patches_per_s": patches_per_s, "raw_tiles_per_s": tiles_per_s,
            "ratio": patches_per_s / tiles_per_s}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, Any] = {"runs": [], "io": {}}
    if args.io_only:
        previous = args.out / "gigapixel.json"
        if previous.is_file():
            results = json.loads(previous.read_text())
        for side in sorted(args.sides):
            path = args.data / str(side) / "test" / "000000.tiff"
            results["io"][str(side)] = io_rates(path, args.io_patches)
            print(side, json.dumps(results["io"][str(side)]), flush=True)
        write(results, args)
        return 0
    for side in sorted(args.sides):
        data = ensure_data(args.data, side, results)
        for method in METHODS:
            r = run_rss(train_cmd(method, data, args.runs, side, args.k))
            summary = json.loads(r["stdout"]) if r["code"] == 0 else {}
            row = {"side": side, "method": method, "code": r["code"], "seconds": r["seconds"],
                   "peak_rss_bytes": r["peak_rss_bytes"],
                   "step_peak": summary.get("peak_memory"),
                   "train_seconds": summary.get("train_seconds")}
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
        results["io"][str(side)] = io_rates(data / "test" / "000000.tiff", args.io_patches)
        print(side, json.dumps(results["io"][str(side)]), flush=True)
    big = max(args.sides)
    ckpt = args.runs / f"patchgd_{big}" / "last.pt"
    if ckpt.is_file():
        image = args.data / str(big) / "test" / "000000.tiff"
        heat = args.out / "gigapixel_occlusion_saliency.png"
        r = run_rss([sys.executable, "-m", "gigapatch.cli", "predict", str(image),
                     "--checkpoint", str(ckpt), "--explain", str(heat)])
        results["predict"] = {"side": big, "code": r["code"], "seconds": r["seconds"],
                              "peak_rss_bytes": r["peak_rss_bytes"], "heatmap": str(heat)}
        print(json.dumps(results["predict"]), flush=True)
    write(results, args)
    return 0


def write(results: dict[str, Any], args: argparse.Namespace) -> None:
    rss = {(r["side"], r["method"]): r["peak_rss_bytes"] for r in results["runs"]}
    sides = sorted({r["side"] for r in results["runs"]})
    lines = ["| method | side | peak RSS | training step peak | epoch time |",
             "|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(f"| {r['method']} | {r['side']:,}² | {format_bytes(r['peak_rss_bytes'])} | "
                     f"{r['step_peak']} | {r['seconds']:.0f} s |")
    if len(sides) > 1:
        for m in METHODS:
            lines.append(f"\n{m}: RSS {sides[-1]:,}² / {sides[0]:,}² = "
                         f"{rss[(sides[-1], m)] / rss[(sides[0], m)]:.3f}")
    for side, io in results["io"].items():
        lines.append(f"\nIO at {int(side):,}²: {io['patches_per_s']:.0f} patches/s via "
                     f"read_region, {io['raw_tiles_per_s']:.0f} raw tile decodes/s "
                     f"({io['ratio']:.0%})")
    for side, d in results.get("data", {}).items():
        written = (f"written in {d['write_seconds']:.0f} s, " if d["write_seconds"] else "")
        lines.append(f"\ndata at {int(side):,}²: {d['images']} images, {written}"
                     f"{d['mean_file_bytes'] / 1e6:.1f} MB per file")
    if "predict" in results:
        p = results["predict"]
        lines.append(f"\npredict --explain at {p['side']:,}²: peak RSS "
                     f"{format_bytes(p['peak_rss_bytes'])}, {p['seconds']:.0f} s")
    write_results(args.out, "gigapixel", results, lines)


if __name__ == "__main__":
    raise SystemExit(main())
