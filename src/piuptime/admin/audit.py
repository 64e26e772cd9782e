"""The admin audit log: every change made through the admin API, who made it and how it ended.

One entry per change (a reload, a cache purge, a create/update/delete of the database config
source): **who** (the name of the admin token used, ``anonymous`` when the listener has no token,
and the client address), **when** (wall-clock seconds), **what** (``action`` such as
``config.reload``, ``cache.purge``, ``route.update``; ``target``, the thing acted on; ``detail``,
a JSON object: the request, a before/after summary or a diff) and the **result** (``ok``, or a
short reason such as ``invalid`` or ``unavailable``). Reads (status, validate, analytics) are not
changes and are not logged.

The interface is small on purpose (:class:`AuditLog`): ``record`` and ``list``. Two
implementations live here:

- :class:`SQLiteAuditLog`: a table ``admin_audit`` in the gateway's SQLite file
  (``store.sqlite``), written on one dedicated worker thread (the event loop never waits on the
  disk). The file is opened on first use, so a gateway whose admin API changes nothing never
  creates it.
- :class:`MemoryAuditLog`: a bounded ring in memory, for tests and tools.

A PostgreSQL implementation (when the config source is PostgreSQL, shared by several gateways)
only needs the same two methods plus ``aclose``; the ``gateway`` column tells the writers apart.

When a row cannot be written (disk full, database locked past the busy timeout), the change has
already happened: the entry goes to the process log at ERROR level instead (so it lands in the
journal), ``failures_total`` counts it (``piuptime_admin_audit_failures_total``), and ``record``
returns None.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

__all__ = [
    "Actor",
    "AuditEntry",
    "AuditLog",
    "MemoryAuditLog",
    "SQLiteAuditLog",
    "gateway_name",
]

log = logging.getLogger("piuptime.admin.audit")


def gateway_name() -> str:
    """Which gateway wrote an entry: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Actor:
    """Who made a request: the token's name (``admin`` for ``admin.token``, a key of
    ``admin.tokens``, ``anonymous`` when the listener has no token) and the client address."""

    name: str
    address: str

    def __str__(self) -> str:
        return f"{self.name}@{self.address}"


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    time: float  # unix seconds
    actor: str
    address: str
    action: str
    target: str
    detail: dict[str, Any]
    result: str
    gateway: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time,
            "actor": self.actor,
            "address": self.address,
            "action": self.action,
            "target": self.target,
            "detail": self.detail,
            "result": self.result,
            "gateway": self.gateway,
        }


Entries = list[AuditEntry]


class AuditLog(Protocol):
    """Where changes are recorded. ``record`` never raises for a storage failure (it logs,
    counts and returns None); ``list`` returns the newest entries first."""

    failures_total: int

    async def record(
        self,
        actor: Actor,
        action: str,
        target: str,
        detail: Mapping[str, Any],
        result: str = "ok",
    ) -> AuditEntry | None: ...

    async def list(
        self, limit: int = 100, *, before: int | None = None, action: str | None = None
    ) -> Entries: ...

    async def aclose(self) -> None: ...


def _log_lost(actor: Actor, action: str, target: str, detail: Any, result: str, why: str) -> None:
    line = orjson.dumps(
        {
            "actor": actor.name,
            "address": actor.address,
            "action": action,
            "target": target,
            "detail": detail,
            "result": result,
        },
        default=str,
    ).decode()
    log.error("audit log unavailable (%s); the change was: %s", why, line)


class MemoryAuditLog:
    """The newest ``capacity`` entries, in memory (tests, tools, a gateway without a disk)."""

    def __init__(self, capacity: int = 1000) -> None:
        self._entries: collections.deque[AuditEntry] = collections.deque(maxlen=capacity)
        self._next = 1
        self.failures_total = 0
        self.gateway = gateway_name()

    async def record(
        self,
        actor: Actor,
        action: str,
        target: str,
        detail: Mapping[str, Any],
        result: str = "ok",
    ) -> AuditEntry | None:
        entry = AuditEntry(
            self._next,
            time.time(),
            actor.name,
            actor.address,
            action,
            target,
            _plain(detail),
            result,
            self.gateway,
        )
        self._next += 1
        self._entries.append(entry)
        return entry

    async def list(
        self, limit: int = 100, *, before: int | None = None, action: str | None = None
    ) -> Entries:
        out: Entries = []
        for entry in reversed(self._entries):
            if before is not None and entry.id >= before:
                continue
            if action is not None and entry.action != action:
                continue
            out.append(entry)
            if len(out) >= limit:
                break
        return out

    async def aclose(self) -> None:
        return None


def _plain(detail: Mapping[str, Any]) -> dict[str, Any]:
    """``detail`` as JSON-ready data (what a round trip through the database gives back)."""
    data: dict[str, Any] = orjson.loads(orjson.dumps(dict(detail), default=str))
    return data


_SCHEMA = """
CREATE TABLE IF NOT EXISTS admin_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    actor TEXT NOT NULL,
    address TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL,
    result TEXT NOT NULL,
    gateway TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS admin_audit_action ON admin_audit (action, id);
"""


@dataclass
class SQLiteAuditLog:
    """The audit table in the SQLite file at ``path``; every call runs on one worker thread
    that owns the connection (opened on first use, WAL mode, 5 s busy timeout)."""

    path: Path
    busy_timeout: float = 5.0
    failures_total: int = 0
    gateway: str = field(default_factory=gateway_name)
    _conn: sqlite3.Connection | None = field(default=None, init=False, repr=False)
    _closed: bool = field(default=False, init=False, repr=False)
    _executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="piuptime-audit"),
        init=False,
        repr=False,
    )

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
            )
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
            except sqlite3.Error:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def _insert(self, row: tuple[Any, ...]) -> int:
        conn = self._connection()
        cur = conn.execute(
            "INSERT INTO admin_audit (time, actor, address, action, target, detail, result, "
            "gateway) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            row,
        )
        return int(cur.lastrowid or 0)

    async def record(
        self,
        actor: Actor,
        action: str,
        target: str,
        detail: Mapping[str, Any],
        result: str = "ok",
    ) -> AuditEntry | None:
        data = _plain(detail)
        now = time.time()
        row = (
            now,
            actor.name,
            actor.address,
            action,
            target,
            orjson.dumps(data).decode(),
            result,
            self.gateway,
        )
        try:
            rowid = await self._run(self._insert, row)
        except (sqlite3.Error, OSError) as exc:
            self.failures_total += 1
            _log_lost(actor, action, target, data, result, f"{self.path}: {exc}")
            return None
        return AuditEntry(
            rowid, now, actor.name, actor.address, action, target, data, result, self.gateway
        )

    def _select(self, limit: int, before: int | None, action: str | None) -> list[tuple[Any, ...]]:
        conn = self._connection()
        where: list[str] = []
        args: list[Any] = []
        if before is not None:
            where.append("id < ?")
            args.append(before)
        if action is not None:
            where.append("action = ?")
            args.append(action)
        sql = (
            "SELECT id, time, actor, address, action, target, detail, result, gateway "
            "FROM admin_audit"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY id DESC LIMIT ?"
        )
        return list(conn.execute(sql, (*args, limit)).fetchall())

    async def list(
        self, limit: int = 100, *, before: int | None = None, action: str | None = None
    ) -> Entries:
        """Newest first. Raises ``sqlite3.Error``/``OSError`` when the file cannot be read."""
        rows = await self._run(self._select, limit, before, action)
        return [
            AuditEntry(r[0], r[1], r[2], r[3], r[4], r[5], orjson.loads(r[6]), r[7], r[8])
            for r in rows
        ]

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._run(self._close)
        finally:
            self._executor.shutdown(wait=False)
