import copy

import torch

import pytest

from gigapatch.memory import budget as budget_module
from gigapatch.memory.budget import fit_to_budget, measure_method_peak, measure_method_peaks
from gigapatch.config import Config
from gigapatch.core.errors import ConfigError


def _full_cfg() -> Config:
    cfg = Config()
    cfg.method.name = "full"
    cfg.data.num_classes = 4
    cfg.train.batch_size = 2
    return cfg


def test_full_gets_the_largest_side_that_fits():
    cfg = _full_cfg()
    shape = (1, 128, 128)
    at48 = copy.deepcopy(cfg)
    at48.method.downsample_to = 48
    budget = measure_method_peak(at48, shape) + 1000  # 48 fits, 52 does not
    fit_to_budget(cfg, shape, budget, "cpu")
    assert cfg.method.downsample_to == 48
    assert measure_method_peak(cfg, shape) <= budget
    bigger = copy.deepcopy(cfg)
    bigger.method.downsample_to = 52
    assert measure_method_peak(bigger, shape) > budget


def test_full_never_prices_sides_far_above_the_one_that_fits(monkeypatch):
    """Sides are priced doubling from the smallest, then bisected: a budget that fits 48 px
    of a 1,024² image never prices full resolution or anything above 2 × 48 + 4 px."""
    cfg = _full_cfg()
    shape = (1, 1024, 1024)
    at48 = copy.deepcopy(cfg)
    at48.method.downsample_to = 48
    budget = measure_method_peak(at48, (1, 128, 128)) + 1000
    priced = []
    real = budget_module._Pricer._price

    def spy(self, settings):
        priced.append(settings["downsample_to"])
        return real(self, settings)

    monkeypatch.setattr(budget_module._Pricer, "_price", spy)
    fit_to_budget(cfg, shape, budget, "cpu")
    assert cfg.method.downsample_to == 48
    assert None not in priced and max(priced) <= 2 * 48 + 4, priced


def test_full_resolution_kept_when_it_fits():
    cfg = _full_cfg()
    fit_to_budget(cfg, (1, 64, 64), 2**30, "cpu")
    assert cfg.method.downsample_to is None


def test_too_small_budgets_are_refused_with_advice():
    with pytest.raises(ConfigError, match="even downsampled to 16 px"):
        fit_to_budget(_full_cfg(), (1, 128, 128), 1000, "cpu")
    pgd = Config()
    pgd.method.patch_size = 32
    with pytest.raises(ConfigError, match="even with k=1"):
        fit_to_budget(pgd, (1, 128, 128), 1000, "cpu")


def _pgd_cfg(sample_fraction: float = 0.5, fill_chunk: int = 64) -> Config:
    cfg = Config()
    cfg.data.num_classes = 4
    cfg.model.latent_dim = 16
    cfg.model.head_width = 16
    cfg.method.patch_size = 16
    cfg.method.sample_fraction = sample_fraction  # k = 32 of 64 patches on 128²
    cfg.method.fill_chunk = fill_chunk
    cfg.train.batch_size = 2
    return cfg


def _with(cfg: Config, **method) -> Config:
    trial = copy.deepcopy(cfg)
    for key, value in method.items():
        setattr(trial.method, key, value)
    return trial


def test_patchgd_gets_the_most_patches_per_step_that_fit(caplog):
    shape = (1, 128, 128)
    cfg = _pgd_cfg()
    # A budget between k = 12 and k = 13 (fill chunk 1): fitting must land on k = 12.
    budget = measure_method_peak(_with(cfg, sample_fraction=12 / 64, fill_chunk=1), shape) + 64
    assert measure_method_peak(_with(cfg, sample_fraction=13 / 64, fill_chunk=1), shape) > budget
    with caplog.at_level("INFO", logger="gigapatch"):
        fit_to_budget(cfg, shape, budget, "cpu")
    assert round(cfg.method.sample_fraction * 64) == 12
    assert 1 <= cfg.method.fill_chunk <= 64
    assert measure_method_peak(cfg, shape) <= budget  # the chosen setting, measured for real
    if cfg.method.fill_chunk < 64:  # and the fill chunk is the largest that fits
        assert measure_method_peak(_with(cfg, fill_chunk=cfg.method.fill_chunk + 1), shape) > budget
    assert "k=12 patches per inner step (configured 32" in caplog.text
    assert "k=13 needs" in caplog.text


def test_patchgd_fill_chunk_is_lowered_when_k_fits():
    shape = (1, 128, 128)
    cfg = _pgd_cfg(sample_fraction=2 / 64, fill_chunk=64)
    small_chunk = measure_method_peak(_with(cfg, fill_chunk=4), shape)
    big_chunk = measure_method_peak(cfg, shape)
    assert big_chunk > small_chunk  # the fill chunk matters at this size
    fit_to_budget(cfg, shape, small_chunk, "cpu")
    assert round(cfg.method.sample_fraction * 64) == 2  # k kept
    assert 4 <= cfg.method.fill_chunk < 64
    assert measure_method_peak(cfg, shape) <= small_chunk


def test_patchgd_kept_as_configured_when_it_fits():
    cfg = _pgd_cfg()
    fit_to_budget(cfg, (1, 128, 128), 2**30, "cpu")
    assert (cfg.method.sample_fraction, cfg.method.fill_chunk) == (0.5, 64)


def test_patchgd_refusal_says_what_the_smallest_setting_needs():
    cfg = _pgd_cfg()
    with pytest.raises(ConfigError, match=r"even with k=1 .*fill_chunk 1: that needs .*"
                       r"Raise train.memory_budget to at least"):
        fit_to_budget(cfg, (1, 128, 128), 10_000, "cpu")


def test_fitting_falls_back_to_measuring_when_estimates_fail(monkeypatch):
    from gigapatch.memory import estimates

    def refuse(self, *args, **kwargs):
        raise estimates.EstimateError("no meta kernel")

    shape = (1, 64, 64)  # 16 patches, configured k = 8
    cfg = _pgd_cfg(fill_chunk=4)
    budget = measure_method_peak(_with(cfg, sample_fraction=3 / 16, fill_chunk=1), shape) + 64
    monkeypatch.setattr(estimates.StepEstimator, "estimate", refuse)
    fit_to_budget(cfg, shape, budget, "cpu")
    assert round(cfg.method.sample_fraction * 16) == 3
    assert measure_method_peak(cfg, shape) <= budget


def _dense_cfg(method: str, kind: str, sample_fraction: float = 3 / 36) -> Config:
    cfg = Config(seed=0)
    cfg.task.kind = kind
    cfg.data.num_classes, cfg.data.in_chans = 3, 1
    cfg.model.encoder = "fcos_tiny" if kind == "detect" else "tiny_unet"
    cfg.method.name = method
    cfg.method.patch_size, cfg.method.sample_fraction = 64, sample_fraction
    cfg.method.fill_chunk, cfg.method.inner_steps = 4, 2
    cfg.train.batch_size = 2
    return cfg.validate()


@pytest.mark.parametrize("method,kind", [("patchgd", "detect"), ("tiled", "detect"),
                                         ("patchgd", "segment")])
def test_real_steps_on_the_proxy_canvas_price_the_real_image(method, kind):
    """Methods whose device memory does not grow with the image are measured on a small
    canvas with the same k; host maps scaled to the real grid's cells. Both peaks agree with
    the step on the real 384² image (6 × 6 patches, k = 3; the proxy is 2 × 2 patches)."""
    cfg, shape = _dense_cfg(method, kind), (1, 384, 384)
    real = measure_method_peaks(cfg, shape)
    pricer = budget_module._Pricer(cfg, shape, torch.device("cpu"))
    proxy = pricer.measure({})
    for got, want in [(proxy.total, real.total), (proxy.device, real.device),
                      (proxy.host_maps, real.host_maps)]:
        assert abs(got - want) <= 0.002 * want  # random boxes differ a little
    assert (real.host_maps > 0) == (method == "patchgd")


def test_detection_budget_fit_measures_only_small_canvases(monkeypatch):
    shape = (1, 512, 512)  # 64 patches of 64²; k = 8 configured
    cfg = _dense_cfg("patchgd", "detect", sample_fraction=8 / 64)
    cfg.train.budget_counts_host_maps = False
    pricer = budget_module._Pricer(cfg, shape, torch.device("cpu"))
    at = {"sample_fraction": 2 / 64, "fill_chunk": 1}
    budget = pricer.measure(at).device + 64  # the device peak at k = 2
    assert pricer.measure({**at, "sample_fraction": 3 / 64}).device > budget
    seen = []
    real = budget_module.measure_method_peaks

    def spy(trial, image_shape, device="cpu"):
        seen.append(image_shape)
        return real(trial, image_shape, device)

    monkeypatch.setattr(budget_module, "measure_method_peaks", spy)
    fit_to_budget(cfg, shape, budget, "cpu")
    assert round(cfg.method.sample_fraction * 64) == 2
    assert seen and all(s[1] * s[2] <= 256 * 256 for s in seen)  # k ≤ 4: 2 × 2 patches


def test_host_maps_count_in_a_cpu_budget_unless_told_otherwise():
    shape = (1, 384, 384)
    cfg = _dense_cfg("patchgd", "segment", sample_fraction=4 / 36)
    peaks = measure_method_peaks(cfg, shape)
    budget = peaks.device + 64  # k = 4 fits without Z, not with it
    counted = copy.deepcopy(cfg)
    fit_to_budget(counted, shape, budget, "cpu")
    assert round(counted.method.sample_fraction * 36) < 4
    assert measure_method_peaks(counted, shape).total <= budget
    cfg.train.budget_counts_host_maps = False
    fit_to_budget(cfg, shape, budget, "cpu")
    assert round(cfg.method.sample_fraction * 36) == 4


def test_tiled_fit_counts_the_stride_free_training_grid(caplog):
    """``method.stride`` is tiled's prediction overlap; training samples k of the stride-free
    grid (36 tiles of 64² at 384²), and the fitted k and its message are of that grid."""
    shape = (1, 384, 384)
    cfg = _dense_cfg("tiled", "detect", sample_fraction=6 / 36)
    cfg.method.stride = 32  # 11 × 11 prediction windows
    budget = budget_module._Pricer(cfg, shape, torch.device("cpu")).measure(
        {"sample_fraction": 2 / 36, "fill_chunk": 4}).total + 64
    with caplog.at_level("INFO", logger="gigapatch"):
        fit_to_budget(cfg, shape, budget, "cpu")
    assert cfg.method.sample_fraction == pytest.approx(2 / 36)
    assert "(36 patches) uses k=2 tiles per image per step" in caplog.text
