"""Per-image cache of PatchGD's latent grid Z: when θ1 is frozen (``model.freeze_encoder``),
and for ``method.z_cache: epoch | refresh`` (:class:`ZCache`, with each cell's age).

A frozen encoder is a fixed function of the patch (eval mode, no gradients), so an image's Z
(and its global patch's embedding) are the same at every step and every epoch: they are
computed once and kept on the host, least recently used first out when the cache would pass
``method.z_cache_budget`` bytes. With a frozen θ1 the inner steps' re-encoded cells equal the
cached ones, so a training step is θ2 on the cached Z.

An image is known by its content: the file behind a lazy reader (path, size and modification
time, the pyramid level and augmentation it is read with), or a hash of an in-memory image's
bytes. An augmented image is a new image (a miss), so the cache is never stale; loading
weights clears it.

Entries that do not fit the RAM budget go to memory-mapped files in ``spill_dir`` (when
given): an entry evicted from RAM is written there, and read back as a mapping (writes to it
go to the file), so a cache larger than RAM still answers, at the speed of the disk.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import torch

from gigapatch.data.augment import AugmentedView
from gigapatch.data.batch import LazyBatch
from gigapatch.io.readers import ImageReader
from gigapatch.io.resolution import LevelView

__all__ = ["ZCache", "image_keys"]


def _reader_key(reader: ImageReader) -> Hashable:
    if isinstance(reader, AugmentedView):
        return ("augmented", reader.p, _reader_key(reader.base))
    if isinstance(reader, LevelView):
        return ("level", reader.offset, _reader_key(reader.base))
    stat = os.stat(reader.path)
    return (str(reader.path), stat.st_size, stat.st_mtime_ns, tuple(reader.shape))


def image_keys(images: torch.Tensor | LazyBatch) -> list[Hashable | None]:
    """One key per image of a ``(B, C, H, W)`` batch (tensor or :class:`LazyBatch`);
    ``None`` (never cached) for tensors without bytes to hash (the fake tensors of memory
    estimates)."""
    if isinstance(images, LazyBatch):
        return [_reader_key(r) for r in images.readers]
    if type(images) is not torch.Tensor:
        return [None] * images.shape[0]
    out: list[Hashable | None] = []
    for image in images:
        data = image.detach().cpu().contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy()  # the bytes, any dtype, no copy
        # SHA-256: hardware-accelerated on current CPUs, 2-3× blake2b's rate; at 1,000² it
        # was 8 % of a cached PatchGD step (the key is computed for every image, every step)
        digest = hashlib.sha256(raw).hexdigest()[:32]
        out.append((digest, tuple(data.shape), str(data.dtype)))
    return out


Entry = tuple[torch.Tensor, "torch.Tensor | None"]


class ZCache:
    """``key → (Z, extra or None)`` host tensors (``extra``: the global embedding ``(C,)`` of
    a frozen θ1, or the cells' ages ``(N,)``), LRU within ``budget`` bytes of RAM; with a
    ``spill_dir``, entries pushed out of RAM are kept in memory-mapped files there."""

    def __init__(self, budget: int, spill_dir: str | Path | None = None) -> None:
        self.budget, self.bytes = budget, 0
        self.items: OrderedDict[Hashable, Entry] = OrderedDict()
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.on_disk: dict[Hashable, Entry] = {}
        self.hits = self.misses = 0

    def get(self, key: Hashable | None) -> Entry | None:
        found = None if key is None else self.items.get(key)
        if found is None and key is not None:
            found = self.on_disk.get(key)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        if key in self.items:
            self.items.move_to_end(key)
        return found

    def put(self, key: Hashable | None, z: torch.Tensor, g: torch.Tensor | None) -> None:
        if key is None:
            return
        self.on_disk.pop(key, None)
        size = self.entry_bytes((z, g))
        if key in self.items:
            self.bytes -= self.entry_bytes(self.items.pop(key))
        if size > self.budget:
            self._spill(key, (z, g))
            return
        while self.items and self.bytes + size > self.budget:
            old_key, old = self.items.popitem(last=False)
            self.bytes -= self.entry_bytes(old)
            self._spill(old_key, old)
        self.items[key] = (z, g)
        self.bytes += size

    def entries(self) -> list[tuple[Hashable, Entry]]:
        """Every entry, in RAM (least recently used first) then on disk."""
        return [*self.items.items(), *self.on_disk.items()]

    def clear(self) -> None:
        self.items.clear()
        self.on_disk.clear()
        self.bytes = 0
        if self.spill_dir is not None and self.spill_dir.is_dir():
            shutil.rmtree(self.spill_dir, ignore_errors=True)

    def _spill(self, key: Hashable, entry: Entry) -> None:
        """Keep ``entry`` in memory-mapped files under :attr:`spill_dir` (dropped without)."""
        if self.spill_dir is None:
            return
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.blake2b(repr(key).encode(), digest_size=12).hexdigest()
        mapped = tuple(None if t is None else _mapped(t, self.spill_dir / f"{name}.{i}.bin")
                       for i, t in enumerate(entry))
        self.on_disk[key] = mapped  # type: ignore[assignment]

    @staticmethod
    def entry_bytes(item: tuple[torch.Tensor, Any]) -> int:
        """Bytes of one entry ``(Z, extra or None)``."""
        return _nbytes(item[0]) + (_nbytes(item[1]) if item[1] is not None else 0)


def _mapped(t: torch.Tensor, path: Path) -> torch.Tensor:
    """``t`` copied into a file at ``path`` and returned as a shared mapping of it."""
    out = torch.from_file(str(path), shared=True, size=max(1, math.prod(t.shape)),
                          dtype=t.dtype)[: math.prod(t.shape)].view(t.shape)
    out.copy_(t)
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
