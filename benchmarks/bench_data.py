"""What the benchmark scripts share: whether a generated data set is the one they want."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def generated_with(data_dir: Path, wanted: dict[str, Any]) -> bool:
    """Whether ``data_dir/meta.json`` records the generator settings ``wanted`` (tuples
    compare as the lists JSON keeps)."""
    meta = data_dir / "meta.json"
    if not meta.is_file():
        return False
    saved = json.loads(meta.read_text())
    return all(saved.get(k) == (list(v) if isinstance(v, tuple) else v)
               for k, v in wanted.items())
