"""Two CPU processes (torchrun, gloo) train like one process with twice the batch."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gigapatch.engine.checkpoint import load_checkpoint
from gigapatch.engine.loop import train

WORKER = Path(__file__).with_name("ddp_worker.py")


def _torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _worker():
    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "weights.pt"
    _torchrun(str(WORKER), str(out))
    return torch.load(out)


@pytest.mark.parametrize("method", ["full", "patchgd", "ips"])
def test_two_processes_equal_one_with_twice_the_batch(two_processes, method):
    reference = _worker().train_steps(method)  # one process, the whole batch
    got = two_processes[method]
    for key, value in reference.items():
        if key != "syncs":
            torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-9, msg=key)


def test_patchgd_synchronises_once_per_update(two_processes):
    # J = 4 backward passes per update, all but the last under no_sync: one all-reduce per
    # update for this small model (a single gradient bucket), as for full-image training.
    steps = _worker().STEPS
    assert int(two_processes["patchgd"]["syncs"]) == steps
    assert int(two_processes["full"]["syncs"]) == steps


def test_z_cache_figures_count_the_fills_of_every_process(two_processes):
    # Each rank caches and re-encodes its own images; the history's staleness is the mean
    # change over both ranks' cells, as one process with the whole batch measures it.
    reference = _worker().cache_stats()
    got = two_processes["cache_stats"]
    assert reference["z_refreshed"] == 1.0 and reference["z_staleness"] > 0
    assert got == pytest.approx(reference, rel=1e-6)


def _config_file(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def test_torchrun_trains_resumes_and_matches_one_process(tiny_config, tmp_path):
    cfg = tiny_config
    cfg.method.name = "full"
    cfg.train.batch_size = 2  # per process: 2 × 2 images per step
    cfg.train.optimizer = "sgd"
    cfg.train.schedule = "constant"  # so that a 1-epoch run is the first epoch of a 2-epoch one
    cfg.train.measure_memory = False
    cfg.name = "ddp"
    _torchrun("-m", "gigapatch", "train", "--config", str(_config_file(cfg, tmp_path / "c.yaml")))
    run = Path(cfg.train.out_dir) / "ddp"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 2

    # Stopped after epoch 1, resumed under torchrun: the same weights as without a stop.
    cfg.name, cfg.train.epochs = "ddp_resumed", 1
    _torchrun("-m", "gigapatch", "train", "--config", str(_config_file(cfg, tmp_path / "r.yaml")))
    cfg.train.epochs = 2
    _torchrun("-m", "gigapatch", "train", "--config", str(_config_file(cfg, tmp_path / "r.yaml")),
              "--resume")
    whole = load_checkpoint(run / "last.pt")["model"]
    resumed = load_checkpoint(Path(cfg.train.out_dir) / "ddp_resumed" / "last.pt")["model"]
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key

    # One process with twice the batch: the same data per step, the same weights (float32).
    cfg.name, cfg.train.batch_size = "single", 4
    train(cfg)
    single = load_checkpoint(Path(cfg.train.out_dir) / "single" / "last.pt")["model"]
    for key in whole:
        torch.testing.assert_close(whole[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
