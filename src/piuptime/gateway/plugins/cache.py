"""The response cache plugin (``cache``): a shared HTTP cache in front of a route's upstream.

Per request (GET and HEAD; a HEAD is answered from the GET's entry):

- **access phase** (``on_request``): find the entry (memory: a dict look-up, synchronous, so a
  hit never leaves the proxy's callback path; Redis: one round trip, two for a URL with
  ``Vary``). Fresh → the stored answer (``X-Cache: HIT``, ``Age``). Stale within
  stale-while-revalidate → the stored answer at once (``STALE``) and one background refresh.
  Otherwise the request goes upstream (``MISS``/``EXPIRED``); a concurrent miss of the same URL
  waits for the first one instead of going upstream too (coalescing).
- **response phase** (``on_response``): may the upstream's answer be stored (status, no-store,
  private, Set-Cookie, Vary: *)? If so the proxy hands the whole body over (``ctx.capture``)
  once it was relayed, and it is stored; waiters are then answered from it.
- **failure** (``on_failure``): the upstream is down or answered 5xx → the stale copy, within
  stale-if-error (``STALE``).
- ``PURGE`` of a URL, from an allowed consumer group or address, removes its entries.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import TYPE_CHECKING, Any

from piuptime.gateway.cache.entry import Entry, dump, dump_vary, load, load_vary
from piuptime.gateway.cache.policy import (
    RequestAsks,
    ResponsePolicy,
    etag_matches,
    http_date,
    stored_headers,
    vary_values,
)
from piuptime.gateway.cache.store import Outcome, RedisLayout, Zone, zone, zones
from piuptime.gateway.clientip import parse_ip
from piuptime.gateway.headers import upstream_request_fields
from piuptime.gateway.plugins import register
from piuptime.gateway.plugins.base import Ctx, Headers, Plugin, PluginEnv, Reply, RequestResult
from piuptime.gateway.proxy import _hash_key
from piuptime.http1.client import UpstreamError
from piuptime.state import StateUnavailable

if TYPE_CHECKING:
    from piuptime.config.plugins.cache import Cache
    from piuptime.gateway.runtime import CompiledRoute, UpstreamRuntime
    from piuptime.http1.client import Response
    from piuptime.state import KV

log = logging.getLogger("piuptime.cache")

#: The cache's clock: wall time, since entries in Redis are shared by processes (tests replace it).
now = time.time

_GET = b"GET"
_HEAD = b"HEAD"
_PURGE = b"PURGE"
_UNSAFE = frozenset({b"POST", b"PUT", b"PATCH", b"DELETE"})
_X_CACHE = b"x-cache"
_VAR = "cache"
HIT, MISS, STALE, BYPASS, EXPIRED = "HIT", "MISS", "STALE", "BYPASS", "EXPIRED"
_LABELS = {s: s.encode() for s in (HIT, MISS, STALE, BYPASS, EXPIRED)}
# what a 304 carries of the stored response (RFC 9110 15.4.5)
_NOT_MODIFIED_KEEP = frozenset(
    {b"cache-control", b"content-location", b"etag", b"expires", b"vary", b"last-modified"}
)
_CONDITIONAL = frozenset({b"if-none-match", b"if-modified-since", b"if-match", b"range"})
_JSON = (b"content-type", b"application/json")


class _Pending:
    """A request of a cacheable route on its way upstream: what it may store, the stale copy
    it may fall back to, and the waiters it leads. Lives in ``ctx.vars["cache"]``."""

    __slots__ = (
        "decided",
        "fresh",
        "invalidate",
        "leader",
        "plugin",
        "req_headers",
        "rid",
        "snapshot",
        "stale",
        "sub",
    )

    def __init__(self, plugin: CachePlugin, rid: bytes, sub: bytes) -> None:
        self.plugin = plugin
        self.rid = rid
        self.sub = sub
        self.req_headers: Headers = []
        self.stale: Entry | None = None
        self.leader: asyncio.Future[Outcome] | None = None
        self.decided = False  # the response phase looked at the answer (or must not store)
        self.fresh: Any = None  # Freshness, once the answer may be stored
        self.snapshot: Headers = []
        self.invalidate = False  # an unsafe request: a success invalidates the URL

    def captured(self, status: int, headers: Headers, body: bytes) -> None:
        self.plugin._captured(self, status, body)

    def finish(self) -> None:
        self.plugin._resolve(self, None, False)


def _state(ctx: Ctx) -> _Pending | None:
    v = ctx.vars
    return v.get(_VAR) if v is not None else None


@register
class CachePlugin(Plugin):
    name = "cache"
    priority = 900  # after auth (consumer known) and rate limiting: a hit still counts

    def __init__(self, config: Cache, env: PluginEnv, route: CompiledRoute | None) -> None:
        super().__init__(config, env, route)
        self.route_name = route.name if route is not None else ""
        self.route_bytes = self.route_name.encode()
        self.policy = ResponsePolicy(
            ttl=config.ttl,
            override=config.override,
            stale_while_revalidate=config.stale_while_revalidate,
            stale_if_error=config.stale_if_error,
            statuses=frozenset(config.statuses),
            cache_private=config.cache_private,
            cache_set_cookie=config.cache_set_cookie,
        )
        self.max_entry_bytes = config.max_entry_bytes
        self.sort_query = config.sort_query
        self.drop_query = "*" in config.ignore_query_params
        self.ignore_params = frozenset(p.encode() for p in config.ignore_query_params if p != "*")
        self.per_consumer = config.per_consumer
        self.respect_request = config.respect_request_cache_control
        self.invalidate = config.invalidate_on_unsafe
        self.coalesce = config.coalesce
        self.lock_timeout = config.lock_timeout
        self.via: bytes = getattr(env, "via", b"1.1 piuptime")
        zone_name = config.zone or self.route_name or "default"
        self.zone: Zone = zone(env.keep, zone_name)
        self.memory = None
        self.kv: KV | None = None
        self.layout = RedisLayout(zone_name)
        if config.store == "memory":
            self.memory = self.zone.memory_store(config.max_bytes)
        else:
            if env.shared is None:
                raise ValueError(
                    f"route {self.route_name!r}: cache store: redis needs a Redis to use: set "
                    "store.redis (e.g. redis://127.0.0.1:6379/0), or use store: memory"
                )
            self.kv = env.shared.kv
        purge = config.purge
        self.purge_enabled = purge is not None
        self.purge_groups = frozenset(purge.allow_groups) if purge is not None else frozenset()
        self.purge_nets = (
            tuple(ipaddress.ip_network(n) for n in purge.allow_ips) if purge is not None else ()
        )
        self._purge_seen: dict[str, bool] = {}
        metrics = env.metrics
        requests = metrics.counter(
            "cache_requests",
            "GET/HEAD requests of cached routes by cache status (hit, miss, stale, bypass, "
            "expired)",
            ("route", "status"),
        )
        self.counts = {s: requests.labels(self.route_name, s.lower()) for s in _LABELS}
        self.errors = metrics.counter(
            "cache_store_errors",
            "Cache store (Redis) calls that failed; the request went on as a miss",
            ("route",),
        ).labels(self.route_name)
        registry = zones(env.keep)

        def memory_bytes() -> list[tuple[tuple[str, ...], float]]:
            return [((z.name,), float(z.memory.bytes)) for z in list(registry.values()) if z.memory]

        def memory_entries() -> list[tuple[tuple[str, ...], float]]:
            return [((z.name,), float(len(z.memory))) for z in list(registry.values()) if z.memory]

        metrics.gauge(
            "cache_memory_bytes",
            "Bytes held by each in-memory cache zone",
            ("zone",),
            read=memory_bytes,
        )
        metrics.gauge(
            "cache_memory_entries",
            "Entries held by each in-memory cache zone",
            ("zone",),
            read=memory_entries,
        )

    # -- keys ------------------------------------------------------------------------------------

    def _rid(self, ctx: Ctx) -> bytes:
        req = ctx.req
        query = req.query
        if query:
            if self.drop_query:
                query = b""
            elif self.ignore_params or self.sort_query:
                params = [
                    p
                    for p in query.split(b"&")
                    if p and p.partition(b"=")[0] not in self.ignore_params
                ]
                if self.sort_query:
                    params.sort()
                query = b"&".join(params)
        return b"%s\x00%s\x00%s\x00%s" % (self.route_bytes, req.host.lower(), req.path, query)

    def _sub(self, ctx: Ctx) -> bytes:
        sub = b""
        consumer = ctx.consumer
        if self.per_consumer and consumer is not None:
            sub = b"c=" + consumer.name.encode()
        route = self.route
        if route is not None and ctx.upstream is not route.upstream:  # a traffic split
            sub += b"\x01u=" + ctx.upstream.name.encode()
        return sub

    # -- access phase ----------------------------------------------------------------------------

    def on_request(self, ctx: Ctx) -> RequestResult:
        req = ctx.req
        method = req.method
        if method != _GET and method != _HEAD:
            if method == _PURGE:
                return self._purge(ctx)
            if self.invalidate and method in _UNSAFE:
                st = _Pending(self, self._rid(ctx), self._sub(ctx))
                st.invalidate = True
                st.decided = True
                if ctx.vars is None:
                    ctx.vars = {}
                ctx.vars[_VAR] = st
            return None
        cc = pragma = inm = ims = None
        auth = False
        for name, value in req.headers:
            if name == b"cache-control":
                cc = value if cc is None else cc + b"," + value
            elif name == b"pragma":
                pragma = value
            elif name == b"authorization":
                auth = True
            elif name == b"if-none-match":
                inm = value
            elif name == b"if-modified-since":
                ims = value
        if auth and ctx.consumer is None:
            # credentials the gateway did not check: the answer may be for this caller only
            ctx.cache = BYPASS
            return None
        asks = None
        if self.respect_request and (cc is not None or pragma is not None):
            asks = RequestAsks(cc, pragma)
            if asks.no_store:
                ctx.cache = BYPASS
                return None
        rid = self._rid(ctx)
        sub = self._sub(ctx)
        if asks is not None and asks.no_cache and not asks.only_if_cached:
            ctx.cache = BYPASS
            self._pending(ctx, rid, sub, None)  # not served from the cache, but stored
            return None
        if self.memory is not None:
            found = self.memory.get(rid, sub, req.headers)
            return self._serve(ctx, rid, sub, found, asks, inm, ims)
        return self._lookup_redis(ctx, rid, sub, asks, inm, ims)

    def _serve(
        self,
        ctx: Ctx,
        rid: bytes,
        sub: bytes,
        found: Entry | None,
        asks: RequestAsks | None,
        inm: bytes | None,
        ims: bytes | None,
    ) -> RequestResult:
        t = now()
        stale = None
        if found is not None:
            young = asks is None or asks.max_age is None or found.age(t) <= asks.max_age
            if young and t < found.fresh_until:
                ctx.cache = HIT
                return self._answer(found, t, inm, ims)
            if young and t < found.swr_until:
                ctx.cache = STALE
                self._refresh_later(ctx, rid, sub, found)
                return self._answer(found, t, inm, ims)
            ctx.cache = EXPIRED
            if t < found.sie_until:
                stale = found
        else:
            ctx.cache = MISS
        if asks is not None and asks.only_if_cached:
            return Reply.error(504, "not_cached", "only-if-cached: no fresh stored response")
        st = self._pending(ctx, rid, sub, stale)
        if not self.coalesce:
            return None
        key = (rid, sub)
        inflight = self.zone.inflight
        leader = inflight.get(key)
        if leader is not None and not leader.done():
            return self._wait(ctx, st, leader)
        if ctx.req.method == _GET:
            st.leader = inflight[key] = asyncio.get_running_loop().create_future()
        return None

    def _pending(self, ctx: Ctx, rid: bytes, sub: bytes, stale: Entry | None) -> _Pending:
        st = _Pending(self, rid, sub)
        st.stale = stale
        st.req_headers = list(ctx.req.headers)  # Vary values as the lookup saw them
        if ctx.vars is None:
            ctx.vars = {}
        ctx.vars[_VAR] = st
        ctx.defer(st.finish)
        return st

    def _answer(self, entry: Entry, t: float, inm: bytes | None, ims: bytes | None) -> Reply:
        age = (b"age", b"%d" % entry.age(t))
        if (inm is not None or ims is not None) and _not_modified(entry, inm, ims):
            headers = [h for h in entry.headers if h[0] in _NOT_MODIFIED_KEEP]
            headers.append(age)
            return Reply(304, b"", headers)
        headers = list(entry.headers)
        headers.append(age)
        return Reply(entry.status, entry.body, headers)

    async def _wait(self, ctx: Ctx, st: _Pending, leader: asyncio.Future[Outcome]) -> Reply | None:
        """A concurrent miss: wait (bounded) for the request already upstream."""
        try:
            async with asyncio.timeout(self.lock_timeout):
                found, failed = await asyncio.shield(leader)
        except TimeoutError:
            return None  # on its own, as a plain miss
        t = now()
        if (
            found is not None
            and t < found.fresh_until
            and (not found.vary or vary_values(found.vary, st.req_headers) == found.vary_key)
        ):
            ctx.cache = HIT
            st.decided = True
            return self._answer(found, t, None, None)
        stale = st.stale
        if failed and stale is not None and t < stale.sie_until:
            ctx.cache = STALE
            st.decided = True
            return self._answer(stale, t, None, None)
        return None

    async def _lookup_redis(
        self,
        ctx: Ctx,
        rid: bytes,
        sub: bytes,
        asks: RequestAsks | None,
        inm: bytes | None,
        ims: bytes | None,
    ) -> Reply | None:
        found = None
        try:
            found = await self._redis_get(rid, sub, ctx.req.headers)
        except StateUnavailable as exc:
            self.errors.inc()
            log.debug("cache lookup on route %s failed: %s", self.route_name, exc)
        result = self._serve(ctx, rid, sub, found, asks, inm, ims)
        if result is None or type(result) is Reply:
            return result
        return await result  # type: ignore[no-any-return, misc]

    async def _redis_get(self, rid: bytes, sub: bytes, headers: Headers) -> Entry | None:
        kv = self.kv
        assert kv is not None
        base = self.layout.entry(rid, sub)
        blob, vary_blob = await asyncio.gather(
            kv.get(base), kv.get(self.layout.vary(rid, sub)), return_exceptions=True
        )
        for got in (blob, vary_blob):
            if isinstance(got, BaseException):
                raise got
        found = None
        if isinstance(blob, bytes):
            found = load(blob)
        elif isinstance(vary_blob, bytes):
            names = load_vary(vary_blob)
            if names:
                data = await kv.get(self.layout.variant(base, vary_values(names, headers)))
                found = load(data) if data is not None else None
        return found

    # -- response phase --------------------------------------------------------------------------

    def on_response(self, ctx: Ctx, status: int, headers: Headers) -> None:
        st = _state(ctx)
        if st is not None and not st.decided:
            st.decided = True
            if ctx.req.method == _GET:
                fresh = self.policy.decide(status, headers, now())
                if fresh is not None and self._fits(headers):
                    st.fresh = fresh
                    st.snapshot = stored_headers(headers, True)
                    ctx.capture = st.captured
                    ctx.capture_limit = self.max_entry_bytes
                else:
                    self._resolve(st, None, False)  # waiters need not wait for the body
        elif st is not None and st.invalidate and status < 400:
            st.invalidate = False
            self._invalidate(st)
        cache = ctx.cache
        if cache is not None:
            if any(n == _X_CACHE for n, _ in headers):
                headers[:] = [h for h in headers if h[0] != _X_CACHE]
            headers.append((_X_CACHE, _LABELS[cache]))

    def _fits(self, headers: Headers) -> bool:
        for name, value in headers:
            if name == b"content-length":
                return value.isdigit() and int(value) <= self.max_entry_bytes
        return True

    def _captured(self, st: _Pending, status: int, body: bytes) -> None:
        """The whole answer arrived (and was relayed): store it, wake the waiters."""
        fresh = st.fresh
        fresh_until = fresh.created + fresh.lifetime
        vary = fresh.vary
        entry = Entry(
            status,
            st.snapshot,
            body,
            fresh.created,
            fresh_until,
            fresh_until + fresh.swr,
            fresh_until + fresh.sie,
            vary,
            vary_values(vary, st.req_headers) if vary else b"",
        )
        self._store(st.rid, st.sub, entry)
        self._resolve(st, entry, False)

    def _store(self, rid: bytes, sub: bytes, entry: Entry) -> None:
        if entry.keep_until <= now():
            return
        if self.memory is not None:
            self.memory.put(rid, sub, entry)
        else:
            self.env.spawn(self._redis_put(rid, sub, entry))

    async def _redis_put(self, rid: bytes, sub: bytes, entry: Entry) -> None:
        kv = self.kv
        assert kv is not None
        ttl = entry.keep_until - now()
        if ttl <= 0:
            return
        base = self.layout.entry(rid, sub)
        try:
            if entry.vary:
                await kv.set(self.layout.vary(rid, sub), dump_vary(entry.vary), ttl)
                await kv.set(self.layout.variant(base, entry.vary_key), dump(entry), ttl)
                await kv.delete(base)  # an older answer without Vary would shadow the variants
            else:
                await kv.set(base, dump(entry), ttl)
        except StateUnavailable as exc:
            self.errors.inc()
            log.debug("cache store on route %s failed: %s", self.route_name, exc)

    def _resolve(self, st: _Pending, found: Entry | None, failed: bool) -> None:
        """Tell the requests waiting on ``st`` what came of it (once)."""
        leader = st.leader
        if leader is None:
            return
        st.leader = None
        key = (st.rid, st.sub)
        inflight = self.zone.inflight
        if inflight.get(key) is leader:
            del inflight[key]
        if not leader.done():
            leader.set_result((found, failed))

    def _invalidate(self, st: _Pending) -> None:
        """A successful POST/PUT/PATCH/DELETE: the URL's stored answers are outdated (RFC 9111
        4.4)."""
        if self.memory is not None:
            self.memory.purge(st.rid)
        else:
            self.env.spawn(self._redis_invalidate(st.rid, st.sub))

    async def _redis_invalidate(self, rid: bytes, sub: bytes) -> None:
        kv = self.kv
        assert kv is not None
        try:
            await kv.delete(self.layout.entry(rid, sub))
            await kv.delete(self.layout.vary(rid, sub))  # its variants become unreachable
        except StateUnavailable:
            self.errors.inc()

    # -- failure ---------------------------------------------------------------------------------

    def on_failure(self, ctx: Ctx, status: int) -> Reply | None:
        st = _state(ctx)
        if st is None or st.invalidate:
            return None
        self._resolve(st, None, True)
        stale = st.stale
        if stale is None:
            return None
        t = now()
        if t >= stale.sie_until:
            return None
        st.decided = True
        ctx.cache = STALE
        return self._answer(stale, t, None, None)

    # -- log phase -------------------------------------------------------------------------------

    def on_log(self, ctx: Ctx) -> None:
        cache = ctx.cache
        if cache is not None:
            self.counts[cache].inc()

    # -- stale-while-revalidate ------------------------------------------------------------------

    def _refresh_later(self, ctx: Ctx, rid: bytes, sub: bytes, entry: Entry) -> None:
        """Start one background refresh of a stale entry (none if one is running)."""
        key = (rid, sub + b"\x00" + entry.vary_key)
        refreshing = self.zone.refreshing
        if key in refreshing:
            return
        refreshing.add(key)
        req = ctx.req
        headers = [h for h in req.headers if h[0] not in _CONDITIONAL]
        if entry.etag is not None:
            headers.append((b"if-none-match", entry.etag))
        if entry.last_modified is not None:
            headers.append((b"if-modified-since", entry.last_modified))
        route = self.route
        if ctx.path is not None:
            path = ctx.path
        elif route is not None and ctx.match is not None:
            path = route.upstream_path(req.path, req.query, ctx.match)
        else:
            path = req.target
        upstream = ctx.upstream
        hash_key = _hash_key(req, upstream.hash_on) if upstream.hash_on is not None else None
        work = self._refresh(
            key,
            rid,
            sub,
            entry,
            upstream,
            hash_key,
            headers,
            path,
            ctx.host,
            req.host,
            req.client_addr.encode(),
            b"https" if req.tls else b"http",
        )
        try:
            self.env.spawn(work)
        except BaseException:
            refreshing.discard(key)
            work.close()
            raise

    async def _refresh(
        self,
        key: tuple[bytes, bytes],
        rid: bytes,
        sub: bytes,
        entry: Entry,
        upstream: UpstreamRuntime,
        hash_key: bytes | None,
        headers: Headers,
        path: bytes,
        host: bytes | None,
        original_host: bytes,
        client_ip: bytes,
        proto: bytes,
    ) -> None:
        try:
            if self.kv is not None:  # one refresh across the gateways sharing the store
                try:
                    lock = self.layout.refresh_lock(rid, sub, entry.vary_key)
                    if not await self.kv.set_if_absent(lock, b"1", self.lock_timeout):
                        return
                except StateUnavailable:
                    self.errors.inc()
                    return
            got = await self._fetch(
                upstream, hash_key, headers, path, host, original_host, client_ip, proto
            )
            if got is None:
                return
            status, answer, body = got
            if status == 304:
                status, body = entry.status, entry.body
                timing = [h for h in answer if h[0] == b"date" or h[0] == b"age"]
                answer = _merge_304(entry.headers, answer) + timing
            elif body is None:
                return  # too large to keep now
            fresh = self.policy.decide(status, answer, now())
            if fresh is None:
                return  # not storable any more: the stale copy ages out
            fresh_until = fresh.created + fresh.lifetime
            vary_key = (
                entry.vary_key
                if fresh.vary == entry.vary
                else vary_values(fresh.vary, headers)
                if fresh.vary
                else b""
            )
            self._store(
                rid,
                sub,
                Entry(
                    status,
                    stored_headers(answer, True),
                    body,
                    fresh.created,
                    fresh_until,
                    fresh_until + fresh.swr,
                    fresh_until + fresh.sie,
                    fresh.vary,
                    vary_key,
                ),
            )
        except Exception:
            log.exception("cache refresh on route %s failed", self.route_name)
        finally:
            self.zone.refreshing.discard(key)

    async def _fetch(
        self,
        upstream: UpstreamRuntime,
        hash_key: bytes | None,
        headers: Headers,
        path: bytes,
        host: bytes | None,
        original_host: bytes,
        client_ip: bytes,
        proto: bytes,
    ) -> tuple[int, Headers, bytes | None] | None:
        """One GET to a target of the upstream, accounted like any attempt; the body is None
        when larger than ``max_entry_bytes``; None when the upstream could not answer."""
        target = upstream.choose((), hash_key)  # the target the request would go to
        if target is None:
            return None
        route = self.route
        if host is None:
            host = (
                route.upstream_host(original_host, target)
                if route is not None
                else target.authority
            )
        fields = upstream_request_fields(
            headers,
            host=host,
            client_ip=client_ip,
            proto=proto,
            original_host=original_host,
            via=self.via,
        )
        upstream.begin(target)
        t0 = time.perf_counter()
        ended = False
        try:
            async with asyncio.timeout(upstream.total_timeout):
                up = await target.pool.request(_GET, path, fields)
                ended = True
                upstream.end(target, up.status < 500, time.perf_counter() - t0)
                try:
                    body = await _read_limited(up, self.max_entry_bytes)
                finally:
                    up.release()
        except UpstreamError:
            if not ended:
                upstream.end(target, False, None)
            return None
        except TimeoutError:
            if not ended:
                upstream.abandon(target)
            return None
        except BaseException:
            if not ended:
                upstream.abandon(target)
            raise
        return up.status, up.headers, body

    # -- purge -----------------------------------------------------------------------------------

    def _purge(self, ctx: Ctx) -> RequestResult:
        if not self.purge_enabled:
            return Reply.error(
                405, "purge_not_allowed", "PURGE is not enabled on this route (cache.purge)"
            )
        if not self._may_purge(ctx):
            return Reply.error(
                403, "purge_forbidden", "this client may not purge the cache of this route"
            )
        rid = self._rid(ctx)
        if self.memory is not None:
            return _purged(self.memory.purge(rid))
        return self._purge_redis(rid)

    def _may_purge(self, ctx: Ctx) -> bool:
        consumer = ctx.consumer
        if (
            consumer is not None
            and self.purge_groups
            and not self.purge_groups.isdisjoint(consumer.groups)
        ):
            return True
        if not self.purge_nets:
            return False
        address = ctx.ip()
        verdict = self._purge_seen.get(address)
        if verdict is None:
            ip = parse_ip(address)
            verdict = ip is not None and any(ip in n for n in self.purge_nets)
            if len(self._purge_seen) >= 1000:
                self._purge_seen.clear()
            self._purge_seen[address] = verdict
        return verdict

    async def _purge_redis(self, rid: bytes) -> Reply:
        kv = self.kv
        assert kv is not None
        entries, varies = self.layout.purge_prefixes(rid)
        try:
            n = await kv.delete_prefix(entries)
            await kv.delete_prefix(varies)
        except StateUnavailable:
            self.errors.inc()
            return Reply.error(
                503,
                "cache_store_unavailable",
                "the cache store (Redis) cannot be reached; nothing was purged",
            )
        return _purged(n)


def _purged(n: int) -> Reply:
    return Reply(200, b'{"purged": %d}' % n, [_JSON])


def _not_modified(entry: Entry, inm: bytes | None, ims: bytes | None) -> bool:
    if entry.status != 200:
        return False
    if inm is not None:
        return entry.etag is not None and etag_matches(inm, entry.etag)
    if ims is not None and entry.last_modified is not None:
        modified = http_date(entry.last_modified)
        since = http_date(ims)
        return modified is not None and since is not None and modified <= since
    return False


def _merge_304(stored: Headers, update: Headers) -> Headers:
    """The stored headers updated with those of a 304 (RFC 9111 4.3.4); framing aside."""
    fresh = stored_headers(update, True)
    names = {n for n, _ in fresh}
    return [h for h in stored if h[0] not in names] + fresh


async def _read_limited(up: Response, limit: int) -> bytes | None:
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await up.read()
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
