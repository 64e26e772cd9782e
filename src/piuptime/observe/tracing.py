"""W3C Trace Context for every proxied request, and the spans of sampled ones.

Always on, with no extra installed: a valid incoming ``traceparent`` is continued (same trace id,
the gateway's own span id as the new parent id, ``tracestate`` passed through when valid); an
absent or invalid one starts a new trace. The sampled flag follows the incoming one, otherwise
``tracing.sample`` (0 when there is no ``tracing`` section). The trace id goes into the access
log (``trace_id``) so log lines and traces join.

With ``tracing.otlp_endpoint`` set (``pip install 'piuptime[otel]'``) a :class:`SpanSink` is
attached to the :class:`Tracer`: a sampled request then carries a list of its upstream attempts
(``Trace.attempts``) and, in the log phase, one record is queued for the sink — a SERVER span for
the request and a CLIENT span per attempt, built and exported off the event loop
(``piuptime.observe.otlp``). Unsampled requests make no span records at all.

Costs on the hot path: one ``Trace`` (a slots object) per proxied request, its ids sliced from a
pool of random hex made in bulk, and, only when the client sent a ``traceparent``, one
regular-expression match; the header pass itself is the one ``gateway.headers`` already does.
"""

from __future__ import annotations

import logging
import os
import re
import time
import weakref
from binascii import hexlify
from collections.abc import Iterable
from random import getrandbits, randbytes, random
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from piuptime.config.tracing import TracingConfig
    from piuptime.http1.server import Request, Responder
    from piuptime.observe.metrics import Metrics

log = logging.getLogger("piuptime.tracing")

__all__ = [
    "Trace",
    "Tracer",
    "clean_tracestate",
    "parse_traceparent",
]

_TRACEPARENT = re.compile(rb"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
_DASH = 0x2D

# tracestate (W3C Trace Context §3.3): list-members ``key=value`` separated by commas with
# optional blanks; empty members are allowed; at most 32 members; keys unique.
_KEY = rb"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
_VALUE = rb"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_MEMBER = re.compile(rb"[ \t]*(" + _KEY + rb")=(" + _VALUE + rb")[ \t]*")
_BLANK = re.compile(rb"[ \t]*")
MAX_TRACESTATE_MEMBERS = 32
# "Vendors SHOULD propagate at least 512 characters"; longer values are cut down the way the
# spec describes (members over 128 characters first, then from the end).
TRACESTATE_LIMIT = 512
_LONG_MEMBER = 128
_MAX_TRACESTATE_INPUT = 8192  # anything longer is not looked at


def parse_traceparent(value: bytes) -> tuple[bytes, bytes, bool] | None:
    """``(trace id, parent id, sampled)`` from a ``traceparent`` value, or None if invalid.

    Version ``00`` is exactly 55 characters; a higher version (not ``ff``) may carry more after
    a ``-`` and is read as version 00 (the spec's forward compatibility). Hex is lower-case;
    all-zero ids are invalid.
    """
    n = len(value)
    if n != 55 and (n < 56 or value[55] != _DASH or value[:2] == b"00"):
        return None
    if _TRACEPARENT.match(value) is None or value[:2] == b"ff":
        return None
    trace_id = value[3:35]
    parent_id = value[36:52]
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, bool(int(value[53:55], 16) & 1)


_state_cache: dict[bytes, bytes | None] = {}


def clean_tracestate(value: bytes) -> bytes | None:
    """The ``tracestate`` to pass on: the value unchanged when valid and at most 512
    characters, shortened as the spec describes when longer, None when invalid (too many
    members, a duplicate key, a malformed member). Results are memoised (a bounded cache):
    services tend to send the same few values."""
    cached = _state_cache.get(value, False)
    if cached is not False:
        return cached  # type: ignore[return-value]
    result = _check_tracestate(value)
    if len(_state_cache) >= 256:
        _state_cache.clear()
    _state_cache[value] = result
    return result


def _check_tracestate(value: bytes) -> bytes | None:
    if len(value) > _MAX_TRACESTATE_INPUT:
        return None
    members: list[bytes] = []
    keys: set[bytes] = set()
    for part in value.split(b","):
        m = _MEMBER.fullmatch(part)
        if m is None:
            if _BLANK.fullmatch(part):
                continue  # empty list-members are allowed
            return None
        key = m.group(1)
        if key in keys:
            return None
        keys.add(key)
        members.append(part.strip(b" \t"))
    if not members or len(members) > MAX_TRACESTATE_MEMBERS:
        return None
    if len(value) <= TRACESTATE_LIMIT:
        return value.strip(b" \t")
    joined = b",".join(members)
    if len(joined) <= TRACESTATE_LIMIT:
        return joined
    members = [m for m in members if len(m) <= _LONG_MEMBER]
    while members and len(b",".join(members)) > TRACESTATE_LIMIT:
        members.pop()
    return b",".join(members) or None


class SpanSink(Protocol):
    """Where the spans of sampled requests go (``piuptime.observe.otlp.OtlpSink``)."""

    url: str

    def put(self, record: SpanRecord) -> None:
        """Queue one request's spans; never blocks, never raises (drops and counts)."""

    async def aclose(self) -> None:
        """Export what is queued and stop."""


class Trace:
    """One request's trace context.

    ``trace_id``, ``span_id`` (the id sent upstream as the parent), ``parent_id`` (the client's
    span, None for a new trace) and ``state`` are lower-case hex / raw ``bytes``. ``attempts``
    is a list only while the request is sampled and a sink is attached; each upstream attempt
    then appends ``(span id, target url, method, path, start, end, status, error type,
    error message)`` (``perf_counter`` times).
    """

    __slots__ = ("attempts", "parent_id", "route_path", "sampled", "span_id", "state", "trace_id")

    trace_id: bytes
    span_id: bytes
    parent_id: bytes | None
    sampled: bool
    state: bytes | None
    attempts: list[Attempt] | None
    route_path: str | None

    def traceparent(self) -> bytes:
        """The ``traceparent`` value sent upstream."""
        return b"00-%s-%s-%s" % (self.trace_id, self.span_id, b"01" if self.sampled else b"00")

    def upstream_fields(self) -> list[tuple[bytes, bytes]]:
        """The trace header fields sent upstream, as name/value pairs."""
        out = [(b"traceparent", self.traceparent())]
        if self.state is not None:
            out.append((b"tracestate", self.state))
        return out

    def attempt(
        self,
        headers: bytes | list[tuple[bytes, bytes]],
        target_url: str,
        method: bytes,
        path: bytes,
        start: float,
        end: float,
        status: int | None,
        error: BaseException | str | None,
    ) -> bytes | list[tuple[bytes, bytes]]:
        """Record one finished upstream attempt (only while ``attempts`` is a list), and return
        ``headers`` re-parented on a fresh span id for the next attempt, so each attempt's
        upstream span is the child of that attempt's CLIENT span."""
        attempts = self.attempts
        if attempts is None:
            return headers
        if error is None:
            kind = message = None
        elif isinstance(error, str):
            kind = message = error
        else:
            kind, message = type(error).__name__, str(error) or type(error).__name__
        old = self.span_id
        attempts.append((old, target_url, method, path, start, end, status, kind, message))
        new = self.span_id = b"%016x" % (getrandbits(64) or 1)
        if isinstance(headers, bytes):
            return headers.replace(b"-%s-" % old, b"-%s-" % new, 1)
        return [
            (b"traceparent", self.traceparent()) if name == b"traceparent" else (name, value)
            for name, value in headers
        ]


# (span id, target url, method, path, start, end, status, error type, error message)
Attempt = tuple[bytes, str, bytes, bytes, float, float, int | None, str | None, str | None]
# (trace, perf_counter → unix-ns offset, start, end (perf_counter), SERVER span name, its
#  attributes, response status)
SpanRecord = tuple[Trace, int, float, float, str, dict[str, Any], int]


_POOL_HEX = 48 * 128  # random hex for 128 new traces (trace id + span id) per refill
_tracers: weakref.WeakSet[Tracer] = weakref.WeakSet()


class Tracer:
    """Makes each request's :class:`Trace`; ``ratio`` (sampling of new traces) may change on
    reload; ``sink`` is set when spans are exported.

    Ids are sliced from a pool of random lower-case hex (``random.randbytes``, refilled every
    128 new traces): one bulk conversion instead of formatting two large integers per request.
    A forked child empties its pool, so parent and child never hand out the same ids (an
    all-zero id has a chance of 2**-128 and is not checked for).
    """

    __slots__ = ("__weakref__", "_hex", "_pos", "config", "ratio", "sink")

    def __init__(self, ratio: float = 0.0, sink: SpanSink | None = None) -> None:
        self.ratio = ratio
        self.sink = sink
        self.config: TracingConfig | None = None
        self._hex = b""
        self._pos = _POOL_HEX
        _tracers.add(self)

    @classmethod
    def from_config(cls, config: TracingConfig | None, metrics: Metrics | None = None) -> Tracer:
        """The tracer of a ``tracing:`` section (None: propagation only, nothing sampled);
        with ``otlp_endpoint``, its export thread is started and its metrics registered."""
        if config is None:
            return cls()
        sink = None
        if config.otlp_endpoint is not None:
            from piuptime.observe.otlp import OtlpSink  # the optional extra

            sink = OtlpSink(config)
            if metrics is not None:
                sink.register_metrics(metrics)
            sink.start()
            log.info("tracing: exporting %g%% of new traces to %s", config.sample * 100, sink.url)
        tracer = cls(config.sample, sink)
        tracer.config = config
        return tracer

    def reconfigure(self, config: TracingConfig | None) -> None:
        """On reload: a new ``sample`` applies at once; the export settings (endpoint,
        headers, batching, ...) stay those the process started with, with a warning."""
        self.ratio = config.sample if config is not None else 0.0
        if _export_settings(config) != _export_settings(self.config):
            log.warning(
                "tracing export settings changed; restart the process to apply them "
                "(the new sample ratio applies now)"
            )

    async def aclose(self) -> None:
        """Send the spans still queued and stop the export thread."""
        sink = self.sink
        if sink is not None:
            await sink.aclose()

    def start(self, traceparent: bytes | None, tracestate: bytes | None) -> Trace:
        """The trace of a request whose ``traceparent``/``tracestate`` values (None: absent;
        several ``tracestate`` fields joined by commas) are given."""
        t = Trace()
        pos = self._pos
        if pos > _POOL_HEX - 48:
            self._hex = hexlify(randbytes(_POOL_HEX // 2))
            pos = 0
        ids = self._hex
        parsed = parse_traceparent(traceparent) if traceparent is not None else None
        if parsed is None:
            t.trace_id = ids[pos : pos + 32]
            pos += 32
            t.parent_id = None
            t.state = None
            ratio = self.ratio
            sampled = t.sampled = ratio >= 1.0 or (ratio > 0.0 and random() < ratio)
        else:
            t.trace_id, t.parent_id, sampled = parsed
            t.sampled = sampled
            t.state = clean_tracestate(tracestate) if tracestate is not None else None
        t.span_id = ids[pos : pos + 16]
        self._pos = pos + 16
        t.attempts = [] if sampled and self.sink is not None else None
        t.route_path = None
        return t

    def from_headers(self, headers: Iterable[tuple[bytes, bytes]]) -> Trace:
        """:meth:`start` from a request's header list (a separate pass: for requests that do
        not go through ``gateway.headers``' own one — WebSocket upgrades, refusals)."""
        traceparent: bytes | None = None
        tracestate: bytes | None = None
        several = False
        for name, value in headers:
            if name == b"traceparent":
                several = traceparent is not None
                traceparent = value
            elif name == b"tracestate":
                tracestate = value if tracestate is None else tracestate + b"," + value
        return self.start(None if several else traceparent, tracestate)

    def request_done(
        self, trace: Trace, req: Request, resp: Responder, route: Any, ctx: Any, attempts: int
    ) -> None:
        """Queue the spans of a finished sampled request (``trace.attempts`` is a list): its
        SERVER span's attributes follow the OpenTelemetry HTTP semantic conventions, plus
        ``piuptime.*`` ones (route, upstream, consumer, attempts, cache status)."""
        sink = self.sink
        if sink is None:
            return
        end = time.perf_counter()
        offset = time.time_ns() - int(end * 1e9)
        method = req.method.decode("latin-1")
        status = resp.status
        attrs: dict[str, Any] = {
            "http.request.method": method,
            "url.path": req.path.decode("latin-1"),
            "url.scheme": "https" if req.tls else "http",
            "network.protocol.version": req.version.decode("latin-1"),
            "network.peer.address": req.client_addr,
            "network.peer.port": req.client_port,
            "client.address": req.client_addr,
            "http.response.status_code": status,
            "http.response.body.size": resp.bytes_sent,
        }
        if req.host:
            address, port = split_host(req.host.decode("latin-1"))
            attrs["server.address"] = address
            if port is not None:
                attrs["server.port"] = port
        for field, value in req.headers:
            if field == b"user-agent":
                attrs["user_agent.original"] = value.decode("latin-1")
                break
        route_path = trace.route_path
        if route is not None:
            attrs["piuptime.route"] = route.name
            upstream = route.upstream
            if ctx is not None:
                upstream = ctx.upstream
                if ctx.match is not None:
                    route_path = ctx.match.spec.path
                if ctx.consumer is not None:
                    attrs["piuptime.consumer"] = ctx.consumer.name
                if ctx.client_ip:
                    attrs["client.address"] = ctx.client_ip
                if ctx.cache is not None:
                    attrs["piuptime.cache"] = ctx.cache
                if ctx.request_id is not None:
                    attrs["piuptime.request_id"] = ctx.request_id
            attrs["piuptime.upstream"] = upstream.name
            attrs["piuptime.attempts"] = attempts
        if route_path:
            attrs["http.route"] = route_path
        if status >= 500:
            attrs["error.type"] = str(status)
        name = f"{method} {route_path}" if route_path else method
        sink.put((trace, offset, req.start_time, end, name, attrs, status))


def split_host(host: str) -> tuple[str, int | None]:
    """``"example.com:8080"`` → ``("example.com", 8080)``; ``"[::1]"`` → ``("::1", None)``."""
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return host, None
        address, rest = host[1:end], host[end + 1 :]
        port = rest[1:] if rest.startswith(":") else ""
    else:
        address, sep, port = host.rpartition(":")
        if not sep:
            address, port = host, ""
    return address, int(port) if port.isascii() and port.isdigit() else None


def _after_fork() -> None:
    for tracer in list(_tracers):
        tracer._pos = _POOL_HEX  # a fresh pool from the child's own (reseeded) generator


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _export_settings(config: TracingConfig | None) -> object:
    if config is None or config.otlp_endpoint is None:
        return None
    return config.model_copy(update={"sample": 0.0})
