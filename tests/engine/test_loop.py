import copy
import csv
import json

import pytest
import torch

import gigapatch.engine.loop
from gigapatch.engine.checkpoint import load_checkpoint
from gigapatch.data.datasets import CSVImageDataset
from gigapatch.methods.base import create_method
from gigapatch.engine.loop import train
from gigapatch.step import StepContext, lr_factor, make_optimizer


def test_val_every_validates_every_nth_and_the_last_epoch(tiny_config, monkeypatch):
    tiny_config.train.epochs, tiny_config.train.val_every = 5, 2
    calls = []
    real = gigapatch.engine.loop.evaluate

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gigapatch.engine.loop, "evaluate", spy)
    summary = train(tiny_config)
    assert len(calls) == 3  # epochs 2, 4 and 5
    rows = list(csv.DictReader(open(f"{tiny_config.train.out_dir}/tiny/metrics.csv")))
    checked = [int(r["epoch"]) for r in rows if r["val_accuracy"]]
    assert checked == [2, 4, 5] and all(r["val_loss"] == "" for r in rows[::2][:2])
    assert summary["best_epoch"] in checked
    best = max(float(r["val_accuracy"]) for r in rows if r["val_accuracy"])
    assert summary["val_accuracy"] == best
    assert summary["final_val_accuracy"] == float(rows[-1]["val_accuracy"])


@pytest.mark.parametrize("method", ["patchgd", "full"])
def test_a_few_steps_drive_the_training_loss_down(tiny_config, method):
    torch.manual_seed(0)
    cfg = tiny_config
    cfg.method.name = method
    ds = CSVImageDataset(cfg.data.train_csv, num_classes=4)
    images = torch.stack([ds[i][0] for i in range(4)])
    targets = torch.stack([ds[i][1] for i in range(4)])
    m = create_method(cfg)
    opt = make_optimizer(m, cfg)
    images = m.host_transform(images)
    ctx = StepContext(m, opt)
    losses = [m.train_step(images, targets, ctx) for _ in range(25)]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses


def test_run_writes_its_files(tiny_config):
    summary = train(tiny_config)
    run = tiny_config.train.out_dir + "/tiny"
    for name in ["config.yaml", "metrics.csv", "summary.json", "last.pt", "best.pt",
                 "training_curve.png", "train.log"]:
        assert (tmp := __import__("pathlib").Path(run) / name).is_file(), tmp
    on_disk = json.loads(open(f"{run}/summary.json").read())
    assert on_disk == summary
    for key in ["method", "image_size", "patch_size", "epochs", "val_accuracy",
                "final_val_accuracy", "peak_memory_bytes", "train_seconds", "images_per_second"]:
        assert key in summary
    assert summary["image_size"] == 64 and summary["epochs"] == 2
    assert summary["peak_memory_bytes"] > 0
    assert 0 < summary["peak_device_memory_bytes"] <= summary["peak_memory_bytes"]
    rows = list(csv.DictReader(open(f"{run}/metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert summary["val_accuracy"] == max(float(r["val_accuracy"]) for r in rows)


@pytest.mark.parametrize("method", ["patchgd", "full"])
def test_resume_gives_the_same_result_as_an_uninterrupted_run(
    tiny_config, tmp_path, monkeypatch, method
):
    tiny_config.method.name = method
    tiny_config.train.epochs = 3
    whole = copy.deepcopy(tiny_config)
    whole.train.out_dir = str(tmp_path / "whole")
    train(whole)

    cut = copy.deepcopy(tiny_config)
    cut.train.out_dir = str(tmp_path / "cut")
    calls = []

    def crash_in_second_validation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during epoch 2, after epoch 1's checkpoint
        return real_evaluate(*args, **kwargs)

    real_evaluate = gigapatch.engine.loop.evaluate
    monkeypatch.setattr(gigapatch.engine.loop, "evaluate", crash_in_second_validation)
    with pytest.raises(KeyboardInterrupt):
        train(cut)
    monkeypatch.setattr(gigapatch.engine.loop, "evaluate", real_evaluate)
    assert load_checkpoint(tmp_path / "cut/tiny/last.pt")["epoch"] == 0
    train(copy.deepcopy(cut), resume=True)

    a = load_checkpoint(tmp_path / "whole/tiny/last.pt")
    b = load_checkpoint(tmp_path / "cut/tiny/last.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("epoch_seconds", "images_per_second")} for r in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, total=100, warmup=10, schedule="cosine") for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] < 0.01


def test_tensorboard_logger_writes_the_epoch_rows_and_the_steps(tiny_config):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    tiny_config.train.logger = "tensorboard"
    tiny_config.method.z_cache, tiny_config.method.z_refresh = "refresh", 0.25
    summary = train(tiny_config)
    run = __import__("pathlib").Path(summary["run_dir"])
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train", "loss/val", "loss/train_step", "val/accuracy", "lr/lr",
            "memory/peak_step_MiB", "speed/images_per_second", "zcache/staleness",
            "zcache/refreshed"} <= tags
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    val = acc.Scalars("loss/val")
    assert [e.step for e in val] == [3, 6]  # 12 images, batch 4: 3 steps per epoch
    assert [round(e.value, 5) for e in val] == [round(float(r["val_loss"]), 5) for r in rows]
    assert len(acc.Scalars("loss/train_step")) == 6
    assert "images_per_second" in rows[0]
    assert rows[0]["z_staleness"] == "" and float(rows[1]["z_refreshed"]) == 0.25  # epoch 2
    assert acc.Scalars("zcache/refreshed")[0].value == 0.25
