"""The step context: precision, clipping, loss scaling refusal; activation checkpointing."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from gigapatch.config import Config
from gigapatch.core.errors import ConfigError
from gigapatch.engine.loop import train
from gigapatch.memory import estimate
from gigapatch.memory.budget import measure_method_peak
from gigapatch.methods import create_method
from gigapatch.models.encoders import checkpoint_stages
from gigapatch.step import StepContext


def test_bf16_trains_on_cpu_with_less_memory_than_float32(tiny_config):
    peaks = {}
    for precision in ("32", "bf16"):
        cfg = copy.deepcopy(tiny_config)
        cfg.name, cfg.train.precision, cfg.train.epochs = f"p{precision}", precision, 1
        summary = train(cfg)
        metrics = (Path(cfg.train.out_dir) / cfg.name / "metrics.csv").read_text()
        assert "nan" not in metrics.lower() and summary["precision"] == precision
        peaks[precision] = summary["peak_memory_bytes"]
    assert peaks["bf16"] < peaks["32"], peaks


def test_patchgd_keeps_z_in_the_compute_dtype(tiny_config):
    method = create_method(tiny_config)
    images = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    grid = method.grid(images)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = method.fill(images, grid)
    assert z.dtype == torch.bfloat16
    with torch.no_grad():
        assert method.fill(images, grid).dtype == torch.float32


def test_gradients_are_clipped_before_the_step():
    net = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    seen = []
    opt.step = lambda: seen.append(math.sqrt(sum(float(p.grad.pow(2).sum())
                                                 for p in net.parameters())))
    ctx = StepContext(net, opt, grad_clip=0.5)
    ctx.backward(net(torch.full((3, 4), 100.0)).sum())
    ctx.step()
    assert seen[0] == pytest.approx(0.5, rel=1e-5)
    assert all(p.grad is None for p in net.parameters())  # cleared after the step


def test_float16_needs_cuda_and_says_what_to_use():
    net = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="bf16"):
        StepContext(net, torch.optim.SGD(net.parameters(), lr=0.1), precision="16-mixed")


def _resnet_cfg(checkpointing: bool) -> Config:
    cfg = Config()
    cfg.data.num_classes, cfg.data.in_chans = 3, 3
    cfg.model.encoder, cfg.model.latent_dim, cfg.model.head_width = "resnet18_layer2", 8, 8
    cfg.model.checkpoint_activations = checkpointing
    cfg.method.patch_size, cfg.method.sample_fraction, cfg.method.fill_chunk = 96, 0.5, 1
    cfg.train.batch_size = 1
    return cfg.validate()


def test_activation_checkpointing_lowers_the_peak_and_the_estimate_follows():
    shape = (3, 192, 192)  # 4 patches of 96 px, k = 2
    plain = measure_method_peak(_resnet_cfg(False), shape)
    ckpt = measure_method_peak(_resnet_cfg(True), shape)
    assert ckpt < plain
    assert estimate(_resnet_cfg(True), shape) == ckpt  # CPU estimate = measured peak


def test_checkpointed_encoder_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = _resnet_cfg(False)
    a = create_method(cfg).double()
    b = copy.deepcopy(a)
    checkpoint_stages(b.encoder)
    x = torch.rand(2, 3, 48, 48, dtype=torch.float64)
    for m in (a, b):
        m.encoder(x).sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, msg=name)
