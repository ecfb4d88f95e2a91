"""Which pyramid level to work at: ``data.level: L`` or ``data.mpp: 0.5`` (microns per pixel).

Pathology tools choose the resolution of a slide, not just its file: MONAI's and TIAToolbox's
readers take a level or a physical resolution. Here :func:`at_resolution` wraps a reader so
that the chosen level *is* level 0 (:class:`LevelView`): patch grids, tissue masks, thumbnails
and predictions all follow, with no change elsewhere.

**Microns per pixel** of level 0 (:func:`base_mpp`) come from the file's metadata:
OpenSlide's ``openslide.mpp-x``/``openslide.mpp-y``; for TIFFs read by tifffile, Aperio's
``MPP = …`` in the ImageDescription, else the ``XResolution``/``YResolution`` tags with
``ResolutionUnit`` inch or centimetre. A level's mpp is the base mpp times its downsample.
``data.mpp: m`` takes the coarsest level whose mpp is at most ``m`` (1 % tolerance, as
:meth:`~gigapatch.io.readers.ImageReader.best_level`): never coarser than asked; no resampling,
so the level's actual mpp (e.g. 0.504 for 0.5 asked) is what the model sees. A slide without
resolution metadata is refused, naming it.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from gigapatch.core.errors import ConfigError, DataError
from gigapatch.io.readers import ImageReader, ReaderView

__all__ = ["LevelView", "at_resolution", "base_mpp"]

_APERIO_MPP = re.compile(r"\bMPP\s*=\s*([0-9.eE+-]+)")
_UNIT_MICRONS = {2: 25_400.0, 3: 10_000.0}  # TIFF ResolutionUnit inch, centimetre


def base_mpp(reader: ImageReader) -> float | None:
    """Microns per pixel of ``reader``'s level 0 (the mean of x and y), or ``None`` if the
    file does not say."""
    if isinstance(reader, LevelView):
        base = base_mpp(reader.base)
        return None if base is None else base * reader.base.downsamples[reader.offset]
    if reader.backend == "openslide":
        return _openslide_mpp(reader)
    if reader.backend == "tiff":
        return _tiff_mpp(reader)
    return None


def _openslide_mpp(reader: ImageReader) -> float | None:
    import openslide  # noqa: PLC0415 - optional extra (the reader exists, so it is installed)

    slide = openslide.OpenSlide(str(reader.path))
    try:
        values = [slide.properties.get(f"openslide.mpp-{a}") for a in ("x", "y")]
    finally:
        slide.close()
    found = [float(v) for v in values if v not in (None, "")]
    return float(np.mean(found)) if found and all(v > 0 for v in found) else None


def _tiff_mpp(reader: ImageReader) -> float | None:
    import tifffile  # noqa: PLC0415 - the TIFF backend's own dependency

    with tifffile.TiffFile(reader.path) as tif:
        page = tif.series[0].levels[0].pages[0] if tif.series else tif.pages[0]
        tags = page.tags
        description = str(tags["ImageDescription"].value) if "ImageDescription" in tags else ""
        aperio = _APERIO_MPP.search(description) if description.startswith("Aperio") else None
        if aperio:
            return float(aperio.group(1))
        unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
        if unit not in _UNIT_MICRONS or "XResolution" not in tags:
            return None
        per_unit = []
        for name in ("XResolution", "YResolution"):
            if name in tags:
                num, den = tags[name].value
                per_unit.append(num / den if den else 0.0)
    if not per_unit or min(per_unit) <= 0 or (unit == 2 and per_unit[0] in (1.0, 72.0, 96.0)):
        return None  # absent, or a screen dpi default that says nothing about the scan
    return float(np.mean([_UNIT_MICRONS[unit] / v for v in per_unit]))


class LevelView(ReaderView):
    """Level ``offset`` of ``base`` presented as level 0: ``levels``/``downsamples`` are the
    base's from ``offset`` on (downsamples relative to it); reads go to the base reader."""

    backend = "level"

    def __init__(self, base: ImageReader, offset: int) -> None:
        super().__init__(base)
        self.offset = offset
        self.levels = list(base.levels[offset:])
        h, w = self.levels[0]
        self.shape = (h, w, base.shape[2])
        first = base.downsamples[offset]
        self.downsamples = [d / first for d in base.downsamples[offset:]]

    def _read(self, handle: Any, y: int, x: int, h: int, w: int, level: int) -> np.ndarray:
        return self.base.read_region(y, x, h, w, level + self.offset)


def at_resolution(reader: ImageReader, level: int | None = None, mpp: float | None = None
                  ) -> ImageReader:
    """``reader`` at pyramid level ``level``, or at the level chosen for ``mpp`` microns per
    pixel (see the module doc); unchanged when both are ``None`` or the level is 0.

    Raises:
        ConfigError: both given, or a non-positive value.
        DataError: the slide has fewer levels than ``level`` (its levels are listed), or no
            resolution metadata for ``mpp``.
    """
    if level is not None and mpp is not None:
        raise ConfigError("data.level and data.mpp both set: choose one.")
    if level is None and mpp is None:
        return reader
    if mpp is not None:
        if mpp <= 0:
            raise ConfigError(f"data.mpp = {mpp} must be > 0 (microns per pixel).")
        base = base_mpp(reader)
        if base is None:
            raise DataError(
                f"{reader.path} has no resolution metadata (no openslide.mpp-x, Aperio MPP or "
                "TIFF XResolution/ResolutionUnit), so data.mpp cannot choose its level; use "
                "data.level instead, or write the resolution into the file.")
        level = reader.best_level(mpp / base)
    if level < 0:
        raise ConfigError(f"data.level = {level} must be ≥ 0.")
    if level >= len(reader.levels):
        raise DataError(f"{reader.path} has {len(reader.levels)} level(s) {reader.levels} (H, W); "
                        f"data.level = {level} does not exist. Choose 0..{len(reader.levels) - 1}.")
    return reader if level == 0 else LevelView(reader, level)
