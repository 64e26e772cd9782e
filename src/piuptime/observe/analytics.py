"""Request analytics: per-minute aggregates by route, upstream and consumer, written in batches
to SQLite (or PostgreSQL, shared by several gateways), plus a bounded ring of recent requests.

The request path only does in-memory work. :meth:`Analytics.observe` is a log-phase observer of
``ProxyHandler``: it appends the request's access-log entry to a ``deque(maxlen=recent)`` and adds
the request to one *cell* of the current minute, keyed by ``(route, upstream, consumer)``: a few
integer adds and one ``bisect`` into a fixed log-scale latency histogram. No lock, no I/O.

Every ``flush_interval`` a loop timer hands everything recorded since the last flush (closed
minutes and the current, partial one) to a single writer thread, which splits the cells into one
row per (dimension, name, minute) and writes them in ONE transaction as an upsert that *adds*:
several flushes of one minute, and several gateways writing one minute, add up (counts are summed,
histograms merged bucket by bucket, so percentiles across flushes and gateways are recomputed from
the merged histogram, not averaged). Rows older than ``retention`` are deleted by a periodic
``DELETE`` in its own transaction.

Failure never reaches a request. A write that fails (disk full, database locked past the busy
timeout, PostgreSQL down, read-only file) drops that batch: its requests are counted in
``piuptime_analytics_samples_dropped_total{reason}`` and the failure in
``piuptime_analytics_write_errors_total{reason}``; the next flush tries again with new data, so
writing resumes by itself once the disk or database is back. While a write is still running the
next ticks wait (nothing piles up on the thread); the pending cells are capped
(``max_pending_cells``) and the oldest minutes are dropped beyond it (``reason="backlog"``).

Latency percentiles come from a histogram of ``total_ms`` with 10 buckets per decade from 0.1 ms
to 63 s (60 buckets with the under- and overflow buckets). A percentile is the nearest-rank
bucket's geometric midpoint, so for latencies from 0.1 ms to 63 s the reported value is within a
factor of 10**0.05 (+12.2% / -10.9%) of the exact nearest-rank percentile; below 0.1 ms it reads
0.1 ms, above 63 s it reads 63 s.

The API the admin server uses (``app.analytics``, ``None`` when analytics are off)::

    await analytics.query(by="route" | "upstream" | "consumer", since=epoch_s, until=None,
                          name=None, step=60) -> list[dict]
        # one row per step (a multiple of 60 s, aligned to the epoch) and name, oldest first:
        # {"minute": step start (epoch s), "name": str | None (None: no route/consumer),
        #  "requests", "errors_4xx", "errors_5xx", "bytes": int,
        #  "p50_ms", "p95_ms", "p99_ms", "avg_ms": float}
        # ValueError for bad arguments; AnalyticsUnavailable when the database cannot be read.
        # Only flushed data is seen: await analytics.flush() first for the last seconds.
    analytics.recent(limit=100, *, route=None, status=None) -> list[dict]
        # newest first: copies of the access-log entries in the ring; status is a code (404) or a
        # class ("5xx"); ValueError for a bad limit or status
    analytics.stats() -> dict  # written, dropped by reason, write errors, pending, store
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import sqlite3
import struct
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from piuptime.config import Config
    from piuptime.observe.metrics import Metrics

log = logging.getLogger("piuptime.analytics")

__all__ = [
    "BOUNDS_MS",
    "DIMENSIONS",
    "MAX_RELATIVE_ERROR",
    "Analytics",
    "AnalyticsUnavailable",
    "Backend",
    "Row",
    "SQLiteBackend",
    "StoreError",
    "bucket_of",
    "percentile",
]

Dimension = Literal["route", "upstream", "consumer"]
DIMENSIONS: tuple[Dimension, ...] = ("route", "upstream", "consumer")

#: Upper bounds (exclusive) of the latency buckets, in ms: 0.1 ms * 10**(i/10), i = 0..58.
BOUNDS_MS: tuple[float, ...] = tuple(0.1 * 10 ** (i / 10) for i in range(59))
NBUCKETS = len(BOUNDS_MS) + 1  # plus the overflow bucket (>= 63 s)
_HALF_STEP = 10**0.05
#: A reported percentile is within this relative error of the exact one (0.1 ms .. 63 s).
MAX_RELATIVE_ERROR = _HALF_STEP - 1


def bucket_of(ms: float) -> int:
    """The histogram bucket of a latency in ms."""
    return bisect_right(BOUNDS_MS, ms)


def bucket_value(index: int) -> float:
    """What a bucket reports: its geometric midpoint (clamped at both ends)."""
    if index <= 0:
        return BOUNDS_MS[0]
    if index >= len(BOUNDS_MS):
        return BOUNDS_MS[-1]
    return BOUNDS_MS[index - 1] * _HALF_STEP


def percentile(hist: Sequence[int], permille: int) -> float | None:
    """The nearest-rank percentile (``permille``: 500 for p50, 990 for p99) of a histogram."""
    total = sum(hist)
    if total <= 0:
        return None
    rank = max(1, (total * permille + 999) // 1000)
    seen = 0
    for i, count in enumerate(hist):
        seen += count
        if seen >= rank:
            return round(bucket_value(i), 3)
    return round(bucket_value(len(hist) - 1), 3)


class _Cell:
    """One minute's requests of one (route, upstream, consumer)."""

    __slots__ = ("bytes", "e4", "e5", "hist", "ms", "n")

    def __init__(self) -> None:
        self.n = 0
        self.e4 = 0
        self.e5 = 0
        self.bytes = 0
        self.ms = 0.0
        self.hist = [0] * NBUCKETS


#: One stored row: (dim, minute, name, requests, errors_4xx, errors_5xx, bytes, ms_sum, hist)
#: with ``minute`` the minute's start in epoch seconds, ``name`` "" for none and ``hist`` the
#: dense bucket counts (``NBUCKETS`` long, or shorter: missing trailing buckets are 0).
Row = tuple[str, int, str, int, int, int, int, float, list[int]]


class StoreError(Exception):
    """A backend operation failed; ``reason`` is the metric label (disk_full, locked, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class AnalyticsUnavailable(Exception):
    """The analytics database cannot be read right now (``reason`` as in :class:`StoreError`)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Backend(Protocol):
    """A database for the rows. Each instance is used from one thread only."""

    description: str

    def write(self, rows: Sequence[Row], gateway: str) -> None: ...

    def delete_before(self, minute: int) -> int: ...

    def read(self, dim: str, since: int, until: int | None, name: str | None) -> list[Row]: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------
# SQLite

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS analytics_minutes (
    dim TEXT NOT NULL, minute INTEGER NOT NULL, name TEXT NOT NULL, gateway TEXT NOT NULL,
    requests INTEGER NOT NULL, errors_4xx INTEGER NOT NULL, errors_5xx INTEGER NOT NULL,
    bytes INTEGER NOT NULL, ms_sum REAL NOT NULL, hist BLOB NOT NULL,
    PRIMARY KEY (dim, minute, name, gateway)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS analytics_minutes_minute ON analytics_minutes (minute);
"""

_SQLITE_UPSERT = """
INSERT INTO analytics_minutes
    (dim, minute, name, gateway, requests, errors_4xx, errors_5xx, bytes, ms_sum, hist)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (dim, minute, name, gateway) DO UPDATE SET
    requests = requests + excluded.requests,
    errors_4xx = errors_4xx + excluded.errors_4xx,
    errors_5xx = errors_5xx + excluded.errors_5xx,
    bytes = bytes + excluded.bytes,
    ms_sum = ms_sum + excluded.ms_sum,
    hist = piuptime_hist_merge(hist, excluded.hist)
"""

_SQLITE_REASONS = {
    5: "locked",  # SQLITE_BUSY
    6: "locked",  # SQLITE_LOCKED
    8: "read_only",  # SQLITE_READONLY
    10: "io_error",  # SQLITE_IOERR
    11: "corrupt",  # SQLITE_CORRUPT
    13: "disk_full",  # SQLITE_FULL
    14: "cant_open",  # SQLITE_CANTOPEN
    26: "corrupt",  # SQLITE_NOTADB
}


def encode_hist(hist: Sequence[int]) -> bytes:
    """Sparse little-endian (bucket, count) uint32 pairs: ~10 non-zero buckets → 80 bytes."""
    flat: list[int] = []
    for i, count in enumerate(hist):
        if count:
            flat.append(i)
            flat.append(count)
    return struct.pack(f"<{len(flat)}I", *flat)


def decode_hist(blob: bytes) -> list[int]:
    hist = [0] * NBUCKETS
    flat = struct.unpack(f"<{len(blob) // 4}I", blob)
    for j in range(0, len(flat), 2):
        if flat[j] < NBUCKETS:
            hist[flat[j]] += flat[j + 1]
    return hist


def _merge_blobs(a: bytes | None, b: bytes | None) -> bytes:
    ha = decode_hist(a or b"")
    hb = decode_hist(b or b"")
    return encode_hist([x + y for x, y in zip(ha, hb, strict=True)])


def _sqlite_reason(exc: sqlite3.Error) -> str:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return _SQLITE_REASONS.get(code & 0xFF, "error")
    text = str(exc).lower()
    if "full" in text:
        return "disk_full"
    if "locked" in text or "busy" in text:
        return "locked"
    return "error"


class SQLiteBackend:
    """The rows in a SQLite file (WAL). The connection is opened on first use, on the thread
    that uses it, and reopened after a failure to open."""

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout: float = 1.0,
        pragmas: dict[str, int | str] | None = None,
    ) -> None:
        self.path = str(path)
        self.description = f"sqlite:{self.path}"
        self.busy_timeout = busy_timeout
        self.pragmas = dict(pragmas or {})
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(_sqlite_reason(exc), f"{self.path}: {exc}") from exc
        try:
            conn.create_function("piuptime_hist_merge", 2, _merge_blobs, deterministic=True)
            for name, value in self.pragmas.items():
                conn.execute(f"PRAGMA {name} = {value}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(_SQLITE_SCHEMA)
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(_sqlite_reason(exc), f"{self.path}: {exc}") from exc
        self._conn = conn
        return conn

    def write(self, rows: Sequence[Row], gateway: str) -> None:
        conn = self._connection()
        params = [
            (dim, minute, name, gateway, n, e4, e5, nbytes, ms, encode_hist(hist))
            for dim, minute, name, n, e4, e5, nbytes, ms, hist in rows
        ]
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_SQLITE_UPSERT, params)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(conn)
            raise StoreError(_sqlite_reason(exc), f"{self.path}: {exc}") from exc

    def delete_before(self, minute: int) -> int:
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            n = conn.execute("DELETE FROM analytics_minutes WHERE minute < ?", (minute,)).rowcount
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(conn)
            raise StoreError(_sqlite_reason(exc), f"{self.path}: {exc}") from exc
        return int(n)

    def read(self, dim: str, since: int, until: int | None, name: str | None) -> list[Row]:
        conn = self._connection()
        sql = (
            "SELECT dim, minute, name, requests, errors_4xx, errors_5xx, bytes, ms_sum, hist "
            "FROM analytics_minutes WHERE dim = ? AND minute >= ? AND minute < ?"
        )
        args: list[Any] = [dim, since, until if until is not None else 2**62]
        if name is not None:
            sql += " AND name = ?"
            args.append(name)
        try:
            raw = conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(_sqlite_reason(exc), f"{self.path}: {exc}") from exc
        return [(*r[:8], decode_hist(r[8])) for r in raw]

    def _rollback(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# --------------------------------------------------------------------------------------------
# the recorder


@dataclass
class _Result:
    samples: int = 0
    rows: int = 0
    error: StoreError | None = None
    deleted: int = 0
    retention_error: StoreError | None = None
    seconds: float = 0.0


def _rows(batch: Sequence[tuple[int, dict[tuple[Any, ...], _Cell]]]) -> tuple[list[Row], int]:
    """Split cells into rows, one per (dimension, minute, name); sorted, so concurrent writers
    lock rows in one order."""
    agg: dict[tuple[str, int, str], list[Any]] = {}
    samples = 0
    for minute, cells in batch:
        for key, cell in cells.items():
            samples += cell.n
            for dim, name in zip(DIMENSIONS, key, strict=True):
                k = (dim, minute, name if name is not None else "")
                a = agg.get(k)
                if a is None:
                    agg[k] = [cell.n, cell.e4, cell.e5, cell.bytes, cell.ms, list(cell.hist)]
                else:
                    a[0] += cell.n
                    a[1] += cell.e4
                    a[2] += cell.e5
                    a[3] += cell.bytes
                    a[4] += cell.ms
                    h = a[5]
                    for i, c in enumerate(cell.hist):
                        if c:
                            h[i] += c
    rows: list[Row] = [
        (dim, minute, name, a[0], a[1], a[2], a[3], a[4], a[5])
        for (dim, minute, name), a in sorted(agg.items())
    ]
    return rows, samples


class Analytics:
    """The recorder: ``observe`` per request, a writer thread, ``query`` and ``recent``.

    ``backend_factory`` makes one backend per thread (the writer's and the reader's).
    """

    def __init__(
        self,
        backend_factory: Callable[[], Backend],
        *,
        gateway_id: str | None = None,
        flush_interval: float = 10.0,
        retention: float = 7 * 86400.0,
        recent: int = 1000,
        max_pending_cells: int = 10_000,
        retention_every: float = 600.0,
        stop_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self._factory = backend_factory
        self.gateway_id = gateway_id or socket.gethostname() or "gateway"
        self.flush_interval = flush_interval
        self.retention = retention
        self.retention_every = retention_every
        self.max_pending_cells = max_pending_cells
        self.stop_timeout = stop_timeout
        self._clock = clock
        self._ring: deque[dict[str, Any]] = deque(maxlen=recent)
        # the current minute's cells; closed minutes waiting for the writer
        self._cells: dict[tuple[Any, ...], _Cell] = {}
        self._closed: list[tuple[int, dict[tuple[Any, ...], _Cell]]] = []
        self._pending_cells = 0
        now = clock()
        self._minute = int(now // 60) * 60
        self._next_minute = self._minute + 60
        self._next_retention = 0.0  # the first flush also applies retention
        # outcomes (read by the metrics at scrape time)
        self.written = 0
        self.rows_written = 0
        self.dropped: dict[str, int] = {}
        self.write_errors: dict[str, int] = {}
        self.deleted = 0
        self.bad_entries = 0
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.failing = False
        self._writer_backend: Backend | None = None
        self._reader_backend: Backend | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Future[_Result] | None = None
        self._closed_for_good = False
        self.description = "?"
        if metrics is not None:
            self._register(metrics)

    @classmethod
    def from_config(cls, config: Config, metrics: Metrics | None = None) -> Analytics:
        """The recorder ``config.analytics`` describes (the backend is opened lazily, on the
        writer thread: a database that is down does not stop the gateway from starting)."""
        section = config.analytics
        factory: Callable[[], Backend]
        if section.store == "postgres":
            from piuptime.observe.analytics_pg import PostgresBackend, check_driver

            check_driver()
            dsn = section.dsn
            assert dsn is not None

            def factory() -> Backend:
                return PostgresBackend(dsn)

        else:
            path = section.sqlite or config.store.sqlite

            def factory() -> Backend:
                return SQLiteBackend(path)

        return cls(
            factory,
            gateway_id=section.gateway_id,
            flush_interval=section.flush_interval,
            retention=section.retention,
            recent=section.recent,
            metrics=metrics,
        )

    # -- the log phase (hot path) ----------------------------------------------------------

    def observe(self, entry: dict[str, Any]) -> None:
        """Record one finished request (its access-log entry). Never blocks, never raises."""
        try:
            self._ring.append(entry)
            if self._clock() >= self._next_minute:
                self._roll()
            ms = entry["total_ms"]
            bucket = bisect_right(BOUNDS_MS, ms)  # (a bad entry fails before any count moves)
            status = entry["status"]
            key = (entry["route"], entry["upstream"], entry["consumer"])
            cell = self._cells.get(key)
            if cell is None:
                cell = self._new_cell(key)
            cell.bytes += entry["bytes"]
            cell.ms += ms
            cell.n += 1
            cell.hist[bucket] += 1
            if status >= 400:
                if status >= 500:
                    cell.e5 += 1
                else:
                    cell.e4 += 1
        except Exception:
            self.bad_entries += 1

    def _new_cell(self, key: tuple[Any, ...]) -> _Cell:
        cell = self._cells[key] = _Cell()
        self._pending_cells += 1
        if self._pending_cells > self.max_pending_cells:
            self._shed()
        return cell

    def _roll(self) -> None:
        """A new minute began: close the current one."""
        if self._cells:
            self._closed.append((self._minute, self._cells))
            self._cells = {}
        now = self._clock()
        self._minute = int(now // 60) * 60
        self._next_minute = self._minute + 60

    def _shed(self) -> None:
        """Over the pending cap (the writer is behind): drop the oldest minutes."""
        while self._pending_cells > self.max_pending_cells and self._closed:
            _, cells = self._closed.pop(0)
            self._pending_cells -= len(cells)
            self._drop("backlog", sum(c.n for c in cells.values()))
        if self._pending_cells > self.max_pending_cells:
            # one minute alone holds more keys than the cap: drop what it has so far
            cells = self._cells
            self._cells = {}
            self._pending_cells -= len(cells)
            self._drop("backlog", sum(c.n for c in cells.values()))

    def _drop(self, reason: str, samples: int) -> None:
        if samples:
            self.dropped[reason] = self.dropped.get(reason, 0) + samples

    # -- the writer ------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the flush timer (the writer thread starts with the first flush)."""
        self._loop = loop or asyncio.get_running_loop()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="analytics-writer")
        self._timer = self._loop.call_later(self.flush_interval, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        self._timer = self._loop.call_later(self.flush_interval, self._tick)
        self._begin_flush()

    def _take(self) -> list[tuple[int, dict[tuple[Any, ...], _Cell]]]:
        if self._clock() >= self._next_minute:
            self._roll()
        batch = self._closed
        self._closed = []
        if self._cells:
            batch.append((self._minute, self._cells))
            self._cells = {}
        self._pending_cells = 0
        return batch

    def _begin_flush(self) -> asyncio.Future[_Result] | None:
        """Hand what was recorded to the writer, unless a write is still running."""
        if self._writing is not None or self._writer is None or self._loop is None:
            return None
        now = self._clock()
        cutoff = None
        if now >= self._next_retention:
            self._next_retention = now + self.retention_every
            cutoff = int((now - self.retention) // 60) * 60
        batch = self._take()
        if not batch and cutoff is None:
            return None
        fut = self._loop.run_in_executor(self._writer, self._write_job, batch, cutoff)
        self._writing = fut
        fut.add_done_callback(self._written)
        return fut

    def _write_job(
        self, batch: list[tuple[int, dict[tuple[Any, ...], _Cell]]], cutoff: int | None
    ) -> _Result:
        """On the writer thread: one transaction for the batch, another for retention."""
        t0 = time.perf_counter()
        result = _Result()
        try:
            if self._writer_backend is None:
                self._writer_backend = self._factory()
                self.description = self._writer_backend.description
            backend = self._writer_backend
            if batch:
                rows, result.samples = _rows(batch)
                result.rows = len(rows)
                try:
                    backend.write(rows, self.gateway_id)
                except StoreError as exc:
                    result.error = exc
            if cutoff is not None:
                try:
                    result.deleted = backend.delete_before(cutoff)
                except StoreError as exc:
                    result.retention_error = exc
        except Exception as exc:  # a bug or an unexpected driver error: count, never raise
            result.error = StoreError("error", f"{type(exc).__name__}: {exc}")
        result.seconds = time.perf_counter() - t0
        return result

    def _written(self, fut: asyncio.Future[_Result]) -> None:
        self._writing = None
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:  # the executor was shut down under it
            log.error("analytics: writer failed: %s", exc)
            return
        self._account(fut.result())

    def _account(self, r: _Result) -> None:
        if r.error is None:
            self.written += r.samples
            self.rows_written += r.rows
            if r.samples:
                self.last_success = time.time()
            if self.failing and r.samples:
                self.failing = False
                log.warning("analytics: writing to %s works again", self.description)
        else:
            reason = r.error.reason
            self.write_errors[reason] = self.write_errors.get(reason, 0) + 1
            self._drop(reason, r.samples)
            self.last_error = str(r.error)
            if not self.failing:
                self.failing = True
                log.warning(
                    "analytics: writing failed (%s): %s; the aggregates are dropped and counted "
                    "(piuptime_analytics_samples_dropped_total) until it works again",
                    reason,
                    r.error,
                )
        if r.retention_error is not None:
            reason = r.retention_error.reason
            self.write_errors[reason] = self.write_errors.get(reason, 0) + 1
            self.last_error = str(r.retention_error)
        self.deleted += r.deleted

    async def flush(self) -> bool:
        """Write everything recorded so far now (waiting for a write in progress first);
        True if it was written (or there was nothing to write)."""
        if self._writer is None:
            return False
        if self._writing is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._writing)
        fut = self._begin_flush()
        if fut is None:
            return True
        result = await asyncio.shield(fut)
        return result.error is None

    async def aclose(self) -> None:
        """Stop the timer, write what is left (bounded by ``stop_timeout``), close the
        connections and the threads."""
        if self._closed_for_good:
            return
        self._closed_for_good = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writer is None:
            return
        try:
            await asyncio.wait_for(self.flush(), self.stop_timeout)
        except TimeoutError:
            log.warning("analytics: the last write did not finish in %.1fs", self.stop_timeout)
        leftover = self._take()
        self._drop("stopped", sum(c.n for _, cells in leftover for c in cells.values()))
        loop = asyncio.get_running_loop()
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        for executor, attr in ((writer, "_writer_backend"), (reader, "_reader_backend")):
            if executor is None:
                continue
            backend = getattr(self, attr)
            if backend is not None and self._writing is None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        loop.run_in_executor(executor, backend.close), self.stop_timeout
                    )
            setattr(self, attr, None)
            executor.shutdown(wait=False)

    # -- reading ---------------------------------------------------------------------------

    async def query(
        self,
        *,
        by: Dimension,
        since: float,
        until: float | None = None,
        name: str | None = None,
        step: int = 60,
    ) -> list[dict[str, Any]]:
        """Aggregates per ``step`` seconds (a multiple of 60) and name, oldest first."""
        if by not in DIMENSIONS:
            raise ValueError(f"by must be one of {', '.join(DIMENSIONS)}, got {by!r}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 60 or step % 60:
            raise ValueError(f"step must be a whole number of minutes in seconds, got {step!r}")
        if not _finite(since) or since < 0:
            raise ValueError(f"since must be a time in epoch seconds, got {since!r}")
        if until is not None and (not _finite(until) or until <= since):
            raise ValueError(f"until must be a time in epoch seconds after since, got {until!r}")
        first = int(since // 60) * 60
        last = None if until is None else math.ceil(until)
        if self._reader is None:
            if self._closed_for_good:
                raise AnalyticsUnavailable("stopped", "analytics are stopped")
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="analytics-read")
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(self._reader, self._read_job, by, first, last, name)
        return _group(rows, step)

    def _read_job(self, dim: str, since: int, until: int | None, name: str | None) -> list[Row]:
        try:
            if self._reader_backend is None:
                self._reader_backend = self._factory()
            return self._reader_backend.read(dim, since, until, name)
        except StoreError as exc:
            raise AnalyticsUnavailable(exc.reason, str(exc)) from exc
        except Exception as exc:
            raise AnalyticsUnavailable("error", f"{type(exc).__name__}: {exc}") from exc

    def recent(
        self, limit: int = 100, *, route: str | None = None, status: int | str | None = None
    ) -> list[dict[str, Any]]:
        """The newest requests first (copies of their access-log entries)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be a whole number >= 0, got {limit!r}")
        check = _status_filter(status)
        out: list[dict[str, Any]] = []
        if limit == 0:
            return out
        for entry in reversed(self._ring):
            if route is not None and entry.get("route") != route:
                continue
            if check is not None and not check(entry.get("status")):
                continue
            out.append(dict(entry))
            if len(out) >= limit:
                break
        return out

    @property
    def ring_size(self) -> int:
        return self._ring.maxlen or 0

    def pending_samples(self) -> int:
        cells = [*self._cells.values()]
        for _, closed in self._closed:
            cells.extend(closed.values())
        return sum(c.n for c in cells)

    def stats(self) -> dict[str, Any]:
        """For status pages: what was written, dropped and why."""
        return {
            "store": self.description,
            "gateway_id": self.gateway_id,
            "written": self.written,
            "dropped": dict(self.dropped),
            "write_errors": dict(self.write_errors),
            "pending": self.pending_samples(),
            "failing": self.failing,
            "last_success": self.last_success,
            "last_error": self.last_error,
            "recent": len(self._ring),
        }

    # -- metrics ---------------------------------------------------------------------------

    def _register(self, metrics: Metrics) -> None:
        def by_reason(values: dict[str, int]) -> Iterable[tuple[tuple[str, ...], float]]:
            return [((reason,), float(n)) for reason, n in sorted(values.items())]

        metrics.counter(
            "analytics_samples_dropped",
            "Requests left out of the analytics aggregates, by reason (disk_full, locked, "
            "unavailable, backlog, ...): never the requests themselves.",
            ("reason",),
            read=lambda: by_reason(self.dropped),
        )
        metrics.counter(
            "analytics_write_errors",
            "Analytics batch writes (and retention deletes) that failed, by reason.",
            ("reason",),
            read=lambda: by_reason(self.write_errors),
        )
        metrics.counter(
            "analytics_samples_written",
            "Requests written into the analytics aggregates.",
            read=lambda: [((), float(self.written))],
        )
        metrics.gauge(
            "analytics_pending_samples",
            "Requests recorded but not written yet.",
            read=lambda: [((), float(self.pending_samples()))],
        )


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _status_filter(status: int | str | None) -> Callable[[Any], bool] | None:
    if status is None:
        return None
    if isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599:
        code = status
        return lambda s: bool(s == code)
    if isinstance(status, str):
        text = status.strip().lower()
        if text.isdigit() and 100 <= int(text) <= 599:
            code = int(text)
            return lambda s: bool(s == code)
        if len(text) == 3 and text[0] in "12345" and text[1:] == "xx":
            lo = int(text[0]) * 100
            return lambda s: isinstance(s, int) and lo <= s < lo + 100
    raise ValueError(f"status must be a code like 404 or a class like 5xx, got {status!r}")


def _group(rows: Iterable[Row], step: int) -> list[dict[str, Any]]:
    """Sum rows (minutes, gateways) into ``step``-second buckets per name; percentiles from
    the merged histograms."""
    groups: dict[tuple[int, str], list[Any]] = {}
    for _dim, minute, name, n, e4, e5, nbytes, ms, hist in rows:
        key = (minute - minute % step, name)
        g = groups.get(key)
        if g is None:
            g = groups[key] = [0, 0, 0, 0, 0.0, [0] * NBUCKETS]
        g[0] += n
        g[1] += e4
        g[2] += e5
        g[3] += nbytes
        g[4] += ms
        h = g[5]
        for i, c in enumerate(hist[:NBUCKETS]):
            h[i] += c
    out = []
    for (start, name), (n, e4, e5, nbytes, ms, hist) in sorted(groups.items()):
        out.append(
            {
                "minute": start,
                "name": name or None,
                "requests": n,
                "errors_4xx": e4,
                "errors_5xx": e5,
                "p50_ms": percentile(hist, 500),
                "p95_ms": percentile(hist, 950),
                "p99_ms": percentile(hist, 990),
                "avg_ms": round(ms / n, 3) if n else None,
                "bytes": nbytes,
            }
        )
    return out
