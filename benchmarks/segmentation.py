"""Segmentation of large canvases: PatchGD-seg vs downsampled full-image training vs patchwise.

1. **Memory.** Peak memory of one PatchGD-seg training step at 1,024² and 8,192² with the same
   patch size and k: on the device (CUDA estimate without a GPU: fake tensors, device tensors
   only; Z lives on the host) and on this CPU machine (measured at 1,024²; host and device are
   one memory here, so it includes Z), plus what Z costs on the host at 65,536².
2. **Accuracy.** Generates ``gigapatch data segmentation`` canvases (unless present) and trains
   ``full`` (downsampled to the memory budget by ``train.memory_budget``), ``patchwise`` and
   ``patchgd`` (global context ``concat``) with one dense network family (``tiny_unet``), the
   same budget, epochs and optimizer, on the ``majority`` labeling (needs context) and the
   ``digits`` labeling. Images are read lazily with ``data.skip_background`` (patch methods
   sample cells with content: 0.1 % of the pixels are majority strokes); reports held-out Dice (foreground mean, over all pixels), the input
   each method saw, peak step memory and time, with training curves and an overlay per method.

``--theta1-digits EPOCHS`` starts every method's network from a ``tiny_unet`` pretrained on
the training canvases' digit classes (windows centred on strokes, their ``digits`` masks; the
held-out windows' stroke-pixel class accuracy is reported), as a user starts from an encoder
that knows the objects: the test of whether PatchGD-seg's context pays once Z holds each
digit's class.

Writes ``benchmarks/results/segmentation/{results.json,results.md}`` (+ overlays).

    python benchmarks/segmentation.py --memory-only     # ~1 min
    python benchmarks/segmentation.py --threads 1       # ~1 h on this CPU (majority)
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gigapatch.config import Config
from gigapatch.core.units import format_bytes
from gigapatch.engine.checkpoint import load_method
from gigapatch.engine.inference import load_for_predict
from gigapatch.engine.loop import train
from gigapatch.memory.budget import measure_method_peak
from gigapatch.memory.estimates import estimate_step_peak
from gigapatch.models.dense import create_dense_net
from gigapatch.synth.segmentation import generate_segmentation
from gigapatch.tasks.segment import fit_to

from bench_data import generated_with, with_overrides, write_results  # benchmarks/: run as scripts

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "segmentation"
DATA = {"side": 512, "n_train": 300, "n_test": 60, "scale_range": (20, 32), "seed": 0}
BUDGET = "64MiB"


def base_config(data_dir: Path, labeling: str, runs: Path) -> Config:
    """What every method shares: data, network family, optimizer, epochs, budget."""
    cfg = Config(seed=0)
    cfg.task.kind = "segment"
    cfg.task.metrics, cfg.task.monitor = ["dice", "iou", "pixel_accuracy"], "dice"
    cfg.data.train_csv = str(data_dir / f"train_{labeling}.csv")
    cfg.data.val_csv = str(data_dir / f"test_{labeling}.csv")
    cfg.data.num_classes, cfg.data.in_chans = (2 if labeling == "majority" else 11), 1
    cfg.data.kind, cfg.data.skip_background = "lazy_csv", True  # sample cells with content
    cfg.model.encoder, cfg.model.latent_dim = "tiny_unet", 16
    cfg.model.head_width, cfg.model.head_layers = 32, 2
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr = 8, 4, 3e-3
    cfg.train.warmup_epochs, cfg.train.progress = 0.5, False
    cfg.train.memory_budget = BUDGET
    cfg.train.budget_counts_host_maps = False  # price a CPU step as a GPU holds it (Z on the host)
    cfg.train.out_dir = str(runs)
    return cfg


def method_configs(base: Config, labeling: str, inner_steps: int = 4,
                   patchgd_set: list[str] | None = None) -> list[Config]:
    """The three methods on ``base``; ``patchgd_set``: ``key=value`` overrides of PatchGD's
    config alone (e.g. ``method.z_cache=refresh``)."""
    full = copy.deepcopy(base)
    full.name, full.method.name = f"seg_{labeling}_full", "full"
    pw = copy.deepcopy(base)
    pw.name, pw.method.name = f"seg_{labeling}_patchwise", "patchwise"
    pw.method.patch_size, pw.method.sample_fraction, pw.method.fill_chunk = 64, 0.25, 16
    pgd = copy.deepcopy(base)
    pgd.name, pgd.method.name = f"seg_{labeling}_patchgd", "patchgd"
    pgd.method.patch_size, pgd.method.sample_fraction = 64, 4 / 64
    pgd.method.inner_steps = inner_steps
    pgd.method.z_stride, pgd.method.global_context, pgd.method.fill_chunk = 4, "concat", 16
    pgd = with_overrides(pgd, patchgd_set, "--patchgd-set")
    return [full.validate(), pw.validate(), pgd.validate()]


def memory_rows() -> dict[str, Any]:
    """PatchGD-seg step peaks at 1,024² and 8,192² (same p = 128, k = 4) and Z at 65,536²."""
    cfg = base_config(ROOT / "data", "majority", ROOT / "runs")
    pgd = method_configs(cfg, "majority")[2]
    pgd.method.patch_size, pgd.method.fill_chunk = 128, 8
    pgd.train.batch_size, pgd.train.memory_budget = 1, None
    rows: dict[str, Any] = {"patch": 128, "k": 4, "z_stride": 4, "latent_dim": 16}
    for side in (1024, 8192):
        trial = copy.deepcopy(pgd)
        trial.method.sample_fraction = 4 / (side // 128) ** 2
        rows[f"device_{side}"] = estimate_step_peak(trial, (1, side, side), device="cuda")
        rows[f"cpu_estimate_{side}"] = estimate_step_peak(trial, (1, side, side))
        if side == 1024:
            rows["cpu_measured_1024"] = measure_method_peak(trial, (1, side, side))
    rows["device_ratio"] = rows["device_8192"] / rows["device_1024"]
    z_bytes = {dtype: 16 * (65536 // 4) ** 2 * size for dtype, size in (("fp32", 4), ("bf16", 2))}
    rows["z_host_65536"] = z_bytes
    return rows


def _overlay(summary: dict[str, Any], data_dir: Path) -> str:
    """Draw the best checkpoint's mask on the first held-out image; the picture's path."""
    overlay = OUT / f"overlay_{summary['labeling']}_{summary['method']}.png"
    image = data_dir / "test/images/000000.png"
    subprocess.run([sys.executable, "-m", "gigapatch", "predict", str(image),
                    "--checkpoint", str(Path(summary["run_dir"]) / "best.pt"),
                    "--overlay", str(overlay)], check=True, stdout=subprocess.DEVNULL)
    return str(overlay.relative_to(ROOT))


def marked_shares(run_dir: Path, data_dir: Path, n_images: int = 20) -> dict[str, float]:
    """Whether a ``majority`` model tells the digits apart: over the first ``n_images``
    held-out images, the share of the majority digits' stroke pixels it marks and the share
    of the other digits' stroke pixels (from the ``digits`` masks). Marking every digit
    gives two equal shares; context shows as the second one falling."""
    method, _, cfg = load_method(Path(run_dir) / "best.pt")
    method.eval()
    hits = {"majority": 0, "other": 0}
    totals = dict.fromkeys(hits, 0)
    for i in range(n_images):
        name = f"{i:06d}.png"
        image = load_for_predict(data_dir / "test/images" / name, cfg.data.in_chans)
        with torch.inference_mode():
            logits = fit_to(method.predict(image), tuple(image.shape[-2:]))  # full: upsampled
        marked = logits[0].argmax(dim=0).cpu() > 0
        majority = load_for_predict(data_dir / "test/masks_majority" / name, 1)[0, 0] > 0
        digit = load_for_predict(data_dir / "test/masks_digits" / name, 1)[0, 0] > 0
        for key, where in (("majority", majority), ("other", digit & ~majority)):
            hits[key] += int((marked & where).sum())
            totals[key] += int(where.sum())
    return {f"marked_{k}": hits[k] / max(totals[k], 1) for k in hits}


def _z_strokes(method: Any, cfg: Config, data_dir: Path, split: str, n_images: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """PatchGD-seg's Z at the map pixels over digit strokes of ``split``'s first ``n_images``
    canvases: ``(P, C)`` float and the digit under each ``(P,)`` (0..9: the ``digits`` mask's
    most frequent stroke class in the pixel's s × s block, blocks with ≥ s stroke pixels)."""
    s = cfg.method.z_stride
    feats, labels = [], []
    for i in range(n_images):
        name = f"{i:06d}.png"
        image = load_for_predict(data_dir / split / "images" / name, cfg.data.in_chans)
        mask = load_for_predict(data_dir / split / "masks_digits" / name, 1)[0, 0].long()
        with torch.inference_mode():
            z = method.fill_map(image, method.geometry(image))[0].float()    # (C, Hz, Wz)
        hz, wz = z.shape[-2:]
        blocks = mask[: hz * s, : wz * s].reshape(hz, s, wz, s).permute(0, 2, 1, 3)
        blocks = blocks.reshape(hz, wz, s * s)
        counts = torch.stack([(blocks == c).sum(-1) for c in range(1, 11)], -1)  # (Hz, Wz, 10)
        keep = counts.sum(-1) >= s
        feats.append(z.permute(1, 2, 0)[keep])
        labels.append(counts[keep].argmax(-1))
    return torch.cat(feats), torch.cat(labels)


def class_probe(run_dir: Path, data_dir: Path, n_images: int = 40) -> float:
    """Whether Z holds each digit's class: a linear probe (softmax regression on Z's C
    channels, standardised) fitted on the stroke pixels of ``n_images`` training canvases,
    its accuracy on those of ``n_images`` held-out ones (chance ≈ 0.1). A majority model can
    only use the summary of Z if this is high."""
    method, _, cfg = load_method(Path(run_dir) / "best.pt")
    method.eval()
    x, y = _z_strokes(method, cfg, data_dir, "train", n_images)
    tx, ty = _z_strokes(method, cfg, data_dir, "test", n_images)
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, tx = (x - mean) / std, (tx - mean) / std
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], 10)
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(probe(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((probe(tx).argmax(1) == ty).float().mean())


def digit_windows(data_dir: Path, split: str, patch: int = 64, per_image: int = 8, seed: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of ``split``'s canvases that hold a random stroke pixel at a uniformly random
    place, as the grid patch around it holds it (so digits are cut by the window's edges as
    often as by the grid's), with their ``digits`` masks (0 = background, digit + 1):
    ``float (P, 1, patch, patch)`` in [0, 1] and ``int64 (P, patch, patch)``; ``per_image``
    windows per canvas. Only ``split``'s own files are read."""
    gen = torch.Generator().manual_seed(seed)
    images, masks = [], []
    for path in sorted((data_dir / split / "images").glob("*.png")):
        image = load_for_predict(path, 1)[0]                                  # (1, H, W)
        mask = load_for_predict(data_dir / split / "masks_digits" / path.name, 1)[0, 0].long()
        h, w = mask.shape
        ys, xs = torch.nonzero(mask > 0, as_tuple=True)
        if len(ys) == 0:  # a canvas without strokes has no window to offer
            continue
        for i in torch.randint(len(ys), (per_image,), generator=gen).tolist():
            dy, dx = torch.randint(patch, (2,), generator=gen).tolist()
            y = min(max(int(ys[i]) - dy, 0), h - patch)
            x = min(max(int(xs[i]) - dx, 0), w - patch)
            images.append(image[:, y : y + patch, x : x + patch])
            masks.append(mask[y : y + patch, x : x + patch])
    return torch.stack(images).float() / 255, torch.stack(masks)


def pretrain_theta1(data_dir: Path, out: Path, epochs: int = 10) -> dict[str, Any]:
    """``tiny_unet`` trained to tell the digits' classes apart, pixel by pixel (cross-entropy
    over 11 classes) on :func:`digit_windows` of the *training* canvases and their ``digits``
    masks (the other labeling of the same images), saved as a state dict for
    ``model.weights``: the encoder a user would start from (AdamW, cosine-decayed from
    3e-3, 16 windows per training canvas). Returns the held-out windows'
    stroke-pixel class accuracy (a majority model needs each digit's class in Z). Written once:
    an existing ``out`` (with its ``.json`` report) is reused."""
    report = out.with_suffix(".json")
    if out.is_file() and report.is_file():
        return json.loads(report.read_text())
    torch.manual_seed(0)
    x, y = digit_windows(data_dir, "train", per_image=16)
    tx, ty = digit_windows(data_dir, "test", per_image=4)
    net = create_dense_net("tiny_unet", 11, 1)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.01)
    steps = epochs * -(-len(y) // 32)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    weight = torch.ones(11)
    weight[0] = 0.2  # strokes are a few % of a window's pixels
    start = time.perf_counter()
    for epoch in range(epochs):
        for idx in torch.randperm(len(y)).split(32):
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
        with torch.inference_mode():
            pred = torch.cat([net(tx[i : i + 64]).argmax(1) for i in range(0, len(tx), 64)])
        stroke = ty > 0
        acc = float((pred[stroke] == ty[stroke]).float().mean())
        print(f"θ1 on digit classes, epoch {epoch + 1}: held-out stroke-pixel class accuracy "
              f"{acc:.3f}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out)
    result = {"windows": len(y), "epochs": epochs, "stroke_class_accuracy": acc,
              "seconds": round(time.perf_counter() - start, 1)}
    report.write_text(json.dumps(result))
    return result


def _diagnose(summary: dict[str, Any], run_dir: Path, data_dir: Path) -> None:
    """Add to a finished run's ``summary`` (with its ``labeling``) the overlay, the training
    curve (copied beside the overlay), the marked shares (``majority``) and Z's class probe
    (PatchGD)."""
    summary["overlay"] = _overlay(summary, data_dir)
    curve = run_dir / "training_curve.png"
    if curve.is_file():
        dest = OUT / f"curve_{summary['labeling']}_{summary['method']}.png"
        shutil.copyfile(curve, dest)
        summary["training_curve"] = str(dest.relative_to(ROOT))
    if summary["labeling"] == "majority":
        summary.update(marked_shares(run_dir, data_dir))
    if summary["method"] == "patchgd":
        summary["z_class_probe"] = class_probe(run_dir, data_dir)


def accuracy_runs(data_dir: Path, runs: Path, labelings: list[str], methods: list[str],
                  inner_steps: int = 4, epochs: int = 8, patchgd_set: list[str] | None = None,
                  weights: Path | None = None) -> list[dict[str, Any]]:
    """Train ``methods`` on each labeling; ``weights``: every method's network starts from
    this file (``model.weights``; its output layer is new)."""
    out = []
    for labeling in labelings:
        base = base_config(data_dir, labeling, runs)
        base.train.epochs = epochs
        base.model.weights = str(weights) if weights else None
        for cfg in method_configs(base, labeling, inner_steps, patchgd_set):
            if cfg.method.name not in methods:
                continue
            start = time.perf_counter()
            summary = train(cfg, overwrite=True)  # the benchmark owns its run directories
            summary["wall_seconds"] = round(time.perf_counter() - start, 1)
            summary["labeling"] = labeling
            _diagnose(summary, Path(summary["run_dir"]), data_dir)
            out.append(summary)
            print(f"{labeling:9s} {cfg.method.name:10s} dice {summary['final_val_dice']:.3f} "
                  f"(best {summary['val_dice']:.3f}) peak {summary['peak_memory']} "
                  f"{summary['train_seconds']:.0f} s", flush=True)
    return out


def _marked(run: dict[str, Any]) -> str:
    if "marked_majority" not in run:
        return "–"
    return f"{run['marked_majority']:.0%} / {run['marked_other']:.0%}"


def _peaks(run: dict[str, Any]) -> str:
    """The run's measured peak step memory: what a device holds (the budget's price) and,
    for PatchGD, with its host maps Z as well (one memory on the CPU)."""
    device = run.get("peak_device_memory", run["peak_memory"])
    return device if device == run["peak_memory"] else f"{device} / {run['peak_memory']}"


def table(results: dict[str, Any]) -> list[str]:
    m = results["memory"]
    lines = [
        f"PatchGD-seg, tiny_unet, patch {m['patch']}, k = {m['k']}, z_stride {m['z_stride']}, "
        f"C = {m['latent_dim']}, batch 1:", "",
        "| image | device peak (CUDA estimate, Z on the host) | CPU estimate (incl. Z) |",
        "|---|---|---|",
    ]
    for side in (1024, 8192):
        lines.append(f"| {side:,}² | {format_bytes(m[f'device_{side}'])} | "
                     f"{format_bytes(m[f'cpu_estimate_{side}'])} |")
    lines += ["", f"device ratio 8,192² / 1,024²: **{m['device_ratio']:.3f}**; CPU measured at "
              f"1,024²: {format_bytes(m['cpu_measured_1024'])}; Z on the host at 65,536²: "
              f"{format_bytes(m['z_host_65536']['fp32'])} (fp32), "
              f"{format_bytes(m['z_host_65536']['bf16'])} (bf16)."]
    if results.get("runs"):
        lines += ["", "| labeling | method | input seen | held-out Dice (last / best epoch) | "
                  "IoU | strokes marked: majority / other digits | digit class in Z (probe) | "
                  "peak step memory: device (budgeted) / with Z on the host | train time |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in results["runs"]:
            seen = r["input_size"]
            seen = f"{seen}² px" if isinstance(seen, int) else f"{seen[0]}×{seen[1]} px"
            probe = f"{r['z_class_probe']:.2f}" if "z_class_probe" in r else "–"
            lines.append(f"| {r['labeling']} | {r['method']} | {seen} | "
                         f"{r['final_val_dice']:.3f} / {r['val_dice']:.3f} | "
                         f"{r['final_val_iou']:.3f} | {_marked(r)} | {probe} | "
                         f"{_peaks(r)} | {r['train_seconds']:.0f} s |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=ROOT / "data" / "segmentation-bench")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--labelings", nargs="+", default=["majority"],
                   help="majority (needs context) and/or digits")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["full", "patchwise", "patchgd"],
                   help="train only these (run the others in another process, then --collect)")
    p.add_argument("--inner-steps", type=int, default=4,
                   help="PatchGD-seg's J (default 4; 16 learns faster, ~2× the time)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--patchgd-set", action="append", metavar="KEY=VALUE",
                   help="override PatchGD-seg's config alone, e.g. method.z_cache=refresh")
    p.add_argument("--theta1-digits", type=int, default=0, metavar="EPOCHS",
                   help="start every method's network from a tiny_unet pretrained for EPOCHS "
                        "epochs on the training canvases' digit classes (the digits masks)")
    p.add_argument("--collect", nargs="+", type=Path, metavar="RUNS_DIR",
                   help="train nothing: tabulate the finished runs found in these folders")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"memory": memory_rows(), "data": DATA, "budget": BUDGET}
    if args.collect:
        found = []
        for labeling in args.labelings:
            for method in ("full", "patchwise", "patchgd"):
                for folder in args.collect:
                    path = folder / f"seg_{labeling}_{method}" / "summary.json"
                    if path.is_file():
                        summary = json.loads(path.read_text())
                        summary["labeling"] = labeling
                        _diagnose(summary, path.parent, args.data_dir)
                        found.append(summary)
                        break
        results["runs"] = found
    elif not args.memory_only:
        if not generated_with(args.data_dir, DATA):
            generate_segmentation(args.data_dir, **DATA)
        weights = None
        if args.theta1_digits:
            weights = args.runs / f"theta1_digits_e{args.theta1_digits}.pt"
            results["theta1_digits"] = pretrain_theta1(args.data_dir, weights, args.theta1_digits)
        results["runs"] = accuracy_runs(args.data_dir, args.runs, args.labelings, args.methods,
                                        args.inner_steps, args.epochs, args.patchgd_set, weights)
    write_results(OUT, "results", results, table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
