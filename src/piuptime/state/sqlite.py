"""Durable state in one SQLite file (stdlib ``sqlite3``, WAL mode).

Every call runs on ONE dedicated worker thread that owns the connection, so the event loop never
blocks on the disk and calls are served in order. Each read-modify-write runs in a
``BEGIN IMMEDIATE`` transaction, so it is atomic even when other processes share the file
(SQLite's busy timeout makes them queue for the write lock).

Expiry is a stored wall-clock deadline (``time.time`` by default; injectable with ``clock=``), so
it survives restarts: an expired row reads as absent at once and is deleted by the next write to
its key or by a bounded periodic sweep (``sweep_interval``, ``sweep_batch`` rows per table).

``sqlite3.OperationalError`` (locked past the busy timeout, disk full, I/O error, read-only) and a
damaged file become :class:`~piuptime.state.StateUnavailable`; the store stays usable and the next
call tries again.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from .base import (
    BucketResult,
    StateUnavailable,
    WindowResult,
    bucket_step,
    check_bucket,
    check_limit,
    check_max_len,
    check_ttl,
    check_window,
    lrange_bounds,
    window_step,
)

__all__ = ["SQLiteCounters", "SQLiteKV", "SQLiteLogs", "SQLiteStores"]

P = ParamSpec("P")
T = TypeVar("T")
Conn = sqlite3.Connection

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state_counters (
    key TEXT PRIMARY KEY, value INTEGER NOT NULL, deadline REAL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state_windows (
    key TEXT PRIMARY KEY, idx INTEGER NOT NULL, cur INTEGER NOT NULL, prev INTEGER NOT NULL,
    deadline REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state_buckets (
    key TEXT PRIMARY KEY, tokens REAL NOT NULL, ts REAL NOT NULL, deadline REAL NOT NULL
    ) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state_slots (
    key TEXT PRIMARY KEY, n INTEGER NOT NULL, deadline REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state_kv (
    key TEXT PRIMARY KEY, value BLOB NOT NULL, deadline REAL);
CREATE TABLE IF NOT EXISTS state_logs (
    key TEXT PRIMARY KEY, head INTEGER NOT NULL, tail INTEGER NOT NULL, deadline REAL
    ) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state_log_items (
    key TEXT NOT NULL, seq INTEGER NOT NULL, value BLOB NOT NULL, PRIMARY KEY (key, seq));
CREATE INDEX IF NOT EXISTS state_counters_deadline ON state_counters (deadline)
    WHERE deadline IS NOT NULL;
CREATE INDEX IF NOT EXISTS state_windows_deadline ON state_windows (deadline);
CREATE INDEX IF NOT EXISTS state_buckets_deadline ON state_buckets (deadline);
CREATE INDEX IF NOT EXISTS state_slots_deadline ON state_slots (deadline);
CREATE INDEX IF NOT EXISTS state_kv_deadline ON state_kv (deadline) WHERE deadline IS NOT NULL;
CREATE INDEX IF NOT EXISTS state_logs_deadline ON state_logs (deadline) WHERE deadline IS NOT NULL;
"""

_EXPIRING_TABLES = ("state_counters", "state_windows", "state_buckets", "state_slots", "state_kv")


@contextmanager
def _write(conn: Conn) -> Iterator[None]:
    """One write transaction, taken at once (so two processes never both read-then-write)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


@contextmanager
def _read(conn: Conn) -> Iterator[None]:
    """One consistent snapshot across several SELECTs."""
    conn.execute("BEGIN")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _rollback(conn: Conn) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the transaction is gone with the failure (SQLite rolled it back itself)


def _live(deadline: float | None, now: float) -> bool:
    return deadline is None or deadline > now


def _glob_prefix(prefix: str) -> str:
    """A GLOB pattern matching exactly the strings that start with ``prefix``."""
    escaped = "".join(f"[{c}]" if c in "*?[" else c for c in prefix)
    return escaped + "*"


def _is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


class SQLiteStores:
    """The three SQLite stores over one file and one worker thread.

    ``path`` is a file path, ``":memory:"``, or a ``file:`` URI (``file:x.db?mode=ro``).
    ``busy_timeout`` is how long a call waits for another process's write lock before it raises
    ``StateUnavailable``. ``synchronous`` is SQLite's ``PRAGMA synchronous``: ``NORMAL`` (the
    default) keeps every commit across a process crash and the database consistent across a power
    loss, which may lose the last commits; ``FULL`` keeps those too, at an fsync per commit.
    ``pragmas`` are applied after those (tests use ``max_page_count`` to make a full disk).
    Call :meth:`open` (or use :func:`piuptime.state.open_stores`) before anything else.
    """

    kind = "sqlite"

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 1.0,
        synchronous: str = "NORMAL",
        pragmas: Mapping[str, str | int] | None = None,
        sweep_interval: float = 30.0,
        sweep_batch: int = 1000,
    ) -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}")
        self.path = str(path)
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._pragmas = [("synchronous", synchronous.upper()), *(pragmas or {}).items()]
        self._sweep_interval = sweep_interval
        self._sweep_batch = sweep_batch
        self._next_sweep = 0.0
        self._conn: Conn | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="piuptime-sqlite")
        self._closed = False
        self._available = True
        self._failures = 0
        self.counters = SQLiteCounters(self)
        self.kv = SQLiteKV(self)
        self.logs = SQLiteLogs(self)

    @property
    def available(self) -> bool:
        """False after a call failed, until one succeeds."""
        return self._available

    @property
    def failures_total(self) -> int:
        return self._failures

    async def open(self) -> None:
        """Open the file, switch it to WAL, create the tables (raises ``StateUnavailable``)."""
        await self.call(lambda conn, now: None)

    async def sweep(self) -> None:
        """Run the expiry sweep now."""
        await self.call(self._sweep)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._close)
        finally:
            self._executor.shutdown(wait=False)

    async def call(
        self, fn: Callable[Concatenate[Conn, float, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run ``fn(conn, now, *args)`` on the worker thread."""
        if self._closed:
            raise StateUnavailable(f"sqlite {self.path}: the store is closed")
        loop = asyncio.get_running_loop()

        def bound(conn: Conn, now: float) -> T:
            return fn(conn, now, *args, **kwargs)

        job = functools.partial(self._run, bound)
        try:
            result = await loop.run_in_executor(self._executor, job)
        except StateUnavailable:
            self._failures += 1
            self._available = False
            raise
        self._available = True
        return result

    # -- on the worker thread --------------------------------------------------------------------

    def _run(self, fn: Callable[[Conn, float], T]) -> T:
        try:
            conn = self._conn if self._conn is not None else self._connect()
            now = self._clock()
            if now >= self._next_sweep:
                self._try_sweep(conn, now)
            return fn(conn, now)
        except sqlite3.Error as exc:
            if _is_unavailable(exc):
                raise StateUnavailable(f"sqlite {self.path}: {exc}") from exc
            raise

    def _connect(self) -> Conn:
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout,
            isolation_level=None,
            uri=self.path.startswith("file:"),
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL").fetchall()
            for name, value in self._pragmas:
                conn.execute(f"PRAGMA {name}={value}").fetchall()
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _try_sweep(self, conn: Conn, now: float) -> None:
        try:
            self._sweep(conn, now)
        except sqlite3.OperationalError:
            self._next_sweep = now + min(self._sweep_interval, 1.0)

    def _sweep(self, conn: Conn, now: float) -> None:
        batch = self._sweep_batch
        full = False
        with _write(conn):
            for table in _EXPIRING_TABLES:
                cur = conn.execute(
                    f"DELETE FROM {table} WHERE key IN "
                    f"(SELECT key FROM {table} WHERE deadline <= ? LIMIT ?)",
                    (now, batch),
                )
                full = full or cur.rowcount >= batch
            keys = conn.execute(
                "SELECT key FROM state_logs WHERE deadline <= ? LIMIT ?", (now, batch)
            ).fetchall()
            for (key,) in keys:
                _delete_log(conn, key)
            full = full or len(keys) >= batch
        # more to do: come back soon rather than in a whole interval
        self._next_sweep = now + (min(self._sweep_interval, 1.0) if full else self._sweep_interval)


# -- counters --------------------------------------------------------------------------------------


def _incr(conn: Conn, now: float, key: str, amount: int, ttl: float | None) -> int:
    with _write(conn):
        row = conn.execute(
            "SELECT value, deadline FROM state_counters WHERE key = ?", (key,)
        ).fetchone()
        if row is None or not _live(row[1], now):
            conn.execute(
                "INSERT OR REPLACE INTO state_counters (key, value, deadline) VALUES (?, ?, ?)",
                (key, amount, None if ttl is None else now + ttl),
            )
            return amount
        value = int(row[0]) + amount
        conn.execute("UPDATE state_counters SET value = ? WHERE key = ?", (value, key))
        return value


def _get_counter(conn: Conn, now: float, key: str) -> int:
    row = conn.execute(
        "SELECT value, deadline FROM state_counters WHERE key = ?", (key,)
    ).fetchone()
    return 0 if row is None or not _live(row[1], now) else int(row[0])


def _window_hit(
    conn: Conn, now: float, key: str, limit: int, window: float, cost: int
) -> WindowResult:
    with _write(conn):
        row = conn.execute(
            "SELECT idx, cur, prev FROM state_windows WHERE key = ?", (key,)
        ).fetchone()
        idx, cur, prev = (None, 0, 0) if row is None else (int(row[0]), int(row[1]), int(row[2]))
        allowed, remaining, reset, idx, cur, prev, expires = window_step(
            now, limit, window, cost, idx, cur, prev
        )
        if allowed:  # a refused hit changes nothing: the same state rolls the same way next time
            conn.execute(
                "INSERT OR REPLACE INTO state_windows (key, idx, cur, prev, deadline) "
                "VALUES (?, ?, ?, ?, ?)",
                (key, idx, cur, prev, expires),
            )
    return WindowResult(allowed, limit, remaining, reset)


def _bucket_take(
    conn: Conn, now: float, key: str, rate: float, burst: int, cost: int
) -> BucketResult:
    with _write(conn):
        row = conn.execute(
            "SELECT tokens, ts, deadline FROM state_buckets WHERE key = ?", (key,)
        ).fetchone()
        if row is None or not _live(row[2], now):
            tokens, ts = None, now
        else:
            tokens, ts = float(row[0]), float(row[1])
        allowed, remaining, reset, level, expires = bucket_step(now, rate, burst, cost, tokens, ts)
        if allowed:  # a refusal changes nothing: the refill is computed from (tokens, ts) again
            conn.execute(
                "INSERT OR REPLACE INTO state_buckets (key, tokens, ts, deadline) "
                "VALUES (?, ?, ?, ?)",
                (key, level, now, expires),
            )
    return BucketResult(allowed, burst, remaining, reset)


def _acquire(conn: Conn, now: float, key: str, limit: int, ttl: float) -> bool:
    with _write(conn):
        row = conn.execute("SELECT n, deadline FROM state_slots WHERE key = ?", (key,)).fetchone()
        held = 0 if row is None or not _live(row[1], now) else int(row[0])
        if held >= limit:
            return False
        conn.execute(
            "INSERT OR REPLACE INTO state_slots (key, n, deadline) VALUES (?, ?, ?)",
            (key, held + 1, now + ttl),
        )
        return True


def _release(conn: Conn, now: float, key: str) -> None:
    with _write(conn):
        row = conn.execute("SELECT n, deadline FROM state_slots WHERE key = ?", (key,)).fetchone()
        if row is None:
            return
        if int(row[0]) <= 1 or not _live(row[1], now):
            conn.execute("DELETE FROM state_slots WHERE key = ?", (key,))
        else:
            conn.execute("UPDATE state_slots SET n = n - 1 WHERE key = ?", (key,))


def _in_flight(conn: Conn, now: float, key: str) -> int:
    row = conn.execute("SELECT n, deadline FROM state_slots WHERE key = ?", (key,)).fetchone()
    return 0 if row is None or not _live(row[1], now) else int(row[0])


class SQLiteCounters:
    def __init__(self, stores: SQLiteStores) -> None:
        self._call = stores.call

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        check_ttl(ttl)
        return await self._call(_incr, key, amount, ttl)

    async def get(self, key: str) -> int:
        return await self._call(_get_counter, key)

    async def window_hit(self, key: str, limit: int, window: float, cost: int = 1) -> WindowResult:
        check_window(limit, window, cost)
        return await self._call(_window_hit, key, limit, window, cost)

    async def bucket_take(self, key: str, rate: float, burst: int, cost: int = 1) -> BucketResult:
        check_bucket(rate, burst, cost)
        return await self._call(_bucket_take, key, rate, burst, cost)

    async def acquire(self, key: str, limit: int, ttl: float) -> bool:
        check_limit(limit, ttl)
        return await self._call(_acquire, key, limit, ttl)

    async def release(self, key: str) -> None:
        await self._call(_release, key)

    async def in_flight(self, key: str) -> int:
        """Slots held under ``key`` now."""
        return await self._call(_in_flight, key)


# -- key-value -------------------------------------------------------------------------------------


def _kv_get(conn: Conn, now: float, key: str) -> bytes | None:
    row = conn.execute("SELECT value, deadline FROM state_kv WHERE key = ?", (key,)).fetchone()
    return None if row is None or not _live(row[1], now) else bytes(row[0])


def _kv_set(conn: Conn, now: float, key: str, value: bytes, ttl: float | None) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO state_kv (key, value, deadline) VALUES (?, ?, ?)",
        (key, value, None if ttl is None else now + ttl),
    )


def _kv_set_if_absent(conn: Conn, now: float, key: str, value: bytes, ttl: float | None) -> bool:
    with _write(conn):
        row = conn.execute("SELECT deadline FROM state_kv WHERE key = ?", (key,)).fetchone()
        if row is not None and _live(row[0], now):
            return False
        _kv_set(conn, now, key, value, ttl)
        return True


def _kv_delete(conn: Conn, now: float, key: str) -> bool:
    with _write(conn):
        row = conn.execute("SELECT deadline FROM state_kv WHERE key = ?", (key,)).fetchone()
        if row is None:
            return False
        conn.execute("DELETE FROM state_kv WHERE key = ?", (key,))
        return _live(row[0], now)


def _kv_delete_prefix(conn: Conn, now: float, prefix: str) -> int:
    pattern = _glob_prefix(prefix)
    with _write(conn):
        (live,) = conn.execute(
            "SELECT count(*) FROM state_kv WHERE key GLOB ? AND (deadline IS NULL OR deadline > ?)",
            (pattern, now),
        ).fetchone()
        conn.execute("DELETE FROM state_kv WHERE key GLOB ?", (pattern,))
        return int(live)


class SQLiteKV:
    def __init__(self, stores: SQLiteStores) -> None:
        self._call = stores.call

    async def get(self, key: str) -> bytes | None:
        return await self._call(_kv_get, key)

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        check_ttl(ttl)
        await self._call(_kv_set, key, bytes(value), ttl)

    async def set_if_absent(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        check_ttl(ttl)
        return await self._call(_kv_set_if_absent, key, bytes(value), ttl)

    async def delete(self, key: str) -> bool:
        return await self._call(_kv_delete, key)

    async def delete_prefix(self, prefix: str) -> int:
        return await self._call(_kv_delete_prefix, prefix)


# -- logs ------------------------------------------------------------------------------------------


def _log_meta(conn: Conn, now: float, key: str) -> tuple[int, int, float | None] | None:
    row = conn.execute(
        "SELECT head, tail, deadline FROM state_logs WHERE key = ?", (key,)
    ).fetchone()
    if row is None or not _live(row[2], now):
        return None
    return int(row[0]), int(row[1]), row[2]


def _delete_log(conn: Conn, key: str) -> None:
    conn.execute("DELETE FROM state_log_items WHERE key = ?", (key,))
    conn.execute("DELETE FROM state_logs WHERE key = ?", (key,))


def _log_append(
    conn: Conn,
    now: float,
    key: str,
    items: tuple[bytes, ...],
    max_len: int | None,
    ttl: float | None,
) -> int:
    with _write(conn):
        meta = _log_meta(conn, now, key)
        if meta is None:
            _delete_log(conn, key)  # an expired log's rows, if any
            if not items:
                return 0
            head, tail, deadline = 0, 0, None
        else:
            head, tail, deadline = meta
        conn.executemany(
            "INSERT INTO state_log_items (key, seq, value) VALUES (?, ?, ?)",
            [(key, tail + i, item) for i, item in enumerate(items)],
        )
        tail += len(items)
        if max_len is not None and tail - head > max_len:
            head = tail - max_len
            conn.execute("DELETE FROM state_log_items WHERE key = ? AND seq < ?", (key, head))
        if ttl is not None:
            deadline = now + ttl
        conn.execute(
            "INSERT OR REPLACE INTO state_logs (key, head, tail, deadline) VALUES (?, ?, ?, ?)",
            (key, head, tail, deadline),
        )
        return tail - head


def _log_range(conn: Conn, now: float, key: str, start: int, stop: int) -> list[bytes]:
    with _read(conn):
        meta = _log_meta(conn, now, key)
        if meta is None:
            return []
        head, tail, _ = meta
        bounds = lrange_bounds(tail - head, start, stop)
        if bounds is None:
            return []
        rows = conn.execute(
            "SELECT value FROM state_log_items WHERE key = ? AND seq BETWEEN ? AND ? ORDER BY seq",
            (key, head + bounds[0], head + bounds[1]),
        ).fetchall()
    return [bytes(r[0]) for r in rows]


def _log_length(conn: Conn, now: float, key: str) -> int:
    meta = _log_meta(conn, now, key)
    return 0 if meta is None else meta[1] - meta[0]


def _log_delete(conn: Conn, now: float, key: str) -> bool:
    with _write(conn):
        meta = _log_meta(conn, now, key)
        _delete_log(conn, key)
        return meta is not None


class SQLiteLogs:
    def __init__(self, stores: SQLiteStores) -> None:
        self._call = stores.call

    async def append(
        self, key: str, *items: bytes, max_len: int | None = None, ttl: float | None = None
    ) -> int:
        check_ttl(ttl)
        check_max_len(max_len)
        return await self._call(_log_append, key, tuple(bytes(i) for i in items), max_len, ttl)

    async def range(self, key: str, start: int = 0, stop: int = -1) -> list[bytes]:
        return await self._call(_log_range, key, start, stop)

    async def length(self, key: str) -> int:
        return await self._call(_log_length, key)

    async def delete(self, key: str) -> bool:
        return await self._call(_log_delete, key)
