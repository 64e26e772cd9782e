"""The cache with ``store: redis``, against real Redis servers.

- Two gateways (in-process apps) share entries through the machine's shared Redis, each test in
  its own zone (key namespace): a miss on one is a hit on the other, Vary and HEAD included; a
  PURGE on one empties both; a stale entry is refreshed once across both gateways.
- A private ``redis-server`` is killed: requests still succeed, as misses, and
  ``piuptime_cache_store_errors_total`` counts the failed calls; PURGE says 503; once Redis is
  back the cache works again without a restart.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.plugins.test_cache_support import Answer, Clock, Scripted, clock, metric, zone_of
from tests.redis_support import RedisServer, private_redis, shared_redis
from tests.support import SeenRequest, fetch, gateway_yaml, start_app, wait_until

__all__ = ["clock", "private_redis", "shared_redis"]

redis_asyncio = pytest.importorskip("redis.asyncio")


def _config(up: Scripted, redis_url: str, zone: str, extra: str = "") -> str:
    routes = f"""\
  - name: r
    match: {{path: /}}
    upstream: main
    plugins:
      cache: {{store: redis, zone: {zone}, purge: {{allow_ips: [127.0.0.1]}}{extra}}}
"""
    return gateway_yaml({"main": [up.port]}, routes, f"store: {{redis: {redis_url}}}\n")


async def _keys(url: str, zone: str) -> list[bytes]:
    client = redis_asyncio.Redis.from_url(url)
    try:
        return [k async for k in client.scan_iter(match=f"piuptime:kv:cache:{zone}:*")]
    finally:
        await client.aclose()


async def _eventually(check: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    """Poll an async ``check`` until it is true (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def zone(shared_redis: str) -> AsyncIterator[str]:
    name = f"ctest-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis_asyncio.Redis.from_url(shared_redis)
    try:
        keys = [k async for k in client.scan_iter(match=f"piuptime:kv:cache:{name}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def _vary_answer(req: SeenRequest) -> Answer:
    lang = dict(req.headers).get(b"accept-language", b"-")
    body = req.path + b" " + lang
    return 200, [("vary", "Accept-Language"), ("content-type", "text/plain")], body


async def test_two_gateways_share_entries(shared_redis: str, zone: str, clock: Clock) -> None:
    up = await Scripted(_vary_answer).start()
    a, port_a = await start_app(_config(up, shared_redis, zone))
    b, port_b = await start_app(_config(up, shared_redis, zone))
    try:
        r = await fetch(port_a, "/x", headers={"Accept-Language": "en"})
        assert (r.body, r.header(b"x-cache")) == (b"/x en", b"MISS")
        await _eventually(lambda: _has(shared_redis, zone, 2), "the Vary record and entry in Redis")
        r = await fetch(port_b, "/x", headers={"Accept-Language": "en"})
        assert (r.body, r.header(b"x-cache")) == (b"/x en", b"HIT")
        assert r.header(b"vary") == b"Accept-Language"
        r = await fetch(port_b, "/x", method="HEAD", headers={"Accept-Language": "en"})
        assert (r.status, r.header(b"x-cache"), r.header(b"content-length")) == (200, b"HIT", b"5")
        r = await fetch(port_b, "/x", headers={"Accept-Language": "fr"})
        assert (r.body, r.header(b"x-cache")) == (b"/x fr", b"MISS")
        await _eventually(lambda: _has(shared_redis, zone, 3), "the second variant in Redis")
        r = await fetch(port_a, "/x", headers={"Accept-Language": "fr"})
        assert (r.body, r.header(b"x-cache")) == (b"/x fr", b"HIT")
        assert up.count("/x") == 2
        # a URL without Vary: one key
        up.answer = lambda req: (200, [], b"plain %d" % up.count())
        await fetch(port_a, "/plain?q=1")
        await _eventually(lambda: _has(shared_redis, zone, 4), "the plain entry")
        r = await fetch(port_b, "/plain?q=1")
        assert (r.body, r.header(b"x-cache")) == (b"plain 3", b"HIT")
        # PURGE on one gateway: gone for both, every variant
        r = await fetch(port_b, "/x", method="PURGE")
        assert (r.status, json.loads(r.body)) == (200, {"purged": 2})
        r = await fetch(port_a, "/x", headers={"Accept-Language": "en"})
        assert r.header(b"x-cache") == b"MISS"
        assert metric(a, "piuptime_cache_store_errors_total", "route=r") == 0
    finally:
        await a.stop()
        await b.stop()
        await up.stop()


async def _has(url: str, zone: str, n: int) -> bool:
    return len(await _keys(url, zone)) >= n


async def test_one_background_refresh_across_gateways(
    shared_redis: str, zone: str, clock: Clock
) -> None:
    release = asyncio.Event()
    n = 0

    async def answer(req: SeenRequest) -> Answer:
        nonlocal n
        n += 1
        mine = n
        if mine > 1:
            await release.wait()
        return 200, [("cache-control", "max-age=10, stale-while-revalidate=60")], b"v%d" % mine

    up = await Scripted(answer).start()
    a, port_a = await start_app(_config(up, shared_redis, zone))
    b, port_b = await start_app(_config(up, shared_redis, zone))
    try:
        await fetch(port_a, "/s")
        await _eventually(lambda: _has(shared_redis, zone, 1), "the entry in Redis")
        clock.advance(20)
        for port in (port_a, port_b, port_a, port_b):
            r = await fetch(port, "/s")
            assert (r.body, r.header(b"x-cache")) == (b"v1", b"STALE")
        await wait_until(lambda: up.count() == 2, what="the refresh upstream")
        za, zb = zone_of(a, zone), zone_of(b, zone)
        await wait_until(lambda: not zb.refreshing, what="b gave up: a holds the lock")
        assert up.count() == 2  # one refresh for two gateways and four stale hits
        release.set()
        await wait_until(lambda: not za.refreshing, what="a's refresh stored")

        async def fresh_on_b() -> bool:
            r = await fetch(port_b, "/s")
            return r.body == b"v2" and r.header(b"x-cache") == b"HIT"

        await _eventually(fresh_on_b, "the refreshed entry on b")
        assert up.count() == 2
    finally:
        release.set()
        await a.stop()
        await b.stop()
        await up.stop()


async def test_redis_down_requests_succeed_as_misses(
    private_redis: RedisServer, clock: Clock
) -> None:
    n = 0

    def answer(req: SeenRequest) -> Answer:
        nonlocal n
        n += 1
        return 200, [], b"v%d" % n

    up = await Scripted(answer).start()
    app, port = await start_app(_config(up, private_redis.url, "down"))
    try:
        await fetch(port, "/a")
        await _eventually(lambda: _has(private_redis.url, "down", 1), "the entry in Redis")
        r = await fetch(port, "/a")
        assert (r.body, r.header(b"x-cache")) == (b"v1", b"HIT")
        private_redis.kill()
        for i in range(3):
            r = await fetch(port, "/a")
            assert (r.status, r.body, r.header(b"x-cache")) == (200, b"v%d" % (i + 2), b"MISS")
        errors = metric(app, "piuptime_cache_store_errors_total", "route=r")
        assert errors >= 3  # each look-up (and store) that could not reach Redis
        r = await fetch(port, "/a", method="PURGE")
        assert r.status == 503
        assert json.loads(r.body)["error"]["code"] == "cache_store_unavailable"
        assert metric(app, "piuptime_cache_requests_total", "route=r,status=miss") == 4
        # Redis back (empty, same port): the cache works again, no restart
        private_redis.start()

        async def hit_again() -> bool:
            await fetch(port, "/b")
            return (await fetch(port, "/b")).header(b"x-cache") == b"HIT"

        await _eventually(hit_again, "the cache working again", timeout=10)
    finally:
        await app.stop()
        await up.stop()
