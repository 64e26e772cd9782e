"""The analytics rows in PostgreSQL, shared by several gateways (``analytics.store: postgres``).

Needs the ``postgres`` extra (psycopg 3). Like the SQLite backend it is used from one thread (the
recorder's writer, or its reader) with a plain synchronous connection, opened on first use and
dropped after a connection failure, so the next flush reconnects once the server is back.

Each gateway writes its own rows (the key is dimension, minute, name and ``gateway_id``); a
flush that meets its own earlier row for the minute adds to it: counts are summed and the
histograms (``bigint[]``, one element per bucket) merged element-wise in the ``ON CONFLICT``
clause, so a query summing every gateway's rows recomputes percentiles from the merged buckets.
Rows are written sorted by key, so two writers with the same ``gateway_id`` lock them in one order
(no deadlock). The table is created under an advisory lock (gateways may start together).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from piuptime.observe.analytics import Row, StoreError

_SCHEMA_LOCK = 0x70697570  # pg_advisory_xact_lock key for creating the table ("piup")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS analytics_minutes (
    dim text NOT NULL, minute bigint NOT NULL, name text NOT NULL, gateway text NOT NULL,
    requests bigint NOT NULL, errors_4xx bigint NOT NULL, errors_5xx bigint NOT NULL,
    bytes bigint NOT NULL, ms_sum double precision NOT NULL, hist bigint[] NOT NULL,
    PRIMARY KEY (dim, minute, name, gateway));
CREATE INDEX IF NOT EXISTS analytics_minutes_minute ON analytics_minutes (minute);
"""

_UPSERT = """
INSERT INTO analytics_minutes AS t
    (dim, minute, name, gateway, requests, errors_4xx, errors_5xx, bytes, ms_sum, hist)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::bigint[])
ON CONFLICT (dim, minute, name, gateway) DO UPDATE SET
    requests = t.requests + EXCLUDED.requests,
    errors_4xx = t.errors_4xx + EXCLUDED.errors_4xx,
    errors_5xx = t.errors_5xx + EXCLUDED.errors_5xx,
    bytes = t.bytes + EXCLUDED.bytes,
    ms_sum = t.ms_sum + EXCLUDED.ms_sum,
    hist = ARRAY(
        SELECT COALESCE(a, 0) + COALESCE(b, 0)
        FROM unnest(t.hist, EXCLUDED.hist) WITH ORDINALITY AS u(a, b, i)
        ORDER BY i)
"""


def check_driver() -> None:
    """Fail early, with the fix, when psycopg is not installed (the config check says the same,
    with the position in the file)."""
    from piuptime.config.analytics import INSTALL_HINT

    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"analytics.{INSTALL_HINT}") from exc


def _trim(hist: Sequence[int]) -> list[int]:
    end = len(hist)
    while end and not hist[end - 1]:
        end -= 1
    return list(hist[:end])


class PostgresBackend:
    """The rows in PostgreSQL (``analytics_minutes`` in the DSN's database and search path)."""

    def __init__(
        self,
        dsn: str,
        *,
        connect_timeout: float = 3.0,
        statement_timeout: float = 10.0,
    ) -> None:
        self.dsn = dsn
        self.description = "postgres"
        self.connect_timeout = connect_timeout
        self.statement_timeout = statement_timeout
        self._conn: Any = None

    def _connection(self) -> Any:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        import psycopg

        try:
            conn = psycopg.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=max(1, round(self.connect_timeout)),
                application_name="piuptime-analytics",
            )
        except psycopg.Error as exc:
            raise StoreError(_reason(exc), f"postgres: {_first_line(exc)}") from exc
        try:
            conn.execute(f"SET statement_timeout = {int(self.statement_timeout * 1000)}")
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                conn.execute(_SCHEMA)
        except psycopg.Error as exc:
            conn.close()
            raise StoreError(_reason(exc), f"postgres: {_first_line(exc)}") from exc
        self._conn = conn
        return conn

    def _fail(self, exc: Exception) -> StoreError:
        """Drop a broken connection (reconnect next time) and describe the failure."""
        import psycopg

        if isinstance(exc, psycopg.OperationalError) or (
            self._conn is not None and self._conn.broken
        ):
            self.close()
        return StoreError(_reason(exc), f"postgres: {_first_line(exc)}")

    def write(self, rows: Sequence[Row], gateway: str) -> None:
        import psycopg

        conn = self._connection()
        params = [
            (dim, minute, name, gateway, n, e4, e5, nbytes, ms, _trim(hist))
            for dim, minute, name, n, e4, e5, nbytes, ms, hist in rows
        ]
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(_UPSERT, params)
        except psycopg.Error as exc:
            raise self._fail(exc) from exc

    def delete_before(self, minute: int) -> int:
        import psycopg

        conn = self._connection()
        try:
            with conn.transaction():
                cur = conn.execute("DELETE FROM analytics_minutes WHERE minute < %s", (minute,))
                return int(cur.rowcount)
        except psycopg.Error as exc:
            raise self._fail(exc) from exc

    def read(self, dim: str, since: int, until: int | None, name: str | None) -> list[Row]:
        import psycopg

        conn = self._connection()
        sql = (
            "SELECT dim, minute, name, requests, errors_4xx, errors_5xx, bytes, ms_sum, hist "
            "FROM analytics_minutes WHERE dim = %s AND minute >= %s AND minute < %s"
        )
        args: list[Any] = [dim, since, until if until is not None else 2**62]
        if name is not None:
            sql += " AND name = %s"
            args.append(name)
        try:
            raw = conn.execute(sql, args).fetchall()
        except psycopg.Error as exc:
            raise self._fail(exc) from exc
        return [(*r[:8], list(r[8])) for r in raw]

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


def _reason(exc: Exception) -> str:
    import psycopg
    from psycopg import errors

    if isinstance(exc, errors.DiskFull | errors.OutOfMemory):
        return "disk_full"
    if isinstance(exc, errors.LockNotAvailable | errors.DeadlockDetected | errors.QueryCanceled):
        return "locked"
    if isinstance(exc, errors.ReadOnlySqlTransaction):
        return "read_only"
    if isinstance(exc, psycopg.OperationalError):
        return "unavailable"
    return "error"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
