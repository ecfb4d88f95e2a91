"""One or several prediction tasks: losses, metrics and probabilities.

A single-task method gives logits ``(B, K)`` and is trained on targets ``(B,)``. A multi-task
method (e.g. IPS on Megapixel MNIST) gives a dict ``{task: (B, K)}`` and is trained on a dict
``{task: (B,) class indices}`` or, for multi-label tasks, ``{task: (B, K) multi-hot}``.
Single-label tasks use softmax cross-entropy, multi-label tasks sigmoid binary cross-entropy.
A single-task method trained on multi-task data predicts the main (first) task.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MultilabelAccuracy

__all__ = [
    "Logits",
    "Targets",
    "TaskMetrics",
    "batch_len",
    "probabilities",
    "random_targets",
    "task_loss",
]

Logits = torch.Tensor | dict[str, torch.Tensor]
Targets = torch.Tensor | dict[str, torch.Tensor]


def _pick(targets: Targets, main_task: str | None) -> torch.Tensor:
    """The target tensor a single-output method is trained on."""
    if isinstance(targets, torch.Tensor):
        return targets
    if main_task is None:
        main_task = next(iter(targets))
    return targets[main_task]


def _one_loss(logits: torch.Tensor, target: torch.Tensor, multilabel: bool) -> torch.Tensor:
    target = target.to(logits.device)
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))
    return F.cross_entropy(logits, target)


def task_loss(
    logits: Logits,
    targets: Targets,
    multilabel: Collection[str] = (),
    main_task: str | None = None,
) -> torch.Tensor:
    """Sum of the tasks' losses (a scalar).

    Args:
        logits: ``(B, K)`` or ``{task: (B, K)}``.
        targets: ``(B,)`` class indices, or ``{task: (B,) indices or (B, K) multi-hot}``; a
            dict may hold more tasks than the logits (only the logits' tasks are used).
        multilabel: the tasks scored with sigmoid BCE (the others with softmax CE).
        main_task: the task a single ``(B, K)`` output is compared with when ``targets`` is a
            dict (default: its first task).
    """
    if isinstance(logits, torch.Tensor):
        task = main_task if isinstance(targets, dict) else None
        return _one_loss(logits, _pick(targets, main_task), task in multilabel)
    if not isinstance(targets, dict):
        raise TypeError("multi-task logits need a dict of targets, one entry per task")
    missing = [t for t in logits if t not in targets]
    if missing:
        raise KeyError(f"targets lack the task(s) {missing}; they have {list(targets)}")
    losses = [_one_loss(out, targets[t], t in multilabel) for t, out in logits.items()]
    return torch.stack(losses).sum()


def probabilities(logits: Logits, multilabel: Collection[str] = ()) -> Logits:
    """Softmax (single-label) or sigmoid (multi-label) of each task's logits, same structure."""
    if isinstance(logits, torch.Tensor):
        return logits.softmax(dim=-1)
    return {t: out.sigmoid() if t in multilabel else out.softmax(dim=-1)
            for t, out in logits.items()}


def random_targets(
    batch: int, num_classes: int, tasks: Sequence[str] = (), multilabel: Collection[str] = ()
) -> Targets:
    """Random targets of the right structure (for memory measurements): ``(B,)`` indices, or
    a dict per task (multi-hot ``(B, K)`` floats for multi-label tasks)."""
    if not tasks:
        return torch.randint(0, num_classes, (batch,))
    return {
        t: torch.randint(0, 2, (batch, num_classes)).float() if t in multilabel
        else torch.randint(0, num_classes, (batch,))
        for t in tasks
    }


def batch_len(targets: Targets) -> int:
    """Number of samples in a batch of targets."""
    if isinstance(targets, torch.Tensor):
        return len(targets)
    return len(next(iter(targets.values())))


class TaskMetrics:
    """Accuracy per task (torchmetrics), accumulated over batches.

    Single-label tasks: multiclass accuracy. Multi-label tasks: the share of the ``K`` labels
    predicted right (sigmoid > 0.5), over all samples (micro). ``compute()`` gives
    ``{"accuracy": main task, "accuracy_<task>": each task}`` (only ``accuracy`` for one task).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        num_classes: int,
        multilabel: Collection[str] = (),
        device: torch.device | str = "cpu",
    ) -> None:
        self.tasks = list(tasks) or ["label"]
        self.single = not tasks
        self.metrics = {
            t: (
                MultilabelAccuracy(num_labels=num_classes, average="micro")
                if t in multilabel
                else MulticlassAccuracy(num_classes=num_classes, average="micro")
            ).to(device)
            for t in self.tasks
        }

    def update(self, logits: Logits, targets: Targets) -> None:
        """Add one batch."""
        if isinstance(logits, torch.Tensor):
            logits = {self.tasks[0]: logits}
        if isinstance(targets, torch.Tensor):
            targets = {self.tasks[0]: targets}
        for task, out in logits.items():
            target = targets[task].to(out.device)
            self.metrics[task].update(out, target.long() if target.is_floating_point() else target)

    def compute(self) -> dict[str, float]:
        """``accuracy`` of the main task, plus ``accuracy_<task>`` per task if several."""
        values = {t: float(m.compute()) for t, m in self.metrics.items() if m.update_count}
        result = {"accuracy": values.get(self.tasks[0], float("nan"))}
        if len(self.tasks) > 1:
            result.update({f"accuracy_{t}": v for t, v in values.items()})
        return result
