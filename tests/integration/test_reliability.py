"""Retries, failover, Retry-After, the retry budget, breakers, backup targets, timeouts and
fault injection through the running gateway, against in-process upstreams over real sockets.
(The scenarios with real device processes killed and stalled are in test_failover.py.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from tests.support import RawClient, SeenRequest, Upstream, fetch, start_app, wait_until


@pytest.fixture
async def ups() -> AsyncIterator[list[Upstream]]:
    servers = [await Upstream(name=f"u{i}").start() for i in range(3)]
    yield servers
    for s in servers:
        await s.stop()


def config(ports: list[int], upstream: str = "", route: str = "", backups: int = 0) -> str:
    lines = [
        "gateway:",
        '  listen: ["127.0.0.1:0"]',
        "  access_log: {path: off}",
        "upstreams:",
        "  devs:",
        "    targets:",
    ]
    for i, p in enumerate(ports):
        backup = ", backup: true" if i >= len(ports) - backups else ""
        lines.append(f'      - {{url: "http://127.0.0.1:{p}"{backup}}}')
    if "timeouts" not in upstream:
        lines.append("    timeouts: {connect: 1s, read: 2s}")
    lines += ["    " + x for x in upstream.strip().splitlines()]
    lines += ["routes:", "  - name: r", "    match: {path: /}", "    upstream: devs"]
    lines += ["    " + x for x in route.strip().splitlines()]
    return "\n".join(lines) + "\n"


def reply(status: int, headers: bytes = b"") -> object:
    async def handler(req: SeenRequest, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 %d X\r\ncontent-length: 2\r\n%b\r\nno" % (status, headers))
        await w.drain()

    return handler


async def test_get_fails_over_from_a_dead_target(ups: list[Upstream]) -> None:
    await ups[0].stop()
    app, port = await start_app(config([u.port for u in ups[:2]]))
    try:
        c = await RawClient.connect(port)
        for _ in range(20):
            r = await c.request("GET", "/x")
            assert r.status == 200 and r.body == b"u1"
        await c.close()
        snap = app.runtime.snapshot()["upstreams"]["devs"]["targets"]
        assert snap[0]["failures_total"] >= 1 and snap[1]["failures_total"] == 0
    finally:
        await app.stop()


async def test_post_that_reached_a_target_is_not_resent(ups: list[Upstream]) -> None:
    async def swallow(req: SeenRequest, w: asyncio.StreamWriter) -> None:
        w.transport.abort()  # read the body, then died before answering

    ups[0].handler = swallow
    app, port = await start_app(config([ups[0].port, ups[1].port]))
    try:
        r = await fetch(port, "/order", "POST", body=b"pay once")
        assert r.status == 502
        assert [s.body for s in ups[0].seen] == [b"pay once"]
        assert ups[1].seen == []
        # with an Idempotency-Key the same request may go to the other target
        r = await fetch(port, "/order", "POST", body=b"pay once", headers={"Idempotency-Key": "k1"})
        assert r.status == 200 and r.body == b"u1"
    finally:
        await app.stop()


async def test_post_is_retried_when_nothing_was_sent(ups: list[Upstream]) -> None:
    await ups[0].stop()  # connection refused: the body never left the gateway
    app, port = await start_app(config([ups[0].port, ups[1].port], upstream="balance: round_robin"))
    try:
        for _ in range(4):
            r = await fetch(port, "/order", "POST", body=b"x")
            assert r.status == 200 and r.body == b"u1"
    finally:
        await app.stop()


async def test_503_is_retried_on_another_target_and_retry_after_is_honoured(
    ups: list[Upstream],
) -> None:
    ups[0].handler = reply(503, b"retry-after: 30\r\n")  # type: ignore[assignment]
    app, port = await start_app(config([ups[0].port, ups[1].port]))
    try:
        for _ in range(10):
            r = await fetch(port, "/")
            assert r.status == 200 and r.body == b"u1"
        assert len(ups[0].seen) == 1  # never asked again within its Retry-After
        t = app.runtime.snapshot()["upstreams"]["devs"]["targets"][0]
        assert 25 < t["retry_after_s"] <= 30
    finally:
        await app.stop()


async def test_retry_budget_caps_attempts_when_every_target_fails(ups: list[Upstream]) -> None:
    for u in ups:
        u.handler = reply(503)  # type: ignore[assignment]
    upstream = "retries: {attempts: 2, budget: 20%, min_per_second: 0.1}\nbreaker: {enabled: false}"
    app, port = await start_app(config([u.port for u in ups], upstream=upstream))
    try:
        requests = 100
        c = await RawClient.connect(port)
        for _ in range(requests):
            r = await c.request("GET", "/")
            assert r.status == 503
        await c.close()
        attempts = sum(len(u.seen) for u in ups)
        # floor: min_per_second x the 10 s window = 1 retry
        assert requests < attempts <= (1 + 0.2) * requests + 1, attempts
        assert app.runtime.upstreams["devs"].budget.denied_total > 0
    finally:
        await app.stop()


async def test_breaker_opens_and_an_all_open_upstream_answers_503_with_retry_after(
    ups: list[Upstream],
) -> None:
    ups[0].handler = reply(500)  # type: ignore[assignment]
    upstream = (
        "retries: {attempts: 0}\n"
        "health: {passive: {enabled: false}}\n"
        "breaker: {min_requests: 4, failure_ratio: 50%, open_for: 30s}"
    )
    app, port = await start_app(config([ups[0].port], upstream=upstream))
    try:
        c = await RawClient.connect(port)
        statuses = [(await c.request("GET", "/")).status for _ in range(4)]
        assert statuses == [500] * 4
        r = await c.request("GET", "/")  # open: answered at once, the target not asked
        assert r.status == 503 and b'"no_target"' in r.body
        assert 25 <= int(r.header(b"retry-after") or 0) <= 30
        assert len(ups[0].seen) == 4
        await c.close()
        t = app.runtime.snapshot()["upstreams"]["devs"]["targets"][0]
        assert t["breaker"] == "open" and t["breaker_opened_total"] == 1
    finally:
        await app.stop()


async def test_backup_target_takes_traffic_only_when_primaries_are_out(
    ups: list[Upstream],
) -> None:
    upstream = "health: {passive: {consecutive_failures: 1, eject_for: 30s, max_ejected: 100%}}"
    app, port = await start_app(config([ups[0].port, ups[1].port], upstream, backups=1))
    try:
        for _ in range(5):
            assert (await fetch(port, "/")).body == b"u0"
        assert ups[1].seen == []
        await ups[0].stop()
        for _ in range(5):
            r = await fetch(port, "/")
            assert r.status == 200 and r.body == b"u1"
        t = app.runtime.snapshot()["upstreams"]["devs"]["targets"][0]
        assert t["ejected"] and t["ejections_total"] == 1
    finally:
        await app.stop()


async def test_silent_target_times_out_at_ttfb_and_the_get_is_served_elsewhere(
    ups: list[Upstream],
) -> None:
    async def silent(req: SeenRequest, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    ups[0].handler = silent
    upstream = "timeouts: {connect: 1s, ttfb: 300ms, read: 5s}\nbalance: round_robin"
    app, port = await start_app(config([ups[0].port, ups[1].port], upstream=upstream))
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        results = await asyncio.gather(*(fetch(port, "/") for _ in range(4)))
        assert all(r.status == 200 and r.body == b"u1" for r in results)
        assert loop.time() - t0 < 2.0  # one 300 ms timeout, then the other target
    finally:
        await app.stop()


async def test_total_timeout_ends_in_504_naming_the_upstream(ups: list[Upstream]) -> None:
    async def silent(req: SeenRequest, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    ups[0].handler = silent
    upstream = "timeouts: {connect: 1s, read: 5s, total: 400ms}"
    app, port = await start_app(config([ups[0].port], upstream=upstream))
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r = await fetch(port, "/")
        assert r.status == 504
        err = json.loads(r.body)["error"]
        assert err["code"] == "upstream_timeout" and "devs" in err["message"]
        assert loop.time() - t0 < 1.5
    finally:
        await app.stop()


async def test_fault_injection_aborts_and_delays(ups: list[Upstream]) -> None:
    route = "plugins: {fault_injection: {abort: {status: 418, percent: 100%}}}"
    app, port = await start_app(config([ups[0].port], route=route))
    try:
        r = await fetch(port, "/")
        assert r.status == 418 and b"fault_injected" in r.body
        assert ups[0].seen == []
    finally:
        await app.stop()
    route = "plugins: {fault_injection: {delay: {duration: 300ms, percent: 100%}}}"
    app, port = await start_app(config([ups[0].port], route=route))
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r = await fetch(port, "/")
        assert r.status == 200 and loop.time() - t0 >= 0.29
    finally:
        await app.stop()


async def test_hash_on_header_keeps_a_key_on_one_target(ups: list[Upstream]) -> None:
    upstream = "balance: hash\nhash_on: header:X-Device"
    app, port = await start_app(config([u.port for u in ups], upstream=upstream))
    try:
        owners = {}
        for dev in ("a", "b", "c", "d", "e", "f"):
            bodies = {(await fetch(port, "/", headers={"X-Device": dev})).body for _ in range(3)}
            assert len(bodies) == 1
            owners[dev] = bodies.pop()
        assert len(set(owners.values())) >= 2
    finally:
        await app.stop()


async def test_full_target_answers_503_busy(ups: list[Upstream]) -> None:
    release = asyncio.Event()

    async def slow(req: SeenRequest, w: asyncio.StreamWriter) -> None:
        await release.wait()
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await w.drain()

    ups[0].handler = slow
    upstream = "pool: {max_connections: 1, max_pending: 0}\nretries: {attempts: 0}"
    app, port = await start_app(config([ups[0].port], upstream=upstream))
    try:
        first = asyncio.ensure_future(fetch(port, "/a"))
        await wait_until(lambda: len(ups[0].seen) == 1, 5, "the first request upstream")
        r = await fetch(port, "/b")
        assert r.status == 503 and b'"upstream_busy"' in r.body
        release.set()
        assert (await first).status == 200
    finally:
        await app.stop()
