import pytest

from gigapatch.config import (
    Config,
    apply_override,
    config_from_dict,
    load_config,
    save_config,
)
from gigapatch.core.errors import ConfigError


def test_yaml_round_trip(tmp_path):
    cfg = Config()
    cfg.method.patch_size = 48
    cfg.train.memory_budget = "2GiB"
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_overrides_parse_yaml_values(tmp_path):
    (tmp_path / "c.yaml").write_text("name: x\nmethod: {name: patchgd}\n")
    cfg = load_config(
        tmp_path / "c.yaml",
        ["train.epochs=3", "method.stride=null", "train.lr=1e-3", "method.accumulate=false"],
    )
    assert cfg.train.epochs == 3 and cfg.method.stride is None
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.method.accumulate is False


@pytest.mark.parametrize(
    "raw,match",
    [
        ({"methd": {}}, "unknown key 'methd'.*Did you mean 'method'"),
        ({"method": {"patch_sise": 3}}, "Did you mean 'method.patch_size'"),
        ({"train": {"epochs": "ten"}}, "train.epochs = 'ten' has the wrong type"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"method": {"global_context": "ad"}}, "Did you mean 'add'"),
        ({"method": {"sample_fraction": 1.5}}, "sample_fraction"),
        ({"train": {"memory_budget": "2 GiBs"}}, "2 GiBs"),
        ({"train": {"optimizer": "adamm"}}, "adamw"),
        ({"method": {"z_pool": "share"}, "model": {"latent_dim": 1}}, "latent_dim = 1.*share"),
    ],
)
def test_typos_and_bad_values_are_named(raw, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(raw)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, "train.epochs")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_bare_keys_go_to_their_only_section():
    raw: dict = {}
    apply_override(raw, "memory_budget=2GiB")
    apply_override(raw, "seed=3")
    apply_override(raw, "fill_chunk=8")
    assert raw == {"train": {"memory_budget": "2GiB"}, "seed": 3, "method": {"fill_chunk": 8}}
    apply_override(raw, "nonsense=1")  # left for validation to name, with a suggestion
    with pytest.raises(ConfigError, match="unknown key 'nonsense'"):
        config_from_dict(raw)
