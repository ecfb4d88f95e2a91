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
   gigapixel scale. The same two measures as 2. ``--mm-side`` sets the canvas (N = (side /
   50)², noise at the paper's density), ``--mm-pretrained`` starts θ1 from an encoder trained
   on the training images' grid cells (digit or none; :func:`pretrain_encoder`), as users start
   from pretrained weights, instead of from scratch. ``--mm-encoder-lr`` gives θ1 its own
   learning rate (a slowly moving θ1 keeps the cache fresh), ``--mm-z-refresh`` the cached
   policy's share, ``--tag`` keeps the results apart (``megapixel_<tag>``, ``accuracy_<tag>``).
   ``--z-warmup E`` (2 and 3): the cached run fills exactly for its first E epochs
   (``method.z_cache_warmup``), while θ1 moves fastest. ``--z-tolerance T`` (2 and 3): the cached
   run's share re-encoded per visit follows the measured change of the re-encoded cells
   (``method.z_tolerance``, from every cell down to ``--mm-z-refresh``). The cached run's
   ``z_staleness`` and ``z_refreshed`` per epoch are kept with its results. ``--z-correct``:
   the cached run maps its kept cells by the affine change fitted on the re-encoded ones
   (``method.z_correct``). ``--reuse-exact`` (θ1 pretrained) takes the exact run from a
   stored row of the same settings (it is deterministic here) and trains only the cached one;
   the time shares then compare with that earlier run's clock.
4. **IPS selection reuse** (``--ips``): IPS's CPU config (M = 16, I = 32; majority only) on the
   same data, the exact scan vs ``method.selection_refresh: 0.2`` (each image's previous top-M
   plus a fifth of the other cells; ``--ips-refresh R`` another share), the same two measures;
   ``--mm-side``, ``--mm-seed`` and ``--tag`` as in 3.
5. **Noise floor** (``--noise-floor EPS``, with 3's settings and a pretrained θ1): the exact
   fill again with θ1's starting weights scaled by ``1 + EPS·N(0, 1)`` (EPS 1e-6: a few
   float32 ulps), to see how far one seed's final accuracy moves for a change no one could
   see; the exact run is reused from the stored results of a row with the same settings
   (it is deterministic here), else run too. ``--noise-task demo``: the same on the demo task
   (2's settings), θ1 from scratch: its seeded start is saved to a file
   (:func:`initial_encoder`) and both runs start from it, one perturbed. ``--noise-draw K``
   seeds the perturbation (default 0: one direction for every seed).

``--demo-seed S`` trains the demo task (2, and its noise floor) with seed S;
``--demo-encoder-lr LR`` gives its θ1 a learning rate of its own in both runs (2).

The table ends with each variant's mean over the seeds run (:func:`seed_means`): one seed's
gap is within the noise floor, a mean over seeds less so.

Writes ``benchmarks/results/z_cache.{json,md}``.

    python benchmarks/z_cache.py --side 8192 --epochs 3           # ~5 min
    python benchmarks/z_cache.py --side 65536 --epochs 2          # hours: the 65,536² target
    python benchmarks/z_cache.py --no-speed --accuracy --epochs 5 # the demo task, ~30 min
    python benchmarks/z_cache.py --no-speed --megapixel --epochs 6  # Megapixel MNIST
    python benchmarks/z_cache.py --no-speed --megapixel --mm-pretrained --mm-side 1000 \
        --mm-train 3000 --epochs 10 --threads 1           # N = 400, pretrained θ1, ~25 min
    python benchmarks/z_cache.py --no-speed --ips --mm-pretrained --mm-train 3000 --epochs 8
    python benchmarks/z_cache.py --no-speed --mm-pretrained --mm-side 1000 --mm-train 3000 \
        --epochs 10 --threads 1 --mm-encoder-lr 1e-4 --mm-seed 2 --noise-floor 1e-6 \
        --tag lr1e-4_seed2_noise                             # ~35 min
    python benchmarks/z_cache.py --no-speed --accuracy --epochs 4 --threads 1 --z-warmup 2 \
        --demo-seed 1 --tag warm2_seed1                      # ~8 min
    python benchmarks/z_cache.py --no-speed --epochs 4 --threads 1 --noise-floor 1e-6 \
        --noise-task demo --demo-seed 1 --tag demo_seed1     # ~8 min
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from gigapatch.config import Config, load_config
from gigapatch.demo import DemoSettings, demo_configs
from gigapatch.engine.checkpoint import load_checkpoint
from gigapatch.engine.loop import seed_everything, train
from gigapatch.methods import create_method
from gigapatch.methods.patchgd import optimizer_steps
from gigapatch.models.encoders import create_encoder
from gigapatch.synth.gigapixel import generate_gigapixel
from gigapatch.synth.megapixel_mnist import (DIGIT_SIDE, generate_megapixel_mnist,
                                             load_megapixel_mnist, render_image)
from gigapatch.synth.ultramnist import generate_ultramnist
from gigapatch.tasks import create_task

from bench_data import RESULTS, save_results  # benchmarks/: run as scripts

ROOT = Path(__file__).resolve().parent.parent
POLICIES = {"none": {}, "refresh": {"z_cache": "refresh", "z_refresh": 0.1}}
#: IPS's reusing run: each image's previous top-M plus this share of the rest (``--ips-refresh``).
IPS_REFRESH = 0.2


def with_policy(cfg: Config, name: str, policies: dict[str, dict[str, Any]]) -> Config:
    """A copy of ``cfg`` named ``<name>_<policy>`` with ``policies[name]``'s method keys set."""
    out = copy.deepcopy(cfg)
    out.name = f"{cfg.name}_{name}"
    for key, value in policies[name].items():
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
        summary = train(with_policy(base, name, POLICIES), overwrite=True)
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


def policy_runs(cfg: Config, label: str, n_train: int,
                policies: dict[str, dict[str, Any]] = POLICIES,
                exact: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``cfg`` (``n_train`` training images) with each policy; held-out accuracy, elapsed
    and training time per epoch, the final gap in points and the share of the exact run's
    time (elapsed, and training only) the cached one needs to reach the exact run's final
    accuracy (``None``: not reached). ``exact``: a stored run of ``none`` (:func:`stored_exact`)
    that stands for training it again."""
    out: dict[str, Any] = {"epochs": cfg.train.epochs}
    for name in policies:
        if name == "none" and exact is not None:
            out["none"] = exact
            continue
        summary = train(with_policy(cfg, name, policies), overwrite=True)
        hist = _history(summary)
        training = [n_train / r["images_per_second"] for r in hist]
        out[name] = {"accuracy": [row["val_accuracy"] for row in hist],
                     "staleness": [row.get("z_staleness") for row in hist],
                     "refreshed": [row.get("z_refreshed") for row in hist],
                     "corrected": [row.get("z_corrected") for row in hist],
                     "residual": [row.get("z_residual") for row in hist],
                     "elapsed": [sum(r["epoch_seconds"] for r in hist[: i + 1])
                                 for i in range(len(hist))],
                     "training": [sum(training[: i + 1]) for i in range(len(hist))]}
        print(f"{label} {name}: accuracy {[round(a, 3) for a in out[name]['accuracy']]}, "
              f"{out[name]['elapsed'][-1]:.0f} s ({out[name]['training'][-1]:.0f} s training)",
              flush=True)
    return compared(out) if "refresh" in out else out


def compared(out: dict[str, Any]) -> dict[str, Any]:
    """``out`` (:func:`policy_runs`' rows of ``none`` and ``refresh``) with the final gap in
    points, the epoch at which ``refresh`` first reaches ``none``'s final accuracy and the
    share of ``none``'s time (elapsed, and training only) it needs for that (``None``: not
    reached), and the training-time ratio."""
    final = out["none"]["accuracy"][-1]
    out["gap_points"] = 100 * (out["refresh"]["accuracy"][-1] - final)
    reached = [i for i, a in enumerate(out["refresh"]["accuracy"]) if a >= final]
    out["epoch_to_exact_final"] = reached[0] + 1 if reached else None
    for key, clock in (("time_to_exact_final", "elapsed"),
                       ("training_time_to_exact_final", "training")):
        out[key] = (out["refresh"][clock][reached[0]] / out["none"][clock][-1] if reached
                    else None)
    out["training_ratio"] = out["refresh"]["training"][-1] / out["none"]["training"][-1]
    return out


def _warm_policies(cfg: Config, n_train: int, warmup_epochs: int,
                   **refresh: Any) -> dict[str, dict[str, Any]]:
    """:data:`POLICIES` with the cached one's first ``warmup_epochs`` epochs filled exactly
    (``method.z_cache_warmup``, in optimizer steps: one per batch)."""
    steps = optimizer_steps(cfg, warmup_epochs * math.ceil(n_train / cfg.train.batch_size))
    return {**POLICIES, "refresh": {**POLICIES["refresh"], **refresh, "z_cache_warmup": steps}}


def demo_patchgd(epochs: int, runs: Path, seed: int = 0) -> Config:
    """The demo task's PatchGD config (data written unless there), trained with ``seed``."""
    settings = DemoSettings(epochs=epochs)
    data = ROOT / "data" / "ultramnist-demo"
    if not (data / "train.csv").is_file():
        generate_ultramnist(data, n_train=settings.n_train, n_test=settings.n_test,
                            side=settings.side, digits_per_image=settings.digits_per_image,
                            scale_range=settings.scale_range, num_classes=settings.num_classes,
                            seed=settings.data_seed)
    pgd = demo_configs(settings, data, runs)[1]
    pgd.name, pgd.seed = "zcache_demo", seed
    return pgd


def accuracy_rows(epochs: int, runs: Path, warmup_epochs: int = 0,
                  z_correct: bool = False, seed: int = 0,
                  encoder_lr: float | None = None,
                  tolerance: float | None = None) -> dict[str, Any]:
    """The demo task's PatchGD run with each policy (:func:`policy_runs`); the cached one
    fills exactly for its first ``warmup_epochs`` epochs and with ``z_correct`` maps its kept
    cells (``method.z_correct``); ``seed``: the training seed (θ's start, sampling, order);
    ``encoder_lr``: θ1's learning rate in both runs (``train.encoder_lr``; default the
    demo's, the head's); ``tolerance``: the cached run's ``method.z_tolerance`` (its share
    re-encoded per visit follows the measured change, down to ``z_refresh``)."""
    pgd = demo_patchgd(epochs, runs, seed)
    pgd.train.encoder_lr = encoder_lr
    n_train = DemoSettings().n_train
    out = policy_runs(pgd, "demo", n_train,
                      _warm_policies(pgd, n_train, warmup_epochs, z_correct=z_correct,
                                     z_tolerance=tolerance))
    out.update(warmup_epochs=warmup_epochs, z_correct=z_correct, seed=seed,
               side=DemoSettings().side, encoder_lr=encoder_lr, z_tolerance=tolerance)
    return out


def megapixel_config(data: Path, runs: Path, epochs: int, side: int = 500) -> Config:
    """PatchGD on a CPU-sized Megapixel MNIST (majority task): patch 50, N = (side / 50)²
    cells (100 at 500²), k = 10, J = 2."""
    cfg = Config(name="zcache_megapixel", seed=0)
    cfg.data.kind, cfg.data.root, cfg.data.tasks = "megapixel_mnist", str(data), ["majority"]
    cfg.data.num_classes, cfg.data.in_chans = 10, 1
    cfg.model.encoder, cfg.model.latent_dim = "tiny_cnn_small", 64
    cfg.method.name, cfg.method.patch_size = "patchgd", 50
    cfg.method.sample_fraction = 10 / (side // 50) ** 2
    cfg.method.inner_steps, cfg.method.fill_chunk = 2, 200
    cfg.train.epochs, cfg.train.batch_size, cfg.train.progress = epochs, 16, False
    cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay = "adamw", 1e-3, 0.01
    cfg.train.warmup_epochs, cfg.train.schedule, cfg.train.out_dir = 1, "cosine", str(runs)
    return cfg


def cell_patches(root: Path, patch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split's grid cells that touch a digit, labelled with the digit overlapping
    them most (0..9), and as many random cells touching none (label 10): ``uint8 (P, 1, p, p)``
    and ``int64 (P,)``. Only training images (their own digit pool) are read."""
    gen = torch.Generator().manual_seed(seed)
    cells, labels, empty = [], [], []
    for record in load_megapixel_mnist(root, "train"):
        image = torch.from_numpy(render_image(record))
        top, left = torch.from_numpy(record.digit_yx).long().unbind(1)  # (K,) each
        n = record.side // patch
        for i in range(n):
            for j in range(n):
                y, x = i * patch, j * patch
                dy = (top + DIGIT_SIDE).clamp(max=y + patch) - top.clamp(min=y)
                dx = (left + DIGIT_SIDE).clamp(max=x + patch) - left.clamp(min=x)
                area = dy.clamp(min=0) * dx.clamp(min=0)
                crop = image[y : y + patch, x : x + patch][None]
                if int(area.max()) > 0:
                    cells.append(crop)
                    labels.append(int(record.digit_values[int(area.argmax())]))
                else:
                    empty.append(crop)
    pick = torch.randperm(len(empty), generator=gen)[: len(cells)].tolist()
    x = torch.stack(cells + [empty[i] for i in pick])
    y = torch.tensor(labels + [10] * len(pick))
    return x, y


def pretrain_encoder(root: Path, out: Path, patch: int, latent_dim: int, epochs: int = 2
                     ) -> Path:
    """θ1 (``tiny_cnn_small``) trained on :func:`cell_patches` (11 classes: the digit, or
    none) through a linear layer, saved as a state dict for ``model.weights``; the encoder a
    user would start from instead of from scratch. Written once per data set."""
    if out.is_file():
        return out
    torch.manual_seed(0)
    x, y = cell_patches(root, patch)
    encoder = create_encoder("tiny_cnn_small", latent_dim, 1)
    net = torch.nn.Sequential(encoder, torch.nn.ReLU(), torch.nn.Linear(latent_dim, 11))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    for epoch in range(epochs):
        order, correct = torch.randperm(len(y)), 0
        for idx in order.split(256):
            logits = net(x[idx].float() / 255)
            loss = torch.nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == y[idx]).sum())
        print(f"pretraining θ1 on {len(y)} cells, epoch {epoch + 1}: training accuracy "
              f"{correct / len(y):.3f}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(encoder.state_dict(), out)
    return out


def megapixel_data(n_train: int, side: int) -> Path:
    """The Megapixel-MNIST data set of these sizes (500 held-out images), written unless there."""
    noise = round(50 * (side / 1500) ** 2)  # the paper's density: 50 patterns per 1500²
    spec = {"side": side, "n_noise": noise, "n_train": n_train, "n_test": 500, "seed": 0}
    data = ROOT / "data" / (f"megapixel-mnist-zcache-{n_train}"
                            + ("" if side == 500 else f"-{side}"))
    meta = data / "meta.json"
    if not meta.is_file() or any(json.loads(meta.read_text()).get(k) != v
                                 for k, v in spec.items()):
        generate_megapixel_mnist(data, **spec)
    return data


def from_cells(cfg: Config, data: Path) -> None:
    """Start ``cfg``'s θ1 from :func:`pretrain_encoder`'s weights for ``data``."""
    cfg.model.weights = str(pretrain_encoder(data, data / "theta1_cells.pt",
                                             cfg.method.patch_size, cfg.model.latent_dim))


def ips_rows(epochs: int, n_train: int, runs: Path, pretrained: bool = False,
             side: int = 500, refresh: float = IPS_REFRESH, seed: int = 0) -> dict[str, Any]:
    """IPS (the CPU config: M = 16, I = 32, ``tiny_cnn_small``; majority only) with the exact
    selection scan vs ``selection_refresh: refresh`` (default :data:`IPS_REFRESH`), the
    same two measures, under ``seed``."""
    data = megapixel_data(n_train, side)
    cfg = load_config(ROOT / "configs" / "megapixel_mnist_ips_cpu.yaml")
    cfg.name, cfg.data.root, cfg.seed = "zcache_ips", str(data), seed
    cfg.data.tasks, cfg.data.multilabel = ["majority"], []
    cfg.train.epochs, cfg.train.progress, cfg.train.out_dir = epochs, False, str(runs)
    if pretrained:
        from_cells(cfg, data)
    policies = {"none": {}, "refresh": {"selection_refresh": refresh}}
    out = policy_runs(cfg.validate(), "ips", n_train, policies)
    out["n_train"], out["pretrained"], out["side"] = n_train, pretrained, side
    out["selection_refresh"], out["seed"] = refresh, seed
    return out


def megapixel_rows(epochs: int, n_train: int, runs: Path, pretrained: bool = False,
                   side: int = 500, encoder_lr: float | None = None,
                   z_refresh: float = 0.1, seed: int = 0,
                   warmup_epochs: int = 0, tolerance: float | None = None,
                   correct: bool = False, exact: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """:func:`megapixel_config` with each policy; ``encoder_lr``: θ1's learning rate
    (``train.encoder_lr``; default the head's 1e-3), ``z_refresh``: the cached policy's share
    of cells re-encoded per visit (the least share with ``tolerance``: ``method.z_tolerance``),
    ``warmup_epochs``: its first epochs fill Z exactly, ``correct``: ``method.z_correct``;
    ``exact``: a stored exact run of these settings, not trained again."""
    data = megapixel_data(n_train, side)
    cfg = megapixel_config(data, runs, epochs, side)
    cfg.train.encoder_lr, cfg.seed = encoder_lr, seed
    if pretrained:
        from_cells(cfg, data)
    policies = _warm_policies(cfg, n_train, warmup_epochs, z_refresh=z_refresh,
                              z_tolerance=tolerance, z_correct=correct)
    out = policy_runs(cfg, "megapixel", n_train, policies, exact)
    out["n_train"], out["pretrained"], out["side"] = n_train, pretrained, side
    out["reused_exact"] = exact is not None
    out["encoder_lr"], out["z_refresh"], out["seed"] = encoder_lr, z_refresh, seed
    out["warmup_epochs"], out["z_tolerance"], out["z_correct"] = warmup_epochs, tolerance, correct
    return out


def perturbed_weights(src: Path, eps: float, seed: int = 0) -> Path:
    """``src``'s state dict with every floating tensor scaled elementwise by ``1 + eps·n``,
    ``n`` standard normal (seeded), written beside it: θ1 moved by about as much as float32
    rounding (``eps`` 1e-6 is a few ulps), to measure how far the exact run drifts from a
    change no one could see."""
    out = src.with_name(f"{src.stem}_perturbed{eps:g}_{seed}.pt")
    if out.is_file():
        return out
    gen = torch.Generator().manual_seed(seed)
    state = {k: (v * (1 + eps * torch.randn(v.shape, generator=gen)) if v.is_floating_point()
                 else v) for k, v in torch.load(src, weights_only=True).items()}
    torch.save(state, out)
    return out


def stored_exact(results: dict[str, Any], want: dict[str, Any]) -> dict[str, Any] | None:
    """A stored Megapixel-MNIST row's exact (``none``) run with the settings ``want`` (seed,
    side, n_train, encoder_lr, pretrained, epochs), or ``None``. The exact run is
    deterministic on one machine (seeds 1 and 2 reproduced to the digit three times), so its
    stored accuracies stand for a rerun."""
    for key, row in results.items():
        if key.startswith("megapixel") and all(row.get(k) == v for k, v in want.items()):
            return row["none"]
    return None


def initial_encoder(cfg: Config, out: Path) -> Path:
    """θ1 as the method built from scratch under ``cfg.seed`` starts it, saved to ``out`` for
    ``model.weights``: a start from a file, which :func:`perturbed_weights` can move. Checks
    that with it the method starts exactly as without (every parameter of θ1 and θ2 equal)
    and raises ``RuntimeError`` otherwise."""
    seed_everything(cfg.seed)
    method = create_method(cfg, create_task(cfg))
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(method.encoder.state_dict(), out)
    again = copy.deepcopy(cfg)
    again.model.weights = str(out)
    seed_everything(cfg.seed)
    other = create_method(again, create_task(again))
    a, b = method.state_dict(), other.state_dict()
    if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
        raise RuntimeError(f"{out}: the method built with model.weights = this file does not "
                           "start as the one built from scratch; the noise floor would "
                           "compare two different starts.")
    return out


def _noise_pair(cfg: Config, label: str, n_train: int, eps: float,
                exact: dict[str, Any] | None, draw: int = 0) -> dict[str, Any]:
    """``cfg`` (θ1 from the file ``cfg.model.weights``) with the exact fill (``exact``: a
    stored run of it; run here when ``None``) and again with θ1 perturbed by a relative
    ``eps`` (:func:`perturbed_weights`, its noise seeded by ``draw``); :func:`compared`'s
    measures, the perturbed run in the cached run's place."""
    base: dict[str, dict[str, Any]] = {"none": {}}
    out = policy_runs(cfg, label, n_train, base, exact)
    moved = copy.deepcopy(cfg)
    moved.model.weights = str(perturbed_weights(Path(cfg.model.weights), eps, draw))
    moved.name = f"{cfg.name}_perturbed"
    out["refresh"] = policy_runs(moved, f"{label} (θ1 perturbed)", n_train, base)["none"]
    out.update(seed=cfg.seed, eps=eps, draw=draw, reused_exact=exact is not None)
    return compared(out)


def noise_rows(epochs: int, n_train: int, runs: Path, side: int, encoder_lr: float | None,
               seed: int, eps: float, exact: dict[str, Any] | None, draw: int = 0
               ) -> dict[str, Any]:
    """The noise floor of one seed's Megapixel-MNIST comparison (:func:`_noise_pair`):
    :func:`megapixel_config`'s exact fill with θ1 pretrained, and with θ1 perturbed."""
    data = megapixel_data(n_train, side)
    cfg = megapixel_config(data, runs, epochs, side)
    cfg.train.encoder_lr, cfg.seed = encoder_lr, seed
    from_cells(cfg, data)
    out = _noise_pair(cfg, "noise", n_train, eps, exact, draw)
    out.update(n_train=n_train, side=side, encoder_lr=encoder_lr)
    return out


def demo_noise_rows(epochs: int, runs: Path, seed: int, eps: float, draw: int = 0
                    ) -> dict[str, Any]:
    """The noise floor of one seed's demo-task comparison (:func:`_noise_pair`): θ1 from
    scratch, as the demo trains it, started from a file (:func:`initial_encoder`) with the
    exact fill, and from that file perturbed. Both runs are made here: a stored exact demo
    run started from no file, so it stands for the first only if the file holds its start."""
    cfg = demo_patchgd(epochs, runs, seed)
    cfg.model.weights = str(initial_encoder(cfg, runs / f"theta1_demo_init_seed{seed}.pt"))
    out = _noise_pair(cfg, "demo noise", DemoSettings().n_train, eps, None, draw)
    out.update(side=DemoSettings().side, task="demo")
    return out


def noise_table(results: dict[str, Any]) -> list[str]:
    """The noise-floor rows (``noise_*`` keys), one line per seed."""
    rows = [results[k] for k in sorted(results) if k.startswith("noise")]
    if not rows:
        return []
    lines = ["", "Noise floor: the exact fill twice, θ1 at its start and θ1 scaled by "
             "(1 + eps·N(0, 1)) (Megapixel MNIST: θ1 pretrained, the rows' settings; demo: θ1 "
             "from scratch, the demo's settings):", "",
             "| task | seed | side | eps | exact final | perturbed final | gap (points) | "
             "perturbed, per epoch |", "|---|---|---|---|---|---|---|---|"]
    for a in rows:
        acc = ", ".join(f"{v:.3f}" for v in a["refresh"]["accuracy"])
        task = "demo" if a.get("task") == "demo" else "Megapixel MNIST"
        draw = f" (draw {a['draw']})" if a.get("draw") else ""
        lines.append(f"| {task} | {a['seed']} | {a['side']}² | {a['eps']:g}{draw} | "
                     f"{a['none']['accuracy'][-1]:.3f} | {a['refresh']['accuracy'][-1]:.3f} | "
                     f"{a['gap_points']:+.1f} | {acc} |")
    return lines


def seed_means(results: dict[str, Any]) -> list[str]:
    """Each demo-task and Megapixel-MNIST variant over its seeds (stored keys that differ
    only in ``_seedS``, of the same canvas side and epochs; two or more seeds): the mean final
    accuracy of the exact and the cached (or perturbed) runs, the gap of the means and each
    seed's, and where the mean cached curve first reaches the mean exact final accuracy
    (epoch; its mean training time over the exact runs' mean)."""
    groups: dict[tuple[str, int, int], list[tuple[int, dict[str, Any]]]] = {}
    for key in sorted(results):
        row = results[key]
        if key.startswith(("accuracy", "megapixel", "noise")) and "refresh" in row:
            side = row.get("side", DemoSettings().side if key.startswith("accuracy") else 500)
            variant = (re.sub(r"_seed\d+", "", key), side, row["epochs"])
            groups.setdefault(variant, []).append((row.get("seed", 0), row))
    lines = ["", "Over seeds (each seed's exact and cached runs from its own row; the means "
             "of the curves; in the noise rows the perturbed exact run stands for the cached one):",
             "", "| rows | seeds | exact, mean final | cached, mean final | "
             "gap of the means | gap per seed | mean curve reaches the exact mean |",
             "|---|---|---|---|---|---|---|"]
    for (name, side, epochs), rows in groups.items():
        if len(rows) < 2:
            continue
        exact, cached = (torch.tensor([r[p]["accuracy"] for _, r in rows]).mean(0)
                         for p in ("none", "refresh"))
        final = float(exact[-1])
        reached = (cached >= final).nonzero().flatten().tolist()
        if reached:
            e = reached[0]
            spent = sum(r["refresh"]["training"][e] for _, r in rows)
            whole = sum(r["none"]["training"][-1] for _, r in rows)
            where = f"epoch {e + 1}, {spent / whole:.2f} of the training time"
        else:
            where = "not reached"
        gaps = ", ".join(f"{r['gap_points']:+.1f}" for _, r in rows)
        lines.append(f"| {name} ({side}², {epochs} epochs) | "
                     f"{', '.join(str(s) for s, _ in rows)} | {final:.3f} | "
                     f"{float(cached[-1]):.3f} | {100 * (float(cached[-1]) - final):+.1f} | "
                     f"{gaps} | {where} |")
    return lines if len(lines) > 5 else []


def later(a: dict[str, Any]) -> str:
    """``a``'s training time per epoch after the first (which fills every cell under both
    policies), cached and exact, and their ratio: ``"; epochs 2+: … s vs … s (…)"``."""
    clocks = [a[name].get("training", []) for name in ("refresh", "none")]
    if any(len(c) < 2 for c in clocks):
        return ""
    cached, exact = ((c[-1] - c[0]) / (len(c) - 1) for c in clocks)
    return f"; epochs 2+: {cached:.0f} vs {exact:.0f} s per epoch ({cached / exact:.2f})"


def table(results: dict[str, Any]) -> list[str]:
    lines = []
    s = results.get("speed")
    if s:
        lines += [f"PatchGD, tiny_cnn_small, {s['side']:,}² (2 images), patch {s['patch']}, "
                  f"k = 4, J = 2, batch 1, {s['epochs']} epochs:", "",
                  "| z_cache | training time per epoch (s) | mean of epochs 2+ |",
                  "|---|---|---|"]
        for name in POLICIES:
            times = ", ".join(f"{t:.1f}" for t in s[name]["train_seconds"])
            lines.append(f"| {name} | {times} | {s[name]['later_epochs']:.1f} s |")
        lines += ["", f"refresh / none, training, epochs 2+: **{s['ratio']:.3f}** (target ≤ "
                  f"0.2); with the held-out pass (an exact prediction, the same for both): "
                  f"{s['ratio_with_validation']:.3f}."]
    for key in sorted(k for k in results if k.startswith(("accuracy", "megapixel", "ips"))):
        a = results.get(key)
        if not a:
            continue
        if key.startswith("accuracy"):
            title = ("Demo task" + (f" (exact fill for the first {a['warmup_epochs']} epochs)"
                                    if a.get("warmup_epochs") else "")
                     + (" (kept cells mapped, `z_correct`)" if a.get("z_correct") else "")
                     + (f", z_tolerance {a['z_tolerance']:g}" if a.get("z_tolerance") else "")
                     + (f", θ1 learning rate {a['encoder_lr']:g}" if a.get("encoder_lr")
                        else "")
                     + (f", seed {a['seed']}" if a.get("seed") else ""))
        elif key.startswith("ips"):
            side = a.get("side", 500)
            title = (f"IPS, Megapixel MNIST majority ({side}², M = 16, I = 32, "
                     f"{a['n_train']} training images; refresh = `selection_refresh: "
                     f"{a.get('selection_refresh', IPS_REFRESH):g}`"
                     + (f", seed {a['seed']}" if a.get("seed") else "") + ")")
        else:
            side = a.get("side", 500)
            title = (f"Megapixel MNIST ({side}², N = {(side // 50) ** 2}, k = 10, J = 2, batch "
                     f"16, {a['n_train']} training images, θ1 "
                     + ("pretrained on training cells" if a.get("pretrained") else
                        "from scratch")
                     + (f", θ1 learning rate {a['encoder_lr']:g}" if a.get("encoder_lr") else "")
                     + (f", z_refresh {a.get('z_refresh', 0.1):g}" if not a.get("z_tolerance")
                        else f", z_tolerance {a['z_tolerance']:g} (share ≥ z_refresh "
                             f"{a.get('z_refresh', 0.1):g})")
                     + (f", exact fill for the first {a['warmup_epochs']} epochs"
                        if a.get("warmup_epochs") else "")
                     + (", kept cells mapped (`z_correct`)" if a.get("z_correct") else "")
                     + f", seed {a.get('seed', 0)})")
        lines += ["", f"{title}, {a['epochs']} epochs:", "", "| policy | held-out accuracy "
                  "per epoch | time (training only) |", "|---|---|---|"]
        for name in ("none", "refresh"):
            acc = ", ".join(f"{v:.3f}" for v in a[name]["accuracy"])
            train_s = a[name].get("training", [float("nan")])[-1]
            lines.append(f"| {name} | {acc} | {a[name]['elapsed'][-1]:.0f} s "
                         f"({train_s:.0f} s) |")

        if any(v is not None for v in a["refresh"].get("staleness", [])):
            lines += ["", "refresh, per epoch: Z staleness (mean change of the re-encoded cached "
                      "cells) " + ", ".join("–" if v is None else f"{v:.3f}"
                                            for v in a["refresh"]["staleness"])
                      + "; share of the cached cells re-encoded "
                      + ", ".join("–" if v is None else f"{v:.2f}"
                                  for v in a["refresh"]["refreshed"]) + "."]
        if any(v is not None for v in a["refresh"].get("corrected", [])):
            lines += ["", "z_correct, per epoch: share of the cached cells mapped "
                      + ", ".join("–" if v is None else f"{v:.2f}"
                                  for v in a["refresh"]["corrected"])
                      + "; held-out change left after the map (z_residual) "
                      + ", ".join("–" if v is None else f"{v:.3f}"
                                  for v in a["refresh"]["residual"]) + "."]

        def share(v: float | None) -> str:
            return f"{v:.2f} of its time" if v is not None else "not reached"

        lines += ["", f"final gap {a['gap_points']:+.1f} points (target within 1); time to the "
                  f"exact run's final accuracy: {share(a['time_to_exact_final'])}, training "
                  f"only {share(a.get('training_time_to_exact_final'))} (target ≤ 1/3); "
                  f"training time, all epochs: refresh / none = "
                  f"{a.get('training_ratio', float('nan')):.2f}" + later(a) + "."]
    return lines + noise_table(results) + seed_means(results)


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
    p.add_argument("--ips", action="store_true",
                   help="also IPS's selection reuse on Megapixel MNIST (--mm-* sizes, "
                        "--mm-seed)")
    p.add_argument("--ips-refresh", type=float, default=IPS_REFRESH, metavar="R",
                   help=f"--ips: the reusing run's method.selection_refresh (default "
                        f"{IPS_REFRESH:g})")
    p.add_argument("--mm-side", type=int, default=500,
                   help="Megapixel-MNIST canvas side (patch 50: N = (side / 50)² cells)")
    p.add_argument("--mm-pretrained", action="store_true",
                   help="Megapixel MNIST: start θ1 from an encoder pretrained on the training "
                        "images' grid cells (digit or none), not from scratch")
    p.add_argument("--mm-encoder-lr", type=float, default=None,
                   help="Megapixel MNIST: θ1's learning rate (train.encoder_lr; default the "
                        "head's 1e-3): a slowly moving θ1 keeps the cache fresh")
    p.add_argument("--mm-z-refresh", type=float, default=0.1,
                   help="Megapixel MNIST: the cached policy's method.z_refresh")
    p.add_argument("--z-warmup", type=int, default=0, metavar="EPOCHS",
                   help="demo task and Megapixel MNIST: the cached policy fills Z exactly for "
                        "its first EPOCHS epochs (method.z_cache_warmup), while θ1 moves "
                        "fastest")
    p.add_argument("--z-tolerance", type=float, default=None, metavar="T",
                   help="demo task and Megapixel MNIST: the cached policy's "
                        "method.z_tolerance (the share re-encoded per visit follows the "
                        "measured change, from every cell down to z_refresh)")
    p.add_argument("--z-correct", action="store_true",
                   help="demo task and Megapixel MNIST: the cached policy maps its kept cells "
                        "by the change fitted on the re-encoded ones (method.z_correct)")
    p.add_argument("--noise-floor", type=float, default=None, metavar="EPS",
                   help="instead of the cache, the exact fill again with θ1 scaled by "
                        "(1 + EPS·N(0, 1)), on --noise-task; on Megapixel MNIST (θ1 "
                        "pretrained) the exact run is reused from the stored results when one "
                        "matches (seed, side, sizes, lr)")
    p.add_argument("--noise-draw", type=int, default=0, metavar="K",
                   help="--noise-floor: the seed of the perturbation's noise (default 0; "
                        "another K perturbs θ1 in another direction)")
    p.add_argument("--noise-task", choices=("megapixel", "demo"), default="megapixel",
                   help="the task of --noise-floor: Megapixel MNIST (θ1 pretrained) or the "
                        "demo task (θ1 from scratch: its seeded start saved, then perturbed)")
    p.add_argument("--demo-seed", type=int, default=0,
                   help="demo task: the training seed (θ's start, sampling, order)")
    p.add_argument("--demo-encoder-lr", type=float, default=None,
                   help="demo task (--accuracy): θ1's learning rate in both runs "
                        "(train.encoder_lr; default the demo's 3e-3, the head's)")
    p.add_argument("--mm-seed", type=int, default=0,
                   help="Megapixel MNIST: the training seed (θ2's start, sampling, order)")
    p.add_argument("--reuse-exact", action="store_true",
                   help="Megapixel MNIST (θ1 pretrained): take the exact run from a stored row "
                        "with the same settings (deterministic here) instead of training it "
                        "again; its times come from that earlier run")
    p.add_argument("--tag", default="",
                   help="store the demo, Megapixel-MNIST, IPS and noise-floor results under "
                        "accuracy_<tag>, megapixel_<tag>, ips_<tag> and noise_<tag> (keeps "
                        "others)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-zcache")
    args = p.parse_args(argv)
    if args.reuse_exact and not (args.megapixel and args.mm_pretrained):
        p.error("--reuse-exact: only with --megapixel --mm-pretrained (the stored exact runs "
                "are of a pretrained θ1)")
    if not 0 < args.ips_refresh <= 1:  # checked before the exact run trains, not after
        p.error(f"--ips-refresh {args.ips_refresh:g}: method.selection_refresh must be in "
                "(0, 1] (the share of the other cells scanned per step)")
    saved = RESULTS / "z_cache.json"
    want = {"seed": args.mm_seed, "side": args.mm_side, "n_train": args.mm_train,
            "encoder_lr": args.mm_encoder_lr, "pretrained": True, "epochs": args.epochs}
    stored = stored_exact(json.loads(saved.read_text()) if saved.is_file() else {}, want)
    if args.reuse_exact and stored is None:  # (checked before anything trains)
        p.error(f"--reuse-exact: no stored Megapixel-MNIST row in {saved} has these settings "
                "(seed, side, sizes, lr, epochs, θ1 pretrained); run once without it")
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    if not args.no_speed:
        results["speed"] = speed_rows(args.side, args.patch, args.epochs, args.runs)
    if args.accuracy:
        key = f"accuracy_{args.tag}" if args.tag else "accuracy"
        results[key] = accuracy_rows(args.epochs, args.runs, args.z_warmup, args.z_correct,
                                     args.demo_seed, args.demo_encoder_lr, args.z_tolerance)
    if args.megapixel:
        key = f"megapixel_{args.tag}" if args.tag else "megapixel"
        results[key] = megapixel_rows(args.epochs, args.mm_train, args.runs, args.mm_pretrained,
                                      args.mm_side, args.mm_encoder_lr, args.mm_z_refresh,
                                      args.mm_seed, args.z_warmup, args.z_tolerance,
                                      args.z_correct, stored if args.reuse_exact else None)
    if args.noise_floor is not None and args.noise_task == "demo":
        results[f"noise_{args.tag}" if args.tag else "noise_demo"] = demo_noise_rows(
            args.epochs, args.runs, args.demo_seed, args.noise_floor, args.noise_draw)
    elif args.noise_floor is not None:
        results[f"noise_{args.tag}" if args.tag else "noise"] = noise_rows(
            args.epochs, args.mm_train, args.runs, args.mm_side, args.mm_encoder_lr,
            args.mm_seed, args.noise_floor, stored, args.noise_draw)
    if args.ips:
        key = f"ips_{args.tag}" if args.tag else "ips"
        results[key] = ips_rows(args.epochs, args.mm_train, args.runs, args.mm_pretrained,
                                args.mm_side, args.ips_refresh, args.mm_seed)
    save_results("z_cache", results, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
