"""The step context: the one place that does backward, gradient sync, scaling, clipping and
the optimizer step, for every method.

A method's ``train_step(images, targets, task, ctx)`` never calls ``.backward()``,
``optimizer.step()`` or ``zero_grad()`` itself. It runs its forward passes through
:meth:`StepContext.run` (under autocast, and through DistributedDataParallel when training is
distributed) or under :meth:`StepContext.autocast` for passes without gradients, and calls
:meth:`StepContext.backward` and :meth:`StepContext.step`. Several backward passes that feed
one update run under ``with ctx.no_sync():`` except the last, so gradients are synchronised
once per update::

    for j in range(steps):
        with ctx.no_sync() if j < steps - 1 else nullcontext():
            loss = ctx.run(inner_loss, j)
            ctx.backward(loss / steps)
    ctx.step()

Precision (``train.precision``): ``32`` (float32), ``bf16`` (``torch.autocast`` to bfloat16,
on CPU and CUDA) or ``16-mixed`` (autocast to float16 with a gradient scaler; CUDA only).

Divergence: before every optimizer step the global gradient norm is checked (it is already
computed when clipping). A non-finite norm raises
:class:`~gigapatch.core.errors.TrainingDiverged` *before* the step, so the parameters stay
finite. Under ``16-mixed`` an overflow is normal (the scaler skips that step and lowers its
scale); only :data:`MAX_SKIPPED_STEPS` skipped steps in a row count as divergence. Gradients
are checked after their synchronisation, so every process decides alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from gigapatch.core.errors import ConfigError, TrainingDiverged

__all__ = ["MAX_SKIPPED_STEPS", "StepContext", "autocast", "autocast_dtype"]

#: Float16 steps skipped in a row (gradient overflow) that count as divergence.
MAX_SKIPPED_STEPS = 25


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` (``None`` for float32)."""
    return {"32": None, "bf16": torch.bfloat16, "16-mixed": torch.float16}[precision]


def autocast(precision: str, device: torch.device | str) -> Any:
    """A context running forward passes on ``device`` in ``precision`` (no-op for ``32``, and
    on devices without autocast, such as the ``meta`` device of GPU-less CUDA estimates)."""
    dtype = autocast_dtype(precision)
    if dtype is None or torch.device(device).type not in ("cpu", "cuda"):
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class StepContext:
    """Backward, gradient synchronisation, mixed precision, clipping and optimizer steps.

    Args:
        module: the method (an ``nn.Module``) whose parameters are trained.
        optimizer: its optimizer.
        precision: ``"32"``, ``"bf16"`` or ``"16-mixed"``.
        grad_clip: clip the gradients' global norm to this before each step (``None``: off).
        ddp: the method wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, if
            training is distributed; forward passes given to :meth:`run` go through it.
        device: where the method lives (chooses the autocast device type).
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        precision: str = "32",
        grad_clip: float | None = None,
        ddp: nn.Module | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.module, self.optimizer, self.ddp = module, optimizer, ddp
        self.precision, self.grad_clip = precision, grad_clip
        self.device = torch.device(device)
        self.dtype = autocast_dtype(precision)
        if precision == "16-mixed" and self.device.type != "cuda":
            raise ConfigError(
                "train.precision = 16-mixed needs a CUDA device (float16 autocast with loss "
                "scaling); on a CPU use train.precision = bf16."
            )
        self.scaler = torch.amp.GradScaler("cuda") if precision == "16-mixed" else None
        #: Optimizer steps taken (skipped float16 steps included).
        self.steps = 0
        self._sync = True
        self._skipped = 0  # float16 steps skipped in a row

    # ------------------------------------------------------------------ forward
    def autocast(self) -> Any:
        """Context for forward passes in the configured precision (no-op for float32)."""
        return autocast(self.precision, self.device)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` as a forward pass of the trained module: under autocast,
        and through DistributedDataParallel when distributed (so that its backward
        synchronises gradients, unless inside :meth:`no_sync`)."""
        with self.autocast():
            if self.ddp is None:
                return fn(*args, **kwargs)
            return self.ddp(fn, *args, **kwargs)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients locally (no synchronisation); the
        next backward outside synchronises the sum. Forward and backward both go inside."""
        if self.ddp is None:
            yield
            return
        with self.ddp.no_sync():
            yield

    # ------------------------------------------------------------------ backward / step
    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` (scaled for float16)."""
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def step(self) -> None:
        """Unscale, clip, step the optimizer and clear the gradients.

        Raises:
            TrainingDiverged: the gradients are not finite (float32/bfloat16; the
                parameters are left as they were), or :data:`MAX_SKIPPED_STEPS` float16
                steps in a row overflowed.
        """
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        elif self.scaler is None and params:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        else:
            norm = None
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self._skipped = self._skipped + 1 if self.scaler.get_scale() < scale else 0
            if self._skipped >= MAX_SKIPPED_STEPS:
                self.optimizer.zero_grad(set_to_none=True)
                raise TrainingDiverged(
                    f"the float16 gradients overflowed in {self._skipped} steps in a row "
                    f"(loss scale now {self.scaler.get_scale():g})")
        else:
            if norm is not None and not bool(torch.isfinite(norm)):
                self.optimizer.zero_grad(set_to_none=True)
                raise TrainingDiverged(f"the gradient norm is {float(norm)}")
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1

    def zero_grad(self) -> None:
        """Clear the gradients (set to ``None``)."""
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The loss scaler's state (empty without one)."""
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
