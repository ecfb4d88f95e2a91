"""Segmentation canvases with masks: Megapixel-MNIST-style scenes at any size, PNG or tiled TIFF.

Each canvas (``side × side``, black) holds ``5`` real MNIST digits at varied scales (each digit
``scale_range`` px tall, non-overlapping), 3 of them of one class (the majority) and 2 of two
other classes, over digit-like line noise (:func:`~gigapatch.synth.megapixel_mnist.make_noise_patterns`,
scaled like the digits; ``n_noise`` per canvas, by default the IPS benchmark's density of 6 per
500²). Train and test digits come from disjoint pools. Two mask labelings per image:

- ``digits``: every digit's stroke pixels (its upscaled MNIST image ≥ 128), class = digit + 1
  (``num_classes = 11``);
- ``majority``: only the strokes of the three majority-class digits, class 1
  (``num_classes = 2``). A patch alone cannot tell whether its digit belongs to the majority:
  this labeling needs context from the whole image.

**Files.** ``out/{train,test}/images/000000.png`` with ``masks_digits/`` and
``masks_majority/`` beside (the images/ + masks/ layout of ``data.kind: folder`` with
``data.mask_dir``), ``train_digits.csv``, ``train_majority.csv`` (``path,mask``), the same for
``test``, and ``meta.json``. Sides up to ``png_max_side`` are PNG; larger ones are tiled,
pyramidal BigTIFFs written tile by tile (zlib), level 0 plus levels halving down to at most
1,024 px (masks too, nearest neighbour), so ``side = 65536`` never holds a canvas in memory.

**Rendering.** A window of a pyramid level draws only the objects that meet it (a row-sorted
index finds them): each object's 28×28 bitmap is resized to its size at that level (bilinear,
antialiased when reducing) and combined by maximum; mask pixels come from the digits' resized
bitmaps (≥ 128; later digits win where boxes touch). Level 0 is the exact canvas; reduced
levels are renderings of the same scene at that scale.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from gigapatch.core.errors import ConfigError
from gigapatch.core.files import atomic_path, write_bytes, write_json
from gigapatch.synth.megapixel_mnist import make_noise_patterns
from gigapatch.synth.mnist import load_digits, split_digit_pools

__all__ = ["LABELINGS", "Scene", "check_canvas", "generate_segmentation", "pyramid_sides", "render_window",
           "write_scene_png", "write_scene_tiff"]

#: Mask labelings and their number of classes (background included).
LABELINGS = {"digits": 11, "majority": 2}
DIGITS, MAJORITY = 5, 3
#: Noise patterns per 500² of canvas (the IPS benchmark's density).
NOISE_PER_500 = 6
TEST_FRACTION = 0.2
MAX_LEVEL_SIDE = 1024
STROKE = 128  # a digit pixel ≥ this is a stroke pixel of the mask


@dataclass(frozen=True)
class Scene:
    """One canvas: objects (digits first, then noise) with top-left ``yx`` and ``size`` px,
    their 28×28 ``bitmaps``, and the class of each digit (``-1`` for noise)."""

    side: int
    yx: np.ndarray  # int64 (O, 2)
    size: np.ndarray  # int64 (O,)
    bitmaps: np.ndarray  # uint8 (O, 28, 28)
    digit: np.ndarray  # int64 (O,): class 0..9, -1 = noise
    majority: int

    def __post_init__(self) -> None:
        order = np.argsort(self.yx[:, 0], kind="stable")
        object.__setattr__(self, "_order", order)
        object.__setattr__(self, "_rows", self.yx[order, 0])
        object.__setattr__(self, "_biggest", int(self.size.max()) if len(self.size) else 0)

    def meeting(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Indices (in drawing order) of the objects meeting level-0 window [y0,y1)×[x0,x1)."""
        lo = int(np.searchsorted(self._rows, y0 - self._biggest, side="right"))
        hi = int(np.searchsorted(self._rows, y1, side="left"))
        cand = self._order[lo:hi]
        y, x, s = self.yx[cand, 0], self.yx[cand, 1], self.size[cand]
        hit = cand[(y + s > y0) & (y < y1) & (x + s > x0) & (x < x1)]
        return np.sort(hit)


def _resized(bitmap: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    img = Image.fromarray(bitmap)
    return np.asarray(img.resize((size, size), Image.NEAREST if nearest else Image.BILINEAR))


def render_window(scene: Scene, y: int, x: int, h: int, w: int, level: int = 0,
                  labeling: str | None = None) -> np.ndarray:
    """Pixels (``labeling=None``) or mask class ids of window ``[y, y+h) × [x, x+w)`` of
    pyramid ``level`` (coordinates of that level): ``uint8 (h, w)``; black/background past
    the canvas."""
    f = 1 << level
    out = np.zeros((h, w), dtype=np.uint8)
    for i in scene.meeting(y * f, (y + h) * f, x * f, (x + w) * f).tolist():
        cls = int(scene.digit[i])
        if labeling is not None and (cls < 0 or (labeling == "majority" and cls != scene.majority)):
            continue
        oy, ox = int(scene.yx[i, 0]) // f, int(scene.yx[i, 1]) // f
        size = max(1, int(scene.size[i]) // f)
        if labeling is None:
            bitmap = _resized(scene.bitmaps[i], size)
        else:
            stroke = _resized(scene.bitmaps[i], int(scene.size[i])) >= STROKE  # level 0
            if f > 1:
                stroke = _resized(stroke.astype(np.uint8) * 255, size, nearest=True) > 0
            bitmap = stroke.astype(np.uint8) * (cls + 1 if labeling == "digits" else 1)
        ty0, tx0 = max(oy, y), max(ox, x)
        ty1, tx1 = min(oy + size, y + h), min(ox + size, x + w)
        if ty0 >= ty1 or tx0 >= tx1:
            continue
        part = bitmap[ty0 - oy : ty1 - oy, tx0 - ox : tx1 - ox]
        view = out[ty0 - y : ty1 - y, tx0 - x : tx1 - x]
        if labeling is None:
            np.maximum(view, part, out=view)
        else:
            view[part > 0] = part[part > 0]
    return out


def _scene(rng: np.random.Generator, side: int, scale: tuple[int, int], n_noise: int,
           pool: dict[int, np.ndarray], images: np.ndarray, noise_bank: np.ndarray,
           majority: int) -> Scene:
    others = rng.choice([c for c in range(10) if c != majority], size=DIGITS - MAJORITY,
                        replace=False)
    classes = np.array([majority] * MAJORITY + others.tolist())
    rng.shuffle(classes)
    sizes = rng.integers(scale[0], scale[1] + 1, size=DIGITS)
    boxes: list[tuple[int, int, int]] = []
    for s in sizes.tolist():  # non-overlapping digit boxes (rejection sampling)
        for _ in range(1000):
            y, x = (int(v) for v in rng.integers(0, side - s + 1, size=2))
            if all(y + s <= by or by + bs <= y or x + s <= bx or bx + bs <= x
                   for by, bx, bs in boxes):
                break
        boxes.append((y, x, s))
    digit_bitmaps = np.stack([images[rng.choice(pool[int(c)])] for c in classes])
    n_sizes = rng.integers(scale[0], scale[1] + 1, size=n_noise)
    n_yx = np.stack([rng.integers(0, side - s + 1, size=2) for s in n_sizes.tolist()]) \
        if n_noise else np.zeros((0, 2), dtype=np.int64)
    n_ids = rng.integers(0, len(noise_bank), size=n_noise)
    return Scene(
        side=side,
        yx=np.concatenate([np.array([(b[0], b[1]) for b in boxes]), n_yx]).astype(np.int64),
        size=np.concatenate([sizes, n_sizes]).astype(np.int64),
        bitmaps=np.concatenate([digit_bitmaps, noise_bank[n_ids]]).astype(np.uint8),
        digit=np.concatenate([classes, -np.ones(n_noise, dtype=np.int64)]).astype(np.int64),
        majority=majority,
    )


def pyramid_sides(side: int) -> list[int]:
    """Sides of the pyramid levels written for a ``side`` canvas: halving down to ≤ 1,024."""
    sizes = [side]
    while sizes[-1] > MAX_LEVEL_SIDE:
        sizes.append(-(-sizes[-1] // 2))
    return sizes


def _tiles(scene: Scene, level: int, level_side: int, tile: int, labeling: str | None,
           bar: Any) -> Iterator[np.ndarray]:
    per = -(-level_side // tile)
    for ty in range(per):
        for tx in range(per):
            yield render_window(scene, ty * tile, tx * tile, tile, tile, level, labeling)
            bar.update(1)


def write_scene_tiff(path: Path, scene: Scene, tile: int, labeling: str | None, bar: Any) -> None:
    """The canvas (or a mask labeling) as a tiled pyramidal BigTIFF, tile by tile."""
    import tifffile  # noqa: PLC0415 - heavy; only for large sides

    sizes = pyramid_sides(scene.side)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for level, level_side in enumerate(sizes):
            extra = {"subifds": len(sizes) - 1} if level == 0 else {"subfiletype": 1}
            tif.write(_tiles(scene, level, level_side, tile, labeling, bar),
                      shape=(level_side, level_side), dtype=np.uint8, tile=(tile, tile),
                      photometric="minisblack", compression="zlib", **extra)


def write_scene_png(path: Path, scene: Scene, labeling: str | None) -> None:
    """The canvas (or a mask labeling) as one PNG."""
    array = render_window(scene, 0, 0, scene.side, scene.side, 0, labeling)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def check_canvas(side: int, scale_range: tuple[int, int], n_train: int, n_test: int,
                 tile: int) -> tuple[int, int]:
    """The generators' shared argument checks; returns the digit size range ``(lo, hi)``.
    Raises ConfigError naming the value and what is allowed."""
    lo, hi = (int(v) for v in scale_range)
    if not 8 <= lo <= hi:
        raise ConfigError(f"scale_range {scale_range}: digit sizes must satisfy 8 ≤ min ≤ max.")
    if side < 2 * hi or side < 64:
        raise ConfigError(f"side {side} is too small for digits up to {hi} px: use side ≥ "
                          f"{max(64, 2 * hi)}.")
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise ConfigError(f"n_train={n_train}, n_test={n_test}: need ≥ 0 each, ≥ 1 in all.")
    if tile % 16 or tile < 16:
        raise ConfigError(f"tile {tile} must be a positive multiple of 16 (TIFF tiles).")
    return lo, hi


def generate_segmentation(
    out_dir: str | Path,
    *,
    n_train: int = 400,
    n_test: int = 100,
    side: int = 512,
    scale_range: tuple[int, int] = (28, 56),
    n_noise: int | None = None,
    seed: int = 0,
    png_max_side: int = 8192,
    tile: int = 512,
    digits_source: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a segmentation data set (see the module doc); returns its summary.

    Raises:
        ConfigError: a size or count out of range (named, with what is allowed).
    """
    lo, hi = check_canvas(side, scale_range, n_train, n_test, tile)
    noise = round(NOISE_PER_500 * (side / 500) ** 2) if n_noise is None else int(n_noise)
    out = Path(out_dir)
    images, labels = load_digits(digits_source)
    pools = dict(zip(("train", "test"), split_digit_pools(labels, TEST_FRACTION, seed)))
    suffix = ".png" if side <= png_max_side else ".tiff"
    per_image = sum(-(-s // tile) ** 2 for s in pyramid_sides(side)) * 3 if suffix == ".tiff" else 3
    total = (n_train + n_test) * per_image
    bar = tqdm(total=total, desc="segmentation data", unit="tile" if suffix == ".tiff" else "file",
               disable=not progress)
    bank = make_noise_patterns(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(9,))),
                               256)
    for split_id, (split, count) in enumerate((("train", n_train), ("test", n_test))):
        by_class = {c: pools[split][labels[pools[split]] == c] for c in range(10)}
        rows: dict[str, list[str]] = {name: [] for name in LABELINGS}
        for i in range(count):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(split_id, i)))
            scene = _scene(rng, side, (lo, hi), noise, by_class, images, bank,
                           majority=int(rng.integers(0, 10)))
            name = f"{i:06d}{suffix}"
            targets = {None: f"{split}/images/{name}",
                       **{lab: f"{split}/masks_{lab}/{name}" for lab in LABELINGS}}
            for labeling, rel in targets.items():
                if suffix == ".png":
                    write_scene_png(out / rel, scene, labeling)
                    bar.update(1)
                else:
                    write_scene_tiff(out / rel, scene, tile, labeling, bar)
            for lab in LABELINGS:
                rows[lab].append(f"{targets[None]},{targets[lab]}")
        for lab in LABELINGS:
            write_bytes(out / f"{split}_{lab}.csv",
                        ("path,mask\n" + "".join(r + "\n" for r in rows[lab])).encode())
    bar.close()
    summary = {"out_dir": str(out), "side": side, "n_train": n_train, "n_test": n_test,
               "scale_range": [lo, hi], "n_noise": noise, "seed": seed, "format": suffix[1:],
               "labelings": LABELINGS, "digits": DIGITS, "majority": MAJORITY,
               "csv": {f"{s}_{lab}": str(out / f"{s}_{lab}.csv") for s in ("train", "test")
                       for lab in LABELINGS}}
    write_json(out / "meta.json", summary)
    return summary

