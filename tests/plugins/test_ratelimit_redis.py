"""rate_limit and limit_concurrency with ``store: redis``, against real Redis servers.

- Two ``piuptime run`` processes share one limit through the machine's shared Redis (each run
  uses its own scope, so parallel runs never meet) under a concurrent load: the total allowed is
  the limit.
- A private ``redis-server`` is killed in the middle of a run: the gateway keeps serving
  (``allow``: requests pass and the store-error metric counts them; ``deny``: a quick 503), and
  when it is started again on the same port the limits apply again without a restart.
- Concurrency slots are shared by two gateways; a dead gateway's slots expire after
  ``slot_ttl``; a live gateway's long request keeps its slot past ``slot_ttl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest

from tests.redis_support import RedisServer, private_redis, shared_redis
from tests.support import (
    NotifySocket,
    RawClient,
    SeenRequest,
    Upstream,
    fetch,
    free_port,
    gateway_yaml,
    piuptime_cmd,
    process,
    python_env,
    start_app,
    wait_until,
)

__all__ = ["private_redis", "shared_redis"]

redis_asyncio = pytest.importorskip("redis.asyncio")


@pytest.fixture
async def up() -> AsyncIterator[Upstream]:
    server = await Upstream(name="u0").start()
    yield server
    await server.stop()


def _scope() -> str:
    return f"rltest-{uuid.uuid4().hex[:12]}"


def _config(up: Upstream, redis_url: str, plugins: str, listen: str = "127.0.0.1:0") -> str:
    routes = f"""\
  - name: api
    match: {{path: /}}
    upstream: main
    plugins:
{plugins}"""
    text = gateway_yaml({"main": [up.port]}, routes, f"store: {{redis: {redis_url}}}\n")
    return text.replace('"127.0.0.1:0"', f'"{listen}"').replace("read: 2s", "read: 10s")


async def _redis_seconds_left(url: str, window: float) -> float:
    client = redis_asyncio.Redis.from_url(url)
    try:
        sec, usec = await client.time()
    finally:
        await client.aclose()
    now = sec + usec / 1e6
    return window - (now % window)


async def _start_of_a_window(url: str, window: float, need: float) -> None:
    """Return when at least ``need`` seconds are left in the current window of Redis's clock
    (polled: the load must not straddle two windows, where the sliding window lets the
    previous window's count decay)."""
    deadline = time.monotonic() + window + 5
    while await _redis_seconds_left(url, window) < need:
        assert time.monotonic() < deadline, "Redis's clock does not move"
        await asyncio.sleep(0.05)


# -- two gateway processes, one limit --------------------------------------------------------


async def _load(ports: list[int], total: int, per_port: int) -> Counter[int]:
    """``per_port`` keep-alive clients on each gateway, ``total`` requests in all."""
    statuses: Counter[int] = Counter()
    left = total

    async def client(port: int) -> None:
        nonlocal left
        c = await RawClient.connect(port)
        try:
            while left > 0:
                left -= 1
                r = await c.request("GET", "/x")
                statuses[r.status] += 1
        finally:
            await c.close()

    await asyncio.gather(*(client(p) for p in ports for _ in range(per_port)))
    return statuses


async def test_two_gateway_processes_share_one_limit(
    up: Upstream, shared_redis: str, tmp_path: Path
) -> None:
    limit, window = 200, 60.0
    scope = _scope()
    plugin = (
        f"      rate_limit: {{limit: {limit}, window: 1m, per: route, store: redis, "
        f"scope: {scope}}}\n"
    )
    ports = [free_port(), free_port()]
    procs = []
    notifies = []
    try:
        with contextlib.ExitStack() as stack:
            for i, port in enumerate(ports):
                cfg = tmp_path / f"gw{i}.yaml"
                cfg.write_text(_config(up, shared_redis, plugin, f"127.0.0.1:{port}"))
                notify = NotifySocket(tmp_path / f"notify{i}.sock")
                notifies.append(notify)
                env = python_env() | {"NOTIFY_SOCKET": notify.path}
                procs.append(
                    stack.enter_context(
                        process(
                            piuptime_cmd("run", "-c", str(cfg)),
                            env=env,
                            cwd=str(tmp_path),
                            stderr=subprocess.DEVNULL,
                        )
                    )
                )
            for notify in notifies:
                await asyncio.to_thread(notify.wait, "READY=1", 1, 20.0)
            await _start_of_a_window(shared_redis, window, need=8.0)
            t0 = time.monotonic()
            statuses = await _load(ports, total=3 * limit, per_port=16)
            took = time.monotonic() - t0
            assert took < 8, f"the load took {took:.1f}s: it may have crossed a window"
            assert set(statuses) <= {200, 429}, statuses
            assert abs(statuses[200] - limit) <= limit * 0.01, statuses
            assert statuses[200] + statuses[429] == 3 * limit
            assert len(up.seen) == statuses[200]
            # both gateways refuse now
            for port in ports:
                r = await fetch(port, "/after")
                assert r.status == 429 and r.header(b"ratelimit-remaining") == b"0"
            print(f"\ntwo gateways: {dict(statuses)} in {took:.2f}s")
    finally:
        for notify in notifies:
            notify.close()


# -- Redis stopped in the middle of a run ----------------------------------------------------


async def _timed(call: Awaitable[Any]) -> tuple[Any, float]:
    t0 = time.monotonic()
    result = await call
    return result, time.monotonic() - t0


async def _until_limited(port: int, deadline_s: float = 10.0) -> int:
    """Send requests until one is refused (429); returns how many were sent."""
    deadline = time.monotonic() + deadline_s
    sent = 0
    while True:
        r = await fetch(port, "/again")
        sent += 1
        if r.status == 429:
            return sent
        assert r.status == 200, r.status
        assert time.monotonic() < deadline, "limits did not apply again after Redis came back"
        await asyncio.sleep(0.01)


async def test_redis_killed_allow_mode_serves_and_counts_then_limits_resume(
    up: Upstream, private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "piuptime.plugins.ratelimit")
    plugin = "      rate_limit: {limit: 3, window: 1m, per: ip, store: redis}\n"
    app, port = await start_app(_config(up, private_redis.url, plugin))
    try:
        assert [(await fetch(port, "/")).status for _ in range(4)] == [200, 200, 200, 429]
        private_redis.kill()
        latencies = []
        for _ in range(20):
            r, took = await _timed(fetch(port, "/down"))
            assert r.status == 200, r.status  # fail open
            assert r.header(b"x-ratelimit-degraded") == b"store-unavailable"
            assert r.header(b"ratelimit-limit") is None  # nothing known to report
            latencies.append(took)
        assert max(latencies) < 0.5, latencies
        errors = app.metrics.snapshot()["piuptime_ratelimit_store_errors_total"]
        assert errors == {"route=api,mode=allow": 20.0}
        # one warning for the run of failures, not one per request
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "letting requests through" in warnings[0].getMessage()
        private_redis.start()  # same port, empty
        sent = await _until_limited(port)
        assert sent >= 4  # a fresh count of 3, then refused
        assert any("answers again" in r.getMessage() for r in caplog.records)
        r = await fetch(port, "/")
        assert r.status == 429 and r.header(b"x-ratelimit-degraded") is None
    finally:
        await app.stop()


async def test_redis_killed_deny_mode_refuses_quickly_then_limits_resume(
    up: Upstream, private_redis: RedisServer
) -> None:
    plugin = (
        "      rate_limit: {limit: 3, window: 1m, per: ip, store: redis, on_store_error: deny}\n"
    )
    app, port = await start_app(_config(up, private_redis.url, plugin))
    try:
        assert (await fetch(port, "/")).status == 200
        seen_before = len(up.seen)
        private_redis.kill()
        latencies = []
        for _ in range(20):
            r, took = await _timed(fetch(port, "/down"))
            assert r.status == 503, r.status  # fail closed
            assert r.header(b"retry-after") == b"1"
            assert r.header(b"x-ratelimit-degraded") == b"store-unavailable"
            latencies.append(took)
        assert max(latencies) < 0.5, latencies
        assert len(up.seen) == seen_before  # nothing reached the device
        errors = app.metrics.snapshot()["piuptime_ratelimit_store_errors_total"]
        assert errors == {"route=api,mode=deny": 20.0}
        private_redis.start()
        deadline = time.monotonic() + 10
        while (await fetch(port, "/")).status == 503:
            assert time.monotonic() < deadline, "still refusing after Redis came back"
            await asyncio.sleep(0.02)
        await _until_limited(port)
    finally:
        await app.stop()


async def test_redis_paused_deny_mode_answers_within_the_timeout(
    up: Upstream, private_redis: RedisServer
) -> None:
    """A hung Redis (SIGSTOP: connections open, no answers) costs at most the store's timeout."""
    plugin = (
        "      rate_limit: {limit: 100, window: 1m, per: ip, store: redis, on_store_error: deny}\n"
    )
    app, port = await start_app(_config(up, private_redis.url, plugin))
    try:
        assert (await fetch(port, "/")).status == 200
        private_redis.pause()
        results = await asyncio.gather(*(_timed(fetch(port, "/hung")) for _ in range(10)))
        assert all(r.status == 503 for r, _ in results)
        assert max(t for _, t in results) < 0.6, [t for _, t in results]
        private_redis.resume()
        deadline = time.monotonic() + 10
        while (await fetch(port, "/")).status != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        private_redis.resume()
        await app.stop()


async def test_token_bucket_and_several_limits_in_redis(up: Upstream, shared_redis: str) -> None:
    scope = _scope()
    plugin = (
        "      rate_limit: {limits: [{limit: 2, window: 1s}, {limit: 3, window: 1h}], "
        f"per: ip, store: redis, scope: {scope}, algorithm: token_bucket}}\n"
    )
    app, port = await start_app(_config(up, shared_redis, plugin))
    try:
        r = await fetch(port, "/")
        assert r.status == 200
        assert (r.header(b"ratelimit-limit"), r.header(b"ratelimit-remaining")) == (b"2", b"1")
        assert (await fetch(port, "/")).status == 200
        r = await fetch(port, "/")
        assert r.status == 429 and r.header(b"retry-after") == b"1"
        deadline = time.monotonic() + 3
        while (r := await fetch(port, "/")).status == 429:  # 2/s refill: 500 ms
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        # the per-second bucket may be empty now, the hour's is: report the hour's
        assert r.header(b"ratelimit-limit") == b"3" and r.header(b"ratelimit-remaining") == b"0"
        deadline = time.monotonic() + 3
        while (r := await fetch(port, "/")).header(b"ratelimit-limit") == b"2":
            assert r.status == 429  # refused by the per-second bucket: wait for its token
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        # a token per second is back, but the hour's bucket refuses (one token per 20 min)
        assert r.status == 429 and int(r.header(b"retry-after") or b"0") > 100
    finally:
        await app.stop()


# -- concurrency slots in Redis --------------------------------------------------------------


class Gate:
    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, req: SeenRequest, w: asyncio.StreamWriter) -> None:
        await self.release.wait()
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await w.drain()


async def _holders(url: str, scope: str, subject: str = "-") -> int:
    client = redis_asyncio.Redis.from_url(url)
    try:
        return int(await client.zcard(f"piuptime:cc:{scope}:{subject}"))
    finally:
        await client.aclose()


async def test_two_gateways_share_concurrency_slots(up: Upstream, shared_redis: str) -> None:
    gate = Gate()
    up.handler = gate
    scope = _scope()
    plugin = f"      limit_concurrency: {{max: 2, per: route, store: redis, scope: {scope}}}\n"
    app_a, port_a = await start_app(_config(up, shared_redis, plugin))
    app_b, port_b = await start_app(_config(up, shared_redis, plugin))
    try:
        held = [asyncio.ensure_future(fetch(p, "/")) for p in (port_a, port_b)]
        await wait_until(lambda: len(up.seen) == 2, what="one request through each gateway")
        for port in (port_a, port_b):
            r = await fetch(port, "/third")
            assert r.status == 503 and r.header(b"retry-after") == b"1"
        gate.release.set()
        assert [(await h).status for h in held] == [200, 200]
        deadline = time.monotonic() + 5
        while await _holders(shared_redis, scope):
            assert time.monotonic() < deadline, "slots not released"
            await asyncio.sleep(0.02)
        assert (await fetch(port_a, "/")).status == 200
    finally:
        gate.release.set()
        await app_a.stop()
        await app_b.stop()


async def test_a_dead_gateways_slots_expire_and_live_ones_are_kept(
    up: Upstream, shared_redis: str
) -> None:
    from piuptime.gateway.plugins.ratelimit import RedisSlots
    from piuptime.state.redis import RedisStores

    scope = _scope()
    plugin = (
        f"      limit_concurrency: {{max: 1, per: route, store: redis, scope: {scope}, "
        "slot_ttl: 1s}\n"
    )
    app, port = await start_app(_config(up, shared_redis, plugin))
    # another gateway takes the slot, then dies: nothing refreshes or releases it
    dead_stores = RedisStores(shared_redis)
    spawned: list[Awaitable[Any]] = []
    dead = RedisSlots(dead_stores, spawned.append)
    try:
        assert await dead.acquire(dead.key(f"{scope}:-"), 1, 1000)
        for pending in spawned:
            pending.close()  # type: ignore[attr-defined]  # its refresher never runs: it "died"
        r = await fetch(port, "/")
        assert r.status == 503
        t0 = time.monotonic()
        while (await fetch(port, "/")).status == 503:
            assert time.monotonic() - t0 < 3, "a dead gateway's slot did not expire"
            await asyncio.sleep(0.05)

        # a live request longer than slot_ttl keeps its slot (refreshed every ttl/3)
        gate = Gate()
        up.handler = gate
        held = asyncio.ensure_future(fetch(port, "/long"))
        await wait_until(lambda: any(s.path == b"/long" for s in up.seen), what="long request")
        t_start = time.monotonic()
        while time.monotonic() - t_start < 2.0:  # twice the slot's ttl
            r = await fetch(port, "/meanwhile")
            assert r.status == 503, "the long request's slot expired while it was running"
            await asyncio.sleep(0.1)
        gate.release.set()
        assert (await held).status == 200
        deadline = time.monotonic() + 5
        while await _holders(shared_redis, scope):
            assert time.monotonic() < deadline, "slot not released"
            await asyncio.sleep(0.02)
    finally:
        await dead_stores.aclose()
        await app.stop()


async def test_concurrency_when_redis_is_down(up: Upstream, private_redis: RedisServer) -> None:
    plugins = """\
      limit_concurrency: {max: 5, per: route, store: redis}
"""
    deny = plugins.replace("store: redis}", "store: redis, on_store_error: deny}")
    app, port = await start_app(_config(up, private_redis.url, plugins))
    routes_deny = _config(up, private_redis.url, deny)
    app2, port2 = await start_app(routes_deny)
    try:
        assert (await fetch(port, "/")).status == 200
        assert (await fetch(port2, "/")).status == 200
        private_redis.kill()
        r, took = await _timed(fetch(port, "/"))
        assert r.status == 200 and r.header(b"x-ratelimit-degraded") == b"store-unavailable"
        r2, took2 = await _timed(fetch(port2, "/"))
        assert r2.status == 503 and r2.header(b"retry-after") == b"1"
        assert max(took, took2) < 0.5
        snap = app.metrics.snapshot()["piuptime_concurrency_store_errors_total"]
        assert snap == {"route=api,mode=allow": 1.0}
        private_redis.start()
        deadline = time.monotonic() + 10
        while (await fetch(port2, "/")).status != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        await app.stop()
        await app2.stop()
