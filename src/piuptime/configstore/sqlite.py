"""The config document in a SQLite file (stdlib ``sqlite3``, WAL mode): one gateway.

Every call runs on one dedicated worker thread that owns the connection, so the event loop never
waits on the disk. A write is one ``BEGIN IMMEDIATE`` transaction: check the version, upsert and
delete the entities that changed, bump the version, append to the history. Changes made by
another process (``piuptime config import`` against the same file) are seen by the version poll.

Tables (beside the durable state's ``state_*`` tables when the file is ``store.sqlite``)::

    piuptime_config          (id = 1, version, updated_at)
    piuptime_config_entities (section, name, position, body JSON)   -- one row per entity
    piuptime_config_history  (version, at, actor, action, target, detail JSON)
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import orjson

from .base import (
    Change,
    ConfigStore,
    EntityDocument,
    HistoryEntry,
    Snapshot,
    StoreUnavailable,
    VersionConflict,
    document_rows,
    row_changes,
    rows_document,
)

__all__ = ["SQLiteConfigStore"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS piuptime_config (
    id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL, updated_at REAL);
INSERT OR IGNORE INTO piuptime_config (id, version, updated_at) VALUES (1, 0, NULL);
CREATE TABLE IF NOT EXISTS piuptime_config_entities (
    section TEXT NOT NULL, name TEXT NOT NULL, position INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (section, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS piuptime_config_history (
    version INTEGER PRIMARY KEY, at REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    target TEXT NOT NULL, detail TEXT NOT NULL);
"""


class SQLiteConfigStore(ConfigStore):
    kind = "sqlite"

    def __init__(self, path: str, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="piuptime-configdb")
        self._conn: sqlite3.Connection | None = None

    def describe(self) -> str:
        return f"sqlite {self.path}"

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            try:
                if self._conn is None:
                    self._conn = self._connect()
                return fn(self._conn)
            except (sqlite3.OperationalError, sqlite3.DatabaseError) as exc:
                if self._conn is not None and self._conn.in_transaction:
                    try:
                        self._conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise StoreUnavailable(f"{self.path}: {exc}") from None

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # a config change survives a power loss
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    async def open(self) -> None:
        await self._run(lambda conn: None)

    async def load(self) -> Snapshot:
        def read(conn: sqlite3.Connection) -> Snapshot:
            conn.execute("BEGIN")  # one snapshot for the version and the rows
            try:
                version, updated = conn.execute(
                    "SELECT version, updated_at FROM piuptime_config WHERE id = 1"
                ).fetchone()
                rows = conn.execute(
                    "SELECT section, name, position, body FROM piuptime_config_entities"
                ).fetchall()
            finally:
                conn.execute("COMMIT")
            return Snapshot(int(version), rows_document(rows), updated)

        return await self._run(read)

    async def version(self) -> int:
        def read(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT version FROM piuptime_config WHERE id = 1").fetchone()
            return int(row[0])

        return await self._run(read)

    async def write(self, document: EntityDocument, *, base_version: int, change: Change) -> int:
        wanted = document_rows(document)
        detail = orjson.dumps(change.detail).decode()

        def write(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            try:
                (current,) = conn.execute(
                    "SELECT version FROM piuptime_config WHERE id = 1"
                ).fetchone()
                if current != base_version:
                    raise VersionConflict(base_version, int(current))
                stored = {
                    (s, n): (p, b)
                    for s, n, p, b in conn.execute(
                        "SELECT section, name, position, body FROM piuptime_config_entities"
                    )
                }
                upserts, deletes = row_changes(stored, wanted)
                conn.executemany(
                    "DELETE FROM piuptime_config_entities WHERE section = ? AND name = ?", deletes
                )
                conn.executemany(
                    "INSERT INTO piuptime_config_entities (section, name, position, body) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (section, name) DO UPDATE SET "
                    "position = excluded.position, body = excluded.body",
                    upserts,
                )
                version = int(current) + 1
                at = time.time()
                conn.execute(
                    "UPDATE piuptime_config SET version = ?, updated_at = ? WHERE id = 1",
                    (version, at),
                )
                conn.execute(
                    "INSERT INTO piuptime_config_history "
                    "(version, at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?, ?)",
                    (version, at, change.actor, change.action, change.target, detail),
                )
                conn.execute("COMMIT")
                return version
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        return await self._run(write)

    async def history(self, limit: int = 50) -> list[HistoryEntry]:
        def read(conn: sqlite3.Connection) -> list[HistoryEntry]:
            rows: list[Any] = conn.execute(
                "SELECT version, at, actor, action, target, detail FROM piuptime_config_history "
                "ORDER BY version DESC LIMIT ?",
                (limit,),
            ).fetchall()
            return [HistoryEntry(v, at, a, act, t, orjson.loads(d)) for v, at, a, act, t, d in rows]

        return await self._run(read)

    async def aclose(self) -> None:
        def close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, close)
        finally:
            self._executor.shutdown(wait=False)
