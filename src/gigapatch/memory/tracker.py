"""Measure the peak memory of one training step, on CPU as well as CUDA.

gigapatch promises that training memory is set by the patch, not the image. This module
measures that honestly:

* On CUDA, :func:`measure_step_peak` reads the caching allocator's own peak statistic.
* Elsewhere (CPU), :class:`TensorMemoryTracker` watches every dispatched ATen op, forward and
  backward, and counts the bytes of each *newly allocated* tensor storage until it is freed.

"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gigapatch.core.errors import ConfigError
from gigapatch.core.hostmaps import allocating_host_maps

__all__ = [
    "HOST_MAPS",
    "StepPeaks",
    "TensorMemoryTracker",
    "measure_step_peak",
    "measure_step_peaks",
    "persistent_bytes",
]

#: The device key under which :class:`TensorMemoryTracker` counts storages allocated inside
#: :func:`gigapatch.core.hostmaps.host_maps` (PatchGD's Z: host memory on CUDA too).
HOST_MAPS = "host-maps"


@dataclass(frozen=True)
class StepPeaks:
    """Peaks of one training step (bytes).

    Attributes:
        total: everything counted (:attr:`TensorMemoryTracker.peak`; on CUDA the allocator's
            peak).
        device: without the host-resident maps (:attr:`TensorMemoryTracker.device_peak`):
            what a GPU would hold. Equals ``total`` on CUDA.
        host_maps: the peak of the host-resident maps alone (0 on CUDA, where they are not
            counted).
    """

    total: int
    device: int
    host_maps: int

    def with_host_maps_scaled(self, ratio: float) -> StepPeaks:
        """The peaks had the host maps been ``ratio`` times as large (a grid with ``ratio``
        times the cells: Z is proportional to the cells). Exact when the maps are alive at the
        peak, as PatchGD's are from the fill on; an upper bound otherwise."""
        extra = round(self.host_maps * (ratio - 1))
        return StepPeaks(self.total + extra, self.device, self.host_maps + extra)


def _storage_of(obj: object) -> torch.UntypedStorage | None:
    """The untyped storage behind ``obj`` if it is a plain dense tensor with real memory."""
    if not isinstance(obj, torch.Tensor) or obj.layout != torch.strided or obj.is_meta:
        return None
    try:
        return obj.untyped_storage()
    except (NotImplementedError, RuntimeError, TypeError):  # subclasses without a storage
        return None


class TensorMemoryTracker(TorchDispatchMode):
    """Count the bytes of live tensor storages allocated while the mode is active.

    Every dispatched ATen op is seen, including the backward ops autograd runs on behalf of
    ``loss.backward()``. An output counts as a new allocation only if its storage is neither
    tracked already nor the storage of one of the op's inputs (compared by storage identity and
    data pointer), so views (``view``, slicing, ``t()``) and in-place ops (``add_``,
    ``relu_``) are not counted twice. A weakref callback on the storage subtracts its bytes when
    it is freed, even after the mode has exited.

    Storages allocated inside :func:`~gigapatch.core.hostmaps.host_maps` are counted under
    the device key :data:`HOST_MAPS`; :attr:`device_peak` is the peak of everything else.

    Allocations made before entering the mode are invisible unless passed to :meth:`adopt`
    (counted, and released when freed) or summarised in ``external_bytes`` (a constant added to
    :attr:`current` and :attr:`peak`).

    Example::

        with TensorMemoryTracker() as tracker:
            loss = model(x).sum()
            loss.backward()
        print(format_bytes(tracker.peak))
    """

    def __init__(self, external_bytes: int = 0) -> None:
        super().__init__()
        self.external_bytes = int(external_bytes)
        self.current_by_device: dict[str, int] = {}
        self.peak_by_device: dict[str, int] = {}
        self._tracked_current = 0
        self._tracked_peak = 0
        self._device_current = 0  # all but HOST_MAPS
        self._device_peak = 0
        # id(storage) -> (weakref keeping the callback alive, counted bytes, device key)
        self._live: dict[int, tuple[weakref.ref[torch.UntypedStorage], int, str]] = {}
        self._lock = threading.RLock()

    @property
    def current(self) -> int:
        """Bytes live now: tracked storages plus ``external_bytes``."""
        return self.external_bytes + self._tracked_current

    @property
    def peak(self) -> int:
        """Highest :attr:`current` seen since creation or the last :meth:`reset_peak`."""
        return self.external_bytes + self._tracked_peak

    @property
    def device_peak(self) -> int:
        """Like :attr:`peak`, without the host-resident maps (:data:`HOST_MAPS`): what a GPU
        would hold when the maps stay on the host."""
        return self.external_bytes + self._device_peak

    def reset_peak(self) -> None:
        """Forget the peak so far: the peak becomes the current count."""
        with self._lock:
            self._tracked_peak = self._tracked_current
            self._device_peak = self._device_current
            self.peak_by_device = dict(self.current_by_device)

    def adopt(self, tensors: Iterable[torch.Tensor]) -> int:
        """Count existing tensors (e.g. parameters) as live until their storages are freed.

        Storages already tracked are skipped, so shared storages count once.
        Returns the number of bytes newly counted.
        """
        before = self._tracked_current
        for tensor in tensors:
            storage = _storage_of(tensor)
            if storage is not None:
                self._track(storage, tensor.device)
        return self._tracked_current - before

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [s for s in map(_storage_of, tree_flatten((args, kwargs))[0]) if s is not None]
        input_ids = {id(s) for s in inputs}
        input_ptrs = {s.data_ptr() for s in inputs} - {0}
        for tensor in tree_flatten(out)[0]:
            storage = _storage_of(tensor)
            if storage is None:
                continue
            if id(storage) in self._live:
                self._resize(storage)  # e.g. an ``out=`` tensor or ``resize_`` grew it
            elif id(storage) not in input_ids and storage.data_ptr() not in input_ptrs:
                self._track(storage, tensor.device)
        return out

    def _track(self, storage: torch.UntypedStorage, device: torch.device) -> None:
        key, nbytes = id(storage), storage.nbytes()
        dev = HOST_MAPS if allocating_host_maps() else str(device)
        with self._lock:
            if key in self._live:
                return
            ref = weakref.ref(storage, lambda _ref, key=key: self._release(key))
            self._live[key] = (ref, nbytes, dev)
            self._add(dev, nbytes)

    def _resize(self, storage: torch.UntypedStorage) -> None:
        with self._lock:
            ref, counted, dev = self._live[id(storage)]
            if storage.nbytes() != counted:
                self._live[id(storage)] = (ref, storage.nbytes(), dev)
                self._add(dev, storage.nbytes() - counted)

    def _release(self, key: int) -> None:
        with self._lock:
            entry = self._live.pop(key, None)
            if entry is not None:
                self._add(entry[2], -entry[1])

    def _add(self, dev: str, delta: int) -> None:
        self._tracked_current += delta
        self._tracked_peak = max(self._tracked_peak, self._tracked_current)
        if dev != HOST_MAPS:
            self._device_current += delta
            self._device_peak = max(self._device_peak, self._device_current)
        now = self.current_by_device.get(dev, 0) + delta
        self.current_by_device[dev] = now
        self.peak_by_device[dev] = max(self.peak_by_device.get(dev, 0), now)


def _state_tensors(
    model: nn.Module | None, optimizer: torch.optim.Optimizer | None
) -> list[torch.Tensor]:
    """Parameters, buffers, their ``.grad`` and optimizer state tensors (may repeat)."""
    tensors: list[torch.Tensor] = []
    if model is not None:
        params = list(model.parameters())
        tensors += params + list(model.buffers())
        tensors += [p.grad for p in params if p.grad is not None]
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                tensors.append(p)
                if p.grad is not None:
                    tensors.append(p.grad)
        for state in optimizer.state.values():
            tensors += [t for t in tree_flatten(state)[0] if isinstance(t, torch.Tensor)]
    return tensors


def persistent_bytes(
    model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None
) -> int:
    """Bytes of the training state that outlives a step, each shared storage counted once.

    Counts parameters and buffers of ``model``, existing ``.grad`` tensors, and the tensors in
    ``optimizer.state`` (e.g. AdamW's ``exp_avg``, ``exp_avg_sq`` and ``step``).
    """
    sizes: dict[int, int] = {}
    for tensor in _state_tensors(model, optimizer):
        storage = _storage_of(tensor)
        if storage is not None:
            sizes[id(storage)] = storage.nbytes()
    return sum(sizes.values())


def measure_step_peaks(
    step_fn: Callable[[], Any],
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str = "cpu",
) -> StepPeaks:
    """Peaks of memory used while ``step_fn()`` runs one training step: in all, without the
    host-resident maps, and of those maps alone (:class:`StepPeaks`).

    On CUDA this is ``torch.cuda.max_memory_allocated`` over the step, which already includes
    everything allocated beforehand. On other devices it is the persistent state existing at
    the start (see :func:`persistent_bytes`) plus the peak of tensor storages allocated during
    the step, as counted by :class:`TensorMemoryTracker`. Persistent tensors freed during the
    step (e.g. by ``optimizer.zero_grad()``) stop counting when freed. Tensors created before
    the call and not reachable from ``model``/``optimizer`` (such as the input batch) are not
    counted unless ``step_fn`` creates them.

    Raises:
        ConfigError: ``device`` is not a valid torch device.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(
            f"invalid device {device!r}: use e.g. 'cpu', 'cuda' or 'cuda:0'"
        ) from err
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step_fn()
        torch.cuda.synchronize(device)
        peak = int(torch.cuda.max_memory_allocated(device))
        return StepPeaks(peak, peak, 0)
    tracker = TensorMemoryTracker()
    tracker.adopt(_state_tensors(model, optimizer))
    with tracker:
        step_fn()
    return StepPeaks(tracker.peak, tracker.device_peak, tracker.peak_by_device.get(HOST_MAPS, 0))


def measure_step_peak(
    step_fn: Callable[[], Any],
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str = "cpu",
    exclude_host_maps: bool = False,
) -> int:
    """Peak bytes of memory used while ``step_fn()`` runs one training step (see
    :func:`measure_step_peaks`). ``exclude_host_maps`` (CPU): leave out the host-resident
    maps (:data:`HOST_MAPS`), i.e. the peak a GPU would hold.

    Raises:
        ConfigError: ``device`` is not a valid torch device.
    """
    peaks = measure_step_peaks(step_fn, model=model, optimizer=optimizer, device=device)
    return peaks.device if exclude_host_maps else peaks.total
