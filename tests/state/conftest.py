"""Fixtures for the state tests: one ``backend`` fixture over memory, SQLite and Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from piuptime.state import KV, Counters, Logs, Stores, open_stores
from piuptime.state.redis import RedisStores
from tests.redis_support import private_redis, shared_redis, shared_redis_url

__all__ = ["Backend", "FakeClock", "private_redis", "shared_redis"]

KINDS = ["memory", "sqlite", "redis"]


class FakeClock:
    """A clock the test moves by hand. Starts on a multiple of every window the tests use."""

    def __init__(self, t: float = 1_080_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Backend:
    """One backend under test.

    The window and bucket arithmetic reads ``clock`` in every backend (Redis: a test-only
    override of its ``TIME``). Expiry (``ttl=``) follows ``clock`` in memory and SQLite, but is
    Redis's own real-time expiry there: ``ttl`` is the TTL to use in expiry tests (long on a fake
    clock, short in real time), ``pass_time`` lets time go by (fake: at once; Redis: also really),
    and ``eventually`` polls a condition with a deadline.
    """

    def __init__(
        self,
        kind: str,
        stores: Stores,
        clock: FakeClock,
        reopen: Callable[[], Awaitable[Stores]],
    ) -> None:
        self.kind = kind
        self.stores = stores
        self.clock = clock
        self.real_ttl = kind == "redis"
        self.ttl = 0.6 if self.real_ttl else 10.0
        self._reopen = reopen
        self._extra: list[Stores] = []

    @property
    def counters(self) -> Counters:
        return self.stores.counters

    @property
    def kv(self) -> KV:
        return self.stores.kv

    @property
    def logs(self) -> Logs:
        return self.stores.logs

    async def second(self) -> Stores:
        """Another handle on the same data, as a second gateway would have one (memory: the same
        object, as nothing else can see a process's memory)."""
        if self.kind == "memory":
            return self.stores
        other = await self._reopen()
        self._extra.append(other)
        return other

    async def pass_time(self, seconds: float) -> None:
        self.clock.advance(seconds)
        if self.real_ttl:
            await asyncio.sleep(seconds)

    async def eventually(
        self, check: Callable[[], Awaitable[bool]], timeout: float = 2.0, what: str = ""
    ) -> float:
        """Poll ``check`` until true; fail after ``timeout`` s. Returns the real seconds waited."""
        start = time.monotonic()
        while not await check():
            if time.monotonic() - start > timeout:
                raise AssertionError(f"{self.kind}: timed out waiting for {what or check}")
            await asyncio.sleep(0.01)
        return time.monotonic() - start

    async def aclose(self) -> None:
        for s in self._extra:
            await s.aclose()
        await self.stores.aclose()


async def _purge_redis(url: str, prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=500)]
        if keys:
            await client.unlink(*keys)
    finally:
        await client.aclose()


@pytest.fixture(params=KINDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    kind: str = request.param
    clock = FakeClock()
    if kind == "memory":
        stores = await open_stores("memory", clock=clock)

        async def reopen() -> Stores:
            return stores

    elif kind == "sqlite":
        path = tmp_path / "state.db"

        async def reopen() -> Stores:
            return await open_stores("sqlite", sqlite_path=path, clock=clock)

        stores = await reopen()
    else:
        url = shared_redis_url()
        prefix = f"piuptime-test:{uuid.uuid4().hex}:"

        async def reopen() -> Stores:
            return RedisStores(
                url, prefix=prefix, clock=clock, timeout=2.0, connect_timeout=2.0, pool_timeout=5.0
            )

        stores = await reopen()
    b = Backend(kind, stores, clock, reopen)
    try:
        yield b
    finally:
        await b.aclose()
        if kind == "redis":
            await _purge_redis(url, prefix)
