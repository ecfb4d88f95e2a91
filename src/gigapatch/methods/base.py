"""The interface every training method implements, and the method registry.

A method owns its networks and says how memory is bounded: it turns a batch of large images
into losses (through the task), backward passes and optimizer steps (through the step
context, :class:`~gigapatch.step.context.StepContext`: :meth:`Method.train_step`), and one
batch of images into outputs (:meth:`Method.predict`). It tells the memory tools which
settings they may shrink (:attr:`Method.budget_knobs`). The training loop, tasks, data,
logging and memory accounting are shared; adding a method means adding one file that
registers a subclass (imported in ``methods/__init__``).

Images arrive as they come from the data loader: ``(B, C, H, W)`` ``uint8`` (or float in
[0, 1]) on the host. Each method decides what goes to the device and when.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.nn as nn

from gigapatch.config import Config
from gigapatch.core.errors import ConfigError
from gigapatch.core.grid import PatchGrid
from gigapatch.core.registry import Registry
from gigapatch.models.weights import output_layer_prefix
from gigapatch.tasks import Logits, Targets, Task, create_task

#: Sums a list of counts over all processes (element-wise; the list itself with one).
Totals = Callable[[list[float]], list[float]]


class Context(Protocol):
    """What a method needs of the step context (see
    :class:`gigapatch.step.context.StepContext`)."""

    def autocast(self) -> Any: ...
    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any: ...
    def no_sync(self) -> Any: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> None: ...
    def zero_grad(self) -> None: ...

METHODS: Registry[type[Method]] = Registry("method")

_LOOP_HEAD: ContextVar[int | None] = ContextVar("gigapatch_loop_head", default=None)


def repeated(r: range) -> range | list[int]:
    """The iterations of a loop whose iterations are alike (same shapes, tensors freed between).

    Normally ``r`` itself. Inside :func:`abridged_loops` (used by memory *estimates*, where
    every iteration costs Python time but identical iterations cannot raise the peak) only the
    first ``head`` iterations and the last one are run.
    """
    head = _LOOP_HEAD.get()
    if head is None or len(r) <= head + 1:
        return r
    return [*r[:head], r[-1]]


@contextmanager
def abridged_loops(head: int) -> Iterator[None]:
    """Make :func:`repeated` loops run only their first ``head`` and last iterations."""
    token = _LOOP_HEAD.set(head)
    try:
        yield
    finally:
        _LOOP_HEAD.reset(token)


@dataclass(frozen=True)
class StepProxy:
    """A smaller image on which a training step holds the device memory it holds on the real
    one (see :meth:`Method.step_proxy`): the memory budget measures real steps there.

    Attributes:
        shape: the proxy image ``(C, h, w)``.
        settings: ``cfg.method`` settings for the proxy (the same k per step).
        cell_ratio: cells of the real grid / cells of the proxy's; the host-resident maps
            (PatchGD's Z) are proportional to the cells.
    """

    shape: tuple[int, int, int]
    settings: dict[str, Any] = field(default_factory=dict)
    cell_ratio: float = 1.0


def grid_proxy(cfg: Config, image_shape: tuple[int, int, int]) -> StepProxy | None:
    """The square proxy for a method whose step encodes k of the cells of a stride-free
    ``method.patch_size`` grid (``k = round(sample_fraction · N)``) and whose device memory
    depends on k, not on N: the smallest ``g × g`` grid (g ≥ 2) holding k cells, with
    ``sample_fraction`` set to keep k and at most 2 inner steps (J changes time, not the
    peak). ``None`` when that grid is not smaller than the real one."""
    c, h, w = image_shape
    m = cfg.method
    n = PatchGrid(h, w, m.patch_size).num_patches
    k = max(1, min(n, round(m.sample_fraction * n)))
    g = max(2, math.isqrt(k - 1) + 1)
    side = g * m.patch_size
    small = g * g
    if small >= n:
        return None
    steps = m.inner_steps if m.inner_steps is not None else math.ceil(1 / m.sample_fraction)
    return StepProxy((c, side, side), {"sample_fraction": k / small,
                                       "inner_steps": min(steps, 2)}, n / small)


class Method(nn.Module):
    """Base class: shared input preparation; subclasses implement the training step."""

    #: Settings of ``cfg.method`` that :mod:`gigapatch.memory.budget` may lower to fit a
    #: memory budget, most important first (e.g. PatchGD: ``("k", "fill_chunk")``); empty:
    #: the budget only checks that the configured setting fits.
    budget_knobs: ClassVar[tuple[str, ...]] = ()
    #: What the budget's ``k`` counts, for its messages (methods with a ``k`` knob).
    k_means: ClassVar[str] = "patches per step"
    #: Whether ``method.inner_steps`` (J) applies (PatchGD).
    has_inner_steps: ClassVar[bool] = False
    #: The attribute holding θ1: ``encoder`` (PatchGD, IPS), or ``net`` for the methods that
    #: train one network (``full``, ``patchwise``), whose θ1 is that network without its
    #: output layer (the layer gigapatch sizes to the classes).
    encoder_attr: ClassVar[str] = "encoder"
    #: Whether the method trains detectors (``task.kind: detect``).
    detects: ClassVar[bool] = False
    #: Whether training samples its k cells from the stride-free grid even when
    #: ``method.stride`` is set (``tiled``: the stride is prediction's overlap).
    trains_stride_free: ClassVar[bool] = False

    @classmethod
    def step_proxy(cls, cfg: Config, image_shape: tuple[int, int, int]) -> StepProxy | None:
        """A smaller image whose training step holds the same device memory as one on
        ``image_shape`` ``(C, H, W)`` (host maps scaled by :attr:`StepProxy.cell_ratio`), for
        the memory budget's real measurements; ``None`` (the default): the step's memory
        grows with the image, measure it there."""
        return None

    def __init__(self, cfg: Config, task: Task) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.data.num_classes
        self.in_chans = cfg.data.in_chans
        #: Label heads predicted (``[]``: one unnamed label); the first is the main one.
        self.tasks: list[str] = list(getattr(task, "heads", []))
        self.task = task

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)``: the step context calls the method (or its
        DistributedDataParallel wrapper) this way, so every forward pass of a training step,
        whatever its shape, is a forward of the trained module."""
        return fn(*args, **kwargs)

    # ------------------------------------------------------------------ θ1
    def encoder_parameters(self) -> list[nn.Parameter]:
        """θ1's parameters (``train.encoder_lr``, ``model.freeze_encoder`` act on these)."""
        net = getattr(self, self.encoder_attr, None)
        if not isinstance(net, nn.Module):
            return []
        skip = output_layer_prefix(net) if self.encoder_attr == "net" else None
        return [p for name, p in net.named_parameters()
                if not (skip and name.startswith(skip))]

    @property
    def encoder_frozen(self) -> bool:
        """Whether θ1 is frozen (``model.freeze_encoder``): fixed, always in eval mode."""
        return self.cfg.model.freeze_encoder

    def freeze_encoder(self) -> None:
        """Fix θ1: no gradients, eval mode from now on (see :meth:`train`)."""
        for p in self.encoder_parameters():
            p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> Method:
        """``nn.Module.train``, except that a frozen θ1 stays in eval mode (its batch-norm
        statistics fixed, no dropout), so its output is a fixed function of the patch."""
        super().train(mode)
        if self.encoder_frozen:
            net = getattr(self, self.encoder_attr, None)
            if isinstance(net, nn.Module):
                net.eval()
                skip = output_layer_prefix(net) if self.encoder_attr == "net" else ""
                if skip:
                    net.get_submodule(skip.rstrip(".")).train(mode)
        return self

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the parameters."""
        return next(self.parameters()).dtype

    def compute_dtype(self) -> torch.dtype:
        """The dtype activations have here: the autocast dtype when autocast is on for the
        method's device (e.g. ``bfloat16`` under ``train.precision: bf16``), else
        :attr:`dtype`. PatchGD's Z and IPS's buffer are kept in it."""
        dev = self.device.type
        if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return self.dtype

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Move pixels to the device as normalised floats.

        ``(…, C, h, w)`` ``uint8`` (scaled by 1/255) or float in [0, 1] →
        ``(…, C, h, w)`` float on :attr:`device`, ``(x - mean) / std``.
        """
        x = x.to(self.device, non_blocking=True)
        if not x.is_floating_point():
            x = x.to(self.dtype).div_(255.0)
        else:
            x = x.to(self.dtype)
        mean, std = self.cfg.data.mean, self.cfg.data.std
        if mean != 0.0 or std != 1.0:
            x = (x - mean) / std
        if self.cfg.model.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def foreground(self, images: object, grid: object) -> torch.Tensor | None:
        """``(B, N)`` bool mask of the cells holding content when ``data.skip_background`` is
        on and the images are read from disk (:class:`~gigapatch.data.batch.LazyBatch`), else
        ``None`` (every cell counts)."""
        d = self.cfg.data
        if not d.skip_background or not hasattr(images, "foreground"):
            return None
        return images.foreground(grid, d.background, d.mask_threshold)

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode inside the block (for passes without gradients that must not use
        batch statistics or dropout), the previous mode restored after it."""
        was = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was)

    def training_state(self) -> dict[str, Any]:
        """Method state a resumed run needs besides the weights (e.g. PatchGD's Z cache);
        saved in ``last.pt`` (single-process runs)."""
        return {}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`training_state` (after ``load_state_dict``)."""

    def set_run_dir(self, run_dir: Path) -> None:
        """The run directory the method may keep files in (e.g. a cache beyond RAM)."""

    def set_epoch_length(self, batches: int) -> None:
        """The batches an epoch takes (this process), told once before training: methods
        check the settings that count in optimizer steps against it (PatchGD's Z cache)."""

    def epoch_stats(self, total: Totals = list) -> dict[str, float]:
        """Figures of the epoch just trained for its history row (e.g. PatchGD's Z-cache
        staleness); the loop reads them once per epoch, which starts the next epoch's count.
        ``total`` sums a list of counts over the processes (the loop passes
        :func:`gigapatch.engine.distributed.all_sum`): every process calls it alike, so the
        figures are the whole run's, not one process's."""
        return {}

    def host_transform(self, images: torch.Tensor) -> torch.Tensor:
        """Host-side preprocessing applied by the data pipeline before :meth:`train_step`."""
        return images

    def summary(self, image_hw: tuple[int, int]) -> dict[str, Any]:
        """Method-specific facts for ``summary.json`` (e.g. the patch size, the input size)."""
        return {}

    def explain(self, images: Any, out: str) -> tuple[Logits, str]:
        """Predict a batch of one image and draw the evidence to ``out``: ``(output, path)``.
        Call in eval mode under ``no_grad``."""
        raise ConfigError(f"--explain is not available for method {self.cfg.method.name!r}.")

    # ------------------------------------------------------------------ interface
    def train_step(self, images: Any, targets: Targets, ctx: Context) -> float:
        """One training step on a batch (may take several optimizer steps); returns mean loss.

        Losses come from ``self.task.loss``; forward passes run through ``ctx.run`` (or under
        ``ctx.autocast()`` without gradients), backward passes through ``ctx.backward``,
        optimizer steps through ``ctx.step``.

        Args:
            images: ``(B, C, H, W)`` host tensor after :meth:`host_transform`, or a
                :class:`~gigapatch.data.batch.LazyBatch`.
            targets: the task's collated targets.
            ctx: the step context.
        """
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> Logits:
        """Logits ``(B, K)`` (or ``{task: (B, K)}``) for host images ``(B, C, H, W)``
        (call in eval mode)."""
        raise NotImplementedError

    def mask_blocks(self, images: Any) -> tuple[int, Iterator[tuple[int, int, torch.Tensor]]]:
        """Dense tasks: the first image's predicted class ids block by block, in raster order:
        ``(block side, iterator of (y, x, ids uint8 (h, w)))`` covering the image (edge blocks
        cropped). Default: from :meth:`predict` (the whole logits in memory); methods that
        can stream override it. Call in eval mode under ``no_grad``."""
        logits = self.predict(images)[0]  # (K, H, W)
        bands = ((y, logits[:, y : y + MASK_BLOCK]) for y in range(0, logits.shape[1], MASK_BLOCK))
        return MASK_BLOCK, band_blocks(bands, logits.shape[2])


#: Side of the blocks a predicted mask is streamed in (a multiple of 16, as TIFF tiles need).
MASK_BLOCK = 256


def band_blocks(bands: Iterable[tuple[int, torch.Tensor]], width: int
                ) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Class ids in blocks of :data:`MASK_BLOCK` from logits given band by band: ``(top,
    (K, rows, width))`` → ``(y, x, ids uint8 (rows, ≤ MASK_BLOCK))`` in raster order."""
    for top, band in bands:
        ids = band.argmax(dim=0).to(torch.uint8).cpu()
        for x in range(0, width, MASK_BLOCK):
            yield top, x, ids[:, x : x + MASK_BLOCK]


def create_method(cfg: Config, task: Task | None = None) -> Method:
    """Build the method named by ``cfg.method.name`` for ``task`` (default: the task
    ``cfg.task`` describes), with its networks."""
    task = task if task is not None else create_task(cfg)
    cls = METHODS.get(cfg.method.name)
    if task.detects and not cls.detects:
        raise ConfigError(f"method {cfg.method.name} does not support task.kind = detect yet; "
                          "use method full, tiled or patchgd.")
    if task.detects and cfg.model.freeze_encoder:
        raise ConfigError("model.freeze_encoder is not supported for detection yet (the "
                          "detector's backbone and head are one network); leave it false.")
    method = cls(cfg, task)
    if cfg.model.channels_last:
        method.to(memory_format=torch.channels_last)
    if cfg.model.freeze_encoder:
        if not method.encoder_parameters():
            raise ConfigError(f"model.freeze_encoder: method {cfg.method.name} has no encoder "
                              "to freeze.")
        method.freeze_encoder()
    return method


def method_names() -> list[str]:
    """Registered method names."""
    return METHODS.names()
