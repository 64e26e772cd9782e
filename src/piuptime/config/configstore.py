"""The ``config_store:`` section: where routes, upstreams, consumers and global plugins live.

- ``kind: file`` (default): the YAML file itself, as always (Kong's DB-less mode). The admin API
  reads the configuration but refuses changes: edit the file and reload.
- ``kind: sqlite``: an embedded database file (``path``, default ``store.sqlite``), one gateway.
- ``kind: postgres``: a PostgreSQL database (``dsn``) that several gateways share; a change made
  through any of them reaches all of them through LISTEN/NOTIFY.

In the database kinds the file keeps what a process needs to start (``gateway``, ``admin``,
``store``, ``config_store``); the database holds ``upstreams``, ``consumers``, ``routes`` and
``plugins``, seeded from the file when it is empty. See ``docs/config-store.md``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, field_validator, model_validator

from .analytics import psycopg_missing
from .types import PathStr, PositiveDuration, SchemaValueError, _model

__all__ = ["ConfigStoreConfig"]

_DSN_HINT = (
    "expected a PostgreSQL URL like postgresql://piuptime:${PGPASSWORD}@10.0.0.2:5432/piuptime"
)


class ConfigStoreConfig(BaseModel):
    """Where the gateway's routes, upstreams, consumers and global plugins come from."""

    model_config = _model()

    kind: Literal["file", "sqlite", "postgres"] = "file"
    # sqlite: the database file (default: store.sqlite, beside the durable state)
    path: PathStr | None = None
    # postgres: postgresql://user:password@host:5432/dbname (libpq URL; query options allowed)
    dsn: str | None = None
    # a safety net beside NOTIFY (and the only signal for sqlite): the stored version is checked
    # this often and a newer one is loaded
    poll_interval: PositiveDuration = 5.0

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"{_DSN_HINT}, got {value!r}")
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("expected a file path for the SQLite database, got an empty string")
        return value

    @model_validator(mode="after")
    def _fits_kind(self) -> ConfigStoreConfig:
        if self.kind == "postgres" and self.dsn is None:
            raise SchemaValueError(
                f"kind: postgres needs dsn: the database to share ({_DSN_HINT})", ("kind",)
            )
        if self.kind == "postgres" and psycopg_missing():
            raise SchemaValueError(
                "kind: postgres needs psycopg: pip install 'piuptime[postgres]'", ("kind",)
            )
        if self.kind != "postgres" and self.dsn is not None:
            raise SchemaValueError(
                f"dsn is only used with kind: postgres (kind is {self.kind})", ("dsn",), on_key=True
            )
        if self.kind != "sqlite" and self.path is not None:
            raise SchemaValueError(
                f"path is only used with kind: sqlite (kind is {self.kind})", ("path",), on_key=True
            )
        return self
