"""Header rewriting between client and upstream: hop-by-hop removal and forwarding headers.

RFC 9110 §7.6.1: a proxy removes ``Connection`` and every header it names, plus the classic
hop-by-hop set (``Keep-Alive``, ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``,
``Proxy-*``). Framing (``Content-Length``/``Transfer-Encoding``) is re-done by the http1 layer on
each side, so it is dropped here too. ``Upgrade`` survives only while tunnelling a protocol switch.
"""

from __future__ import annotations

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
_UP_SPECIAL = HOP_BY_HOP | _SET_UPSTREAM | {b"x-forwarded-for", b"via"}
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


def upstream_request_headers(
    headers: Headers,
    *,
    host: bytes,
    client_ip: bytes,
    proto: bytes,
    original_host: bytes,
    via: bytes,
    upgrade: bytes | None = None,
) -> Headers:
    """The header list sent upstream for one request.

    ``X-Forwarded-For`` gets the client address appended to whatever the client sent (nginx's
    ``$proxy_add_x_forwarded_for``); ``X-Forwarded-Proto``/``-Host`` are set by us, since the
    gateway is the edge that saw the scheme and host; ``Via`` gets our hop appended.
    """
    out: Headers = []
    append = out.append
    named: frozenset[bytes] | set[bytes] | None = None
    xff = b""
    prior_via = b""
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
        # else: hop-by-hop or set by us: dropped
    if named:
        out = [h for h in out if h[0] not in named]
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


def downstream_response_headers(headers: Headers, *, via: bytes, keep_length: bool) -> Headers:
    """Upstream response headers cleaned for the client; ``content-length`` kept when the body
    is passed through unchanged (``keep_length``), so the client sees the same framing length."""
    out: Headers = []
    append = out.append
    named: frozenset[bytes] | set[bytes] | None = None
    prior_via = b""
    length = b""
    for field in headers:
        name = field[0]
        if name not in _DOWN_SPECIAL:  # one set look-up for an ordinary field
            if name[:6] != b"proxy-":
                append(field)
            continue
        if name == b"connection":
            value = field[1]
            named = connection_tokens(value) if named is None else named | connection_tokens(value)
        elif name == b"content-length":
            length = field[1]
        elif name == b"via":
            prior_via = field[1] if not prior_via else prior_via + b", " + field[1]
        # else: hop-by-hop or replaced by us: dropped
    if named:
        out = [h for h in out if h[0] not in named]
    if keep_length and length:
        out.append((b"content-length", length))
    out.append((b"via", prior_via + b", " + via if prior_via else via))
    return out


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
