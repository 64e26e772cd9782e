"""mirror (shadow traffic) through the real gateway: raw upstreams over sockets, a raw client,
a mirror that never answers and one whose port is closed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from tests.support import RawClient, SeenRequest, Upstream, free_port, start_app, wait_until


@pytest.fixture
async def primary() -> AsyncIterator[Upstream]:
    server = await Upstream(name="primary").start()
    yield server
    await server.stop()


@pytest.fixture
async def shadow() -> AsyncIterator[Upstream]:
    server = await Upstream(name="shadow").start()
    yield server
    await server.stop()


class Silent:
    """Accepts connections, reads whatever comes, never answers."""

    def __init__(self) -> None:
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> Silent:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass

    async def stop(self) -> None:
        for w in self.writers:
            w.transport.abort()
        self.server.close()


def config(primary_port: int, mirror_port: int, plugin: str, routes_extra: str = "") -> str:
    return f"""\
gateway:
  listen: ["127.0.0.1:0"]
  access_log: {{path: off}}
upstreams:
  main:
    targets: ["http://127.0.0.1:{primary_port}"]
    timeouts: {{connect: 1s, read: 5s}}
  shadow:
    targets: ["http://127.0.0.1:{mirror_port}"]
    timeouts: {{connect: 1s, read: 30s}}
routes:
  - name: r
    match: {{path: /}}
    upstream: main
    plugins:
      mirror: {plugin}
{routes_extra}"""


def metric(app: object, name: str) -> dict[str, float]:
    """The non-zero samples of a counter (children are bound, at 0, when a plugin is built)."""
    samples = app.metrics.snapshot().get(f"piuptime_{name}_total", {})  # type: ignore[attr-defined]
    return {k: v for k, v in samples.items() if v}


def without_marker(seen: SeenRequest) -> list[tuple[bytes, bytes]]:
    """The headers but the mirror's marker and the trace context (the proxied request carries
    the gateway's own traceparent; a mirror copy passes the client's on as it came)."""
    skip = (b"x-mirrored-by", b"traceparent", b"tracestate")
    return [(n, v) for n, v in seen.headers if n not in skip]


async def test_the_mirror_gets_an_identical_copy_and_the_client_the_primary_answer(
    primary: Upstream, shadow: Upstream
) -> None:
    app, port = await start_app(config(primary.port, shadow.port, "{upstream: shadow}"))
    c = await RawClient.connect(port)
    try:
        r = await c.request("GET", "/items?page=2", headers={"X-Token": "t1", "Cookie": "a=b"})
        assert r.status == 200 and r.body == b"primary" and r.header(b"x-upstream") == b"primary"
        body = b'{"name": "lamp", "watts": 40}'
        r = await c.request(
            "POST", "/items", headers={"Content-Type": "application/json"}, body=body
        )
        assert r.status == 200 and r.body == b"primary"
        r = await c.request("DELETE", "/items/7")
        assert r.status == 200 and r.body == b"primary"
        await wait_until(lambda: len(shadow.seen) == 3, what="three mirrored requests")
        for got, sent in zip(shadow.seen, primary.seen, strict=True):
            assert (got.method, got.path, got.body) == (sent.method, sent.path, sent.body)
            assert without_marker(got) == without_marker(sent)
            assert dict(got.headers)[b"x-mirrored-by"] == b"piuptime"
            assert b"x-mirrored-by" not in dict(sent.headers)
        assert shadow.seen[1].body == body and shadow.seen[1].method == b"POST"
        assert dict(shadow.seen[1].headers)[b"content-length"] == str(len(body)).encode()
        assert dict(shadow.seen[0].headers)[b"x-token"] == b"t1"
        await wait_until(lambda: metric(app, "mirror_responses").get("route=r,class=2xx") == 3)
        assert metric(app, "mirror_sent") == {"route=r": 3}
    finally:
        await c.close()
        await app.stop()


async def test_a_silent_mirror_adds_no_latency_and_the_in_flight_cap_drops_extras(
    primary: Upstream,
) -> None:
    silent = await Silent().start()
    plugin = "{upstream: shadow, max_in_flight: 3}"
    app, port = await start_app(config(primary.port, silent.port, plugin))
    c = await RawClient.connect(port)
    try:
        await c.request("GET", "/warm")  # the primary's connection is pooled
        await wait_until(lambda: silent.connections == 1, what="the first copy")
        latencies = []
        for i in range(10):
            t0 = time.perf_counter()
            if i % 2:
                r = await c.request("POST", f"/p{i}", body=b"x" * 100)
            else:
                r = await c.request("GET", f"/g{i}")
            latencies.append(time.perf_counter() - t0)
            assert r.status == 200 and r.body == b"primary"
        assert max(latencies) < 0.1, latencies
        assert len(primary.seen) == 11
        await wait_until(lambda: silent.connections == 3, what="three copies pending")
        assert metric(app, "mirror_dropped") == {"route=r,reason=in_flight": 8}
        assert metric(app, "mirror_sent") == {"route=r": 3}
        assert metric(app, "mirror_failed") == {}
        # the stopping gateway cancels the copies still waiting
    finally:
        await c.close()
        await app.stop()
        await silent.stop()


async def test_a_dead_mirror_causes_no_client_errors(primary: Upstream) -> None:
    dead = free_port()  # nothing listens there
    app, port = await start_app(config(primary.port, dead, "{upstream: shadow}"))
    c = await RawClient.connect(port)
    try:
        for i in range(8):
            r = await (
                c.request("POST", "/p", body=b"data") if i % 2 else c.request("GET", f"/g{i}")
            )
            assert r.status == 200 and r.body == b"primary"
        await wait_until(lambda: metric(app, "mirror_failed").get("route=r,reason=error") == 8)
        assert len(primary.seen) == 8
    finally:
        await c.close()
        await app.stop()


async def test_large_chunked_and_sampled_out_bodies_are_not_mirrored(
    primary: Upstream, shadow: Upstream
) -> None:
    routes_extra = """\
  - name: none
    match: {path: /none/}
    upstream: main
    plugins: {mirror: {upstream: shadow, percent: 0%}}
"""
    plugin = "{upstream: shadow, max_body_bytes: 1KiB}"
    app, port = await start_app(config(primary.port, shadow.port, plugin, routes_extra))
    c = await RawClient.connect(port)
    try:
        big = b"b" * 4096
        r = await c.request("POST", "/big", body=big)
        assert r.status == 200 and primary.seen[-1].body == big
        await c.send(
            b"POST /chunked HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        r = await c.read_response()
        assert r.status == 200 and primary.seen[-1].body == b"hello"
        r = await c.request("POST", "/none/x", body=b"small")
        assert r.status == 200 and primary.seen[-1].body == b"small"
        r = await c.request("POST", "/fits", body=b"s" * 1024)
        assert r.status == 200
        await wait_until(lambda: len(shadow.seen) == 1, what="the one copy that fits")
        assert shadow.seen[0].path == b"/fits" and shadow.seen[0].body == b"s" * 1024
        assert metric(app, "mirror_dropped") == {"route=r,reason=body": 2}
    finally:
        await c.close()
        await app.stop()


async def test_the_copy_follows_the_route_rewrite_and_a_too_large_body_is_still_413(
    primary: Upstream, shadow: Upstream
) -> None:
    text = f"""\
gateway:
  listen: ["127.0.0.1:0"]
  access_log: {{path: off}}
  via: edge-7
upstreams:
  main: {{targets: ["http://127.0.0.1:{primary.port}"]}}
  shadow: {{targets: ["http://127.0.0.1:{shadow.port}"]}}
routes:
  - name: api
    match: {{path: /api/}}
    upstream: main
    strip_prefix: true
    max_body_bytes: 100
    plugins:
      mirror: {{upstream: shadow, max_body_bytes: 1KiB}}
"""
    app, port = await start_app(text)
    c = await RawClient.connect(port)
    try:
        r = await c.request("GET", "/api/v/x?q=1")
        assert r.status == 200
        await wait_until(lambda: len(shadow.seen) == 1)
        assert shadow.seen[0].path == primary.seen[0].path == b"/v/x?q=1"
        assert dict(shadow.seen[0].headers)[b"via"] == b"1.1 edge-7"
        assert dict(shadow.seen[0].headers)[b"x-mirrored-by"] == b"edge-7"
        c2 = await RawClient.connect(port)
        r = await c2.request("POST", "/api/too-big", body=b"z" * 500)
        assert r.status == 413
        await c2.close()
        assert len(primary.seen) == 1 and len(shadow.seen) == 1
        # the slot taken while the body was read is given back
        assert app.runtime.routes[0].pipeline.plugins[0].in_flight == 0
    finally:
        await c.close()
        await app.stop()
