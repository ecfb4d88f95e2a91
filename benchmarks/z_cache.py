"""PatchGD with a cached latent grid (``method.z_cache: refresh``) vs the exact fill (``none``).

1. **Speed.** Tiled pyramidal TIFFs of ``--side`` pixels (``gigapatch.synth.gigapixel``, 2
   training + 1 held-out image, written unless present), PatchGD with the gigapixel benchmark's
   step (``tiny_cnn_small``, patch ``--patch`` = 512, k = 4, J = 2, batch 1), trained
   for ``--epochs`` epochs with each policy in turn; epoch times after the first (the first
   fills the cache, as ``none`` fills every step). Training time (the held-out pass is an
   exact prediction for both and is reported apart).
2. **Accuracy** (``--accuracy``). The demo task (UltraMNIST-style digits, 256², patch 64,
   k·J = 4 of 16 cells per step), both policies at the same epochs: held-out accuracy per
   epoch and the wall time the cached run needs to reach the exact run's final accuracy.
3. **Accuracy on Megapixel MNIST** (``--megapixel``): the IPS benchmark's 500² canvases
   (patch 50, N = 100 cells, 6 noise patterns; ``--mm-train`` training and 500 held-out
   images, seeded), PatchGD with ``tiny_cnn_small``, k = 10, J = 2, batch 16: the fill (100
   encoder passes per image and step) outweighs the 20 passes with gradients, as at
   gigapixel scale. The same two measures as 2.

Writes ``benchmarks/results/z_cache.{json,md}``.

    python benchmarks/z_cache.py --side 8192 --epochs 3           # ~5 min
    python benchmarks/z_cache.py --side 65536 --epochs 2          # hours: the 65,536² target
    python benchmarks/z_cache.py --no-speed --accuracy --epochs 5 # the demo task, ~30 min
    python benchmarks/z_cache.py --no-speed --megapixel --epochs 6  # Megapixel MNIST
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch

from gigapatch.config import Config
from gigapatch.demo import DemoSettings, demo_configs
from gigapatch.engine.checkpoint import load_checkpoint
from gigapatch.engine.loop import train
from gigapatch.synth.gigapixel import generate_gigapixel
from gigapatch.synth.megapixel_mnist import generate_megapixel_mnist
from gigapatch.synth.ultramnist import generate_ultramnist

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
POLICIES = {"none": {}, "refresh": {"z_cache": "refresh", "z_refresh": 0.1}}


def _with_policy(cfg: Config, name: str) -> Config:
    out = copy.deepcopy(cfg)
    out.name = f"{cfg.name}_{name}"
    for key, value in POLICIES[name].items():
        setattr(out.method, key, value)
    return out.validate()


def _history(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's per-epoch rows (``epoch_seconds``, ``val_accuracy``, …) from its last.pt."""
    return load_checkpoint(Path(summary["run_dir"]) / "last.pt")["history"]


def speed_config(data: Path, runs: Path, side: int, patch: int, epochs: int) -> Config:
    cfg = Config(name=f"zcache_{side}", seed=0)
    cfg.data.kind = "lazy_csv"
    cfg.data.train_csv, cfg.data.val_csv = str(data / "train.csv"), str(data / "test.csv")
    cfg.data.num_classes, cfg.data.in_chans = 10, 1
    cfg.model.encoder, cfg.model.latent_dim = "tiny_cnn_small", 32
    cfg.method.name, cfg.method.patch_size = "patchgd", patch
    cfg.method.sample_fraction = 4 / (side // patch) ** 2
    cfg.method.inner_steps, cfg.method.fill_chunk = 2, 32
    cfg.train.epochs, cfg.train.batch_size, cfg.train.progress = epochs, 1, False
    cfg.train.warmup_epochs, cfg.train.out_dir = 0, str(runs)
    return cfg


def speed_rows(side: int, patch: int, epochs: int, runs: Path) -> dict[str, Any]:
    data = ROOT / "data" / f"zcache-{side}"
    if not (data / "train.csv").is_file():
        generate_gigapixel(data, n_train=2, n_test=1, side=side)
    base = speed_config(data, runs, side, patch, epochs)
    rows: dict[str, Any] = {"side": side, "patch": patch, "k": 4, "inner_steps": 2,
                            "epochs": epochs}
    n_train = len((data / "train.csv").read_text().splitlines()) - 1
    for name in POLICIES:
        summary = train(_with_policy(base, name), overwrite=True)
        hist = _history(summary)
        times = [n_train / row["images_per_second"] for row in hist]  # training only
        rows[name] = {"train_seconds": times,
                      "epoch_seconds": [row["epoch_seconds"] for row in hist],
                      "later_epochs": sum(times[1:]) / len(times[1:])}
        print(f"{side}² {name}: training per epoch {[round(t, 1) for t in times]} s", flush=True)
    rows["ratio"] = rows["refresh"]["later_epochs"] / rows["none"]["later_epochs"]
    later = {n: sum(rows[n]["epoch_seconds"][1:]) / (epochs - 1) for n in POLICIES}
    rows["ratio_with_validation"] = later["refresh"] / later["none"]
    return rows


def policy_runs(cfg: Config, label: str) -> dict[str, Any]:
    """Train ``cfg`` with each policy; held-out accuracy and elapsed time per epoch, the final
    gap in points and the share of the exact run's time the cached one needs to reach the
    exact run's final accuracy (``None``: not reached)."""
    out: dict[str, Any] = {"epochs": cfg.train.epochs}
    for name in POLICIES:
        summary = train(_with_policy(cfg, name), overwrite=True)
        hist = _history(summary)
        out[name] = {"accuracy": [row["val_accuracy"] for row in hist],
                     "elapsed": [sum(r["epoch_seconds"] for r in hist[: i + 1])
                                 for i in range(len(hist))]}
        print(f"{label} {name}: accuracy {[round(a, 3) for a in out[name]['accuracy']]}, "
              f"{out[name]['elapsed'][-1]:.0f} s", flush=True)
    final = out["none"]["accuracy"][-1]
    reached = [t for a, t in zip(out["refresh"]["accuracy"], out["refresh"]["elapsed"])
               if a >= final]
    out["gap_points"] = 100 * (out["refresh"]["accuracy"][-1] - final)
    out["time_to_exact_final"] = reached[0] / out["none"]["elapsed"][-1] if reached else None
    return out


def accuracy_rows(epochs: int, runs: Path) -> dict[str, Any]:
    settings = DemoSettings(epochs=epochs)
    data = ROOT / "data" / "ultramnist-demo"
    if not (data / "train.csv").is_file():
        generate_ultramnist(data, n_train=settings.n_train, n_test=settings.n_test,
                            side=settings.side, digits_per_image=settings.digits_per_image,
                            scale_range=settings.scale_range, num_classes=settings.num_classes,
                            seed=settings.data_seed)
    pgd = demo_configs(settings, data, runs)[1]
    pgd.name = "zcache_demo"
    return policy_runs(pgd, "demo")


def megapixel_config(data: Path, runs: Path, epochs: int) -> Config:
    """PatchGD on the CPU-sized Megapixel MNIST (majority task): N = 100 cells, k·J = 20."""
    cfg = Config(name="zcache_megapixel", seed=0)
    cfg.data.kind, cfg.data.root, cfg.data.tasks = "megapixel_mnist", str(data), ["majority"]
    cfg.data.num_classes, cfg.data.in_chans = 10, 1
    cfg.model.encoder, cfg.model.latent_dim = "tiny_cnn_small", 64
    cfg.method.name, cfg.method.patch_size = "patchgd", 50
    cfg.method.sample_fraction, cfg.method.inner_steps, cfg.method.fill_chunk = 0.1, 2, 200
    cfg.train.epochs, cfg.train.batch_size, cfg.train.progress = epochs, 16, False
    cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay = "adamw", 1e-3, 0.01
    cfg.train.warmup_epochs, cfg.train.schedule, cfg.train.out_dir = 1, "cosine", str(runs)
    return cfg


def megapixel_rows(epochs: int, n_train: int, runs: Path) -> dict[str, Any]:
    spec = {"side": 500, "n_noise": 6, "n_train": n_train, "n_test": 500, "seed": 0}
    data = ROOT / "data" / f"megapixel-mnist-zcache-{n_train}"
    meta = data / "meta.json"
    if not meta.is_file() or any(json.loads(meta.read_text()).get(k) != v
                                 for k, v in spec.items()):
        generate_megapixel_mnist(data, **spec)
    out = policy_runs(megapixel_config(data, runs, epochs), "megapixel")
    out["n_train"] = n_train
    return out


def table(results: dict[str, Any]) -> list[str]:
    lines = []
    s = results.get("speed")
    if s:
        lines += [f"PatchGD, tiny_cnn_small, {s['side']:,}² (2 images), patch {s['patch']}, k = 4, "
                  f"J = 2, batch 1, {s['epochs']} epochs:", "",
                  "| z_cache | training time per epoch (s) | mean of epochs 2+ |",
                  "|---|---|---|"]
        for name in POLICIES:
            times = ", ".join(f"{t:.1f}" for t in s[name]["train_seconds"])
            lines.append(f"| {name} | {times} | {s[name]['later_epochs']:.1f} s |")
        lines += ["", f"refresh / none, training, epochs 2+: **{s['ratio']:.3f}** (target ≤ "
                  f"0.2); with the held-out pass (an exact prediction, the same for both): "
                  f"{s['ratio_with_validation']:.3f}."]
    for key, title in (("accuracy", "Demo task"), ("megapixel", "Megapixel MNIST (500², "
                       "N = 100, k = 10, J = 2, batch 16)")):
        a = results.get(key)
        if not a:
            continue
        lines += ["", f"{title}, {a['epochs']} epochs:", "", "| z_cache | held-out accuracy "
                  "per epoch | time |", "|---|---|---|"]
        for name in POLICIES:
            acc = ", ".join(f"{v:.3f}" for v in a[name]["accuracy"])
            lines.append(f"| {name} | {acc} | {a[name]['elapsed'][-1]:.0f} s |")
        reach = a["time_to_exact_final"]
        lines += ["", f"final gap {a['gap_points']:+.1f} points (target within 1); time to the "
                  f"exact run's final accuracy: "
                  + (f"{reach:.2f} of its time (target ≤ 1/3)." if reach is not None
                     else "not reached.")]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", type=int, default=8192)
    p.add_argument("--patch", type=int, default=512)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--accuracy", action="store_true", help="also the demo-task accuracy runs")
    p.add_argument("--megapixel", action="store_true",
                   help="also the Megapixel-MNIST accuracy runs")
    p.add_argument("--mm-train", type=int, default=3000,
                   help="Megapixel-MNIST training images")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-zcache")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    saved = RESULTS / "z_cache.json"  # parts not rerun keep their last results
    results: dict[str, Any] = json.loads(saved.read_text()) if saved.is_file() else {}
    if not args.no_speed:
        results["speed"] = speed_rows(args.side, args.patch, args.epochs, args.runs)
    if args.accuracy:
        results["accuracy"] = accuracy_rows(args.epochs, args.runs)
    if args.megapixel:
        results["megapixel"] = megapixel_rows(args.epochs, args.mm_train, args.runs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "z_cache.json").write_text(json.dumps(results, indent=2))
    lines = table(results)
    (RESULTS / "z_cache.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
