"""Peak training memory versus image side, per method: table, CSV and log-log plot.

Backs the ``gigapatch memory`` command. Every number is a fake-tensor estimate
(:func:`gigapatch.memory.estimates.estimate_table`): nothing is allocated, so sides up to 65,536²
take seconds. A budget marks which (method, side) pairs fit.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from gigapatch.config import Config
from gigapatch.core.files import write_text
from gigapatch.plots import plt, save_figure
from gigapatch.memory.estimates import estimate_table
from gigapatch.core.units import format_bytes

__all__ = [
    "DEFAULT_SIDES",
    "format_memory_table",
    "memory_rows",
    "plot_memory",
    "write_memory_csv",
]

#: Image sides of the default table: 512 … 65,536 in powers of two.
DEFAULT_SIDES = [512 * 2**i for i in range(8)]

_CSV_FIELDS = ["method", "side", "estimated_bytes", "estimated", "persistent_bytes",
               "input_bytes", "fits_budget", "seconds"]


def memory_rows(
    cfg: Config,
    sides: list[int],
    methods: list[str],
    *,
    device: str = "cpu",
    patches_per_step: int | None = None,
    budget: int | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Estimated step peaks of ``methods`` on square ``side²`` images, one row per pair.

    Rows are those of :func:`gigapatch.memory.estimates.estimate_table` plus ``estimated`` (human
    readable) and ``fits_budget`` (``None`` without a budget).
    """
    rows = estimate_table(cfg, sides, methods, device=device, patches_per_step=patches_per_step,
                          progress=progress)
    for row in rows:
        row["estimated"] = format_bytes(row["estimated_bytes"])
        row["fits_budget"] = None if budget is None else row["estimated_bytes"] <= budget
    return rows


def format_memory_table(rows: list[dict[str, Any]], budget: int | None = None) -> str:
    """Sides down, methods across; ``✓``/``✗`` after each value when a budget is given."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    sides = sorted({r["side"] for r in rows})
    cell = {(r["method"], r["side"]): r for r in rows}
    width = max(16, *(len(m) + 2 for m in methods))
    lines = [f"{'side':>8}" + "".join(f"{m:>{width}}" for m in methods)]
    for side in sides:
        parts = []
        for m in methods:
            r = cell.get((m, side))
            text = "—" if r is None else r["estimated"]
            if r is not None and budget is not None:
                text += " ✓" if r["fits_budget"] else " ✗"
            parts.append(f"{text:>{width}}")
        lines.append(f"{side:>7}²" + "".join(parts))
    if budget is not None:
        lines.append(f"✓ fits / ✗ exceeds the budget of {format_bytes(budget)}")
    return "\n".join(lines)


def write_memory_csv(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write the rows to ``path`` as CSV (columns: ``_CSV_FIELDS``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_CSV_FIELDS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())
    return path


def plot_memory(
    rows: list[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    budget: int | None = None,
    title: str = "",
) -> Path:
    """Log-log plot of estimated peak memory versus image side, one line per method.

    With a budget, a horizontal line marks it and points over it are drawn hollow.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["side"])
        xs = [r["side"] for r in mine]
        ys = [r["estimated_bytes"] / 2**30 for r in mine]
        (line,) = ax.plot(xs, ys, "-", label=method)
        fits = [budget is None or r["estimated_bytes"] <= budget for r in mine]
        ax.scatter([x for x, f in zip(xs, fits) if f], [y for y, f in zip(ys, fits) if f],
                   color=line.get_color(), zorder=3)
        ax.scatter([x for x, f in zip(xs, fits) if not f], [y for y, f in zip(ys, fits) if not f],
                   facecolors="none", edgecolors=line.get_color(), zorder=3)
    if budget is not None:
        ax.axhline(budget / 2**30, color="k", linestyle="--", linewidth=1,
                   label=f"budget {format_bytes(budget)}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    sides = sorted({r["side"] for r in rows})
    ax.set_xticks(sides, [f"{s:,}" for s in sides], rotation=30)
    ax.set_xlabel("image side (pixels, square images)")
    ax.set_ylabel("peak memory of one training step (GiB)")
    ax.set_title(title or "Estimated peak training memory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
