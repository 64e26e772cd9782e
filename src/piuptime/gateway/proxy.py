"""The proxy handler: route a request, forward it to a target, stream the answer back.

One ``ProxyHandler`` lives for the whole process; ``runtime`` is swapped on reload. A request reads
``self.runtime`` once at its start, so it finishes on the configuration it began with.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from piuptime.gateway.headers import (
    downstream_response_fields,
    tunnel_response_headers,
    upstream_request_fields,
    upstream_request_headers,
)
from piuptime.gateway.runtime import CompiledRoute, Runtime, Target
from piuptime.http1.client import (
    ConnectError,
    ConnectTimeout,
    PendingExchange,
    PoolTimeout,
    ReadTimeout,
    Response,
    UpstreamError,
)
from piuptime.http1.errors import BodyTimeout, BodyTooLarge, ClientDisconnected
from piuptime.http1.server import Request, Responder
from piuptime.observe.accesslog import AccessLog, now_iso

log = logging.getLogger("piuptime.proxy")

_NO_BODY_STATUS = frozenset({204, 304})
_SMALL_BODY = 64 * 1024
_HTTPS = b"https"
_HTTP = b"http"


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
        # uvloop's loop.time() has millisecond resolution: too coarse for latency figures.
        self._loop_time: Callable[[], float] = time.perf_counter

    def handle(self, req: Request, resp: Responder) -> Awaitable[None] | None:
        """Route ``req`` and forward it. A bodyless request with an idle pooled connection to
        its target is completed through callbacks (``_Exchange``), without a task; everything
        else returns the ``_forward`` coroutine for the server to run."""
        rt = self.runtime
        match = rt.router.match(req.method, req.host, req.path, req.headers)
        if match is None:
            resp.send_error(
                404,
                "route_not_found",
                f"no route matches {req.method.decode('latin-1')} {req.path.decode('latin-1')}",
            )
            self._log(req, resp, None, None, 0, 0.0)
            resp.finish()
            return None
        route: CompiledRoute = match.spec.payload  # type: ignore[assignment]
        if route.max_body_bytes is not None:
            req.max_body_bytes = route.max_body_bytes
        upstream = route.upstream
        idx = upstream.balancer.pick()
        if idx is None:
            resp.send_error(503, "no_target", f"upstream {upstream.name} has no usable target")
            self._log(req, resp, route, None, 0, 0.0)
            resp.finish()
            return None
        target = upstream.targets[idx]
        host = route.upstream_host(req.host, target)
        proto = _HTTPS if req.tls else _HTTP
        path = route.upstream_path(req.path, req.query, match)
        if req.upgrade is not None:
            headers: list[tuple[bytes, bytes]] | bytes = upstream_request_headers(
                req.headers,
                host=host,
                client_ip=req.client_addr.encode(),
                proto=proto,
                original_host=req.host,
                via=rt.via,
                upgrade=req.upgrade,
            )
        else:
            headers = upstream_request_fields(
                req.headers,
                host=host,
                client_ip=req.client_addr.encode(),
                proto=proto,
                original_host=req.host,
                via=rt.via,
            )
            if not req.has_body:
                ex = _Exchange(self, req, resp, route, target, rt.via)
                conn = target.pool.send_nowait(req.method, path, headers, ex.ready)
                if conn is not None:
                    ex.conn = conn
                    return None
        return self._forward(req, resp, route, target, rt.via, path, headers)

    async def _forward(
        self,
        req: Request,
        resp: Responder,
        route: CompiledRoute,
        target: Target,
        via: bytes,
        path: bytes,
        headers: list[tuple[bytes, bytes]] | bytes,
        pending: PendingExchange | None = None,
        t0: float = 0.0,
    ) -> None:
        """The general path: read the body, send, relay the answer (or an error) back."""
        upstream_time = 0.0
        try:
            if pending is not None:
                up = await pending.wait_response()
            else:
                body = await _request_body(req) if req.has_body else None
                t0 = self._loop_time()
                up = await target.pool.request(req.method, path, headers, body, req.content_length)
            upstream_time = self._loop_time() - t0
        except (BodyTooLarge, BodyTimeout):
            # The server answers these itself (413/408 with connection: close, since the rest
            # of the body is unread) and logs them through its on_error hook.
            raise
        except UpstreamError as exc:
            status, code = _upstream_error_status(exc)
            resp.send_error(status, code, f"upstream {route.upstream.name} ({target.label}): {exc}")
            self._log(req, resp, route, target, 1, self._loop_time() - req.start_time)
            return
        try:
            if up.status == 101 and req.upgrade is not None:
                await self._tunnel(req, resp, up, via)
            else:
                upstream_time += await self._relay(req, resp, up, via)
        finally:
            up.release()
        self._log(req, resp, route, target, 1, upstream_time)

    async def _drained_then_log(
        self,
        req: Request,
        resp: Responder,
        route: CompiledRoute,
        target: Target,
        upstream_time: float,
    ) -> None:
        await resp.drain()
        self._log(req, resp, route, target, 1, upstream_time)

    async def _relay(self, req: Request, resp: Responder, up: Response, via: bytes) -> float:
        """Stream the upstream response to the client; returns time spent waiting upstream."""
        no_body = req.method == b"HEAD" or up.status in _NO_BODY_STATUS or up.status < 200
        resp.start_fields(
            up.status,
            downstream_response_fields(
                up.headers, via=via, length=None if up.chunked else up.content_length
            ),
            None if up.chunked else up.content_length,
            up.reason,
        )
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
                resp.write(chunk)
                await resp.drain()
        resp.end()
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
        target: Target | None,
        attempts: int,
        upstream_time: float,
    ) -> None:
        if not self.access_log.enabled:
            return
        total = self._loop_time() - req.start_time
        self.access_log.record(
            {
                "time": now_iso(),
                "request_id": _request_id(req) or self.ids.next(),
                "route": route.name if route is not None else None,
                "consumer": None,
                "method": req.method.decode("latin-1"),
                "path": req.path.decode("latin-1"),
                "status": resp.status,
                "bytes": resp.bytes_sent,
                "upstream": route.upstream.name if route is not None else None,
                "target": target.label if target is not None else None,
                "attempts": attempts,
                "cache": None,
                "total_ms": round(total * 1000, 3),
                "upstream_ms": round(upstream_time * 1000, 3),
                "gateway_ms": round((total - upstream_time) * 1000, 3),
            }
        )


class _Exchange:
    """A bodyless request forwarded through callbacks: when the upstream answer arrived whole
    and small it is written to the client at once; anything else continues in ``_forward``."""

    __slots__ = ("conn", "handler", "req", "resp", "route", "t0", "target", "via")

    def __init__(
        self,
        handler: ProxyHandler,
        req: Request,
        resp: Responder,
        route: CompiledRoute,
        target: Target,
        via: bytes,
    ) -> None:
        self.handler = handler
        self.req = req
        self.resp = resp
        self.route = route
        self.target = target
        self.via = via
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
            if up is None:
                resp.continue_with(
                    handler._forward(
                        self.req, resp, self.route, self.target, self.via, b"", [], conn, self.t0
                    )
                )
                return
            upstream_time = handler._loop_time() - self.t0
            req = self.req
            status = up.status
            length = None if up.chunked else up.content_length
            resp.start_fields(
                status,
                downstream_response_fields(up.headers, via=self.via, length=length),
                length,
                up.reason,
            )
            if req.method == b"HEAD" or status in _NO_BODY_STATUS or status < 200:
                resp.end()
            else:
                resp.end(conn.buffered_body())
            up.release()
            if resp.write_paused:
                resp.continue_with(
                    handler._drained_then_log(req, resp, self.route, self.target, upstream_time)
                )
                return
            if handler.access_log.enabled:
                handler._log(req, resp, self.route, self.target, 1, upstream_time)
        except Exception as exc:
            if up is not None:
                up.release()
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


def _upstream_error_status(exc: UpstreamError) -> tuple[int, str]:
    if isinstance(exc, ConnectTimeout | ReadTimeout):
        return 504, "upstream_timeout"
    if isinstance(exc, PoolTimeout):
        return 503, "upstream_busy"
    if isinstance(exc, ConnectError):
        return 502, "upstream_unreachable"
    return 502, "bad_gateway"
