"""Analytics in a running gateway: real traffic over sockets while the analytics database is on a
filesystem that is really full (a tiny tmpfs), or locked by another connection. Every request
must still succeed; what could not be written is counted, and writing resumes afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import RawClient, Upstream, fetch, gateway_yaml, start_app, wait_until

ROUTES = """\
  - name: api
    match: {path: /api/}
    upstream: main
"""


def config(up: Upstream, analytics: str) -> str:
    return gateway_yaml({"main": [up.port]}, ROUTES, f"analytics: {analytics}\n")


async def traffic(port: int, n: int, connections: int = 4) -> list[tuple[int, float]]:
    """``n`` GETs over keep-alive connections; (status, seconds) of each."""
    out: list[tuple[int, float]] = []

    async def one_connection(count: int) -> None:
        client = await RawClient.connect(port)
        try:
            for _ in range(count):
                t0 = time.perf_counter()
                reply = await client.request("GET", "/api/x")
                out.append((reply.status, time.perf_counter() - t0))
        finally:
            await client.close()

    share = [n // connections + (i < n % connections) for i in range(connections)]
    await asyncio.gather(*(one_connection(c) for c in share if c))
    return out


def metric_values(text: str, name: str) -> dict[str, float]:
    """``{reason label or "": value}`` of one family, parsed by prometheus_client."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                values[sample.labels.get("reason", "")] = sample.value
    return values


async def stored_requests(app: Any) -> int:
    rows = await app.analytics.query(by="route", since=time.time() - 3600)
    return sum(r["requests"] for r in rows if r["name"] == "api")


@pytest.fixture
async def up() -> Any:
    server = await Upstream(name="up").start()
    yield server
    await server.stop()


@contextlib.contextmanager
def tiny_filesystem(where: Path, size: str = "1m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where``: a disk that really fills up. Needs the right to
    mount (root, as in CI here); skipped otherwise (test_analytics.py covers SQLITE_FULL from
    SQLite's own page limit everywhere)."""
    where.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)


def fill(path: Path) -> int:
    """Write zeros to ``path`` until the filesystem has no byte left; returns the bytes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    total = 0
    chunk = b"\0" * 65536
    try:
        while True:
            try:
                total += os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    return total
                chunk = chunk[: len(chunk) // 16 or 1]
    finally:
        os.close(fd)


async def test_analytics_are_off_without_the_section(up: Upstream) -> None:
    app, port = await start_app(gateway_yaml({"main": [up.port]}, ROUTES))
    try:
        assert app.analytics is None
        assert (await fetch(port, "/api/x")).status == 200
        assert not any(k.startswith("piuptime_analytics") for k in app.metrics.snapshot())
    finally:
        await app.stop()


async def test_a_full_disk_drops_and_counts_samples_and_every_request_succeeds(
    up: Upstream, tmp_path: Path
) -> None:
    with tiny_filesystem(tmp_path / "disk") as disk:
        db = disk / "store.sqlite"
        app, port = await start_app(config(up, f"{{sqlite: {db}, flush_interval: 100ms}}"))
        analytics = app.analytics
        try:
            sent = 0
            results = await traffic(port, 40)
            sent += len(results)
            assert [s for s, _ in results] == [200] * 40
            # the timer-driven writer writes them
            await wait_until(lambda: analytics.written == 40, 10, "the first 40 written")

            filler = disk / "filler"
            assert fill(filler) > 0
            with pytest.raises(OSError, match="No space left"):
                (disk / "probe").write_bytes(b"x" * 8192)

            results = await traffic(port, 200)
            sent += len(results)
            assert [s for s, _ in results] == [200] * 200  # every request succeeds
            await analytics.flush()
            dropped = sum(analytics.dropped.values())
            assert dropped > 0 and set(analytics.dropped) == {"disk_full"}
            assert analytics.write_errors["disk_full"] >= 1
            assert analytics.failing
            # nothing is lost silently: each request is either written or counted as dropped
            assert analytics.written + dropped == sent
            assert await stored_requests(app) == analytics.written
            text = app.metrics.render()
            assert metric_values(text, "piuptime_analytics_samples_dropped_total") == {
                "disk_full": dropped
            }
            assert metric_values(text, "piuptime_analytics_samples_written_total") == {
                "": analytics.written
            }

            filler.unlink()  # space again: writing resumes
            results = await traffic(port, 30)
            sent += len(results)
            assert [s for s, _ in results] == [200] * 30
            assert await analytics.flush()
            assert not analytics.failing
            assert sum(analytics.dropped.values()) == dropped
            assert analytics.written + dropped == sent
            assert await stored_requests(app) == analytics.written >= 70
        finally:
            await app.stop()


async def test_a_locked_database_never_slows_requests(up: Upstream, tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite"
    app, port = await start_app(config(up, f"{{sqlite: {db}, flush_interval: 100ms}}"))
    analytics = app.analytics
    other = None
    try:
        await traffic(port, 5, connections=1)
        assert await analytics.flush()
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # held for longer than the writer's 1 s busy timeout
        results: list[tuple[int, float]] = []
        deadline = time.monotonic() + 1.6
        while time.monotonic() < deadline or not analytics.dropped:
            assert time.monotonic() < deadline + 5, "the writer never gave up on the lock"
            results += await traffic(port, 8, connections=2)
        assert {s for s, _ in results} == {200}
        assert max(t for _, t in results) < 0.5, "a request waited for the analytics writer"
        assert set(analytics.dropped) == {"locked"}
        other.execute("ROLLBACK")
        other.close()
        other = None
        await traffic(port, 5, connections=1)
        assert await analytics.flush()
        assert analytics.written + analytics.dropped["locked"] == 10 + len(results)
        assert await stored_requests(app) == analytics.written
    finally:
        if other is not None:
            other.close()
        await app.stop()


async def test_stopping_writes_the_last_requests(up: Upstream, tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite"
    app, port = await start_app(config(up, f"{{sqlite: {db}, flush_interval: 10m}}"))
    await traffic(port, 12, connections=2)
    assert (await fetch(port, "/nothing-here")).status == 404
    assert app.analytics.recent(1)[0]["status"] == 404
    assert app.analytics.written == 0
    await app.stop()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            "SELECT name, requests, errors_4xx FROM analytics_minutes WHERE dim = 'route' "
            "ORDER BY name"
        ).fetchall()
    assert rows == [("", 1, 1), ("api", 12, 0)]


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """A PostgreSQL database of this test's own (127.0.0.1:5432), dropped afterwards."""
    psycopg = pytest.importorskip("psycopg")
    server = "postgresql://postgres@127.0.0.1:5432"
    name = f"piuptime_analytics_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=3) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432: {exc}")
    yield f"{server}/{name}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_two_gateways_on_one_postgres_add_up(up: Upstream, pg_dsn: str) -> None:
    apps = []
    try:
        for gid in ("pi-a", "pi-b"):
            text = config(up, f"{{store: postgres, dsn: '{pg_dsn}', gateway_id: {gid}}}")
            apps.append(await start_app(text))
        (a, port_a), (b, port_b) = apps
        await traffic(port_a, 9, connections=1)
        await traffic(port_b, 4, connections=1)
        assert (await fetch(port_b, "/nothing-here")).status == 404
        assert await a.analytics.flush() and await b.analytics.flush()
        for app in (a, b):  # either gateway sees both
            rows = await app.analytics.query(by="upstream", since=time.time() - 120)
            assert sum(r["requests"] for r in rows if r["name"] == "main") == 13
            assert sum(r["errors_4xx"] for r in rows if r["name"] is None) == 1
        assert a.analytics.stats()["store"] == "postgres"
    finally:
        for app, _ in apps:
            await app.stop()
