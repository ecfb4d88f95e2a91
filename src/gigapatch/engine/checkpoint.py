"""Checkpoints, written atomically so that a crash never leaves half a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gigapatch.config import Config, config_from_dict
from gigapatch.core.errors import DataError
from gigapatch.core.files import atomic_write
from gigapatch.methods import Method, create_method
from gigapatch.tasks import Task, create_task


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` ``state`` to ``path`` atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


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


def load_method(path: str | Path, device: str | torch.device = "cpu"
                ) -> tuple[Method, Task, Config]:
    """Rebuild the trained method (and its task) from a checkpoint, in eval mode on
    ``device``."""
    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"], source=f"{path} (config)")
    cfg.model.weights = None  # the checkpoint's own weights replace the starting ones
    task = create_task(cfg)
    method = create_method(cfg, task)
    _check_weights(method, state["model"], path, cfg)
    method.load_state_dict(state["model"])
    return method.to(device).eval(), task, cfg


def _check_weights(method: Method, weights: dict[str, Any], path: str | Path, cfg: Config
                   ) -> None:
    """DataError unless ``weights`` has exactly the keys and shapes of ``method``."""
    own = method.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k}: {tuple(weights[k].shape)} in the file, {tuple(v.shape)} in the model"
              for k, v in own.items()
              if k in weights and hasattr(weights[k], "shape") and weights[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return
    parts = [f"{len(missing)} missing ({_few(missing)})" if missing else "",
             f"{len(unexpected)} unexpected ({_few(unexpected)})" if unexpected else "",
             f"{len(shapes)} of another shape ({_few(shapes)})" if shapes else ""]
    raise DataError(
        f"{path}: the weights do not fit the model its config describes (method "
        f"{cfg.method.name}, encoder {cfg.model.encoder}, latent_dim {cfg.model.latent_dim}, "
        f"{cfg.data.num_classes} classes, {cfg.data.in_chans} input channel(s)): keys "
        + "; ".join(p for p in parts if p)
        + ". Was the file's config edited, or the file written by another gigapatch version? "
        "Use the checkpoint as its run wrote it."
    )


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")
