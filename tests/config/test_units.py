"""Durations, sizes and percentages: examples, round trips, and junk that must fail cleanly."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from piuptime.config.units import (
    UnitError,
    format_duration,
    format_size,
    parse_duration,
    parse_percent,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        ("1h30m", 5400.0),
        ("1m30s", 90.0),
        ("1s 500ms", 1.5),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("0s", 0.0),
        ("30", 30.0),
        ("0.25", 0.25),
        (" 10s ", 10.0),
        (30, 30.0),
        (1.5, 1.5),
        (0, 0.0),
    ],
)
def test_duration_examples(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("-5s", "cannot be negative"),
        (-1, "cannot be negative"),
        ("5 minutes", "expected a duration like 250ms, 30s"),
        ("5min", "expected a duration"),
        ("10S", "expected a duration"),
        ("", "empty string"),
        ("s", "expected a duration"),
        ("1e3s", "expected a duration"),
        (True, "expected a duration"),
        (None, "expected a duration"),
        (float("inf"), "expected a duration"),
        (float("nan"), "expected a duration"),
        ([1], "expected a duration"),
    ],
)
def test_duration_rejects(text: object, fragment: str) -> None:
    with pytest.raises(UnitError, match=fragment):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512", 512),
        (512, 512),
        ("0", 0),
        ("512B", 512),
        ("16KiB", 16 * 1024),
        ("10MiB", 10 * 1024**2),
        ("1GiB", 1024**3),
        ("2TiB", 2 * 1024**4),
        ("1.5KiB", 1536),
        ("16 KiB", 16384),
        ("16kib", 16384),
        ("10KB", 10_000),
        ("10MB", 10_000_000),
        ("1GB", 1_000_000_000),
        ("1mb", 1_000_000),
        (2.0, 2),
    ],
)
def test_size_examples(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("-1KiB", "cannot be negative"),
        ("16K", "ambiguous size unit .* KiB .* KB"),
        ("10m", "ambiguous"),
        ("0.1KiB", "whole number of bytes"),
        (1.5, "whole number of bytes"),
        ("12 parsecs", "unknown unit"),
        ("lots", "expected a size like 512, 16KiB or 10MiB"),
        (True, "expected a size"),
        ("", "expected a size"),
    ],
)
def test_size_rejects(text: object, fragment: str) -> None:
    with pytest.raises(UnitError, match=fragment):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "fraction"),
    [("20%", 0.2), ("0%", 0.0), ("100%", 1.0), ("12.5%", 0.125), (0.2, 0.2), (1, 1.0)],
)
def test_percent_examples(text: object, fraction: float) -> None:
    assert parse_percent(text) == fraction


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("120%", "at most 100%"), ("20", "expected a percentage like 20%"), (20, "did you mean 20%")],
)
def test_percent_rejects(text: object, fragment: str) -> None:
    with pytest.raises(UnitError, match=fragment):
        parse_percent(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.25, "250ms"), (30, "30s"), (90, "90s"), (300, "5m"), (5400, "90m"),
     (7200, "2h"), (86400, "1d"), (0.0001, "0.0001s"), (1.5, "1500ms")],
)  # fmt: skip
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_size() -> None:
    assert [format_size(n) for n in (0, 512, 1024, 16384, 1536, 10 * 1024**2, 1024**3)] == [
        "0",
        "512",
        "1KiB",
        "16KiB",
        "1536",
        "10MiB",
        "1GiB",
    ]


_UNIT = st.sampled_from(["ms", "s", "m", "h", "d"])
_FACTOR = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}
_FACTOR["d"] = Decimal(86400)


@given(st.integers(min_value=0, max_value=10**9), _UNIT)
def test_duration_integer_with_unit(count: int, unit: str) -> None:
    assert parse_duration(f"{count}{unit}") == float(count * _FACTOR[unit])


@given(st.lists(st.tuples(st.integers(0, 10**6), _UNIT), min_size=1, max_size=4))
def test_duration_parts_add_up(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{count}{unit}" for count, unit in parts)
    expected = sum((count * _FACTOR[unit] for count, unit in parts), Decimal(0))
    assert parse_duration(text) == pytest.approx(float(expected), rel=1e-12)


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False))
@example(0.1)
@example(1e-7)
@example(123456.789)
def test_duration_round_trip(seconds: float) -> None:
    text = format_duration(seconds)
    assert parse_duration(text) == seconds
    assert format_duration(parse_duration(text)) == text


@given(st.integers(min_value=0, max_value=2**62))
def test_size_round_trip(size: int) -> None:
    assert parse_size(format_size(size)) == size
    assert parse_size(str(size)) == size


@given(st.integers(0, 10**6), st.sampled_from(["KiB", "MiB", "GiB", "KB", "MB", "GB", "B", ""]))
def test_size_integer_with_unit(count: int, unit: str) -> None:
    factor = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "KB": 1000, "MB": 10**6, "GB": 10**9}
    assert parse_size(f"{count}{unit}") == count * factor.get(unit, 1)


@given(st.integers(0, 100))
def test_percent_whole(percent: int) -> None:
    assert parse_percent(f"{percent}%") == percent / 100


_JUNK = st.one_of(
    st.text(),
    st.text(alphabet="0123456789.-+ smhdKMGTiBb%e_", max_size=12),
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.lists(st.integers(), max_size=2),
)


@given(_JUNK)
def test_parsers_only_raise_unit_error(value: object) -> None:
    for parse in (parse_duration, parse_size, parse_percent):
        try:
            result = parse(value)
        except UnitError as exc:
            assert str(exc)
        else:
            assert result >= 0
