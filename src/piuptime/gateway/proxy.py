"""The proxy handler: route a request, forward it to a target, stream the answer back.

One ``ProxyHandler`` lives for the whole process; ``runtime`` is swapped on reload. A request reads
``self.runtime`` once at its start, so it finishes on the configuration it began with.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from email.utils import parsedate_to_datetime
from typing import Any

from piuptime.gateway.headers import (
    downstream_response_fields,
    traced_request_fields,
    tunnel_response_headers,
    upstream_request_headers,
)
from piuptime.gateway.plugins import Ctx, Reply
from piuptime.gateway.router import Match
from piuptime.gateway.runtime import CompiledRoute, Runtime, Target, UpstreamRuntime
from piuptime.http1.client import (
    IDEMPOTENT_METHODS,
    ConnectError,
    ConnectTimeout,
    PendingExchange,
    PoolTimeout,
    ReadTimeout,
    RemoteProtocolError,
    Response,
    UpstreamError,
)
from piuptime.http1.errors import BodyTooLarge, ClientDisconnected, error_body
from piuptime.http1.server import Request, Responder
from piuptime.observe.accesslog import AccessLog, now_iso
from piuptime.observe.requestmetrics import RequestMetrics
from piuptime.observe.tracing import Trace, Tracer

log = logging.getLogger("piuptime.proxy")

_NO_BODY_STATUS = frozenset({204, 304})
_SMALL_BODY = 64 * 1024
_HTTPS = b"https"
_HTTP = b"http"
_MAX_RETRY_AFTER = 3600.0


class RequestIds:
    """Cheap unique request ids: a random per-process prefix and a counter."""

    __slots__ = ("_n", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._n = 0

    def next(self) -> str:
        self._n += 1
        return f"{self._prefix}-{self._n:x}"


class ProxyHandler:
    """The data-plane request handler given to ``http1.server.Server``."""

    def __init__(self, runtime: Runtime, access_log: AccessLog) -> None:
        self.runtime = runtime
        self.access_log = access_log
        self.ids = RequestIds()
        # called in the log phase with each request's access-log entry (metrics, analytics);
        # never raise, never block
        self.observers: tuple[Callable[[dict[str, Any]], None], ...] = ()
        # /metrics: fed plain values in the log phase, without building the log entry
        self.request_metrics: RequestMetrics | None = None
        # W3C trace context, always; spans of sampled requests when a sink is attached
        self.tracer = Tracer()
        # uvloop's loop.time() has millisecond resolution: too coarse for latency figures.
        self._loop_time: Callable[[], float] = time.perf_counter

    def handle(self, req: Request, resp: Responder) -> Awaitable[None] | None:
        """Route ``req``, run its plugins and forward it. A bodyless request whose plugins
        need not wait, with an idle pooled connection to its target, is completed through
        callbacks (``_Exchange``), without a task; everything else (bodies, retries, waits)
        returns a coroutine for the server to run."""
        if req.resume is not None:
            return self._resumed(req, resp)
        rt = self.runtime
        match = rt.router.match(req.method, req.host, req.path, req.headers)
        if match is None:
            resp.send_error(
                404,
                "route_not_found",
                f"no route matches {req.method.decode('latin-1')} {req.path.decode('latin-1')}",
            )
            self._log(req, resp, None, (), 0.0)
            resp.finish()
            return None
        route: CompiledRoute = match.spec.payload  # type: ignore[assignment]
        if route.max_body_bytes is not None:
            req.max_body_bytes = route.max_body_bytes
        pipe = route.pipeline
        if pipe is None:
            return self._dispatch(req, resp, route, match, None, True)
        assert rt.env is not None
        ctx = Ctx(req, resp, route, match, rt.env)
        if pipe.request:
            try:
                r = pipe.access(ctx)
            except BaseException:
                pipe.finish(ctx)
                raise
            if r is not None:
                if type(r) is Reply:
                    self._reply(ctx, r)
                    self._log(req, resp, route, (), 0.0, ctx)
                    resp.finish()
                    return None
                return self._after_access(ctx, r, match)  # type: ignore[arg-type]
        return self._dispatch(req, resp, route, match, ctx, True)

    async def _after_access(self, ctx: Ctx, pending: Awaitable[Reply | None], match: Match) -> None:
        """The access phase had to wait: finish it, then forward (never on the callback path:
        this coroutine already owns the request)."""
        req, resp, route = ctx.req, ctx.resp, ctx.route
        try:
            r = await pending
        except BaseException:
            route.pipeline.finish(ctx)  # type: ignore[union-attr]
            raise
        if r is not None:
            self._reply(ctx, r)
            self._log(req, resp, route, (), 0.0, ctx)
            return
        work = self._dispatch(req, resp, route, match, ctx, False)
        if work is not None:
            await work

    def _dispatch(
        self,
        req: Request,
        resp: Responder,
        route: CompiledRoute,
        match: Match,
        ctx: Ctx | None,
        fast: bool,
    ) -> Awaitable[None] | None:
        """Pick a target and send; ``fast``: the callback path may be taken."""
        if route.handler is not None:
            return self._handled(req, resp, route, ctx)
        rt = self.runtime
        upstream = route.upstream if ctx is None else ctx.upstream
        key = _hash_key(req, upstream.hash_on) if upstream.hash_on is not None else None
        target = upstream.choose((), key)
        if target is None:
            self._no_target(req, resp, route, upstream, ctx)
            if fast:
                resp.finish()
            return None
        upstream.budget.request()
        if ctx is not None and ctx.host is not None:
            host = ctx.host
        else:
            host = route.upstream_host(req.host, target)
        proto = _HTTPS if req.tls else _HTTP
        if ctx is not None and ctx.path is not None:
            path = ctx.path
        else:
            path = route.upstream_path(req.path, req.query, match)
        if req.upgrade is not None:
            trace = self.tracer.from_headers(req.headers)
            headers: list[tuple[bytes, bytes]] | bytes = upstream_request_headers(
                req.headers,
                host=host,
                client_ip=req.client_addr.encode(),
                proto=proto,
                original_host=req.host,
                via=rt.via,
                upgrade=req.upgrade,
                trace=trace,
            )
            trace.route_path = match.spec.path
        else:
            headers, trace = traced_request_fields(
                req.headers,
                host=host,
                client_ip=req.client_addr.encode(),
                proto=proto,
                original_host=req.host,
                via=rt.via,
                tracer=self.tracer,
            )
            trace.route_path = match.spec.path
            if fast and not req.has_body:
                ex = _Exchange(
                    self, req, resp, route, target, rt.via, key, path, headers, ctx, trace
                )
                conn = target.pool.send_nowait(
                    req.method, path, headers, ex.ready, _idempotent(req, route)
                )
                if conn is not None:
                    ex.conn = conn
                    upstream.begin(target)
                    return None
        return self._forward(
            req, resp, route, target, rt.via, path, headers, key, ctx=ctx, trace=trace
        )

    def _resumed(self, req: Request, resp: Responder) -> Awaitable[None] | None:
        """A request the fast lane began (``gateway.lane``): its attempt on ``target`` did not
        give an answer to relay; carry on from there as if this path had made it."""
        attempt = req.resume
        assert isinstance(attempt, LaneAttempt)
        req.resume = None
        req.start_time = attempt.start_time
        route, match, target = attempt.route, attempt.match, attempt.target
        upstream = route.upstream
        ctx = None
        if route.pipeline is not None:
            # the lane ran the access phase (gateway/lane.py): what it found carries over
            assert self.runtime.env is not None
            ctx = Ctx(req, resp, route, match, self.runtime.env)
            if attempt.consumer is not None:
                ctx.consumer = ctx.env.consumers.get(attempt.consumer)
            ctx.response_headers = attempt.response_headers
            if attempt.request_id is not None:
                ctx.request_id = attempt.request_id.decode("ascii")
        if route.max_body_bytes is not None:
            req.max_body_bytes = route.max_body_bytes
        # what the lane sent (a hidden key left out, the consumer told): a retry sends the same
        path = attempt.path
        if path is None:
            path = route.upstream_path(req.path, req.query, match)
        headers = attempt.fields
        at = headers.find(b"traceparent: ")
        trace = self.tracer.start(headers[at + 13 : at + 68] if at >= 0 else None, None)
        trace.route_path = match.spec.path
        pending: LaneAttempt | None = attempt
        if attempt.kind == "busy":
            # the lane's connections to the target were all taken: this path's pool queues it
            # (max_pending, the pool timeout), as a first attempt of its own
            upstream.abandon(target)
            pending = None
        return self._forward(
            req,
            resp,
            route,
            target,
            self.runtime.via,
            path,
            headers,
            None,
            pending,
            attempt.sent_time,
            ctx,
            trace,
        )

    async def _handled(
        self, req: Request, resp: Responder, route: CompiledRoute, ctx: Ctx | None
    ) -> None:
        """A route with a handler of its own (the LLM API): it answers and logs."""
        logged = False

        def log(extra: dict[str, Any] | None, upstream_time: float) -> None:
            nonlocal logged
            if not logged:
                logged = True
                self._log(req, resp, route, (), upstream_time, ctx, extra=extra)

        try:
            await route.handler(req, resp, ctx, log)  # type: ignore[misc]
        finally:
            if ctx is not None:
                route.pipeline.finish(ctx)  # type: ignore[union-attr]

    async def _forward(
        self,
        req: Request,
        resp: Responder,
        route: CompiledRoute,
        target: Target,
        via: bytes,
        path: bytes,
        headers: list[tuple[bytes, bytes]] | bytes,
        key: bytes | None,
        pending: PendingExchange | LaneAttempt | None = None,
        t0: float = 0.0,
        ctx: Ctx | None = None,
        trace: Trace | None = None,
    ) -> None:
        """The general path: read the body, then attempts until one gives an answer worth
        relaying, within the retry rules, the budget and the total deadline."""
        if ctx is None:
            await self._attempts(
                req, resp, route, target, via, path, headers, key, pending, t0, None, trace
            )
            return
        try:
            await self._attempts(
                req, resp, route, target, via, path, headers, key, pending, t0, ctx, trace
            )
        finally:
            route.pipeline.finish(ctx)  # type: ignore[union-attr]

    async def _attempts(
        self,
        req: Request,
        resp: Responder,
        route: CompiledRoute,
        target: Target,
        via: bytes,
        path: bytes,
        headers: list[tuple[bytes, bytes]] | bytes,
        key: bytes | None,
        pending: PendingExchange | LaneAttempt | None,
        t0: float,
        ctx: Ctx | None = None,
        trace: Trace | None = None,
    ) -> None:
        upstream = route.upstream if ctx is None else ctx.upstream
        spans = trace if trace is not None and trace.attempts is not None else None
        now = self._loop_time
        deadline = req.start_time + upstream.total_timeout
        if ctx is not None and ctx.body is not None:
            body: bytes | AsyncIterator[bytes] | None = ctx.body
        else:
            body = await _request_body(req) if req.has_body else None
        replayable = body is None or isinstance(body, bytes)
        idempotent = _idempotent(req, route)
        retries_left = upstream.retries.attempts
        tried: list[Target] = []
        upstream_time = 0.0
        while True:
            tried.append(target)
            error: UpstreamError | None = None
            up: Response | None = None
            if pending is None and target.pool.full and target.pool.waiting >= upstream.max_pending:
                error = _Busy(f"{target.label} has {upstream.max_pending} requests waiting")
                if target.breaker is not None:
                    target.breaker.release()
                t0 = now()
            else:
                if pending is None:
                    upstream.begin(target)
                    t0 = now()
                remaining = deadline - now()
                try:
                    async with asyncio.timeout(remaining if remaining > 0 else 0):
                        if pending is not None:
                            up = await pending.wait_response()
                        else:
                            up = await target.pool.request(
                                req.method, path, headers, body, req.content_length, idempotent
                            )
                except UpstreamError as exc:
                    error = exc
                    upstream.end(target, False, None)
                except TimeoutError:
                    upstream.abandon(target)
                    if spans is not None:
                        spans.attempt(
                            headers, target.url, req.method, path, t0, now(), None, "timeout"
                        )
                    self._fail(
                        ctx,
                        resp,
                        504,
                        "upstream_timeout",
                        f"upstream {upstream.name}: no answer within the total timeout "
                        f"({upstream.total_timeout:g}s) after {len(tried)} attempt(s)",
                    )
                    self._log(req, resp, route, tried, upstream_time + now() - t0, ctx, trace)
                    return
                except BaseException:
                    upstream.abandon(target)
                    raise
                pending = None
            if spans is not None:  # this attempt's CLIENT span; the next gets a new parent id
                status = up.status if up is not None else None
                headers = spans.attempt(
                    headers, target.url, req.method, path, t0, now(), status, error
                )
            if up is not None:
                latency = now() - t0
                upstream_time += latency
                status = up.status
                upstream.end(target, status < 500, latency)
                if status in upstream.retry_statuses:
                    wait = _retry_after(up.headers)
                    if wait is not None:
                        upstream.hold_off(target, wait)
                    # the target answered: a non-idempotent body was consumed, never re-sent
                    if idempotent and replayable and retries_left > 0:
                        nxt = await self._retry_target(upstream, tried, key, deadline, retries_left)
                        if nxt is not None:
                            up.release()
                            retries_left -= 1
                            target = nxt
                            continue
                if status >= 500 and ctx is not None and ctx.route.pipeline.failure:  # type: ignore[union-attr]
                    reply = ctx.route.pipeline.on_failure(ctx, status)  # type: ignore[union-attr]
                    if reply is not None:
                        up.release()
                        self._reply(ctx, reply)
                        self._log(req, resp, route, tried, upstream_time, ctx, trace)
                        return
                break
            assert error is not None
            sent = error.request_sent
            may_retry = not sent or (idempotent and replayable and not error.response_started)
            if may_retry and retries_left > 0:
                # a silent target is not asked again; a reset or refused one may be
                same_ok = not isinstance(error, ReadTimeout)
                nxt = await self._retry_target(
                    upstream, tried, key, deadline, retries_left, same_ok=same_ok
                )
                if nxt is not None:
                    retries_left -= 1
                    target = nxt
                    continue
            status, code = _upstream_error_status(error)
            message = f"upstream {upstream.name} ({target.label}): {error}"
            self._fail(ctx, resp, status, code, message)
            self._log(req, resp, route, tried, upstream_time, ctx, trace)
            return
        try:
            if up.status == 101 and req.upgrade is not None:
                await self._tunnel(req, resp, up, via)
            else:
                upstream_time += await self._relay(req, resp, up, via, ctx)
        finally:
            up.release()
        self._log(req, resp, route, tried, upstream_time, ctx, trace)

    async def _retry_target(
        self,
        upstream: UpstreamRuntime,
        tried: list[Target],
        key: bytes | None,
        deadline: float,
        retries_left: int,
        *,
        same_ok: bool = True,
    ) -> Target | None:
        """The target of the next attempt, after the backoff: another target when one can take
        it (else, with ``same_ok``, the same one again); None when there is none, the budget is
        spent or time is short."""
        nxt = upstream.choose({t.index for t in tried}, key)
        if nxt is None and same_ok:
            nxt = upstream.choose((), key)
        if nxt is None:
            return None
        if not upstream.budget.try_retry():
            if nxt.breaker is not None:
                nxt.breaker.release()  # the probe slot choose() reserved goes unused
            return None
        cfg = upstream.retries
        done = cfg.attempts - retries_left  # retries already made
        wait = random.uniform(0, min(cfg.max_backoff, cfg.backoff * (2**done)))
        if self._loop_time() + wait >= deadline:
            if nxt.breaker is not None:
                nxt.breaker.release()
            return None
        await asyncio.sleep(wait)
        upstream.retries_total += 1
        return nxt

    def _no_target(
        self,
        req: Request,
        resp: Responder,
        route: CompiledRoute,
        upstream: UpstreamRuntime,
        ctx: Ctx | None,
    ) -> None:
        wait = upstream.retry_after()
        message = f"upstream {upstream.name} has no target that can take the request now"
        extra = [(b"retry-after", b"%d" % max(1, round(wait)))] if wait > 0 else None
        self._fail(ctx, resp, 503, "no_target", message, extra)
        self._log(req, resp, route, (), 0.0, ctx)

    def _fail(
        self,
        ctx: Ctx | None,
        resp: Responder,
        status: int,
        code: str,
        message: str,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Answer that the upstream failed, unless a plugin has something better (a stale
        cached copy); the response phase runs on whichever goes out."""
        if ctx is None:
            if headers:
                resp.send(status, error_body(status, code, message), headers)
            else:
                resp.send_error(status, code, message)
            return
        pipe = ctx.route.pipeline
        assert pipe is not None
        reply = pipe.on_failure(ctx, status) if pipe.failure else None
        if reply is None:
            reply = Reply.error(status, code, message, headers)
        self._reply(ctx, reply)

    def _reply(self, ctx: Ctx, reply: Reply) -> None:
        """Send a whole response made by the gateway, through the response phase."""
        headers = list(reply.headers)
        pipe = ctx.route.pipeline
        if pipe is not None:
            pipe.on_response(ctx, reply.status, headers)
        ctx.resp.send(reply.status, reply.body, headers, None)

    async def _drained_then_log(
        self,
        req: Request,
        resp: Responder,
        route: CompiledRoute,
        target: Target,
        upstream_time: float,
        ctx: Ctx | None,
        trace: Trace | None = None,
    ) -> None:
        try:
            await resp.drain()
        finally:
            self._log(req, resp, route, (target,), upstream_time, ctx, trace)

    async def _relay(
        self, req: Request, resp: Responder, up: Response, via: bytes, ctx: Ctx | None = None
    ) -> float:
        """Stream the upstream response to the client; returns time spent waiting upstream.
        A plugin's ``ctx.capture`` gets the whole body afterwards when it fits its limit."""
        no_body = req.method == b"HEAD" or up.status in _NO_BODY_STATUS or up.status < 200
        headers = up.headers
        if ctx is not None:
            ctx.route.pipeline.on_response(ctx, up.status, headers)  # type: ignore[union-attr]
        resp.start_fields(
            up.status,
            downstream_response_fields(
                headers, via=via, length=None if up.chunked else up.content_length
            ),
            None if up.chunked else up.content_length,
            up.reason,
        )
        capture = ctx.capture if ctx is not None else None
        kept: list[bytes] | None = [] if capture is not None else None
        room = ctx.capture_limit if ctx is not None else 0
        waited = 0.0
        if not no_body:
            if up.content_length is None:
                # A stream (chunked or close-delimited, e.g. server-sent events): the client
                # gets the head now rather than with the first chunk, which may be far off.
                await resp.drain()
            now = self._loop_time
            while True:
                t0 = now()
                chunk = await up.read()
                waited += now() - t0
                if not chunk:
                    break
                if kept is not None:
                    room -= len(chunk)
                    if room < 0:
                        kept = None  # too large to keep: relayed, not captured
                    else:
                        kept.append(chunk)
                resp.write(chunk)
                await resp.drain()
        resp.end()
        if capture is not None and kept is not None:
            capture(up.status, headers, b"".join(kept))
        return waited

    async def _tunnel(self, req: Request, resp: Responder, up: Response, via: bytes) -> None:
        """Switch protocols: splice bytes both ways until either side closes."""
        downstream = resp.upgrade(tunnel_response_headers(up.headers, via=via))
        upstream = up.detach()

        async def pump(src: Any, dst: Any) -> None:
            try:
                while True:
                    data = await src.read()
                    if not data:
                        break
                    dst.write(data)
                    await dst.drain()
            except (OSError, UpstreamError, ClientDisconnected):
                pass
            finally:
                dst.close()

        tasks = [
            asyncio.ensure_future(pump(downstream, upstream)),
            asyncio.ensure_future(pump(upstream, downstream)),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            downstream.close()
            upstream.close()

    def _log(
        self,
        req: Request,
        resp: Responder,
        route: CompiledRoute | None,
        tried: Sequence[Target],
        upstream_time: float,
        ctx: Ctx | None = None,
        trace: Trace | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if ctx is not None:
            ctx.route.pipeline.finish(ctx)  # type: ignore[union-attr]
        total = self._loop_time() - req.start_time
        metrics = self.request_metrics
        if metrics is not None:
            who = ctx.consumer if ctx is not None else None
            metrics.record(
                route.name if route is not None else None,
                resp.status,
                who.name if who is not None else None,
                total,
                upstream_time,
                len(tried),
            )
        observers = self.observers
        tracer = self.tracer
        if trace is None and (observers or self.access_log.enabled or tracer.sink is not None):
            trace = tracer.from_headers(req.headers)  # answered before going upstream
        if trace is not None and trace.attempts is not None:
            tracer.request_done(trace, req, resp, route, ctx, len(tried))
        if not observers and not self.access_log.enabled:
            return
        consumer = ctx.consumer if ctx is not None else None
        upstream = ctx.upstream if ctx is not None else (route.upstream if route else None)
        if route is not None and route.handler is not None:
            upstream = None
        request_id = ctx.request_id if ctx is not None else None
        entry = {
            "time": now_iso(),
            "request_id": request_id or _request_id(req) or self.ids.next(),
            "route": route.name if route is not None else None,
            "consumer": consumer.name if consumer is not None else None,
            "method": req.method.decode("latin-1"),
            "path": req.path.decode("latin-1"),
            "status": resp.status,
            "bytes": resp.bytes_sent,
            "upstream": upstream.name if upstream is not None else None,
            "target": tried[-1].label if tried else None,
            "attempts": len(tried),
            "tried": [t.label for t in tried],
            "cache": ctx.cache if ctx is not None else None,
            "total_ms": round(total * 1000, 3),
            "upstream_ms": round(upstream_time * 1000, 3),
            "gateway_ms": round((total - upstream_time) * 1000, 3),
            "trace_id": trace.trace_id.decode() if trace is not None else None,
        }
        if extra:
            entry.update(extra)
        self.access_log.record(entry)
        for observe in observers:
            observe(entry)


class _Exchange:
    """A bodyless request forwarded through callbacks: when the upstream answer arrived whole
    and small, and is not one to retry, it is written to the client at once; anything else
    (a large or streamed body, an error, a retryable status) continues in ``_forward``."""

    __slots__ = (
        "conn",
        "ctx",
        "handler",
        "headers",
        "key",
        "path",
        "req",
        "resp",
        "route",
        "t0",
        "target",
        "trace",
        "via",
    )

    def __init__(
        self,
        handler: ProxyHandler,
        req: Request,
        resp: Responder,
        route: CompiledRoute,
        target: Target,
        via: bytes,
        key: bytes | None,
        path: bytes,
        headers: bytes,
        ctx: Ctx | None,
        trace: Trace,
    ) -> None:
        self.handler = handler
        self.trace = trace
        self.ctx = ctx
        self.req = req
        self.resp = resp
        self.route = route
        self.target = target
        self.via = via
        self.key = key
        self.path = path  # kept for a retry on another target
        self.headers = headers
        self.conn: PendingExchange | None = None
        self.t0 = handler._loop_time()

    def ready(self) -> None:
        """Called by the client once the upstream answer is complete, or will not be soon."""
        resp = self.resp
        up = None
        try:
            conn = self.conn
            assert conn is not None
            up = conn.complete_response()
            handler = self.handler
            ctx = self.ctx
            upstream = self.route.upstream if ctx is None else ctx.upstream  # traffic_split
            if up is None or up.status in upstream.retry_statuses:
                up = None
                resp.continue_with(
                    handler._forward(
                        self.req,
                        resp,
                        self.route,
                        self.target,
                        self.via,
                        self.path,
                        self.headers,
                        self.key,
                        conn,
                        self.t0,
                        self.ctx,
                        self.trace,
                    )
                )
                return
            upstream_time = handler._loop_time() - self.t0
            req = self.req
            trace = self.trace
            if trace.attempts is not None:
                t0 = self.t0
                trace.attempt(
                    self.headers,
                    self.target.url,
                    req.method,
                    self.path,
                    t0,
                    t0 + upstream_time,
                    up.status,
                    None,
                )
            status = up.status
            upstream.end(self.target, status < 500, upstream_time)
            headers = up.headers
            if ctx is not None:
                pipe = self.route.pipeline
                assert pipe is not None
                if status >= 500 and pipe.failure:
                    reply = pipe.on_failure(ctx, status)
                    if reply is not None:
                        up.release()
                        up = None
                        handler._reply(ctx, reply)
                        handler._log(
                            req, resp, self.route, (self.target,), upstream_time, ctx, trace
                        )
                        resp.finish()
                        return
                pipe.on_response(ctx, status, headers)
            length = None if up.chunked else up.content_length
            resp.start_fields(
                status,
                downstream_response_fields(headers, via=self.via, length=length),
                length,
                up.reason,
            )
            if req.method == b"HEAD" or status in _NO_BODY_STATUS or status < 200:
                body = b""
                resp.end()
            else:
                body = conn.buffered_body()
                resp.end(body)
            if ctx is not None and ctx.capture is not None and len(body) <= ctx.capture_limit:
                ctx.capture(status, headers, body)
            up.release()
            up = None
            if resp.write_paused:
                resp.continue_with(
                    handler._drained_then_log(
                        req, resp, self.route, self.target, upstream_time, ctx, trace
                    )
                )
                return
            if (
                ctx is not None
                or handler.access_log.enabled
                or handler.observers
                or handler.request_metrics is not None
                or trace.attempts is not None
            ):
                handler._log(req, resp, self.route, (self.target,), upstream_time, ctx, trace)
        except Exception as exc:
            if up is not None:
                up.release()
            if self.ctx is not None:
                self.route.pipeline.finish(self.ctx)  # type: ignore[union-attr]
            resp.finish(exc)
            return
        resp.finish()


def _request_id(req: Request) -> str | None:
    for name, value in req.headers:
        if name == b"x-request-id":
            return value.decode("latin-1")
    return None


async def _request_body(req: Request) -> bytes | AsyncIterator[bytes] | None:
    """Small bodies with a declared length are read whole (replayable); others stream."""
    if not req.has_body:
        return None
    length = req.content_length
    if length is not None and length <= _SMALL_BODY:
        if length > req.max_body_bytes:
            raise BodyTooLarge(f"request body exceeds {req.max_body_bytes} bytes")
        parts = []
        while True:
            chunk = await req.read()
            if not chunk:
                break
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)
    return _stream_body(req)


async def _stream_body(req: Request) -> AsyncIterator[bytes]:
    while True:
        chunk = await req.read()
        if not chunk:
            return
        yield chunk


class LaneAttempt:
    """What the fast lane did with a request it hands to this path: the route and match it
    resolved, the target it picked (``UpstreamRuntime.begin`` already called), and how the
    attempt ended: ``kind`` ``busy`` (the lane had no free connection: nothing was tried),
    ``connect``, ``connect_timeout``, ``reset``, ``timeout``, ``protocol`` (an error) or
    ``status`` (a retryable answer, kept whole in ``answer``); ``fields`` and ``path``: the
    header fields and request-target it sent, which a retry sends again. The proxy continues
    as if its own first attempt had ended so (``wait_response``)."""

    __slots__ = (
        "answer",
        "consumer",
        "fields",
        "kind",
        "match",
        "path",
        "request_id",
        "response_headers",
        "route",
        "sent",
        "sent_time",
        "start_time",
        "target",
    )

    def __init__(
        self,
        route: CompiledRoute,
        match: Match,
        target: Target,
        kind: str,
        sent: bool,
        start_time: float,
        sent_time: float,
        answer: Response | None,
        fields: bytes,
        consumer: str | None = None,
        response_headers: list[tuple[bytes, bytes]] | None = None,
        path: bytes | None = None,
        request_id: bytes | None = None,
    ) -> None:
        self.path = path  # the request-target it sent
        self.request_id = request_id  # request_id's id
        self.fields = fields  # the header fields the lane sent (``name: value\r\n`` lines)
        self.consumer = consumer  # the consumer key_auth found (name)
        self.response_headers = response_headers or []  # what rate_limit adds to the answer
        self.route = route
        self.match = match
        self.target = target
        self.kind = kind
        self.sent = sent
        self.start_time = start_time
        self.sent_time = sent_time
        self.answer = answer

    async def wait_response(self) -> Response:
        if self.answer is not None:
            return self.answer
        kind = self.kind
        label = self.target.label
        if kind == "connect":
            raise ConnectError(f"cannot connect to {label}")
        if kind == "connect_timeout":
            raise ConnectTimeout(f"connecting to {label} timed out")
        if kind == "timeout":
            raise ReadTimeout(f"{label} sent no answer in time", request_sent=True)
        if kind == "protocol":
            raise RemoteProtocolError(
                f"{label} sent a malformed answer", request_sent=True, response_started=True
            )
        raise UpstreamError(
            f"{label} closed the connection before answering", request_sent=self.sent
        )


class _Busy(UpstreamError):
    """The target's connections and waiting room are full (nothing was sent)."""


def _idempotent(req: Request, route: CompiledRoute) -> bool:
    """May the request be sent twice (RFC 9110 9.2.2, an Idempotency-Key, or the route says)?"""
    return (
        req.method in IDEMPOTENT_METHODS
        or route.retry_non_idempotent
        or any(n == b"idempotency-key" for n, _ in req.headers)
    )


def _retry_after(headers: list[tuple[bytes, bytes]]) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP-date), capped."""
    for name, value in headers:
        if name != b"retry-after":
            continue
        text = value.decode("latin-1").strip()
        if text.isdigit():
            return min(float(text), _MAX_RETRY_AFTER)
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        return min(max(0.0, when.timestamp() - time.time()), _MAX_RETRY_AFTER)
    return None


def _hash_key(req: Request, hash_on: str) -> bytes | None:
    """The consistent-hashing key of a request: ip, path, header:<name> or cookie:<name>."""
    if hash_on == "ip":
        return req.client_addr.encode()
    if hash_on == "path":
        return req.path
    kind, _, name = hash_on.partition(":")
    if kind == "header":
        wanted = name.lower().encode("latin-1")
        for n, v in req.headers:
            if n == wanted:
                return v
        return None
    cookie = name.encode("latin-1")
    for n, v in req.headers:
        if n == b"cookie":
            for part in v.split(b";"):
                k, _, val = part.strip().partition(b"=")
                if k == cookie:
                    return val
    return None


def _upstream_error_status(exc: UpstreamError) -> tuple[int, str]:
    if isinstance(exc, ConnectTimeout | ReadTimeout):
        return 504, "upstream_timeout"
    if isinstance(exc, PoolTimeout | _Busy):
        return 503, "upstream_busy"
    if isinstance(exc, ConnectError):
        return 502, "upstream_unreachable"
    return 502, "bad_gateway"
