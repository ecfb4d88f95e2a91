"""gigapatch.step: what one training step needs besides the method: the step context
(backward, gradient sync, precision, clipping, optimizer step) and the optimizers. Imported
by the training loop (:mod:`gigapatch.engine`) and by the memory tools
(:mod:`gigapatch.memory`), which drive a method's step through a context of their own."""

from gigapatch.step.context import StepContext, autocast, autocast_dtype
from gigapatch.step.optim import lr_factor, make_optimizer, make_scheduler

__all__ = ["StepContext", "autocast", "autocast_dtype", "lr_factor", "make_optimizer", "make_scheduler"]
