"""Redis going away for real: a private redis-server killed, paused, restarted, out of memory.

Each test runs its own ``redis-server`` on a free port (``private_redis``); the machine's shared
Redis is never touched. What is checked: calls raise StateUnavailable fast, ``available`` turns
False, calls during the back-off fail at once without touching the network, one call probes at a
time, and everything works again once Redis is back, without a restart (scripts are reloaded
after NOSCRIPT).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from piuptime.state import StateUnavailable, open_stores
from piuptime.state.redis import RedisStores
from tests.redis_support import RedisServer, free_port

FAST = 0.5  # seconds: the bound on how long a call may take to say Redis is unavailable


class Monotonic:
    """The back-off clock, moved by hand."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def stores(private_redis: RedisServer) -> AsyncIterator[RedisStores]:
    s = RedisStores(private_redis.url, prefix="fault:", backoff=0.2)
    try:
        yield s
    finally:
        await s.aclose()


async def timed(call: Callable[[], Awaitable[object]]) -> tuple[float, BaseException | None]:
    start = time.monotonic()
    try:
        await call()
    except StateUnavailable as exc:
        return time.monotonic() - start, exc
    return time.monotonic() - start, None


async def eventually_ok(call: Callable[[], Awaitable[object]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await call()
            return
        except StateUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


async def exercise(s: RedisStores) -> None:
    """One call of every shape: plain commands and each script."""
    await s.counters.incr("n", ttl=60)
    await s.counters.window_hit("w", 100, 60.0)
    await s.counters.bucket_take("b", 1.0, 100)
    assert await s.counters.acquire("s", 100, 60.0)
    await s.counters.release("s")
    await s.kv.set("k", b"v")
    assert await s.kv.get("k") == b"v"
    await s.logs.append("l", b"x", max_len=10)


async def test_killed_redis_fails_fast_then_recovers_on_restart(
    private_redis: RedisServer, stores: RedisStores
) -> None:
    await exercise(stores)
    assert stores.available

    private_redis.kill()
    took, exc = await timed(lambda: stores.counters.window_hit("w", 100, 60.0))
    assert exc is not None, "a call to a killed Redis must raise StateUnavailable"
    assert took < FAST
    assert not stores.available
    assert stores.failures_total == 1

    # every kind of call fails fast while Redis is gone
    for call in (
        lambda: stores.counters.incr("n"),
        lambda: stores.kv.get("k"),
        lambda: stores.kv.delete_prefix("k"),
        lambda: stores.logs.range("l"),
    ):
        took, exc = await timed(call)
        assert exc is not None
        assert took < FAST
    assert stores.failures_total == 5

    private_redis.start()
    await eventually_ok(lambda: exercise(stores))
    assert stores.available
    # the data went with the process (no persistence), the scripts were loaded again
    assert await stores.counters.get("n") == 1
    r = await stores.counters.window_hit("fresh", 1, 60.0)
    assert r.allowed


async def test_paused_redis_times_out_fast_then_recovers(
    private_redis: RedisServer, stores: RedisStores
) -> None:
    await exercise(stores)
    private_redis.pause()
    try:
        took, exc = await timed(lambda: stores.counters.bucket_take("b", 1.0, 100))
        assert exc is not None
        assert took < FAST
        assert not stores.available
        took, exc = await timed(lambda: stores.kv.set("k", b"w"))
        assert exc is not None
        assert took < FAST
    finally:
        private_redis.resume()
    await eventually_ok(lambda: stores.kv.set("k", b"after"))
    assert stores.available
    assert await stores.kv.get("k") == b"after"


async def test_a_gateway_started_before_redis_works_once_redis_is_up() -> None:
    port = free_port()
    stores = await open_stores("redis", redis_url=f"redis://127.0.0.1:{port}/0", redis_backoff=0.1)
    try:
        took, exc = await timed(lambda: stores.counters.incr("n"))
        assert exc is not None
        assert took < FAST
        assert not stores.available
        with RedisServer(port=port):
            await eventually_ok(lambda: stores.counters.incr("n"))
            assert stores.available
            assert await stores.counters.get("n") == 1
    finally:
        await stores.aclose()


async def test_backoff_fails_at_once_and_probes_one_call_at_a_time(
    private_redis: RedisServer,
) -> None:
    clock = Monotonic()
    stores = RedisStores(private_redis.url, prefix="fault:", backoff=1.0, monotonic=clock)
    try:
        await stores.kv.set("k", b"v")
        private_redis.pause()  # a hung server: every call that reaches it costs a whole timeout
        try:
            took, exc = await timed(lambda: stores.kv.get("k"))
            assert exc is not None
            assert took >= 0.2  # it did wait for Redis (the read timeout is 0.25 s)

            # within the back-off: no network, an immediate refusal that says why
            clock.t = 0.5
            results = await asyncio.gather(*(timed(lambda: stores.kv.get("k")) for _ in range(50)))
            assert all(exc is not None for _, exc in results)
            assert max(took for took, _ in results) < 0.1
            assert "unavailable" in str(results[0][1])

            # past it: one call probes (and waits for the hung server); the others still fail
            # at once
            clock.t = 1.5
            results = await asyncio.gather(*(timed(lambda: stores.kv.get("k")) for _ in range(20)))
            assert all(exc is not None for _, exc in results)
            slow = [took for took, _ in results if took >= 0.2]
            assert len(slow) == 1
            assert stores.failures_total == 1 + 50 + 20
        finally:
            private_redis.resume()

        clock.t = 3.0  # the probe failed at 1.5: back-off until 2.5
        assert await stores.kv.get("k") == b"v"
        assert stores.available
    finally:
        await stores.aclose()


async def test_out_of_memory_is_unavailable_not_a_crash(private_redis: RedisServer) -> None:
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(private_redis.url)
    stores = RedisStores(private_redis.url, prefix="fault:", backoff=0.0)  # every call tries
    try:
        await stores.kv.set("k", b"v")
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", "1")
        with pytest.raises(StateUnavailable, match="memory"):
            await stores.kv.set("k2", b"v" * 1000)
        with pytest.raises(StateUnavailable, match="memory"):  # from inside a script
            await stores.counters.window_hit("w", 10, 60.0)
        with pytest.raises(StateUnavailable, match="memory"):
            await stores.logs.append("l", b"x")
        assert not stores.available
        assert await stores.kv.get("k") == b"v"  # reads still work
        await admin.config_set("maxmemory", "0")
        await stores.kv.set("k2", b"fits")
        assert await stores.kv.get("k2") == b"fits"
        assert stores.available
    finally:
        await admin.aclose()
        await stores.aclose()


async def test_redis_errors_that_are_our_bugs_are_not_hidden(
    private_redis: RedisServer, stores: RedisStores
) -> None:
    import redis.asyncio as aioredis
    from redis.exceptions import ResponseError

    admin = aioredis.Redis.from_url(private_redis.url)
    try:
        await admin.set("fault:kv:wrong", b"x")
        await admin.lpush("fault:c:wrong", b"x")  # a list where a counter should be
    finally:
        await admin.aclose()
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await stores.counters.incr("wrong")
    assert stores.available
    assert stores.failures_total == 0


async def test_scripts_are_loaded_again_after_script_flush(
    private_redis: RedisServer, stores: RedisStores
) -> None:
    await exercise(stores)
    await stores.client.script_flush()
    await exercise(stores)
    assert stores.failures_total == 0


def test_missing_redis_py_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from piuptime.state import redis as state_redis

    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(ImportError, match=r"pip install 'piuptime\[redis\]'"):
        state_redis.import_redis()
