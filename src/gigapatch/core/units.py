"""Byte counts as text: ``parse_bytes("2GiB")`` and ``format_bytes(3 * 2**29)``."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from gigapatch.core.errors import ConfigError

__all__ = ["format_bytes", "parse_bytes"]

# Unit names, lower-cased: binary units have an "i", decimal ones do not.
_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?\s*([a-zA-Z]*)\s*$")
_EXAMPLES = '"2GiB", "512MiB", "1.5 GB", "300kB", "1024" or 1024'


def _bad_bytes(text: object, why: str) -> ConfigError:
    return ConfigError(f"invalid memory size {text!r}: {why}. Valid examples: {_EXAMPLES}.")


def parse_bytes(text: str | int | float) -> int:
    """Parse a memory size into a number of bytes.

    Binary units ``KiB, MiB, GiB, TiB`` are powers of 1024, decimal units ``kB, MB, GB, TB``
    powers of 1000; unit letters are case-insensitive (``"gib"`` = ``"GiB"``), ``"B"`` or no
    unit means bytes. Bare ``K``/``M``/``G`` are rejected as ambiguous. Fractional results are
    rounded to the nearest byte.

    Raises:
        ConfigError: ``text`` is negative, not finite, or not a recognised size.
    """
    if isinstance(text, bool):
        raise _bad_bytes(text, "a boolean is not a size")
    if isinstance(text, int):
        value = Decimal(text)
        factor = 1
    elif isinstance(text, float):
        if text != text or text in (float("inf"), float("-inf")):
            raise _bad_bytes(text, "not a finite number")
        value = Decimal(text)
        factor = 1
    elif isinstance(text, str):
        match = _BYTES_RE.match(text)
        if match is None:
            raise _bad_bytes(text, "expected a non-negative number followed by an optional unit")
        number, exponent, unit = match.groups()
        if unit.lower() not in _UNITS:
            raise _bad_bytes(
                text, f"unknown unit {unit!r} (use B, KiB, MiB, GiB, TiB, kB, MB, GB or TB)"
            )
        try:
            value = Decimal(number) * Decimal(10) ** int(exponent or 0)
        except (InvalidOperation, ValueError) as err:  # pragma: no cover - regex guards this
            raise _bad_bytes(text, "not a number") from err
        factor = _UNITS[unit.lower()]
    else:
        raise _bad_bytes(text, f"expected a string or a number, got {type(text).__name__}")
    if value < 0:
        raise _bad_bytes(text, "a size cannot be negative")
    return int((value * factor).to_integral_value())


def format_bytes(n: int) -> str:
    """Format a byte count with binary units and three significant digits.

    Examples: ``512 -> "512 B"``, ``12 * 2**20 -> "12.0 MiB"``, ``3 * 2**29 -> "1.50 GiB"``.
    Negative counts (memory deltas) keep their sign.
    """
    n = int(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n < 1024:
        return f"{sign}{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        digits = 2 if value < 9.995 else 1 if value < 99.95 else 0
        text = f"{value:.{digits}f}"
        if float(text) < 1024 or unit == "PiB":
            return f"{sign}{text} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover
