"""Tasks by name: config section, kappa, monitor, multilabel kind, JSON-safe predictions."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from gigapatch.config import Config, load_config
from gigapatch.core.errors import ConfigError
from gigapatch.engine.loop import train
from gigapatch.tasks import Classify, MultiLabel, create_task, task_names


def _quadratic_kappa(pred: list[int], true: list[int], k: int) -> float:
    """Cohen's kappa with quadratic weights, from its definition."""
    n = len(pred)
    observed = torch.zeros(k, k)
    for p, t in zip(pred, true):
        observed[t, p] += 1
    expected = observed.sum(1, keepdim=True) @ observed.sum(0, keepdim=True) / n
    i = torch.arange(k, dtype=torch.float32)
    weights = (i[:, None] - i[None, :]) ** 2 / (k - 1) ** 2
    return float(1 - (weights * observed).sum() / (weights * expected).sum())


def test_kappa_is_the_quadratic_weighted_kappa_of_the_main_head():
    cfg = Config()
    cfg.data.num_classes = 5
    cfg.task.metrics = ["accuracy", "kappa"]
    pred = [0, 1, 2, 4, 4, 3, 1, 0, 2, 2]
    true = [0, 1, 3, 4, 2, 3, 0, 0, 2, 1]
    metrics = create_task(cfg).metrics()
    metrics.update(torch.eye(5)[pred] * 3, torch.tensor(true))
    got = metrics.compute()
    assert float(got["kappa"]) == pytest.approx(_quadratic_kappa(pred, true, 5), abs=1e-5)
    assert float(got["accuracy"]) == pytest.approx(0.6)


def test_config_names_the_task_and_old_configs_are_classification(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"data": {"num_classes": 3}}))
    cfg = load_config(old)
    assert cfg.task.kind == "classify" and isinstance(create_task(cfg), Classify)
    assert {"classify", "multilabel"} <= set(task_names())
    with pytest.raises(ConfigError, match="unknown task 'clasify'.*'classify'"):
        create_task(load_config(old, ["task.kind=clasify"]))
    with pytest.raises(ConfigError, match="task.metrics: 'f1'"):
        create_task(load_config(old, ["task.metrics=[accuracy, f1]"]))
    with pytest.raises(ConfigError, match="task.monitor = 'kappa'"):
        create_task(load_config(old, ["task.monitor=kappa"]))


def test_multilabel_task_makes_every_head_multi_hot():
    cfg = Config()
    cfg.data.tasks = ["labels"]
    cfg.task.kind = "multilabel"
    task = create_task(cfg)
    assert isinstance(task, MultiLabel) and task.multilabel == {"labels"}
    targets = task.random_targets(3)
    assert targets["labels"].shape == (3, 10) and targets["labels"].is_floating_point()
    cfg.data.tasks = []
    with pytest.raises(ConfigError, match="data.tasks"):
        create_task(cfg)


def test_predictions_are_strict_json_even_for_nan_outputs():
    task = create_task(Config())
    row = task.prediction(torch.tensor([[float("nan"), 1.0, 0.0]]))
    json.dumps(row, allow_nan=False)
    assert row["probabilities"] == [None, None, None]


def test_monitor_loss_keeps_the_epoch_with_the_lowest_validation_loss(tiny_config):
    cfg = tiny_config
    cfg.task.monitor = "loss"
    cfg.train.epochs = 3
    summary = train(cfg)
    with open(cfg.train.out_dir + "/tiny/metrics.csv") as f:
        losses = [float(r["val_loss"]) for r in csv.DictReader(f)]
    assert summary["monitor"] == "loss"
    assert summary["best_epoch"] == 1 + losses.index(min(losses))
    assert summary["best_value"] == pytest.approx(min(losses))
