"""Hop-by-hop removal and forwarding headers (RFC 9110 §7.6)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from piuptime.gateway.headers import (
    downstream_response_fields,
    tunnel_response_headers,
    upstream_request_fields,
    upstream_request_headers,
)


def fields(raw: bytes) -> list[tuple[bytes, bytes]]:
    """Parse serialised ``name: value\\r\\n`` lines back into pairs."""
    assert raw.endswith(b"\r\n") or raw == b""
    out = []
    for line in raw.split(b"\r\n")[:-1]:
        name, sep, value = line.partition(b": ")
        assert sep, line
        out.append((name, value))
    return out


def up(headers: list[tuple[bytes, bytes]], **kw: object) -> dict[bytes, list[bytes]]:
    args: dict[str, object] = {
        "host": b"devices",
        "client_ip": b"10.0.0.9",
        "proto": b"http",
        "original_host": b"gw.example",
        "via": b"1.1 piuptime",
    }
    args.update(kw)
    out: dict[bytes, list[bytes]] = {}
    for k, v in upstream_request_headers(headers, **args):  # type: ignore[arg-type]
        out.setdefault(k, []).append(v)
    return out


def test_hop_by_hop_and_connection_named_headers_are_removed() -> None:
    h = up(
        [
            (b"connection", b"keep-alive, X-Secret , close"),
            (b"keep-alive", b"timeout=5"),
            (b"te", b"trailers"),
            (b"trailer", b"x"),
            (b"transfer-encoding", b"chunked"),
            (b"upgrade", b"h2c"),
            (b"proxy-authorization", b"Basic xx"),
            (b"proxy-foo", b"1"),
            (b"x-secret", b"s"),
            (b"content-length", b"3"),
            (b"expect", b"100-continue"),
            (b"accept", b"*/*"),
        ]
    )
    for gone in (
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-foo",
        b"x-secret",
        b"content-length",
        b"expect",
    ):
        assert gone not in h, gone
    assert h[b"accept"] == [b"*/*"]


def test_forwarding_headers() -> None:
    h = up(
        [
            (b"x-forwarded-for", b"1.1.1.1"),
            (b"x-forwarded-for", b"2.2.2.2"),
            (b"via", b"1.0 edge"),
            (b"host", b"client-sent"),
            (b"x-forwarded-proto", b"ftp"),
        ]
    )
    assert h[b"x-forwarded-for"] == [b"1.1.1.1, 2.2.2.2, 10.0.0.9"]
    assert h[b"x-forwarded-proto"] == [b"http"]
    assert h[b"x-forwarded-host"] == [b"gw.example"]
    assert h[b"host"] == [b"devices"]
    assert h[b"via"] == [b"1.0 edge, 1.1 piuptime"]


def test_first_hop_and_upgrade() -> None:
    h = up(
        [(b"upgrade", b"websocket"), (b"connection", b"Upgrade")],
        upgrade=b"websocket",
        proto=b"https",
    )
    assert h[b"x-forwarded-for"] == [b"10.0.0.9"]
    assert h[b"x-forwarded-proto"] == [b"https"]
    assert h[b"upgrade"] == [b"websocket"]
    assert h[b"connection"] == [b"upgrade"]


def test_response_headers() -> None:
    out = downstream_response_fields(
        [
            (b"content-length", b"5"),
            (b"date", b"x"),
            (b"connection", b"close, x-hop"),
            (b"x-hop", b"1"),
            (b"transfer-encoding", b"chunked"),
            (b"set-cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
            (b"proxy-thing", b"p"),
            (b"server", b"device"),
        ],
        via=b"1.1 piuptime",
        length=5,
    )
    assert fields(out) == [
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
        (b"server", b"device"),
        (b"content-length", b"5"),
        (b"via", b"1.1 piuptime"),
    ]
    chunked = downstream_response_fields(
        [(b"transfer-encoding", b"chunked"), (b"via", b"1.0 dev")], via=b"v", length=None
    )
    assert fields(chunked) == [(b"via", b"1.0 dev, v")]


_names = st.sampled_from(
    [
        b"accept",
        b"connection",
        b"x-forwarded-for",
        b"via",
        b"host",
        b"proxy-authorization",
        b"te",
        b"x-secret",
        b"content-length",
        b"user-agent",
    ]
)
_values = st.sampled_from([b"1", b"x-secret", b"close", b"keep-alive, X-Secret", b"10.1.1.1"])


@given(st.lists(st.tuples(_names, _values), max_size=8), st.sampled_from([b"", b"gw.example"]))
def test_serialised_request_fields_equal_the_header_list(
    headers: list[tuple[bytes, bytes]], original_host: bytes
) -> None:
    """The bytes form the fast path sends is exactly the list form, serialised."""
    args = {
        "host": b"devices",
        "client_ip": b"10.0.0.9",
        "proto": b"https",
        "original_host": original_host,
        "via": b"1.1 piuptime",
    }
    as_list = upstream_request_headers(headers, **args)  # type: ignore[arg-type]
    as_bytes = upstream_request_fields(headers, **args)  # type: ignore[arg-type]
    assert fields(as_bytes) == as_list


def test_tunnel_headers_keep_upgrade() -> None:
    out = tunnel_response_headers(
        [
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", b"abc"),
            (b"content-length", b"0"),
        ],
        via=b"v",
    )
    assert (b"upgrade", b"websocket") in out and (b"sec-websocket-accept", b"abc") in out
    assert all(k != b"content-length" for k, _ in out)
