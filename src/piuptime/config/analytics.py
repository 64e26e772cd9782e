"""Schema of the ``analytics:`` section (per-minute request aggregates and the recent ring).

The section turns analytics on, like ``admin:`` turns on the admin listener: without it nothing
is recorded or written. ``analytics:`` (empty), ``analytics: true`` and ``analytics: {}`` all mean
"on, with the defaults"; ``analytics: false`` or ``{enabled: false}`` keeps it off. See
``docs/analytics.md``.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, field_validator, model_validator

from .types import Int, PathStr, PositiveDuration, SchemaValueError, _model

__all__ = ["INSTALL_HINT", "AnalyticsConfig", "AnalyticsSection", "psycopg_missing"]

_GATEWAY_ID = re.compile(r"[A-Za-z0-9_.:@\-]{1,128}\Z")
_DSN_URL = ("postgresql://", "postgres://")
INSTALL_HINT = "store: postgres needs psycopg: pip install 'piuptime[postgres]'"


def psycopg_missing() -> bool:
    """Whether psycopg cannot be imported (looked up, not imported: validation stays cheap)."""
    try:
        return importlib.util.find_spec("psycopg") is None
    except (ImportError, ValueError):
        return True


class AnalyticsConfig(BaseModel):
    """Where and how the per-minute aggregates are kept.

    ``store``: ``sqlite`` (the ``sqlite`` file, by default ``store.sqlite``) or ``postgres``
    (``dsn``; several gateways write into one database and their numbers add up).
    ``retention``: older minutes are deleted. ``flush_interval``: how often the pending aggregates
    are written, in one transaction. ``recent``: how many recent requests the in-memory ring keeps
    for inspection (0: none). ``gateway_id``: this gateway's name in the rows (the host name by
    default).
    """

    model_config = _model()

    enabled: bool = True
    store: Literal["sqlite", "postgres"] = "sqlite"
    sqlite: PathStr | None = None  # default: store.sqlite
    dsn: str | None = None  # postgresql://user@host:5432/db, or "host=... dbname=..."
    retention: PositiveDuration = 7 * 86400.0
    flush_interval: PositiveDuration = 10.0
    recent: Int = Field(default=1000, ge=0, le=1_000_000)
    gateway_id: str | None = None

    @classmethod
    def off(cls) -> AnalyticsConfig:
        """The value when the section is absent."""
        return cls(enabled=False)

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, value: str | None) -> str | None:
        if value is None:
            return None
        text = value.strip()
        if not text:
            raise ValueError(
                "expected a PostgreSQL connection string like postgresql://user@host:5432/db, "
                "got an empty string"
            )
        if not text.startswith(_DSN_URL) and "=" not in text:
            raise ValueError(
                "expected a PostgreSQL connection string like postgresql://user@host:5432/db "
                f"or 'host=... dbname=...', got {value!r}"
            )
        return text

    @field_validator("sqlite")
    @classmethod
    def _sqlite(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("expected a file path for the SQLite database, got an empty string")
        return value

    @field_validator("gateway_id")
    @classmethod
    def _gateway_id(cls, value: str | None) -> str | None:
        if value is not None and not _GATEWAY_ID.match(value):
            raise ValueError(
                "expected 1 to 128 letters, digits or . _ - : @ (this gateway's name in the "
                f"analytics rows), got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AnalyticsConfig:
        if self.store == "postgres" and self.dsn is None:
            raise SchemaValueError(
                "store: postgres needs dsn: (e.g. dsn: ${PIUPTIME_ANALYTICS_DSN} holding "
                "postgresql://user:password@host:5432/db)",
                ("store",),
            )
        if self.store == "postgres" and psycopg_missing():
            raise SchemaValueError(INSTALL_HINT, ("store",))
        if self.store == "sqlite" and self.dsn is not None:
            raise SchemaValueError(
                "dsn is for store: postgres; with store: sqlite set sqlite: (a file path) or "
                "leave it out to use store.sqlite",
                ("dsn",),
            )
        if self.store == "postgres" and self.sqlite is not None:
            raise SchemaValueError(
                "sqlite is for store: sqlite; with store: postgres only dsn is used",
                ("sqlite",),
            )
        if self.retention < 60:
            raise SchemaValueError(
                "must be at least 1m (aggregates are kept per minute)", ("retention",)
            )
        if self.flush_interval < 0.1 or self.flush_interval > 600:
            raise SchemaValueError("must be from 100ms to 10m", ("flush_interval",))
        return self


def _section(value: Any) -> Any:
    # "analytics:" with nothing below is null: the section is there, so it is on
    if value is None or value is True:
        return {}
    if value is False:
        return {"enabled": False}
    return value


#: The ``Config.analytics`` field type: a mapping, or ``true``/``false``/empty.
AnalyticsSection = Annotated[AnalyticsConfig, BeforeValidator(_section)]
