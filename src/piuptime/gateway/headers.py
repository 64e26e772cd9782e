"""Header rewriting between client and upstream: hop-by-hop removal and forwarding headers.

RFC 9110 §7.6.1: a proxy removes ``Connection`` and every header it names, plus the classic
hop-by-hop set (``Keep-Alive``, ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``,
``Proxy-*``). Framing (``Content-Length``/``Transfer-Encoding``) is re-done by the http1 layer on
each side, so it is dropped here too. ``Upgrade`` survives only while tunnelling a protocol switch.

W3C ``traceparent``/``tracestate`` are picked out in the same pass: the proxy's
``traced_request_fields`` continues or starts the trace (``piuptime.observe.tracing``) and sends
the gateway's own ``traceparent``; the other helpers pass them on as the client sent them.
"""

from __future__ import annotations

from piuptime.observe.tracing import Trace, Tracer

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Headers the gateway sets itself on the way up (never forwarded as the client sent them).
_SET_UPSTREAM = frozenset(
    {
        b"host",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"content-length",
        b"expect",
    }
)
# Upstream response headers replaced by the gateway's own.
_SET_DOWNSTREAM = frozenset({b"content-length", b"date"})

Headers = list[tuple[bytes, bytes]]

# Every name either rewrite loop treats specially (all else is copied, unless ``proxy-*``).
_UP_SPECIAL = (
    HOP_BY_HOP | _SET_UPSTREAM | {b"x-forwarded-for", b"via", b"traceparent", b"tracestate"}
)
_DOWN_SPECIAL = HOP_BY_HOP | _SET_DOWNSTREAM | {b"via"}


_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close", b"upgrade"})
_NOTHING: frozenset[bytes] = frozenset()


def connection_tokens(value: bytes) -> frozenset[bytes] | set[bytes]:
    """Lower-cased header names listed in a Connection header value.

    The usual values (``keep-alive``, ``close``) name no other header: answered without parsing.
    """
    if value in _PLAIN_CONNECTION:
        return _NOTHING
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


def _forwarded(headers: Headers) -> tuple[Headers, bytes, bytes, Headers | None]:
    """Split the client's fields: those that go upstream unchanged, the ``X-Forwarded-For``
    and ``Via`` values the client sent (joined), which the gateway extends, and its trace
    context fields (None when it sent none)."""
    out: Headers = []
    append = out.append
    named: frozenset[bytes] | set[bytes] | None = None
    xff = b""
    prior_via = b""
    trace: Headers | None = None
    for field in headers:
        name = field[0]
        if name not in _UP_SPECIAL:  # one set look-up for an ordinary field
            if name[:6] != b"proxy-":
                append(field)
            continue
        if name == b"connection":
            value = field[1]
            named = connection_tokens(value) if named is None else named | connection_tokens(value)
        elif name == b"x-forwarded-for":
            xff = field[1] if not xff else xff + b", " + field[1]
        elif name == b"via":
            prior_via = field[1] if not prior_via else prior_via + b", " + field[1]
        elif name == b"traceparent" or name == b"tracestate":
            if trace is None:
                trace = [field]
            else:
                trace.append(field)
        # else: hop-by-hop or set by us: dropped
    if named:
        out = [h for h in out if h[0] not in named]
    return out, xff, prior_via, trace


def upstream_request_headers(
    headers: Headers,
    *,
    host: bytes,
    client_ip: bytes,
    proto: bytes,
    original_host: bytes,
    via: bytes,
    upgrade: bytes | None = None,
    trace: Trace | None = None,
) -> Headers:
    """The header list sent upstream for one request.

    ``X-Forwarded-For`` gets the client address appended to whatever the client sent (nginx's
    ``$proxy_add_x_forwarded_for``); ``X-Forwarded-Proto``/``-Host`` are set by us, since the
    gateway is the edge that saw the scheme and host; ``Via`` gets our hop appended. With a
    ``trace``, its ``traceparent``/``tracestate`` replace the client's.
    """
    out, xff, prior_via, trace_fields = _forwarded(headers)
    if trace is not None:
        out.extend(trace.upstream_fields())
    elif trace_fields is not None:
        out.extend(trace_fields)
    out.append((b"host", host))
    out.append((b"x-forwarded-for", xff + b", " + client_ip if xff else client_ip))
    out.append((b"x-forwarded-proto", proto))
    if original_host:
        out.append((b"x-forwarded-host", original_host))
    out.append((b"via", prior_via + b", " + via if prior_via else via))
    if upgrade is not None:
        out.append((b"connection", b"upgrade"))
        out.append((b"upgrade", upgrade))
    return out


# The gateway's own request fields, formatted in one operation.
_UP_TAIL = (
    b"host: %s\r\nx-forwarded-for: %s\r\nx-forwarded-proto: %s\r\n"
    b"x-forwarded-host: %s\r\nvia: %s\r\n"
)
_UP_TAIL_NO_HOST = b"host: %s\r\nx-forwarded-for: %s\r\nx-forwarded-proto: %s\r\nvia: %s\r\n"


def upstream_request_fields(
    headers: Headers,
    *,
    host: bytes,
    client_ip: bytes,
    proto: bytes,
    original_host: bytes,
    via: bytes,
) -> bytes:
    """The same fields as ``upstream_request_headers`` (no upgrade), already serialised as
    ``name: value\r\n`` lines: what ``Pool.send_nowait`` and ``Pool.request`` take as bytes.
    One formatting operation for the gateway's own fields, instead of a tuple each."""
    out, xff, prior_via, trace_fields = _forwarded(headers)
    if trace_fields is not None:
        out.extend(trace_fields)
    fields = b"".join([b"%s: %s\r\n" % f for f in out]) if out else b""
    xff = xff + b", " + client_ip if xff else client_ip
    if prior_via:
        via = prior_via + b", " + via
    if original_host:
        return fields + _UP_TAIL % (host, xff, proto, original_host, via)
    return fields + _UP_TAIL_NO_HOST % (host, xff, proto, via)


_UP_TAIL_TRACED = _UP_TAIL + b"traceparent: 00-%s-%s-%s\r\n"
_UP_TAIL_NO_HOST_TRACED = _UP_TAIL_NO_HOST + b"traceparent: 00-%s-%s-%s\r\n"
_SAMPLED = b"01"
_NOT_SAMPLED = b"00"


def traced_request_fields(
    headers: Headers,
    *,
    host: bytes,
    client_ip: bytes,
    proto: bytes,
    original_host: bytes,
    via: bytes,
    tracer: Tracer,
) -> tuple[bytes, Trace]:
    """``upstream_request_fields`` for the proxied request itself: the client's trace context
    (found in the same pass) is continued, or a trace started, by ``tracer``, and the gateway's
    ``traceparent`` (and the client's ``tracestate``, when valid) sent instead."""
    out, xff, prior_via, trace_fields = _forwarded(headers)
    trace = tracer.start(None, None) if trace_fields is None else tracer.from_headers(trace_fields)
    fields = b"".join([b"%s: %s\r\n" % f for f in out]) if out else b""
    xff = xff + b", " + client_ip if xff else client_ip
    if prior_via:
        via = prior_via + b", " + via
    flags = _SAMPLED if trace.sampled else _NOT_SAMPLED
    if original_host:
        fields += _UP_TAIL_TRACED % (
            host,
            xff,
            proto,
            original_host,
            via,
            trace.trace_id,
            trace.span_id,
            flags,
        )
    else:
        fields += _UP_TAIL_NO_HOST_TRACED % (
            host,
            xff,
            proto,
            via,
            trace.trace_id,
            trace.span_id,
            flags,
        )
    if trace.state is not None:
        fields += b"tracestate: %s\r\n" % trace.state
    return fields, trace


def downstream_response_fields(headers: Headers, *, via: bytes, length: int | None) -> bytes:
    """Upstream response headers cleaned for the client, serialised as ``name: value\r\n``
    lines for ``Responder.start_fields``. ``length``: the ``content-length`` to announce (the
    upstream's, when its body is passed through unchanged), or None for a stream."""
    out: list[bytes] = []
    append = out.append
    named: frozenset[bytes] | set[bytes] | None = None
    prior_via = b""
    for field in headers:
        name = field[0]
        if name not in _DOWN_SPECIAL:  # one set look-up for an ordinary field
            if name[:6] != b"proxy-":
                append(b"%s: %s\r\n" % field)
            continue
        if name == b"connection":
            value = field[1]
            named = connection_tokens(value) if named is None else named | connection_tokens(value)
        elif name == b"via":
            prior_via = field[1] if not prior_via else prior_via + b", " + field[1]
        # else: hop-by-hop, framing or replaced by us: dropped
    if named:
        out = [
            b"%s: %s\r\n" % h
            for h in headers
            if h[0] not in _DOWN_SPECIAL and h[0] not in named and h[0][:6] != b"proxy-"
        ]
    if prior_via:
        via = prior_via + b", " + via
    if length is not None:
        return b"".join(out) + b"content-length: %d\r\nvia: %s\r\n" % (length, via)
    return b"".join(out) + b"via: %s\r\n" % via


def tunnel_response_headers(headers: Headers, *, via: bytes) -> Headers:
    """Headers of a 101 answer passed to the client: Upgrade/Connection kept, framing dropped."""
    out: Headers = []
    for name, value in headers:
        if name in (b"content-length", b"transfer-encoding", b"keep-alive", b"date"):
            continue
        if name.startswith(b"proxy-"):
            continue
        out.append((name, value))
    out.append((b"via", via))
    return out
