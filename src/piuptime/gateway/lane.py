"""The fast lane: the common proxied request handled in C (``_lane.c``), the rest here.

A plain-TCP listener's connections start in the lane's C protocol. It forwards a request
itself when the request is plain (see ``_lane.c``) and its route is lane-eligible: a proxy
route with no plugins (global or its own), on an upstream of plain-HTTP targets not balanced
by hash, in a configuration whose routes do not match on headers, with no span export. The
lane calls back here, once per request each, to pick the target (``UpstreamRuntime.choose``
and ``begin``, exactly as the Python path) and to book the outcome (``end``, request metrics,
the access log and its observers). Everything else - and any attempt that fails before its
answer started - goes to ``http1.server`` through ``Server.adopt``, for good: the Python path
then answers it (``ProxyHandler._resumed`` continues a failed attempt).

Without the compiled extension (no C compiler at install) ``FastLane.available`` is False
and every connection is served by the Python path alone. See docs/internals.md.
"""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter
from typing import TYPE_CHECKING, Any

import orjson

from piuptime.gateway.proxy import LaneAttempt, ProxyHandler
from piuptime.gateway.router import Match
from piuptime.gateway.runtime import CompiledRoute, Runtime, Target
from piuptime.http1.client import Response
from piuptime.http1.server import Server, ServerLimits
from piuptime.observe.accesslog import now_iso

if TYPE_CHECKING:
    import piuptime.gateway._lane as _lane
else:
    try:
        import piuptime.gateway._lane as _lane
    except ImportError:  # built without a C compiler: the Python path serves everything
        _lane = None

log = logging.getLogger("piuptime.lane")

#: Request bodies up to this size may take the lane (whole, in the bytes at hand).
LANE_MAX_BODY = 64 * 1024
#: How often the lane closes idle and stalled connections (its timers' resolution).
SWEEP_INTERVAL = 0.05

_KINDS = frozenset({"busy", "connect", "connect_timeout", "reset", "timeout", "protocol"})


def available() -> bool:
    """Was the C extension built?"""
    return _lane is not None


class FastLane:
    """The lane of one listener: the C ``Lane`` plus the Python callbacks it uses."""

    def __init__(self, server: Server, handler: ProxyHandler, limits: ServerLimits) -> None:
        if _lane is None:
            raise RuntimeError("the fast lane's C extension is not built")
        self.server = server
        self.handler = handler
        self._loop = asyncio.get_running_loop()
        self._sweeping: asyncio.TimerHandle | None = None
        self._targets: dict[int, tuple[Target, Any]] = {}
        self._runtime: Runtime | None = None
        self._eligible = False
        self.lane = _lane.Lane(
            resolve=self._resolve,
            pick=self._pick,
            done=self._done,
            connect=self._connect,
            handover=self._handover,
            server=server,
            via=handler.runtime.via,
            max_header_bytes=limits.max_header_bytes,
            max_header_count=limits.max_header_count,
            max_body_bytes=min(LANE_MAX_BODY, limits.max_body_bytes),
            idle_timeout=limits.idle_timeout,
            write_timeout=limits.body_timeout,
        )
        self.configure(handler.runtime, limits)
        server.protocol_factory = self._protocol

    # -- configuration -------------------------------------------------------------------------

    def configure(self, runtime: Runtime, limits: ServerLimits) -> None:
        """A new configuration (start, reload): the route cache starts empty, limits apply."""
        self._runtime = runtime
        self._eligible = _runtime_eligible(runtime, self.handler)
        lane = self.lane
        lane.reset(self._resolve, runtime.via)
        lane.max_header_bytes = limits.max_header_bytes
        lane.max_header_count = limits.max_header_count
        lane.max_body_bytes = min(LANE_MAX_BODY, limits.max_body_bytes)
        lane.idle_timeout = limits.idle_timeout
        # a new connection waits this long for its first request (http1.server's head timer)
        lane.header_timeout = limits.header_timeout
        lane.write_timeout = limits.body_timeout
        lane.sample_ratio = self.handler.tracer.ratio
        # the lane writes access-log lines itself unless observers want each entry as a dict
        lane.log_lines = self.handler.access_log.enabled and not self.handler.observers
        # targets of retired upstreams: their idle lane connections close
        live = {id(t) for u in runtime.upstreams.values() for t in u.targets}
        for key in [k for k in self._targets if k not in live]:
            _, lt = self._targets.pop(key)
            lt.close_idle()

    def drain(self) -> None:
        self.lane.drain()

    def close(self) -> None:
        """Close the lane's idle upstream connections (at stop)."""
        for _, lt in self._targets.values():
            lt.close_idle()
        if self._sweeping is not None:
            self._sweeping.cancel()
            self._sweeping = None

    @property
    def requests(self) -> int:
        """Requests the lane forwarded itself."""
        return int(self.lane.requests)

    @property
    def handovers(self) -> int:
        """Connections the lane gave to the Python path."""
        return int(self.lane.handovers)

    # -- callbacks from C ----------------------------------------------------------------------

    def _protocol(self) -> asyncio.Protocol:
        if self._sweeping is None:
            self._sweeping = self._loop.call_later(SWEEP_INTERVAL, self._sweep)
        return _lane.LaneConn(self.lane)

    def _sweep(self) -> None:
        self._sweeping = None
        live = self.lane.sweep()
        now = self._loop.time()
        idle = 0
        for target, lt in self._targets.values():
            if lt.idle:
                lt.expire(perf_counter())  # the C side's clock (CLOCK_MONOTONIC)
                idle += lt.idle
            if target.pool.waiting:
                target.pool.wake_waiters()
        if live or idle:
            self._sweeping = self._loop.call_at(now + SWEEP_INTERVAL, self._sweep)

    def _resolve(self, method: bytes, host: bytes, path: bytes) -> Any:
        """The lane route for one exact method, host and path, or None (the Python path)."""
        runtime = self.handler.runtime
        if runtime is not self._runtime or not self._eligible:
            return None
        match = runtime.router.match(method, host, path, [])
        if match is None:
            return None
        route: CompiledRoute = match.spec.payload  # type: ignore[assignment]
        if route.handler is not None:
            return None
        if route.retry_non_idempotent and method in (b"POST", b"PATCH"):
            # the lane re-sends only what it knows to be idempotent (no route flag in C)
            return None
        policies: dict[str, Any] = {}
        if route.pipeline is not None:
            found = _lane_policies(route.pipeline, runtime)
            if found is None:
                return None
            policies = found
        upstream = route.upstream
        if upstream.hash_on is not None or any(t.url[:5] != "http:" for t in upstream.targets):
            return None
        timeouts = upstream.config.timeouts
        limits = self.server.limits
        host_mode = route.host_mode
        return _lane.LaneRoute(
            payload=(route, match),
            path=route.upstream_path(path, b"", match),
            host=route.host_value if host_mode == "literal" else None,
            host_target=host_mode == "target",
            retry_statuses=upstream.retry_statuses,
            ttfb_timeout=timeouts.ttfb if timeouts.ttfb is not None else timeouts.read,
            read_timeout=timeouts.read,
            total_timeout=upstream.total_timeout,
            max_body_bytes=(
                route.max_body_bytes if route.max_body_bytes is not None else limits.max_body_bytes
            ),
            log_route=orjson.dumps(route.name),
            log_upstream=orjson.dumps(upstream.name),
            **policies,
        )

    def _pick(self, lane_route: Any) -> Any:
        route: CompiledRoute = lane_route.payload[0]
        upstream = route.upstream
        target = upstream.choose((), None)
        if target is None:
            return None  # the Python path answers 503 with its Retry-After
        entry = self._targets.get(id(target))
        if entry is None or entry[0] is not target:
            opts = target.pool.options
            lt = _lane.LaneTarget(
                payload=target,
                authority=target.authority,
                pool=target.pool,
                max_connections=opts.max_connections,
                max_idle=opts.max_idle,
                idle_timeout=opts.idle_timeout,
                log_label=orjson.dumps(target.label),
            )
            self._targets[id(target)] = (target, lt)
            target.pool.shared = lt  # one max_connections for both paths
        else:
            lt = entry[1]
        upstream.budget.request()
        upstream.begin(target)
        return lt

    def _done(
        self,
        payload: tuple[CompiledRoute, Match],
        target: Target,
        status: int,
        sent: int,
        t_start: float,
        t_sent: float,
        t_head: float,
        t_end: float,
        request_id: bytes | None,
        trace_id: bytes | None,
        method: bytes,
        path: bytes,
        consumer: str | None,
        line: bytes | None,
    ) -> None:
        """Book a request the lane answered (status 0: the client left before the answer).
        ``line``: its access-log line, when the lane wrote it."""
        route = payload[0]
        upstream = route.upstream
        handler = self.handler
        if status == 0:
            upstream.abandon(target)
        else:
            upstream.end(target, status < 500, t_head - t_sent)
        if target.pool.waiting:  # Python requests queued behind the lane's connections
            target.pool.wake_waiters()
        total = t_end - t_start
        upstream_time = t_end - t_sent
        metrics = handler.request_metrics
        if metrics is not None:
            metrics.record(route.name, status, consumer, total, upstream_time, 1)
        if line is not None:
            handler.access_log.record_line(line)
            return
        observers = handler.observers
        if not observers and not handler.access_log.enabled:
            return
        entry = {
            "time": now_iso(),
            "request_id": request_id.decode("latin-1") if request_id else handler.ids.next(),
            "route": route.name,
            "consumer": consumer,
            "method": method.decode("latin-1"),
            "path": path.decode("latin-1"),
            "status": status,
            "bytes": sent,
            "upstream": upstream.name,
            "target": target.label,
            "attempts": 1,
            "tried": [target.label],
            "cache": None,
            "total_ms": round(total * 1000, 3),
            "upstream_ms": round(upstream_time * 1000, 3),
            "gateway_ms": round((total - upstream_time) * 1000, 3),
            "trace_id": trace_id.decode() if trace_id is not None else None,
        }
        handler.access_log.record(entry)
        for observe in observers:
            observe(entry)

    def _connect(self, lt: Any) -> None:
        self._loop.create_task(self._open(lt))

    async def _open(self, lt: Any) -> None:
        target: Target = lt.payload
        pool = target.pool
        try:
            async with asyncio.timeout(pool.options.connect_timeout):
                _, proto = await self._loop.create_connection(lt.new_conn, pool.host, pool.port)
        except TimeoutError:
            lt.connect_failed("connect_timeout")
        except OSError:
            lt.connect_failed("connect")
        except BaseException:
            lt.connect_failed("connect")
            raise
        else:
            lt.connected(proto)

    def _handover(
        self,
        conn: Any,
        transport: asyncio.Transport,
        data: bytes,
        resume: tuple[Any, ...] | None,
        eof: bool,
        write_paused: bool,
    ) -> None:
        attempt = None
        if resume is not None:
            payload, target, kind, sent, t_start, t_sent, answer, fields = resume[:8]
            consumer, extra, sent_target, request_id = resume[9:13]
            route, match = payload
            whole = None
            if kind == "status" and answer is not None:
                whole = Response.whole(*answer)  # (status, reason, headers, body)
                sent = True
            elif kind not in _KINDS:
                kind = "reset"
            attempt = LaneAttempt(
                route,
                match,
                target,
                kind,
                bool(sent),
                t_start,
                t_sent,
                whole,
                fields,
                consumer,
                _pairs(extra),
                sent_target,
                request_id,
            )
        self.server.adopt(transport, data, attempt, eof=eof, write_paused=write_paused)


def _pairs(fields: bytes | None) -> list[tuple[bytes, bytes]]:
    """``name: value\r\n`` lines back into ``(name, value)`` pairs."""
    out = []
    for line in fields.split(b"\r\n") if fields else ():
        if line:
            name, _, value = line.partition(b": ")
            out.append((name, value))
    return out


def _lane_policies(pipeline: Any, runtime: Runtime) -> dict[str, Any] | None:
    """The ``LaneRoute`` arguments for a route's plugins, or None when one of them needs the
    Python path: the lane runs request_id, key_auth's success path and a memory rate_limit,
    nothing else (see ``KeyAuthPlugin.lane_ready``, ``RateLimitPlugin.lane_ready``)."""
    out: dict[str, Any] = {}
    env = runtime.env
    trusted = bool(env is not None and env.trusted_proxies)
    for plugin in pipeline.plugins:
        if plugin.name == "key_auth" and "keys" not in out and "access" not in out:
            if not plugin.lane_ready():
                return None
            out["keys"] = plugin.lane_keys()
            out["key_headers"] = plugin.headers
            out["key_query"] = plugin.query_names
            out["key_bearer"] = plugin.bearer
            out["key_hide"] = plugin.hide
        elif plugin.name == "request_id" and "rid_header" not in out:
            out["rid_header"] = plugin.header
            out["rid_trust"] = plugin.trust
            out["rid_echo"] = plugin.echo
        elif plugin.name == "rate_limit" and "access" not in out:
            if not plugin.lane_ready(trusted):
                return None
            out["access"] = plugin.lane_check
        else:
            return None
    if pipeline.response or pipeline.failure or pipeline.log:
        return None  # hooks the lane would not run
    return out


def _runtime_eligible(runtime: Runtime, handler: ProxyHandler) -> bool:
    """May any route of this configuration take the lane? Not when some route matches on
    headers (the lane caches routes by method, host and path) or spans are exported."""
    if handler.tracer.sink is not None:
        return False
    return not any(r.match.headers for r in runtime.config.routes)


def attach(server: Server, handler: ProxyHandler, limits: ServerLimits) -> FastLane | None:
    """Put a lane in front of ``server`` when the extension is built; None otherwise."""
    if _lane is None:
        return None
    return FastLane(server, handler, limits)


__all__ = ["FastLane", "attach", "available"]
