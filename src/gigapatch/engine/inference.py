"""Batch inference: one checkpoint over many slides, one CSV row per slide, resumable.

:func:`predict_many` runs a trained method over a list of images (from a CSV or a folder,
:func:`list_images`) and appends one row per image to ``preds.csv`` as soon as it is done
(flushed), so a crash loses at most the image in progress; a rerun skips the images already
in the file. An image that cannot be read (or fails) gets a row with its ``error`` and the
rest go on; ``retry_errors=True`` drops those rows and tries them again.

Columns: ``path``, then for image-level tasks ``prediction``, ``confidence`` and
``prob_<c>`` per class (multi-head tasks: ``<task>_prediction``, ``<task>_prob_<c>``, …;
multi-label heads ``<task>_present``), for segmentation ``fraction_<c>`` (share of the pixels
per class) and ``mask`` (with ``masks_dir``), for detection ``detections`` (their number) and
``boxes`` (with ``boxes_dir``: a COCO results JSON per image); ``heatmap`` (with
``heatmaps_dir``), ``error``.

Decoding whole-image formats (PNG, JPEG) happens in DataLoader workers; tiled TIFFs, slides
and ``.npy`` files are opened lazily and read patch by patch by the method.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from gigapatch.config import Config
from gigapatch.core.errors import DataError, GigapatchError
from gigapatch.data.batch import LazyBatch
from gigapatch.io.image import read_image, write_mask_blocks
from gigapatch.io.readers import SUPPORTED_EXTENSIONS, open_image
from gigapatch.io.resolution import at_resolution
from gigapatch.methods import Method
from gigapatch.tasks import Task
from gigapatch.tasks.detect import coco_results

__all__ = ["MaskResult", "list_images", "load_for_predict", "predict_many", "stream_mask"]

log = logging.getLogger("gigapatch")

#: Readers that stream (patch by patch) rather than decode the whole image.
LAZY_KINDS = ("tiff", "openslide", "numpy")


def list_images(csv_path: str | Path | None = None, folder: str | Path | None = None, *,
                path_column: str = "path", suffix: str = "", root: str | Path | None = None
                ) -> list[Path]:
    """The images to predict: the ``path_column`` of a CSV (plus ``suffix``, relative to
    ``root`` or else to the CSV's folder; e.g. PANDA's ``image_id`` with ``suffix=".tiff"``),
    or every supported image file of ``folder`` (sorted, recursively)."""
    if (csv_path is None) == (folder is None):
        raise GigapatchError("give the images as a CSV or as a folder (one of the two).")
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"no folder {folder}.")
        found = sorted(p for p in folder.rglob("*")
                       if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS)
        if not found:
            raise DataError(f"{folder} holds no images ({', '.join(sorted(SUPPORTED_EXTENSIONS))}).")
        return found
    csv_path = Path(csv_path)  # type: ignore[arg-type]
    if not csv_path.is_file():
        raise DataError(f"no CSV {csv_path}.")
    base = Path(root) if root is not None else csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, skipinitialspace=True)
        fields = [f.strip() for f in reader.fieldnames or []]
        if path_column not in fields:
            raise DataError(f"{csv_path} has no column {path_column!r} (columns {fields}); name "
                            "the image column with --path-column.")
        reader.fieldnames = fields
        paths = []
        for row in reader:
            text = (row.get(path_column) or "").strip()
            if not text:
                raise DataError(f"{csv_path}, line {reader.line_num}: empty {path_column!r}.")
            path = Path(text + suffix)
            paths.append(path if path.is_absolute() else base / path)
    if not paths:
        raise DataError(f"{csv_path} lists no images.")
    return paths


def load_for_predict(path: str | Path, in_chans: int, level: int | None = None,
                     mpp: float | None = None) -> torch.Tensor | LazyBatch:
    """One image as a method takes it: a :class:`LazyBatch` of one lazy reader (tiled TIFF,
    slides, ``.npy``; any image when a ``level`` or ``mpp`` is asked, at that resolution as
    in training, :func:`~gigapatch.io.resolution.at_resolution`), else the decoded
    ``(1, C, H, W)`` uint8 tensor. Raises :class:`DataError` naming the file when it cannot
    be read or has the wrong channels."""
    path = Path(path)
    kind = SUPPORTED_EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of "
                        f"{', '.join(sorted(SUPPORTED_EXTENSIONS))}.")
    if kind in LAZY_KINDS or level is not None or mpp is not None:
        image: torch.Tensor | LazyBatch = LazyBatch([at_resolution(open_image(path), level, mpp)])
    else:
        image = torch.from_numpy(read_image(path)).permute(2, 0, 1)[None]
    if image.shape[1] != in_chans:
        raise DataError(f"{path} has {image.shape[1]} channel(s), but the checkpoint was "
                        f"trained on {in_chans}-channel images.")
    return image


@dataclass
class MaskResult:
    """What :func:`stream_mask` gives: the class ``fractions`` (JSON), the thumbnail of the
    ids ``thumb`` (uint8 ``(h', w')``) and the written ``mask`` path (or ``None``)."""

    fractions: dict[str, Any]
    thumb: torch.Tensor
    mask: Path | None


def stream_mask(method: Method, task: Task, image: torch.Tensor | LazyBatch,
                mask_path: str | Path | None, thumb_side: int) -> MaskResult:
    """Segmentation of one image, streamed block by block (call under ``inference_mode``):
    writes the class ids to ``mask_path`` (PNG, or tiled TIFF never held whole), counts the
    classes and keeps a thumbnail of at most ``thumb_side`` px per side for overlays."""
    h, w = image.shape[-2:]
    step = max(1, math.ceil(max(h, w) / thumb_side))  # thumbnail: every step-th pixel
    thumb = torch.zeros(math.ceil(h / step), math.ceil(w / step), dtype=torch.uint8)
    counts = torch.zeros(task.num_classes, dtype=torch.int64)

    def watched(blocks: Iterator[tuple[int, int, torch.Tensor]]) -> Iterator[tuple[int, int, Any]]:
        for y, x, ids in blocks:
            counts.add_(torch.bincount(ids.flatten().long(), minlength=len(counts)))
            oy, ox = -y % step, -x % step
            part = ids[oy::step, ox::step]
            ty, tx = (y + oy) // step, (x + ox) // step
            thumb[ty : ty + part.shape[0], tx : tx + part.shape[1]] = part
            yield y, x, ids.numpy()

    block, blocks = method.mask_blocks(image)
    written = None
    if mask_path:
        written = write_mask_blocks(mask_path, (h, w), block, watched(blocks))
    else:
        for _ in watched(blocks):
            pass
    return MaskResult(task.fractions(counts, (h, w)), thumb, written)


class _Images(Dataset):
    """``(path, image or None, error or "")`` per path; whole-image formats decoded here (in
    the workers), lazy ones opened in the main process (their readers hold file handles)."""

    def __init__(self, paths: list[Path], in_chans: int, lazy: bool = False) -> None:
        self.paths, self.in_chans, self.lazy = paths, in_chans, lazy

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor | None, str]:
        path = self.paths[i]
        if self.lazy or SUPPORTED_EXTENSIONS.get(path.suffix.lower()) in LAZY_KINDS:
            return str(path), None, ""
        try:
            return str(path), load_for_predict(path, self.in_chans), ""  # type: ignore[return-value]
        except (DataError, OSError, ValueError) as e:
            return str(path), None, _one_line(e)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _flatten(result: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A task's prediction JSON as CSV columns (see the module doc)."""
    row: dict[str, Any] = {}
    for key, value in result.items():
        if key == "tasks":
            for name, sub in value.items():
                row.update(_flatten(sub, f"{name}_"))
        elif key == "probabilities":
            row.update({f"{prefix}prob_{c}": v for c, v in enumerate(value)})
        elif key == "class_fractions":
            row.update({f"{prefix}fraction_{c}": v for c, v in value.items()})
        elif key == "present":
            row[f"{prefix}present"] = " ".join(map(str, value))
        elif not isinstance(value, (dict, list)):
            row[f"{prefix}{key}"] = value
    return row


def _done(out_csv: Path, retry_errors: bool) -> tuple[set[str], list[str] | None]:
    """Paths already in ``out_csv`` and its header; with ``retry_errors`` the error rows are
    removed from the file first (atomically rewritten) so that they are tried again."""
    if not out_csv.is_file() or out_csv.stat().st_size == 0:
        return set(), None
    with open(out_csv, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    if "path" not in header:
        raise DataError(f"{out_csv} exists but is not a gigapatch predictions file (no 'path' "
                        "column); choose another --out.")
    if retry_errors and any(r.get("error") for r in rows):
        rows = [r for r in rows if not r.get("error")]
        tmp = out_csv.with_suffix(out_csv.suffix + ".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(out_csv)
    return {r["path"] for r in rows}, header


def predict_many(method: Method, task: Task, cfg: Config, paths: list[Path], out_csv: str | Path,
                 *, heatmaps_dir: str | Path | None = None, masks_dir: str | Path | None = None,
                 boxes_dir: str | Path | None = None,
                 workers: int = 0, retry_errors: bool = False, progress: bool = True
                 ) -> dict[str, int]:
    """Predict every image of ``paths`` not yet in ``out_csv``; append a row per image.

    ``method`` in eval mode (:func:`~gigapatch.engine.checkpoint.load_method`). Returns the
    counts ``{"done", "skipped", "errors"}``. ``heatmaps_dir``: image-level tasks also draw
    each image's evidence (:meth:`Method.explain`) to ``<dir>/<stem>.png``; ``masks_dir``:
    segmentation writes each mask to ``<dir>/<stem>.png`` (``.tiff`` above 8,192 px)."""
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    done, header = _done(out_csv, retry_errors)
    todo = [p for p in paths if str(p) not in done]
    counts = {"done": 0, "skipped": len(paths) - len(todo), "errors": 0}
    if counts["skipped"]:
        log.info("%s: %d of %d images already predicted; skipping them", out_csv,
                 counts["skipped"], len(paths))
    for folder in (heatmaps_dir, masks_dir, boxes_dir):
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
    d = cfg.data
    at_level = d.level is not None or d.mpp is not None
    loader = DataLoader(_Images(todo, d.in_chans, lazy=at_level), batch_size=None, shuffle=False,
                        num_workers=workers, collate_fn=lambda item: item)
    handle = open(out_csv, "a", newline="", encoding="utf-8")  # noqa: SIM115 - kept open
    writer: csv.DictWriter | None = None
    pending: list[dict[str, Any]] = []  # error rows before the first success: its columns
    try:
        for path, image, error in tqdm(loader, total=len(todo), desc="predict", unit="image",
                                       disable=not progress):
            row: dict[str, Any] = {"path": path}
            try:
                if error:
                    raise DataError(error)
                if image is None:
                    image = load_for_predict(path, d.in_chans, d.level, d.mpp)
                row.update(_predict_one(method, task, image, Path(path), heatmaps_dir,
                                        masks_dir, boxes_dir))
                counts["done"] += 1
            except (GigapatchError, OSError, ValueError, RuntimeError) as e:
                row["error"] = _one_line(e)
                counts["errors"] += 1
                log.warning("%s: %s", path, row["error"])
            if writer is None and header is None and "error" in row:
                pending.append(row)
                continue
            if writer is None:
                writer = _writer(handle, header or ["path", *row, "error"])
            for r in [*pending, row]:
                writer.writerow(r)
            pending = []
            handle.flush()
        if pending:  # every image failed: columns from the task's classes
            writer = writer or _writer(handle, header or _fallback_header(task, cfg.data.num_classes))
            writer.writerows(pending)
    finally:
        handle.close()
    return counts


def _writer(handle: Any, header: list[str]) -> csv.DictWriter:
    writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(header)), extrasaction="ignore")
    if handle.tell() == 0:
        writer.writeheader()
    return writer


def _fallback_header(task: Task, k: int) -> list[str]:
    """Columns of a new predictions file whose every image failed (``k`` classes)."""
    if task.detects:
        return ["path", "detections", "boxes", "error"]
    keys = ([f"fraction_{c}" for c in range(k)] if task.dense else
            ["prediction", "confidence", *[f"prob_{c}" for c in range(k)]])
    return ["path", *keys, "error"]


def _predict_one(method: Method, task: Task, image: torch.Tensor | LazyBatch, path: Path,
                 heatmaps_dir: str | Path | None, masks_dir: str | Path | None,
                 boxes_dir: str | Path | None = None) -> dict[str, Any]:
    if task.detects:  # the number of detections here, the boxes in <boxes_dir>/<stem>.json
        with torch.inference_mode():
            found = method.predict(image)[0]
        row: dict[str, Any] = {"detections": int(len(found["scores"]))}
        if boxes_dir:
            out = Path(boxes_dir) / f"{path.stem}.json"
            ids = method.cfg.data.category_ids
            out.write_text(json.dumps(coco_results(found, category_ids=ids)))
            row["boxes"] = str(out)
        return row
    if task.dense:
        mask = None
        if masks_dir:
            big = max(image.shape[-2:]) > 8192
            mask = Path(masks_dir) / f"{path.stem}{'.tiff' if big else '.png'}"
        with torch.inference_mode():
            result = stream_mask(method, task, image, mask, thumb_side=1)
        row = _flatten(result.fractions)
        if mask:
            row["mask"] = str(result.mask)
        return row
    if heatmaps_dir:
        with torch.no_grad():
            output, drawn = method.explain(image, str(Path(heatmaps_dir) / f"{path.stem}.png"))
        return {**_flatten(task.prediction(output, 0)), "heatmap": str(drawn)}
    with torch.inference_mode():
        output = method.predict(image)
    return _flatten(task.prediction(output, 0))
