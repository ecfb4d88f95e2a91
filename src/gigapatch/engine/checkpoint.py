"""Checkpoints and other run files, written atomically so that a crash never leaves half a file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from gigapatch.config import Config, config_from_dict
from gigapatch.core.errors import DataError


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` ``state`` to ``path`` atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a gigapatch checkpoint; a missing or unreadable file gives a :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint not found: {path}. Pass a last.pt/best.pt from a run dir.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any decode failure means the same to the user
        raise DataError(f"cannot read checkpoint {path}: {e}. Is it a complete .pt file?") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise DataError(f"{path} is not a gigapatch checkpoint (no 'model'/'config' entries).")
    return state


def load_method(path: str | Path, device: str | torch.device = "cpu") -> tuple[Any, Config]:
    """Rebuild the trained method from a checkpoint, in eval mode on ``device``."""
    from gigapatch.methods.base import create_method

    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"], source=f"{path} (config)")
    method = create_method(cfg)
    method.load_state_dict(state["model"])
    return method.to(device).eval(), cfg
