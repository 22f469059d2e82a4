"""Human units in config and CLI flags: durations (``90s``, ``5m``, ``24h``, ``30d``) and
byte sizes (``512MiB``, ``50GiB``, ``1.5GB``)."""

from __future__ import annotations

import re

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "P": 1000**5}


def parse_duration(value: str | int | float) -> float:
    """Seconds in ``value``; a bare number means seconds. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"negative duration: {value!r}")
        return float(value)
    match = _DURATION_RE.match(value)
    if match is None:
        raise ValueError(f"not a duration (use e.g. 30s, 5m, 24h, 30d): {value!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def parse_size(value: str | int) -> int:
    """Bytes in ``value``: ``KiB``/``MiB``/``GiB`` are powers of 1024, ``KB``/``MB``/``GB`` of 1000."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"negative size: {value!r}")
        return value
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f"not a size (use e.g. 512MiB, 50GiB): {value!r}")
    number, unit = float(match.group(1)), (match.group(2) or "").upper()
    if unit.endswith("IB"):
        return int(number * 1024 ** ("KMGTP".index(unit[0]) + 1))
    return int(number * _SIZE_UNITS[unit.rstrip("B") or unit])


def format_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
