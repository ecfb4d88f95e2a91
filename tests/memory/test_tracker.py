"""Tests for gigapatch.memory: byte parsing/formatting, the tensor tracker, step peaks."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from gigapatch.core.errors import ConfigError
from gigapatch.core.units import format_bytes, parse_bytes
from gigapatch.core.hostmaps import host_maps
from gigapatch.memory.tracker import (
    HOST_MAPS,
    TensorMemoryTracker,
    measure_step_peak,
    persistent_bytes,
)

MB4 = 1000 * 1000 * 4  # bytes of a (1000, 1000) float32 tensor


# --------------------------------------------------------------------------- parse / format


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GiB", 2 * 1024**3),
        ("512MiB", 512 * 1024**2),
        ("1.5 GB", 1_500_000_000),
        ("300kB", 300_000),
        ("1024", 1024),
        (1024, 1024),
        (2048.0, 2048),
        ("0", 0),
        ("1TiB", 1024**4),
        ("2 tb", 2 * 1000**4),
        ("3gib", 3 * 1024**3),
        ("3GIB", 3 * 1024**3),
        ("7 KB", 7000),
        ("10 B", 10),
        (" 0.5KiB ", 512),
        ("1e3", 1000),
    ],
)
def test_parse_bytes(text: str | int | float, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    "text", ["", "abc", "2 GiBs", "-1", "-5MB", -3, "1.2.3GB", "2G", "5 M", "GB", True, None, float("nan")]
)
def test_parse_bytes_rejects_bad_input(text: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_bytes(text)  # type: ignore[arg-type]
    message = str(info.value)
    assert repr(text) in message
    assert "GiB" in message and "Valid examples" in message


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (12 * 1024**2, "12.0 MiB"),
        (3 * 1024**3 // 2, "1.50 GiB"),
        (500 * 1024**2, "500 MiB"),
        (1024**2 - 1, "1.00 MiB"),  # would round to "1024 KiB"
        (10 * 1024 - 1, "10.0 KiB"),  # not "10.00 KiB"
        (-2048, "-2.00 KiB"),
    ],
)
def test_format_bytes(n: int, expected: str) -> None:
    assert format_bytes(n) == expected


@pytest.mark.parametrize("n", [0, 1, 999, 1024, 5_000, 123_456, 12 * 1024**2 + 7, 3 * 10**9, 2**43])
def test_format_parse_round_trip(n: int) -> None:
    back = parse_bytes(format_bytes(n))
    assert abs(back - n) <= 0.005 * n  # three significant digits


# --------------------------------------------------------------------------- tracker basics


def test_tracker_hand_computed_peak() -> None:
    with TensorMemoryTracker() as tracker:
        a = torch.ones(1000, 1000)
        assert tracker.current == MB4
        b = torch.ones(1000, 1000)
        assert tracker.current == 2 * MB4
        del a
        assert tracker.current == MB4
        c = torch.ones(1000, 1000)
        assert tracker.current == 2 * MB4
    assert tracker.peak == 2 * MB4
    assert tracker.peak_by_device == {"cpu": 2 * MB4}
    del b, c
    assert tracker.current == 0  # frees after the mode exits are still seen
    assert tracker.peak == 2 * MB4


def test_host_maps_are_counted_apart_from_device_memory() -> None:
    with TensorMemoryTracker() as tracker:
        with host_maps():
            z = torch.zeros(1000, 1000)  # a host-resident map: host memory on CUDA too
        a = torch.ones(1000, 1000)
        z += a  # writing into the map allocates nothing
        del a
        b = torch.ones(1000, 1000)
    assert tracker.peak == 2 * MB4 and tracker.device_peak == MB4
    assert tracker.peak_by_device == {HOST_MAPS: MB4, "cpu": MB4}
    del z, b
    assert tracker.current == 0


def test_views_and_inplace_ops_are_not_counted_twice() -> None:
    with TensorMemoryTracker() as tracker:
        x = torch.zeros(1000, 1000)
        views = [x.view(-1), x[::2], x.t(), x.reshape(1000, 1000), x.detach(), x[0]]
        x.add_(1)
        x.relu_()
        x.mul_(2).clamp_(max=3)
        x[::2].zero_()
        torch.add(x, 1, out=x)
        assert tracker.current == MB4
        del views
        y = x + 1  # a real new allocation is still seen
        assert tracker.current == 2 * MB4
    del x, y
    assert tracker.current == 0
    assert tracker.peak == 2 * MB4


def test_views_of_tensors_created_before_the_mode_cost_nothing() -> None:
    w = torch.randn(500, 500)
    with TensorMemoryTracker() as tracker:
        wt = w.t()
        w.mul_(2)
        flat = w.view(-1)
    assert (tracker.current, tracker.peak) == (0, 0)
    del wt, flat


def test_out_argument_growing_a_tracked_storage_is_counted() -> None:
    a = torch.ones(1000, 1000)
    with TensorMemoryTracker() as tracker:
        out = torch.empty(0)
        assert tracker.current == 0
        torch.add(a, a, out=out)  # resizes the empty storage in place
        assert tracker.current == MB4
    del out
    assert tracker.current == 0


def test_zero_size_and_meta_tensors_are_harmless() -> None:
    with TensorMemoryTracker() as tracker:
        empty = torch.empty(0, 7)
        meta = torch.empty(1000, 1000, device="meta")
        meta2 = meta * 2
    assert tracker.peak == 0
    del empty, meta, meta2


def test_external_bytes_and_adopt() -> None:
    tracker = TensorMemoryTracker(external_bytes=100)
    assert (tracker.current, tracker.peak) == (100, 100)
    w = torch.zeros(1000, 1000)
    assert tracker.adopt([w, w.t(), w[0]]) == MB4  # one shared storage, counted once
    assert tracker.current == 100 + MB4
    del w
    gc.collect()
    assert tracker.current == 100
    assert tracker.peak == 100 + MB4
    tracker.reset_peak()
    assert tracker.peak == 100


# --------------------------------------------------------------------------- autograd


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))


def test_backward_ops_are_captured_on_cpu() -> None:
    model = _mlp()
    x = torch.randn(128, 64)
    with TensorMemoryTracker() as forward_only:
        model(x).sum()
    with TensorMemoryTracker() as tracker:
        loss = model(x).sum()
        after_forward = tracker.current
        loss.backward()
    del loss
    gc.collect()
    grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters())
    assert grads == 4 * sum(p.numel() for p in model.parameters())
    # Gradients are allocated by backward ops: only the tracker seeing backward counts them.
    assert tracker.current == grads
    assert tracker.peak > forward_only.peak
    assert tracker.peak >= after_forward + 128 * 256 * 4  # a backward activation-sized grad


# --------------------------------------------------------------------------- measure_step_peak


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    )


def test_conv_step_peak_grows_with_input_area() -> None:
    model = _convnet()
    param_bytes = persistent_bytes(model)

    def activation_peak(side: int) -> int:
        x = torch.randn(2, 3, side, side)

        def step() -> None:
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()

        peak = measure_step_peak(step, model=model)
        return peak - 2 * param_bytes  # minus parameters and their gradients

    small, large = activation_peak(64), activation_peak(128)
    assert small > 10 * param_bytes  # activations dominate
    assert 3 * small <= large <= 5 * small


def test_measure_step_peak_counts_parameters_and_adamw_state() -> None:
    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(16, 64)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    first = measure_step_peak(step, model=model, optimizer=optimizer)
    assert first >= 3 * params  # params + grads + exp_avg/exp_avg_sq created during the step
    assert persistent_bytes(model, optimizer) >= 4 * params  # + grads left by the step
    second = measure_step_peak(step, model=model, optimizer=optimizer)
    assert second >= 4 * params  # params, exp_avg, exp_avg_sq and the new grads coexist
    # Same peak whether the state pre-exists or is created in the step: zero_grad frees last
    # step's grads before backward makes new ones, so they are not counted twice.
    assert abs(second - first) < 0.01 * params


def test_persistent_bytes_is_exact_and_dedupes_shared_storages() -> None:
    model = nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 100, bias=False), nn.BatchNorm1d(100))
    model[1].weight = model[0].weight  # tied weights: one storage
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.arange(10)).sum().backward()
    optimizer.step()
    weights = 100 * 8 * 4
    bn = 100 * 4 * 2 + 100 * 4 * 2 + 8  # weight/bias, running mean/var, num_batches_tracked
    params = weights + 100 * 4 * 2
    adam = 2 * params + 3 * 4  # exp_avg, exp_avg_sq, one float32 step per parameter
    assert persistent_bytes(model, optimizer) == weights + bn + params + adam
    # A step that allocates nothing has exactly the persistent state as its peak.
    assert measure_step_peak(lambda: None, model=model, optimizer=optimizer) == persistent_bytes(
        model, optimizer
    )


def test_freed_persistent_state_stops_counting() -> None:
    model = nn.Linear(1000, 1000, bias=False)
    model.weight.grad = torch.ones_like(model.weight)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model.weight.grad = torch.zeros_like(model.weight)

    assert measure_step_peak(step, model=model) == 2 * MB4  # not 3: the old grad was freed


def test_measure_step_peak_uses_allocator_stats_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 12345)
    peak = measure_step_peak(lambda: calls.append("step"), device="cuda:0")
    assert peak == 12345 and isinstance(peak, int)
    assert calls.index("reset") < calls.index("step") < len(calls) - 1 and calls[-1] == "sync"


def test_measure_step_peak_rejects_bad_device() -> None:
    with pytest.raises(ConfigError, match="not-a-device"):
        measure_step_peak(lambda: None, device="not-a-device")
