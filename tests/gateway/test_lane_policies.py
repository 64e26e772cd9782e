"""The fast lane on routes with key_auth and a memory rate_limit (gateway/lane.py, _lane.c).

The lane takes only the success path (a known key, a request under its limit); everything
else is answered by the Python path. Each test checks the outcome against the Python path
(``fast_lane: false``) and which path served it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from piuptime.gateway import lane as lane_module
from tests.support import RawClient, Reply, SeenRequest, Upstream, start_app, wait_until

# (tests/gateway/test_lane.py fails, in CI, when the extension is not built)
pytestmark = pytest.mark.skipif(
    not lane_module.available(), reason="the fast lane's C extension is not built"
)

KEY = "k-3f9a1c"
# keys whose lengths sit on SHA-256's padding boundaries (55/56 bytes: one or two blocks)
ODD_KEYS = ["x" * n for n in (1, 55, 56, 63, 64, 65, 119, 120, 200)]


def config(
    port: int,
    *,
    fast_lane: bool = True,
    key_auth: str = "{}",
    rate_limit: str | None = "{limit: 1000, window: 1m, per: consumer}",
    access_log: str = "off",
    extra_plugins: str = "",
) -> str:
    keys = ", ".join(json.dumps(k) for k in [KEY, *ODD_KEYS])
    lines = [
        "gateway:",
        '  listen: ["127.0.0.1:0"]',
        f"  access_log: {{path: {access_log}}}",
        f"  fast_lane: {'true' if fast_lane else 'false'}",
        "upstreams:",
        "  devs:",
        f'    targets: [{{url: "http://127.0.0.1:{port}"}}]',
        "consumers:",
        f"  kitchen: {{keys: [{keys}], groups: [apps, ops]}}",
        "plugins:",
        f"  key_auth: {key_auth}",
    ]
    if rate_limit is not None:
        lines.append(f"  rate_limit: {rate_limit}")
    if extra_plugins:
        lines.append(f"  {extra_plugins}")
    lines += ["routes:", "  - {name: r, match: {path: /}, upstream: devs}"]
    return "\n".join(lines) + "\n"


@pytest.fixture
async def up() -> AsyncIterator[Upstream]:
    u = await Upstream("dev").start()
    yield u
    await u.stop()


async def ask(port: int, path: str, headers: dict[str, str] | None = None) -> Reply:
    c = await RawClient.connect(port)
    try:
        return await c.request("GET", path, headers=headers)
    finally:
        await c.close()


def served(app: object) -> tuple[int, int]:
    lane = app.lanes[0]  # type: ignore[attr-defined]
    return lane.requests, lane.handovers


def upstream_fields(seen: SeenRequest) -> list[tuple[bytes, bytes]]:
    """What the upstream got, without the per-request trace context."""
    return [(n, v) for n, v in seen.headers if n != b"traceparent"]


REQUESTS = [
    ("/a?x=1", {"apikey": KEY}),
    ("/a?x=1&apikey=" + KEY + "&y=2", {}),
    ("/b?apikey=" + KEY, {}),
    ("/c", {"Authorization": "Bearer " + KEY}),
    ("/d", {"apikey": KEY, "X-Forwarded-For": "10.0.0.7"}),
]


@pytest.mark.parametrize(("path", "headers"), REQUESTS)
async def test_a_known_key_takes_the_lane_and_matches_the_python_path(
    up: Upstream, path: str, headers: dict[str, str]
) -> None:
    got: dict[bool, tuple[Reply, SeenRequest]] = {}
    for fast in (True, False):
        app, port = await start_app(config(up.port, fast_lane=fast))
        try:
            up.seen.clear()
            r = await ask(port, path, headers)
            assert r.status == 200, r.body
            got[fast] = (r, up.seen[-1])
            if fast:
                assert served(app) == (1, 0)
            else:
                assert app.lanes == []
        finally:
            await app.stop()
    (lane_reply, lane_seen), (py_reply, py_seen) = got[True], got[False]
    # the key is hidden upstream (hide_credentials), the consumer told, the rest the same
    assert lane_seen.path == py_seen.path
    assert upstream_fields(lane_seen) == upstream_fields(py_seen)
    assert KEY.encode() not in lane_seen.path
    assert all(KEY.encode() not in v for _, v in lane_seen.headers)
    assert (b"x-consumer-username", b"kitchen") in lane_seen.headers
    assert (b"x-consumer-groups", b"apps, ops") in lane_seen.headers
    # the client gets the same answer, rate-limit fields included
    assert [h for h in lane_reply.headers if h[0] != b"date"] == [
        h for h in py_reply.headers if h[0] != b"date"
    ]
    assert lane_reply.header(b"ratelimit-limit") == b"1000"
    assert lane_reply.body == py_reply.body


async def test_keys_on_every_sha256_padding_boundary(up: Upstream) -> None:
    """The lane's own SHA-256 agrees with hashlib on keys of 1..200 bytes."""
    app, port = await start_app(config(up.port))
    try:
        for key in ODD_KEYS:
            r = await ask(port, "/", {"apikey": key})
            assert r.status == 200, (len(key), r.body)
        assert served(app) == (len(ODD_KEYS), 0)
        # and one byte off, on the same boundaries: unknown (answered 401 by the Python path)
        for key in ODD_KEYS[1:4]:
            assert (await ask(port, "/", {"apikey": key[:-1] + "y"})).status == 401
        assert served(app) == (len(ODD_KEYS), 3)  # one connection each
    finally:
        await app.stop()


@pytest.mark.parametrize(
    ("headers", "path", "status"),
    [
        ({}, "/", 401),  # no key
        ({"apikey": "wrong"}, "/", 401),  # an unknown key
        ({"apikey": KEY[:-1]}, "/", 401),
        ({"Authorization": "Basic Zm9vOmJhcg=="}, "/", 401),
        ({}, "/?apikey=" + KEY.replace("-", "%2D"), 200),  # encoded: decoded by the Python path
        ({"apikey": KEY, "X-Consumer-Username": "admin"}, "/", 200),  # spoofed: stripped
    ],
)
async def test_everything_else_is_answered_by_the_python_path(
    up: Upstream, headers: dict[str, str], path: str, status: int
) -> None:
    app, port = await start_app(config(up.port))
    try:
        r = await ask(port, path, headers)
        assert r.status == status, r.body
        assert served(app) == (0, 1)
        if status == 401:
            assert r.header(b"www-authenticate") is not None
            assert json.loads(r.body)["error"]["code"] == "invalid_credentials" or (
                json.loads(r.body)["error"]["status"] == 401
            )
            assert up.seen == []
        else:
            names = [v for n, v in up.seen[-1].headers if n == b"x-consumer-username"]
            assert names == [b"kitchen"]
    finally:
        await app.stop()


async def test_the_limit_is_shared_with_the_python_path_and_refused_there(up: Upstream) -> None:
    app, port = await start_app(config(up.port, rate_limit="{limit: 5, window: 1m, per: consumer}"))
    try:
        statuses = []
        for _ in range(4):
            statuses.append((await ask(port, "/", {"apikey": KEY})).status)
        # one through the Python path (a chunked body makes it hand over), counted the same
        c = await RawClient.connect(port)
        try:
            await c.send(
                b"POST / HTTP/1.1\r\nHost: x\r\napikey: " + KEY.encode() + b"\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
            )
            statuses.append((await c.read_response()).status)
        finally:
            await c.close()
        refused = await ask(port, "/", {"apikey": KEY})
        assert statuses == [200] * 5
        assert refused.status == 429
        assert refused.header(b"retry-after") is not None
        assert refused.header(b"ratelimit-remaining") == b"0"
        lane = app.lanes[0]
        assert lane.requests == 4 and lane.handovers == 2
        assert len(up.seen) == 5  # the refused request never went upstream
    finally:
        await app.stop()


async def test_several_limits_or_other_plugins_keep_the_route_off_the_lane(up: Upstream) -> None:
    for text in (
        config(up.port, rate_limit="{limits: [{limit: 10, window: 1s}, {limit: 100, window: 1m}]}"),
        config(up.port, extra_plugins='ip_restriction: {allow: ["127.0.0.0/8"]}'),
        config(up.port, rate_limit="{limit: 10, window: 1m, per: 'header:x-user'}"),
    ):
        app, port = await start_app(text)
        try:
            r = await ask(port, "/", {"apikey": KEY, "x-user": "u"})
            assert r.status == 200, r.body
            assert served(app) == (0, 1)
        finally:
            await app.stop()


async def test_the_access_log_lines_match_the_python_path(up: Upstream, tmp_path: Path) -> None:
    lines: dict[bool, list[dict[str, object]]] = {}
    for fast in (True, False):
        log = tmp_path / f"access-{fast}.log"
        app, port = await start_app(config(up.port, fast_lane=fast, access_log=str(log)))
        try:
            await ask(port, "/caf%C3%A9/a'b?q=1", {"apikey": KEY, "X-Request-ID": 'a"b\\c\xe9'})
            await ask(port, "/x", {"apikey": KEY})
            await ask(port, "/x", {"apikey": "nope"})
        finally:
            await app.stop()  # flushes the log
        lines[fast] = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines[True]) == len(lines[False]) == 3
    # the client's request id (é sent as UTF-8), read as Latin-1 and JSON-escaped, on both paths
    assert lines[True][0]["request_id"] == lines[False][0]["request_id"] == 'a"b\\c\xc3\xa9'
    assert lines[True][0]["path"] == "/caf%C3%A9/a'b"
    assert lines[True][0]["consumer"] == "kitchen"
    volatile = ("time", "request_id", "trace_id", "total_ms", "upstream_ms", "gateway_ms")
    for lane_entry, py_entry in zip(lines[True], lines[False], strict=True):
        assert list(lane_entry) == list(py_entry)  # the same fields in the same order
        for name in volatile:
            assert type(lane_entry.pop(name)) is type(py_entry.pop(name))
        assert lane_entry == py_entry


async def test_metrics_count_the_lane_by_consumer(up: Upstream) -> None:
    app, port = await start_app(config(up.port))
    try:
        for _ in range(3):
            assert (await ask(port, "/", {"apikey": KEY})).status == 200
        await wait_until(lambda: served(app)[0] == 3, 5, "three lane requests")
        snap = app.metrics.snapshot()["piuptime_requests_total"]
        assert snap["route=r,status_class=2xx,consumer=kitchen"] == 3
    finally:
        await app.stop()


async def test_a_retry_after_the_lane_sends_what_the_lane_sent(up: Upstream) -> None:
    """The lane's attempt gets a retryable 503; the Python path's retry goes out with the key
    still hidden (header or query) and the consumer still told."""

    async def busy(req: SeenRequest, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 503 Busy\r\ncontent-length: 4\r\n\r\nbusy")
        await w.drain()

    down = await Upstream("down").start()
    down.handler = busy
    text = config(up.port).replace(
        f'targets: [{{url: "http://127.0.0.1:{up.port}"}}]',
        f'targets: [{{url: "http://127.0.0.1:{down.port}"}}, {{url: "http://127.0.0.1:{up.port}"}}]'
        "\n    retries: {attempts: 1, min_per_second: 100}",
    )
    app, port = await start_app(text)
    try:
        for path, headers in (("/q?a=1&apikey=" + KEY, {}), ("/h", {"apikey": KEY})):
            for _ in range(2):  # round-robin: the 503 target first at least once
                r = await ask(port, path, headers)
                assert r.status == 200, r.body
        assert down.seen, "the 503 target was tried"
        for seen in [*down.seen, *up.seen]:
            assert KEY.encode() not in seen.path
            assert all(KEY.encode() not in v for _, v in seen.headers)
            assert (b"x-consumer-username", b"kitchen") in seen.headers
        assert [s.path for s in up.seen if s.path.startswith(b"/q")] == [b"/q?a=1"] * 2
        assert app.lanes[0].handovers >= 1  # the retries went through the Python path
    finally:
        await app.stop()
        await down.stop()


@pytest.mark.parametrize(
    ("plugin", "headers"),
    [
        ("request_id: {}", {"apikey": KEY}),  # none sent: one made
        ("request_id: {}", {"apikey": KEY, "X-Request-ID": "abc-123"}),  # kept
        ("request_id: {}", {"apikey": KEY, "X-Request-ID": "bad id"}),  # not sane: replaced
        ("request_id: {trust_incoming: false}", {"apikey": KEY, "X-Request-ID": "abc"}),
        ("request_id: {echo: false, header: X-Trace-Me}", {"apikey": KEY}),
    ],
)
async def test_request_id_on_the_lane_matches_the_python_path(
    up: Upstream, tmp_path: Path, plugin: str, headers: dict[str, str]
) -> None:
    got: dict[bool, tuple[Reply, SeenRequest, dict[str, object]]] = {}
    for fast in (True, False):
        log = tmp_path / f"access-{fast}.log"
        text = config(up.port, fast_lane=fast, access_log=str(log), extra_plugins=plugin)
        app, port = await start_app(text)
        try:
            up.seen.clear()
            r = await ask(port, "/", headers)
            assert r.status == 200, r.body
            if fast:
                assert served(app) == (1, 0)
        finally:
            await app.stop()
        got[fast] = (r, up.seen[-1], json.loads(log.read_text().splitlines()[-1]))
    name = b"x-trace-me" if "X-Trace-Me" in plugin else b"x-request-id"
    ids = []
    for fast in (True, False):
        reply, seen, entry = got[fast]
        sent = [v for n, v in seen.headers if n == name]
        assert len(sent) == 1  # one id upstream, the client's replaced when not kept
        assert entry["request_id"] == sent[0].decode()
        if "echo: false" in plugin:
            assert reply.header(name) is None
        else:
            assert reply.header(name) == sent[0]
        ids.append(sent[0])
        # the same fields in the same order, the made id aside
        fields = [(n, b"<id>" if n == name else v) for n, v in seen.headers if n != b"traceparent"]
        got[fast] = (reply, SeenRequest(seen.method, seen.path, fields, seen.body), entry)
    assert got[True][1] == got[False][1]
    assert [h[0] for h in got[True][0].headers if h[0] != b"date"] == [
        h[0] for h in got[False][0].headers if h[0] != b"date"
    ]
    client = headers.get("X-Request-ID")
    if client == "abc-123":
        assert ids == [b"abc-123", b"abc-123"]
    else:
        assert all(len(i) == 32 and i[12:13] == b"4" for i in ids)  # uuid4 hex, made anew
