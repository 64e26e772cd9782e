"""W3C trace context through the real gateway (no extra needed): raw upstreams record what
they were sent."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from tests.support import SeenRequest, Upstream, fetch, gateway_yaml, start_app, wait_until

ROUTES = "  - name: api\n    match: {path: /api/}\n    upstream: main\n"
TID = "4bf92f3577b34da6a3ce929d0e0e4736"
PID = "00f067aa0ba902b7"
SENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])\Z")


@pytest.fixture
async def up() -> AsyncIterator[Upstream]:
    u = await Upstream(name="u0").start()
    yield u
    await u.stop()


def _trace(seen: SeenRequest) -> tuple[str, str, str, list[str]]:
    """(trace id, parent id, flags, tracestate values) the upstream received."""
    parents = [v.decode() for k, v in seen.headers if k == b"traceparent"]
    assert len(parents) == 1, seen.headers
    m = SENT.match(parents[0])
    assert m is not None, parents[0]
    states = [v.decode() for k, v in seen.headers if k == b"tracestate"]
    return m.group(1), m.group(2), m.group(3), states


async def test_incoming_trace_is_continued_with_a_new_parent(up: Upstream) -> None:
    app, port = await start_app(gateway_yaml({"main": [up.port]}, ROUTES))
    try:
        state = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
        for flags in ("01", "00"):
            r = await fetch(
                port,
                "/api/x",
                headers={"traceparent": f"00-{TID}-{PID}-{flags}", "tracestate": state},
            )
            assert r.status == 200
            trace_id, parent, sent_flags, states = _trace(up.seen[-1])
            assert trace_id == TID and parent != PID and sent_flags == flags
            assert states == [state]
        # the bodied path (not the callback one) does the same
        r = await fetch(
            port, "/api/x", "POST", body=b"hello", headers={"traceparent": f"00-{TID}-{PID}-01"}
        )
        assert r.status == 200 and up.seen[-1].body == b"hello"
        trace_id, parent, flags, states = _trace(up.seen[-1])
        assert (trace_id, flags, states) == (TID, "01", []) and parent != PID
        # each request gets its own span id
        parents = {_trace(s)[1] for s in up.seen}
        assert len(parents) == len(up.seen)
    finally:
        await app.stop()


@pytest.mark.parametrize(
    "bad",
    [
        f"00-{TID.upper()}-{PID}-01",
        f"00-{'0' * 32}-{PID}-01",
        f"00-{TID}-{'0' * 16}-01",
        f"ff-{TID}-{PID}-01",
        f"00-{TID}-{PID}-01-extra",
        "garbage",
    ],
)
async def test_invalid_traceparent_starts_a_new_trace(up: Upstream, bad: str) -> None:
    app, port = await start_app(gateway_yaml({"main": [up.port]}, ROUTES))
    try:
        r = await fetch(port, "/api/", headers={"traceparent": bad, "tracestate": "a=1"})
        assert r.status == 200
        trace_id, _, flags, states = _trace(up.seen[-1])
        assert trace_id != TID and flags == "00" and states == []  # tracestate dropped too
    finally:
        await app.stop()


async def test_invalid_tracestate_is_dropped_and_the_trace_kept(up: Upstream) -> None:
    app, port = await start_app(gateway_yaml({"main": [up.port]}, ROUTES))
    try:
        tp = f"00-{TID}-{PID}-01"
        await fetch(port, "/api/", headers={"traceparent": tp, "tracestate": "a=1,a=2"})
        assert _trace(up.seen[-1])[0] == TID and _trace(up.seen[-1])[3] == []
        too_many = ",".join(f"k{i}=v" for i in range(33))
        await fetch(port, "/api/", headers={"traceparent": tp, "tracestate": too_many})
        assert _trace(up.seen[-1])[3] == []
    finally:
        await app.stop()


async def test_absent_traceparent_is_generated_and_sampled_by_ratio(
    up: Upstream, tmp_path: Path
) -> None:
    log_path = tmp_path / "access.log"
    text = gateway_yaml({"main": [up.port]}, ROUTES).replace(
        "access_log: {path: off}", f"access_log: {{path: {log_path}}}"
    )
    app, port = await start_app(text)  # no tracing section: new traces are not sampled
    try:
        for _ in range(3):
            assert (await fetch(port, "/api/")).status == 200
        got = [_trace(s) for s in up.seen]
        assert len({g[0] for g in got}) == 3 and {g[2] for g in got} == {"00"}
        await fetch(port, "/nope", headers={"traceparent": f"00-{TID}-{PID}-01"})
        await wait_until(lambda: log_path.exists() and len(log_path.read_text().splitlines()) == 4)
        entries = [json.loads(x) for x in log_path.read_text().splitlines()]
        # the access log carries the trace id the upstream saw: logs and traces join
        assert [e["trace_id"] for e in entries[:3]] == [g[0] for g in got]
        assert entries[3]["status"] == 404 and entries[3]["trace_id"] == TID
    finally:
        await app.stop()
    sampled = gateway_yaml({"main": [up.port]}, ROUTES, extra="tracing: {sample: 100%}")
    app, port = await start_app(sampled)
    try:
        await fetch(port, "/api/")
        assert _trace(up.seen[-1])[2] == "01"
        # an incoming "not sampled" is followed whatever the ratio
        await fetch(port, "/api/", headers={"traceparent": f"00-{TID}-{PID}-00"})
        assert _trace(up.seen[-1])[2] == "00"
    finally:
        await app.stop()


async def test_retries_keep_the_trace(up: Upstream) -> None:
    """Without span export every attempt carries the same trace and gateway span."""
    calls = 0

    async def flaky(req: SeenRequest, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        status = b"503 Service Unavailable" if calls == 1 else b"200 OK"
        writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()

    up.handler = flaky
    routes = ROUTES
    text = gateway_yaml({"main": [up.port]}, routes).replace(
        "timeouts: {connect: 1s, read: 2s}",
        "timeouts: {connect: 1s, read: 2s}\n    retries: {attempts: 1, min_per_second: 10}",
    )
    app, port = await start_app(text)
    try:
        r = await fetch(port, "/api/", headers={"traceparent": f"00-{TID}-{PID}-01"})
        assert r.status == 200 and len(up.seen) == 2
        first, second = (_trace(s) for s in up.seen)
        assert first == second and first[0] == TID
    finally:
        await app.stop()


async def test_websocket_upgrade_carries_the_trace() -> None:
    seen: list[tuple[str | None, str | None]] = []

    def record(connection: ServerConnection, request: object) -> None:
        headers = request.headers  # type: ignore[attr-defined]
        seen.append((headers.get("traceparent"), headers.get("tracestate")))

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", 0, process_request=record) as server:
        up_port = next(iter(server.sockets)).getsockname()[1]
        routes = "  - name: ws\n    match: {path: /ws/}\n    upstream: main\n"
        app, port = await start_app(gateway_yaml({"main": [up_port]}, routes))
        try:
            tp = f"00-{TID}-{PID}-01"
            headers = {"traceparent": tp, "tracestate": "a=1"}
            async with connect(f"ws://127.0.0.1:{port}/ws/", additional_headers=headers) as ws:
                await ws.send("hi")
                assert await ws.recv() == "hi"
            async with connect(f"ws://127.0.0.1:{port}/ws/") as ws:
                await ws.send("hi")
                assert await ws.recv() == "hi"
        finally:
            await app.stop()
    (continued, state), (generated, no_state) = seen
    assert continued is not None and generated is not None
    m = SENT.match(continued)
    assert m is not None and m.group(1) == TID and m.group(2) != PID and m.group(3) == "01"
    assert state == "a=1" and no_state is None
    m = SENT.match(generated)
    assert m is not None and m.group(1) != TID


async def test_reload_applies_a_new_sample_ratio(up: Upstream, tmp_path: Path) -> None:
    text = gateway_yaml({"main": [up.port]}, ROUTES)
    app, port = await start_app(text, tmp_path, watch_interval=0)
    try:
        await fetch(port, "/api/")
        assert _trace(up.seen[-1])[2] == "00"
        (tmp_path / "piuptime.yaml").write_text(text + "tracing: {sample: 100%}\n")
        assert await app.reload("test")
        await fetch(port, "/api/")
        assert _trace(up.seen[-1])[2] == "01"
        (tmp_path / "piuptime.yaml").write_text(text)  # the section removed: back to 0
        assert await app.reload("test")
        await fetch(port, "/api/")
        assert _trace(up.seen[-1])[2] == "00"
    finally:
        await app.stop()
