"""The plugin pipeline and the transform plugins, through the real gateway over sockets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support import Upstream, fetch, gateway_yaml, start_app


@pytest.fixture
async def up() -> AsyncIterator[Upstream]:
    server = await Upstream(name="u0").start()
    yield server
    await server.stop()


def cfg(up: Upstream, routes: str, extra: str = "", gateway: str = "") -> str:
    return gateway_yaml({"main": [up.port]}, routes, extra, gateway)


async def test_request_id_made_propagated_echoed_and_logged(up: Upstream, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    text = cfg(
        up,
        """\
  - name: r
    match: {path: /}
    upstream: main
    plugins: {request_id: {}}
""",
    ).replace("access_log: {path: off}", f"access_log: {{path: {log}}}")
    app, port = await start_app(text)
    try:
        r = await fetch(port, "/a")
        made = r.header(b"x-request-id")
        assert made is not None and len(made) == 32
        assert dict(up.seen[-1].headers)[b"x-request-id"] == made
        r = await fetch(port, "/b", headers={"X-Request-ID": "abc-123"})
        assert r.header(b"x-request-id") == b"abc-123"
        assert dict(up.seen[-1].headers)[b"x-request-id"] == b"abc-123"
        r = await fetch(port, "/c", headers={"X-Request-ID": "has space"})
        replaced = r.header(b"x-request-id")
        assert replaced not in (None, b"has space")
        assert dict(up.seen[-1].headers)[b"x-request-id"] == replaced
    finally:
        await app.stop()
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["request_id"] for x in lines] == [made.decode(), "abc-123", replaced.decode()]


CORS = """\
  - name: r
    match: {path: /}
    upstream: main
    plugins:
      cors:
        allow_origins: ["https://app.example.com", "https://*.example.org"]
        allow_methods: [GET, POST]
        expose_headers: [X-Total]
        allow_credentials: true
        max_age: 1h
"""


async def test_cors_preflight_answered_at_the_gateway(up: Upstream) -> None:
    app, port = await start_app(cfg(up, CORS))
    try:
        r = await fetch(
            port,
            "/items",
            method="OPTIONS",
            headers={
                "Origin": "https://app.example.com",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, x-token",
            },
        )
        assert r.status == 204
        assert r.header(b"access-control-allow-origin") == b"https://app.example.com"
        assert r.header(b"access-control-allow-methods") == b"GET, POST"
        assert r.header(b"access-control-allow-headers") == b"content-type, x-token"
        assert r.header(b"access-control-allow-credentials") == b"true"
        assert r.header(b"access-control-max-age") == b"3600"
        assert up.seen == []  # never reached the device
        r = await fetch(
            port,
            "/items",
            method="OPTIONS",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
        )
        assert r.status == 403 and up.seen == []
        # a wildcard subdomain origin, on an actual request
        r = await fetch(port, "/items", headers={"Origin": "https://a.b.example.org"})
        assert r.status == 200
        assert r.header(b"access-control-allow-origin") == b"https://a.b.example.org"
        assert r.header(b"access-control-expose-headers") == b"X-Total"
        assert r.header(b"vary") == b"Origin"
        # an origin not allowed gets the answer without CORS headers (the browser blocks it)
        r = await fetch(port, "/items", headers={"Origin": "https://example.org.evil.com"})
        assert r.status == 200 and r.header(b"access-control-allow-origin") is None
    finally:
        await app.stop()


async def test_ip_restriction_deny_allow_and_trusted_proxies(up: Upstream) -> None:
    routes = """\
  - name: denied
    match: {path: /denied}
    upstream: main
    plugins: {ip_restriction: {deny: [127.0.0.1]}}
  - name: allowed
    match: {path: /allowed}
    upstream: main
    plugins: {ip_restriction: {allow: [127.0.0.0/8, "::1"]}}
  - name: office
    match: {path: /office}
    upstream: main
    plugins: {ip_restriction: {allow: [10.1.0.0/16], status: 404, message: nothing here}}
"""
    app, port = await start_app(cfg(up, routes, gateway="  trusted_proxies: [127.0.0.1]"))
    try:
        r = await fetch(port, "/denied")
        assert r.status == 403 and json.loads(r.body)["error"]["code"] == "ip_restricted"
        assert (await fetch(port, "/allowed")).status == 200
        # behind a trusted proxy (127.0.0.1) the client is the right-most untrusted hop
        r = await fetch(port, "/office", headers={"X-Forwarded-For": "10.1.2.3"})
        assert r.status == 200
        r = await fetch(port, "/office", headers={"X-Forwarded-For": "10.1.2.3, 192.0.2.1"})
        assert r.status == 404 and json.loads(r.body)["error"]["message"] == "nothing here"
        r = await fetch(port, "/office", headers={"X-Forwarded-For": "not-an-ip"})
        assert r.status == 404
        assert len(up.seen) == 2
    finally:
        await app.stop()


async def test_ip_restriction_ignores_forwarded_for_from_untrusted_peers(up: Upstream) -> None:
    routes = """\
  - name: office
    match: {path: /office}
    upstream: main
    plugins: {ip_restriction: {allow: [10.1.0.0/16]}}
"""
    app, port = await start_app(cfg(up, routes))
    try:
        r = await fetch(port, "/office", headers={"X-Forwarded-For": "10.1.2.3"})
        assert r.status == 403
    finally:
        await app.stop()


async def test_request_size_per_route(up: Upstream) -> None:
    routes = """\
  - name: tiny
    match: {path: /tiny}
    upstream: main
    plugins: {request_size: {max_bytes: 8}}
  - name: other
    match: {path: /other}
    upstream: main
"""
    app, port = await start_app(cfg(up, routes))
    try:
        assert (await fetch(port, "/tiny", method="POST", body=b"12345678")).status == 200
        r = await fetch(port, "/tiny", method="POST", body=b"123456789")
        assert r.status == 413
        assert (await fetch(port, "/other", method="POST", body=b"x" * 100)).status == 200
    finally:
        await app.stop()


async def test_header_transforms_both_ways(up: Upstream) -> None:
    routes = """\
  - name: r
    match: {path: /}
    upstream: main
    plugins:
      request_transformer:
        add: {X-Added: "1"}
        set: {X-Device: pi-7}
        remove: [X-Secret]
      response_transformer:
        set: {Server: piuptime}
        add: {X-Frame-Options: DENY}
        remove: [X-Powered-By]
"""

    async def handler(seen, writer) -> None:  # type: ignore[no-untyped-def]
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nserver: devicefw/1\r\n"
            b"x-powered-by: php\r\n\r\nok"
        )

    up.handler = handler
    app, port = await start_app(cfg(up, routes))
    try:
        r = await fetch(
            port, "/x", headers={"X-Secret": "s", "X-Device": "spoofed", "X-Added": "0"}
        )
        assert r.status == 200 and r.body == b"ok"
        assert r.header(b"server") == b"piuptime"
        assert r.header(b"x-frame-options") == b"DENY"
        assert r.header(b"x-powered-by") is None
        seen = up.seen[-1].headers
        assert [v for n, v in seen if n == b"x-device"] == [b"pi-7"]
        assert [v for n, v in seen if n == b"x-added"] == [b"0", b"1"]
        assert not any(n == b"x-secret" for n, _ in seen)
    finally:
        await app.stop()


async def test_proxy_rewrite_with_captures(up: Upstream) -> None:
    routes = """\
  - name: r
    match: {path: /api/}
    upstream: main
    plugins:
      proxy_rewrite: {regex: "^/api/v(?P<ver>[0-9]+)/(.*)$", replace: "/$ver/$2", host: devices.lan}
"""
    app, port = await start_app(cfg(up, routes))
    try:
        await fetch(port, "/api/v2/sensors/7?x=1")
        seen = up.seen[-1]
        assert seen.path == b"/2/sensors/7?x=1"
        assert dict(seen.headers)[b"host"] == b"devices.lan"
        assert dict(seen.headers)[b"x-forwarded-host"] == b"test"
        await fetch(port, "/api/other")  # no match: the path goes as it is
        assert up.seen[-1].path == b"/api/other"
    finally:
        await app.stop()


async def test_global_plugins_route_override_and_off_switch(up: Upstream) -> None:
    routes = """\
  - name: plain
    match: {path: /plain}
    upstream: main
  - name: own
    match: {path: /own}
    upstream: main
    plugins: {response_transformer: {add: {X-Where: route}}}
  - name: off
    match: {path: /off}
    upstream: main
    plugins: {response_transformer: false, request_id: false}
"""
    extra = """\
plugins:
  request_id: {}
  response_transformer: {add: {X-Where: global}}
"""
    app, port = await start_app(cfg(up, routes, extra))
    try:
        r = await fetch(port, "/plain")
        assert r.header(b"x-where") == b"global" and r.header(b"x-request-id") is not None
        r = await fetch(port, "/own")
        assert r.header_all(b"x-where") == [b"route"] and r.header(b"x-request-id") is not None
        r = await fetch(port, "/off")
        assert r.header(b"x-where") is None and r.header(b"x-request-id") is None
    finally:
        await app.stop()


async def test_refusals_and_gateway_errors_pass_the_response_phase(up: Upstream) -> None:
    routes = """\
  - name: denied
    match: {path: /denied}
    upstream: main
    plugins: {ip_restriction: {deny: [0.0.0.0/0]}, request_id: {}}
  - name: dead
    match: {path: /dead}
    upstream: dead
    plugins: {request_id: {}, response_transformer: {add: {X-Seen: "1"}}}
"""
    text = gateway_yaml({"main": [up.port], "dead": [1]}, routes)
    app, port = await start_app(text)
    try:
        r = await fetch(port, "/denied")
        assert r.status == 403 and r.header(b"x-request-id") is not None
        r = await fetch(port, "/dead")
        assert r.status == 502 and r.header(b"x-request-id") is not None
        assert r.header(b"x-seen") == b"1"
        assert json.loads(r.body)["error"]["code"] == "upstream_unreachable"
    finally:
        await app.stop()


async def test_fault_injection_is_a_plugin_with_abort_and_delay(up: Upstream) -> None:
    routes = """\
  - name: abort
    match: {path: /abort}
    upstream: main
    plugins: {fault_injection: {abort: {status: 418, percent: 100%}}, request_id: {}}
  - name: delay
    match: {path: /delay}
    upstream: main
    plugins: {fault_injection: {delay: {duration: 150ms, percent: 100%}}}
"""
    app, port = await start_app(cfg(up, routes))
    try:
        r = await fetch(port, "/abort")
        assert r.status == 418 and r.header(b"x-request-id") is not None and up.seen == []
        import time

        t0 = time.monotonic()
        r = await fetch(port, "/delay")
        assert r.status == 200 and time.monotonic() - t0 >= 0.14
    finally:
        await app.stop()
