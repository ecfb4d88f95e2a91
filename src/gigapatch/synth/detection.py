"""Detection canvases: MNIST digits at strongly varying scales with COCO boxes, PNG or tiled TIFF.

Each canvas (``side × side``, black) holds ``digits_per_image`` real MNIST digits (a range;
default 4–10), each ``scale_range`` px tall (default 14–112: small objects next to large
ones), non-overlapping, over digit-like line noise (the IPS benchmark's density), train and
test digits from disjoint pools. Every digit is an object: category ``digit + 1`` (COCO
category ids start at 1; names ``"0"`` … ``"9"``), box = the tight box of its stroke pixels
(resized bitmap ≥ 128) in level-0 pixels, COCO ``[x, y, w, h]``.

**Files.** ``out/{train,test}/images/000000.png`` (or ``.tiff`` above ``png_max_side``: tiled
pyramidal BigTIFFs written tile by tile, so ``side = 65536`` never holds a canvas in memory),
``out/{train,test}.json`` (COCO: ``images`` with ``file_name`` relative to the JSON's folder,
``width``, ``height``; ``annotations`` with ``bbox``, ``area``, ``category_id``, ``iscrowd``
0; ``categories``), ``out/{train,test}.csv`` (the same boxes as ``path,x0,y0,x1,y1,label``
rows, ``label`` the category id) and ``meta.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from gigapatch.core.errors import ConfigError
from gigapatch.core.files import write_bytes, write_json
from gigapatch.synth.megapixel_mnist import make_noise_patterns
from gigapatch.synth.mnist import load_digits, split_digit_pools
from gigapatch.synth.segmentation import (
    NOISE_PER_500,
    STROKE,
    Scene,
    check_canvas,
    pyramid_sides,
    write_scene_png,
    write_scene_tiff,
)

__all__ = ["CATEGORIES", "generate_detection", "scene_boxes"]

#: COCO categories of the digits: id = digit + 1.
CATEGORIES = [{"id": d + 1, "name": str(d)} for d in range(10)]
TEST_FRACTION = 0.2


def scene_boxes(scene: Scene) -> list[tuple[int, int, int, int, int]]:
    """The digits' tight stroke boxes ``(x0, y0, x1, y1, category_id)`` in level-0 pixels
    (exclusive ends), in drawing order; noise has no box."""
    out = []
    for i in np.flatnonzero(scene.digit >= 0).tolist():
        size = int(scene.size[i])
        bitmap = np.asarray(Image.fromarray(scene.bitmaps[i]).resize((size, size),
                                                                     Image.BILINEAR))
        rows, cols = np.flatnonzero((bitmap >= STROKE).any(1)), np.flatnonzero(
            (bitmap >= STROKE).any(0))
        if not len(rows):
            continue
        y, x = int(scene.yx[i, 0]), int(scene.yx[i, 1])
        out.append((x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1,
                    y + int(rows[-1]) + 1, int(scene.digit[i]) + 1))
    return out


def _scene(rng: np.random.Generator, side: int, scale: tuple[int, int], count: int,
           n_noise: int, pool: np.ndarray, images: np.ndarray, noise_bank: np.ndarray,
           labels: np.ndarray) -> Scene:
    sizes = sorted(rng.integers(scale[0], scale[1] + 1, size=count).tolist(), reverse=True)
    boxes: list[tuple[int, int, int]] = []
    for s in sizes:  # non-overlapping digit boxes, largest first (rejection sampling)
        for _ in range(2000):
            y, x = (int(v) for v in rng.integers(0, side - s + 1, size=2))
            if all(y + s <= by or by + bs <= y or x + s <= bx or bx + bs <= x
                   for by, bx, bs in boxes):
                boxes.append((y, x, s))
                break
    picks = rng.choice(pool, size=len(boxes), replace=False)
    n_sizes = rng.integers(scale[0], max(scale[0], scale[1] // 2) + 1, size=n_noise)
    n_yx = (np.stack([rng.integers(0, side - s + 1, size=2) for s in n_sizes.tolist()])
            if n_noise else np.zeros((0, 2), dtype=np.int64))
    n_ids = rng.integers(0, len(noise_bank), size=n_noise)
    return Scene(  # noise first: digits are drawn over it
        side=side,
        yx=np.concatenate([n_yx, np.array([(b[0], b[1]) for b in boxes]).reshape(-1, 2)]
                          ).astype(np.int64),
        size=np.concatenate([n_sizes, [b[2] for b in boxes]]).astype(np.int64),
        bitmaps=np.concatenate([noise_bank[n_ids], images[picks]]).astype(np.uint8),
        digit=np.concatenate([-np.ones(n_noise, dtype=np.int64), labels[picks]]).astype(np.int64),
        majority=-1,
    )


def generate_detection(
    out_dir: str | Path,
    *,
    n_train: int = 400,
    n_test: int = 100,
    side: int = 1024,
    scale_range: tuple[int, int] = (14, 112),
    digits_per_image: tuple[int, int] = (4, 10),
    n_noise: int | None = None,
    seed: int = 0,
    png_max_side: int = 8192,
    tile: int = 512,
    digits_source: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a detection data set (see the module doc); returns its summary.

    Raises:
        ConfigError: a size or count out of range (named, with what is allowed).
    """
    lo, hi = check_canvas(side, scale_range, n_train, n_test, tile)
    dmin, dmax = (int(v) for v in digits_per_image)
    if not 1 <= dmin <= dmax:
        raise ConfigError(f"digits_per_image {digits_per_image}: need 1 ≤ min ≤ max.")
    noise = round(NOISE_PER_500 * (side / 500) ** 2) if n_noise is None else int(n_noise)
    out = Path(out_dir)
    images, labels = load_digits(digits_source)
    pools = dict(zip(("train", "test"), split_digit_pools(labels, TEST_FRACTION, seed)))
    suffix = ".png" if side <= png_max_side else ".tiff"
    per_image = sum(-(-s // tile) ** 2 for s in pyramid_sides(side)) if suffix == ".tiff" else 1
    bar = tqdm(total=(n_train + n_test) * per_image, desc="detection data",
               unit="tile" if suffix == ".tiff" else "image", disable=not progress)
    bank = make_noise_patterns(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(9,))),
                               256)
    n_boxes = 0
    for split_id, (split, count) in enumerate((("train", n_train), ("test", n_test))):
        coco: dict[str, Any] = {"images": [], "annotations": [], "categories": CATEGORIES}
        rows = []
        for i in range(count):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(split_id, i)))
            k = int(rng.integers(dmin, dmax + 1))
            scene = _scene(rng, side, (lo, hi), k, noise, pools[split], images, bank, labels)
            rel = f"{split}/images/{i:06d}{suffix}"
            if suffix == ".png":
                write_scene_png(out / rel, scene, None)
                bar.update(1)
            else:
                write_scene_tiff(out / rel, scene, tile, None, bar)
            coco["images"].append({"id": i + 1, "file_name": rel, "width": side,
                                   "height": side})
            for x0, y0, x1, y1, cat in scene_boxes(scene):
                n_boxes += 1
                coco["annotations"].append({
                    "id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": cat,
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0})
                rows.append(f"{rel},{x0},{y0},{x1},{y1},{cat}")
        write_bytes(out / f"{split}.json", json.dumps(coco).encode())
        write_bytes(out / f"{split}.csv",
                    ("path,x0,y0,x1,y1,label\n" + "".join(r + "\n" for r in rows)).encode())
    bar.close()
    summary = {"out_dir": str(out), "side": side, "n_train": n_train, "n_test": n_test,
               "scale_range": [lo, hi], "digits_per_image": [dmin, dmax], "n_noise": noise,
               "seed": seed, "format": suffix[1:], "boxes": n_boxes,
               "coco": {s: str(out / f"{s}.json") for s in ("train", "test")}}
    write_json(out / "meta.json", summary)
    return summary
