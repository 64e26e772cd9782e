"""Schemas of the traffic plugins: fault injection, traffic split and mirroring.

``upstream_reference_problems`` is the cross-reference check of these plugins (an upstream they
name must exist); ``piuptime.config.schema.config_problems`` calls it for every route's
``plugins:`` and for the global section.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, field_validator, model_validator

from ..types import (
    Int,
    Loc,
    Percent,
    PositiveDuration,
    Regex,
    SchemaValueError,
    Size,
    _is_token,
    _model,
    _suggest,
)


class FaultAbort(BaseModel):
    model_config = _model()

    status: Int = Field(default=503, ge=200, le=599)
    percent: Percent = 0.0


class FaultDelay(BaseModel):
    model_config = _model()

    duration: PositiveDuration = 1.0
    percent: Percent = 0.0


class FaultInjection(BaseModel):
    """For drills: answer ``abort.status`` to ``abort.percent`` of requests, hold
    ``delay.percent`` of them for ``delay.duration`` before they go upstream."""

    model_config = _model()

    abort: FaultAbort | None = None
    delay: FaultDelay | None = None


# --------------------------------------------------------------------------------------------
# traffic_split


def _condition(value: Any) -> Any:
    """A plain value is an equality test: ``X-Canary: "1"`` (numbers and true/false as written)."""
    if isinstance(value, bool):
        return {"equals": str(value).lower()}
    if isinstance(value, str | int | float):
        return {"equals": str(value)}
    return value


class Condition(BaseModel):
    """One test on a header, cookie or query parameter: exactly one of ``equals`` (the whole
    value), ``regex`` (a search in the value; anchor it with ^ and $ for a whole match) or
    ``present`` (true: the name is there, whatever its value; false: it is absent)."""

    model_config = _model()

    equals: str | None = None
    regex: Regex | None = None
    present: bool | None = None

    @model_validator(mode="after")
    def _one(self) -> Condition:
        given = [k for k in ("equals", "regex", "present") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                'write a value to compare ("1"), or exactly one of {equals: ...}, '
                "{regex: ...}, {present: true|false}"
                + (f"; got {' and '.join(given)}" if given else "")
            )
        return self


Conditions = dict[str, Annotated[Condition, BeforeValidator(_condition)]]


def _prefixes(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class When(BaseModel):
    """What a request must look like for a rule to apply; every condition given must hold.
    Within ``header``/``cookie``/``query`` every name listed must match; ``path_prefix`` is one
    prefix or a list (any of them) of the path the client asked for (before any rewrite)."""

    model_config = _model()

    header: Conditions = Field(default_factory=dict)
    cookie: Conditions = Field(default_factory=dict)
    query: Conditions = Field(default_factory=dict)
    path_prefix: Annotated[list[str], BeforeValidator(_prefixes)] = Field(default_factory=list)

    @field_validator("header")
    @classmethod
    def _header_names(cls, value: dict[str, Condition]) -> dict[str, Condition]:
        for name in value:
            if not _is_token(name):
                raise SchemaValueError(f"not an HTTP header name: {name!r}", (name,), on_key=True)
        return value

    @field_validator("cookie", "query")
    @classmethod
    def _names(cls, value: dict[str, Condition]) -> dict[str, Condition]:
        for name in value:
            if not name:
                raise ValueError("a cookie or query parameter name cannot be empty")
        return value

    @field_validator("path_prefix")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        for index, prefix in enumerate(value):
            if not prefix.startswith("/") or any(ch.isspace() or ch in "?#" for ch in prefix):
                raise SchemaValueError(
                    f"a path prefix starts with / and has no spaces, ? or #, got {prefix!r}",
                    (index,),
                )
        return value

    @model_validator(mode="after")
    def _something(self) -> When:
        if not (self.header or self.cookie or self.query or self.path_prefix):
            raise ValueError(
                "when needs at least one of header, cookie, query, path_prefix "
                "(leave when out for a rule that takes every request)"
            )
        return self


def _sticky(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    kind, _, name = value.partition(":")
    if kind == "ip" and not name:
        return value
    if kind in ("header", "cookie") and name.strip():
        if kind == "header" and not _is_token(name):
            raise ValueError(f"not an HTTP header name in sticky: {name!r}")
        return value
    raise ValueError(f"sticky is ip, header:<name> or cookie:<name>, got {value!r}")


Sticky = Annotated[str, BeforeValidator(_sticky)]


class WeightedUpstream(BaseModel):
    """One side of a weighted split; without ``upstream`` it is the route's own upstream."""

    model_config = _model()

    upstream: str | None = None
    weight: Int = Field(ge=0, le=1_000_000)


class SplitRule(BaseModel):
    """``when`` (optional: without it the rule takes every request that reaches it) and where
    the request goes: one ``upstream``, or ``weighted`` shares (``sticky`` keeps a user on one
    side)."""

    model_config = _model()

    when: When | None = None
    upstream: str | None = None
    weighted: list[WeightedUpstream] | None = None
    sticky: Sticky | None = None

    @field_validator("weighted")
    @classmethod
    def _weights(cls, value: list[WeightedUpstream] | None) -> list[WeightedUpstream] | None:
        if value is not None:
            if not value:
                raise ValueError("list at least one {upstream: NAME, weight: N}")
            if sum(w.weight for w in value) == 0:
                raise ValueError(
                    "the weights are all 0, so no request could be sent; give at least one "
                    "a weight above 0"
                )
        return value

    @model_validator(mode="after")
    def _target(self) -> SplitRule:
        if (self.upstream is None) == (self.weighted is None):
            raise ValueError(
                "a rule sends its requests to one place: write either upstream: NAME or "
                "weighted: [{upstream: NAME, weight: N}, {weight: M}]"
            )
        if self.sticky is not None and self.weighted is None:
            raise SchemaValueError(
                "sticky only applies to a weighted rule (this one always picks one upstream)",
                ("sticky",),
            )
        return self


class TrafficSplit(BaseModel):
    """Ordered rules; the first whose ``when`` matches picks the upstream of the request, else
    the route's own upstream serves it. ``sticky`` is the default of every weighted rule."""

    model_config = _model()

    rules: list[SplitRule] = Field(min_length=1)
    sticky: Sticky | None = None


# --------------------------------------------------------------------------------------------
# mirror


class Mirror(BaseModel):
    """Copy ``percent`` of the requests to ``upstream`` in the background; the answers are
    thrown away and the client never waits for them. Bodies of known length up to
    ``max_body_bytes`` are copied (larger or chunked ones are not mirrored); beyond
    ``max_in_flight`` unanswered copies new ones are dropped."""

    model_config = _model()

    upstream: str
    percent: Percent = 1.0
    max_body_bytes: Size = 64 * 1024
    max_in_flight: Int = Field(default=100, ge=1, le=100_000)


# --------------------------------------------------------------------------------------------
# cross-references


def _get(obj: object, key: str) -> object:
    if isinstance(obj, dict):
        return obj.get(key)
    if isinstance(obj, BaseModel):
        return getattr(obj, key, None)
    return None


def upstream_reference_problems(plugins: object, upstreams: list[str]) -> list[tuple[Loc, str]]:
    """Upstream names used by the traffic plugins of one ``plugins:`` section (raw YAML data or
    a validated ``PluginsConfig``) that are not in ``upstreams``; locations are below the
    section (``("traffic_split", "rules", 1, "upstream")``). Values of the wrong type are
    skipped: the schema reports them."""
    found: list[tuple[Loc, str]] = []

    def check(name: object, loc: Loc) -> None:
        if isinstance(name, str) and name not in upstreams:
            defined = ", ".join(upstreams) or "none"
            found.append(
                (
                    loc,
                    f"unknown upstream {name!r}{_suggest(name, upstreams)} "
                    f"(defined under upstreams: {defined})",
                )
            )

    split = _get(plugins, "traffic_split")
    rules = _get(split, "rules")
    if isinstance(rules, list):
        for i, rule in enumerate(rules):
            check(_get(rule, "upstream"), ("traffic_split", "rules", i, "upstream"))
            weighted = _get(rule, "weighted")
            if isinstance(weighted, list):
                for j, side in enumerate(weighted):
                    check(
                        _get(side, "upstream"),
                        ("traffic_split", "rules", i, "weighted", j, "upstream"),
                    )
    check(_get(_get(plugins, "mirror"), "upstream"), ("mirror", "upstream"))
    return found
