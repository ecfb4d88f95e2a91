import copy

import pytest

from gigapatch.memory.budget import fit_to_budget, measure_method_peak
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
    monkeypatch.setattr(estimates.StepEstimator, "peak", refuse)
    fit_to_budget(cfg, shape, budget, "cpu")
    assert round(cfg.method.sample_fraction * 16) == 3
    assert measure_method_peak(cfg, shape) <= budget
