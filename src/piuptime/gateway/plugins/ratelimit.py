"""Rate limiting: ``rate_limit`` (requests per window, sliding window or token bucket) and
``limit_concurrency`` (requests in flight), kept in this process's memory or shared in Redis.

With ``store: memory`` every check is a synchronous call on the in-process counters
(``env.stores.counters.*_sync``), so a limited route keeps the proxy's callback fast path. With
``store: redis`` the check is one Lua script per limit on the shared Redis (atomic across every
gateway, on Redis's clock); when Redis cannot be reached the store raises ``StateUnavailable``
at once (it backs off for a second after a failure) and ``on_store_error`` decides: ``allow``
serves the request anyway (with ``X-RateLimit-Degraded: store-unavailable``), ``deny`` answers
503. Either way ``piuptime_ratelimit_store_errors_total{route,mode}`` counts it, and limits apply
again as soon as Redis answers.

Counter keys: ``rl:<scope>:<index>:<window>:<subject>`` (the scope is the route's name unless
configured; the subject is ``c:<consumer>``, ``ip:<address>``, ``h:<header value>`` or ``-``
for the whole route).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from piuptime.gateway.plugins import register
from piuptime.gateway.plugins.base import Ctx, Plugin, PluginEnv, Reply, RequestResult
from piuptime.state.base import BucketResult, StateUnavailable, WindowResult

if TYPE_CHECKING:
    from piuptime.config.plugins.ratelimit import LimitConcurrency, LimitSpec, RateLimit
    from piuptime.gateway.runtime import CompiledRoute
    from piuptime.state.redis import RedisStores

log = logging.getLogger("piuptime.plugins.ratelimit")

DEGRADED_HEADER = (b"x-ratelimit-degraded", b"store-unavailable")
_RETRY_1 = (b"retry-after", b"1")
_MAX_SUBJECT = 128  # longer header values are hashed: keys stay small whatever clients send

Subject = Callable[[Ctx], str]


# -- what a limit is counted per ---------------------------------------------------------------


def _by_ip(ctx: Ctx) -> str:
    return "ip:" + ctx.ip()


def _by_consumer(ctx: Ctx) -> str:
    consumer = ctx.consumer
    if consumer is None:  # not authenticated (no auth plugin, or an anonymous route)
        return "ip:" + ctx.ip()
    return "c:" + consumer.name


def _by_route(ctx: Ctx) -> str:
    return "-"


def _by_header(name: bytes) -> Subject:
    def subject(ctx: Ctx) -> str:
        value = ctx.header(name)
        if not value:  # absent or empty: count it by address, never in one shared bucket
            return "ip:" + ctx.ip()
        if len(value) > _MAX_SUBJECT:
            return "h#" + hashlib.sha256(value).hexdigest()
        return "h:" + value.decode("latin-1")

    return subject


def make_subject(per: str) -> Subject:
    """The function giving a request's subject for ``per`` (as the schema normalised it)."""
    if per == "consumer":
        return _by_consumer
    if per == "ip":
        return _by_ip
    if per == "route":
        return _by_route
    if per.startswith("header:"):
        return _by_header(per[len("header:") :].strip().lower().encode())
    raise ValueError(f"unknown per: {per!r}")


def _scope(config_scope: str | None, route: CompiledRoute | None) -> str:
    if config_scope is not None:
        return config_scope
    return route.name if route is not None else "global"


def _seconds(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


def _counters(env: PluginEnv, store: str, plugin: str, route: str) -> RedisStores | None:
    """The shared Redis stores for ``store: redis`` (None for memory)."""
    if store != "redis":
        return None
    from piuptime.state.redis import RedisStores

    shared = env.shared
    if shared is None:
        raise ValueError(f"route {route!r}: {plugin} has store: redis but store.redis is not set")
    if not isinstance(shared, RedisStores):
        raise ValueError(f"route {route!r}: {plugin} store: redis needs the Redis stores")
    return shared


# -- rate_limit --------------------------------------------------------------------------------


class _Limit:
    """One configured limit, with everything a request needs precomputed."""

    __slots__ = (
        "bucket",
        "burst",
        "index",
        "limit",
        "limit_b",
        "message",
        "prefix",
        "rate",
        "window",
    )

    def __init__(self, index: int, spec: LimitSpec, bucket: bool, scope: str) -> None:
        self.index = index
        self.limit = spec.limit
        self.window = spec.window
        self.bucket = bucket
        self.burst = spec.burst if spec.burst is not None else spec.limit
        self.rate = spec.limit / spec.window  # token bucket: tokens per second
        # a token bucket tells how many requests can be made at once: its capacity
        self.limit_b = b"%d" % (self.burst if bucket else self.limit)
        self.prefix = f"rl:{scope}:{index}:{_seconds(spec.window)}:"
        self.message = f"rate limit exceeded: {spec.limit} requests per {_seconds(spec.window)}s"

    def policy(self) -> str:
        text = f"{self.limit};w={_seconds(self.window)}"
        return f"{text};burst={self.burst}" if self.bucket and self.burst != self.limit else text

    def reset(self, result: WindowResult | BucketResult) -> int:
        """``RateLimit-Reset``: whole seconds until the quota is whole again (the current
        window's end; for a bucket, until it is full)."""
        if self.bucket:
            missing = self.burst - result.remaining
            return math.ceil(missing / self.rate) if missing > 0 else 0
        return math.ceil(result.reset)

    def retry_after(self, result: WindowResult | BucketResult, cost: int) -> int:
        """``Retry-After`` for a refused request: whole seconds (at least 1) after which it
        would pass if nothing else is counted meanwhile. A sliding window's estimate falls
        below the limit at the latest ``window * cost / limit`` after the window ends (the
        previous window's count then decays from at most ``limit``)."""
        wait = result.reset
        if not self.bucket:
            wait += self.window * cost / self.limit
        if math.isinf(wait):
            wait = self.window
        return max(1, math.ceil(wait - 1e-9))


@register
class RateLimitPlugin(Plugin):
    """Requests per window per key; see ``docs/plugins/ratelimit.md``."""

    name = "rate_limit"
    priority = 1000  # after authentication (per-consumer limits) and ACLs

    def __init__(self, config: RateLimit, env: PluginEnv, route: CompiledRoute | None) -> None:
        super().__init__(config, env, route)
        scope = _scope(config.scope, route)
        route_name = route.name if route is not None else scope
        bucket = config.algorithm == "token_bucket"
        limits = [_Limit(i, spec, bucket, scope) for i, (_, spec) in enumerate(config.specs())]
        # checked shortest window first: a request refused by a longer window has been counted
        # by the shorter ones, which matters least there
        self.limits = tuple(sorted(limits, key=lambda x: (x.window, x.index)))
        self.subject = make_subject(config.per)
        self.cost = config.cost
        self.status = config.status
        self.headers = config.headers
        self.message = config.message
        self.deny = config.on_store_error == "deny"
        self.route_name = route_name
        self.down = False  # the shared store failed last time (for logging transitions)
        self.counters = env.stores.counters
        self.shared = _counters(env, config.store, self.name, route_name)
        self.policy = ", ".join(x.policy() for x in limits).encode()
        self.one = self.limits[0] if len(self.limits) == 1 and not bucket else None
        metrics = env.metrics
        self.rejections = metrics.counter(
            "ratelimit_rejections", "Requests refused by rate_limit", ("route",)
        ).labels(route_name)
        self.store_errors = metrics.counter(
            "ratelimit_store_errors",
            "rate_limit checks the shared store could not answer (mode: allow or deny)",
            ("route", "mode"),
        ).labels(route_name, config.on_store_error)

    def on_request(self, ctx: Ctx) -> RequestResult:
        if self.shared is not None:
            return self._check_shared(ctx, self.subject(ctx))
        subject = self.subject(ctx)
        counters = self.counters
        one = self.one
        if one is not None:  # the usual case, one sliding window: nothing to compare
            hit = counters.window_hit_sync(one.prefix + subject, one.limit, one.window, self.cost)
            if not hit.allowed:
                return self._refuse(ctx, one, hit)
            if self.headers:
                ctx.response_headers += self._fields(one, hit)
            return None
        cost = self.cost
        tightest: tuple[_Limit, WindowResult | BucketResult] | None = None
        for lim in self.limits:
            result: WindowResult | BucketResult
            if lim.bucket:
                result = counters.bucket_take_sync(lim.prefix + subject, lim.rate, lim.burst, cost)
            else:
                result = counters.window_hit_sync(lim.prefix + subject, lim.limit, lim.window, cost)
            if not result.allowed:
                return self._refuse(ctx, lim, result)
            if tightest is None or _tighter(result, tightest[1]):
                tightest = (lim, result)
        if self.headers and tightest is not None:
            self._add_headers(ctx, tightest[0], tightest[1])
        return None

    async def _check_shared(self, ctx: Ctx, subject: str) -> Reply | None:
        assert self.shared is not None
        counters = self.shared.counters
        cost = self.cost
        tightest: tuple[_Limit, WindowResult | BucketResult] | None = None
        try:
            for lim in self.limits:
                result: WindowResult | BucketResult
                if lim.bucket:
                    result = await counters.bucket_take(
                        lim.prefix + subject, lim.rate, lim.burst, cost
                    )
                else:
                    result = await counters.window_hit(
                        lim.prefix + subject, lim.limit, lim.window, cost
                    )
                if not result.allowed:
                    return self._refuse(ctx, lim, result)
                if tightest is None or _tighter(result, tightest[1]):
                    tightest = (lim, result)
        except StateUnavailable as exc:
            return self._store_failed(ctx, exc)
        if self.down:
            self.down = False
            log.info("%s on route %s: the shared store answers again", self.name, self.route_name)
        if self.headers and tightest is not None:
            self._add_headers(ctx, tightest[0], tightest[1])
        return None

    def _add_headers(self, ctx: Ctx, lim: _Limit, result: WindowResult | BucketResult) -> None:
        ctx.response_headers += self._fields(lim, result)

    def _fields(
        self, lim: _Limit, result: WindowResult | BucketResult
    ) -> tuple[tuple[bytes, bytes], ...]:
        return (
            (b"ratelimit-limit", lim.limit_b),
            (b"ratelimit-remaining", b"%d" % result.remaining),
            (b"ratelimit-reset", b"%d" % lim.reset(result)),
            (b"ratelimit-policy", self.policy),
        )

    # -- the fast lane (gateway/lane.py) ----------------------------------------------------

    def lane_ready(self, trusted_proxies: bool) -> bool:
        """Can the fast lane run this limit through ``lane_check``? One limit in this
        process's memory, counted per consumer, address or route (a refused request is then
        not counted, so the Python path can re-check it and answer the refusal)."""
        return (
            self.shared is None
            and len(self.limits) == 1
            and self.config.per in ("consumer", "ip", "route")
            and not (trusted_proxies and self.config.per in ("consumer", "ip"))
        )

    def lane_check(self, consumer: str | None, client_ip: bytes) -> bytes | None:
        """``on_request`` for the fast lane, on what it knows of the request: the response
        header fields to add (``name: value\r\n`` lines), or None when the request is
        refused (not counted; the Python path answers it)."""
        per = self.config.per
        if per == "route":
            subject = "-"
        elif per == "consumer" and consumer is not None:
            subject = "c:" + consumer
        else:
            subject = "ip:" + client_ip.decode("latin-1")
        lim = self.limits[0]
        counters = self.counters
        if lim.bucket:
            result: WindowResult | BucketResult = counters.bucket_take_sync(
                lim.prefix + subject, lim.rate, lim.burst, self.cost
            )
        else:
            result = counters.window_hit_sync(
                lim.prefix + subject, lim.limit, lim.window, self.cost
            )
        if not result.allowed:
            return None
        if not self.headers:
            return b""
        return b"".join([b"%s: %s\r\n" % f for f in self._fields(lim, result)])

    def _refuse(self, ctx: Ctx, lim: _Limit, result: WindowResult | BucketResult) -> Reply:
        self.rejections.inc()
        retry = lim.retry_after(result, self.cost)
        if self.headers:
            ctx.response_headers += (
                (b"ratelimit-limit", lim.limit_b),
                (b"ratelimit-remaining", b"%d" % result.remaining),
                (b"ratelimit-reset", b"%d" % max(retry, lim.reset(result))),
                (b"ratelimit-policy", self.policy),
            )
        return Reply.error(
            self.status,
            "rate_limited",
            self.message or lim.message,
            [(b"retry-after", b"%d" % retry)],
        )

    def _store_failed(self, ctx: Ctx, exc: StateUnavailable) -> Reply | None:
        self.store_errors.inc()
        self.down = _went_down(self.down, self.name, self.route_name, self.deny, exc)
        if self.headers:
            _degraded(ctx)
        if not self.deny:
            return None
        return Reply.error(
            503,
            "rate_limit_unavailable",
            "the rate limit cannot be checked now (its store is unreachable); try again shortly",
            [_RETRY_1],
        )


def _degraded(ctx: Ctx) -> None:
    if DEGRADED_HEADER not in ctx.response_headers:  # once, with both plugins on a route
        ctx.response_headers.append(DEGRADED_HEADER)


def _went_down(down: bool, plugin: str, route: str, deny: bool, exc: StateUnavailable) -> bool:
    """Log the first failure of a run of them (the metric counts every one)."""
    if not down:
        mode = "refusing requests (on_store_error: deny)" if deny else "letting requests through"
        log.warning("%s on route %s: shared store unavailable, %s: %s", plugin, route, mode, exc)
    return True


def _tighter(a: WindowResult | BucketResult, b: WindowResult | BucketResult) -> bool:
    """Whether ``a`` is closer to refusing than ``b`` (fewer left; then the later reset)."""
    if a.remaining != b.remaining:
        return a.remaining < b.remaining
    return a.reset > b.reset


# -- limit_concurrency -------------------------------------------------------------------------

#: A memory slot cannot leak with a crash (it dies with the process): it never expires.
_MEMORY_SLOT_TTL = 10.0 * 365 * 86400

# KEYS[1]: a sorted set of holders scored by when their slot expires (Redis ms).
# ARGV: max, ttl-ms, holder. Expired holders (a gateway that died) are dropped first.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS[1], ARGV: ttl-ms, holder. A live holder's slot is pushed out by another ttl.
_REFRESH = """
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
  if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
    redis.call('PEXPIRE', KEYS[1], ARGV[1])
  end
  return 1
end
return 0
"""


class RedisSlots:
    """Concurrency slots in Redis, one per holder (a request), each expiring ``ttl`` after it
    was taken or last refreshed. While a request runs, this process refreshes its slot every
    ``ttl / 3``, so requests may last any time; a gateway that dies stops refreshing and its
    slots vanish within ``ttl``. One per Redis stores (kept in ``env.keep``, across reloads)."""

    def __init__(self, stores: RedisStores, spawn: Callable[[Awaitable[Any]], None]) -> None:
        self.stores = stores
        self.spawn = spawn
        self._acquire = stores.script(_ACQUIRE)
        self._refresh = stores.script(_REFRESH)
        self._ids = itertools.count()
        self._me = uuid.uuid4().hex[:16]
        self.held: dict[str, tuple[str, int]] = {}  # holder → (key, ttl ms)
        self._refreshing = False

    def key(self, name: str) -> str:
        return self.stores.key("cc", name)

    async def acquire(self, key: str, limit: int, ttl_ms: int) -> str | None:
        """A holder id when a slot was free (it is then held), else None."""
        holder = f"{self._me}:{next(self._ids)}"
        got = await self.stores.run(lambda: self._acquire(keys=[key], args=[limit, ttl_ms, holder]))
        if not got:
            return None
        self.held[holder] = (key, ttl_ms)
        if not self._refreshing:
            self._refreshing = True
            self.spawn(self._refresh_loop())
        return holder

    def release(self, holder: str) -> None:
        """Give the slot back (in the background; if Redis is down it expires instead)."""
        entry = self.held.pop(holder, None)
        if entry is not None:
            self.spawn(self._release(entry[0], holder))

    async def _release(self, key: str, holder: str) -> None:
        client = self.stores.client
        try:
            await self.stores.run(lambda: client.zrem(key, holder))
        except StateUnavailable as exc:
            log.debug("concurrency slot %s not released now (%s); it expires", holder, exc)

    async def _refresh_one(self, key: str, ttl_ms: int, holder: str) -> None:
        await self.stores.run(lambda: self._refresh(keys=[key], args=[ttl_ms, holder]))

    async def _refresh_loop(self) -> None:
        try:
            while self.held:
                await asyncio.sleep(min(ttl for _, ttl in self.held.values()) / 3000)
                for holder, (key, ttl) in list(self.held.items()):
                    if holder not in self.held:
                        continue
                    try:
                        await self._refresh_one(key, ttl, holder)
                    except StateUnavailable:
                        break  # Redis is down: try again next round
        finally:
            self._refreshing = False


@register
class LimitConcurrencyPlugin(Plugin):
    """At most ``max`` requests in flight per key; see ``docs/plugins/ratelimit.md``."""

    name = "limit_concurrency"
    priority = 1010  # before rate_limit (a request refused here is not counted there)

    def __init__(
        self, config: LimitConcurrency, env: PluginEnv, route: CompiledRoute | None
    ) -> None:
        super().__init__(config, env, route)
        scope = _scope(config.scope, route)
        route_name = route.name if route is not None else scope
        self.max = config.max
        self.subject = make_subject(config.per)
        self.prefix = f"cc:{scope}:"
        self.status = config.status
        self.message = config.message
        self.deny = config.on_store_error == "deny"
        self.route_name = route_name
        self.down = False  # the shared store failed last time (for logging transitions)
        self.counters = env.stores.counters
        shared = _counters(env, config.store, self.name, route_name)
        self.slots: RedisSlots | None = None
        if shared is not None:
            slots = env.keep.get("limit_concurrency.slots")
            if not isinstance(slots, RedisSlots) or slots.stores is not shared:
                slots = env.keep["limit_concurrency.slots"] = RedisSlots(shared, env.spawn)
            self.slots = slots
            self.prefix = slots.key(f"{scope}:")
        self.ttl_ms = max(1000, math.ceil(config.slot_ttl * 1000))
        metrics = env.metrics
        self.rejections = metrics.counter(
            "concurrency_rejections", "Requests refused by limit_concurrency", ("route",)
        ).labels(route_name)
        self.store_errors = metrics.counter(
            "concurrency_store_errors",
            "limit_concurrency slots the shared store could not give (mode: allow or deny)",
            ("route", "mode"),
        ).labels(route_name, config.on_store_error)

    def on_request(self, ctx: Ctx) -> RequestResult:
        key = self.prefix + self.subject(ctx)
        if self.slots is not None:
            return self._acquire_shared(ctx, key)
        counters = self.counters
        if counters.acquire_sync(key, self.max, _MEMORY_SLOT_TTL):
            ctx.defer(lambda: counters.release_sync(key))
            return None
        return self._refuse()

    async def _acquire_shared(self, ctx: Ctx, key: str) -> Reply | None:
        slots = self.slots
        assert slots is not None
        try:
            holder = await slots.acquire(key, self.max, self.ttl_ms)
        except StateUnavailable as exc:
            self.store_errors.inc()
            self.down = _went_down(self.down, self.name, self.route_name, self.deny, exc)
            _degraded(ctx)
            if not self.deny:
                return None
            return Reply.error(
                503,
                "concurrency_limit_unavailable",
                "the concurrency limit cannot be checked now (its store is unreachable); "
                "try again shortly",
                [_RETRY_1],
            )
        if self.down:
            self.down = False
            log.info("%s on route %s: the shared store answers again", self.name, self.route_name)
        if holder is None:
            return self._refuse()
        ctx.defer(lambda: slots.release(holder))
        return None

    def _refuse(self) -> Reply:
        self.rejections.inc()
        return Reply.error(self.status, "too_many_in_flight", self.message, [_RETRY_1])


__all__ = [
    "DEGRADED_HEADER",
    "LimitConcurrencyPlugin",
    "RateLimitPlugin",
    "RedisSlots",
    "make_subject",
]
