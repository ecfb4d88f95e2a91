"""Estimate the peak memory of one training step without allocating it.

:func:`estimate_step_peak` runs what :func:`gigapatch.memory.budget.measure_method_peak` runs (build
the method and its optimizer, one warm-up step that creates the optimizer state, then the
measured step, on a batch of ``uint8`` images) under PyTorch's ``FakeTensorMode``: every
tensor (parameters, the input batch, activations, gradients, optimizer state) is a *fake*
tensor with a shape, dtype and device but no memory, and a
:class:`~gigapatch.memory.TensorMemoryTracker` counts the bytes each storage would own. The
method's own ``train_step`` runs, so the estimate follows its code; images of any size cost
nothing (65,536² × 3 ``uint8`` = 12 GiB is never allocated) and an estimate takes seconds::

    >>> cfg = Config()
    >>> cfg.method.name, cfg.model.encoder = "full", "resnet50"
    >>> cfg.data.in_chans, cfg.train.batch_size = 3, 1
    >>> format_bytes(estimate_step_peak(cfg, (3, 8192, 8192)))  # ~2 s
    '108 GiB'

**What is counted** is what the CPU measurement counts: parameters, buffers, gradients,
optimizer state and every tensor storage allocated during the step (activations of forward
and backward, patch copies, PatchGD's Z, host-side resizes). The input batch is not counted
(:attr:`StepEstimate.input_bytes` gives it). Neither sees kernel-internal scratch memory
(oneDNN/cuDNN workspaces) or allocator caching. ``device="cuda"`` counts CUDA tensors only,
rounded to the caching allocator's 512-byte blocks, like ``torch.cuda.max_memory_allocated``;
no GPU is needed (without one the device side runs on fake ``meta`` tensors). Expect a real
CUDA peak a little higher (cuDNN/cuBLAS workspaces, fragmentation).

**Shortcuts** (``exact=False``, the default). Fake mode still runs Python for every op, and
PatchGD's step loops over ``N / fill_chunk`` fill chunks and ``J`` inner steps (4,096 chunks
and 16,384 steps at 65,536² with patch 256, fill_chunk 16, k = 4). The iterations of both
loops are identical in shape and free their tensors before the next one starts, so only the
1st, 2nd and last iteration of each are run: the 2nd sees the 1st's tensors being replaced (and accumulates into the 1st's
gradients); every later one repeats it. The cell order is still drawn for all ``J`` steps.
The warm-up step, which only creates the optimizer state, runs the 1st and last iteration.
``tests/test_estimate.py`` checks that ``exact=True`` (every iteration) gives the same bytes.

Values that depend on data (``float(loss)``, ``tensor.item()``) read as 1 (``True`` for
booleans). Steps whose *shapes* depend on data (boolean masks, ``nonzero``) cannot be
estimated and raise :class:`~gigapatch.core.errors.ConfigError`.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
    UnsupportedOperatorException,
)

from tqdm.auto import tqdm

from gigapatch.config import Config
from gigapatch.core.grid import PatchGrid
from gigapatch.core.errors import ConfigError
from gigapatch.core.hostmaps import allocating_host_maps
from gigapatch.memory.tracker import HOST_MAPS, TensorMemoryTracker, _state_tensors
from gigapatch.methods import abridged_loops, create_method
from gigapatch.step import StepContext, make_optimizer
from gigapatch.tasks import create_task

__all__ = [
    "EstimateError",
    "StepEstimate",
    "StepEstimator",
    "estimate_step",
    "estimate_step_peak",
    "estimate_table",
    "fraction_for_k",
]


class EstimateError(ConfigError):
    """A step that fake tensors cannot run (data-dependent shapes, operators without a meta
    kernel): measure it instead (:func:`gigapatch.memory.budget.measure_method_peak`)."""


@dataclass(frozen=True)
class StepEstimate:
    """Estimated memory of one training step (bytes).

    Attributes:
        peak: peak of one training step, comparable to
            :func:`gigapatch.memory.budget.measure_method_peak` on the same device.
        persistent: parameters, buffers, gradients and optimizer state at the start of the
            measured step (part of ``peak``).
        input_bytes: the ``uint8`` input batch on the host (not part of ``peak``).
        seconds: wall time the estimate took.
        device_peak: ``peak`` without PatchGD's host-resident maps Z (on the CPU; on CUDA
            they are not counted in ``peak`` either): what a GPU would hold.
    """

    peak: int
    persistent: int
    input_bytes: int
    seconds: float
    device_peak: int = 0


def _storages(obj: Any, out: list[tuple[torch.UntypedStorage, torch.Tensor]]) -> None:
    """Append ``(storage, tensor)`` for the tensors in ``obj`` (nested lists/tuples/dicts)."""
    if isinstance(obj, torch.Tensor):
        try:
            out.append((obj.untyped_storage(), obj))
        except (NotImplementedError, RuntimeError, TypeError):  # sparse, nested, …
            pass
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _storages(item, out)
    elif isinstance(obj, dict):
        for item in obj.values():
            _storages(item, out)


class _FakeMemoryTracker(TensorMemoryTracker):
    """A :class:`TensorMemoryTracker` for fake tensors.

    Fake storages all have data pointer 0 (and live on the meta device), so new allocations
    are told apart from views and in-place results by storage identity only (fake mode keeps
    one Python storage object per storage), and are booked on the tensor's fake device.
    Storages on ``round_device`` are rounded up like the CUDA caching allocator's blocks
    (512-byte multiples). ``.item()`` on a fake tensor returns a placeholder instead of failing.
    """

    def __init__(self, round_device: str | None = None) -> None:
        super().__init__()
        self.round_device = round_device

    def _nbytes(self, storage: torch.UntypedStorage, dev: str) -> int:
        n = storage.nbytes()
        if dev == self.round_device:
            n = max(_CUDA_BLOCK, -(-n // _CUDA_BLOCK) * _CUDA_BLOCK)
        return n

    def adopt(self, tensors: Iterable[torch.Tensor]) -> int:
        before = self._tracked_current
        pairs: list[tuple[torch.UntypedStorage, torch.Tensor]] = []
        _storages(list(tensors), pairs)
        for storage, tensor in pairs:
            self._track(storage, tensor.device)
        return self._tracked_current - before

    def _track(self, storage: torch.UntypedStorage, device: torch.device) -> None:
        key, dev = id(storage), HOST_MAPS if allocating_host_maps() else str(device)
        with self._lock:
            if key in self._live:
                return
            nbytes = self._nbytes(storage, dev)
            ref = weakref.ref(storage, lambda _ref, key=key: self._release(key))
            self._live[key] = (ref, nbytes, dev)
            self._add(dev, nbytes)

    def _resize(self, storage: torch.UntypedStorage) -> None:
        with self._lock:
            ref, counted, dev = self._live[id(storage)]
            nbytes = self._nbytes(storage, dev)
            if nbytes != counted:
                self._live[id(storage)] = (ref, nbytes, dev)
                self._add(dev, nbytes - counted)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is _ITEM:
            try:
                return func(*args, **kwargs)  # fake constants (e.g. Adam's step) have values
            except DataDependentOutputException:
                dtype = args[0].dtype
                return True if dtype == torch.bool else 1.0 if dtype.is_floating_point else 1
        out = func(*args, **kwargs)
        inputs: list[tuple[torch.UntypedStorage, torch.Tensor]] = []
        _storages(args, inputs)
        if kwargs:
            _storages(kwargs, inputs)
        input_ids = {id(s) for s, _ in inputs}
        outputs: list[tuple[torch.UntypedStorage, torch.Tensor]] = []
        _storages(out, outputs)
        for storage, tensor in outputs:
            if id(storage) in self._live:
                self._resize(storage)
            elif id(storage) not in input_ids:
                self._track(storage, tensor.device)
        return out


_CUDA_BLOCK = 512
_ITEM = torch.ops.aten._local_scalar_dense.default


# --------------------------------------------------------------------------- shortcuts


def _few_iterations(method: Any, warmup: bool) -> Any:
    """Shorten the loops a method marks with :func:`~gigapatch.methods.base.repeated` (every
    method's: a loop whose iterations are alike is marked so by the method itself).

    Measured step: iterations 1, 2 and the last (the 1st creates the gradients, the 2nd runs
    while the 1st's tensors are being replaced and accumulates into them; every later one
    repeats the 2nd). Warm-up step (it only has to create the optimizer state): the 1st and
    the last. For PatchGD these are the fill chunks and the inner steps; the cell order is
    still sampled for all J steps.
    """
    return abridged_loops(1 if warmup else 2)


_LOCK = threading.RLock()


# --------------------------------------------------------------------------- estimates

_FAKE_ERRORS = (
    DataDependentOutputException,
    DynamicOutputShapeException,
    UnsupportedOperatorException,
)


def _make_fake(module: torch.nn.Module, fake_mode: FakeTensorMode) -> None:
    """Replace the (meta) parameters and buffers of ``module`` by fake tensors, in place."""
    memo: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor, param: bool) -> torch.Tensor:
        if id(t) not in memo:  # shared (tied) tensors stay shared
            f = fake_mode.from_tensor(t)
            memo[id(t)] = torch.nn.Parameter(f, requires_grad=t.requires_grad) if param else f
        return memo[id(t)]

    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                mod._parameters[name] = fake(p, param=True)
        for name, b in mod._buffers.items():
            if b is not None:
                mod._buffers[name] = fake(b, param=False)


class _FakeTrainer:
    """A method and its optimizer built once under a fake mode, stepped on fake batches.

    The optimizer state created by the first step is kept, so steps on images of several
    sizes (or with several ``sample_fraction`` values) each cost one step, not two.

    Devices: ``cpu`` counts every storage, like the CPU measurement. ``cuda`` counts the
    CUDA storages only (rounded to the allocator's 512-byte blocks), like
    ``torch.cuda.max_memory_allocated``; the host tensors (input batch, patch copies before
    they move) are not counted. Without a GPU (fake CUDA tensors cannot run autograd then),
    the device part of the step runs on the fake ``meta`` device instead, which behaves the
    same for memory. On CUDA the optimizer is switched to the multi-tensor (``foreach``) path
    that PyTorch picks by default for CUDA parameters (fake parameters would not get it).
    """

    def __init__(self, cfg: Config, device: torch.device, exact: bool) -> None:
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"memory estimates support devices cpu and cuda, not {device}.")
        if device.type == "cuda" and not torch.cuda.is_available():
            build_device = torch.device("meta")
        else:
            build_device = device
        self.cfg = copy.deepcopy(cfg)
        self.cfg.model.pretrained = False  # weights do not change memory; never download
        self.cfg.model.weights = None
        self.cfg.model.compile = False  # fake tensors are not compiled: the eager step's bytes
        self.task = create_task(self.cfg)
        self.device, self.exact = device, exact
        self.count_key = None if device.type == "cpu" else _device_key(build_device)
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
        self.shortcut = None if exact else _few_iterations
        if build_device.type == "meta":  # built outside: fake mode refuses some meta tensors
            with torch.random.fork_rng(devices=[]), build_device:
                self.method = create_method(self.cfg, self.task)
        with self._active():
            if build_device.type == "meta":
                _make_fake(self.method, self.fake_mode)
            else:  # build in place (``Module.to`` cannot swap fake parameters)
                with build_device:
                    self.method = create_method(self.cfg, self.task)
            self.method.train()
            self.optimizer = make_optimizer(self.method, self.cfg, self.method.encoder_parameters())
            self.ctx = StepContext(self.method, self.optimizer, precision=self.cfg.train.precision,
                                   grad_clip=self.cfg.train.grad_clip, device=build_device)
            if device.type == "cuda":
                for group in self.optimizer.param_groups:
                    if group.get("foreach", False) is None and not group.get("fused"):
                        group["foreach"] = True
        self.warm = False

    @contextmanager
    def _active(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), self.fake_mode:
            warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
            torch.manual_seed(0)
            yield

    def _step(self, images: torch.Tensor, targets: torch.Tensor, warmup: bool) -> None:
        with _LOCK, ExitStack() as stack:
            if self.shortcut is not None:
                stack.enter_context(self.shortcut(self.method, warmup))
            self.method.train_step(images, targets, self.ctx)

    def _count(self, by_device: dict[str, int], total: int) -> int:
        return total if self.count_key is None else by_device.get(self.count_key, 0)

    def estimate(self, image_shape: tuple[int, int, int]) -> StepEstimate:
        """Warm up once (creating optimizer state), then the tracked step on ``(C, H, W)``."""
        start = time.perf_counter()
        cfg = self.method.cfg
        b = cfg.train.batch_size
        c, h, w = (int(v) for v in image_shape)
        try:
            with self._active():
                images = torch.empty((b, c, h, w), dtype=torch.uint8)  # fake: never allocated
                images = self.method.host_transform(images)
                targets = self.task.random_targets(b, (h, w))
                if not self.warm:
                    with _FakeMemoryTracker():  # answers .item() in the warm-up too
                        self._step(images, targets, warmup=True)
                    self.warm = True
                tracker = _FakeMemoryTracker(round_device=self.count_key)
                tracker.adopt(_state_tensors(self.method, self.optimizer))
                persistent = self._count(tracker.current_by_device, tracker.current)
                with tracker:
                    self._step(images, targets, warmup=False)
                del images, targets
        except _FAKE_ERRORS as err:
            raise EstimateError(
                f"cannot estimate the memory of {cfg.method.name!r} without running it: "
                f"{type(err).__name__} ({err}). Measure it instead "
                "(gigapatch.memory.budget.measure_method_peak)."
            ) from err
        peak = self._count(tracker.peak_by_device, tracker.peak)
        return StepEstimate(
            peak=int(peak),
            persistent=int(persistent),
            input_bytes=b * c * h * w,
            seconds=time.perf_counter() - start,
            device_peak=int(tracker.device_peak if self.count_key is None else peak),
        )


def _device_key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return "cuda:0"
    return str(device)


def _as_device(device: torch.device | str) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"invalid device {device!r}: use e.g. 'cpu' or 'cuda'") from err


def estimate_step(
    cfg: Config,
    image_shape: tuple[int, int, int],
    device: torch.device | str = "cpu",
    *,
    exact: bool = False,
) -> StepEstimate:
    """Estimate one training step of ``cfg``'s method on images ``(C, H, W)``, no allocation.

    Follows :func:`gigapatch.memory.budget.measure_method_peak` step for step (batch of
    ``cfg.train.batch_size`` ``uint8`` images, optimizer from
    :func:`gigapatch.step.make_optimizer`, an unmeasured warm-up step that creates the
    optimizer state, then the measured step) with fake tensors. ``cfg.model.pretrained`` is
    ignored (weights do not change memory). ``exact=True`` turns the shortcuts described in
    the module docstring off (slow on big grids; for checking them).

    Raises:
        ConfigError: bad device.
        EstimateError: a step that fake tensors cannot run (data-dependent shapes, operators
            without a meta kernel).
    """
    start = time.perf_counter()
    est = _FakeTrainer(cfg, _as_device(device), exact).estimate(image_shape)
    return dataclasses.replace(est, seconds=time.perf_counter() - start)


def estimate_step_peak(
    cfg: Config,
    image_shape: tuple[int, int, int],
    device: torch.device | str = "cpu",
    *,
    exact: bool = False,
) -> int:
    """Estimated peak bytes of one training step on images ``(C, H, W)`` (nothing allocated).

    The fake-tensor twin of :func:`gigapatch.memory.budget.measure_method_peak`; see
    :func:`estimate_step`.
    """
    return estimate_step(cfg, image_shape, device, exact=exact).peak


class StepEstimator:
    """Estimates of one method under several method settings, built once.

    The method and its optimizer state (one warm-up step) are created on the first call and
    reused, so every further estimate costs one fake step. Only settings that do not change
    the parameters may vary between calls (e.g. ``sample_fraction``, ``fill_chunk``,
    ``downsample_to``), not the encoder, head or latent size::

        est = StepEstimator(cfg)
        est.peak((3, 4096, 4096), sample_fraction=0.01, fill_chunk=32)
    """

    def __init__(self, cfg: Config, device: torch.device | str = "cpu") -> None:
        self._trainer = _FakeTrainer(cfg, _as_device(device), exact=False)

    def estimate(self, image_shape: tuple[int, int, int], **method_settings: Any) -> StepEstimate:
        """:class:`StepEstimate` on images ``(C, H, W)`` with ``cfg.method`` fields changed."""
        mcfg = self._trainer.method.cfg.method
        for key, value in method_settings.items():
            if not hasattr(mcfg, key):
                raise ConfigError(f"method has no setting {key!r}")
            setattr(mcfg, key, value)
        return self._trainer.estimate(image_shape)

    def peak(self, image_shape: tuple[int, int, int], **method_settings: Any) -> int:
        """Estimated peak bytes on images ``(C, H, W)`` with ``cfg.method`` fields changed."""
        return self.estimate(image_shape, **method_settings).peak


def fraction_for_k(side: int, patch_size: int, k: int, stride: int | None = None) -> float:
    """``sample_fraction`` that gives ``k`` patches per inner step on a ``side²`` image."""
    n = PatchGrid(side, side, patch_size, stride).num_patches
    return min(1.0, k / n)


def estimate_table(
    cfg: Config,
    sides: list[int],
    methods: list[str],
    *,
    device: torch.device | str = "cpu",
    patches_per_step: int | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Estimated step peaks of several methods over square images of several sides.

    Each method is built once; its optimizer state, created by one warm-up step, is reused
    for every side (it does not depend on the image size), so each row costs one fake step.

    Args:
        cfg: base config (encoder, head, patch size, batch size, ``data.in_chans`` …).
        sides: image sides in pixels (images are ``(data.in_chans, side, side)``).
        methods: method names, e.g. ``["full", "patchgd"]``; ``"patchgd+add"`` /
            ``"patchgd+concat"`` select PatchGD with that ``method.global_context``.
        device: ``"cpu"`` or ``"cuda"`` (no GPU needed; counts that device's tensors only).
        patches_per_step: if set, the ``sample_fraction`` of methods with a ``k`` knob (PatchGD) is set per side so that every
            inner step samples this many patches (``k`` fixed across sizes).
        progress: show a progress bar (one tick per row).
    Returns:
        One dict per (method, side), in that order: ``method, side, estimated_bytes,
        persistent_bytes, input_bytes, seconds``.
    """
    dev = _as_device(device)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(methods) * len(sides), desc="estimating", unit="step",
               disable=not progress, leave=False)
    for name in methods:
        base, _, context = name.partition("+")
        trial = copy.deepcopy(cfg)
        trial.method.name = base
        if context:
            trial.method.global_context = context
        trainer = _FakeTrainer(trial.validate(), dev, exact=False)
        for side in sides:
            mcfg = trainer.method.cfg.method
            if patches_per_step is not None and "k" in type(trainer.method).budget_knobs:
                mcfg.sample_fraction = fraction_for_k(
                    side, mcfg.patch_size, patches_per_step, mcfg.stride
                )
            est = trainer.estimate((trial.data.in_chans, side, side))
            rows.append(
                {
                    "method": name,
                    "side": side,
                    "estimated_bytes": est.peak,
                    "persistent_bytes": est.persistent,
                    "input_bytes": est.input_bytes,
                    "seconds": round(est.seconds, 3),
                }
            )
            bar.update()
    bar.close()
    return rows
