"""One plotting set-up: matplotlib without a screen (Agg), figures saved atomically."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

from gigapatch.core.files import write_bytes  # noqa: E402

__all__ = ["plt", "save_figure"]


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 100) -> Path:
    """Lay out ``fig``, write it as PNG to ``path`` atomically, close it; returns the path."""
    path = Path(path)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return path
