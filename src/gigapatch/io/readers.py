"""Lazy readers for huge images: read any region of any pyramid level, decode only what it needs.

:func:`open_image` picks a backend from the file name and returns an :class:`ImageReader`:

========================================  ==============  ====================================
files                                     backend         what a region read decodes
========================================  ==============  ====================================
``.tif .tiff .btf .tf2 .tf8`` (tiled or   ``tiff``        only the tiles (strips) it touches:
striped, pyramidal, OME-TIFF, BigTIFF,                    tifffile's Zarr store, codecs from
any codec imagecodecs decodes)                            ``imagecodecs``
``.svs .ndpi .mrxs .scn .vms .vmu .bif``  ``openslide``   only the tiles it touches (OpenSlide,
``.svslide``                                              optional: ``pip install
                                                          gigapatch[slides]``)
``.png .jpg .jpeg``                       ``pillow``      the whole image, once per process
``.npy``                                  ``numpy``       only the bytes it touches (memory map)
========================================  ==============  ====================================

Every reader answers in the same terms: :attr:`~ImageReader.shape` ``(H, W, C)`` of level 0,
:attr:`~ImageReader.dtype`, the pyramid :attr:`~ImageReader.levels` ``[(H, W), ...]`` (level 0
first) with their :attr:`~ImageReader.downsamples`, and :meth:`~ImageReader.read_region`
``(y, x, h, w, level) -> (h, w, C)`` in that level's pixels. Grayscale images have ``C = 1``.

**Safe in DataLoader workers.** A reader opens its file handle lazily, on the first read, and
per process: a reader that crosses a ``fork`` (or is pickled to a ``spawn`` worker) opens its
own handle in the new process and never touches the parent's. Constructing a reader reads the
file's metadata and closes the file again, so errors in the header surface at once and a fresh
reader holds no handle (:attr:`~ImageReader.is_open` is ``False``).

**Borders.** By default a region must lie inside the level (:class:`ValueError` otherwise);
``read_region(..., pad=True)`` zero-fills the pixels outside, as patch grids that do not divide
the image need.

**PNG/JPEG** cannot be decoded region by region: the first read decodes the whole image (and
keeps it for the process). Pillow's decompression-bomb guard is handled here, deliberately: by
default an image above ``PIL.Image.MAX_IMAGE_PIXELS`` pixels is refused with a
:class:`~gigapatch.core.errors.DataError`; ``open_image(path, max_pixels=N)`` raises the limit for
that one reader, without touching Pillow's global setting.
"""

from __future__ import annotations

import math
import os
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np

from gigapatch.core.errors import DataError, GigapatchError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["SUPPORTED_EXTENSIONS", "ImageReader", "open_image"]

_TIFF_EXTENSIONS = (".tif", ".tiff", ".btf", ".tf2", ".tf8")
_SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
_PILLOW_EXTENSIONS = (".png", ".jpg", ".jpeg")
_NUMPY_EXTENSIONS = (".npy",)

#: File extension -> backend name used by :func:`open_image` (lower-case extensions).
SUPPORTED_EXTENSIONS: dict[str, str] = {
    **dict.fromkeys(_TIFF_EXTENSIONS, "tiff"),
    **dict.fromkeys(_SLIDE_EXTENSIONS, "openslide"),
    **dict.fromkeys(_PILLOW_EXTENSIONS, "pillow"),
    **dict.fromkeys(_NUMPY_EXTENSIONS, "numpy"),
}

_SLIDES_HINT = "pip install 'gigapatch[slides]'"
_DOWNSAMPLE_TOLERANCE = 0.01  # best_level: a level 1 % coarser than asked still counts

# Opening a handle is rare and cheap; one lock serialises it for all readers of a process.
# It is replaced in a forked child, where a copy could be held by a thread that no longer exists.
_OPEN_LOCK = threading.Lock()
# Handles inherited through fork: kept referenced so that the child never closes (or lets the
# garbage collector close) a parent's handle, whose library state may be mid-operation.
_INHERITED: list[Any] = []


def _after_fork_in_child() -> None:
    global _OPEN_LOCK
    _OPEN_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class ImageReader(ABC):
    """A lazily opened image: metadata now, pixels region by region on demand.

    Use :func:`open_image` to get one. Attributes (set at construction, from the header):

    Attributes:
        path: the image file.
        backend: ``"tiff"``, ``"openslide"``, ``"pillow"`` or ``"numpy"``.
        shape: ``(H, W, C)`` of level 0; ``C = 1`` for grayscale.
        dtype: the pixels' numpy dtype (``uint8``, ``uint16``, ``float32`` ...).
        levels: ``[(H, W), ...]`` of every pyramid level, level 0 (full resolution) first;
            a single entry for images without a pyramid.
        downsamples: the factor of every level relative to level 0 (``1.0`` first, then
            increasing): the mean of the height and width ratios (OpenSlide: its own factors).

    The reader can be pickled (the handle is not) and used from any number of processes;
    within a process it is thread-safe. It is also a context manager that closes its handle.
    """

    backend: ClassVar[str]

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype
    levels: list[tuple[int, int]]
    downsamples: list[float]

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._handle: Any = None
        self._pid: int | None = None
        _check_is_file(self.path)
        self._probe()

    # -- backend hooks -------------------------------------------------------------------
    @abstractmethod
    def _probe(self) -> None:
        """Read the header; set shape, dtype, levels, downsamples. Must not keep a handle."""

    @abstractmethod
    def _open(self) -> Any:
        """Open and return this process's handle."""

    @abstractmethod
    def _read(self, handle: Any, y: int, x: int, h: int, w: int, level: int) -> np.ndarray:
        """Pixels ``(h, w, C)`` of a region that lies inside ``level`` (h, w >= 1)."""

    def _close_handle(self, handle: Any) -> None:
        """Release a handle opened by :meth:`_open` in this process."""
        close = getattr(handle, "close", None)
        if close is not None:
            close()

    # -- public API ----------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        """Whether this process holds an open handle (``False`` until the first read)."""
        return self._handle is not None and self._pid == os.getpid()

    def read_region(
        self, y: int, x: int, h: int, w: int, level: int = 0, *, pad: bool = False
    ) -> np.ndarray:
        """Read the pixels ``[y : y + h, x : x + w]`` of pyramid level ``level``.

        Args:
            y, x: top-left corner, in pixels of ``level`` (not of level 0).
            h, w: region size in pixels of ``level``, >= 1.
            level: pyramid level, ``0 <= level < len(levels)``.
            pad: if ``False`` (default) the region must lie inside the level; if ``True`` it
                may reach past any border (or lie wholly outside) and the pixels outside the
                image are zeros.

        Returns:
            A new C-contiguous array of shape ``(h, w, C)`` and dtype :attr:`dtype`; only the
            tiles the region touches are decoded (PNG/JPEG: the whole image, once).

        Raises:
            TypeError: a coordinate, size or level is not an integer.
            ValueError: an out-of-range level or size, or a region outside the level without
                ``pad=True``.
            DataError: the file has become unreadable (corrupt or truncated data, deleted).
        """
        y, x, h, w, level = (_as_int(v, n) for v, n in zip(
            (y, x, h, w, level), ("y", "x", "h", "w", "level"), strict=True))
        if not 0 <= level < len(self.levels):
            raise ValueError(
                f"level={level} is out of range for {self.path}, which has "
                f"{len(self.levels)} level(s) 0..{len(self.levels) - 1} with sizes (H, W) "
                f"{self.levels}."
            )
        if h < 1 or w < 1:
            raise ValueError(f"Region size h={h}, w={w} for {self.path} must be >= 1.")
        height, width = self.levels[level]
        inside = y >= 0 and x >= 0 and y + h <= height and x + w <= width
        if not inside and not pad:
            raise ValueError(
                f"Region y={y}, x={x}, h={h}, w={w} reaches outside {self.path} at level "
                f"{level}, which is {height}x{width} px (H x W). Pass pad=True to zero-fill "
                "the pixels outside the image, or clip the region."
            )
        if inside:
            return self._read_checked(y, x, h, w, level)
        out = np.zeros((h, w, self.shape[2]), dtype=self.dtype)
        y0, y1 = max(y, 0), min(y + h, height)
        x0, x1 = max(x, 0), min(x + w, width)
        if y0 < y1 and x0 < x1:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._read_checked(
                y0, x0, y1 - y0, x1 - x0, level
            )
        return out

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is at or below ``downsample``.

        A level at most 1 % coarser than asked still counts (odd level sizes make factors
        like 4.02). ``downsample < 1`` gives level 0. Read a thumbnail of about ``H/d x W/d``
        with ``lv = best_level(d); reader.read_region(0, 0, *reader.levels[lv], level=lv)``
        (then resize by ``downsamples[lv] / d``).

        Raises:
            TypeError: ``downsample`` is not a number.
            ValueError: ``downsample`` is not positive and finite.
        """
        if isinstance(downsample, bool) or not isinstance(downsample, (int, float, np.number)):
            raise TypeError(f"downsample must be a number, got {downsample!r}.")
        if not (math.isfinite(downsample) and downsample > 0):
            raise ValueError(f"downsample must be a positive finite number, got {downsample!r}.")
        best = 0
        for index, factor in enumerate(self.downsamples):
            if factor <= downsample * (1 + _DOWNSAMPLE_TOLERANCE):
                best = index
        return best

    def close(self) -> None:
        """Release this process's file handle (if any).

        The reader stays usable: a later :meth:`read_region` opens the file again.
        """
        with _OPEN_LOCK:
            handle, pid = self._handle, self._pid
            self._handle, self._pid = None, None
        if handle is None:
            return
        if pid != os.getpid():
            _INHERITED.append(handle)  # a parent's handle: never close it here
            return
        self._close_handle(handle)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_pid"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, shape={getattr(self, 'shape', None)}, "
            f"dtype={getattr(self, 'dtype', None)}, levels={getattr(self, 'levels', None)})"
        )

    # -- internals -----------------------------------------------------------------------
    def _handle_for_this_process(self) -> Any:
        pid = os.getpid()
        if self._handle is not None and self._pid == pid:
            return self._handle
        with _OPEN_LOCK:
            if self._handle is not None and self._pid != pid:
                _INHERITED.append(self._handle)  # came through fork: abandon, do not close
                self._handle = None
            if self._handle is None:
                _check_is_file(self.path)
                self._handle = self._open()
                self._pid = pid
            return self._handle

    def _read_checked(self, y: int, x: int, h: int, w: int, level: int) -> np.ndarray:
        try:
            handle = self._handle_for_this_process()
            region = self._read(handle, y, x, h, w, level)
        except GigapatchError:
            raise
        except Exception as exc:  # any decoder's failure on bad data becomes one clear error
            raise DataError(
                f"Image {self.path} cannot be decoded at level {level}, region y={y}, x={x}, "
                f"h={h}, w={w} ({type(exc).__name__}: {exc}). The file is probably corrupt or "
                "truncated: re-export or re-download it, or remove it from the dataset."
            ) from exc
        return np.ascontiguousarray(region)

    def _set_levels(self, levels: list[tuple[int, int]], channels: int, dtype: Any) -> None:
        self.levels = [(int(h), int(w)) for h, w in levels]
        height, width = self.levels[0]
        self.shape = (height, width, int(channels))
        self.dtype = np.dtype(dtype)
        self.downsamples = [
            1.0 if i == 0 else (height / h + width / w) / 2
            for i, (h, w) in enumerate(self.levels)
        ]


class ReaderView(ImageReader):
    """A reader that presents another reader differently (a pyramid level as level 0, a
    transformed image): no file of its own; reads go through :attr:`base`, which keeps the
    handle. Subclasses set ``levels``, ``shape`` and ``downsamples`` and implement ``_read``
    in terms of ``self.base.read_region``."""

    def __init__(self, base: ImageReader) -> None:  # noqa: D107 - no probe: base has probed
        self.base = base
        self.path = base.path
        self._handle: Any = None
        self._pid: int | None = None
        self.dtype = base.dtype

    def _probe(self) -> None:  # pragma: no cover - the base reader has probed
        pass

    def _open(self) -> Any:
        return self.base

    def _close_handle(self, handle: Any) -> None:
        pass

    def close(self) -> None:
        self.base.close()


def open_image(
    path: str | os.PathLike[str],
    *,
    backend: str | None = None,
    max_pixels: int | None = None,
) -> ImageReader:
    """Open a (huge) image for region reads; reads its header only.

    Args:
        path: the image file; the backend follows from its extension (case-insensitive), see
            :data:`SUPPORTED_EXTENSIONS`.
        backend: force a backend: ``"tiff"``, ``"openslide"``, ``"pillow"`` or ``"numpy"``
            (e.g. ``"tiff"`` reads SVS/NDPI with tifffile, ``"openslide"`` reads a generic
            tiled pyramidal TIFF with OpenSlide).
        max_pixels: PNG/JPEG only: the largest ``H * W`` this reader decodes. ``None``
            (default) follows Pillow's decompression-bomb limit ``PIL.Image.MAX_IMAGE_PIXELS``
            (refusing anything above it; Pillow's own setting ``None`` means no limit).

    Returns:
        An :class:`ImageReader` that holds no file handle yet.

    Raises:
        DataError: the file is missing, has an unsupported extension (the message lists the
            supported ones), or its header is corrupt or truncated; a PNG/JPEG exceeds the
            pixel limit.
        GigapatchError: a slide format needs OpenSlide, which is not installed
            (``pip install 'gigapatch[slides]'``).
        ValueError: unknown ``backend``.
    """
    path = Path(path)
    if backend is None:
        suffix = path.suffix.lower()
        backend = SUPPORTED_EXTENSIONS.get(suffix)
        if backend is None:
            _check_is_file(path)
            listed = " ".join(sorted(SUPPORTED_EXTENSIONS))
            raise DataError(
                f"Image {path} has an unsupported extension {suffix or '(none)'!r}. Supported: "
                f"{listed}. Convert the image (e.g. to a tiled TIFF), or pass backend= if the "
                "extension is wrong."
            )
    if backend == "pillow":
        return PillowReader(path, max_pixels=max_pixels)
    readers: dict[str, type[ImageReader]] = {
        "tiff": TiffReader, "openslide": OpenSlideReader, "numpy": NumpyReader,
    }
    if backend not in readers:
        raise ValueError(
            f"backend={backend!r} is unknown; use one of 'tiff', 'openslide', 'pillow', 'numpy'."
        )
    return readers[backend](path)


# ---------------------------------------------------------------------------------------
# TIFF: tifffile + zarr
# ---------------------------------------------------------------------------------------
class TiffReader(ImageReader):
    """TIFF, BigTIFF and OME-TIFF, tiled or striped, pyramidal (SubIFDs, reduced-resolution
    pages, OME or vendor series) or not, with any codec tifffile/imagecodecs decodes.

    Reads the first series of the file (for SVS: the pyramid, not the label or macro image).
    The series' axes must be Y, X and at most one channel axis (``S`` samples or ``C``
    channels, interleaved or planar); Z stacks, time series and other extra axes are refused.
    Missing (sparse) tiles read as zeros. A region read decodes only the tiles (or strips) it
    overlaps: on a level stored as one tiled page with interleaved samples (what pyramid
    writers produce) the reader seeks to those tiles and decodes their bytes itself, which
    costs little more than the decoding; other layouts go through tifffile's Zarr store.
    """

    backend = "tiff"

    def _probe(self) -> None:
        import tifffile

        try:
            with tifffile.TiffFile(self.path) as tif:
                if not tif.series:
                    raise DataError(
                        f"TIFF {self.path} contains no image. Re-export it, or remove it "
                        "from the dataset."
                    )
                series = tif.series[0]
                axes = series.axes
                self._axes = axes
                extra = [a for a in axes if a not in "YXSC"]
                if "Y" not in axes or "X" not in axes or extra or ("S" in axes and "C" in axes):
                    raise DataError(
                        f"TIFF {self.path} has axes {axes!r} with shape {series.shape}; "
                        "gigapatch reads 2-D images with at most one channel axis (Y, X and "
                        "S or C). Save each plane (Z, T, ...) as its own image."
                    )
                channel_axis = next((a for a in axes if a in "SC"), None)
                channels = series.shape[axes.index(channel_axis)] if channel_axis else 1
                levels = []
                for level in series.levels:
                    shape = level.shape
                    levels.append((shape[axes.index("Y")], shape[axes.index("X")]))
                    self._check_level(level, os.path.getsize(self.path))
                self._set_levels(levels, channels, series.dtype)
        except DataError:
            raise
        except Exception as exc:  # TiffFileError, struct.error, ValueError ... on a bad header
            raise DataError(
                f"TIFF {self.path} cannot be read ({type(exc).__name__}: {exc}). The file is "
                "probably corrupt, truncated or not a TIFF: re-export or re-download it, or "
                "remove it from the dataset."
            ) from exc

    def _check_level(self, level: Any, file_size: int) -> None:
        """DataError if a level's codec is unavailable or its data lies past the file's end."""
        from tifffile import TIFF

        for page in level.pages:
            if page is None:
                continue
            compression = page.keyframe.compression
            if compression != 1 and compression not in TIFF.DECOMPRESSORS:
                raise DataError(
                    f"TIFF {self.path} uses compression {compression!r}, which no installed "
                    "codec decodes. Install or upgrade imagecodecs (pip install -U imagecodecs)."
                )
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            present = (offsets > 0) & (counts > 0)  # sparse tiles have offset/count 0
            end = int((offsets + counts)[present].max()) if present.any() else 0
            if end > file_size:
                raise DataError(
                    f"TIFF {self.path} is truncated: its image data reaches byte {end} but the "
                    f"file has {file_size} bytes. Re-copy or re-download the file."
                )

    def _open(self) -> Any:
        import tifffile

        tif = tifffile.TiffFile(self.path)
        try:
            tiled = [_direct_tile_page(level) for level in tif.series[0].levels]
        except BaseException:
            tif.close()
            raise
        return _TiffHandle(tif, {}, {}, tiled, threading.Lock(), _TileCache(TILE_CACHE_BYTES))

    def _close_handle(self, handle: _TiffHandle) -> None:
        for store in handle.stores.values():
            store.close()
        handle.tif.close()

    def _zarr_level(self, handle: _TiffHandle, level: int) -> Any:
        import zarr

        if level not in handle.arrays:
            handle.stores[level] = handle.tif.series[0].aszarr(level=level)
            handle.arrays[level] = zarr.open_array(handle.stores[level], mode="r")
        return handle.arrays[level]

    def _read(self, handle: _TiffHandle, y: int, x: int, h: int, w: int, level: int
              ) -> np.ndarray:
        page = handle.tiled[level]
        if page is not None:
            # Regions smaller than a tile (256² patches of 512² tiles) share tiles with their
            # neighbours: keep the decoded ones, so each is decoded once, not once per patch.
            cache = handle.tiles if h < page.tilelength or w < page.tilewidth else None
            return self._read_tiles(handle.tif.filehandle, handle.lock, page, y, x, h, w,
                                    cache, level)
        axes = self._axes
        index = tuple(
            slice(y, y + h) if a == "Y" else slice(x, x + w) if a == "X" else slice(None)
            for a in axes
        )
        with handle.lock:  # the Zarr store shares the file handle: one read at a time
            region = np.asarray(self._zarr_level(handle, level)[index])
        order = [axes.index("Y"), axes.index("X")] + [i for i, a in enumerate(axes) if a in "SC"]
        region = region.transpose(order)
        return region if region.ndim == 3 else region[:, :, None]

    def _read_tiles(
        self, fh: Any, lock: threading.Lock, page: Any, y: int, x: int, h: int, w: int,
        cache: _TileCache | None = None, level: int = 0
    ) -> np.ndarray:
        """``(h, w, S)`` from the tiles of one tiled page: read each tile's bytes, decode
        (or take the decoded tile from ``cache``, and keep it there)."""
        th, tw, samples = page.tilelength, page.tilewidth, page.samplesperpixel
        across = -(-page.imagewidth // tw)
        out = np.zeros((h, w, samples), dtype=page.dtype)
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                index = ty * across + tx
                offset, count = page.dataoffsets[index], page.databytecounts[index]
                if not offset or not count:
                    continue  # sparse tile: zeros
                tile = cache.get((level, index), lock) if cache is not None else None
                if tile is None:
                    with lock:
                        fh.seek(offset)
                        data = fh.read(count)
                    # A decoder's error on bad bytes becomes _read_checked's DataError.
                    tile = page.decode(data, index, jpegtables=page.jpegtables)[0]
                    tile = tile.reshape(th, tw, samples)
                    if cache is not None:
                        cache.put((level, index), tile, lock)
                y0, x0 = max(y, ty * th), max(x, tx * tw)
                y1, x1 = min(y + h, (ty + 1) * th), min(x + w, (tx + 1) * tw)
                out[y0 - y : y1 - y, x0 - x : x1 - x] = tile[
                    y0 - ty * th : y1 - ty * th, x0 - tx * tw : x1 - tx * tw
                ]
        return out


#: Bytes of decoded tiles an open TIFF keeps for reads smaller than a tile (least recently
#: used out): a 256² patch grid over 512² JPEG tiles then decodes each tile once, not 4 times.
TILE_CACHE_BYTES = 32 * 2**20


class _TileCache:
    """Decoded tiles by ``(level, tile index)``, least recently used out beyond ``capacity``
    bytes; callers pass the handle's lock (dictionary updates only; decoding runs outside)."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.size = capacity, 0
        self.tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def get(self, key: tuple[int, int], lock: threading.Lock) -> np.ndarray | None:
        with lock:
            tile = self.tiles.get(key)
            if tile is not None:
                self.tiles.move_to_end(key)
            return tile

    def put(self, key: tuple[int, int], tile: np.ndarray, lock: threading.Lock) -> None:
        if tile.nbytes > self.capacity:
            return
        with lock:
            if key in self.tiles:
                return
            self.tiles[key] = tile
            self.size += tile.nbytes
            while self.size > self.capacity:
                self.size -= self.tiles.popitem(last=False)[1].nbytes


class _TiffHandle(NamedTuple):
    """An open TIFF in one process: the file, per-level Zarr stores and arrays (opened on
    first use, for layouts the direct path does not take), each level's directly decodable
    tiled page (or ``None``), the lock that keeps a seek and its read together, and the
    decoded tiles kept for reads smaller than a tile."""

    tif: Any
    stores: dict[int, Any]
    arrays: dict[int, Any]
    tiled: list[Any]
    lock: threading.Lock
    tiles: _TileCache


def _direct_tile_page(level: Any) -> Any | None:
    """The level's tiled page if its tiles can be decoded directly (one 2-D page, samples
    interleaved), else ``None``."""
    from tifffile import TiffPage

    pages = level.pages
    if len(pages) != 1 or not isinstance(pages[0], TiffPage):
        return None
    page = pages[0]
    if not page.is_tiled or page.imagedepth != 1 or len(level.shape) not in (2, 3):
        return None
    if page.samplesperpixel > 1 and page.planarconfig != 1:  # planar samples: Zarr path
        return None
    if tuple(level.shape[:2]) != (page.imagelength, page.imagewidth):
        return None
    return page


# ---------------------------------------------------------------------------------------
# Whole-slide formats: OpenSlide (optional)
# ---------------------------------------------------------------------------------------
def _import_openslide(path: Path) -> Any:
    try:
        import openslide
    except (ImportError, OSError) as exc:  # no package, or no shared library (openslide-bin)
        raise GigapatchError(
            f"Reading {path} needs OpenSlide, which is not installed or cannot load its library "
            f"({exc}). Install it with: {_SLIDES_HINT}. (tifffile also reads SVS and NDPI: "
            "open_image(path, backend='tiff').)"
        ) from exc
    return openslide


class OpenSlideReader(ImageReader):
    """Whole-slide images through OpenSlide (SVS, NDPI, MRXS, SCN, VMS, BIF, generic TIFF).

    Needs the optional extra: ``pip install 'gigapatch[slides]'`` (openslide-python and
    openslide-bin), imported on first use. Pixels are ``uint8`` RGB (``C = 3``): OpenSlide's
    transparent pixels (outside the scanned area) are composited onto the slide's background
    colour (``openslide.background-color``, white if unset). OpenSlide addresses regions in
    level-0 pixels; this reader converts ``(y, x)`` of a level by its downsample, which is
    exact for power-of-two pyramids and may round by a pixel for odd level sizes.
    """

    backend = "openslide"

    def _probe(self) -> None:
        slide = self._open()
        try:
            dims = slide.level_dimensions
            self._set_levels([(h, w) for w, h in dims], 3, np.uint8)
            self.downsamples = [float(d) for d in slide.level_downsamples]  # OpenSlide's own
            colour = slide.properties.get("openslide.background-color") or "ffffff"
            try:
                self._background = np.array(
                    [int(colour[i : i + 2], 16) for i in (0, 2, 4)], dtype=np.uint16
                )
            except ValueError:
                self._background = np.array([255, 255, 255], dtype=np.uint16)
        finally:
            slide.close()

    def _open(self) -> Any:
        openslide = _import_openslide(self.path)
        try:
            return openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise DataError(
                f"Slide {self.path} is not in a format OpenSlide reads ({exc}). Check the file "
                "type; plain TIFFs read with open_image(path, backend='tiff')."
            ) from exc
        except openslide.OpenSlideError as exc:
            raise DataError(
                f"Slide {self.path} cannot be opened by OpenSlide ({exc}); it is probably "
                "corrupt or incomplete (MRXS/VMS need their companion folder or files). "
                "Re-copy or re-export it."
            ) from exc

    def _read(self, handle: Any, y: int, x: int, h: int, w: int, level: int) -> np.ndarray:
        factor = self.downsamples[level]
        location = (round(x * factor), round(y * factor))
        rgba = np.asarray(handle.read_region(location, level, (w, h)))  # (h, w, 4) uint8
        rgb, alpha = rgba[:, :, :3], rgba[:, :, 3:]
        if alpha.min() == 255:
            return rgb.copy()
        blended = (rgb * alpha.astype(np.uint16)
                   + self._background * (255 - alpha.astype(np.uint16)) + 127) // 255
        return blended.astype(np.uint8)


# ---------------------------------------------------------------------------------------
# PNG / JPEG: Pillow (whole image decoded once per process)
# ---------------------------------------------------------------------------------------
_PILLOW_GRAY = {"1": np.uint8, "L": np.uint8, "LA": np.uint8, "La": np.uint8,
                "I;16": np.uint16, "I;16L": np.uint16, "I;16B": np.uint16, "I;16N": np.uint16,
                "I": np.int32, "F": np.float32}


class PillowReader(ImageReader):
    """PNG and JPEG through Pillow: the first read decodes the whole image into memory.

    ``C = 1`` for grayscale (``1``/``L``/``LA`` as ``uint8``, 16-bit as ``uint16``, ``I`` as
    ``int32``, ``F`` as ``float32``), else ``C = 3`` ``uint8`` RGB (alpha dropped; palette,
    CMYK, YCbCr converted). No pyramid: one level.

    Args:
        path: the PNG or JPEG file (either is detected by content, whatever the extension).
        max_pixels: the largest ``H * W`` decoded; ``None`` follows
            ``PIL.Image.MAX_IMAGE_PIXELS`` at construction (``None`` there: no limit). The
            limit is checked from the header here, and Pillow's own guard is bypassed for
            this file only, so Pillow's global setting is never changed.
    """

    backend = "pillow"

    def __init__(self, path: str | os.PathLike[str], max_pixels: int | None = None) -> None:
        if max_pixels is not None and (
            isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer))
            or max_pixels < 1
        ):
            raise ValueError(f"max_pixels must be a positive integer or None, got {max_pixels!r}.")
        self._max_pixels = max_pixels
        super().__init__(path)

    def _open_plugin(self) -> Any:
        """Open the file's header with the PNG or JPEG plugin directly (no bomb check)."""
        from PIL import JpegImagePlugin, PngImagePlugin

        plugins = [PngImagePlugin.PngImageFile, JpegImagePlugin.JpegImageFile]
        if self.path.suffix.lower() in (".jpg", ".jpeg"):
            plugins.reverse()
        errors = []
        for plugin in plugins:
            try:
                return plugin(str(self.path))
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                errors.append(f"{plugin.format}: {exc}")
        raise DataError(
            f"Image {self.path} cannot be decoded as PNG or JPEG ({'; '.join(errors)}). It is "
            "corrupt, truncated or another format: re-export or re-download it."
        )

    def _probe(self) -> None:
        from PIL import Image

        with self._open_plugin() as img:
            width, height = img.size
            self._mode = img.mode
        limit = self._max_pixels if self._max_pixels is not None else Image.MAX_IMAGE_PIXELS
        if limit is not None and height * width > limit:
            source = (
                "max_pixels" if self._max_pixels is not None
                else "Pillow's decompression-bomb limit PIL.Image.MAX_IMAGE_PIXELS"
            )
            raise DataError(
                f"Image {self.path} has {height}x{width} = {height * width} pixels, above the "
                f"limit of {limit} ({source}). PNG/JPEG are decoded whole (about "
                f"{height * width * 3 / 2**30:.1f} GiB as RGB): store huge images as tiled "
                "TIFFs, or, if you trust the file and have the memory, pass "
                f"open_image(path, max_pixels={height * width})."
            )
        dtype = _PILLOW_GRAY.get(self._mode)
        self._set_levels([(height, width)], 1 if dtype else 3, dtype or np.uint8)

    def _open(self) -> np.ndarray:
        with self._open_plugin() as img:
            if (img.size[1], img.size[0]) != self.levels[0]:
                raise DataError(f"Image {self.path} changed size since it was opened.")
            img.load()
            mode = img.mode
            if mode in ("1", "LA", "La"):
                array = np.asarray(img.convert("L"))
            elif mode in _PILLOW_GRAY:
                array = np.asarray(img).astype(_PILLOW_GRAY[mode], copy=False)
            else:
                if mode == "P" and "transparency" in img.info:
                    img = img.convert("RGBA")
                array = np.asarray(img.convert("RGB"))
        array = array.reshape(array.shape[0], array.shape[1], -1)
        array.setflags(write=False)
        return array

    def _close_handle(self, handle: Any) -> None:
        pass  # the decoded array is freed with the reference

    def _read(self, handle: Any, y: int, x: int, h: int, w: int, level: int) -> np.ndarray:
        return handle[y : y + h, x : x + w].copy()


# ---------------------------------------------------------------------------------------
# .npy: numpy memory map
# ---------------------------------------------------------------------------------------
class NumpyReader(ImageReader):
    """``.npy`` arrays of shape ``(H, W)`` (C = 1) or ``(H, W, C)``, memory-mapped read-only:
    a region read touches only its own bytes. Any numeric or bool dtype; no pyramid."""

    backend = "numpy"

    def _probe(self) -> None:
        try:
            array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # bad magic, truncated, object dtype
            raise DataError(
                f"Array file {self.path} cannot be memory-mapped ({exc}). It is corrupt, "
                "truncated, not a .npy file or holds Python objects: re-save it with "
                "numpy.save from a numeric array."
            ) from exc
        shape, dtype = array.shape, array.dtype
        del array  # releases the memory map: no handle until the first read
        if len(shape) not in (2, 3) or 0 in shape or dtype.kind not in "biuf":
            raise DataError(
                f"Array file {self.path} holds an array of shape {shape} and dtype {dtype}; "
                "an image must be (H, W) or (H, W, C), non-empty, with a numeric dtype."
            )
        self._set_levels([shape[:2]], shape[2] if len(shape) == 3 else 1, dtype)

    def _open(self) -> np.ndarray:
        array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        if array.shape[:2] != self.levels[0]:
            raise DataError(f"Array file {self.path} changed shape since it was opened.")
        return array if array.ndim == 3 else array[:, :, None]

    def _close_handle(self, handle: Any) -> None:
        pass  # the map closes when the last reference (ours, or a concurrent read's) goes

    def _read(self, handle: Any, y: int, x: int, h: int, w: int, level: int) -> np.ndarray:
        return np.array(handle[y : y + h, x : x + w])


# ---------------------------------------------------------------------------------------
def _check_is_file(path: Path) -> None:
    if not path.is_file():
        what = "is a directory, not an image file" if path.is_dir() else "not found"
        raise DataError(f"Image file {what}: {path}. Check the path (and the list that names it).")


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    return int(value)
