"""Schema of the response cache plugin (``cache``)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from ..types import Duration, Int, PositiveDuration, SchemaValueError, Size, _model
from .transform import Networks

_ZONE = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")
_DEFAULT_STATUSES = (200, 203, 204, 301, 404, 410)
_NEVER = {
    206: "partial (range) responses are not cached",
    304: "a 304 is an answer to a conditional request, not a response to store",
}


class CachePurge(BaseModel):
    """Who may send ``PURGE`` to remove a cached URL: consumers in one of ``allow_groups``
    (set by an auth plugin) and/or clients whose address is in ``allow_ips``."""

    model_config = _model()

    allow_groups: list[str] = Field(default_factory=list)
    allow_ips: Networks = Field(default_factory=list)

    @model_validator(mode="after")
    def _someone(self) -> CachePurge:
        if not self.allow_groups and not self.allow_ips:
            raise ValueError(
                "list allow_groups and/or allow_ips (who may purge); leave purge out to refuse "
                "every PURGE"
            )
        return self


class Cache(BaseModel):
    """Cache GET (and HEAD) answers of this route, as a shared HTTP cache (RFC 9111): in this
    process (``store: memory``) or in Redis (``store: redis``), with stale-while-revalidate,
    stale-if-error, request coalescing and PURGE."""

    model_config = _model()

    # freshness
    ttl: PositiveDuration = 60.0  # when the response says nothing (or always, with override)
    override: bool = False  # ignore the response's freshness (max-age, Expires, no-cache)
    stale_while_revalidate: Duration = 0.0
    stale_if_error: Duration = 0.0
    statuses: list[Int] = Field(default_factory=lambda: list(_DEFAULT_STATUSES))
    # storage
    store: Literal["memory", "redis"] = "memory"
    zone: str | None = None  # the store's name (memory: shared by routes naming it); route name
    max_bytes: Size = 64 * 1024 * 1024
    max_entry_bytes: Size = 1024 * 1024
    # the key
    sort_query: bool = False
    ignore_query_params: list[str] = Field(default_factory=list)  # "*": the whole query
    per_consumer: bool = False
    # what may be stored / served
    cache_private: bool = False
    cache_set_cookie: bool = False
    respect_request_cache_control: bool = True
    invalidate_on_unsafe: bool = True
    # coalescing
    coalesce: bool = True
    lock_timeout: PositiveDuration = 5.0
    purge: CachePurge | None = None

    @field_validator("statuses")
    @classmethod
    def _statuses(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("list at least one status to cache, e.g. [200]")
        for status in value:
            if not 200 <= status <= 599:
                raise ValueError(f"expected HTTP statuses from 200 to 599, got {status}")
            if status in _NEVER:
                raise ValueError(f"{status} cannot be cached: {_NEVER[status]}")
        return sorted(set(value))

    @field_validator("zone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        if value is not None and not _ZONE.match(value):
            raise ValueError(
                f"expected a name of letters, digits, '_', '.' or '-' (at most 64), got {value!r}"
            )
        return value

    @field_validator("max_bytes")
    @classmethod
    def _max_bytes(cls, value: int) -> int:
        if value < 1024:
            raise ValueError(f"must be at least 1KiB, got {value} bytes")
        return value

    @field_validator("max_entry_bytes")
    @classmethod
    def _max_entry_bytes(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1 byte")
        return value

    @field_validator("ignore_query_params")
    @classmethod
    def _params(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name or any(ch in name for ch in "&= #"):
                raise ValueError(f"expected query parameter names (or '*'), got {name!r}")
        return value

    @model_validator(mode="after")
    def _sizes(self) -> Cache:
        if self.store == "memory" and self.max_entry_bytes > self.max_bytes:
            raise SchemaValueError(
                f"max_entry_bytes ({self.max_entry_bytes}) is larger than max_bytes "
                f"({self.max_bytes}): no response could ever be stored",
                ("max_entry_bytes",),
            )
        return self
