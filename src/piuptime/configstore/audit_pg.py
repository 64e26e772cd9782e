"""The admin audit log in PostgreSQL: used when the config store is PostgreSQL, so the gateways
that share a configuration share one record of who changed it (``piuptime.admin.audit``
describes the interface and the SQLite log beside it).

Table ``admin_audit`` (the columns of the SQLite one; ``gateway`` tells the writers apart). The
log runs its statements on the config store's connection (a gateway holds two connections to
PostgreSQL, not three). When a row cannot be written the change has already happened: the entry
goes to the process log at ERROR level, ``failures_total`` counts it and ``record`` returns None.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson
import psycopg

from piuptime.admin.audit import Actor, AuditEntry, gateway_name

from .base import StoreUnavailable
from .postgres import PostgresConfigStore

__all__ = ["PostgresAuditLog"]

log = logging.getLogger("piuptime.admin.audit")

_SCHEMA = [
    "SELECT pg_advisory_xact_lock(hashtext('piuptime_audit_schema'))",
    "CREATE TABLE IF NOT EXISTS admin_audit ("
    " id bigserial PRIMARY KEY, time float8 NOT NULL, actor text NOT NULL,"
    " address text NOT NULL, action text NOT NULL, target text NOT NULL, detail json NOT NULL,"
    " result text NOT NULL, gateway text NOT NULL)",
    "CREATE INDEX IF NOT EXISTS admin_audit_action ON admin_audit (action, id)",
]


class PostgresAuditLog:
    """``AuditLog`` (see ``piuptime.admin.audit``) on the config store's PostgreSQL."""

    def __init__(self, store: PostgresConfigStore) -> None:
        self.store = store
        self.failures_total = 0
        self.gateway = gateway_name()
        self._ready = False

    async def _schema(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self._ready:
            return
        async with conn.transaction():
            for statement in _SCHEMA:
                await conn.execute(statement)
        self._ready = True

    async def record(
        self,
        actor: Actor,
        action: str,
        target: str,
        detail: Mapping[str, Any],
        result: str = "ok",
    ) -> AuditEntry | None:
        data: dict[str, Any] = orjson.loads(orjson.dumps(dict(detail), default=str))
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

        async def insert(conn: psycopg.AsyncConnection[Any]) -> int:
            await self._schema(conn)
            cur = await conn.execute(
                "INSERT INTO admin_audit (time, actor, address, action, target, detail, result,"
                " gateway) VALUES (%s, %s, %s, %s, %s, %s::json, %s, %s) RETURNING id",
                row,
            )
            found = await cur.fetchone()
            return int(found[0]) if found is not None else 0

        try:
            rowid = await self.store.call(insert, retry=False)
        except StoreUnavailable as exc:
            self.failures_total += 1
            lost: dict[str, Any] = {"actor": actor.name, "address": actor.address}
            lost |= {"action": action, "target": target, "detail": data, "result": result}
            log.error(
                "audit log unavailable (%s); the change was: %s",
                exc,
                orjson.dumps(lost, default=str).decode(),
            )
            return None
        return AuditEntry(
            rowid, now, actor.name, actor.address, action, target, data, result, self.gateway
        )

    async def list(
        self, limit: int = 100, *, before: int | None = None, action: str | None = None
    ) -> list[AuditEntry]:
        """Newest first. Raises :class:`StoreUnavailable` when PostgreSQL cannot be read."""
        where: list[str] = []
        args: list[Any] = []
        if before is not None:
            where.append("id < %s")
            args.append(before)
        if action is not None:
            where.append("action = %s")
            args.append(action)
        sql = (
            "SELECT id, time, actor, address, action, target, detail::text, result, gateway"
            " FROM admin_audit"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY id DESC LIMIT %s"
        )

        async def select(conn: psycopg.AsyncConnection[Any]) -> list[AuditEntry]:
            await self._schema(conn)
            cur = await conn.execute(sql.encode(), (*args, limit))
            return [
                AuditEntry(int(i), float(t), a, ad, ac, tg, orjson.loads(d), r, g)
                for i, t, a, ad, ac, tg, d, r, g in await cur.fetchall()
            ]

        return await self.store.call(select, retry=True)

    async def aclose(self) -> None:
        return None  # the connection is the config store's; the app closes it
