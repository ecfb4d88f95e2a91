import copy

import pytest

from gigapatch.budget import fit_to_budget, measure_method_peak
from gigapatch.config import Config
from gigapatch.errors import ConfigError


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
    with pytest.raises(ConfigError, match="over the memory budget.*sample_fraction"):
        fit_to_budget(pgd, (1, 128, 128), 1000, "cpu")
