"""Atomic file writes: a crash never leaves half a file at the destination.

Every writer goes through :func:`atomic_path`: the data is written to a unique temporary
sibling (``.<name>.<pid>.<random>.tmp``, created with the usual permissions), flushed to disk
and renamed over the destination with :func:`os.replace`. On any error the temporary file is
removed; an interrupted process (``kill -9``) may leave one behind, which
:func:`remove_orphans` cleans up on the next start.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_path",
    "atomic_write",
    "finite",
    "remove_orphans",
    "write_bytes",
    "write_json",
    "write_text",
]

_TMP_SUFFIX = ".tmp"


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` on success.

    For writers that open the file themselves (``tifffile.TiffWriter``, ``Image.save``)::

        with atomic_path(out) as tmp:
            tifffile.imwrite(tmp, data)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}{_TMP_SUFFIX}")
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a new binary file that replaces ``path`` once complete."""
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        write(f)
        f.flush()


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, strict JSON to ``path`` atomically; NaN and ±inf (which
    JSON cannot hold) are written as ``null``."""
    write_text(path, json.dumps(finite(obj), indent=2, allow_nan=False) + "\n")


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (in nested dicts, lists, tuples) replaced by
    ``None``, so that it is valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def remove_orphans(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files that an interrupted atomic write left in ``folder``; returns
    them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    orphans = [p for p in folder.glob(f".*{_TMP_SUFFIX}") if p.is_file()]
    for p in orphans:
        p.unlink(missing_ok=True)
    return orphans
