"""The audit log implementations (unit, a real SQLite file)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from piuptime.admin.audit import Actor, MemoryAuditLog, SQLiteAuditLog

ALICE = Actor("alice", "10.0.0.7")


async def test_sqlite_log_is_created_on_first_use_and_reads_newest_first(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "store.sqlite"
    audit = SQLiteAuditLog(path)
    assert not path.exists()  # nothing recorded, nothing created
    first = await audit.record(ALICE, "config.reload", "/etc/piuptime.yaml", {"changes": {}})
    assert first is not None and first.id == 1 and first.result == "ok"
    await audit.record(ALICE, "cache.purge", "sensors", {"path": "/a", "purged": 2})
    await audit.record(Actor("ci", "127.0.0.1"), "cache.purge", "cams", {}, result="no_cache")
    entries = await audit.list()
    assert [e.id for e in entries] == [3, 2, 1]
    assert entries[1].detail == {"path": "/a", "purged": 2} and entries[1].actor == "alice"
    assert entries[0].result == "no_cache" and entries[0].address == "127.0.0.1"
    assert entries[0].gateway == audit.gateway and ":" in audit.gateway
    assert [e.id for e in await audit.list(1)] == [3]
    assert [e.id for e in await audit.list(before=3)] == [2, 1]
    assert [e.id for e in await audit.list(action="cache.purge")] == [3, 2]
    await audit.aclose()
    await audit.aclose()  # twice is fine

    again = SQLiteAuditLog(path)
    assert [e.target for e in await again.list()] == ["cams", "sensors", "/etc/piuptime.yaml"]
    await again.aclose()
    row = sqlite3.connect(path).execute("SELECT detail FROM admin_audit WHERE id = 2").fetchone()
    assert row == ('{"path":"/a","purged":2}',)


async def test_sqlite_log_writes_off_the_event_loop(tmp_path: Path) -> None:
    audit = SQLiteAuditLog(tmp_path / "a.sqlite")
    seen: list[str] = []
    original = audit._insert

    def insert(row: tuple[object, ...]) -> int:
        seen.append(threading.current_thread().name)
        return original(row)

    audit._insert = insert  # type: ignore[method-assign]
    await audit.record(ALICE, "x", "y", {})
    assert seen and seen[0].startswith("piuptime-audit")
    await audit.aclose()


async def test_a_failed_write_is_logged_and_counted_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    audit = SQLiteAuditLog(tmp_path)  # a directory: cannot be opened as a database
    entry = await audit.record(ALICE, "config.reload", "f.yaml", {"changes": {"routes": 1}})
    assert entry is None and audit.failures_total == 1
    assert "audit log unavailable" in caplog.text
    assert '"actor":"alice"' in caplog.text and '"action":"config.reload"' in caplog.text
    with pytest.raises(sqlite3.Error):
        await audit.list()
    await audit.aclose()


async def test_a_locked_database_fails_the_write_after_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "locked.sqlite"
    audit = SQLiteAuditLog(path, busy_timeout=0.05)
    await audit.record(ALICE, "first", "t", {})
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        assert await asyncio.wait_for(audit.record(ALICE, "second", "t", {}), 10) is None
        assert audit.failures_total == 1
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert await audit.record(ALICE, "third", "t", {}) is not None
    assert [e.action for e in await audit.list()] == ["third", "first"]
    await audit.aclose()


async def test_memory_log_is_bounded() -> None:
    audit = MemoryAuditLog(capacity=3)
    for i in range(5):
        await audit.record(ALICE, f"a{i}", "t", {"i": i})
    assert [e.action for e in await audit.list()] == ["a4", "a3", "a2"]
    assert [e.action for e in await audit.list(before=5)] == ["a3", "a2"]
    assert [e.id for e in await audit.list(action="a3")] == [4]
