"""limit_concurrency with the in-process store, through the real gateway: N requests in flight,
the next refused; slots freed however a request ends (answer, upstream error, client gone)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from piuptime.config import ConfigError, parse_config
from piuptime.gateway.plugins import REGISTRY, _load_handlers
from piuptime.gateway.plugins.ratelimit import LimitConcurrencyPlugin
from tests.support import (
    RawClient,
    SeenRequest,
    Upstream,
    fetch,
    gateway_yaml,
    start_app,
    wait_until,
)


@pytest.fixture
async def up() -> AsyncIterator[Upstream]:
    server = await Upstream(name="u0").start()
    yield server
    await server.stop()


def _routes(plugin: str, name: str = "api") -> str:
    return f"""\
  - name: {name}
    match: {{path: /}}
    upstream: main
    plugins:
      limit_concurrency: {plugin}
"""


def _in_flight(app: Any, key: str) -> int:
    return int(app.plugin_env.stores.counters.in_flight_sync(key))


class Gate:
    """An upstream handler that holds every request until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, req: SeenRequest, w: asyncio.StreamWriter) -> None:
        await self.release.wait()
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await w.drain()


async def test_n_in_flight_then_refused_then_freed(up: Upstream) -> None:
    gate = Gate()
    up.handler = gate
    app, port = await start_app(gateway_yaml({"main": [up.port]}, _routes("{max: 2, per: route}")))
    try:
        held = [asyncio.ensure_future(fetch(port, f"/{i}")) for i in range(2)]
        await wait_until(lambda: len(up.seen) == 2, what="two requests upstream")
        assert _in_flight(app, "cc:api:-") == 2
        r = await fetch(port, "/third")
        assert r.status == 503 and r.header(b"retry-after") == b"1"
        assert json.loads(r.body)["error"]["code"] == "too_many_in_flight"
        assert len(up.seen) == 2  # never reached the device
        assert app.metrics.snapshot()["piuptime_concurrency_rejections_total"] == {"route=api": 1.0}
        gate.release.set()
        assert [(await h).status for h in held] == [200, 200]
        await wait_until(lambda: _in_flight(app, "cc:api:-") == 0, what="slots released")
        assert [(await fetch(port, "/")).status for _ in range(3)] == [200, 200, 200]
    finally:
        gate.release.set()
        await app.stop()


async def test_upstream_error_frees_the_slot(up: Upstream) -> None:
    async def broken(req: SeenRequest, w: asyncio.StreamWriter) -> None:
        w.transport.abort()

    up.handler = broken
    app, port = await start_app(gateway_yaml({"main": [up.port]}, _routes("{max: 1, per: route}")))
    try:
        # every one gets the upstream's failure (502), none the concurrency refusal (503)
        assert [(await fetch(port, "/")).status for _ in range(4)] == [502] * 4
        assert _in_flight(app, "cc:api:-") == 0
    finally:
        await app.stop()


async def test_client_disconnecting_mid_stream_frees_the_slot(up: Upstream) -> None:
    stop = asyncio.Event()

    async def stream(req: SeenRequest, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await w.drain()
        while not stop.is_set():  # a live stream (events): a chunk every 20 ms
            w.write(b"1\r\n.\r\n")
            await w.drain()
            await asyncio.sleep(0.02)
        w.write(b"0\r\n\r\n")
        await w.drain()

    up.handler = stream
    app, port = await start_app(gateway_yaml({"main": [up.port]}, _routes("{max: 1, per: route}")))
    try:
        client = await RawClient.connect(port)
        await client.send(b"GET /events HTTP/1.1\r\nHost: t\r\n\r\n")
        head = await client.read_response(head_only=True)
        assert head.status == 200
        assert _in_flight(app, "cc:api:-") == 1
        assert (await fetch(port, "/other")).status == 503
        client.writer.transport.abort()  # the client goes away mid-stream
        await wait_until(lambda: _in_flight(app, "cc:api:-") == 0, what="slot freed")
        stop.set()
    finally:
        stop.set()
        await app.stop()


async def test_client_gone_before_the_answer_frees_the_slot_when_the_request_ends(
    up: Upstream,
) -> None:
    """The gateway notices a vanished client when it answers it: the slot is held until the
    upstream answers (or the route's timeouts end the request), then freed."""
    gate = Gate()
    up.handler = gate
    app, port = await start_app(gateway_yaml({"main": [up.port]}, _routes("{max: 1, per: route}")))
    try:
        client = await RawClient.connect(port)
        await client.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        await wait_until(lambda: len(up.seen) == 1, what="request upstream")
        client.writer.transport.abort()
        assert _in_flight(app, "cc:api:-") == 1
        gate.release.set()
        await wait_until(lambda: _in_flight(app, "cc:api:-") == 0, what="slot freed")
        assert (await fetch(port, "/")).status == 200
    finally:
        gate.release.set()
        await app.stop()


async def test_keyed_per_forwarded_address_with_status_429(up: Upstream) -> None:
    gate = Gate()
    up.handler = gate
    app, port = await start_app(
        gateway_yaml(
            {"main": [up.port]},
            _routes("{max: 1, per: ip, status: 429}"),
            gateway="  trusted_proxies: [127.0.0.1]",
        )
    )
    try:
        a = {"X-Forwarded-For": "198.51.100.1"}
        held = asyncio.ensure_future(fetch(port, "/", headers=a))
        await wait_until(lambda: len(up.seen) == 1, what="a in flight")
        r = await fetch(port, "/", headers=a)
        assert r.status == 429 and r.header(b"retry-after") == b"1"
        other = asyncio.ensure_future(fetch(port, "/", headers={"X-Forwarded-For": "198.51.100.2"}))
        await wait_until(lambda: len(up.seen) == 2, what="b in flight too")
        gate.release.set()
        assert (await held).status == 200 and (await other).status == 200
    finally:
        gate.release.set()
        await app.stop()


async def test_refused_here_is_not_counted_by_rate_limit(up: Upstream) -> None:
    gate = Gate()
    up.handler = gate
    routes = """\
  - name: api
    match: {path: /}
    upstream: main
    plugins:
      limit_concurrency: {max: 1, per: route}
      rate_limit: {limit: 2, window: 1m, per: route}
"""
    app, port = await start_app(gateway_yaml({"main": [up.port]}, routes))
    try:
        held = asyncio.ensure_future(fetch(port, "/"))
        await wait_until(lambda: len(up.seen) == 1, what="one in flight")
        assert [(await fetch(port, "/")).status for _ in range(3)] == [503, 503, 503]
        gate.release.set()
        assert (await held).status == 200
        await wait_until(lambda: _in_flight(app, "cc:api:-") == 0, what="slot freed")
        r = await fetch(port, "/")  # the second of the rate limit: the 503s did not count
        assert r.status == 200 and r.header(b"ratelimit-remaining") == b"0"
    finally:
        gate.release.set()
        await app.stop()


_BASE = """\
upstreams:
  u: {targets: ["http://127.0.0.1:9"]}
routes:
  - name: r
    match: {path: /}
    upstream: u
    plugins:
      limit_concurrency: %s
"""


@pytest.mark.parametrize(
    ("plugin", "expected"),
    [
        ("{max: 0}", "8:32: routes[0].plugins.limit_concurrency.max: must be at least 1"),
        ("{max: -1}", "8:32: routes[0].plugins.limit_concurrency.max: must be at least 1"),
        ("{}", "8:26: routes[0].plugins.limit_concurrency.max: required key 'max' is missing"),
        (
            "{max: 2, per: user}",
            "8:40: routes[0].plugins.limit_concurrency.per: expected "
            "consumer, ip, route or header:<Name>",
        ),
        (
            "{max: 2, slot_ttl: 500ms}",
            "8:45: routes[0].plugins.limit_concurrency.slot_ttl: slot_ttl is at least 1s",
        ),
        (
            "{max: 2, store: redis}",
            "8:42: routes[0].plugins.limit_concurrency.store: store: redis needs a Redis to use",
        ),
    ],
)
def test_config_errors_have_positions(plugin: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_BASE % plugin, "lc.yaml", {})
    errors = [str(e) for e in info.value.errors]
    assert len(errors) == 1, errors
    assert errors[0].startswith("lc.yaml:" + expected), errors[0]


def test_registered_and_defaults() -> None:
    _load_handlers()
    assert REGISTRY["limit_concurrency"] is LimitConcurrencyPlugin
    assert LimitConcurrencyPlugin.priority == 1010
    config = parse_config(_BASE % "{max: 4}", "lc.yaml", {})
    lc = config.routes[0].plugins.limit_concurrency
    assert lc is not None
    assert (lc.per, lc.store, lc.status, lc.on_store_error, lc.slot_ttl) == (
        "consumer",
        "memory",
        503,
        "allow",
        30.0,
    )
