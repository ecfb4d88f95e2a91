"""Per-image cache of PatchGD's latent grid Z when θ1 is frozen (``model.freeze_encoder``).

A frozen encoder is a fixed function of the patch (eval mode, no gradients), so an image's Z
(and its global patch's embedding) are the same at every step and every epoch: they are
computed once and kept on the host, least recently used first out when the cache would pass
``method.z_cache_budget`` bytes. With a frozen θ1 the inner steps' re-encoded cells equal the
cached ones, so a training step is θ2 on the cached Z.

An image is known by its content: the file behind a lazy reader (path, size and modification
time, the pyramid level and augmentation it is read with), or a hash of an in-memory image's
bytes. An augmented image is a new image (a miss), so the cache is never stale; loading
weights clears it.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Hashable
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
        digest = hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest()
        out.append((digest, tuple(data.shape), str(data.dtype)))
    return out


class ZCache:
    """``key → (Z (N, C), g (C,) or None)`` on the host, LRU within ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget, self.bytes = budget, 0
        self.items: OrderedDict[Hashable, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: Hashable | None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        found = None if key is None else self.items.get(key)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self.items.move_to_end(key)
        return found

    def put(self, key: Hashable | None, z: torch.Tensor, g: torch.Tensor | None) -> None:
        size = _nbytes(z) + (_nbytes(g) if g is not None else 0)
        if key is None or size > self.budget:
            return
        if key in self.items:
            self.bytes -= self._size(self.items.pop(key))
        while self.items and self.bytes + size > self.budget:
            self.bytes -= self._size(self.items.popitem(last=False)[1])
        self.items[key] = (z, g)
        self.bytes += size

    def clear(self) -> None:
        self.items.clear()
        self.bytes = 0

    @staticmethod
    def _size(item: tuple[torch.Tensor, Any]) -> int:
        return _nbytes(item[0]) + (_nbytes(item[1]) if item[1] is not None else 0)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
