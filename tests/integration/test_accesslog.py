"""The access log: one JSON line per request with the DESIGN.md fields, off the hot path."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from piuptime.observe.accesslog import FIELDS, AccessLog
from tests.support import RawClient, Upstream, fetch, gateway_yaml, start_app, wait_until

ROUTES = "  - name: api\n    match: {path: /api/}\n    upstream: main\n"


@pytest.fixture
async def up() -> AsyncIterator[Upstream]:
    u = await Upstream(name="u0").start()
    yield u
    await u.stop()


def _lines(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x]


async def test_one_json_line_per_request_with_every_field(up: Upstream, tmp_path: Path) -> None:
    log_path = tmp_path / "access.log"
    text = gateway_yaml({"main": [up.port]}, ROUTES).replace(
        "access_log: {path: off}", f"access_log: {{path: {log_path}}}"
    )
    app, port = await start_app(text)
    try:
        await fetch(port, "/api/x?secret=1", headers={"X-Request-ID": "abc-1"})
        await fetch(port, "/nope")
        c = await RawClient.connect(port)
        await c.send(
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        assert (await c.read_response()).status == 400
        await c.close()
        await wait_until(lambda: len(_lines(log_path)) == 3, what="3 log lines")
    finally:
        await app.stop()
    ok, missing, bad = _lines(log_path)
    for entry in (ok, missing):
        assert set(FIELDS) <= set(entry)
    assert ok["request_id"] == "abc-1"
    assert ok["route"] == "api" and ok["upstream"] == "main"
    assert ok["target"] == f"http://127.0.0.1:{up.port}"
    assert ok["method"] == "GET" and ok["path"] == "/api/x"  # the query is never logged
    assert ok["status"] == 200 and ok["bytes"] == 2 and ok["attempts"] == 1
    total, upstream, gateway = ok["total_ms"], ok["upstream_ms"], ok["gateway_ms"]
    assert isinstance(total, float) and isinstance(upstream, float)
    assert total >= upstream >= 0 and abs(total - upstream - gateway) < 0.01  # type: ignore[operator]
    # Sub-millisecond resolution (uvloop's loop.time() would give whole milliseconds).
    assert total > 0 and total != int(total)  # type: ignore[operator]
    assert missing["status"] == 404 and missing["route"] is None
    assert isinstance(missing["request_id"], str) and missing["request_id"]
    assert bad["status"] == 400


async def test_off_writes_nothing(up: Upstream, tmp_path: Path) -> None:
    app, port = await start_app(gateway_yaml({"main": [up.port]}, ROUTES))
    try:
        assert not app.access_log.enabled
        assert (await fetch(port, "/api/")).status == 200
    finally:
        await app.stop()


async def test_write_failures_drop_lines_never_requests(up: Upstream) -> None:
    """/dev/full fails every write with ENOSPC: requests succeed, lost lines are counted."""
    text = gateway_yaml({"main": [up.port]}, ROUTES).replace(
        "access_log: {path: off}", "access_log: {path: /dev/full}"
    )
    app, port = await start_app(text)
    try:
        for _ in range(20):
            assert (await fetch(port, "/api/")).status == 200
        await wait_until(lambda: app.access_log.dropped == 20, what="20 dropped lines")
        assert app.access_log.write_errors >= 1
    finally:
        await app.stop()


async def test_backlog_is_bounded() -> None:
    log = AccessLog("/dev/null", max_pending_bytes=1000, flush_interval=60)
    log.start(asyncio.get_running_loop())
    for i in range(100):
        log.record({"i": i, "pad": "x" * 50})
    assert log.dropped > 0 and log._batch_bytes <= 1000
    await log.aclose()
    assert log.written + log.dropped == 100


async def test_a_full_batch_is_written_without_waiting_for_the_timer(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path), flush_interval=60, flush_bytes=1024)
    log.start(asyncio.get_running_loop())
    for i in range(40):  # about 2.4 KB: two batches of 1 KiB handed to the writer at once
        log.record({"i": i, "pad": "x" * 50})
    await wait_until(lambda: log.written >= 16, what="lines written before the 60 s timer")
    assert path.read_text().startswith('{"i":0,')
    await log.aclose()
    assert log.written == 40 and log.dropped == 0
    assert len(path.read_text().splitlines()) == 40
