"""Schemas of the rate-limiting plugins: ``rate_limit`` (requests per window) and
``limit_concurrency`` (requests in flight), plus the check that a plugin asking for
``store: redis`` has a Redis to use (``store.redis``)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from ..types import Int, Loc, PositiveDuration, SchemaValueError, _is_token, _model, _suggest

__all__ = ["LimitConcurrency", "LimitSpec", "RateLimit", "parse_per", "shared_store_problems"]

_PER_WORDS = ["consumer", "ip", "route"]
_PER_HINT = "expected consumer, ip, route or header:<Name> (e.g. header:X-Device-Id)"
_SCOPE = re.compile(r"[A-Za-z0-9_.\-]{1,100}\Z")

#: The longest window a limit may have (a year): longer is surely a typo.
MAX_WINDOW = 366 * 86400.0


def parse_per(value: str) -> tuple[str, str | None]:
    """``"consumer"`` → ``("consumer", None)``; ``"header:X-Key"`` → ``("header", "X-Key")``.
    Raises ``ValueError`` with what to write instead."""
    text = value.strip()
    if text in _PER_WORDS:
        return text, None
    kind, sep, name = text.partition(":")
    if sep and kind.strip() == "header":
        name = name.strip()
        if not name or not _is_token(name):
            raise ValueError(f"header:<Name> needs an HTTP header name, got {value!r}")
        return "header", name
    raise ValueError(f"{_PER_HINT}, got {value!r}{_suggest(text, [*_PER_WORDS, 'header:'])}")


class _Keyed(BaseModel):
    """What both plugins share: what a limit is counted per, and where."""

    model_config = _model()

    per: str = "consumer"
    # Counters are kept under this name; routes with the same scope share them (default: the
    # route's name, so a global plugin limits each route on its own).
    scope: str | None = None
    store: Literal["memory", "redis"] = "memory"
    on_store_error: Literal["allow", "deny"] = "allow"

    @field_validator("per")
    @classmethod
    def _per(cls, value: str) -> str:
        kind, name = parse_per(value)
        return kind if name is None else f"header:{name}"

    @field_validator("scope")
    @classmethod
    def _scope(cls, value: str | None) -> str | None:
        if value is not None and not _SCOPE.match(value):
            raise ValueError(
                "a scope is 1-100 letters, digits, '.', '_' or '-' (it becomes part of the "
                f"counter's key), got {value!r}"
            )
        return value


def _check_window(value: float) -> float:
    if value > MAX_WINDOW:
        raise ValueError(f"a window is at most 366d, got {value:g}s")
    if value < 0.001:
        raise ValueError(f"a window is at least 1ms, got {value:g}s")
    return value


class LimitSpec(BaseModel):
    """One limit: ``limit`` requests per ``window`` (the token bucket: refilled at
    ``limit / window`` per second, holding at most ``burst``, by default ``limit``)."""

    model_config = _model()

    limit: Int = Field(ge=1)
    window: PositiveDuration
    burst: Int | None = Field(default=None, ge=1)

    @field_validator("window")
    @classmethod
    def _window(cls, value: float) -> float:
        return _check_window(value)


class RateLimit(_Keyed):
    """At most ``limit`` requests per ``window`` for each key (``per``), or several limits
    (``limits``) that a request must all pass. Answers ``status`` (429) with ``Retry-After``
    beyond them; every answer of the route carries ``RateLimit-*`` headers."""

    limit: Int | None = Field(default=None, ge=1)
    window: PositiveDuration | None = None
    burst: Int | None = Field(default=None, ge=1)
    limits: list[LimitSpec] | None = Field(default=None, min_length=1)
    algorithm: Literal["sliding_window", "token_bucket"] = "sliding_window"
    cost: Int = Field(default=1, ge=1)
    status: Int = Field(default=429, ge=400, le=599)
    headers: bool = True
    message: str | None = None

    @field_validator("window")
    @classmethod
    def _window(cls, value: float | None) -> float | None:
        return None if value is None else _check_window(value)

    @model_validator(mode="after")
    def _shape(self) -> RateLimit:
        single = self.limit is not None or self.window is not None or self.burst is not None
        if self.limits is not None and single:
            key = "limit" if self.limit is not None else "window" if self.window else "burst"
            raise SchemaValueError(
                f"write either limit and window (one limit) or limits (several), not both; "
                f"move {key} into limits",
                (key,),
                on_key=True,
            )
        if self.limits is None:
            if self.limit is None:
                raise SchemaValueError(
                    "required key 'limit' is missing: write limit and window "
                    "(e.g. {limit: 100, window: 1m}) or a list under limits"
                )
            if self.window is None:
                raise SchemaValueError(
                    "required key 'window' is missing: how long the limit counts over "
                    "(e.g. window: 1m)"
                )
        for loc, spec in self.specs():
            if spec.burst is not None and self.algorithm != "token_bucket":
                raise SchemaValueError(
                    "burst applies to algorithm: token_bucket only (a sliding window allows "
                    "limit per window, no more); remove it or set algorithm: token_bucket",
                    (*loc, "burst"),
                    on_key=True,
                )
            most = spec.burst if spec.burst is not None else spec.limit
            if self.cost > most:
                what = "burst" if spec.burst is not None else "limit"
                raise SchemaValueError(
                    f"cost {self.cost} is more than the {what} {most}: no request could ever pass",
                    ("cost",),
                )
        return self

    def specs(self) -> list[tuple[Loc, LimitSpec]]:
        """Every limit with its location below the plugin (for messages)."""
        if self.limits is not None:
            return [(("limits", i), spec) for i, spec in enumerate(self.limits)]
        assert self.limit is not None and self.window is not None
        return [((), LimitSpec(limit=self.limit, window=self.window, burst=self.burst))]


class LimitConcurrency(_Keyed):
    """At most ``max`` requests in flight at once for each key (``per``); the next one is
    answered ``status`` (503) with ``Retry-After: 1``."""

    max: Int = Field(ge=1)
    status: Int = Field(default=503, ge=400, le=599)
    # Redis only: how long a slot outlives the gateway holding it if that gateway dies (slots
    # of live gateways are refreshed, so a request may last longer than this).
    slot_ttl: PositiveDuration = 30.0
    message: str = "too many requests in flight; try again shortly"

    @field_validator("slot_ttl")
    @classmethod
    def _ttl(cls, value: float) -> float:
        if value < 1.0:
            raise ValueError(f"slot_ttl is at least 1s, got {value:g}s")
        return value


def shared_store_problems(data: dict[str, Any]) -> list[tuple[Loc, str]]:
    """Plugins configured with ``store: redis`` while the top-level ``store.redis`` is not set
    (on the raw data, so ``piuptime validate`` points at the plugin's ``store`` value)."""
    store = data.get("store")
    if isinstance(store, dict) and store.get("redis") not in (None, ""):
        return []
    found: list[tuple[Loc, str]] = []

    def scan(plugins: object, at: Loc) -> None:
        if not isinstance(plugins, dict):
            return
        for name, cfg in plugins.items():
            if isinstance(cfg, dict) and cfg.get("store") == "redis":
                found.append(
                    (
                        (*at, str(name), "store"),
                        "store: redis needs a Redis to use, but the top-level store.redis is "
                        "not set; add store: {redis: redis://127.0.0.1:6379/0} or use "
                        "store: memory",
                    )
                )

    scan(data.get("plugins"), ("plugins",))
    routes = data.get("routes")
    for index, route in enumerate(routes if isinstance(routes, list) else ()):
        if isinstance(route, dict):
            scan(route.get("plugins"), ("routes", index, "plugins"))
    return found
