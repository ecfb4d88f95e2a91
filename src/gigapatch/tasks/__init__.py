"""gigapatch.tasks: what the labels are (collation, losses, metrics, predictions).

Importing this package registers the tasks: ``classify`` and ``multilabel``.
"""

from gigapatch.tasks import classify, multilabel
from gigapatch.tasks.base import TASKS, Logits, Targets, Task, create_task, task_names
from gigapatch.tasks.classify import Classify, probabilities, random_targets, task_loss
from gigapatch.tasks.multilabel import MultiLabel

__all__ = [
    "TASKS",
    "Classify",
    "Logits",
    "MultiLabel",
    "Targets",
    "Task",
    "classify",
    "create_task",
    "multilabel",
    "probabilities",
    "random_targets",
    "task_loss",
    "task_names",
]
