"""Scalar types and small helpers shared by every config model (the schema and the plugin
schemas in ``piuptime.config.plugins``)."""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, ConfigDict

from .units import UnitError, parse_duration, parse_percent, parse_size

Loc = tuple[str | int, ...]


class SchemaValueError(ValueError):
    """A validation message that belongs to a key below the one being validated.

    ``at`` is appended to the location pydantic reports (so a check on a whole route can point at
    ``strip_prefix``); ``on_key`` asks for the key's position rather than its value's.
    """

    def __init__(self, message: str, at: Loc = (), *, on_key: bool = False) -> None:
        super().__init__(message)
        self.at = at
        self.on_key = on_key


# --------------------------------------------------------------------------------------------
# Scalar types


def _duration(value: Any) -> float:
    return parse_duration(value)


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise UnitError(f"must be longer than 0s, got {value!r}")
    return seconds


def _size(value: Any) -> int:
    return parse_size(value)


def _percent(value: Any) -> float:
    return parse_percent(value)


def _integer(value: Any) -> Any:
    # pydantic would take true/false as 1/0; in a config file that is always a mistake.
    if isinstance(value, bool):
        raise ValueError(f"expected a whole number, got {str(value).lower()}")
    return value


#: Seconds; written ``250ms``, ``30s``, ``5m``, ``1h30m`` or a bare number of seconds. May be 0.
Duration = Annotated[float, BeforeValidator(_duration)]
#: Like :data:`Duration` but must be greater than zero (timeouts, intervals).
PositiveDuration = Annotated[float, BeforeValidator(_positive_duration)]
#: Bytes; written ``512``, ``16KiB``, ``10MiB``, ``1GiB`` (binary) or ``10KB``/``10MB`` (decimal).
Size = Annotated[int, BeforeValidator(_size)]
#: A fraction from 0 to 1; written ``20%`` (or ``0.2``).
Percent = Annotated[float, BeforeValidator(_percent)]
Int = Annotated[int, BeforeValidator(_integer)]


def _fspath(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


#: A file path; code building a config may pass a ``pathlib.Path``.
PathStr = Annotated[str, BeforeValidator(_fspath)]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*\.?\Z")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def _is_token(text: str) -> bool:
    return bool(_TOKEN.match(text))


def _is_hostname(text: str) -> bool:
    if _HOSTNAME.match(text):
        return True
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _readable_file(path: str, what: str) -> str:
    if not path:
        raise ValueError(f"expected the path of the {what}, got an empty string")
    if not os.path.isfile(path):
        where = "" if os.path.isabs(path) else f" (relative to the working directory {os.getcwd()})"
        raise ValueError(f"{what} not found: {path}{where}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{what} is not readable: {path}")
    return path


_TRUE_WORDS = frozenset({"true", "yes", "on", "1", "t", "y"})


def is_true(value: object) -> bool:
    """Whether pydantic would read ``value`` as ``True`` for a ``bool`` field."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value == 1
    return isinstance(value, str) and value.strip().lower() in _TRUE_WORDS


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _none_as_empty_dict(value: Any) -> Any:
    # "upstreams:" with everything below commented out is null: read it as an empty section.
    return {} if value is None else value


def _none_as_empty_list(value: Any) -> Any:
    return [] if value is None else value


_Section = BeforeValidator(_none_as_empty_dict)
_Items = BeforeValidator(_none_as_empty_list)


def _model() -> ConfigDict:
    return ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


# --------------------------------------------------------------------------------------------
# gateway


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return value


#: A regular expression (Python ``re`` syntax), checked when the config is loaded.
Regex = Annotated[str, AfterValidator(_regex)]
