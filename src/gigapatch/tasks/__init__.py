"""gigapatch.tasks: what the labels are (losses, metrics, predictions)."""

from gigapatch.tasks.base import (
    Logits,
    Targets,
    TaskMetrics,
    batch_len,
    probabilities,
    random_targets,
    task_loss,
)

__all__ = [
    "Logits",
    "Targets",
    "TaskMetrics",
    "batch_len",
    "probabilities",
    "random_targets",
    "task_loss",
]
