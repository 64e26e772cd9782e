"""Span export over OTLP/HTTP (the ``otel`` extra): a real local receiver records the POSTs to
/v1/traces and decodes them with the opentelemetry-proto classes."""

from __future__ import annotations

import asyncio
import gzip
import re
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from piuptime.config import ConfigError, parse_config
from tests.support import (
    SeenRequest,
    Upstream,
    fetch,
    free_port,
    gateway_yaml,
    start_app,
    wait_until,
)

ROUTES = "  - name: api\n    match: {path: /api/}\n    upstream: main\n"
TID = "4bf92f3577b34da6a3ce929d0e0e4736"
PID = "00f067aa0ba902b7"
SENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])\Z")


# -- the receiver ------------------------------------------------------------------------------


@dataclass
class Got:
    """One span as it arrived, with its resource's attributes."""

    span: Span
    attrs: dict[str, Any]
    resource: dict[str, Any]
    scope: str

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()


@dataclass
class Receiver:
    port: int = 0
    posts: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    spans: list[Got] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def by_trace(self, trace_id: str) -> list[Got]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


def _value(kv: KeyValue) -> Any:
    return getattr(kv.value, kv.value.WhichOneof("value"))


def _attrs(items: Any) -> dict[str, Any]:
    return {kv.key: _value(kv) for kv in items}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            if self.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            request = ExportTraceServiceRequest.FromString(body)
            with rec.lock:
                rec.posts.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                for rs in request.resource_spans:
                    resource = _attrs(rs.resource.attributes)
                    for ss in rs.scope_spans:
                        for span in ss.spans:
                            rec.spans.append(
                                Got(span, _attrs(span.attributes), resource, ss.scope.name)
                            )
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
async def up() -> AsyncIterator[Upstream]:
    u = await Upstream(name="u0").start()
    yield u
    await u.stop()


def _config(up: Upstream, endpoint: str, tracing: str = "", retries: bool = False) -> str:
    text = gateway_yaml({"main": [up.port]}, ROUTES)
    if retries:
        text = text.replace(
            "timeouts: {connect: 1s, read: 2s}",
            "timeouts: {connect: 1s, read: 2s}\n    retries: {attempts: 1, min_per_second: 10}",
        )
    return (
        text
        + f'tracing:\n  otlp_endpoint: "{endpoint}"\n  batch: {{schedule_delay: 50ms}}\n'
        + tracing
    )


def _sent(seen: SeenRequest) -> tuple[str, str, str]:
    [value] = [v.decode() for k, v in seen.headers if k == b"traceparent"]
    m = SENT.match(value)
    assert m is not None
    return m.group(1), m.group(2), m.group(3)


# -- tests -------------------------------------------------------------------------------------


async def test_a_retried_request_is_one_server_and_two_client_spans(
    up: Upstream, receiver: Receiver
) -> None:
    calls = 0

    async def flaky(req: SeenRequest, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        status = b"503 Service Unavailable" if calls == 1 else b"200 OK"
        writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()

    up.handler = flaky
    text = _config(
        up,
        f"http://127.0.0.1:{receiver.port}",
        "  sample: 0%\n  service_name: gw-test\n"
        '  headers: {authorization: "Bearer t0k"}\n'
        "  resource: {deployment.environment: test}\n",
        retries=True,
    )
    app, port = await start_app(text)
    try:
        r = await fetch(
            port,
            "/api/things?secret=1",
            headers={
                "traceparent": f"00-{TID}-{PID}-01",
                "tracestate": "rojo=1",
                "user-agent": "tester/1",
            },
        )
        assert r.status == 200 and len(up.seen) == 2
        await wait_until(lambda: len(receiver.by_trace(TID)) == 3, what="3 spans exported")
    finally:
        await app.stop()
    # what the upstream saw: the same trace, a new parent per attempt
    (t1, p1, f1), (t2, p2, f2) = (_sent(s) for s in up.seen)
    assert t1 == t2 == TID and f1 == f2 == "01" and len({p1, p2, PID}) == 3
    spans = receiver.by_trace(TID)
    [server] = [s for s in spans if s.span.kind == Span.SPAN_KIND_SERVER]
    clients = sorted(
        (s for s in spans if s.span.kind == Span.SPAN_KIND_CLIENT),
        key=lambda s: s.attrs["piuptime.attempt"],
    )
    assert len(clients) == 2
    # links: client's span → SERVER span → each CLIENT span → the upstream's parent ids
    assert server.parent_id == PID
    assert [c.parent_id for c in clients] == [server.span_id] * 2
    assert [c.span_id for c in clients] == [p1, p2]
    assert server.span.trace_state == "rojo=1"
    # the SERVER span: HTTP semantic conventions + ours
    assert server.span.name == "GET /api/"
    a = server.attrs
    assert a["http.request.method"] == "GET" and a["url.path"] == "/api/things"
    assert a["http.route"] == "/api/" and a["http.response.status_code"] == 200
    assert a["url.scheme"] == "http" and a["network.protocol.version"] == "1.1"
    assert a["network.peer.address"] == "127.0.0.1" and a["client.address"] == "127.0.0.1"
    assert isinstance(a["network.peer.port"], int) and a["server.address"] == "test"
    assert a["user_agent.original"] == "tester/1"
    assert a["piuptime.route"] == "api" and a["piuptime.upstream"] == "main"
    assert a["piuptime.attempts"] == 2
    assert server.span.status.code == Status.STATUS_CODE_UNSET
    target = f"http://127.0.0.1:{up.port}"
    # CLIENT spans: one per attempt, outcome and status
    first, second = (c.attrs for c in clients)
    for c in (first, second):
        assert c["http.request.method"] == "GET" and c["piuptime.target"] == target
        assert c["server.address"] == "127.0.0.1" and c["server.port"] == up.port
        assert c["url.full"] == target + "/api/things"  # no query: it may hold credentials
    assert first["http.response.status_code"] == 503 and first["error.type"] == "503"
    assert first["piuptime.outcome"] == "retried" and "http.request.resend_count" not in first
    assert second["http.response.status_code"] == 200 and "error.type" not in second
    assert second["piuptime.outcome"] == "answered" and second["http.request.resend_count"] == 1
    assert clients[0].span.status.code == Status.STATUS_CODE_ERROR
    assert clients[1].span.status.code == Status.STATUS_CODE_UNSET
    assert all(c.span.name == "GET" for c in clients)
    # times nest: each attempt inside the request, the retry after the first attempt
    s0, s1 = server.span.start_time_unix_nano, server.span.end_time_unix_nano
    c1, c2 = clients[0].span, clients[1].span
    assert s0 <= c1.start_time_unix_nano <= c1.end_time_unix_nano <= c2.start_time_unix_nano
    assert c2.end_time_unix_nano <= s1
    # resource, scope and the export request itself
    assert server.resource["service.name"] == "gw-test"
    assert server.resource["deployment.environment"] == "test"
    assert server.scope == "piuptime"
    path, headers = receiver.posts[0]
    assert path == "/v1/traces" and headers["authorization"] == "Bearer t0k"
    assert headers["content-type"] == "application/x-protobuf"
    snapshot = app.metrics.snapshot()
    assert snapshot["piuptime_tracing_spans_exported_total"][""] == 3


async def test_only_sampled_requests_are_exported(up: Upstream, receiver: Receiver) -> None:
    endpoint = f"http://127.0.0.1:{receiver.port}/v1/traces"  # a full URL is kept as is
    app, port = await start_app(_config(up, endpoint, "  sample: 0%\n"))
    try:
        assert (await fetch(port, "/api/")).status == 200  # new trace, not sampled
        unsampled = _sent(up.seen[-1])[0]
        other = "5" * 32
        await fetch(port, "/api/", headers={"traceparent": f"00-{other}-{PID}-00"})
        # answered by the gateway itself (no route): a SERVER span only
        r = await fetch(port, "/nope", headers={"traceparent": f"00-{TID}-{PID}-01"})
        assert r.status == 404
        await wait_until(lambda: len(receiver.by_trace(TID)) == 1, what="the 404's span")
        [span] = receiver.by_trace(TID)
        assert span.span.kind == Span.SPAN_KIND_SERVER and span.span.name == "GET"
        assert span.attrs["http.response.status_code"] == 404 and "http.route" not in span.attrs
        assert receiver.by_trace(unsampled) == [] and receiver.by_trace(other) == []
        assert receiver.posts[0][0] == "/v1/traces"
    finally:
        await app.stop()
    # with sample: 100% a new trace is a root SERVER span
    app, port = await start_app(_config(up, endpoint, "  sample: 100%\n  compression: gzip\n"))
    try:
        await fetch(port, "/api/x")
        trace_id, parent, flags = _sent(up.seen[-1])
        assert flags == "01"
        await wait_until(lambda: len(receiver.by_trace(trace_id)) == 2, what="2 spans")
    finally:
        await app.stop()
    spans = receiver.by_trace(trace_id)
    [server] = [s for s in spans if s.span.kind == Span.SPAN_KIND_SERVER]
    [client] = [s for s in spans if s.span.kind == Span.SPAN_KIND_CLIENT]
    assert server.parent_id == "" and client.span_id == parent
    assert receiver.posts[-1][1].get("content-encoding") == "gzip"


async def test_upstream_errors_are_client_spans_with_their_error(receiver: Receiver) -> None:
    dead = free_port()  # nothing listens: connection refused
    text = gateway_yaml({"main": [dead]}, ROUTES) + (
        f'tracing:\n  otlp_endpoint: "http://127.0.0.1:{receiver.port}"\n'
        "  batch: {schedule_delay: 50ms}\n"
    )
    app, port = await start_app(text)
    try:
        r = await fetch(port, "/api/", headers={"traceparent": f"00-{TID}-{PID}-01"})
        assert r.status == 502
        await wait_until(lambda: len(receiver.by_trace(TID)) >= 2, what="spans")
    finally:
        await app.stop()
    spans = receiver.by_trace(TID)
    [server] = [s for s in spans if s.span.kind == Span.SPAN_KIND_SERVER]
    clients = [s for s in spans if s.span.kind == Span.SPAN_KIND_CLIENT]
    assert server.attrs["http.response.status_code"] == 502 and server.attrs["error.type"] == "502"
    assert server.span.status.code == Status.STATUS_CODE_ERROR
    assert clients and all(c.attrs["error.type"] == "ConnectError" for c in clients)
    assert clients[-1].attrs["piuptime.outcome"] == "failed"
    assert all(c.span.status.code == Status.STATUS_CODE_ERROR for c in clients)
    assert all("http.response.status_code" not in c.attrs for c in clients)


async def test_a_dead_collector_drops_spans_never_requests(up: Upstream) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    app, port = await start_app(_config(up, dead, "  timeout: 300ms\n"))
    try:
        for _ in range(5):
            r = await fetch(port, "/api/", headers={"traceparent": f"00-{TID}-{PID}-01"})
            assert r.status == 200
        sink = app.handler.tracer.sink  # type: ignore[union-attr]

        def dropped() -> float:
            return app.metrics.snapshot()["piuptime_tracing_spans_dropped_total"][
                "reason=export_failed"
            ]

        await wait_until(lambda: dropped() == 10, timeout=10, what="10 spans dropped")
        assert sink.exported == 0  # type: ignore[union-attr]
        assert 'piuptime_tracing_spans_dropped_total{reason="export_failed"} 10' in (
            app.metrics.render()
        )
    finally:
        await app.stop()


async def test_a_full_queue_drops_and_counts(up: Upstream) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    tracing = "  timeout: 300ms\n  batch: {schedule_delay: 1h, max_queue: 2}\n"
    app, port = await start_app(
        _config(up, dead).replace("  batch: {schedule_delay: 50ms}\n", "") + tracing
    )
    try:
        for _ in range(4):
            r = await fetch(port, "/api/", headers={"traceparent": f"00-{TID}-{PID}-01"})
            assert r.status == 200
        dropped = app.metrics.snapshot()["piuptime_tracing_spans_dropped_total"]
        assert dropped["reason=queue_full"] == 4  # two requests of two spans each
        assert app.metrics.snapshot()["piuptime_tracing_queue"][""] == 2
    finally:
        await app.stop()
    # the two queued requests were tried at stop, and failed against the dead collector
    assert (
        app.metrics.snapshot()["piuptime_tracing_spans_dropped_total"]["reason=export_failed"] == 4
    )


# -- configuration -----------------------------------------------------------------------------


def _errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "t.yaml")
    return [str(e) for e in info.value.errors]


def test_the_extra_missing_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # as if the otel extra were not installed
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    [error] = _errors('tracing:\n  sample: 5%\n  otlp_endpoint: "http://127.0.0.1:4318"\n')
    assert error.startswith("t.yaml:3:18: tracing.otlp_endpoint: ")
    assert "pip install 'piuptime[otel]'" in error
    # propagation and sampling alone need no extra
    assert parse_config("tracing: {sample: 5%}\n", "t.yaml").tracing is not None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'tracing:\n  otlp_endpoint: "ftp://x:4318"\n',
            "t.yaml:2:18: tracing.otlp_endpoint: expected an http:// or https:// URL",
        ),
        (
            'tracing:\n  otlp_endpoint: "http://:4318"\n',
            "t.yaml:2:18: tracing.otlp_endpoint: expected an http:// or https:// URL",
        ),
        (
            'tracing:\n  otlp_endpoint: "http://h:99999"\n',
            "t.yaml:2:18: tracing.otlp_endpoint: the port must be a number",
        ),
        ("tracing:\n  sample: 150%\n", "t.yaml:2:11: tracing.sample: a percentage is at most"),
        ("tracing:\n  sample: -1\n", "t.yaml:2:11: tracing.sample:"),
        (
            'tracing:\n  otlp_endpoint: "http://h:4318"\n  headers: {"x y": 1}\n',
            't.yaml:3:13: tracing.headers["x y"]: not a valid HTTP header name',
        ),
        (
            "tracing:\n  headers: {authorization: x}\n",
            "t.yaml:2:12: tracing.headers: headers are sent to the OTLP collector",
        ),
        (
            "tracing:\n  batch: {max_queue: 0}\n",
            "t.yaml:2:22: tracing.batch.max_queue: must be at least 1",
        ),
        ("tracing:\n  compression: zstd\n", "t.yaml:2:16: tracing.compression: expected one of"),
        ("tracing:\n  timeout: 0s\n", "t.yaml:2:12: tracing.timeout: must be longer than 0s"),
        ("tracing:\n  servce_name: x\n", "t.yaml:2:3: tracing.servce_name: unknown key"),
        ("tracing:\n  service_name: ' '\n", "t.yaml:2:17: tracing.service_name: must not be"),
    ],
)
def test_config_errors_have_positions(text: str, expected: str) -> None:
    errors = _errors(text)
    assert any(e.startswith(expected) for e in errors), errors


def test_endpoint_forms() -> None:
    from piuptime.config.tracing import traces_url

    assert traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert traces_url("https://c/otel") == "https://c/otel/v1/traces"
    assert traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"
    config = parse_config("tracing:\n", "t.yaml").tracing
    assert config is not None and config.sample == 0.1 and config.otlp_endpoint is None
