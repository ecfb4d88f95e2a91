"""Image classification: one label per image, or several label heads (task ``classify``).

A single-task method gives logits ``(B, K)`` and is trained on targets ``(B,)``. A multi-task
method (e.g. IPS on Megapixel MNIST) gives a dict ``{task: (B, K)}`` and is trained on a dict
``{task: (B,) class indices}`` or, for multi-label tasks, ``{task: (B, K) multi-hot}``.
Single-label tasks use softmax cross-entropy, multi-label tasks sigmoid binary cross-entropy.
A single-task method trained on multi-task data predicts the main (first) task.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCohenKappa, MultilabelAccuracy

from gigapatch.config import Config
from gigapatch.core.errors import ConfigError
from gigapatch.tasks.base import TASKS, DelegatingMetric, Logits, Targets, Task

__all__ = [
    "Classify",
    "HeadMetric",
    "probabilities",
    "random_targets",
    "sample_losses",
    "task_loss",
]

#: Metrics a classification task can report (``task.metrics``).
METRICS = ("accuracy", "kappa")


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


def sample_losses(
    logits: Logits, targets: Targets, multilabel: Collection[str] = (), main_task: str | None = None
) -> torch.Tensor:
    """Each sample's loss ``(B,)``, summed over the tasks; its mean is :func:`task_loss`.

    Same arguments as :func:`task_loss`; a multi-label task's loss is its BCE averaged over
    the K labels.
    """
    def one(out: torch.Tensor, target: torch.Tensor, multi: bool) -> torch.Tensor:
        target = target.to(out.device)
        if multi:
            return F.binary_cross_entropy_with_logits(
                out, target.to(out.dtype), reduction="none").mean(dim=1)
        return F.cross_entropy(out, target, reduction="none")

    if isinstance(logits, torch.Tensor):
        task = main_task if isinstance(targets, dict) else None
        return one(logits, _pick(targets, main_task), task in multilabel)
    return torch.stack([one(out, targets[t], t in multilabel) for t, out in logits.items()]).sum(0)


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


class HeadMetric(DelegatingMetric):
    """A metric of one label head: ``update(output, targets)`` picks ``output[head]`` and
    ``targets[head]`` (tensors pass through), casting float multi-hot targets to ``long``."""

    def __init__(self, metric: Metric, head: str | None) -> None:
        super().__init__(metric)
        self.head = head

    def update(self, output: Logits, targets: Targets) -> None:
        out = output[self.head] if isinstance(output, dict) else output
        target = targets[self.head] if isinstance(targets, dict) else targets
        target = target.to(out.device)
        self.metric.update(out, target.long() if target.is_floating_point() else target)


@TASKS.register("classify")
class Classify(Task):
    """Single-label classification, with one or several label heads.

    ``data.tasks`` names the heads (empty: one unnamed label; the first head is the main one),
    ``data.multilabel`` the heads that are multi-hot (sigmoid + BCE; the others softmax + CE),
    ``data.num_classes`` the outputs of every head. Output of a method: logits ``(B, K)`` for
    one unnamed label, else ``{head: (B, K)}``.

    Metrics (``task.metrics``): ``accuracy`` (micro; for multi-label heads the share of the K
    labels right at sigmoid > 0.5) of the main head, plus ``accuracy_<head>`` for each head when
    there are several; ``kappa``: quadratic-weighted Cohen's kappa of the main head (the
    PANDA grading convention; single-label heads only).
    """

    kind = "classify"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        d = cfg.data
        #: Label heads (``[]``: one unnamed label).
        self.heads: list[str] = list(d.tasks)
        self.multilabel: frozenset[str] = frozenset(self._multilabel(cfg))
        self.num_classes: int = d.num_classes
        self.wanted = list(cfg.task.metrics)
        for name in self.wanted:
            if name not in METRICS:
                raise ConfigError(
                    f"task.metrics: {name!r} is not a metric of task {self.kind!r}; choose from "
                    f"{list(METRICS)}."
                )
        main = self.heads[0] if self.heads else None
        if "kappa" in self.wanted and main in self.multilabel:
            raise ConfigError(
                f"task.metrics: kappa needs a single-label main head, but {main!r} is multi-label."
            )
        names = self._metric_names()
        if self.monitor != "loss" and self.monitor not in names:
            raise ConfigError(
                f"task.monitor = {self.monitor!r} is not among this task's metrics {names} "
                "(or 'loss'); add it to task.metrics or choose one of those."
            )

    def _multilabel(self, cfg: Config) -> list[str]:
        return list(cfg.data.multilabel)

    @property
    def main(self) -> str | None:
        """The main head (``None``: one unnamed label)."""
        return self.heads[0] if self.heads else None

    def _metric_names(self) -> list[str]:
        names = list(self.wanted)
        if len(self.heads) > 1 and "accuracy" in self.wanted:
            names += [f"accuracy_{h}" for h in self.heads]
        return names

    def loss(self, output: Logits, targets: Targets, window: Any = None) -> torch.Tensor:
        return task_loss(output, targets, self.multilabel, self.main)

    def sample_losses(self, output: Logits, targets: Targets) -> torch.Tensor:
        """Each sample's loss ``(B,)`` (their mean is :meth:`loss`)."""
        return sample_losses(output, targets, self.multilabel, self.main)

    def _accuracy(self, head: str | None) -> Metric:
        k = self.num_classes
        if head in self.multilabel:
            return MultilabelAccuracy(num_labels=k, average="micro")
        return MulticlassAccuracy(num_classes=k, average="micro")

    def metrics(self) -> MetricCollection:
        found: dict[str, Metric] = {}
        if "accuracy" in self.wanted:
            found["accuracy"] = HeadMetric(self._accuracy(self.main), self.main)
            if len(self.heads) > 1:
                for h in self.heads:
                    found[f"accuracy_{h}"] = HeadMetric(self._accuracy(h), h)
        if "kappa" in self.wanted:
            kappa = MulticlassCohenKappa(num_classes=self.num_classes, weights="quadratic")
            found["kappa"] = HeadMetric(kappa, self.main)
        return MetricCollection(found, compute_groups=False)

    def random_targets(self, batch: int, image_hw: tuple[int, int] | None = None) -> Targets:
        return random_targets(batch, self.num_classes, self.heads, self.multilabel)

    def prediction(self, output: Logits, index: int = 0) -> dict[str, Any]:
        probs = probabilities(output, self.multilabel)
        if isinstance(probs, torch.Tensor):
            return _one_prediction(probs[index], multilabel=False)
        return {"tasks": {t: _one_prediction(p[index], t in self.multilabel)
                          for t, p in probs.items()}}


def _one_prediction(probs: torch.Tensor, multilabel: bool) -> dict[str, Any]:
    """JSON of one head's probabilities ``(K,)``: rounded, finite (NaN becomes ``None``)."""
    values = [round(float(p), 4) if torch.isfinite(p) else None for p in probs.float()]
    if multilabel:
        return {"present": [i for i, p in enumerate(values) if p is not None and p > 0.5],
                "probabilities": values}
    top = int(probs.float().nan_to_num(-1.0).argmax())
    return {"prediction": top, "confidence": values[top], "probabilities": values}
