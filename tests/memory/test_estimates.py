"""Tests for gigapatch.memory.estimates: fake-tensor estimates of a training step's peak memory."""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import pytest
import torch

from gigapatch.memory.budget import measure_method_peak
from gigapatch.config import Config
from gigapatch.core.errors import ConfigError
from gigapatch.memory.estimates import (
    estimate_step,
    estimate_step_peak,
    estimate_table,
    fraction_for_k,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Real reference steps on one thread: steadier on a busy machine, and fake mode needs none."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(
    encoder: str = "tiny_cnn", method: str = "patchgd", batch: int = 2, **method_kw
) -> Config:
    cfg = Config()
    cfg.model.encoder = encoder
    cfg.data.in_chans = 1 if encoder == "tiny_cnn" else 3
    cfg.data.num_classes = 4
    cfg.model.latent_dim = 16
    cfg.model.head_width = 16
    cfg.method.name = method
    cfg.method.patch_size = 32
    cfg.method.sample_fraction = 0.25
    cfg.method.fill_chunk = 8
    cfg.train.batch_size = batch
    for key, value in method_kw.items():
        setattr(cfg.method, key, value)
    return cfg


def _peak_rss() -> int | None:
    """Peak resident set size of this process so far (Linux), in bytes."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


@pytest.mark.parametrize(
    ("cfg", "shape"),
    [
        pytest.param(_cfg(method="full"), (1, 64, 64), id="tiny-full"),
        # padded 4×4 grid (100×90 is not a multiple of the stride), overlap, B = 3, J = 5,
        # fill chunks spanning images, one optimizer step per inner step
        pytest.param(
            _cfg(batch=3, global_context="concat", stride=24, sample_fraction=0.2, fill_chunk=7,
                 accumulate=False),
            (1, 100, 90),
            id="tiny-patchgd-concat-padded",
        ),
        pytest.param(_cfg("resnet18", "full"), (3, 64, 64), id="resnet18-full"),
        pytest.param(_cfg("resnet18", global_context="concat", sample_fraction=0.5), (3, 64, 64),
                     id="resnet18-patchgd-concat"),
    ],
)
def test_estimate_agrees_with_measurement(cfg: Config, shape: tuple[int, int, int]) -> None:
    measured = measure_method_peak(cfg, shape)
    estimated = estimate_step_peak(cfg, shape)
    assert estimated == pytest.approx(measured, rel=0.10), (measured, estimated)


def test_shortcuts_do_not_change_the_peak() -> None:
    # N = 16 cells, k = 3, J = 6 inner steps, 2·16/6 = 6 fill chunks (the last one smaller):
    # the fast estimate runs 3 of each, the exact estimate and the measurement all of them.
    cfg = _cfg(sample_fraction=1 / 6, fill_chunk=6)
    fast = estimate_step(cfg, (1, 128, 128))
    exact = estimate_step(cfg, (1, 128, 128), exact=True)
    assert fast.peak == exact.peak == measure_method_peak(cfg, (1, 128, 128))
    assert fast.persistent == exact.persistent


def test_huge_images_are_estimated_quickly_without_allocating() -> None:
    full = _cfg("resnet18", "full", batch=1)
    patchgd = _cfg("resnet18", batch=1, patch_size=256, fill_chunk=16)
    patchgd.method.sample_fraction = fraction_for_k(16384, 256, k=4)
    estimate_step(_cfg(), (1, 64, 64))  # pay fake mode's one-off set-up before timing
    rss_before = _peak_rss()

    start = time.perf_counter()
    full_est = estimate_step(full, (3, 8192, 8192))  # real: ~50 GiB of activations
    patch_est = estimate_step(patchgd, (3, 16384, 16384))  # input alone: 768 MiB
    seconds = time.perf_counter() - start

    assert full_est.input_bytes == 3 * 8192**2
    assert full_est.peak > 20 * 2**30
    assert patch_est.peak < 1.5 * 2**30
    assert full_est.peak > 20 * patch_est.peak
    assert seconds < 60, seconds  # a few seconds on an idle machine
    if rss_before is not None:
        assert _peak_rss() - rss_before < 512 * 2**20


def test_full_image_memory_grows_linearly_with_pixels() -> None:
    rows = estimate_table(_cfg(), [128, 256, 512], ["full"])
    assert [r["side"] for r in rows] == [128, 256, 512]
    act = [r["estimated_bytes"] - r["persistent_bytes"] for r in rows]
    assert act[1] / act[0] == pytest.approx(4, rel=0.1)
    assert act[2] / act[1] == pytest.approx(4, rel=0.1)


def test_table_keeps_k_fixed_and_patchgd_flat() -> None:
    cfg = _cfg(batch=1, patch_size=32, fill_chunk=4)
    rows = estimate_table(cfg, [128, 512], ["patchgd"], patches_per_step=4)
    assert [(r["method"], r["side"]) for r in rows] == [("patchgd", 128), ("patchgd", 512)]
    assert set(rows[0]) == {
        "method", "side", "estimated_bytes", "persistent_bytes", "input_bytes", "seconds"
    }
    small, big = rows[0]["estimated_bytes"], rows[1]["estimated_bytes"]
    assert big < 1.3 * small, (small, big)  # 16× the pixels, same k = 4
    with pytest.raises(ConfigError):
        estimate_table(cfg, [128], ["patchgd+sum"])


def test_cuda_estimate_needs_no_gpu_and_skips_host_tensors() -> None:
    cfg = _cfg(batch=1, global_context="concat", patch_size=64, sample_fraction=4 / 256)
    cpu = estimate_step(cfg, (1, 1024, 1024), "cpu")
    cuda = estimate_step(cfg, (1, 1024, 1024), "cuda")
    # The global patch is resized on the host in uint8: no float copy of the whole image
    # (1024² × 4 B = 4 MiB) appears on either side. The small host patch copies count on the
    # CPU only, the 512-byte block rounding on CUDA only: the two nearly agree.
    assert cpu.peak < 1024**2 * 4
    assert cuda.peak == pytest.approx(cpu.peak, rel=0.05)
    assert cuda.persistent >= cpu.persistent  # 512-byte allocator blocks
    full = _cfg(method="full")
    assert estimate_step_peak(full, (1, 256, 256), "cuda") == pytest.approx(
        estimate_step_peak(full, (1, 256, 256), "cpu"), rel=0.05
    )


def test_estimate_does_not_touch_the_config_or_rng() -> None:
    cfg = _cfg()
    before = copy.deepcopy(cfg)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    estimate_step(cfg, (1, 128, 128))
    assert torch.equal(torch.rand(3), expected)
    assert cfg == before
    assert "range" not in vars(sys.modules["gigapatch.methods.patchgd"])


@pytest.mark.parametrize("device", ["mps", "not-a-device"])
def test_bad_device_is_a_config_error(device: str) -> None:
    with pytest.raises(ConfigError):
        estimate_step(_cfg(), (1, 64, 64), device)
