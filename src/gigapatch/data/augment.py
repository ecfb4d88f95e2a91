"""Augmentation of huge images without decoding them whole (``data.augment``).

``data.augment: [hflip, vflip, rot90, color_jitter]`` draws one set of parameters per image
and per epoch (torch's RNG, so seeded runs repeat) and applies it to the whole image:

- **geometric** (``hflip``, ``vflip``: each with probability ½; ``rot90``: 0–3 quarter turns
  counter-clockwise, as ``np.rot90``; 0 or 2 for non-square images, which keep their shape): a lazy image becomes an :class:`AugmentedView`, a
  reader whose every region is the region of the *transformed* image: the view maps it back
  to the source region, reads only that, and transforms the pixels. So the patch grid, every
  patch, the tissue mask and the thumbnails agree with each other exactly as if the image had
  been transformed in memory (the tests compare the two);
- **colour** (``color_jitter``: brightness, contrast and saturation factors in [0.8, 1.2] and a
  hue shift in [−0.05, 0.05], drawn by ``torchvision.transforms.ColorJitter.get_params``, in
  its random order): applied with ``torchvision.transforms.v2.functional`` to every region
  with the *same* factors. Contrast blends with the image's mean grey level, which for a lazy
  image is taken from its smallest pyramid level (all of it for a one-level image), so
  patches of one image share it.

Images decoded whole (``data.kind: csv``) get the same transforms as tensors
(:func:`augment_tensor`). Segmentation masks get the geometric part, lazily
(:class:`AugmentedMask`) or in memory (:func:`augment_mask`); detection boxes move with
their pixels (:func:`augment_boxes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset

from gigapatch.config import AUGMENTATIONS
from gigapatch.core.errors import ConfigError
from gigapatch.data.masks import MaskReader
from gigapatch.io.readers import ImageReader, ReaderView

__all__ = ["AugmentedDataset", "AugmentedMask", "AugmentedView", "Params", "augment_boxes",
           "augment_mask", "augment_tensor", "draw_params", "source_region", "turn_and_flip"]

_JITTER = ([0.8, 1.2], [0.8, 1.2], [0.8, 1.2], [-0.05, 0.05])


@dataclass(frozen=True)
class Params:
    """One image's draw: ``rot`` quarter turns, then the flips, then the colour ops."""

    rot: int = 0
    hflip: bool = False
    vflip: bool = False
    order: tuple[int, ...] = ()
    brightness: float | None = None
    contrast: float | None = None
    saturation: float | None = None
    hue: float | None = None

    @property
    def geometric(self) -> bool:
        return bool(self.rot or self.hflip or self.vflip)

    @property
    def colour(self) -> bool:
        return bool(self.order)


def check_augment(names: list[str]) -> list[str]:
    """``names`` if all are known, else ConfigError listing the choices."""
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ConfigError(f"data.augment: unknown {unknown}; choose from {list(AUGMENTATIONS)}.")
    return names


def draw_params(names: list[str], square: bool = True) -> Params:
    """Random parameters for the augmentations ``names`` (torch's global RNG). A non-square
    image turns by 0 or 2 quarters only, so that it keeps its shape (images of one batch
    must share it)."""
    coin = lambda: bool(torch.rand(()) < 0.5)  # noqa: E731
    rot = 0
    if "rot90" in names:
        rot = int(torch.randint(0, 4, ())) if square else 2 * int(torch.randint(0, 2, ()))
    h = coin() if "hflip" in names else False
    v = coin() if "vflip" in names else False
    if "color_jitter" not in names:
        return Params(rot, h, v)
    order, b, c, s, hue = T.ColorJitter.get_params(*_JITTER)
    return Params(rot, h, v, tuple(int(i) for i in order), b, c, s, hue)


def _colour(x: torch.Tensor, p: Params, mean: float) -> torch.Tensor:
    """The colour ops of ``p`` on ``(C, h, w)`` uint8 pixels; contrast about ``mean`` (the
    image's mean grey level in [0, 255])."""
    for i in p.order:
        if i == 0 and p.brightness is not None:
            x = TF.adjust_brightness(x, p.brightness)
        elif i == 1 and p.contrast is not None:  # adjust_contrast's blend, the image's mean
            y = p.contrast * x.float() + (1 - p.contrast) * mean
            x = y.clamp(0, 255).to(torch.uint8)
        elif i == 2 and p.saturation is not None and x.shape[0] == 3:
            x = TF.adjust_saturation(x, p.saturation)
        elif i == 3 and p.hue is not None and x.shape[0] == 3:
            x = TF.adjust_hue(x, p.hue)
    return x


def _grey_mean(x: torch.Tensor) -> float:
    """Mean grey level of ``(C, h, w)`` uint8 pixels, as ``adjust_contrast`` computes it."""
    grey = TF.rgb_to_grayscale(x) if x.shape[0] == 3 else x
    return float(grey.float().mean())


def _turn_flip(x: torch.Tensor, p: Params, rows: int) -> torch.Tensor:
    """``p``'s quarter turns, then flips, on the axes ``rows`` (y) and ``rows + 1`` (x)."""
    if p.rot:
        x = torch.rot90(x, p.rot, dims=(rows, rows + 1))
    if p.hflip:
        x = x.flip(rows + 1)
    if p.vflip:
        x = x.flip(rows)
    return x


def augment_tensor(image: torch.Tensor, p: Params) -> torch.Tensor:
    """An in-memory image ``(C, H, W)`` uint8 transformed by ``p`` (the reference that
    :class:`AugmentedView` matches region by region)."""
    x = _turn_flip(image, p, rows=1)
    if p.colour:
        x = _colour(x, p, _grey_mean(image))
    return x.contiguous()


def source_region(p: Params, base_hw: tuple[int, int], y: int, x: int, h: int, w: int
                  ) -> tuple[int, int, int, int]:
    """The region ``(y, x, h, w)`` of an image of size ``base_hw`` under region ``(y, x, h,
    w)`` of that image transformed by ``p`` (quarter turns, then flips)."""
    shapes = [tuple(base_hw)]  # the shape after each quarter turn
    for _ in range(p.rot):
        shapes.append((shapes[-1][1], shapes[-1][0]))
    H, W = shapes[-1]
    if p.vflip:
        y = H - y - h
    if p.hflip:
        x = W - x - w
    for H, W in reversed(shapes[:-1]):  # undo each turn: out[i, j] = in[j, W - 1 - i]
        y, x, h, w = x, W - y - h, w, h
    return y, x, h, w


def turn_and_flip(p: Params, region: np.ndarray) -> np.ndarray:
    """``p``'s geometric transforms on pixels ``(h, w, …)`` (axes 0 and 1)."""
    return _turn_flip(torch.from_numpy(np.ascontiguousarray(region)), p, rows=0).numpy()


class AugmentedMask:
    """A lazy mask (:class:`~gigapatch.data.masks.MaskReader`) transformed by ``p``'s
    geometric part, window by window, as its image's :class:`AugmentedView`."""

    def __init__(self, base: MaskReader, p: Params) -> None:
        self.base, self.p = base, p
        self.path, self.num_classes = base.path, base.num_classes
        h, w = base.shape
        self.shape = (w, h) if p.rot % 2 else (h, w)

    def read(self, y: int = 0, x: int = 0, h: int | None = None, w: int | None = None
             ) -> np.ndarray:
        """Class ids ``int64 (h, w)`` of the window of the transformed mask."""
        H, W = self.shape
        h = H - y if h is None else h
        w = W - x if w is None else w
        sy, sx, sh, sw = source_region(self.p, self.base.shape, y, x, h, w)
        return np.ascontiguousarray(turn_and_flip(self.p, self.base.read(sy, sx, sh, sw)))


def augment_mask(mask: torch.Tensor, p: Params) -> torch.Tensor:
    """An in-memory mask ``(H, W)`` transformed by ``p``'s geometric part."""
    return _turn_flip(mask, p, rows=0).contiguous()


class AugmentedView(ReaderView):
    """``base`` transformed by ``p``: regions of the transformed image, read lazily."""

    backend = "augmented"

    def __init__(self, base: ImageReader, p: Params) -> None:
        super().__init__(base)
        self.p = p
        swap = p.rot % 2 == 1
        self.levels = [(w, h) if swap else (h, w) for h, w in base.levels]
        h, w = self.levels[0]
        self.shape = (h, w, base.shape[2])
        self.downsamples = list(base.downsamples)
        self._mean: float | None = None

    def _read(self, handle: Any, y: int, x: int, h: int, w: int, level: int) -> np.ndarray:
        sy, sx, sh, sw = source_region(self.p, self.base.levels[level], y, x, h, w)
        region = turn_and_flip(self.p, self.base.read_region(sy, sx, sh, sw, level))
        if self.p.colour:
            pixels = torch.from_numpy(np.ascontiguousarray(region)).permute(2, 0, 1)
            region = _colour(pixels, self.p, self.grey_mean()).permute(1, 2, 0).numpy()
        return np.ascontiguousarray(region)

    def grey_mean(self) -> float:
        """The image's mean grey level, from its smallest pyramid level (cached)."""
        if self._mean is None:
            lv = len(self.base.levels) - 1
            small = self.base.read_region(0, 0, *self.base.levels[lv], level=lv)
            self._mean = _grey_mean(torch.from_numpy(np.ascontiguousarray(small)).permute(2, 0, 1))
        return self._mean


def augment_boxes(boxes: torch.Tensor, p: Params, size: tuple[int, int]) -> torch.Tensor:
    """Boxes ``(n, 4)`` xyxy of an image of ``size`` ``(H, W)`` moved with ``p``'s geometric
    transforms (quarter turns counter-clockwise, then the flips), as the pixels move."""
    b = boxes.clone().float()
    h, w = size
    for _ in range(p.rot):  # np.rot90: out[i, j] = in[j, W - 1 - i]: (x, y) → (y, W - x)
        x0, y0, x1, y1 = b.unbind(1)
        b = torch.stack([y0, w - x1, y1, w - x0], dim=1)
        h, w = w, h
    if p.hflip:
        b = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    if p.vflip:
        b = torch.stack([b[:, 0], h - b[:, 3], b[:, 2], h - b[:, 1]], dim=1)
    return b.to(boxes.dtype)


class AugmentedDataset(Dataset):
    """A training data set whose images are augmented (``names``) with fresh parameters at
    every fetch: lazy readers wrapped in :class:`AugmentedView`, tensors transformed. With
    ``dense`` the targets are masks, with ``boxes`` detection targets: both get the same
    geometric transform (no colour)."""

    def __init__(self, base: Dataset, names: list[str], dense: bool = False,
                 boxes: bool = False) -> None:
        self.base, self.names, self.dense = base, check_augment(list(names)), dense
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, target = self.base[index]
        h, w = image.shape[:2] if isinstance(image, ImageReader) else image.shape[-2:]
        p = draw_params(self.names, square=h == w)
        if self.boxes and p.geometric:
            target = {**target, "boxes": augment_boxes(target["boxes"], p, (h, w))}
        if self.dense and p.geometric:
            target = (AugmentedMask(target, p) if isinstance(target, MaskReader)
                      else augment_mask(target, p))
        if isinstance(image, ImageReader):
            return (AugmentedView(image, p) if p.geometric or p.colour else image), target
        return augment_tensor(image, p), target
