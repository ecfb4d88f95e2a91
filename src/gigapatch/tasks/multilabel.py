"""Multi-label classification: every label head is multi-hot (task ``multilabel``).

The same as :class:`~gigapatch.tasks.classify.Classify` with every head in
``data.multilabel``: sigmoid + binary cross-entropy, an image may carry any set of the
``data.num_classes`` labels (a CSV column lists them, e.g. ``"2 5 7"``).
"""

from __future__ import annotations

from gigapatch.config import Config
from gigapatch.core.errors import ConfigError
from gigapatch.tasks.base import TASKS
from gigapatch.tasks.classify import Classify

__all__ = ["MultiLabel"]


@TASKS.register("multilabel")
class MultiLabel(Classify):
    """Every head of ``data.tasks`` multi-label."""

    kind = "multilabel"

    def _multilabel(self, cfg: Config) -> list[str]:
        if not cfg.data.tasks:
            raise ConfigError(
                "task.kind = multilabel needs data.tasks to name the label column(s), "
                "e.g. data.tasks: [labels] (a CSV column listing the classes present)."
            )
        return list(cfg.data.tasks)
