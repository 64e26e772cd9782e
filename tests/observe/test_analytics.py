"""The analytics recorder against real databases: SQLite files and a PostgreSQL database of its
own (127.0.0.1:5432, one schema per test). Time is a fake clock, so minutes are exact; the
writer is the real thread, and faults are real (a write lock held by another connection, a
database that is full for SQLite itself, PostgreSQL unreachable through a proxy we stop)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from piuptime.observe.analytics import (
    BOUNDS_MS,
    MAX_RELATIVE_ERROR,
    NBUCKETS,
    Analytics,
    AnalyticsUnavailable,
    Backend,
    SQLiteBackend,
    bucket_of,
    decode_hist,
    encode_hist,
    percentile,
)
from piuptime.observe.metrics import Metrics

T0 = 1_799_999_940.0  # a minute boundary
PG = "postgresql://postgres@127.0.0.1:5432"


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def entry(
    route: str | None = "r1",
    upstream: str | None = "u1",
    consumer: str | None = None,
    status: int = 200,
    ms: float = 5.0,
    nbytes: int = 100,
) -> dict[str, Any]:
    return {
        "route": route,
        "upstream": upstream,
        "consumer": consumer,
        "status": status,
        "bytes": nbytes,
        "total_ms": ms,
        "method": "GET",
        "path": "/x",
        "request_id": uuid.uuid4().hex,
    }


def exact(samples: list[float], permille: int) -> float:
    s = sorted(samples)
    return s[max(1, (len(s) * permille + 999) // 1000) - 1]


def close_enough(estimate: float | None, true: float) -> bool:
    assert estimate is not None
    true = min(max(true, BOUNDS_MS[0]), BOUNDS_MS[-1])
    return abs(estimate - true) <= true * MAX_RELATIVE_ERROR + 1e-3


# -- the histogram --------------------------------------------------------------------------


def test_buckets_are_log_scale_and_cover_0_1ms_to_63s() -> None:
    assert NBUCKETS == 60
    assert BOUNDS_MS[0] == pytest.approx(0.1) and BOUNDS_MS[-1] == pytest.approx(63095.7, rel=1e-4)
    assert bucket_of(0.0) == 0 and bucket_of(0.05) == 0 and bucket_of(0.1) == 1
    assert bucket_of(1.0) == 11 and bucket_of(10.0) == 21 and bucket_of(1e9) == NBUCKETS - 1
    assert pytest.approx(0.122, abs=1e-3) == MAX_RELATIVE_ERROR


def test_percentiles_are_within_the_documented_error() -> None:
    rng = random.Random(5)
    for _ in range(40):
        samples = [rng.lognormvariate(rng.uniform(-2, 9), rng.uniform(0.1, 2)) for _ in range(500)]
        hist = [0] * NBUCKETS
        for ms in samples:
            hist[bucket_of(ms)] += 1
        for pm in (500, 950, 990, 1000):
            assert close_enough(percentile(hist, pm), exact(samples, pm)), pm
    assert percentile([0] * NBUCKETS, 500) is None
    one = [0] * NBUCKETS
    one[bucket_of(0.01)] = 1
    assert percentile(one, 990) == pytest.approx(0.1)  # under 0.1 ms reads 0.1 ms


def test_the_sparse_encoding_round_trips() -> None:
    hist = [0] * NBUCKETS
    hist[3], hist[40], hist[59] = 7, 2**31, 1
    blob = encode_hist(hist)
    assert len(blob) == 3 * 8
    assert decode_hist(blob) == hist
    assert decode_hist(b"") == [0] * NBUCKETS


# -- backends -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    """A database of this module's own; dropped at the end."""
    psycopg = pytest.importorskip("psycopg")
    name = f"piuptime_analytics_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(f"{PG}/postgres", autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield f"{PG}/{name}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_dsn(pg_database: str) -> str:
    """A schema per test: the backend's table lands in it through the search path."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    return f"{pg_database}?options=-csearch_path%3D{schema}"


def make_factory(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[], Any]:
    if kind == "sqlite":
        path = tmp_path / "store.sqlite"
        return lambda: SQLiteBackend(path)
    from piuptime.observe.analytics_pg import PostgresBackend

    dsn = request.getfixturevalue("pg_dsn")
    return lambda: PostgresBackend(dsn)


@pytest.fixture(params=["sqlite", "postgres"])
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Any]:
    return make_factory(request.param, tmp_path, request)


@contextlib.asynccontextmanager
async def recorder(factory: Callable[[], Backend], **kw: Any) -> AsyncIterator[Analytics]:
    kw.setdefault("flush_interval", 3600.0)  # the tests flush by hand
    kw.setdefault("clock", FakeClock())
    rec = Analytics(factory, **kw)
    rec.start()
    try:
        yield rec
    finally:
        await rec.aclose()


def row_by(rows: list[dict[str, Any]], minute: float, name: str | None) -> dict[str, Any]:
    found = [r for r in rows if r["minute"] == minute and r["name"] == name]
    assert len(found) == 1, (minute, name, rows)
    return found[0]


async def test_per_minute_aggregates_by_route_upstream_and_consumer(
    factory: Callable[[], Backend],
) -> None:
    clock = FakeClock()
    rng = random.Random(1)
    async with recorder(factory, clock=clock, gateway_id="g1") as rec:
        lat: dict[tuple[int, str], list[float]] = {}
        # minute 0: r1 (u1) by kitchen and anonymous; r2 (u1); a 404 without a route
        plan = [
            ("r1", "u1", "kitchen", 200, 120),
            ("r1", "u1", None, 200, 30),
            ("r1", "u1", "kitchen", 503, 10),
            ("r1", "u1", None, 429, 15),
            ("r2", "u1", "kitchen", 200, 25),
            ("r2", "u1", None, 404, 5),
            (None, None, None, 404, 4),
        ]
        for minute in (0, 1):
            clock.t = T0 + minute * 60 + 1
            for route, up, consumer, status, count in plan if minute == 0 else plan[:4]:
                for _ in range(count):
                    ms = rng.lognormvariate(2 + minute, 0.8)
                    lat.setdefault((minute, route or ""), []).append(ms)
                    rec.observe(entry(route, up, consumer, status, ms, 10))
                clock.t += 0.5
        clock.t = T0 + 150
        assert await rec.flush()
        assert rec.written == 209 + 175 and rec.dropped == {} and rec.pending_samples() == 0

        routes = await rec.query(by="route", since=T0)
        assert [(r["minute"], r["name"]) for r in routes] == [
            (T0, None),
            (T0, "r1"),
            (T0, "r2"),
            (T0 + 60, "r1"),
        ]
        r1 = row_by(routes, T0, "r1")
        assert (r1["requests"], r1["errors_4xx"], r1["errors_5xx"]) == (175, 15, 10)
        assert r1["bytes"] == 1750
        for key in ("p50_ms", "p95_ms", "p99_ms"):
            pm = {"p50_ms": 500, "p95_ms": 950, "p99_ms": 990}[key]
            assert close_enough(r1[key], exact(lat[(0, "r1")], pm)), key
        avg = sum(lat[(0, "r1")]) / 175
        assert r1["avg_ms"] == pytest.approx(avg, rel=1e-6, abs=1e-3)
        r2 = row_by(routes, T0, "r2")
        assert (r2["requests"], r2["errors_4xx"], r2["errors_5xx"]) == (30, 5, 0)
        none = row_by(routes, T0, None)
        assert (none["requests"], none["errors_4xx"]) == (4, 4)
        later = row_by(routes, T0 + 60, "r1")
        assert (later["requests"], later["errors_4xx"], later["errors_5xx"]) == (175, 15, 10)
        assert close_enough(later["p95_ms"], exact(lat[(1, "r1")], 950))

        ups = await rec.query(by="upstream", since=T0, until=T0 + 60)
        assert [(r["name"], r["requests"]) for r in ups] == [(None, 4), ("u1", 205)]
        consumers = await rec.query(by="consumer", since=T0, until=T0 + 60)
        assert [(r["name"], r["requests"], r["errors_5xx"]) for r in consumers] == [
            (None, 54, 0),
            ("kitchen", 155, 10),
        ]
        # step: two minutes in one bucket (aligned to the epoch); a name filter
        two = await rec.query(by="route", since=T0, step=120, name="r1")
        start = T0 - 60  # T0 is an odd minute: the 2-minute steps start a minute earlier
        assert [(r["minute"], r["requests"]) for r in two] == [(start, 175), (start + 120, 175)]
        [day] = await rec.query(by="route", since=T0 - 86400, step=86400, name="r1")
        assert day["minute"] == T0 - 28740 and day["requests"] == 350
        assert close_enough(day["p99_ms"], exact(lat[(0, "r1")] + lat[(1, "r1")], 990))
        assert await rec.query(by="route", since=T0 + 120) == []


async def test_several_flushes_of_one_minute_add_up(factory: Callable[[], Backend]) -> None:
    clock = FakeClock(T0 + 5)
    async with recorder(factory, clock=clock) as rec:
        samples = []
        for batch in range(3):
            for i in range(20):
                ms = 1.0 + batch * 40 + i
                samples.append(ms)
                rec.observe(entry(status=500 if i == 0 else 200, ms=ms))
            clock.t += 10
            assert await rec.flush()
        [row] = await rec.query(by="route", since=T0)
        assert row["requests"] == 60 and row["errors_5xx"] == 3
        for key, pm in (("p50_ms", 500), ("p95_ms", 950), ("p99_ms", 990)):
            assert close_enough(row[key], exact(samples, pm)), key


async def test_retention_deletes_old_minutes(factory: Callable[[], Backend]) -> None:
    clock = FakeClock(T0 + 1)
    async with recorder(factory, clock=clock, retention=3600.0, retention_every=0.0) as rec:
        rec.observe(entry(route="old"))
        assert await rec.flush()
        clock.t += 1800
        rec.observe(entry(route="mid"))
        assert await rec.flush()
        assert [r["name"] for r in await rec.query(by="route", since=0)] == ["old", "mid"]
        clock.t = T0 + 3600 + 120  # "old" (minute T0) is now past the retention
        rec.observe(entry(route="new"))
        assert await rec.flush()
        assert [r["name"] for r in await rec.query(by="route", since=0)] == ["mid", "new"]
        assert rec.deleted == 3  # route, upstream and consumer rows of that minute


async def test_two_gateways_on_one_postgres_add_up(pg_dsn: str) -> None:
    from piuptime.observe.analytics_pg import PostgresBackend

    rng = random.Random(2)
    clock = FakeClock(T0 + 2)
    samples: list[float] = []
    async with (
        recorder(lambda: PostgresBackend(pg_dsn), clock=clock, gateway_id="pi-a") as a,
        recorder(lambda: PostgresBackend(pg_dsn), clock=clock, gateway_id="pi-b") as b,
    ):
        for rec, n, mu in ((a, 300, 1.0), (b, 100, 5.0), (a, 50, 3.0)):
            for _ in range(n):
                ms = rng.lognormvariate(mu, 0.5)
                samples.append(ms)
                rec.observe(entry(consumer="cam", ms=ms, status=502 if ms > 200 else 200))
            await asyncio.gather(a.flush(), b.flush())
        for rec in (a, b):  # either gateway reads the sum
            [row] = await rec.query(by="consumer", since=T0, name="cam")
            assert row["requests"] == 450
            assert row["errors_5xx"] == sum(ms > 200 for ms in samples)
            for key, pm in (("p50_ms", 500), ("p95_ms", 950), ("p99_ms", 990)):
                assert close_enough(row[key], exact(samples, pm)), key
    import psycopg

    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            "SELECT gateway, requests FROM analytics_minutes WHERE dim = 'route' ORDER BY gateway"
        ).fetchall()
    assert rows == [("pi-a", 350), ("pi-b", 100)]  # one row per gateway, a's two flushes merged


# -- the ring -------------------------------------------------------------------------------


async def test_the_ring_is_bounded_newest_first_and_filterable(tmp_path: Path) -> None:
    rec = Analytics(lambda: SQLiteBackend(tmp_path / "a.db"), recent=5, clock=FakeClock())
    for i in range(12):
        rec.observe(entry(route="a" if i % 2 else "b", status=(200, 404, 503)[i % 3], nbytes=i))
    assert rec.ring_size == 5 and len(rec.recent(1000)) == 5
    assert [e["bytes"] for e in rec.recent()] == [11, 10, 9, 8, 7]
    assert [e["bytes"] for e in rec.recent(2)] == [11, 10]
    assert [e["bytes"] for e in rec.recent(route="a")] == [11, 9, 7]
    assert [e["bytes"] for e in rec.recent(status=503)] == [11, 8]
    assert [e["bytes"] for e in rec.recent(status="4xx")] == [10, 7]
    assert [e["bytes"] for e in rec.recent(status="200", route="b")] == []
    assert rec.recent(0) == []
    got = rec.recent(1)[0]
    got["bytes"] = -1  # copies: the ring is not changed through them
    assert rec.recent(1)[0]["bytes"] == 11
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="limit"):
            rec.recent(bad)  # type: ignore[arg-type]
    for status in ("6xx", 99, "ok", "2x"):
        with pytest.raises(ValueError, match="status"):
            rec.recent(status=status)
    off = Analytics(lambda: SQLiteBackend(tmp_path / "b.db"), recent=0)
    off.observe(entry())
    assert off.recent() == [] and off.pending_samples() == 1


# -- failures -------------------------------------------------------------------------------


async def test_a_locked_database_drops_and_counts_without_blocking_the_loop(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.sqlite"
    metrics = Metrics()
    async with recorder(
        lambda: SQLiteBackend(path, busy_timeout=0.5), metrics=metrics, clock=FakeClock(T0 + 1)
    ) as rec:
        rec.observe(entry())
        assert await rec.flush()  # the table exists
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process's write lock
        try:
            for _ in range(25):
                rec.observe(entry(status=500))
            gaps: list[float] = []

            async def ticker() -> None:
                last = time.perf_counter()
                while True:
                    await asyncio.sleep(0.005)
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now

            tick = asyncio.create_task(ticker())
            t0 = time.perf_counter()
            ok = await rec.flush()
            waited = time.perf_counter() - t0
            tick.cancel()
            assert not ok and waited >= 0.4  # the writer thread waited out the busy timeout
            assert len(gaps) > 20 and max(gaps) < 0.2  # ... while the loop went on
            assert rec.dropped == {"locked": 25} and rec.write_errors == {"locked": 1}
            assert rec.failing and "locked" in (rec.last_error or "")
        finally:
            other.execute("ROLLBACK")
            other.close()
        rec.observe(entry())
        assert await rec.flush()
        assert rec.written == 2 and not rec.failing
        [row] = await rec.query(by="route", since=T0)
        assert row["requests"] == 2 and row["errors_5xx"] == 0
    snap = metrics.snapshot()
    assert snap["piuptime_analytics_samples_dropped_total"] == {"reason=locked": 25.0}
    assert snap["piuptime_analytics_write_errors_total"] == {"reason=locked": 1.0}
    assert snap["piuptime_analytics_samples_written_total"] == {"": 2.0}


async def test_a_database_full_for_sqlite_itself_drops_then_recovers(tmp_path: Path) -> None:
    # PRAGMA max_page_count makes SQLite answer SQLITE_FULL as on a full disk (the gateway test
    # fills a real filesystem; this one runs anywhere)
    path = tmp_path / "full.sqlite"
    limit = {"max_page_count": 12}
    clock = FakeClock(T0 + 1)
    async with recorder(lambda: SQLiteBackend(path, pragmas=limit), clock=clock) as rec:
        n, written_minutes = 0, 0
        while not rec.dropped:
            assert n < 200, "the database never filled up"
            for i in range(40):  # a minute of many consumers: many rows
                rec.observe(entry(consumer=f"c{n}-{i}"))
            n += 1
            clock.t += 60
            if await rec.flush():
                written_minutes += 1
        assert rec.dropped == {"disk_full": 40} and rec.write_errors == {"disk_full": 1}
        assert rec.written == 40 * written_minutes
        # room again: delete rows from another connection, and writing resumes
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("DELETE FROM analytics_minutes")
        other.close()
        rec.observe(entry(route="after"))
        assert await rec.flush()
        assert [r["name"] for r in await rec.query(by="route", since=0)] == ["after"]


async def test_postgres_down_drops_and_counts_then_writing_resumes(pg_dsn: str) -> None:
    from piuptime.observe.analytics_pg import PostgresBackend

    proxy = await TcpProxy(5432).start()
    dsn = pg_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    async with recorder(lambda: PostgresBackend(dsn, connect_timeout=1)) as rec:
        rec.observe(entry())
        assert await rec.flush()
        await proxy.stop()  # the server goes away under an open connection
        for _ in range(7):
            rec.observe(entry())
        assert not await rec.flush()
        for _ in range(3):
            rec.observe(entry())
        assert not await rec.flush()  # reconnecting is refused
        assert rec.dropped == {"unavailable": 10}
        assert rec.write_errors == {"unavailable": 2}
        with pytest.raises(AnalyticsUnavailable):
            await rec.query(by="route", since=T0)
        await proxy.start()
        rec.observe(entry())
        assert await rec.flush()
        assert rec.written == 2 and not rec.failing
        [row] = await rec.query(by="route", since=T0)
        assert row["requests"] == 2
    await proxy.stop()


class TcpProxy:
    """A TCP relay to a local port that can be stopped (connections reset) and restarted on
    the same port: PostgreSQL going away and coming back, without touching the server."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> TcpProxy:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_w}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        self.writers -= {writer, up_w}

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for w in list(self.writers):
            w.transport.abort()
        self.writers.clear()


async def test_pending_work_is_bounded_when_the_writer_is_behind(tmp_path: Path) -> None:
    clock = FakeClock(T0 + 1)
    rec = Analytics(lambda: SQLiteBackend(tmp_path / "a.db"), clock=clock, max_pending_cells=4)
    # never started: nothing is written, as when the writer is stuck
    for _minute in range(5):
        for i in range(2):
            rec.observe(entry(consumer=f"c{i}"))
            rec.observe(entry(consumer=f"c{i}"))
        clock.t += 60
    assert rec.dropped == {"backlog": 12} and rec.pending_samples() == 8
    assert sum(rec.dropped.values()) + rec.pending_samples() == 20


async def test_bad_entries_are_counted_not_raised_and_bad_queries_refused(tmp_path: Path) -> None:
    async with recorder(lambda: SQLiteBackend(tmp_path / "a.db")) as rec:
        rec.observe({"route": "r"})
        rec.observe({**entry(), "total_ms": None})
        assert rec.bad_entries == 2
        for kw, match in (
            ({"by": "target", "since": T0}, "by must be"),
            ({"by": "route", "since": T0, "step": 90}, "step"),
            ({"by": "route", "since": T0, "step": 0}, "step"),
            ({"by": "route", "since": float("nan")}, "since"),
            ({"by": "route", "since": -5}, "since"),
            ({"by": "route", "since": T0, "until": T0}, "until"),
        ):
            with pytest.raises(ValueError, match=match):
                await rec.query(**kw)


async def test_an_unopenable_path_is_counted_and_the_recorder_stops_cleanly(
    tmp_path: Path,
) -> None:
    path = tmp_path / "no" / "such" / "dir" / "a.db"
    async with recorder(lambda: SQLiteBackend(path)) as rec:
        rec.observe(entry())
        assert not await rec.flush()
        assert rec.dropped == {"cant_open": 1}
        with pytest.raises(AnalyticsUnavailable) as info:
            await rec.query(by="route", since=T0)
        assert info.value.reason == "cant_open"
    # stopping writes what is left, then refuses queries
    rec2 = Analytics(lambda: SQLiteBackend(tmp_path / "b.db"), clock=FakeClock())
    rec2.start()
    rec2.observe(entry())
    await rec2.aclose()
    assert rec2.written == 1
    with pytest.raises(AnalyticsUnavailable):
        await rec2.query(by="route", since=T0)
