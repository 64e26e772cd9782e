"""SQLite failing for real: a full database, a read-only file, a lock held by another process,
a path that cannot be opened, a damaged file. Plus what SQLite promises: durability across a
restart, expiry by wall-clock deadline, one worker thread, the sweep."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from piuptime.state import StateUnavailable, open_stores
from piuptime.state.sqlite import SQLiteStores
from tests.state.conftest import FakeClock


async def test_a_full_database_raises_state_unavailable_and_keeps_working(tmp_path: Path) -> None:
    # max_page_count caps the file the way a full disk does (SQLITE_FULL), even for root
    stores = SQLiteStores(tmp_path / "full.db", pragmas={"max_page_count": 40})
    await stores.open()
    try:
        written = 0
        with pytest.raises(StateUnavailable, match="full"):
            while written < 1000:
                await stores.kv.set(f"k{written}", b"x" * 4000)
                written += 1
        assert 5 < written < 1000
        assert not stores.available
        assert stores.failures_total == 1

        # nothing half-done: a log append that does not fit leaves the log as it was
        await stores.kv.delete("k0")
        assert await stores.logs.append("l", b"first") == 1
        with pytest.raises(StateUnavailable):
            await stores.logs.append("l", *[b"y" * 4000] * 20)
        assert await stores.logs.range("l") == [b"first"]
        with pytest.raises(StateUnavailable):
            for i in range(1000):
                await stores.counters.incr(f"n{i}" + "z" * 500)

        # reads go on, and once there is room again so do writes
        assert await stores.kv.get("k1") == b"x" * 4000
        assert stores.available
        for i in range(1, 6):
            assert await stores.kv.delete(f"k{i}")
        await stores.kv.set("after", b"fits")
        assert await stores.kv.get("after") == b"fits"
        assert await stores.counters.window_hit("w", 10, 60.0) is not None
    finally:
        await stores.aclose()


async def test_a_read_only_database_reads_but_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    stores = await open_stores("sqlite", sqlite_path=path)
    await stores.kv.set("k", b"v")
    await stores.logs.append("l", b"a")
    await stores.aclose()

    ro = await open_stores("sqlite", sqlite_path=f"file:{path}?mode=ro")
    try:
        assert await ro.kv.get("k") == b"v"
        assert await ro.logs.range("l") == [b"a"]
        with pytest.raises(StateUnavailable, match="readonly"):
            await ro.kv.set("k", b"w")
        with pytest.raises(StateUnavailable, match="readonly"):
            await ro.counters.window_hit("w", 10, 60.0)
        assert ro.failures_total == 2
        assert await ro.kv.get("k") == b"v"
    finally:
        await ro.aclose()


async def test_a_lock_held_past_the_busy_timeout_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    stores = SQLiteStores(path, busy_timeout=0.1)
    await stores.open()
    other = sqlite3.connect(path, isolation_level=None)  # another process's connection
    try:
        await stores.kv.set("k", b"v")
        other.execute("BEGIN EXCLUSIVE")
        other.execute("INSERT INTO state_kv (key, value) VALUES ('theirs', x'00')")
        start = time.monotonic()
        with pytest.raises(StateUnavailable, match="locked"):
            await stores.counters.incr("n")
        assert time.monotonic() - start < 1.0
        assert await stores.kv.get("k") == b"v"  # WAL: readers are not blocked by the writer
        other.execute("COMMIT")
        assert await stores.counters.incr("n") == 1
        assert await stores.kv.get("theirs") == b"\x00"
    finally:
        other.close()
        await stores.aclose()


async def test_a_path_that_cannot_be_opened_raises_at_open(tmp_path: Path) -> None:
    with pytest.raises(StateUnavailable, match="unable to open"):
        await open_stores("sqlite", sqlite_path=tmp_path / "no" / "such" / "dir" / "x.db")


async def test_a_damaged_file_raises_at_open(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database, " * 200)
    with pytest.raises(StateUnavailable, match="not a database"):
        await open_stores("sqlite", sqlite_path=path)


async def test_state_survives_a_restart_and_expiry_follows_the_wall_clock(tmp_path: Path) -> None:
    path = tmp_path / "durable.db"
    clock = FakeClock()
    stores = await open_stores("sqlite", sqlite_path=path, clock=clock)
    await stores.counters.incr("n", 5)
    await stores.counters.incr("short", ttl=10.0)
    await stores.kv.set("k", b"v", ttl=100.0)
    await stores.logs.append("l", b"a", b"b")
    assert (await stores.counters.window_hit("w", 2, 60.0)).allowed
    await stores.aclose()

    clock.advance(50.0)  # the process was down for 50 s
    stores = await open_stores("sqlite", sqlite_path=path, clock=clock)
    try:
        assert await stores.counters.get("n") == 5
        assert await stores.counters.get("short") == 0
        assert await stores.kv.get("k") == b"v"
        assert await stores.logs.range("l") == [b"a", b"b"]
        clock.advance(60.0)
        assert await stores.kv.get("k") is None
    finally:
        await stores.aclose()


async def test_every_call_runs_on_one_worker_thread(tmp_path: Path) -> None:
    stores = SQLiteStores(tmp_path / "t.db")
    await stores.open()
    try:
        names = await asyncio.gather(
            *(stores.call(lambda conn, now: threading.get_ident()) for _ in range(20))
        )
        assert len(set(names)) == 1
        assert names[0] != threading.get_ident()
    finally:
        await stores.aclose()
    with pytest.raises(StateUnavailable, match="closed"):
        await stores.kv.get("k")


async def test_the_sweep_deletes_expired_rows(tmp_path: Path) -> None:
    clock = FakeClock()
    stores = SQLiteStores(tmp_path / "sweep.db", clock=clock, sweep_interval=3600.0)
    await stores.open()

    def rows(conn: sqlite3.Connection, now: float) -> int:
        tables = ["state_counters", "state_windows", "state_buckets", "state_slots", "state_kv"]
        tables += ["state_logs", "state_log_items"]
        return sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables)

    try:
        for i in range(20):
            await stores.counters.incr(f"n{i}", ttl=5.0)
            await stores.kv.set(f"k{i}", b"v", ttl=5.0)
            await stores.logs.append(f"l{i}", b"a", b"b", ttl=5.0)
            await stores.counters.window_hit(f"w{i}", 5, 1.0)
            await stores.counters.bucket_take(f"b{i}", 1.0, 5)
            await stores.counters.acquire(f"s{i}", 5, 5.0)
        await stores.kv.set("forever", b"v")
        assert await stores.call(rows) == 20 * 8 + 1
        clock.advance(10.0)
        await stores.sweep()
        assert await stores.call(rows) == 1
    finally:
        await stores.aclose()
