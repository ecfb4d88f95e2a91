"""Several tasks: summed losses, per-task metrics, targets of the right structure."""

import pytest
import torch
import torch.nn.functional as F

from gigapatch.config import Config
from gigapatch.tasks import (
    create_task,
    probabilities,
    random_targets,
    task_loss,
)


def _batch():
    torch.manual_seed(0)
    logits = {"majority": torch.randn(4, 10), "multi": torch.randn(4, 10)}
    targets = {"majority": torch.tensor([1, 2, 3, 4]), "top": torch.tensor([0, 0, 0, 0]),
               "multi": (torch.rand(4, 10) > 0.5).float()}
    return logits, targets


def test_multi_task_loss_is_the_sum_of_ce_and_bce():
    logits, targets = _batch()
    want = F.cross_entropy(logits["majority"], targets["majority"]) + \
        F.binary_cross_entropy_with_logits(logits["multi"], targets["multi"])
    got = task_loss(logits, targets, multilabel={"multi"})
    assert got.shape == () and torch.allclose(got, want)


def test_single_output_on_multi_task_targets_uses_the_main_task():
    logits, targets = _batch()
    got = task_loss(logits["majority"], targets, main_task="majority")
    assert torch.allclose(got, F.cross_entropy(logits["majority"], targets["majority"]))
    with pytest.raises(KeyError, match="lack the task"):
        task_loss({"max": logits["majority"]}, targets)


def _task_cfg(tasks, multilabel, metrics=("accuracy",)):
    cfg = Config()
    cfg.data.tasks, cfg.data.multilabel = list(tasks), list(multilabel)
    cfg.task.metrics = list(metrics)
    return cfg


def test_task_metrics_per_task():
    logits = {"majority": torch.eye(10)[[1, 2, 0, 0]] * 5,  # right, right, wrong, wrong
              "multi": torch.full((4, 10), -5.0)}  # predicts no digit present
    targets = {"majority": torch.tensor([1, 2, 3, 4]),
               "multi": torch.zeros(4, 10)}
    targets["multi"][0, :5] = 1  # 5 of the 40 labels are positive
    m = create_task(_task_cfg(["majority", "multi"], ["multi"])).metrics()
    m.update(logits, targets)
    got = m.compute()
    assert got["accuracy"] == pytest.approx(0.5) == got["accuracy_majority"]
    assert got["accuracy_multi"] == pytest.approx(35 / 40)
    single = create_task(_task_cfg([], [])).metrics()
    single.update(logits["majority"], targets["majority"])
    assert single.compute() == {"accuracy": pytest.approx(0.5)}


def test_probabilities_and_random_targets_have_the_right_structure():
    logits, _ = _batch()
    p = probabilities(logits, {"multi"})
    assert torch.allclose(p["majority"].sum(1), torch.ones(4))
    assert torch.allclose(p["multi"], logits["multi"].sigmoid())
    t = random_targets(3, 10, ["majority", "multi"], {"multi"})
    assert t["majority"].shape == (3,) and t["multi"].shape == (3, 10)
    assert t["multi"].dtype == torch.float32 and create_task(_task_cfg(['majority', 'multi'], ['multi'])).batch_size(t) == 3
    assert random_targets(5, 4).shape == (5,)
