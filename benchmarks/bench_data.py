"""What the benchmark scripts share: whether a generated data set is the one they want, and
``key=value`` overrides of one method's config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gigapatch.config import Config, apply_override, config_from_dict


def generated_with(data_dir: Path, wanted: dict[str, Any]) -> bool:
    """Whether ``data_dir/meta.json`` records the generator settings ``wanted`` (tuples
    compare as the lists JSON keeps)."""
    meta = data_dir / "meta.json"
    if not meta.is_file():
        return False
    saved = json.loads(meta.read_text())
    return all(saved.get(k) == (list(v) if isinstance(v, tuple) else v)
               for k, v in wanted.items())


def with_overrides(cfg: Config, items: list[str] | None, source: str) -> Config:
    """``cfg`` with the ``key=value`` overrides ``items`` applied (e.g.
    ``method.z_cache=refresh``); ``source`` names the option in error messages."""
    if not items:
        return cfg
    raw = cfg.to_dict()
    for item in items:
        apply_override(raw, item)
    return config_from_dict(raw, source)
