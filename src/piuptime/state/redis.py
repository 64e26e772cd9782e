"""Shared state in Redis (``redis.asyncio``, redis-py >= 5; ``pip install 'piuptime[redis]'``).

Several gateways pointed at one Redis share counters, cache and logs. Every read-modify-write is
one server-side Lua script (loaded once, then run by SHA with ``EVALSHA``; redis-py reloads it on
``NOSCRIPT`` after a Redis restart), so it is atomic across all gateways, and the window and bucket
scripts read the time from Redis (``TIME``), not from each gateway's clock, so the gateways agree
on windows and refills. Each script touches one key, so the scripts also work on a Redis Cluster.

Keys are ``{prefix}{space}:{key}`` with ``prefix`` ``piuptime:`` by default and one space per kind
of data: ``c`` (``incr``), ``w`` (``window_hit``), ``b`` (``bucket_take``), ``s`` (``acquire``),
``kv`` and ``log``.

When Redis cannot be reached every call raises :class:`~piuptime.state.StateUnavailable` quickly
(connect and read timeouts of 0.25 s by default, no retries inside redis-py). After a failure the
stores stay *unavailable* for ``backoff`` seconds, during which calls fail at once without touching
the network; then one call probes Redis again while the others keep failing fast; when it succeeds
the stores are available again. No restart is needed. ``available`` and ``failures_total`` feed
the gateway's metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .base import (
    BucketResult,
    StateUnavailable,
    WindowResult,
    check_bucket,
    check_limit,
    check_max_len,
    check_ttl,
    check_window,
)

if TYPE_CHECKING:
    from redis.asyncio import BlockingConnectionPool, Redis
    from redis.commands.core import AsyncScript

__all__ = ["RedisCounters", "RedisKV", "RedisLogs", "RedisStores", "import_redis"]

T = TypeVar("T")

INSTALL_HINT = "the Redis state backend needs redis-py: pip install 'piuptime[redis]'"

# When a test clock is given (``clock=``), scripts use its time instead of Redis's; keys then live
# at least this long in real time, so a slow test cannot see a key vanish mid-way.
_TEST_CLOCK_MIN_TTL_MS = 60_000

_NOW = """
local now
if ARGV[4] ~= '' then
  now = tonumber(ARGV[4])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local min_ttl = 1
if ARGV[4] ~= '' then min_ttl = tonumber(ARGV[5]) end
"""

_INCR = """
local existed = redis.call('EXISTS', KEYS[1])
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if existed == 0 and ARGV[2] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return value
"""

# ARGV: limit, window, cost, now-or-'', min-ttl-ms. The same steps as base.window_step.
_WINDOW = (
    _NOW
    + """
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local new_idx = math.floor(now / window)
local h = redis.call('HMGET', KEYS[1], 'i', 'c', 'p')
local idx = tonumber(h[1])
local cur = tonumber(h[2]) or 0
local prev = tonumber(h[3]) or 0
if idx == nil or idx < new_idx - 1 or idx > new_idx then
  cur = 0
  prev = 0
elseif idx == new_idx - 1 then
  prev = cur
  cur = 0
end
local elapsed = math.min(math.max(now - new_idx * window, 0), window)
local estimate = prev * (1 - elapsed / window) + cur
local allowed = 0
if estimate + cost <= limit then
  allowed = 1
  cur = cur + cost
  estimate = estimate + cost
  redis.call('HSET', KEYS[1], 'i', string.format('%.0f', new_idx),
             'c', string.format('%.0f', cur), 'p', string.format('%.0f', prev))
  redis.call('PEXPIRE', KEYS[1], math.max(min_ttl, math.ceil(window * 2000)))
end
local remaining = math.max(0, math.floor(limit - estimate))
return {allowed, remaining, string.format('%.17g', window - elapsed)}
"""
)

# ARGV: rate, burst, cost, now-or-'', min-ttl-ms. The same steps as base.bucket_step.
_BUCKET = (
    _NOW
    + """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local h = redis.call('HMGET', KEYS[1], 't', 'ts')
local level = tonumber(h[1])
if level == nil then
  level = burst
else
  level = math.min(burst, level + math.max(0, now - tonumber(h[2])) * rate)
end
local allowed = 0
if cost <= level then
  allowed = 1
  level = level - cost
  redis.call('HSET', KEYS[1], 't', string.format('%.17g', level), 'ts', string.format('%.17g', now))
  redis.call('PEXPIRE', KEYS[1], math.max(min_ttl, math.ceil((burst - level) / rate * 1000)))
end
local reset
if level >= cost then
  reset = 0
elseif cost > burst then
  reset = 1 / 0
else
  reset = (cost - level) / rate
end
return {allowed, math.floor(level), string.format('%.17g', reset)}
"""
)

# ARGV: limit, ttl-ms
_ACQUIRE = """
local held = tonumber(redis.call('GET', KEYS[1]) or '0')
if held >= tonumber(ARGV[1]) then
  return 0
end
redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_RELEASE = """
local held = tonumber(redis.call('GET', KEYS[1]) or '0')
if held <= 1 then
  redis.call('DEL', KEYS[1])
else
  redis.call('DECR', KEYS[1])
end
return 0
"""

# ARGV: max_len-or-'', ttl-ms-or-'', items...
_APPEND = """
local n = redis.call('LLEN', KEYS[1])
local i = 3
while i <= #ARGV do
  local j = math.min(i + 999, #ARGV)
  n = redis.call('RPUSH', KEYS[1], unpack(ARGV, i, j))
  i = j + 1
end
if n == 0 then
  return 0
end
if ARGV[1] ~= '' and n > tonumber(ARGV[1]) then
  n = tonumber(ARGV[1])
  redis.call('LTRIM', KEYS[1], -n, -1)
end
if ARGV[2] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return n
"""

# Redis error replies that say "this server cannot take the call now", as opposed to a bug of ours
# (redis-py turns OOM, READONLY, TRYAGAIN, CLUSTERDOWN and MASTERDOWN into classes of their own;
# an error raised inside a script may come back as a plain ResponseError with the code in front).
_UNAVAILABLE_REPLIES = (
    "OOM",
    "READONLY",
    "MISCONF",
    "MASTERDOWN",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "BUSY",
    "NOREPLICAS",
    "LOADING",
)


def import_redis() -> Any:
    """``redis.asyncio``, or an ImportError that says how to install it."""
    try:
        import redis.asyncio as aioredis
    except ImportError as exc:  # pragma: no cover - redis is in the dev group
        raise ImportError(INSTALL_HINT) from exc
    return aioredis


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisStores:
    """The three Redis stores over one client (what ``open_stores("redis", ...)`` returns).

    ``connect_timeout``/``timeout`` bound each connection attempt and each reply; ``backoff`` is how
    long calls fail at once after a failure; ``max_connections`` caps the pool (callers beyond it
    wait up to ``pool_timeout``). ``clock`` replaces Redis's ``TIME`` in the window and bucket
    scripts, for tests only: in production every gateway must read the same clock, Redis's.
    """

    kind = "redis"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "piuptime:",
        connect_timeout: float = 0.25,
        timeout: float = 0.25,
        backoff: float = 1.0,
        max_connections: int = 64,
        pool_timeout: float = 1.0,
        clock: Callable[[], float] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        aioredis = import_redis()
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        self.prefix = prefix
        self.backoff = backoff
        self._clock = clock
        self._monotonic = monotonic
        self._available = True
        self._probing = False
        self._retry_at = 0.0
        self._failures = 0
        self.last_error: str | None = None
        self._errors = self._error_types()
        self._pool: BlockingConnectionPool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=pool_timeout,
            socket_connect_timeout=connect_timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self.client: Redis = aioredis.Redis(connection_pool=self._pool)
        self.counters = RedisCounters(self)
        self.kv = RedisKV(self)
        self.logs = RedisLogs(self)

    @staticmethod
    def _error_types() -> tuple[type[BaseException], ...]:
        from redis import exceptions as rex

        return (rex.ConnectionError, rex.TimeoutError, OSError, TimeoutError)

    @property
    def available(self) -> bool:
        """False from a failed call until a later call succeeds."""
        return self._available

    @property
    def failures_total(self) -> int:
        """Calls that raised StateUnavailable (those refused at once during back-off included)."""
        return self._failures

    def key(self, space: str, key: str) -> str:
        return f"{self.prefix}{space}:{key}"

    def script(self, source: str) -> AsyncScript:
        return self.client.register_script(source)

    def now_args(self) -> tuple[str, int]:
        """The last two arguments of the window and bucket scripts."""
        if self._clock is None:
            return "", 1
        return repr(float(self._clock())), _TEST_CLOCK_MIN_TTL_MS

    async def aclose(self) -> None:
        await self.client.aclose()
        await self._pool.aclose()

    async def ping(self) -> bool:
        """True when Redis answers now (goes through the same back-off as every call)."""
        return bool(await self.run(self.client.ping))

    async def run(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis call under the availability guard."""
        probe = False
        if not self._available:
            if self._probing or self._monotonic() < self._retry_at:
                self._failures += 1
                raise StateUnavailable(f"redis {self._where()} unavailable: {self.last_error}")
            self._probing = probe = True
        try:
            result = await call()
        except self._errors as exc:
            self._fail(exc)
            raise StateUnavailable(f"redis {self._where()}: {exc}") from exc
        except Exception as exc:
            if not self._is_unavailable_reply(exc):
                raise
            self._fail(exc)
            raise StateUnavailable(f"redis {self._where()}: {exc}") from exc
        finally:
            if probe:
                self._probing = False
        self._available = True
        return result

    def _fail(self, exc: BaseException) -> None:
        self._failures += 1
        self._available = False
        self._retry_at = self._monotonic() + self.backoff
        self.last_error = f"{type(exc).__name__}: {exc}"

    @staticmethod
    def _is_unavailable_reply(exc: Exception) -> bool:
        from redis import exceptions as rex

        if isinstance(
            exc, (rex.OutOfMemoryError, rex.ReadOnlyError, rex.TryAgainError, rex.ClusterDownError)
        ):
            return True
        return isinstance(exc, rex.ResponseError) and str(exc).startswith(_UNAVAILABLE_REPLIES)

    def _where(self) -> str:
        kwargs = self._pool.connection_kwargs
        if "path" in kwargs:
            return str(kwargs["path"])
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"


class RedisCounters:
    def __init__(self, stores: RedisStores) -> None:
        self._s = stores
        self._incr = stores.script(_INCR)
        self._window = stores.script(_WINDOW)
        self._bucket = stores.script(_BUCKET)
        self._acquire = stores.script(_ACQUIRE)
        self._release = stores.script(_RELEASE)

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        check_ttl(ttl)
        k = self._s.key("c", key)
        ms = "" if ttl is None else _ms(ttl)
        return int(await self._s.run(lambda: self._incr(keys=[k], args=[amount, ms])))

    async def get(self, key: str) -> int:
        k = self._s.key("c", key)
        value = await self._s.run(lambda: self._s.client.get(k))
        return 0 if value is None else int(value)

    async def window_hit(self, key: str, limit: int, window: float, cost: int = 1) -> WindowResult:
        check_window(limit, window, cost)
        k = self._s.key("w", key)
        args: list[str | int] = [limit, repr(float(window)), cost, *self._s.now_args()]
        allowed, remaining, reset = await self._s.run(lambda: self._window(keys=[k], args=args))
        return WindowResult(bool(allowed), limit, int(remaining), float(reset))

    async def bucket_take(self, key: str, rate: float, burst: int, cost: int = 1) -> BucketResult:
        check_bucket(rate, burst, cost)
        k = self._s.key("b", key)
        args: list[str | int] = [repr(float(rate)), burst, cost, *self._s.now_args()]
        allowed, remaining, reset = await self._s.run(lambda: self._bucket(keys=[k], args=args))
        return BucketResult(bool(allowed), burst, int(remaining), float(reset))

    async def acquire(self, key: str, limit: int, ttl: float) -> bool:
        check_limit(limit, ttl)
        k = self._s.key("s", key)
        return bool(await self._s.run(lambda: self._acquire(keys=[k], args=[limit, _ms(ttl)])))

    async def release(self, key: str) -> None:
        k = self._s.key("s", key)
        await self._s.run(lambda: self._release(keys=[k]))

    async def in_flight(self, key: str) -> int:
        """Slots held under ``key`` now."""
        k = self._s.key("s", key)
        value = await self._s.run(lambda: self._s.client.get(k))
        return 0 if value is None else int(value)


class RedisKV:
    def __init__(self, stores: RedisStores) -> None:
        self._s = stores

    async def get(self, key: str) -> bytes | None:
        k = self._s.key("kv", key)
        value = await self._s.run(lambda: self._s.client.get(k))
        return None if value is None else cast(bytes, value)

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        check_ttl(ttl)
        k = self._s.key("kv", key)
        px = None if ttl is None else _ms(ttl)
        await self._s.run(lambda: self._s.client.set(k, value, px=px))

    async def set_if_absent(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        check_ttl(ttl)
        k = self._s.key("kv", key)
        px = None if ttl is None else _ms(ttl)
        return bool(await self._s.run(lambda: self._s.client.set(k, value, px=px, nx=True)))

    async def delete(self, key: str) -> bool:
        k = self._s.key("kv", key)
        return bool(await self._s.run(lambda: self._s.client.delete(k)))

    async def delete_prefix(self, prefix: str) -> int:
        """SCAN for the keys, then UNLINK them in batches: not one atomic step, and a walk over
        the whole key space (a purge tool, not for the request path)."""
        pattern = _glob_escape(self._s.key("kv", prefix)) + "*"
        client = self._s.client

        async def purge() -> int:
            gone = 0
            cursor = 0
            while True:
                cursor, keys = await client.scan(cursor, match=pattern, count=500)
                if keys:
                    gone += int(await client.unlink(*keys))
                if cursor == 0:
                    return gone

        return await self._s.run(purge)


class RedisLogs:
    def __init__(self, stores: RedisStores) -> None:
        self._s = stores
        self._append = stores.script(_APPEND)

    async def append(
        self, key: str, *items: bytes, max_len: int | None = None, ttl: float | None = None
    ) -> int:
        check_ttl(ttl)
        check_max_len(max_len)
        k = self._s.key("log", key)
        args: list[bytes | int | str] = [
            "" if max_len is None else max_len,
            "" if ttl is None else _ms(ttl),
            *items,
        ]
        return int(await self._s.run(lambda: self._append(keys=[k], args=args)))

    async def range(self, key: str, start: int = 0, stop: int = -1) -> list[bytes]:
        k = self._s.key("log", key)
        items = await self._s.run(lambda: self._s.client.lrange(k, start, stop))
        return cast(list[bytes], items)

    async def length(self, key: str) -> int:
        k = self._s.key("log", key)
        return int(await self._s.run(lambda: self._s.client.llen(k)))

    async def delete(self, key: str) -> bool:
        k = self._s.key("log", key)
        return bool(await self._s.run(lambda: self._s.client.delete(k)))
