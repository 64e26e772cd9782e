"""Traffic plugins: fault injection, traffic split (canaries, A/B, API versions) and mirroring
(shadow traffic)."""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import itertools
import random
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from piuptime.gateway.balancer import Balancer
from piuptime.gateway.headers import upstream_request_fields
from piuptime.gateway.plugins import register
from piuptime.gateway.plugins.base import Ctx, Headers, Plugin, PluginEnv, Reply, RequestResult
from piuptime.http1.client import ReadTimeout, UpstreamError

if TYPE_CHECKING:
    from piuptime.config.plugins.traffic import (
        Condition,
        FaultInjection,
        Mirror,
        TrafficSplit,
        When,
    )
    from piuptime.gateway.runtime import CompiledRoute, UpstreamRuntime
    from piuptime.observe.metrics import _Child


@register
class FaultInjectionPlugin(Plugin):
    """For drills: abort a share of requests with a status, or hold a share before they go
    upstream (the client waits; nothing is sent upstream meanwhile)."""

    name = "fault_injection"
    priority = 11500

    def __init__(self, config: FaultInjection, env: PluginEnv, route: CompiledRoute | None) -> None:
        super().__init__(config, env, route)
        abort, delay = config.abort, config.delay
        self.abort_percent = abort.percent if abort is not None else 0.0
        self.abort_status = abort.status if abort is not None else 503
        self.delay_percent = delay.percent if delay is not None else 0.0
        self.delay = delay.duration if delay is not None else 0.0

    def on_request(self, ctx: Ctx) -> RequestResult:
        if self.abort_percent and random.random() < self.abort_percent:
            return Reply.error(self.abort_status, "fault_injected", "aborted by fault_injection")
        if self.delay_percent and random.random() < self.delay_percent:
            return _hold(self.delay)
        return None


async def _hold(seconds: float) -> Reply | None:
    await asyncio.sleep(seconds)
    return None


# --------------------------------------------------------------------------------------------
# traffic_split


def _cookie(headers: Headers, name: bytes) -> bytes | None:
    """The value of the first cookie called ``name``, or None."""
    for n, v in headers:
        if n == b"cookie":
            for part in v.split(b";"):
                k, eq, val = part.strip().partition(b"=")
                if eq and k == name:
                    return val
    return None


def _unquote(raw: bytes) -> bytes:
    if b"%" not in raw and b"+" not in raw:
        return raw
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(raw.replace(b"+", b" "))


def _query_values(query: bytes, name: bytes) -> list[bytes]:
    """Every value of parameter ``name`` in a raw query string, percent- and +-decoded."""
    out: list[bytes] = []
    if query:
        for pair in query.split(b"&"):
            k, _, v = pair.partition(b"=")
            if _unquote(k) == name:
                out.append(_unquote(v))
    return out


class _Test:
    """One compiled condition on the values found under a name."""

    __slots__ = ("equals", "present", "search")

    def __init__(self, cond: Condition) -> None:
        self.present = cond.present
        self.search = re.compile(cond.regex.encode()).search if cond.regex is not None else None
        self.equals = cond.equals.encode() if cond.equals is not None else None

    def __call__(self, values: list[bytes]) -> bool:
        if self.present is not None:
            return bool(values) == self.present
        search = self.search
        if search is not None:
            return any(search(v) is not None for v in values)
        return self.equals in values


def _compile_when(when: When) -> Callable[[Ctx], bool]:
    """One function testing every condition of ``when`` (all must hold)."""
    headers = tuple((n.lower().encode(), _Test(c)) for n, c in when.header.items())
    cookies = tuple((n.encode(), _Test(c)) for n, c in when.cookie.items())
    params = tuple((n.encode(), _Test(c)) for n, c in when.query.items())
    prefixes = tuple(p.encode() for p in when.path_prefix)

    def matches(ctx: Ctx) -> bool:
        req = ctx.req
        if prefixes and not req.path.startswith(prefixes):
            return False
        for name, test in headers:
            if not test([v for n, v in req.headers if n == name]):
                return False
        for name, test in cookies:
            value = _cookie(req.headers, name)
            if not test([] if value is None else [value]):
                return False
        return all(test(_query_values(req.query, name)) for name, test in params)

    return matches


def sticky_value(ctx: Ctx, sticky: str) -> bytes | None:
    """The value a ``sticky`` setting hashes (``ip``, ``header:<name>``, ``cookie:<name>``)."""
    if sticky == "ip":
        return ctx.ip().encode()
    kind, _, name = sticky.partition(":")
    if kind == "header":
        return ctx.header(name.lower().encode("latin-1"))
    return _cookie(ctx.req.headers, name.encode("latin-1"))


def sticky_hash(value: bytes) -> int:
    """Stable across processes and restarts, so every gateway puts a user on the same side."""
    return int.from_bytes(hashlib.blake2b(value, digest_size=8).digest(), "big")


class _Weighted:
    """Weighted shares: smooth weighted round-robin (exact shares, evenly interleaved), or,
    with ``sticky`` and a value to hash, the hash mapped into the weight space, so a user stays
    on one side for as long as the weights do not change."""

    __slots__ = ("balancer", "bounds", "sides", "sticky", "total")

    def __init__(self, sides: list[tuple[UpstreamRuntime | None, int]], sticky: str | None):
        kept = [(up, w) for up, w in sides if w > 0]
        self.sides = tuple(up for up, _ in kept)
        self.balancer = Balancer([w for _, w in kept])
        self.bounds = tuple(itertools.accumulate(w for _, w in kept))
        self.total = self.bounds[-1]
        self.sticky = sticky

    def pick(self, ctx: Ctx) -> UpstreamRuntime | None:
        if self.sticky is not None:
            value = sticky_value(ctx, self.sticky)
            if value:
                spot = sticky_hash(value) % self.total
                return self.sides[bisect.bisect_right(self.bounds, spot)]
        i = self.balancer.pick()
        assert i is not None  # every kept side has a weight above 0
        return self.sides[i]


@register
class TrafficSplitPlugin(Plugin):
    """Ordered rules; the first that matches picks the request's upstream (``ctx.upstream``);
    none matching keeps the route's own. Retries and failover then stay within the chosen
    upstream (its targets, backups, breakers and budget)."""

    name = "traffic_split"
    priority = 960

    def __init__(self, config: TrafficSplit, env: PluginEnv, route: CompiledRoute | None) -> None:
        super().__init__(config, env, route)
        own = route.upstream if route is not None else None
        route_name = route.name if route is not None else ""
        family = env.metrics.counter(
            "traffic_split_requests",
            "Requests of a route with traffic_split, by the upstream that served them",
            ("route", "upstream"),
        )
        self.counters: dict[UpstreamRuntime | None, _Child] = {}

        def resolve(name: str | None) -> UpstreamRuntime | None:
            """None stands for the route's own upstream (``ctx.upstream`` is left alone)."""
            if name is None:
                up = None
            else:
                found = env.upstreams.get(name)
                if found is None:  # the config check reports it; only a hand-built config
                    raise ValueError(f"traffic_split: unknown upstream {name!r}")
                up = None if found is own else found
            if up not in self.counters:
                label = up.name if up is not None else (own.name if own is not None else "")
                self.counters[up] = family.labels(route_name, label)
            return up

        resolve(None)
        rules: list[tuple[Callable[[Ctx], bool] | None, _Weighted | UpstreamRuntime | None]] = []
        for rule in config.rules:
            matches = _compile_when(rule.when) if rule.when is not None else None
            if rule.weighted is not None:
                sides = [(resolve(s.upstream), s.weight) for s in rule.weighted]
                rules.append((matches, _Weighted(sides, rule.sticky or config.sticky)))
            else:
                rules.append((matches, resolve(rule.upstream)))
        self.rules = tuple(rules)

    def on_request(self, ctx: Ctx) -> RequestResult:
        up: UpstreamRuntime | None = None
        for matches, where in self.rules:
            if matches is None or matches(ctx):
                up = where.pick(ctx) if type(where) is _Weighted else where  # type: ignore[assignment]
                if up is not None:
                    ctx.upstream = up
                break
        self.counters[up].inc()
        return None


# --------------------------------------------------------------------------------------------
# mirror


class _Copy:
    """What a mirrored request is made of, taken while the request runs."""

    __slots__ = (
        "body",
        "client_ip",
        "headers",
        "host",
        "method",
        "original_host",
        "path",
        "proto",
        "route",
    )

    def __init__(
        self,
        method: bytes,
        path: bytes,
        headers: Headers,
        body: bytes | None,
        host: bytes | None,
        original_host: bytes,
        client_ip: bytes,
        proto: bytes,
        route: CompiledRoute,
    ) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.host = host  # a plugin's Host override, else the route's host_header rule
        self.original_host = original_host
        self.client_ip = client_ip
        self.proto = proto
        self.route = route


@register
class MirrorPlugin(Plugin):
    """Shadow traffic: a copy of each (sampled) request goes to another upstream in the
    background; its answer is read and thrown away. The client's request never waits for it:
    the copy is handed to a background task and the request goes on at once; a full mirror
    (``max_in_flight`` copies unanswered) or a body that cannot be copied drops the copy, and
    a metric counts it."""

    name = "mirror"
    priority = 950

    def __init__(self, config: Mirror, env: PluginEnv, route: CompiledRoute | None) -> None:
        super().__init__(config, env, route)
        upstream = env.upstreams.get(config.upstream)
        if upstream is None:  # the config check reports it; only a hand-built config
            raise ValueError(f"mirror: unknown upstream {config.upstream!r}")
        self.upstream = upstream
        self.percent = config.percent
        self.max_body = config.max_body_bytes
        self.max_in_flight = config.max_in_flight
        self.in_flight = 0
        self.spawn = env.spawn
        self.via = env.via
        pseudonym = env.via.split(b" ", 1)[-1]
        self.marker = b"x-mirrored-by: " + pseudonym + b"\r\n"
        name = route.name if route is not None else ""
        m = env.metrics
        dropped = m.counter(
            "mirror_dropped",
            "Requests not mirrored: in_flight (max_in_flight copies pending), body (chunked "
            "or over max_body_bytes), no_target (no mirror target can take it), upgrade",
            ("route", "reason"),
        )
        self.drop_in_flight = dropped.labels(name, "in_flight")
        self.drop_body = dropped.labels(name, "body")
        self.drop_no_target = dropped.labels(name, "no_target")
        self.drop_upgrade = dropped.labels(name, "upgrade")
        self.sent = m.counter(
            "mirror_sent", "Copies sent to the mirror upstream", ("route",)
        ).labels(name)
        failed = m.counter(
            "mirror_failed",
            "Copies the mirror did not answer in full: error (refused, reset, bad answer) "
            "or timeout",
            ("route", "reason"),
        )
        self.failed_error = failed.labels(name, "error")
        self.failed_timeout = failed.labels(name, "timeout")
        answers = m.counter(
            "mirror_responses", "Mirror answers by status class (thrown away)", ("route", "class")
        )
        self.answers = {c: answers.labels(name, f"{c}xx") for c in range(1, 6)}

    def on_request(self, ctx: Ctx) -> RequestResult:
        p = self.percent
        if p < 1.0 and random.random() >= p:
            return None
        req = ctx.req
        if req.upgrade is not None:
            self.drop_upgrade.inc()
            return None
        if self.in_flight >= self.max_in_flight:
            self.drop_in_flight.inc()
            return None
        body = ctx.body
        if req.has_body and body is None:
            length = req.content_length
            if req.chunked or length is None or length > self.max_body:
                self.drop_body.inc()
                return None
            self.in_flight += 1  # the slot is taken while the body is read
            return self._read_then_copy(ctx)
        self.in_flight += 1
        self._copy(ctx, body if req.has_body else None)
        return None

    async def _read_then_copy(self, ctx: Ctx) -> None:
        """Read the (small, declared-length) body first; the proxy sends ``ctx.body`` on."""
        req = ctx.req
        try:
            parts = []
            while chunk := await req.read():  # BodyTooLarge past the route's limit: a 413
                parts.append(chunk)
        except BaseException:
            self.in_flight -= 1
            raise
        body = b"".join(parts)
        ctx.body = body
        self._copy(ctx, body)
        return None

    def _copy(self, ctx: Ctx, body: bytes | None) -> None:
        """Take the copy now (as the request stands after the plugins before this one: the
        request objects are not touched once the request is over) and hand it to a background
        task."""
        req = ctx.req
        path = ctx.path
        if path is None:
            match = ctx.match
            if match is not None:
                path = ctx.route.upstream_path(req.path, req.query, match)
            else:
                path = req.path + b"?" + req.query if req.query else req.path
        copy = _Copy(
            req.method,
            path,
            list(req.headers),
            body,
            ctx.host,
            req.host,
            req.client_addr.encode(),
            b"https" if req.tls else b"http",
            ctx.route,
        )
        try:
            self.spawn(self._send(copy))
        except BaseException:
            self.in_flight -= 1
            raise

    async def _send(self, copy: _Copy) -> None:
        up = self.upstream
        target = None
        began = False
        resp = None
        body = copy.body
        try:
            target = up.choose()
            if target is None:
                self.drop_no_target.inc()
                return
            host = copy.host
            if host is None:
                host = copy.route.upstream_host(copy.original_host, target)
            fields = upstream_request_fields(
                copy.headers,
                host=host,
                client_ip=copy.client_ip,
                proto=copy.proto,
                original_host=copy.original_host,
                via=self.via,
            )
            up.begin(target)
            began = True
            self.sent.inc()
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(up.total_timeout):
                    resp = await target.pool.request(
                        copy.method,
                        copy.path,
                        fields + self.marker,
                        body,
                        None if body is None else len(body),
                    )
                    latency = time.perf_counter() - t0
                    while await resp.read():
                        pass
            except (TimeoutError, ReadTimeout):
                began = False
                up.end(target, False, None)
                self.failed_timeout.inc()
                return
            except UpstreamError:
                began = False
                up.end(target, False, None)
                self.failed_error.inc()
                return
            began = False
            status = resp.status
            up.end(target, status < 500, latency)
            self.answers[min(5, max(1, status // 100))].inc()
        except Exception:  # a mirror must never hurt the gateway; count it and go on
            self.failed_error.inc()
        finally:
            if resp is not None:
                resp.release()
            if began and target is not None:
                up.abandon(target)  # cancelled (the gateway stops) or an unexpected error
            self.in_flight -= 1
