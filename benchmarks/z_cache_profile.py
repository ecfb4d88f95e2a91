"""Where a PatchGD training step's time goes, exact fill vs cached Z (``method.z_cache``).

The Megapixel-MNIST setting of ``benchmarks/z_cache.py`` (3.: patch 50, k = 10, J = 2, batch
16, θ1 pretrained on the training images' cells, θ1 at ``--encoder-lr``), on ``--train``
training images of ``--side``², trained ``--epochs`` epochs with the exact fill (``none``) and
with the cached one (``refresh``, ``z_refresh`` 0.1, ``z_correct``), one after the other. While
each trains, :func:`phase_clock` times the phases of every training step:

- ``fill``: the encoder passes without gradients (all cells exact; the stale cells cached),
- ``correct``: ``z_correct``'s bucket maps (cached only),
- ``inner``: the J inner steps with gradients (k·J patches re-encoded, the head, backward and
  the optimizer step: the same work under both policies),
- ``other``: the rest of the step (sampling, the cache's reads and writes, ages).

It prints the mean seconds per epoch of each phase over the epochs after the first (the first
fills every cell under both policies), and the share of the exact epoch each takes: the
``inner`` share is the floor a cached epoch cannot go below however few cells it re-encodes.
Held-out passes are skipped (validated once, after the last epoch) and the step's memory is
not measured, so the clock holds training only. Times are wall clock, one step at a time
(on CUDA synchronised around each phase).

Writes ``benchmarks/results/z_cache_profile.{json,md}``.

    python benchmarks/z_cache_profile.py --epochs 20   # 160 images at 1000², ~4 min
    python benchmarks/z_cache_profile.py --resume-from runs/<dir>/zcache_megapixel_refresh

``--resume-from RUN_DIR`` times one more epoch of a finished run instead, resumed from its
``last.pt`` (with the Z cache and maps it saved): a late epoch's phases at the run's size.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from gigapatch.config import config_from_dict
from gigapatch.engine.checkpoint import load_checkpoint
from gigapatch.engine.loop import train
from gigapatch.methods.patchgd import PatchGD

from bench_data import save_results  # benchmarks/: run as scripts
from z_cache import POLICIES, from_cells, megapixel_config, megapixel_data, with_policy

ROOT = Path(__file__).resolve().parent.parent
#: The phases timed, as PatchGD's methods: the step, and within it what each phase calls.
PHASES = {"step": "train_step", "fill": "fill", "correct": "_correct", "inner": "_inner_steps"}
PROFILED = {"none": {}, "refresh": {**POLICIES["refresh"], "z_correct": True}}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def phase_clock(cls: type = PatchGD,
                phases: dict[str, str] = PHASES) -> Iterator[list[dict[str, float]]]:
    """While open, ``cls``'s methods named in ``phases`` (``{phase: method}``; ``"step"`` the
    training step) are timed. Yields a list that gets one ``{phase: seconds}`` per training
    step; the other phases count only inside a step (the held-out passes' fills do not).
    The methods are restored on exit."""
    steps: list[dict[str, float]] = []
    originals = {phase: getattr(cls, name) for phase, name in phases.items()}
    inside = [False]

    def timed(phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if phase == "step":
                steps.append({})
                inside[0] = True
            elif not inside[0]:
                return fn(*args, **kwargs)
            _sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync()
                row = steps[-1]
                row[phase] = row.get(phase, 0.0) + time.perf_counter() - start
                if phase == "step":
                    inside[0] = False
        return wrapper

    for phase, name in phases.items():
        setattr(cls, name, timed(phase, originals[phase]))
    try:
        yield steps
    finally:
        for phase, name in phases.items():
            setattr(cls, name, originals[phase])


def per_epoch(steps: list[dict[str, float]], steps_per_epoch: int) -> list[dict[str, float]]:
    """:func:`phase_clock`'s steps summed per epoch, with ``other`` (the step's time outside
    the timed phases)."""
    out = []
    for start in range(0, len(steps), steps_per_epoch):
        rows = steps[start: start + steps_per_epoch]
        epoch = {p: sum(r.get(p, 0.0) for r in rows) for p in PHASES}
        epoch["other"] = epoch["step"] - sum(epoch[p] for p in PHASES if p != "step")
        out.append(epoch)
    return out


def profile_rows(epochs: int, n_train: int, side: int, encoder_lr: float, seed: int,
                 runs: Path) -> dict[str, Any]:
    """Both policies' phase times per epoch (:func:`per_epoch`), and over epochs 2+ each
    phase's mean seconds per epoch and its share of the exact epoch."""
    data = megapixel_data(n_train, side)
    cfg = megapixel_config(data, runs, epochs, side)
    cfg.name = "zcache_profile"
    cfg.train.encoder_lr, cfg.seed = encoder_lr, seed
    cfg.train.val_every, cfg.train.measure_memory = epochs, False
    from_cells(cfg, data)
    steps_per_epoch = -(-n_train // cfg.train.batch_size)
    out: dict[str, Any] = {"epochs": epochs, "n_train": n_train, "side": side,
                           "encoder_lr": encoder_lr, "seed": seed, "policies": PROFILED}
    for name in PROFILED:
        with phase_clock() as steps:
            train(with_policy(cfg, name, PROFILED), overwrite=True)
        rows = per_epoch(steps, steps_per_epoch)
        later = rows[1:] or rows
        out[name] = {"per_epoch": rows,
                     "later": {p: sum(r[p] for r in later) / len(later) for p in rows[0]}}
        print(f"{name}: " + ", ".join(f"{p} {s:.2f} s" for p, s in out[name]["later"].items())
              + " per epoch (epochs 2+)", flush=True)
    exact = out["none"]["later"]["step"]
    for name in PROFILED:
        out[name]["share"] = {p: s / exact for p, s in out[name]["later"].items()}
    return out


def resumed_epoch(run_dir: Path, runs: Path) -> dict[str, Any]:
    """One more epoch of the finished run ``run_dir`` (a copy of it under ``runs``, resumed
    from its ``last.pt`` with the Z cache and maps saved there), its training steps timed by
    :func:`phase_clock` (the held-out pass after it is not): the phases of a late epoch at
    the run's own size, apart from whatever else slowed the run's own late epochs. Also how
    the saved cache's ages spread: the oldest cell's age in epochs and the buckets mapped."""
    source = run_dir / "last.pt"
    if not source.is_file():
        raise SystemExit(f"--resume-from {run_dir}: no last.pt there; give the directory of "
                         "a finished PatchGD run (e.g. runs/<dir>/zcache_megapixel_refresh)")
    saved = load_checkpoint(source)
    cfg = config_from_dict(saved["config"], str(source))
    state, epochs = saved.get("method_state", {}), cfg.train.epochs
    ages = [int(extra[extra >= 0].min()) for _, _, extra in state.get("z_cache", [])
            if (extra >= 0).any()]
    clock = state.get("z_clock", 0)
    spread = {"oldest_epochs": (clock - min(ages)) * epochs / clock if ages and clock else None,
              "buckets": len(state.get("z_maps", {}))}
    del saved, state  # train() reads last.pt again
    twin = runs / cfg.name  # where train() looks for the run to resume
    shutil.rmtree(twin, ignore_errors=True)
    shutil.copytree(run_dir, twin)
    cfg.train.out_dir, cfg.train.epochs = str(runs), epochs + 1
    with phase_clock() as steps:
        train(cfg.validate(), resume=True)
    epoch = per_epoch(steps, len(steps))[0]
    print(f"epoch {epochs + 1} of {run_dir}: " + ", ".join(f"{p} {s:.1f} s"
                                                          for p, s in epoch.items()), flush=True)
    return {"run_dir": str(run_dir), "epoch": epochs + 1, "steps": len(steps), **epoch,
            **spread}


def table(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for key in sorted(k for k in results if k.startswith("profile")):
        lines += ([""] if lines else []) + profile_table(key, results[key])
    for key in sorted(k for k in results if k.startswith("resumed")):
        a = results[key]
        lines += ["", f"`{key}`: epoch {a['epoch']} of `{a['run_dir']}`, resumed ({a['steps']} "
                  f"steps): step {a['step']:.1f} s, fill {a['fill']:.1f} s, z_correct maps "
                  f"{a['correct']:.1f} s, inner steps {a['inner']:.1f} s, other "
                  f"{a['other']:.1f} s."
                  + (f" The saved cache: the oldest cell {a['oldest_epochs']:.1f} epochs old, "
                     f"{a['buckets']} buckets mapped." if a.get("oldest_epochs") else "")]
    return lines


def profile_table(key: str, a: dict[str, Any]) -> list[str]:
    """One :func:`profile_rows` result as a table, titled by its settings and ``key``."""
    lines = [f"`{key}`: PatchGD on Megapixel MNIST ({a['side']}², N = "
             f"{(a['side'] // 50) ** 2}, k = 10, J = 2, batch 16, {a['n_train']} training "
             f"images, θ1 pretrained at "
             f"{a['encoder_lr']:g}, seed {a['seed']}), mean seconds per epoch over epochs 2–"
             f"{a['epochs']} (the share of the exact epoch):", "",
             "| policy | step | fill (no grad) | z_correct maps | inner steps (grad) | other |",
             "|---|---|---|---|---|---|"]
    for name, label in (("none", "exact (`none`)"),
                        ("refresh", "cached (`refresh`, `z_refresh` 0.1, `z_correct`)")):
        later, share = a[name]["later"], a[name]["share"]
        lines.append(f"| {label} | " + " | ".join(
            f"{later[p]:.2f} s ({share[p]:.2f})" for p in ("step", "fill", "correct", "inner",
                                                           "other")) + " |")
    rows = a["refresh"]["per_epoch"]
    lines += ["", "cached, per epoch (s): step " + ", ".join(f"{r['step']:.2f}" for r in rows)
              + "; of which the z_correct maps " + ", ".join(f"{r['correct']:.2f}" for r in rows)
              + ". Exact, per epoch: step " + ", ".join(f"{r['step']:.2f}"
                                                         for r in a["none"]["per_epoch"]) + "."]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=160, help="training images")
    p.add_argument("--side", type=int, default=1000, help="canvas side (N = (side / 50)²)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--encoder-lr", type=float, default=1e-4, help="θ1's learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume-from", type=Path, default=None, metavar="RUN_DIR",
                   help="instead: time one more epoch of this finished run, resumed from its "
                        "last.pt (its cache and maps; a copy under --runs)")
    p.add_argument("--tag", default="",
                   help="store the results under profile_<tag> (resumed_<tag>)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-zcache-profile")
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error(f"--epochs {args.epochs}: need at least 2 (the first fills every cell)")
    torch.set_num_threads(args.threads)
    if args.resume_from is not None:
        key = f"resumed_{args.tag}" if args.tag else "resumed"
        save_results("z_cache_profile", {key: resumed_epoch(args.resume_from, args.runs)},
                     table)
        return 0
    key = f"profile_{args.tag}" if args.tag else "profile"
    save_results("z_cache_profile", {key: profile_rows(
        args.epochs, args.train, args.side, args.encoder_lr, args.seed, args.runs)}, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
