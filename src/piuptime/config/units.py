"""Durations, sizes and percentages as people write them in a config file.

Durations become ``float`` seconds, sizes ``int`` bytes, percentages a ``float`` fraction.
Every parser raises :class:`UnitError` (a ``ValueError``) with a message that says what to write
instead; nothing else escapes them, whatever the input.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

__all__ = [
    "DURATION_UNITS",
    "SIZE_UNITS",
    "UnitError",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_percent",
    "parse_size",
]


class UnitError(ValueError):
    """A duration, size or percentage that could not be understood."""


#: Duration units and their length in seconds. Units are lower-case.
DURATION_UNITS: dict[str, Decimal] = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "d": Decimal(86400),
}

#: Size units (matched case-insensitively) and their size in bytes. ``KiB``/``MiB``/``GiB``/``TiB``
#: are binary (powers of 1024), ``KB``/``MB``/``GB``/``TB`` decimal (powers of 1000).
SIZE_UNITS: dict[str, int] = {
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

_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_DURATION_PART = re.compile(rf"\s*({_NUMBER})\s*(ms|s|m|h|d)")
_BARE_NUMBER = re.compile(rf"\s*({_NUMBER})\s*")
_SIZE = re.compile(rf"\s*({_NUMBER})\s*([A-Za-z]*)\s*")
_PERCENT = re.compile(rf"\s*({_NUMBER})\s*%\s*")

_DURATION_HINT = "expected a duration like 250ms, 30s, 5m or 1h30m (a bare number means seconds)"
_SIZE_HINT = "expected a size like 512, 16KiB or 10MiB (a bare number means bytes)"
_PERCENT_HINT = "expected a percentage like 20% (or a fraction from 0 to 1)"


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: object, hint: str) -> Decimal:
    """A YAML number (int or float, not bool) as an exact Decimal; rejects negatives, inf, NaN."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UnitError(f"{hint}, got {_show(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UnitError(f"{hint}, got {_show(value)}")
    if value < 0:
        raise UnitError(f"cannot be negative: {_show(value)}; {hint}")
    # repr() of a float is its shortest exact spelling, so 0.1 stays 0.1.
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def _finite_float(total: Decimal, hint: str, value: object) -> float:
    try:
        result = float(total)
    except (OverflowError, InvalidOperation) as exc:  # pragma: no cover - float() saturates
        raise UnitError(f"{hint}, got {_show(value)}") from exc
    if not math.isfinite(result):
        raise UnitError(f"too large: {_show(value)}")
    return result


def parse_duration(value: object) -> float:
    """``"250ms"``, ``"30s"``, ``"5m"``, ``"1h30m"``, ``"2d"``, ``30``, ``"1.5"`` → seconds.

    A bare number (YAML number or numeric string) is seconds. Parts may be combined, largest
    first or not (``1m30s``); units are lower-case.
    """
    if not isinstance(value, str):
        return _finite_float(_number(value, _DURATION_HINT), _DURATION_HINT, value)
    text = value.strip()
    if text.startswith("-"):
        raise UnitError(f"a duration cannot be negative, got {_show(value)}")
    bare = _BARE_NUMBER.fullmatch(text)
    if bare:
        return _finite_float(Decimal(bare.group(1)), _DURATION_HINT, value)
    if not text:
        raise UnitError(f"{_DURATION_HINT}, got an empty string")
    total = Decimal(0)
    pos = 0
    while pos < len(text):
        part = _DURATION_PART.match(text, pos)
        # "5min" or "5mo" would match "5m" and leave junk; the loop then fails on the junk.
        if not part:
            raise UnitError(f"{_DURATION_HINT}, got {_show(value)}")
        total += Decimal(part.group(1)) * DURATION_UNITS[part.group(2)]
        pos = part.end()
    return _finite_float(total, _DURATION_HINT, value)


def format_duration(seconds: float) -> str:
    """The shortest spelling that :func:`parse_duration` reads back to exactly ``seconds``."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise UnitError(f"not a number of seconds: {_show(seconds)}")
    if not math.isfinite(seconds) or seconds < 0:
        raise UnitError(f"not a duration: {_show(seconds)}")
    exact = Decimal(repr(float(seconds)))
    if exact == 0:
        return "0s"
    for unit in ("d", "h", "m", "s", "ms"):
        count = exact / DURATION_UNITS[unit]
        if count == count.to_integral_value() and float(count * DURATION_UNITS[unit]) == seconds:
            return f"{int(count)}{unit}"
    return f"{exact:f}s"


def parse_size(value: object) -> int:
    """``"16KiB"``, ``"10MiB"``, ``"1GiB"``, ``"1.5KiB"``, ``"10MB"``, ``512``, ``"512"`` → bytes.

    ``KiB``/``MiB``/``GiB``/``TiB`` are powers of 1024; ``KB``/``MB``/``GB``/``TB`` powers of 1000;
    ``B`` or no unit is bytes. Units are case-insensitive. The result must be a whole number of
    bytes.
    """
    if not isinstance(value, str):
        amount = _number(value, _SIZE_HINT)
        if amount != amount.to_integral_value():
            raise UnitError(f"a size is a whole number of bytes, got {_show(value)}")
        return int(amount)
    text = value.strip()
    if text.startswith("-"):
        raise UnitError(f"a size cannot be negative, got {_show(value)}")
    match = _SIZE.fullmatch(text)
    if not match:
        raise UnitError(f"{_SIZE_HINT}, got {_show(value)}")
    number, unit = match.group(1), match.group(2).lower()
    if unit not in SIZE_UNITS:
        if unit in ("k", "m", "g", "t"):
            big = unit.upper()
            raise UnitError(
                f"ambiguous size unit in {_show(value)}: write {big}iB (binary, 1024) "
                f"or {big}B (decimal, 1000)"
            )
        raise UnitError(f"{_SIZE_HINT}, got {_show(value)} (unknown unit {match.group(2)!r})")
    total = Decimal(number) * SIZE_UNITS[unit]
    if total != total.to_integral_value():
        raise UnitError(f"a size is a whole number of bytes, got {_show(value)}")
    return int(total)


def format_size(size: int) -> str:
    """The largest binary unit that divides ``size`` exactly (``16KiB``), else plain bytes."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise UnitError(f"not a size in bytes: {_show(size)}")
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        factor = SIZE_UNITS[unit.lower()]
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def parse_percent(value: object) -> float:
    """``"20%"`` → ``0.2``; a number from 0 to 1 is taken as the fraction itself."""
    if not isinstance(value, str):
        fraction = _number(value, _PERCENT_HINT)
        if fraction > 1:
            raise UnitError(f"{_PERCENT_HINT}, got {_show(value)}; did you mean {value}%?")
        return float(fraction)
    match = _PERCENT.fullmatch(value)
    if not match:
        raise UnitError(f"{_PERCENT_HINT}, got {_show(value)}")
    percent = Decimal(match.group(1))
    if percent > 100:
        raise UnitError(f"a percentage is at most 100%, got {_show(value)}")
    return float(percent / 100)
