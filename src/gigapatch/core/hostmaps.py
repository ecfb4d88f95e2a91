"""Host-resident maps: tensors that live in host memory by design (PatchGD's latent maps Z).

On CUDA they are CPU tensors, and device memory never holds them. On a machine without a GPU
host and device are one memory; the CPU memory tracker
(:class:`~gigapatch.memory.tracker.TensorMemoryTracker`) counts the storages allocated inside
:func:`host_maps` apart from the rest, so a CPU measurement can also give the *device* peak
a GPU would see (everything but these maps).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["allocating_host_maps", "host_maps"]

_STATE = threading.local()


@contextmanager
def host_maps() -> Iterator[None]:
    """Storages allocated in this block (on this thread) are host-resident maps."""
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


def allocating_host_maps() -> bool:
    """Whether this thread is inside :func:`host_maps`."""
    return getattr(_STATE, "depth", 0) > 0
