"""Every shipped config loads and builds its method."""

from pathlib import Path

import pytest

from gigapatch.config import load_config
from gigapatch.methods.base import create_method

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_builds(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    cfg.model.pretrained, cfg.model.weights = False, None  # tests never download weights
    method = create_method(cfg)
    assert sum(p.numel() for p in method.parameters()) > 0
