"""The config document in PostgreSQL, shared by several gateways (psycopg 3, async).

A write is one transaction: lock the version row (``SELECT ... FOR UPDATE``), check the version
the change was based on, upsert and delete the entities that changed, bump the version, append to
the history and ``NOTIFY piuptime_config, '<version>'``. PostgreSQL delivers the notification at
commit, to every gateway's listener, so no gateway ever sees a version before it is readable.

Each gateway keeps two connections: one for reads and writes (opened on first use, opened again
after a failure), and one that ``LISTEN``\\s. The listener calls back with the stored version when
it connects (catching up on anything missed while it was away), on every notification, and every
``poll_interval`` when nothing came (the safety net, which also proves the connection alive). When
the connection drops, the gateway keeps serving what it has and reconnects with exponential
back-off (0.1 s doubling to 5 s, with jitter).

Tables::

    piuptime_config          (id = 1, version, updated_at)
    piuptime_config_entities (section, name, position, body json)   -- one row per entity
    piuptime_config_history  (version, at, actor, action, target, detail json)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
import psycopg

from .base import (
    Change,
    ConfigStore,
    EntityDocument,
    HistoryEntry,
    OnVersion,
    Snapshot,
    StoreUnavailable,
    VersionConflict,
    document_rows,
    row_changes,
    rows_document,
)

__all__ = ["CHANNEL", "PostgresConfigStore", "safe_dsn"]

log = logging.getLogger("piuptime.configstore")

T = TypeVar("T")

#: The NOTIFY channel; the payload is the new version.
CHANNEL = "piuptime_config"
LISTENER_NAME = "piuptime-config-listener"

_SCHEMA = [
    "SELECT pg_advisory_xact_lock(hashtext('piuptime_config_schema'))",
    "CREATE TABLE IF NOT EXISTS piuptime_config ("
    " id int PRIMARY KEY CHECK (id = 1), version bigint NOT NULL, updated_at timestamptz)",
    "INSERT INTO piuptime_config (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
    "CREATE TABLE IF NOT EXISTS piuptime_config_entities ("
    " section text NOT NULL, name text NOT NULL, position int NOT NULL, body json NOT NULL,"
    " PRIMARY KEY (section, name))",
    "CREATE TABLE IF NOT EXISTS piuptime_config_history ("
    " version bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(), actor text NOT NULL,"
    " action text NOT NULL, target text NOT NULL, detail json NOT NULL)",
]

_PASSWORD = re.compile(r"(://[^:/@]*):[^@/]*@")


def safe_dsn(dsn: str) -> str:
    """``dsn`` with its password replaced by ``***`` (for messages)."""
    return _PASSWORD.sub(r"\1:***@", dsn)


class PostgresConfigStore(ConfigStore):
    kind = "postgres"

    def __init__(
        self,
        dsn: str,
        *,
        connect_timeout: float = 5.0,
        query_timeout: float = 10.0,
        max_backoff: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self.query_timeout = query_timeout
        self.max_backoff = max_backoff
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()
        #: the listener's state, for metrics and tests
        self.listening = False
        self.reconnects = 0

    def describe(self) -> str:
        return f"postgres {safe_dsn(self.dsn)}"

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return StoreUnavailable(f"{safe_dsn(self.dsn)}: {text}")

    async def _connect(self, **extra: Any) -> psycopg.AsyncConnection[Any]:
        conn = await psycopg.AsyncConnection.connect(
            self.dsn,
            autocommit=True,
            connect_timeout=max(1, round(self.connect_timeout)),
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
            **extra,
        )
        return conn

    async def call(
        self, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]], *, retry: bool
    ) -> T:
        """Run ``fn`` on the shared connection (one call at a time). A broken connection is
        dropped; a read is tried once more on a new one."""
        async with self._lock:
            for attempt in range(2 if retry else 1):
                try:
                    if self._conn is None or self._conn.closed or self._conn.broken:
                        async with asyncio.timeout(self.connect_timeout + 1):
                            self._conn = await self._connect(application_name="piuptime-config")
                    async with asyncio.timeout(self.query_timeout):
                        return await fn(self._conn)
                except (psycopg.OperationalError, OSError, TimeoutError) as exc:
                    await self._drop()
                    if attempt or not retry:
                        raise self._unavailable(exc) from None
                except psycopg.Error as exc:
                    raise self._unavailable(exc) from None
            raise AssertionError("unreachable")

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def open(self) -> None:
        async def create(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.transaction():
                for statement in _SCHEMA:
                    await conn.execute(statement)

        await self.call(create, retry=True)

    async def load(self) -> Snapshot:
        async def read(conn: psycopg.AsyncConnection[Any]) -> Snapshot:
            cur = await conn.execute(
                "SELECT c.version, extract(epoch FROM c.updated_at)::float8,"
                " e.section, e.name, e.position, e.body::text"
                " FROM piuptime_config c LEFT JOIN piuptime_config_entities e ON true"
                " WHERE c.id = 1"
            )
            rows = await cur.fetchall()
            if not rows:
                return Snapshot(0, rows_document([]))
            version, updated = rows[0][0], rows[0][1]
            entities = [(s, n, p, b) for _, _, s, n, p, b in rows if s is not None]
            return Snapshot(int(version), rows_document(entities), updated)

        return await self.call(read, retry=True)

    async def version(self) -> int:
        return await self.call(_read_version, retry=True)

    async def write(self, document: EntityDocument, *, base_version: int, change: Change) -> int:
        wanted = document_rows(document)
        detail = orjson.dumps(change.detail).decode()

        async def write(conn: psycopg.AsyncConnection[Any]) -> int:
            async with conn.transaction():
                cur = await conn.execute(
                    "SELECT version FROM piuptime_config WHERE id = 1 FOR UPDATE"
                )
                row = await cur.fetchone()
                current = int(row[0]) if row is not None else 0
                if current != base_version:
                    raise VersionConflict(base_version, current)
                cur = await conn.execute(
                    "SELECT section, name, position, body::text FROM piuptime_config_entities"
                )
                stored = {(s, n): (p, b) for s, n, p, b in await cur.fetchall()}
                upserts, deletes = row_changes(stored, wanted)
                async with conn.cursor() as c:
                    if deletes:
                        await c.executemany(
                            "DELETE FROM piuptime_config_entities WHERE section = %s AND name = %s",
                            deletes,
                        )
                    if upserts:
                        await c.executemany(
                            "INSERT INTO piuptime_config_entities (section, name, position, body)"
                            " VALUES (%s, %s, %s, %s::json) ON CONFLICT (section, name) DO UPDATE"
                            " SET position = excluded.position, body = excluded.body",
                            upserts,
                        )
                version = current + 1
                await conn.execute(
                    "UPDATE piuptime_config SET version = %s, updated_at = now() WHERE id = 1",
                    (version,),
                )
                await conn.execute(
                    "INSERT INTO piuptime_config_history (version, actor, action, target, detail)"
                    " VALUES (%s, %s, %s, %s, %s::json)",
                    (version, change.actor, change.action, change.target, detail),
                )
                await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(version)))
            return version

        return await self.call(write, retry=False)

    async def history(self, limit: int = 50) -> list[HistoryEntry]:
        async def read(conn: psycopg.AsyncConnection[Any]) -> list[HistoryEntry]:
            cur = await conn.execute(
                "SELECT version, extract(epoch FROM at)::float8, actor, action, target,"
                " detail::text FROM piuptime_config_history ORDER BY version DESC LIMIT %s",
                (limit,),
            )
            return [
                HistoryEntry(int(v), float(at), a, act, t, orjson.loads(d))
                for v, at, a, act, t, d in await cur.fetchall()
            ]

        return await self.call(read, retry=True)

    async def aclose(self) -> None:
        async with self._lock:
            await self._drop()

    # -- LISTEN ------------------------------------------------------------------------------

    def watch(self, on_version: OnVersion, interval: float) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self._listen(on_version, interval))

    async def _listen(self, on_version: OnVersion, interval: float) -> None:
        backoff = 0.1
        failing = False
        while True:
            try:
                async with asyncio.timeout(self.connect_timeout + 1):
                    conn = await self._connect(application_name=LISTENER_NAME)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                if not failing:
                    log.warning(
                        "config store: cannot connect the listener (%s); serving the last "
                        "configuration, retrying",
                        self._unavailable(exc),
                    )
                failing = True
            else:
                try:
                    async with conn:
                        await conn.execute(f"LISTEN {CHANNEL}")
                        if failing:
                            log.info("config store: listener connected again")
                        failing = False
                        backoff = 0.1
                        self.listening = True
                        on_version(await self._poll_version(conn))
                        while True:
                            async for note in conn.notifies(timeout=interval):
                                if note.payload.isdigit():
                                    on_version(int(note.payload))
                            on_version(await self._poll_version(conn))
                except (psycopg.Error, OSError, TimeoutError) as exc:
                    log.warning(
                        "config store: the listener connection dropped (%s); serving the last "
                        "configuration, reconnecting",
                        self._unavailable(exc),
                    )
                    failing = True
                finally:
                    self.listening = False
                self.reconnects += 1
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, self.max_backoff)

    async def _poll_version(self, conn: psycopg.AsyncConnection[Any]) -> int:
        async with asyncio.timeout(self.query_timeout):
            return await _read_version(conn)


async def _read_version(conn: psycopg.AsyncConnection[Any]) -> int:
    cur = await conn.execute("SELECT version FROM piuptime_config WHERE id = 1")
    row = await cur.fetchone()
    return int(row[0]) if row is not None else 0
