"""Nothing lost, nothing silently wrong: run directories, divergence, checkpoints, workers,
channels, worker errors and the smaller cases of issue 16 (one test or more per item)."""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gigapatch.engine.loop as loop
from gigapatch.cli import main
from gigapatch.config import save_config
from gigapatch.core.errors import ConfigError, DataError, TrainingDiverged
from gigapatch.core.files import write_json
from gigapatch.data.batch import unwrap_worker_error
from gigapatch.engine.checkpoint import load_checkpoint, load_method, save_checkpoint
from gigapatch.engine.loop import evaluate, loader_for, train
from gigapatch.data.datasets import open_dataset
from gigapatch.step import StepContext
from gigapatch.tasks import Task


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_epoch(cfg):
    cfg = copy.deepcopy(cfg)
    cfg.train.epochs = 1
    return cfg


# ---------------------------------------------------------------- 1. run directories
def test_a_second_train_refuses_to_overwrite_the_first_run(tiny_config, tmp_path, capsys):
    cfg = _one_epoch(tiny_config)
    train(copy.deepcopy(cfg))
    run = Path(cfg.train.out_dir) / cfg.name
    before = {f: (run / f).read_bytes() for f in ("last.pt", "best.pt", "metrics.csv",
                                                  "summary.json", "config.yaml")}
    with pytest.raises(ConfigError, match="already holds a run") as info:
        train(copy.deepcopy(cfg))
    for hint in (str(run), "--resume", "--overwrite", "--name"):
        assert hint in str(info.value)
    assert {f: (run / f).read_bytes() for f in before} == before  # nothing touched

    path = tmp_path / "cfg.yaml"
    save_config(cfg, path)
    code, _, err = _run(capsys, "train", "--config", str(path))
    assert code == 2 and "already holds a run" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="exclude each other"):
        train(copy.deepcopy(cfg), resume=True, overwrite=True)

    (run / "notes.txt").write_text("mine")
    code, _, _ = _run(capsys, "train", "--config", str(path), "--overwrite")
    assert code == 0
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1"]  # a fresh run, not appended
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files go


# ---------------------------------------------------------------- 2. divergence
def test_non_finite_gradients_stop_before_the_step():
    net = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ctx = StepContext(net, torch.optim.SGD(net.parameters(), lr=0.1))
    ctx.backward(net(torch.tensor([[float("nan"), 0.0, 1.0]])).sum())
    with pytest.raises(TrainingDiverged, match="gradient norm is nan"):
        ctx.step()
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])  # the parameters stayed finite
    clipped = StepContext(net, torch.optim.SGD(net.parameters(), lr=0.1), grad_clip=1.0)
    clipped.backward(net(torch.tensor([[float("inf"), 0.0, 1.0]])).sum())
    with pytest.raises(TrainingDiverged):
        clipped.step()


def test_divergence_stops_the_run_and_keeps_the_finite_checkpoints(tiny_config, tmp_path,
                                                                   capsys, monkeypatch):
    cfg = copy.deepcopy(tiny_config)
    cfg.train.epochs = 3
    real_step = StepContext.step
    steps_per_epoch = 3  # 12 images, batch 4

    def blow_up_in_epoch_2(self):
        if self.steps == steps_per_epoch + 1:  # second step of epoch 2
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        real_step(self)

    monkeypatch.setattr(StepContext, "step", blow_up_in_epoch_2)
    with pytest.raises(TrainingDiverged) as info:
        train(copy.deepcopy(cfg))
    text = str(info.value)
    assert "epoch 2, step 2" in text and "train.lr" in text and "train.grad_clip" in text
    run = Path(cfg.train.out_dir) / cfg.name
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(run / name)
        assert state["epoch"] == 0
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())

    path = tmp_path / "cfg.yaml"
    save_config(cfg, path)
    code, _, err = _run(capsys, "train", "--config", str(path), "--overwrite")
    assert code == 2 and "training diverged in epoch 2" in err and "Traceback" not in err


def test_a_huge_learning_rate_is_caught(tiny_config):
    cfg = copy.deepcopy(tiny_config)
    cfg.method.name = "full"
    cfg.train.lr = 1e6
    cfg.train.epochs = 3
    with pytest.raises(TrainingDiverged, match="train.lr \\(now 1e\\+06\\)"):
        train(cfg)


def test_predict_with_nan_weights_prints_valid_json(tiny_config, tmp_path, capsys):
    cfg = _one_epoch(tiny_config)
    train(copy.deepcopy(cfg))
    run = Path(cfg.train.out_dir) / cfg.name
    state = load_checkpoint(run / "best.pt")
    state["model"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v
                      for k, v in state["model"].items()}
    save_checkpoint(state, tmp_path / "nan.pt")
    image = cfg.data.val_csv.replace("test.csv", "test/000000.png")
    code, out, _ = _run(capsys, "predict", image, "--checkpoint", str(tmp_path / "nan.pt"))
    assert code == 0
    result = json.loads(out)  # strict JSON: NaN would not parse as a number here
    assert result["confidence"] is None and "NaN" not in out


# ---------------------------------------------------------------- 3. checkpoint consistency
def test_best_pt_agrees_with_the_summary_after_a_crash_between_the_two_writes(
        tiny_config, monkeypatch):
    cfg = copy.deepcopy(tiny_config)
    cfg.train.epochs = 2
    monkeypatch.setattr(Task, "better", lambda self, value, best: True)  # every epoch is best
    writes = []
    real_save = loop.save_checkpoint

    def crash_on_the_last_pt_of_epoch_2(state, path):
        writes.append(Path(path).name)
        if len(writes) == 4:  # epoch 1: best, last; epoch 2: best, then last.pt …
            Path(path).with_name(f".{Path(path).name}.1.x.tmp").write_bytes(b"half")
            raise KeyboardInterrupt  # … killed while writing it
        real_save(state, path)

    monkeypatch.setattr(loop, "save_checkpoint", crash_on_the_last_pt_of_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(copy.deepcopy(cfg))
    run = Path(cfg.train.out_dir) / cfg.name
    assert load_checkpoint(run / "best.pt")["epoch"] == 1  # ahead of last.pt
    assert load_checkpoint(run / "last.pt")["epoch"] == 0
    assert list(run.glob(".*.tmp"))

    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    # The retrained epoch 2 does not beat the best.pt that the crash left: it stays.
    monkeypatch.setattr(Task, "better", lambda self, value, best: best is None)
    summary = train(copy.deepcopy(cfg), resume=True)
    best = load_checkpoint(run / "best.pt")
    assert summary["best_epoch"] == best["epoch"] + 1 == 2
    assert not list(run.glob(".*.tmp"))  # the orphan is gone
    method, task, saved = load_method(run / "best.pt")
    got = evaluate(method, task, loader_for(open_dataset(saved, "val"), saved, task, shuffle=False))
    assert got["accuracy"] == pytest.approx(summary["val_accuracy"])


# ---------------------------------------------------------------- 4. workers
def test_the_number_of_workers_does_not_change_the_result(tiny_config, monkeypatch):
    iters = []
    real_iter = torch.utils.data.DataLoader.__iter__

    def counted(self):
        iters.append(self.num_workers)
        return real_iter(self)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", counted)
    weights = []
    for workers in (0, 1, 2):
        cfg = copy.deepcopy(tiny_config)
        cfg.train.epochs = 2
        cfg.data.num_workers = workers
        cfg.name = f"w{workers}"
        train(cfg)
        weights.append(load_checkpoint(Path(cfg.train.out_dir) / cfg.name / "last.pt")["model"])
    for other in weights[1:]:
        for k in weights[0]:
            assert torch.equal(weights[0][k], other[k]), k
    # Per run: 2 epochs × (train + val) loaders, each iterated once (workers start once).
    assert iters == [0] * 4 + [1] * 4 + [2] * 4


# ---------------------------------------------------------------- 5. channels
def _png_set(root: Path, name: str, modes: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, mode in enumerate(modes):
        shape = (64, 64) if mode == "L" else (64, 64, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / f"{i}.png")
        rows.append(f"{i}.png,{i % 4}")
    path = root / f"{name}.csv"
    path.write_text("path,label\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("kind", ["csv", "lazy_csv"])
def test_channel_mismatches_are_found_before_training(tiny_config, tmp_path, kind, monkeypatch):
    cfg = copy.deepcopy(tiny_config)
    cfg.data.kind = kind
    monkeypatch.setattr(loop, "create_method", lambda *a: pytest.fail("started training"))
    cfg.data.val_csv = str(_png_set(tmp_path / "rgb", "val", ["RGB"] * 3))
    with pytest.raises(DataError, match=r"3 of the 3 images listed in .*val.csv.*data.in_chans = 1"):
        train(copy.deepcopy(cfg))
    cfg.data.val_csv = tiny_config.data.val_csv
    cfg.data.train_csv = str(_png_set(tmp_path / "mixed", "train", ["L"] * 8 + ["RGB"] + ["L"]))
    with pytest.raises(DataError, match=r"1 of the 10 images .*8.png \(3 channels\)"):
        train(copy.deepcopy(cfg))


def test_lazy_images_must_be_8_bit(tiny_config, tmp_path):
    root = tmp_path / "deep"
    root.mkdir()
    Image.fromarray(np.zeros((64, 64), dtype=np.uint16)).save(root / "a.png")  # I;16
    (root / "train.csv").write_text("path,label\na.png,1\n")
    cfg = copy.deepcopy(tiny_config)
    cfg.data.kind, cfg.data.train_csv = "lazy_csv", str(root / "train.csv")
    with pytest.raises(DataError, match=r"a.png \(uint16\).*uint8"):
        train(cfg)


def test_eval_of_rgb_data_on_a_grayscale_checkpoint_names_both(tiny_config, tmp_path, capsys):
    cfg = _one_epoch(tiny_config)
    train(copy.deepcopy(cfg))
    ckpt = Path(cfg.train.out_dir) / cfg.name / "best.pt"
    rgb = _png_set(tmp_path / "rgb", "val", ["RGB"] * 2)
    code, _, err = _run(capsys, "eval", "--checkpoint", str(ckpt), "--data", str(rgb), "--quiet")
    assert code == 2 and "Traceback" not in err
    assert "0.png (3 channels)" in err and "trained for 4 classes" in err and "1-channel" in err
    rgb_image = tmp_path / "rgb" / "0.png"
    code, _, err = _run(capsys, "predict", str(rgb_image), "--checkpoint", str(ckpt))
    assert code == 2 and "0.png has 3 channel(s)" in err and "1-channel" in err


# ---------------------------------------------------------------- 6. worker errors
def test_errors_in_workers_read_as_without_workers(tiny_config, tmp_path):
    root = tmp_path / "trunc"
    src = Path(tiny_config.data.train_csv).parent / "train"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.png").write_bytes((src / f"00000{i}.png").read_bytes())
    data = (root / "3.png").read_bytes()
    (root / "3.png").write_bytes(data[: len(data) // 2])  # a valid header, truncated pixels
    (root / "train.csv").write_text("path,label\n" + "".join(f"{i}.png,{i}\n" for i in range(4)))
    messages = []
    for workers in (0, 1):
        cfg = copy.deepcopy(tiny_config)
        cfg.data.train_csv, cfg.data.num_workers = str(root / "train.csv"), workers
        cfg.name = f"trunc{workers}"
        with pytest.raises(DataError) as info:
            train(cfg)
        messages.append(str(info.value))
    assert "3.png" in messages[0] and "Original Traceback" not in messages[1]
    assert messages[0] == messages[1]


def test_unwrap_keeps_unwrapped_errors_and_multiline_messages():
    plain = DataError("one line")
    assert unwrap_worker_error(plain) is plain
    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback "
                        "(most recent call last):\n  File \"x.py\", line 1\n"
                        "gigapatch.core.errors.DataError: first\nsecond\n")
    clean = unwrap_worker_error(wrapped)
    assert type(clean) is DataError and str(clean) == "first\nsecond"


# ---------------------------------------------------------------- 7. smaller ones
def test_negative_workers_are_refused(tiny_config):
    cfg = copy.deepcopy(tiny_config)
    cfg.data.num_workers = -1
    with pytest.raises(ConfigError, match="data.num_workers = -1"):
        cfg.validate()


def test_a_checkpoint_whose_weights_disagree_with_its_config_is_named(tiny_config, tmp_path,
                                                                      capsys):
    cfg = _one_epoch(tiny_config)
    train(copy.deepcopy(cfg))
    state = load_checkpoint(Path(cfg.train.out_dir) / cfg.name / "best.pt")
    state["config"]["model"]["latent_dim"] = 24  # the config claims another model
    save_checkpoint(state, tmp_path / "edited.pt")
    with pytest.raises(DataError, match=r"edited.pt: the weights do not fit .*latent_dim 24.*"
                                        r"of another shape \(encoder\."):
        load_method(tmp_path / "edited.pt")
    code, _, err = _run(capsys, "eval", "--checkpoint", str(tmp_path / "edited.pt"), "--quiet")
    assert code == 2 and "Traceback" not in err and "load_state_dict" not in err


def test_eval_of_out_of_range_labels_says_what_the_checkpoint_knows(tiny_config, tmp_path,
                                                                    capsys):
    cfg = _one_epoch(tiny_config)
    train(copy.deepcopy(cfg))
    ckpt = Path(cfg.train.out_dir) / cfg.name / "best.pt"
    src = Path(cfg.data.val_csv).parent / "test" / "000000.png"
    bad = tmp_path / "bad.csv"
    bad.write_text(f"path,label\n{src},7\n")
    code, _, err = _run(capsys, "eval", "--checkpoint", str(ckpt), "--data", str(bad), "--quiet")
    assert code == 2 and "label 7 is out of range" in err
    assert "trained for 4 classes (labels 0..3)" in err and "pass a larger" not in err


def test_run_files_get_the_usual_permissions(tiny_config, tmp_path):
    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "x.json", {"a": 1})
        cfg = _one_epoch(tiny_config)
        train(copy.deepcopy(cfg))
    finally:
        os.umask(umask)
    run = Path(cfg.train.out_dir) / cfg.name
    for path in [tmp_path / "x.json", *run.iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_time_lost_to_a_crash_is_not_training_time(tiny_config, monkeypatch):
    cfg = copy.deepcopy(tiny_config)
    cfg.train.epochs = 2
    calls = []
    real_evaluate = loop.evaluate
    clock = [0.0]

    def slow_then_crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            clock[0] += 1000.0  # 1000 s of epoch 2 are lost to the crash
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    real_perf = loop.time.perf_counter
    monkeypatch.setattr(loop.time, "perf_counter", lambda: real_perf() + clock[0])
    monkeypatch.setattr(loop, "evaluate", slow_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(copy.deepcopy(cfg))
    monkeypatch.setattr(loop, "evaluate", real_evaluate)
    summary = train(copy.deepcopy(cfg), resume=True)
    assert summary["train_seconds"] < 100
    assert summary["images_per_second"] > 24 / 100  # 2 epochs × 12 images


def test_the_python_api_writes_info_lines_to_train_log(tiny_config, caplog):
    logger = logging.getLogger("gigapatch")
    old = logger.level
    logger.setLevel(logging.NOTSET)  # as in a fresh interpreter: root at WARNING
    root_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.WARNING)
    try:
        cfg = _one_epoch(tiny_config)
        with caplog.at_level(logging.WARNING):
            train(copy.deepcopy(cfg))
        log_text = (Path(cfg.train.out_dir) / cfg.name / "train.log").read_text()
        assert "INFO" in log_text and "epoch 1/1" in log_text
        assert not [r for r in caplog.records if r.levelno < logging.WARNING]  # caller unchanged
        assert logger.level == logging.NOTSET and logger.propagate
    finally:
        logger.setLevel(old)
        logging.getLogger().setLevel(root_level)
