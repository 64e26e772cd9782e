"""Compile a validated config into the structures the hot path reads.

A ``Runtime`` is immutable once built. Reload builds a new one beside the old and the handler
swaps to it in one assignment; requests in flight keep the ``Runtime`` they started with.
Upstreams whose configuration did not change are carried over as the same objects, so their
connection pools (and, later, health state) survive a reload.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from piuptime.config.plugins import merged
from piuptime.gateway.balancer import LoadBalancer, make_balancer
from piuptime.gateway.breaker import CircuitBreaker
from piuptime.gateway.clientip import TrustedProxies
from piuptime.gateway.consumers import Consumers
from piuptime.gateway.health import ActiveChecker, CheckSettings, ProbeTarget
from piuptime.gateway.outlier import OutlierDetector, RetryBudget
from piuptime.gateway.plugins import Pipeline, PluginEnv, compile_pipeline
from piuptime.gateway.router import Match, Router, RouteSpec
from piuptime.http1.client import Pool, PoolOptions

if TYPE_CHECKING:
    from piuptime.config.schema import Config, Route, Upstream
    from piuptime.gateway.plugins import Ctx
    from piuptime.http1.server import Request, Responder

log = logging.getLogger("piuptime.runtime")


_CLOCK = time.monotonic


class Target:
    """One upstream target: its connection pool and its live state."""

    __slots__ = (
        "authority",
        "backup",
        "breaker",
        "ejections_total",
        "ewma",
        "failures_total",
        "healthy",
        "in_flight",
        "index",
        "label",
        "last_check_error",
        "not_before",
        "pool",
        "ramp_until",
        "requests_total",
        "troubled",
        "url",
        "weight",
    )

    def __init__(
        self,
        index: int,
        scheme: str,
        host: str,
        port: int,
        weight: int,
        backup: bool,
        options: PoolOptions,
        breaker: CircuitBreaker | None,
    ):
        default_port = 443 if scheme == "https" else 80
        host_part = f"[{host}]" if ":" in host else host
        self.index = index
        self.authority = (host_part if port == default_port else f"{host_part}:{port}").encode()
        self.url = f"{scheme}://{host_part}:{port}"
        self.label = self.url
        self.weight = weight
        self.backup = backup
        self.pool = Pool(scheme, host, port, options)
        self.breaker = breaker
        self.healthy = True  # by the active check (True when there is none)
        self.last_check_error: str | None = None
        self.not_before = 0.0  # Retry-After: not before this monotonic time
        self.ramp_until = 0.0  # slow start after a recovery ends at this time
        self.troubled = False  # out, or ramping: picks take the careful path
        self.in_flight = 0
        self.ewma: float | None = None  # seconds to the response head
        self.requests_total = 0
        self.failures_total = 0
        self.ejections_total = 0


class UpstreamRuntime:
    """Targets, balancer and the reliability state of one upstream.

    ``choose`` picks the target of an attempt; ``begin``/``end`` bracket each attempt so the
    balancer, the breaker and outlier detection see every outcome. While every target is in
    normal service ``choose`` is one balancer pick; once one is out (unhealthy, ejected,
    breaker open, Retry-After) or ramping up after a recovery, picks check each target.
    ``config`` is kept to detect changes on reload.
    """

    def __init__(self, name: str, config: Upstream) -> None:
        self.name = name
        self.config = config
        timeouts = config.timeouts
        pool_cfg = config.pool
        tls = config.tls
        self.total_timeout = timeouts.total
        self.max_pending = pool_cfg.max_pending
        self.retries = config.retries
        self.retry_statuses = frozenset(config.retries.statuses)
        self.budget = RetryBudget(
            config.retries.budget, min_per_second=config.retries.min_per_second, clock=_CLOCK
        )
        self.retries_total = 0  # retries made (read by /metrics)
        self.slow_start = config.slow_start
        health = config.health
        self.panic_threshold = health.panic_threshold
        self.panic = False
        self.hash_on = config.hash_on if config.balance == "hash" else None
        b = config.breaker
        self.targets: list[Target] = []
        for i, t in enumerate(config.targets):
            options = PoolOptions(
                max_connections=pool_cfg.max_connections,
                max_idle=pool_cfg.max_idle,
                idle_timeout=pool_cfg.idle_timeout,
                connect_timeout=timeouts.connect,
                read_timeout=timeouts.read,
                ttfb_timeout=timeouts.ttfb,
                tls_verify=tls.verify,
                ca_file=tls.ca,
                server_hostname=tls.server_name,
            )
            breaker = (
                CircuitBreaker(
                    window=b.window,
                    min_requests=b.min_requests,
                    failure_ratio=b.failure_ratio,
                    open_for=b.open_for,
                    max_open_for=b.max_open_for,
                    half_open_probes=b.half_open_probes,
                    clock=_CLOCK,
                )
                if b.enabled
                else None
            )
            self.targets.append(
                Target(i, t.scheme, t.host, t.port, t.weight, t.backup, options, breaker)
            )
        balance_options: dict[str, object] = {}
        if config.balance == "hash":
            balance_options["balance_factor"] = config.hash_load_factor
        self.balancer: LoadBalancer = make_balancer(
            config.balance, [t.weight for t in self.targets], **balance_options
        )
        self._backups = frozenset(t.index for t in self.targets if t.backup)
        self._primaries = frozenset(t.index for t in self.targets if not t.backup)
        self._troubled = 0
        passive = health.passive
        self.outlier = (
            OutlierDetector(
                len(self.targets),
                consecutive_failures=passive.consecutive_failures,
                eject_for=passive.eject_for,
                max_eject_multiplier=passive.max_eject_multiplier,
                max_ejected=passive.max_ejected,
                clock=_CLOCK,
            )
            if passive.enabled
            else None
        )
        self.checker: ActiveChecker | None = None
        active = health.active
        if active is not None:
            settings = CheckSettings(
                kind=active.kind,
                path=active.path,
                method=active.method,
                host=active.host,
                expected_statuses=frozenset(active.expected_statuses),
                body_contains=active.body_contains.encode() if active.body_contains else None,
                interval=active.interval,
                timeout=active.timeout,
                healthy_after=active.healthy_after,
                unhealthy_after=active.unhealthy_after,
                jitter=active.jitter,
                tls_verify=tls.verify,
                ca_file=tls.ca,
            )
            probes = [ProbeTarget(t.scheme, t.host, t.port, t.url) for t in config.targets]
            self.checker = ActiveChecker(probes, settings, self._check_changed)
        self._started = False

    # -- life ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the active checks (idempotent; needs the running loop)."""
        if not self._started:
            self._started = True
            if self.checker is not None:
                self.checker.start()

    async def aclose(self) -> None:
        if self.checker is not None:
            await self.checker.stop()
        for t in self.targets:
            await t.pool.aclose()

    # -- choosing --------------------------------------------------------------------------------

    def choose(self, tried: Collection[int] = (), key: bytes | None = None) -> Target | None:
        """The target for the next attempt, never one in ``tried``; None when none can take it
        (see ``retry_after`` for when one will)."""
        if not self._troubled and not tried:
            i = self.balancer.pick(self._backups, key)
            if i is not None:
                return self.targets[i]
        return self._choose_carefully(tried, key)

    def _choose_carefully(self, tried: Collection[int], key: bytes | None) -> Target | None:
        now = _CLOCK()
        out = set(tried)
        blocked: set[int] = set()  # breaker open or Retry-After: out even in panic
        usable_primaries = 0
        for t in self.targets:
            if t.troubled:
                state = self._usable(t, now)
                if state == _BLOCKED:
                    blocked.add(t.index)
                    out.add(t.index)
                    continue
                if state == _OUT:
                    out.add(t.index)
                    continue
            if not t.backup:
                usable_primaries += 1
        primaries = len(self._primaries)
        self.panic = bool(self.panic_threshold) and (
            usable_primaries < self.panic_threshold * primaries
        )
        while True:
            if self.panic:
                i = self.balancer.pick(blocked.union(tried, self._backups), key)
            else:
                i = self.balancer.pick(out | self._backups, key)
                if i is None and self._backups:
                    i = self.balancer.pick(out | self._primaries, key)
                if i is None:  # nothing usable at all: spread over every target still allowed
                    self.panic = True
                    i = self.balancer.pick(blocked.union(tried), key)
            if i is None:
                return None
            t = self.targets[i]
            b = t.breaker
            if b is None or b.state == "closed" or b.allow():
                return t
            blocked.add(i)  # half-open with every probe slot taken
            out.add(i)

    def _usable(self, t: Target, now: float) -> int:
        """Re-check a troubled target; clears ``troubled`` once it is back in normal service
        (starting its slow start)."""
        blocked = False
        out = False
        if t.not_before > now:
            blocked = True
        b = t.breaker
        if b is not None and b.state == "open" and b.retry_after() > 0:
            blocked = True
        if not t.healthy or (self.outlier is not None and self.outlier.is_ejected(t.index)):
            out = True
        if blocked:
            return _BLOCKED
        if out:
            return _OUT
        if b is not None and b.state != "closed":
            return _OK  # half-open: allow() decides, stays troubled
        if t.ramp_until == 0.0:
            if self.slow_start > 0:
                t.ramp_until = now + self.slow_start
            else:
                self._settle(t)
                return _OK
        if now >= t.ramp_until:
            self.balancer.set_factor(t.index, 1.0)
            self._settle(t)
        else:
            done = 1.0 - (t.ramp_until - now) / self.slow_start
            self.balancer.set_factor(t.index, max(0.05, done))
        return _OK

    def _trouble(self, t: Target) -> None:
        t.ramp_until = 0.0
        if not t.troubled:
            t.troubled = True
            self._troubled += 1

    def _settle(self, t: Target) -> None:
        t.ramp_until = 0.0
        if t.troubled:
            t.troubled = False
            self._troubled -= 1

    def retry_after(self) -> float:
        """Seconds until some target will take an attempt again (0 if unknown)."""
        now = _CLOCK()
        waits = []
        for t in self.targets:
            wait = max(t.not_before - now, t.breaker.retry_after() if t.breaker else 0.0)
            if wait > 0:
                waits.append(wait)
        return min(waits) if waits else 0.0

    # -- outcomes --------------------------------------------------------------------------------

    def begin(self, t: Target) -> None:
        """An attempt goes to ``t``."""
        t.in_flight += 1
        self.balancer.started(t.index)

    def end(self, t: Target, ok: bool, latency: float | None) -> None:
        """The attempt's outcome: ``ok`` False for a connect error, reset, timeout or 5xx;
        ``latency`` to the response head when there was one."""
        t.in_flight -= 1
        t.requests_total += 1
        if latency is not None:
            t.ewma = latency if t.ewma is None else t.ewma + 0.2 * (latency - t.ewma)
        self.balancer.finished(t.index, latency if ok else None)
        b = t.breaker
        if b is not None:
            was = b.state
            b.record(ok)
            if b.state != was:
                if b.state == "open":
                    self._trouble(t)
                    log.warning(
                        "upstream %s: breaker of %s opened (for %.1fs)",
                        self.name,
                        t.label,
                        b.retry_after(),
                    )
                elif b.state == "closed":
                    log.warning("upstream %s: breaker of %s closed", self.name, t.label)
        if ok:
            if self.outlier is not None:
                self.outlier.record(t.index, True)
            return
        t.failures_total += 1
        if self.outlier is not None and self.outlier.record(t.index, False):
            t.ejections_total += 1
            self._trouble(t)
            until = self.outlier.ejected_until(t.index) or 0.0
            log.warning(
                "upstream %s: %s ejected for %.1fs after consecutive failures",
                self.name,
                t.label,
                max(0.0, until - _CLOCK()),
            )

    def abandon(self, t: Target) -> None:
        """An attempt ended without an outcome (the client went away, the deadline passed)."""
        t.in_flight -= 1
        self.balancer.finished(t.index, None)
        if t.breaker is not None:
            t.breaker.release()

    def hold_off(self, t: Target, seconds: float) -> None:
        """Retry-After from ``t``: no attempt goes there for ``seconds``."""
        t.not_before = max(t.not_before, _CLOCK() + seconds)
        self._trouble(t)

    def _check_changed(self, index: int, healthy: bool) -> None:
        t = self.targets[index]
        t.healthy = healthy
        if healthy:
            if self.outlier is not None:
                self.outlier.active_check_passed(index)
        else:
            self._trouble(t)

    # -- status ----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What ``/status`` shows of this upstream."""
        now = _CLOCK()
        checker = self.checker
        targets = []
        for t in self.targets:
            until = self.outlier.ejected_until(t.index) if self.outlier is not None else None
            b = t.breaker
            if b is not None and b.state == "open" and b.retry_after() == 0:
                state = "half_open"  # it admits probes now
            else:
                state = b.state if b is not None else "closed"
            targets.append(
                {
                    "url": t.url,
                    "weight": t.weight,
                    "backup": t.backup,
                    "healthy": t.healthy and until is None,
                    "active_check": None
                    if checker is None
                    else ("passing" if checker.healthy[t.index] else "failing"),
                    "last_check_error": None if checker is None else checker.last_error[t.index],
                    "ejected": until is not None,
                    "ejected_for_s": round(until - now, 3) if until is not None else None,
                    "ejections_total": t.ejections_total,
                    "breaker": state,
                    "breaker_retry_after_s": round(b.retry_after(), 3) if b else 0.0,
                    "breaker_opened_total": b.opened_total if b else 0,
                    "retry_after_s": round(max(0.0, t.not_before - now), 3),
                    "in_flight": t.in_flight,
                    "ewma_ms": round(t.ewma * 1000, 3) if t.ewma is not None else None,
                    "requests_total": t.requests_total,
                    "failures_total": t.failures_total,
                }
            )
        return {
            "balance": self.config.balance,
            "panic": self.panic,
            "retry_budget": {
                "ratio": self.budget.ratio,
                "denied_total": self.budget.denied_total,
            },
            "ejections_total": self.outlier.ejections_total if self.outlier else 0,
            "targets": targets,
        }


_OK, _OUT, _BLOCKED = 0, 1, 2


class CompiledRoute:
    """What the proxy needs per matched route, precomputed at load."""

    __slots__ = (
        "handler",
        "host_mode",
        "host_value",
        "is_prefix",
        "max_body_bytes",
        "name",
        "pipeline",
        "retry_non_idempotent",
        "rewrite",
        "strip_prefix",
        "upstream",
    )

    def __init__(self, route: Route, upstream: UpstreamRuntime) -> None:
        self.name = route.name
        # A handler route (``handler`` set) has none: it is built with None, never proxies,
        # and the plugins that need an upstream are refused on it when the config is checked.
        self.upstream = upstream
        self.handler: RouteHandler | None = None
        self.is_prefix = route.match.path.endswith("/")
        self.strip_prefix = route.strip_prefix
        self.max_body_bytes = route.max_body_bytes
        self.rewrite = _compile_template(route.rewrite) if route.rewrite else None
        mode = route.host_header
        self.host_mode = mode if mode in ("pass", "target") else "literal"
        self.host_value = mode.encode() if self.host_mode == "literal" else b""
        self.retry_non_idempotent = route.retry_non_idempotent
        self.pipeline: Pipeline | None = None  # set by compile_runtime

    def upstream_path(self, path: bytes, query: bytes, match: Match) -> bytes:
        """The request-target sent upstream: rewrite or strip the matched part, keep the query."""
        if self.rewrite is not None:
            new = _expand(self.rewrite, match.params)
            if self.is_prefix:
                rest = path[match.prefix_len :]
                new = new.rstrip(b"/") + rest if rest and rest != b"/" else new
        elif self.strip_prefix:
            new = path[match.prefix_len :] or b"/"
            if new[:1] != b"/":
                new = b"/" + new
        else:
            new = path
        return new + b"?" + query if query else new

    def upstream_host(self, request_host: bytes, target: Target) -> bytes:
        if self.host_mode == "pass":
            return request_host or target.authority
        if self.host_mode == "target":
            return target.authority
        return self.host_value


#: ``log(extra, upstream_seconds)``: what a route handler calls once its answer is on the wire;
#: ``extra`` fields go into the access-log entry.
LogFn = Callable[[dict[str, Any] | None, float], None]


class RouteHandler(Protocol):
    """A route that answers by itself instead of proxying to an upstream (the LLM API).

    Called after the access phase (auth, limits) with the request's ``Ctx`` (None when the
    route has no plugins). It writes the whole response, applies ``ctx``'s response phase to
    its headers, and calls ``log`` exactly once."""

    def __call__(
        self, req: Request, resp: Responder, ctx: Ctx | None, log: LogFn
    ) -> Awaitable[None]: ...


@dataclass(slots=True)
class HandlerRoute:
    """A handler route to compile beside the config's proxy routes (built by the app from
    sections the gateway knows nothing about, such as ``llm.routes``)."""

    name: str
    path: str
    handler: RouteHandler
    hosts: tuple[str, ...] = ()
    priority: int | None = None
    max_body_bytes: int | None = None
    plugins: dict[str, Any] = field(default_factory=dict)  # merged plugin configs, by name


class _HandlerRouteConfig:
    """The few ``Route`` fields ``CompiledRoute`` reads, for a handler route."""

    def __init__(self, spec: HandlerRoute) -> None:
        self.name = spec.name
        self.max_body_bytes = spec.max_body_bytes
        self.strip_prefix = False
        self.rewrite = None
        self.host_header = "pass"
        self.retry_non_idempotent = False
        self.match = _PathOnly(spec.path)


@dataclass(slots=True)
class _PathOnly:
    path: str


def _compile_template(template: str) -> tuple[bytes | tuple[str], ...]:
    """``/v2/{id}/x`` → (b"/v2/", ("id",), b"/x"); placeholders were checked by config."""
    parts: list[bytes | tuple[str]] = []
    rest = template
    while rest:
        start = rest.find("{")
        if start < 0:
            parts.append(rest.encode())
            break
        end = rest.index("}", start)
        if start:
            parts.append(rest[:start].encode())
        parts.append((rest[start + 1 : end],))
        rest = rest[end + 1 :]
    return tuple(parts)


def _expand(parts: tuple[bytes | tuple[str], ...], params: dict[str, str]) -> bytes:
    out = []
    for p in parts:
        out.append(p if isinstance(p, bytes) else params[p[0]].encode("utf-8", "surrogateescape"))
    return b"".join(out)


class Runtime:
    """One compiled configuration: router, routes and upstreams."""

    __slots__ = ("attached", "config", "env", "router", "routes", "upstreams", "via")

    def snapshot(self) -> dict[str, Any]:
        """Live state of every upstream (what the admin ``/status`` shows)."""
        return {"upstreams": {name: u.snapshot() for name, u in self.upstreams.items()}}

    def __init__(
        self,
        config: Config,
        router: Router,
        routes: list[CompiledRoute],
        upstreams: dict[str, UpstreamRuntime],
    ):
        self.config = config
        self.router = router
        self.routes = routes
        self.upstreams = upstreams
        self.via = f"1.1 {config.gateway.via}".encode()
        self.env: PluginEnv | None = None
        # what the owners of handler routes compiled with this runtime (the app's "llm")
        self.attached: dict[str, Any] = {}


def compile_runtime(
    config: Config,
    previous: Runtime | None = None,
    env: PluginEnv | None = None,
    handler_routes: Sequence[HandlerRoute] = (),
) -> Runtime:
    """Build a runtime, reusing upstreams from ``previous`` whose config is unchanged.

    ``env`` carries what plugins share across reloads (state stores, metrics); without one
    (tests, tools) a private in-memory environment is made. ``handler_routes`` are routes
    answered by a handler of their own (no upstream)."""
    old = previous.upstreams if previous is not None else {}
    upstreams: dict[str, UpstreamRuntime] = {}
    for name, ucfg in config.upstreams.items():
        prior = old.get(name)
        if prior is not None and prior.config == ucfg:
            upstreams[name] = prior
        else:
            upstreams[name] = UpstreamRuntime(name, ucfg)
    if env is None:
        env = default_env(config)
    env.upstreams = upstreams
    env.consumers = Consumers.from_config(config)
    env.trusted_proxies = TrustedProxies(config.gateway.trusted_proxies)
    env.via = f"1.1 {config.gateway.via}".encode()
    routes: list[CompiledRoute] = []
    specs: list[RouteSpec] = []
    for r in config.routes:
        compiled = CompiledRoute(r, upstreams[r.upstream])
        compiled.pipeline = compile_pipeline(merged(config.plugins, r.plugins), env, compiled)
        routes.append(compiled)
        specs.append(_spec(r, compiled))
    for h in handler_routes:
        compiled = CompiledRoute(_HandlerRouteConfig(h), None)  # type: ignore[arg-type]
        compiled.handler = h.handler
        compiled.pipeline = compile_pipeline(h.plugins, env, compiled)
        routes.append(compiled)
        specs.append(
            RouteSpec(
                name=h.name,
                path=h.path,
                methods=None,
                hosts=h.hosts,
                headers=(),
                priority=h.priority,
                payload=compiled,
            )
        )
    runtime = Runtime(config, Router(specs), routes, upstreams)
    runtime.env = env
    return runtime


def default_env(config: Config) -> PluginEnv:
    """A plugin environment private to one runtime: in-memory state, its own metrics."""
    from piuptime.observe.metrics import Metrics
    from piuptime.state.memory import MemoryStores

    return PluginEnv(
        stores=MemoryStores(),
        shared=None,
        metrics=Metrics(),
        consumers=Consumers.from_config(config),
        upstreams={},
        spawn=_spawn,
    )


_background: set[asyncio.Future[Any]] = set()


def _spawn(work: Awaitable[Any]) -> None:
    task = asyncio.ensure_future(work)
    _background.add(task)
    task.add_done_callback(_background.discard)


def _spec(r: Route, compiled: CompiledRoute) -> RouteSpec:
    m = r.match
    hosts: Iterable[str]
    if m.host is None:
        hosts = ()
    elif isinstance(m.host, str):
        hosts = (m.host,)
    else:
        hosts = m.host
    return RouteSpec(
        name=r.name,
        path=m.path,
        methods=frozenset(x.encode() for x in m.methods) if m.methods else None,
        hosts=tuple(hosts),
        headers=tuple((k.lower().encode(), v.encode()) for k, v in m.headers.items()),
        priority=r.priority,
        payload=compiled,
    )


def retired_upstreams(old: Runtime, new: Runtime) -> list[UpstreamRuntime]:
    """Upstreams of ``old`` that ``new`` no longer uses (their pools can be closed)."""
    kept = {id(u) for u in new.upstreams.values()}
    return [u for u in old.upstreams.values() if id(u) not in kept]
