"""Redis as several gateways see it: Redis's own clock (``TIME``), separate clients, key layout.

The contract suite drives the window and bucket scripts with a test clock; these tests use the
real thing, against the shared Redis at 127.0.0.1:6379, each under a key prefix of its own.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from piuptime.state.redis import RedisStores
from tests.state.conftest import _purge_redis


@pytest.fixture
async def gateways(shared_redis: str) -> AsyncIterator[tuple[RedisStores, RedisStores]]:
    prefix = f"piuptime-test:{uuid.uuid4().hex}:"
    a = RedisStores(shared_redis, prefix=prefix, timeout=2.0, connect_timeout=2.0, pool_timeout=5.0)
    b = RedisStores(shared_redis, prefix=prefix, timeout=2.0, connect_timeout=2.0, pool_timeout=5.0)
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()
        await _purge_redis(shared_redis, prefix)


async def test_two_gateways_share_one_window_exactly(
    gateways: tuple[RedisStores, RedisStores],
) -> None:
    a, b = gateways
    calls = [g.counters.window_hit("w", 50, 3600.0) for g in (a, b) * 100]
    results = await asyncio.gather(*calls)
    assert sum(r.allowed for r in results) == 50
    assert all(0 < r.reset <= 3600.0 for r in results)
    assert not (await b.counters.window_hit("w", 50, 3600.0)).allowed


async def test_two_gateways_share_one_bucket_and_its_refill(
    gateways: tuple[RedisStores, RedisStores],
) -> None:
    a, b = gateways
    start = time.monotonic()
    results = await asyncio.gather(*(g.counters.bucket_take("b", 20.0, 2) for g in (a, b) * 5))
    elapsed = time.monotonic() - start
    # the burst, plus what Redis's clock refilled (20/s) while the calls ran
    assert 2 <= sum(r.allowed for r in results) <= 2 + int(20 * elapsed)
    refused = await a.counters.bucket_take("b", 20.0, 2)
    if not refused.allowed:
        assert 0 < refused.reset <= 0.05 + 1e-6
    # Redis's clock refills the bucket for both gateways: poll, never sleep a fixed time
    deadline = time.monotonic() + 2.0
    while not (await b.counters.bucket_take("b", 20.0, 2)).allowed:
        assert time.monotonic() < deadline, "the bucket never refilled"
        await asyncio.sleep(0.01)


async def test_concurrency_slots_are_shared(gateways: tuple[RedisStores, RedisStores]) -> None:
    a, b = gateways
    granted = await asyncio.gather(*(g.counters.acquire("s", 50, 60.0) for g in (a, b) * 100))
    assert sum(granted) == 50
    await b.counters.release("s")
    assert await a.counters.acquire("s", 50, 60.0)
    assert await a.counters.in_flight("s") == 50


async def test_keys_are_prefixed_per_kind_with_expiry(
    gateways: tuple[RedisStores, RedisStores],
) -> None:
    a, _ = gateways
    await a.counters.incr("x", ttl=30.0)
    await a.counters.window_hit("x", 5, 10.0)
    await a.counters.bucket_take("x", 1.0, 5)
    await a.counters.acquire("x", 5, 30.0)
    await a.kv.set("x", b"v")
    await a.logs.append("x", b"v")
    client = a.client
    keys = sorted([k.decode() async for k in client.scan_iter(match=a.prefix + "*")])
    assert keys == sorted(a.prefix + space + ":x" for space in ("c", "w", "b", "s", "kv", "log"))
    ttls = {space: await client.pttl(a.key(space, "x")) for space in ("c", "w", "b", "s", "kv")}
    assert 0 < ttls["c"] <= 30_000
    assert 0 < ttls["w"] <= 20_000  # two windows: the current one and the one it weighs
    assert 0 < ttls["b"] <= 1_000  # until the bucket is full again
    assert 0 < ttls["s"] <= 30_000
    assert ttls["kv"] == -1  # no ttl asked
