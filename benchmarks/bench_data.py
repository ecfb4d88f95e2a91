"""What the benchmark scripts share: whether a generated data set is the one they want,
``key=value`` overrides of one method's config, and writing (or merging) a run's results
beside the stored ones."""

from __future__ import annotations

import json
from collections.abc import Callable
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


#: Where the benchmarks write ``<name>.json`` and ``<name>.md``.
RESULTS = Path(__file__).resolve().parent / "results"


def save_results(name: str, new: dict[str, Any],
                 table: Callable[[dict[str, Any]], list[str]]) -> list[str]:
    """Merge ``new`` into ``RESULTS/<name>.json`` (parts not rerun keep their last results;
    read now, as another run may have finished meanwhile), write ``<name>.md`` from ``table``
    of the whole, print it and return its lines."""
    saved = RESULTS / f"{name}.json"
    results = {**(json.loads(saved.read_text()) if saved.is_file() else {}), **new}
    lines = table(results)
    write_results(RESULTS, name, results, lines)
    return lines


def write_results(folder: Path, name: str, results: dict[str, Any], lines: list[str]) -> None:
    """Write ``results`` to ``folder/<name>.json`` (what JSON cannot hold as its ``str``) and
    the table ``lines`` to ``folder/<name>.md``, and print the table."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(results, indent=2, default=str))
    (folder / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
