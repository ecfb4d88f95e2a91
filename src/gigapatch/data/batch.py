"""A batch of images that stay on disk: patches are read when a method asks for them.

:class:`LazyBatch` stands in for a ``(B, C, H, W)`` ``uint8`` tensor wherever the methods take
images: :meth:`PatchGrid.taker <gigapatch.core.grid.PatchGrid.taker>` and
:meth:`~gigapatch.core.grid.PatchGrid.gather` read only the patches they need through the
images' :class:`~gigapatch.io.readers.ImageReader` (decoding only the tiles those touch), and
:meth:`LazyBatch.resized` makes a small view of each image from the closest pyramid level
instead of decoding level 0. Host memory stays set by the patches, not by the image.
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from gigapatch.core.grid import PatchGrid
from gigapatch.core.errors import DataError, GigapatchError
from gigapatch.data.tissue import foreground_mask
from gigapatch.io.readers import ImageReader

__all__ = [
    "IO_THREADS",
    "batches",
    "read_ahead",
    "read_chunks",
    "unwrap_worker_error",
    "STRIP_PIXELS",
    "Images",
    "LazyBatch",
    "ShardedSampler",
    "collate",
    "one_image",
    "first_image",
    "make_loader",
    "read_resized",
]


STRIP_PIXELS = 1 << 24
"""Most pixels (per channel) that :func:`read_resized` reads at once from a level much larger
than its target (16 Mpx: 16 MiB of 8-bit grey, 48 MiB of RGB)."""


def read_resized(reader: ImageReader, size: tuple[int, int]) -> torch.Tensor:
    """The whole image resized to ``size = (h, w)``: ``(C, h, w)`` ``uint8``.

    Reads the coarsest pyramid level that is still at least as fine as the target (so a
    65,536² slide with a 1,024² level costs one 1,024² read for a 256² view), then resizes with
    an antialiased bilinear filter. When that level is at least twice the target on both axes
    and larger than :data:`STRIP_PIXELS` (an image without a pyramid, say), it is first
    box-averaged by the integer factor ``f = min(H // h, W // w)`` strip by strip (``f x f``
    means, edge boxes over the pixels they hold), so memory stays set by the strip and the
    target, never by the image.
    """
    height, width = reader.shape[:2]
    h, w = size
    level = reader.best_level(min(height / h, width / w))
    lh, lw = reader.levels[level]
    factor = min(lh // h, lw // w)
    if factor >= 2 and lh * lw > STRIP_PIXELS:
        x = _box_reduced(reader, level, factor)[None]
    else:
        x = _chw(reader.read_region(0, 0, lh, lw, level=level), reader)[None]  # (1, C, lh, lw)
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x[0]


def _box_reduced(reader: ImageReader, level: int, factor: int) -> torch.Tensor:
    """Level ``level`` averaged over ``factor x factor`` boxes, read in strips of whole boxes
    of at most about :data:`STRIP_PIXELS` pixels: ``(C, ceil(H / f), ceil(W / f))`` ``uint8``
    (means rounded half up)."""
    lh, lw = reader.levels[level]
    rows = max(1, STRIP_PIXELS // (factor * lw)) * factor  # a multiple of factor
    strips = []
    for y in range(0, lh, rows):
        strip = _chw(reader.read_region(y, 0, min(rows, lh - y), lw, level=level), reader)
        strip = strip[None].float()
        mean = F.avg_pool2d(strip, factor, ceil_mode=True)  # (1, C, rows / f, ceil(W / f))
        strips.append(mean.add_(0.5).floor_().to(torch.uint8)[0])
    return torch.cat(strips, dim=1)


def _chw(pixels: np.ndarray, reader: ImageReader) -> torch.Tensor:
    """Pixels ``(h, w, C)`` read from ``reader`` → ``(C, h, w)`` ``uint8`` tensor; DataError
    naming the file unless they are 8-bit."""
    if pixels.dtype != np.uint8:
        raise DataError(
            f"{reader.path}: pixels are {pixels.dtype}; gigapatch trains on 8-bit images. "
            "Convert the file to uint8 (e.g. rescale 16-bit to 0..255)."
        )
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)


#: Threads reading patches in :meth:`LazyBatch.take` (1: serial).
IO_THREADS = max(1, min(8, os.cpu_count() or 1))
_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _io_pool() -> ThreadPoolExecutor:
    """This process's reading pool (a pool inherited through ``fork`` has no threads)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(IO_THREADS, thread_name_prefix="gigapatch-io"))
    return _POOL[1]


def read_ahead(read: Callable[[Any], torch.Tensor], items: Sequence[Any]
               ) -> Iterator[tuple[Any, torch.Tensor]]:
    """``(item, read(item))`` for each of ``items``, reading the next item in a background
    thread while the caller works on the current one (e.g. the encoder on a chunk while the
    next chunk's patches are read): IO hides behind compute. Errors surface in order."""
    if not items:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="gigapatch-read-ahead") as ahead:
        pending = ahead.submit(read, items[0])
        for n, item in enumerate(items):
            patches = pending.result()
            if n + 1 < len(items):
                pending = ahead.submit(read, items[n + 1])
            yield item, patches


def read_chunks(images: Any, read: Callable[[Any], torch.Tensor], items: Sequence[Any],
                device: torch.device) -> Iterator[tuple[Any, torch.Tensor]]:
    """``(item, read(item))`` for each of ``items`` (e.g. a chunk's cells → its patches
    ``(P, C, p, p)``). From disk (``images`` a :class:`LazyBatch`) the next item is read by a
    background thread while the caller encodes the current one (:func:`read_ahead`), and, for
    a CUDA ``device``, into page-locked memory, so that the copy to the device
    (``non_blocking``) overlaps compute too. In memory, items are read as they are needed."""
    if not isinstance(images, LazyBatch):
        return ((item, read(item)) for item in items)
    if device.type == "cuda":
        return read_ahead(lambda item: read(item).pin_memory(), items)
    return read_ahead(read, items)


class LazyBatch:
    """``B`` same-sized images read on demand; behaves like a ``(B, C, H, W)`` ``uint8`` batch
    for the methods (``shape``, ``dtype``, patches through the grid, :meth:`resized`)."""

    dtype = torch.uint8

    def __init__(self, readers: Sequence[ImageReader]) -> None:
        if not readers:
            raise ValueError("a LazyBatch needs at least one image")
        shapes = {tuple(r.shape) for r in readers}
        if len(shapes) > 1:
            listed = ", ".join(f"{r.path.name} {r.shape[0]}×{r.shape[1]}" for r in readers)
            raise DataError(
                f"images in one batch differ in size ({listed}); use train.batch_size 1 or "
                "images of one size."
            )
        self.readers = list(readers)
        self._masks: dict[tuple, torch.Tensor] = {}
        h, w, c = self.readers[0].shape
        self.shape = torch.Size((len(self.readers), c, h, w))

    def __len__(self) -> int:
        return len(self.readers)

    def is_floating_point(self) -> bool:
        """Always ``False``: pixels are ``uint8``."""
        return False

    def take(self, boxes: torch.Tensor, images: torch.Tensor, patch: int) -> torch.Tensor:
        """Read ``P`` patches: ``boxes`` ``(P, 2)`` top-left ``(y, x)`` in level-0 pixels of
        images ``images`` ``(P,)`` → ``(P, C, patch, patch)`` ``uint8`` (zeros past edges).

        The patches are read by a pool of :data:`IO_THREADS` threads (decoders release the
        GIL); every reader backend is safe for it (``tests/data/test_batch.py`` compares with
        serial reads)."""
        out = torch.empty((len(images), self.shape[1], patch, patch), dtype=torch.uint8)
        jobs = list(zip(images.tolist(), boxes.tolist()))

        def read(job: tuple[int, list[int]]) -> np.ndarray:
            b, (y, x) = job
            return self.readers[b].read_region(y, x, patch, patch, pad=True)

        # Threads only decode; the copies into ``out`` happen here, in the caller's thread
        # (grad and inference modes are per thread: ``out`` may be an inference tensor).
        regions = map(read, jobs) if len(jobs) < 2 or IO_THREADS < 2 else \
            _io_pool().map(read, jobs)  # re-raises a reader's error
        for i, ((b, _), region) in enumerate(zip(jobs, regions)):
            out[i] = _chw(region, self.readers[b])
        return out

    def foreground(
        self, grid: PatchGrid, background: str = "auto", threshold: float | None = None
    ) -> torch.Tensor:
        """Which cells of ``grid`` hold content: ``(B, N)`` bool, row-major (an Otsu mask on a
        low-resolution level of each image, :func:`gigapatch.data.tissue.foreground_mask`)."""
        key = (grid.patch_size, grid.stride, background, threshold)
        if key not in self._masks:
            masks = [
                foreground_mask(r, grid.patch_size, grid.stride, threshold=threshold,
                                background=background).reshape(-1)
                for r in self.readers
            ]
            self._masks[key] = torch.from_numpy(np.stack(masks))
        return self._masks[key]

    def resized(self, size: tuple[int, int]) -> torch.Tensor:
        """Every image resized to ``size`` from its closest pyramid level: ``(B, C, h, w)``."""
        return torch.stack([read_resized(r, size) for r in self.readers])

    def load(self) -> torch.Tensor:
        """Decode every image at full resolution: ``(B, C, H, W)`` ``uint8`` (memory ∝ image)."""
        b, c, h, w = self.shape
        return torch.stack([_chw(r.read_region(0, 0, h, w), r) for r in self.readers])


#: Host images as the methods take them: a ``(B, C, H, W)`` tensor or a batch read from disk.
Images = torch.Tensor | LazyBatch


def one_image(images: Images, i: int = 0) -> Images:
    """A batch of image ``i`` alone: ``(1, C, H, W)`` (a tensor view, or a
    :class:`LazyBatch` of its reader; ``images`` itself when it holds only that one)."""
    if images.shape[0] == 1:
        return images
    return LazyBatch(images.readers[i : i + 1]) if isinstance(images, LazyBatch) \
        else images[i : i + 1]


def first_image(images: Images) -> torch.Tensor | ImageReader:
    """The first image of a batch: a ``(C, H, W)`` tensor, or the reader of a
    :class:`LazyBatch`."""
    return images.readers[0] if isinstance(images, LazyBatch) else images[0]


def collate(
    batch: list[tuple[torch.Tensor | ImageReader, Any]],
    collate_targets: Callable[[list[Any]], Any],
) -> tuple[Images, Any]:
    """Stack ``(C, H, W)`` images and collate their targets with ``collate_targets`` (the
    task's :meth:`~gigapatch.tasks.base.Task.collate`); lazy readers become a
    :class:`LazyBatch` (read on demand). Differing image sizes give a clear error."""
    targets = collate_targets([b[1] for b in batch])
    if isinstance(batch[0][0], ImageReader):
        return LazyBatch([b[0] for b in batch]), targets
    shapes = {tuple(img.shape) for img, _ in batch}
    if len(shapes) > 1:
        raise DataError(
            f"images in one batch differ in size {sorted(shapes)}; resize them to one size "
            "or use batch_size 1."
        )
    return torch.stack([b[0] for b in batch]), targets


class ShardedSampler(Sampler[int]):
    """This process's share of a data set's indices, in an order set by ``seed`` alone.

    ``shuffle``: a permutation drawn from ``torch.Generator().manual_seed(seed)`` after two
    int64 draws (the order the loaders of gigapatch 0.1 gave for the same seed: each of
    their two iterators per epoch drew a worker seed first; kept so that a seed still
    gives the same run); else the data set's order. With ``world`` processes, process ``rank`` takes every ``world``-th
    index from position ``rank``, so that the processes' batches ``i`` together are the
    batch ``i`` of one process with ``world`` times the batch size. ``pad``: repeat indices
    from the start so that every process gets the same count (training: every process takes
    the same number of steps); without it the shares differ by at most one and no index
    repeats (validation: every image counts once).
    """

    def __init__(self, size: int, *, shuffle: bool, seed: int, rank: int = 0, world: int = 1,
                 pad: bool = True) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world, self.pad = rank, world, pad

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed)
            torch.empty(2, dtype=torch.int64).random_(generator=g)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.pad and self.world > 1 and self.size % self.world:
            extra = self.world - self.size % self.world
            order += (order * (extra // max(1, len(order)) + 1))[:extra]
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        if self.pad and self.world > 1:
            return math.ceil(self.size / self.world)
        return len(range(self.rank, self.size, self.world))


def make_loader(ds: Dataset, batch_size: int, collate_targets: Callable[[list[Any]], Any], *,
                shuffle: bool, seed: int, num_workers: int = 0, rank: int = 0,
                world: int = 1) -> DataLoader:
    """A DataLoader over this process's share of ``ds`` (:class:`ShardedSampler`) whose order
    depends only on ``seed``, not on the number of workers or earlier epochs."""
    sampler = ShardedSampler(len(ds), shuffle=shuffle, seed=seed, rank=rank, world=world,
                             pad=shuffle)
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=functools.partial(collate, collate_targets=collate_targets),
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),  # workers' base seed: fixed by seed
    )


#: What DataLoader puts before the original traceback of an error raised in a worker.
_WORKER_MARK = "Original Traceback"


def unwrap_worker_error(err: GigapatchError) -> GigapatchError:
    """The error a DataLoader worker raised, without the worker wrapping.

    A worker's exception is re-raised in the main process as the same class with the message
    ``"Caught DataError in DataLoader worker process 0. Original Traceback …"`` (some 25
    lines); this gives back the same class with the original one-line message (``err``
    itself if it was not wrapped)."""
    text = str(err)
    if _WORKER_MARK not in text:
        return err
    name = f"{type(err).__module__}.{type(err).__qualname__}: "
    at = text.rfind(name)
    message = text[at + len(name):] if at >= 0 else text.strip().splitlines()[-1]
    return type(err)(message.strip())


def batches(loader: DataLoader) -> Iterator[Any]:
    """Iterate ``loader`` (once: its workers start once), with errors raised in its worker
    processes shown as they would be without workers (:func:`unwrap_worker_error`)."""
    try:
        yield from loader
    except GigapatchError as err:
        clean = unwrap_worker_error(err)
        if clean is err:
            raise
        raise clean from None
