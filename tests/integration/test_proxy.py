"""The proxy end to end over real sockets: client → gateway (in-process) → raw upstreams."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

import pytest

from tests.support import RawClient, SeenRequest, Upstream, fetch, gateway_yaml, start_app


@pytest.fixture
async def ups() -> AsyncIterator[list[Upstream]]:
    servers = [await Upstream(name=f"u{i}").start() for i in range(3)]
    yield servers
    for s in servers:
        await s.stop()


ROUTES = """\
  - name: api
    match: {path: /api/}
    upstream: main
  - name: stripped
    match: {path: /dev/, methods: [GET, POST]}
    upstream: main
    strip_prefix: true
  - name: rewritten
    match: {path: "/devices/{id}/reading"}
    upstream: main
    rewrite: "/v2/readings/{id}"
  - name: target-host
    match: {path: /th}
    upstream: main
    host_header: target
  - name: literal-host
    match: {path: /lh}
    upstream: main
    host_header: sensors.internal
  - name: small
    match: {path: /small}
    upstream: main
    max_body_bytes: 10
"""


async def test_get_is_proxied_with_forwarding_headers(ups: list[Upstream]) -> None:
    app, port = await start_app(gateway_yaml({"main": [ups[0].port]}, ROUTES))
    try:
        r = await fetch(
            port,
            "/api/x?q=1",
            headers={
                "X-Forwarded-For": "9.9.9.9",
                "Connection": "X-Hop",
                "X-Hop": "1",
                "Keep-Alive": "timeout=1",
            },
        )
        assert r.status == 200 and r.body == b"u0"
        assert r.header(b"via") == b"1.1 piuptime"
        seen = ups[0].seen[-1]
        h = dict(seen.headers)
        assert seen.path == b"/api/x?q=1"
        assert h[b"host"] == b"test"
        assert h[b"x-forwarded-for"] == b"9.9.9.9, 127.0.0.1"
        assert h[b"x-forwarded-proto"] == b"http"
        assert h[b"x-forwarded-host"] == b"test"
        assert h[b"via"] == b"1.1 piuptime"
        assert b"x-hop" not in h and b"keep-alive" not in h
    finally:
        await app.stop()


async def test_strip_prefix_rewrite_and_host_modes(ups: list[Upstream]) -> None:
    app, port = await start_app(gateway_yaml({"main": [ups[0].port]}, ROUTES))
    try:
        await fetch(port, "/dev/healthz?x=1")
        assert ups[0].seen[-1].path == b"/healthz?x=1"
        await fetch(port, "/dev")
        assert ups[0].seen[-1].path == b"/"
        await fetch(port, "/devices/pi-7/reading?unit=c")
        assert ups[0].seen[-1].path == b"/v2/readings/pi-7?unit=c"
        await fetch(port, "/th")
        assert dict(ups[0].seen[-1].headers)[b"host"] == f"127.0.0.1:{ups[0].port}".encode()
        await fetch(port, "/lh")
        assert dict(ups[0].seen[-1].headers)[b"host"] == b"sensors.internal"
    finally:
        await app.stop()


async def test_no_route_is_a_json_404(ups: list[Upstream]) -> None:
    app, port = await start_app(gateway_yaml({"main": [ups[0].port]}, ROUTES))
    try:
        r = await fetch(port, "/nope")
        assert r.status == 404
        assert r.header(b"content-type") == b"application/json"
        assert b'"route_not_found"' in r.body and b"/nope" in r.body
        r = await fetch(port, "/dev/x", method="DELETE")  # method not allowed on that route
        assert r.status == 404
        assert ups[0].seen == []
    finally:
        await app.stop()


async def test_bodies_content_length_and_chunked(ups: list[Upstream]) -> None:
    async def echo(req: SeenRequest, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for i in range(0, len(req.body), 1000):
            part = req.body[i : i + 1000]
            w.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        w.write(b"0\r\n\r\n")
        await w.drain()

    ups[0].handler = echo
    app, port = await start_app(gateway_yaml({"main": [ups[0].port]}, ROUTES))
    try:
        c = await RawClient.connect(port)
        body = bytes(range(256)) * 400  # 100 KiB: streamed, not buffered
        r = await c.request("POST", "/api/echo", body=body)
        assert r.status == 200 and r.body == body
        assert r.header(b"transfer-encoding") == b"chunked"
        chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        await c.send(
            b"POST /api/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
        )
        r = await c.read_response()
        assert r.status == 200 and r.body == b"hello world"
        assert ups[0].seen[-1].body == b"hello world"
        await c.close()
    finally:
        await app.stop()


async def test_route_body_limit_gives_413_and_upstream_sees_nothing(ups: list[Upstream]) -> None:
    app, port = await start_app(gateway_yaml({"main": [ups[0].port]}, ROUTES))
    try:
        r = await fetch(port, "/small", method="POST", body=b"x" * 11)
        assert r.status == 413
        r = await fetch(port, "/small", method="POST", body=b"x" * 10)
        assert r.status == 200
        assert len(ups[0].seen) == 1
    finally:
        await app.stop()


async def test_weighted_round_robin_over_three_targets(ups: list[Upstream]) -> None:
    text = gateway_yaml({"main": [u.port for u in ups]}, ROUTES).replace(
        f'{{url: "http://127.0.0.1:{ups[0].port}"}}',
        f'{{url: "http://127.0.0.1:{ups[0].port}", weight: 2}}',
    )
    app, port = await start_app(text)
    try:
        c = await RawClient.connect(port)
        bodies = collections.Counter()
        for _ in range(40):
            bodies[(await c.request("GET", "/api/")).body] += 1
        assert bodies == {b"u0": 20, b"u1": 10, b"u2": 10}
        await c.close()
    finally:
        await app.stop()


async def test_upstream_connections_are_pooled(ups: list[Upstream]) -> None:
    app, port = await start_app(gateway_yaml({"main": [ups[0].port]}, ROUTES))
    try:
        for _ in range(20):
            assert (await fetch(port, "/api/")).status == 200
        assert ups[0].connections == 1
    finally:
        await app.stop()


async def test_dead_target_gives_502_naming_the_upstream(ups: list[Upstream]) -> None:
    dead = ups[2].port
    await ups[2].stop()
    app, port = await start_app(gateway_yaml({"main": [dead]}, ROUTES))
    try:
        r = await fetch(port, "/api/")
        assert r.status == 502
        assert b"main" in r.body and b'"upstream_unreachable"' in r.body
    finally:
        await app.stop()


async def test_silent_upstream_gives_504_within_read_timeout(ups: list[Upstream]) -> None:
    async def silent(req: SeenRequest, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    ups[0].handler = silent
    app, port = await start_app(gateway_yaml({"main": [ups[0].port]}, ROUTES))
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r = await fetch(port, "/api/")
        assert r.status == 504 and b'"upstream_timeout"' in r.body
        assert 1.9 < loop.time() - t0 < 4
    finally:
        await app.stop()


async def test_slow_upstream_does_not_stall_other_connections(ups: list[Upstream]) -> None:
    release = asyncio.Event()

    async def slow(req: SeenRequest, w: asyncio.StreamWriter) -> None:
        await release.wait()
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow")
        await w.drain()

    ups[0].handler = slow
    text = gateway_yaml(
        {"main": [ups[0].port], "fast": [ups[1].port]},
        ROUTES + "  - name: fast\n    match: {path: /fast}\n    upstream: fast\n",
    )
    app, port = await start_app(text)
    try:
        slow_task = asyncio.ensure_future(fetch(port, "/api/slow"))
        for _ in range(20):
            r = await asyncio.wait_for(fetch(port, "/fast"), 2)
            assert r.status == 200 and r.body == b"u1"
        assert not slow_task.done()
        release.set()
        assert (await slow_task).body == b"slow"
    finally:
        await app.stop()


async def test_slow_client_is_not_buffered_unboundedly(ups: list[Upstream]) -> None:
    """A 200 MB download to a client that stops reading: the gateway pauses the upstream."""
    sent = 0

    async def huge(req: SeenRequest, w: asyncio.StreamWriter) -> None:
        nonlocal sent
        total = 200 * 1024 * 1024
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: " + str(total).encode() + b"\r\n\r\n")
        block = b"x" * 65536
        while sent < total:
            w.write(block)
            await w.drain()
            sent += len(block)

    ups[0].handler = huge
    app, port = await start_app(gateway_yaml({"main": [ups[0].port]}, ROUTES))
    try:
        c = await RawClient.connect(port)
        await c.send(b"GET /api/huge HTTP/1.1\r\nHost: t\r\n\r\n")
        # The client reads nothing. Wait until the upstream stops making progress.
        last = -1
        while sent != last:
            last = sent
            await asyncio.sleep(0.3)
        # Socket buffers on three hops plus our flow-control windows: far below 200 MB.
        assert sent < 40 * 1024 * 1024, sent
        # And the stream completes once the client reads.
        got = 0
        while got < 200 * 1024 * 1024:
            data = await c.reader.read(1 << 20)
            assert data
            got += len(data)
        await c.close()
    finally:
        await app.stop()


async def test_expect_100_continue_through_the_gateway(ups: list[Upstream]) -> None:
    app, port = await start_app(gateway_yaml({"main": [ups[0].port]}, ROUTES))
    try:
        c = await RawClient.connect(port)
        await c.send(
            b"POST /api/up HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100")
        await c.send(b"hello")
        r = await c.read_response()
        assert r.status == 200 and ups[0].seen[-1].body == b"hello"
        assert b"expect" not in dict(ups[0].seen[-1].headers)
        await c.close()
    finally:
        await app.stop()


async def test_http10_and_pipelining_through_the_gateway(ups: list[Upstream]) -> None:
    app, port = await start_app(gateway_yaml({"main": [u.port for u in ups]}, ROUTES))
    try:
        c = await RawClient.connect(port)
        await c.send(b"GET /api/1 HTTP/1.0\r\n\r\n")
        r = await c.read_response()
        assert r.status == 200
        assert await c.is_closed_by_peer()
        c = await RawClient.connect(port)
        await c.send(
            b"".join(f"GET /api/{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode() for i in range(6))
        )
        order = [(await c.read_response()).body for _ in range(6)]
        assert order == [b"u1", b"u2", b"u0", b"u1", b"u2", b"u0"]
        paths = [s.path for u in ups for s in u.seen]
        assert sorted(paths) == sorted([b"/api/1"] + [f"/api/{i}".encode() for i in range(6)])
        await c.close()
    finally:
        await app.stop()


async def test_faults_on_a_pooled_connection_keep_their_answers(ups: list[Upstream]) -> None:
    """A kept-alive upstream connection (the callback-driven path) that the upstream closes
    before answering is retried on a fresh one; one that goes silent gives the 504."""
    calls = 0

    async def flaky(req: SeenRequest, w: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            w.close()  # the keep-alive race: closed without an answer
            return
        if calls == 4:
            await asyncio.sleep(30)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await w.drain()

    ups[0].handler = flaky
    app, port = await start_app(gateway_yaml({"main": [ups[0].port]}, ROUTES))
    try:
        assert (await fetch(port, "/api/a")).body == b"ok"
        r = await fetch(port, "/api/b")  # sent on the pooled connection, which closes
        assert (r.status, r.body) == (200, b"ok")
        assert ups[0].connections == 2
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r = await fetch(port, "/api/c")  # pooled again; the upstream stays silent
        assert r.status == 504 and b'"upstream_timeout"' in r.body and b"upstream main" in r.body
        assert 1.9 < loop.time() - t0 < 4
    finally:
        await app.stop()
