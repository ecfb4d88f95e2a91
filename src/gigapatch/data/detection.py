"""Object boxes for detection: COCO JSON or a ``path,x0,y0,x1,y1,label`` CSV, checked on read.

**COCO** (the convention of every detection tool): ``images`` (``id``, ``file_name`` relative
to ``image_root``, default the JSON's folder, ``width``, ``height``), ``annotations``
(``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]`` in level-0 pixels, optional
``iscrowd``: crowd boxes are left out of training, as torchvision's references do),
``categories`` (``id``, ``name``). **CSV**: one row per box, ``path,x0,y0,x1,y1,label`` with
``label`` a category id (1, 2, …, used as the model's label itself, so that training and
held-out CSVs agree; an image without boxes is a row with empty box fields).

Category ids (any positive integers) map to the model's labels ``1..K`` in sorted id order
(:attr:`DetectionRecords.category_ids`); label 0 is no object, torchvision's convention.

Targets are one dict per image, as torchvision's detection models take them: ``boxes``
``float32 (n, 4)`` as ``(x0, y0, x1, y1)`` in level-0 pixels and ``labels`` ``int64 (n,)``.

Everything a user can get wrong is reported naming the file and the value: a box outside its
image, a negative or zero width or height, an unknown category id, an image listed twice,
annotations for an image id that is not listed, a missing image file or column.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from gigapatch.core.errors import DataError
from gigapatch.io.image import read_image
from gigapatch.io.readers import ImageReader, open_image

__all__ = ["DetectionDataset", "DetectionRecords", "read_box_csv", "read_coco", "write_coco"]


@dataclass
class DetectionRecords:
    """Images with their boxes: ``paths``, ``sizes`` ``(H, W)`` (``None`` when the source
    does not say), ``boxes`` per image ``float32 (n, 4)`` xyxy, ``labels`` ``int64 (n,)``
    (1..K), COCO ``image_ids``, the sorted ``category_ids`` and their ``names``."""

    paths: list[Path] = field(default_factory=list)
    sizes: list[tuple[int, int] | None] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    image_ids: list[int] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """Object categories ``K`` (labels ``1..K``)."""
        return len(self.category_ids)


def _number(value: Any, where: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise DataError(f"{where}: {what} {value!r} is not a finite number.")
    return float(value)


def _check_box(box: tuple[float, float, float, float], size: tuple[int, int] | None,
               where: str) -> None:
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise DataError(f"{where}: box (x0, y0, x1, y1) = {box} has a width or height ≤ 0 "
                        f"(width {x1 - x0:g}, height {y1 - y0:g}).")
    if size is not None:
        h, w = size
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            raise DataError(f"{where}: box (x0, y0, x1, y1) = {box} reaches outside its "
                            f"{w}×{h} (W×H) image. Boxes are in level-0 pixels.")


def read_coco(json_path: str | Path, image_root: str | Path | None = None) -> DetectionRecords:
    """Read and check a COCO detection JSON (see the module doc)."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise DataError(f"COCO annotations not found: {json_path}.")
    try:
        coco = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{json_path} is not valid JSON: {e}.") from None
    if not isinstance(coco, dict):
        raise DataError(f"{json_path}: a COCO file is an object with 'images', 'annotations' "
                        "and 'categories'.")
    missing = [k for k in ("images", "annotations", "categories") if k not in coco]
    if missing:
        raise DataError(f"{json_path} lacks {missing}; a COCO detection file has 'images', "
                        "'annotations' and 'categories'.")
    root = Path(image_root) if image_root is not None else json_path.parent
    cats = {}
    for c in coco["categories"]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or c["id"] < 1:
            raise DataError(f"{json_path}: category {c!r} needs an integer 'id' ≥ 1.")
        cats[c["id"]] = str(c.get("name", c["id"]))
    if not cats:
        raise DataError(f"{json_path} lists no categories.")
    out = DetectionRecords(category_ids=sorted(cats), names=[cats[i] for i in sorted(cats)])
    label_of = {cid: n + 1 for n, cid in enumerate(out.category_ids)}
    index: dict[int, int] = {}
    for img in coco["images"]:
        where = f"{json_path}, image {img.get('id')!r}" if isinstance(img, dict) else str(json_path)
        if not isinstance(img, dict) or not isinstance(img.get("id"), int) \
                or not isinstance(img.get("file_name"), str):
            raise DataError(f"{where}: every image needs an integer 'id' and a 'file_name'.")
        if img["id"] in index:
            raise DataError(f"{where} ({img['file_name']}) is listed twice in 'images'.")
        path = Path(img["file_name"])
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise DataError(f"{where}: image file {path} does not exist (file_name relative to "
                            f"{root}).")
        size = None
        if "width" in img and "height" in img:
            size = (int(_number(img["height"], where, "height")),
                    int(_number(img["width"], where, "width")))
        index[img["id"]] = len(out.paths)
        out.paths.append(path)
        out.sizes.append(size)
        out.image_ids.append(img["id"])
    if not out.paths:
        raise DataError(f"{json_path} lists no images.")
    boxes: list[list[tuple[float, ...]]] = [[] for _ in out.paths]
    labels: list[list[int]] = [[] for _ in out.paths]
    for ann in coco["annotations"]:
        aid = ann.get("id") if isinstance(ann, dict) else None
        where = f"{json_path}, annotation {aid!r}"
        if not isinstance(ann, dict):
            raise DataError(f"{where}: an annotation is an object with image_id, category_id, bbox.")
        if ann.get("image_id") not in index:
            raise DataError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'.")
        if ann.get("category_id") not in label_of:
            raise DataError(f"{where}: category_id {ann.get('category_id')!r} is not in "
                            f"'categories' (ids {out.category_ids}).")
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise DataError(f"{where}: bbox {bbox!r} must be [x, y, width, height].")
        x, y, w, h = (_number(v, where, "bbox value") for v in bbox)
        i = index[ann["image_id"]]
        if w <= 0 or h <= 0:
            raise DataError(f"{where} ({out.paths[i].name}): bbox {list(bbox)} has width {w:g} "
                            f"and height {h:g}; both must be > 0.")
        box = (x, y, x + w, y + h)
        _check_box(box, out.sizes[i], f"{where} ({out.paths[i].name})")
        if ann.get("iscrowd", 0):
            continue
        boxes[i].append(box)
        labels[i].append(label_of[ann["category_id"]])
    out.boxes = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes]
    out.labels = [np.asarray(lab, dtype=np.int64) for lab in labels]
    return out


def write_coco(records: DetectionRecords, json_path: str | Path,
               image_root: str | Path | None = None) -> Path:
    """Write ``records`` as a COCO detection JSON (``file_name`` relative to ``image_root``,
    default the JSON's folder, where possible); :func:`read_coco` reads it back unchanged."""
    json_path = Path(json_path)
    root = Path(image_root) if image_root is not None else json_path.parent
    coco: dict[str, Any] = {"images": [], "annotations": [],
                            "categories": [{"id": c, "name": n} for c, n in
                                           zip(records.category_ids, records.names)]}
    for i, path in enumerate(records.paths):
        try:
            name = str(path.relative_to(root))
        except ValueError:
            name = str(path)
        entry: dict[str, Any] = {"id": records.image_ids[i], "file_name": name}
        if records.sizes[i] is not None:
            entry["height"], entry["width"] = records.sizes[i]
        coco["images"].append(entry)
        for (x0, y0, x1, y1), label in zip(records.boxes[i].tolist(), records.labels[i].tolist()):
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": records.image_ids[i],
                "category_id": records.category_ids[label - 1],
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0})
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(coco), encoding="utf-8")
    return json_path


def read_box_csv(csv_path: str | Path, image_root: str | Path | None = None) -> DetectionRecords:
    """Read and check a ``path,x0,y0,x1,y1,label`` CSV (see the module doc); image sizes come
    from the images' headers."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"box CSV not found: {csv_path}.")
    root = Path(image_root) if image_root is not None else csv_path.parent
    need = ["path", "x0", "y0", "x1", "y1", "label"]
    rows: dict[Path, list[tuple[tuple[float, ...], int, int]]] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, skipinitialspace=True)
        fields = [f.strip() for f in reader.fieldnames or []]
        lacking = [c for c in need if c not in fields]
        if lacking:
            raise DataError(f"{csv_path} lacks column(s) {lacking}; found {fields}. A box CSV "
                            "has path,x0,y0,x1,y1,label.")
        reader.fieldnames = fields
        for row in reader:
            line = reader.line_num
            text = (row.get("path") or "").strip()
            if not text:
                raise DataError(f"{csv_path}, line {line}: empty path.")
            path = Path(text) if Path(text).is_absolute() else root / text
            boxes = rows.setdefault(path, [])
            values = [(row.get(c) or "").strip() for c in need[1:]]
            if not any(values):
                continue  # an image without boxes
            try:
                x0, y0, x1, y1 = (float(v) for v in values[:4])
                label = int(values[4])
            except ValueError:
                raise DataError(f"{csv_path}, line {line}: {values} are not four numbers and an "
                                "integer category id.") from None
            if label < 1:
                raise DataError(f"{csv_path}, line {line}: label {label} must be a category id "
                                "≥ 1 (0 is no object).")
            boxes.append(((x0, y0, x1, y1), label, line))
    if not rows:
        raise DataError(f"{csv_path} lists no images.")
    top = max((label for boxes in rows.values() for _, label, _ in boxes), default=1)
    cats = list(range(1, top + 1))  # a CSV's label is the category id itself
    out = DetectionRecords(category_ids=cats, names=[str(c) for c in cats])
    label_of = {c: c for c in cats}
    for n, (path, boxes) in enumerate(rows.items()):
        if not path.is_file():
            raise DataError(f"{csv_path}: image file {path} does not exist (paths relative to "
                            f"{root}).")
        h, w, _ = open_image(path).shape
        for box, _, line in boxes:
            _check_box(box, (h, w), f"{csv_path}, line {line} ({path.name})")
        out.paths.append(path)
        out.sizes.append((h, w))
        out.image_ids.append(n + 1)
        out.boxes.append(np.asarray([b for b, _, _ in boxes], dtype=np.float32).reshape(-1, 4))
        out.labels.append(np.asarray([label_of[c] for _, c, _ in boxes], dtype=np.int64))
    return out


class DetectionDataset(Dataset):
    """Items ``(image, target)``: ``image`` a lazy reader (``lazy``) or the decoded ``uint8
    (C, H, W)`` tensor, ``target`` ``{"boxes": float32 (n, 4), "labels": int64 (n,),
    "image_id": int64 ()}``. The image sizes the records state are checked against the
    files' headers by :meth:`reader` (lazy items, and ``check_images`` before training or
    evaluation)."""

    def __init__(self, records: DetectionRecords, *, lazy: bool) -> None:
        self.records, self.lazy = records, lazy

    def __len__(self) -> int:
        return len(self.records.paths)

    @property
    def paths(self) -> list[Path]:
        return list(self.records.paths)

    def reader(self, index: int) -> ImageReader:
        """A lazy reader of image ``index``."""
        reader = open_image(self.records.paths[index])
        size = self.records.sizes[index]
        if size is not None and tuple(reader.shape[:2]) != tuple(size):
            raise DataError(f"{reader.path} is {reader.shape[1]}×{reader.shape[0]} (W×H) but "
                            f"its annotations say {size[1]}×{size[0]}.")
        return reader

    def __getitem__(self, index: int) -> tuple[Any, dict[str, torch.Tensor]]:
        r = self.records
        target = {"boxes": torch.from_numpy(r.boxes[index]), "labels": torch.from_numpy(r.labels[index]),
                  "image_id": torch.tensor(r.image_ids[index], dtype=torch.int64)}
        if self.lazy:
            return self.reader(index), target
        array = read_image(r.paths[index])  # sizes: checked from the headers before training
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))), target
