"""The interface every training method implements, and the method registry.

A method owns its networks and turns a batch of large images into loss, gradients and
optimizer steps within its memory profile (:meth:`Method.train_step`), and one batch of
images into logits (:meth:`Method.predict`). The training loop, data, logging and memory
accounting are shared; adding a method means adding one file that registers a subclass.

Images arrive as they come from the data loader: ``(B, C, H, W)`` ``uint8`` (or float in
[0, 1]) on the host. Each method decides what goes to the device and when.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn as nn

from gigapatch.config import Config
from gigapatch.core.registry import Registry
from gigapatch.tasks import Logits, Targets, task_loss

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


class Method(nn.Module):
    """Base class: shared input preparation, loss and optimizer step."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.data.num_classes
        self.in_chans = cfg.data.in_chans
        #: Tasks predicted (``[]``: one unnamed task); the first is the main task.
        self.tasks: list[str] = list(cfg.data.tasks)
        self.multilabel: frozenset[str] = frozenset(cfg.data.multilabel)

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the parameters."""
        return next(self.parameters()).dtype

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
        return x

    def foreground(self, images: object, grid: object) -> torch.Tensor | None:
        """``(B, N)`` bool mask of the cells holding content when ``data.skip_background`` is
        on and the images are read from disk (:class:`~gigapatch.data.batch.LazyBatch`), else
        ``None`` (every cell counts)."""
        d = self.cfg.data
        if not d.skip_background or not hasattr(images, "foreground"):
            return None
        return images.foreground(grid, d.background, d.mask_threshold)

    def host_transform(self, images: torch.Tensor) -> torch.Tensor:
        """Host-side preprocessing applied by the data pipeline before :meth:`train_step`."""
        return images

    def loss(self, logits: Logits, targets: Targets) -> torch.Tensor:
        """Cross-entropy of ``(B, K)`` logits against ``(B,)`` class indices; for several tasks
        (dicts of both) the sum of the tasks' losses, see :func:`gigapatch.tasks.task_loss`."""
        main = self.tasks[0] if self.tasks else None
        return task_loss(logits, targets, self.multilabel, main)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip (if configured), step and clear gradients."""
        clip = self.cfg.train.grad_clip
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ interface
    def train_step(
        self, images: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer
    ) -> float:
        """One training step on a batch (may take several optimizer steps); returns mean loss.

        Args:
            images: ``(B, C, H, W)`` host tensor after :meth:`host_transform`.
            targets: ``(B,)`` long class indices, or a dict of them per task.
        """
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> Logits:
        """Logits ``(B, K)`` (or ``{task: (B, K)}``) for host images ``(B, C, H, W)``
        (call in eval mode)."""
        raise NotImplementedError


def create_method(cfg: Config) -> Method:
    """Build the method named by ``cfg.method.name`` with its encoder and head."""
    # Importing the method modules registers them.
    from gigapatch.methods import full, ips, patchgd  # noqa: F401

    return METHODS.get(cfg.method.name)(cfg)


def method_names() -> list[str]:
    """Registered method names."""
    from gigapatch.methods import full, ips, patchgd  # noqa: F401

    return METHODS.names()
