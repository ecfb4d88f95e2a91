"""gigapatch.tasks: what the labels are (collation, losses, metrics, predictions).

Importing this package registers the tasks: ``classify``, ``multilabel``, ``segment`` and ``detect``.
"""

from gigapatch.tasks import classify, detect, multilabel, segment
from gigapatch.tasks.base import TASKS, Logits, Targets, Task, create_task, task_names
from gigapatch.tasks.classify import Classify, probabilities, random_targets, task_loss
from gigapatch.tasks.detect import Detect
from gigapatch.tasks.multilabel import MultiLabel
from gigapatch.tasks.segment import Segment

__all__ = [
    "TASKS",
    "Classify",
    "Detect",
    "Logits",
    "MultiLabel",
    "Segment",
    "Targets",
    "Task",
    "classify",
    "create_task",
    "detect",
    "multilabel",
    "probabilities",
    "random_targets",
    "segment",
    "task_loss",
    "task_names",
]
