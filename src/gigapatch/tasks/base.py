"""The interface every task implements, and the task registry.

A task says what the labels are; a method says how memory is bounded. A task owns:

- :meth:`Task.collate`: a batch of per-image targets → what the loss takes (tensors, dicts
  per label head, or ragged lists);
- :meth:`Task.loss`: the loss of a method's output against the targets;
- :meth:`Task.metrics`: a torchmetrics :class:`~torchmetrics.MetricCollection` over the
  held-out set, reduced over all processes when training is distributed;
- :attr:`Task.monitor` / :attr:`Task.monitor_mode`: the metric that chooses ``best.pt``;
- :meth:`Task.random_targets`: targets of the right structure for memory estimates;
- :meth:`Task.prediction`: one image's prediction as a JSON-ready dict (a CSV row).

Adding a task means one file that registers a subclass (imported in ``tasks/__init__``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch.utils.data import default_collate
from torchmetrics import Metric, MetricCollection
from torchmetrics.wrappers.abstract import WrapperMetric

from gigapatch.config import Config
from gigapatch.core.registry import Registry

__all__ = ["TASKS", "DelegatingMetric", "Logits", "Targets", "Task", "create_task", "task_names"]

Logits = torch.Tensor | dict[str, torch.Tensor]
Targets = Any  # a tensor, a dict of tensors per head, or a list per image (ragged targets)

TASKS: Registry[type["Task"]] = Registry("task")


class DelegatingMetric(WrapperMetric):
    """A metric around ``metric`` (a metric or a collection): subclasses say how
    ``update(output, targets)`` feeds it; ``compute`` and ``reset`` are the wrapped one's."""

    def __init__(self, metric: Metric | MetricCollection) -> None:
        super().__init__()
        self.metric = metric

    def compute(self) -> Any:
        return self.metric.compute()

    def reset(self) -> None:
        self.metric.reset()
        super().reset()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.update(*args, **kwargs)
        return None


class Task(ABC):
    """What the labels are: collation, loss, metrics, the monitored metric, predictions."""

    #: Registered name (``task.kind``).
    kind: ClassVar[str] = ""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        #: Name of the metric that chooses ``best.pt`` (a key of :meth:`metrics`, or ``loss``).
        self.monitor: str = cfg.task.monitor
        #: ``max`` (higher is better) or ``min``.
        self.monitor_mode: str = "min" if self.monitor == "loss" else "max"

    def collate(self, targets: list[Any]) -> Targets:
        """Stack the targets of a batch's images (default: torch's ``default_collate``)."""
        return default_collate(targets)

    @abstractmethod
    def loss(self, output: Logits, targets: Targets, window: Any = None) -> torch.Tensor:
        """Scalar loss of a method's output against a batch's targets. ``window``: the
        region of the image the output covers, for dense tasks whose methods compute the
        loss window by window (``None``: the whole image; image-level tasks ignore it)."""

    @abstractmethod
    def metrics(self) -> MetricCollection:
        """Fresh held-out metrics; ``update(output, targets)`` per batch, then ``compute()``."""

    #: Whether the targets are per pixel (segmentation): methods then build dense networks.
    dense: ClassVar[bool] = False
    #: Whether the targets are boxes (detection): methods then build detectors.
    detects: ClassVar[bool] = False

    @abstractmethod
    def random_targets(self, batch: int, image_hw: tuple[int, int] | None = None) -> Targets:
        """Targets of the right structure and dtype for a batch of ``batch`` images of size
        ``image_hw`` (needed by dense tasks)."""

    @abstractmethod
    def prediction(self, output: Logits, index: int = 0) -> dict[str, Any]:
        """Image ``index`` of a batch's output as a JSON-ready dict (finite numbers only)."""

    def batch_size(self, targets: Targets) -> int:
        """Number of images in a batch of targets."""
        if isinstance(targets, torch.Tensor):
            return len(targets)
        if isinstance(targets, dict):
            return len(next(iter(targets.values())))
        return len(targets)

    def better(self, value: float, best: float | None) -> bool:
        """Whether ``value`` of the monitored metric beats ``best`` (``None``: nothing yet).
        A NaN is never better."""
        if value != value:  # NaN
            return False
        if best is None:
            return True
        return value < best if self.monitor_mode == "min" else value > best


def create_task(cfg: Config) -> Task:
    """The task named by ``cfg.task.kind``."""
    return TASKS.get(cfg.task.kind)(cfg)


def task_names() -> list[str]:
    """Registered task kinds."""
    return TASKS.names()
