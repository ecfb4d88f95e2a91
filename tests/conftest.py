"""Shared fixtures: a tiny UltraMNIST set generated once per test session."""

from __future__ import annotations

import pytest
import torch

from gigapatch.config import Config
from gigapatch.synth.ultramnist import generate_ultramnist


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_ultramnist(tmp_path_factory):
    """12 train / 6 test images of 64×64 px with 1–2 small digits each."""
    out = tmp_path_factory.mktemp("ultramnist")
    generate_ultramnist(
        out, n_train=12, n_test=6, side=64, digits_per_image=(1, 2),
        scale_range=(0.5, 1.0), num_classes=4, seed=0, progress=False,
    )
    return out


@pytest.fixture
def tiny_config(tiny_ultramnist, tmp_path) -> Config:
    """A fast PatchGD config over :func:`tiny_ultramnist`, writing runs to ``tmp_path``."""
    cfg = Config(name="tiny", seed=3)
    cfg.data.train_csv = str(tiny_ultramnist / "train.csv")
    cfg.data.val_csv = str(tiny_ultramnist / "test.csv")
    cfg.data.num_classes = 4
    cfg.model.latent_dim = 16
    cfg.model.head_width = 16
    cfg.method.patch_size = 16
    cfg.method.sample_fraction = 0.25
    cfg.method.fill_chunk = 8
    cfg.train.batch_size = 4
    cfg.train.epochs = 2
    cfg.train.lr = 3e-3
    cfg.train.warmup_epochs = 0
    cfg.train.out_dir = str(tmp_path / "runs")
    cfg.train.progress = False
    return cfg


class NoStepContext:
    """A step context that runs backward but never steps: gradients stay for comparison."""

    def autocast(self):
        return torch.autocast("cpu", enabled=False)

    def run(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    def no_sync(self):
        return __import__("contextlib").nullcontext()

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass

    def zero_grad(self):
        pass


@pytest.fixture
def no_step() -> NoStepContext:
    """:class:`NoStepContext`: backward without optimizer steps."""
    return NoStepContext()


@pytest.fixture
def detection_config():
    """The builder :func:`_detection_config`."""
    return _detection_config


def _detection_config(data, runs, method: str, name: str = "det") -> Config:
    """A CPU detection run over the COCO JSONs of ``gigapatch data detection`` in ``data``."""
    cfg = Config(name=name)
    cfg.task.kind = "detect"
    cfg.data.kind = "lazy_csv"
    cfg.data.train_csv, cfg.data.val_csv = str(data / "train.json"), str(data / "test.json")
    cfg.data.num_classes, cfg.data.in_chans = 10, 1
    cfg.model.encoder, cfg.method.name = "fcos_tiny", method
    cfg.train.epochs, cfg.train.batch_size, cfg.train.progress = 1, 2, False
    cfg.train.out_dir = str(runs)
    return cfg
