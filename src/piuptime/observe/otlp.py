"""Span export over OTLP/HTTP (``pip install 'piuptime[otel]'``), off the event loop.

Imported only when ``tracing.otlp_endpoint`` is set. The event loop's whole share is
``OtlpSink.put``: append one record (a finished sampled request: its SERVER span's data and its
upstream attempts) to a bounded deque, or count its spans as dropped when the deque is full.
One worker thread wakes every ``batch.schedule_delay`` (or as soon as a batch is waiting), turns
records into the OpenTelemetry SDK's ``ReadableSpan``s — with the ids the gateway already sent
upstream — and hands batches to the SDK's ``OTLPSpanExporter`` (protobuf over HTTP, retries with
back-off inside ``tracing.timeout``). A batch the collector did not take is dropped and counted;
nothing waits for the collector but that thread, so a dead collector only costs spans.

Why not the SDK's ``Tracer`` and ``BatchSpanProcessor``: the tracer makes its own ids (ours are
on the wire before a span would exist) and does its span bookkeeping on the calling thread,
under locks; the processor logs on the caller's thread when its queue is full and does not
count what it drops. The exporter and the span model are the SDK's own.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from random import getrandbits
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from piuptime import __version__
from piuptime.config.tracing import TracingConfig, traces_url
from piuptime.observe.tracing import SpanRecord

if TYPE_CHECKING:
    from piuptime.observe.metrics import Metrics

__all__ = ["OtlpSink"]

log = logging.getLogger("piuptime.tracing")

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)
_LOG_EVERY = 60.0  # seconds between two warnings about failed exports


class OtlpSink:
    """The span queue and its export thread. ``start()`` on the event loop, ``aclose()`` at
    stop (sends what is queued, within ``drain_timeout``)."""

    def __init__(self, config: TracingConfig, exporter: SpanExporter | None = None) -> None:
        assert config.otlp_endpoint is not None
        self.url = traces_url(config.otlp_endpoint)
        self.exporter: SpanExporter = exporter or OTLPSpanExporter(
            endpoint=self.url,
            headers=dict(config.headers),
            timeout=config.timeout,
            compression=Compression.Gzip
            if config.compression == "gzip"
            else Compression.NoCompression,
        )
        self.resource = Resource.create(
            {"service.name": config.service_name, "service.version": __version__}
            | dict(config.resource)
        )
        self.scope = InstrumentationScope("piuptime", __version__)
        self.max_queue = config.batch.max_queue
        self.max_batch = config.batch.max_batch
        self.schedule_delay = config.batch.schedule_delay
        # counters: each is written by one thread only
        self.dropped_queue_full = 0  # spans; the event loop
        self.dropped_export_failed = 0  # spans; the worker
        self.exported = 0  # spans; the worker
        self.failed_exports = 0  # export requests; the worker
        self._queue: deque[SpanRecord] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._last_warning = 0.0

    # -- the event loop's side ------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="piuptime-otlp", daemon=True)
        self._thread.start()

    def put(self, record: SpanRecord) -> None:
        """Queue one request's spans; never blocks, never raises."""
        queue = self._queue
        if len(queue) >= self.max_queue or self._stopping:
            attempts = record[0].attempts
            self.dropped_queue_full += 1 + (len(attempts) if attempts else 0)
            return
        queue.append(record)
        if len(queue) >= self.max_batch and not self._wake.is_set():
            self._wake.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def register_metrics(self, metrics: Metrics) -> None:
        metrics.counter(
            "tracing_spans_exported",
            "Spans the OTLP collector accepted.",
            read=lambda: [((), float(self.exported))],
        )
        metrics.counter(
            "tracing_spans_dropped",
            "Spans not exported: queue_full (the export queue was full: the collector is slow "
            "or down, or tracing.sample is too high) or export_failed (the collector refused "
            "or did not answer a batch within tracing.timeout).",
            ("reason",),
            read=lambda: [
                (("queue_full",), float(self.dropped_queue_full)),
                (("export_failed",), float(self.dropped_export_failed)),
            ],
        )
        metrics.gauge(
            "tracing_queue",
            "Sampled requests whose spans wait for export.",
            read=lambda: [((), float(len(self._queue)))],
        )

    async def aclose(self, timeout: float = 5.0) -> None:
        """Export what is queued (up to ``timeout``), then stop the thread and the exporter."""
        thread = self._thread
        self._stopping = True
        self._wake.set()
        if thread is not None:
            await asyncio.to_thread(thread.join, timeout)
        # aborts an export still retrying against a dead collector
        await asyncio.to_thread(self.exporter.shutdown)
        if thread is not None and thread.is_alive():
            await asyncio.to_thread(thread.join, 1.0)
        left = sum(1 + len(r[0].attempts or ()) for r in self._queue)
        self._queue.clear()
        self.dropped_export_failed += left

    # -- the worker thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self.schedule_delay)
            self._wake.clear()
            stopping = self._stopping
            self._drain()
            if stopping:
                return

    def _drain(self) -> None:
        queue = self._queue
        while queue:
            batch: list[ReadableSpan] = []
            while queue and len(batch) < self.max_batch:
                try:
                    batch.extend(self._spans(queue.popleft()))
                except Exception:  # a record that cannot be made into spans: never the thread
                    log.exception("tracing: could not build the spans of a request")
            if batch:
                self._export(batch)

    def _export(self, batch: Sequence[ReadableSpan]) -> None:
        try:
            ok = self.exporter.export(batch) is SpanExportResult.SUCCESS
        except Exception as exc:
            ok = False
            error = str(exc) or type(exc).__name__
        else:
            error = "see the log of opentelemetry.exporter"
        if ok:
            self.exported += len(batch)
            return
        self.dropped_export_failed += len(batch)
        self.failed_exports += 1
        now = time.monotonic()
        if now - self._last_warning >= _LOG_EVERY:
            self._last_warning = now
            log.warning(
                "tracing: %d spans dropped, the collector at %s did not take them (%s); "
                "%d dropped since start",
                len(batch),
                self.url,
                error,
                self.dropped_export_failed,
            )

    def _spans(self, record: SpanRecord) -> list[ReadableSpan]:
        """The SERVER span of one request and a CLIENT span per upstream attempt."""
        trace, offset, start, end, name, attrs, status = record
        trace_id = int(trace.trace_id, 16)
        state = TraceState.from_header([trace.state.decode("latin-1")]) if trace.state else None
        server = SpanContext(
            trace_id,
            getrandbits(64) or 1,
            is_remote=False,
            trace_flags=_SAMPLED,
            trace_state=state,
        )
        parent = None
        if trace.parent_id is not None:
            parent = SpanContext(
                trace_id,
                int(trace.parent_id, 16),
                is_remote=True,
                trace_flags=_SAMPLED,
                trace_state=state,
            )
        spans = [
            ReadableSpan(
                name,
                server,
                parent,
                self.resource,
                attrs,
                kind=SpanKind.SERVER,
                status=Status(StatusCode.ERROR) if status >= 500 else _UNSET,
                start_time=offset + int(start * 1e9),
                end_time=offset + int(end * 1e9),
                instrumentation_scope=self.scope,
            )
        ]
        attempts = trace.attempts or []
        last = len(attempts) - 1
        for i, (span_id, url, method, path, t0, t1, code, kind, message) in enumerate(attempts):
            client = SpanContext(
                trace_id,
                int(span_id, 16),
                is_remote=False,
                trace_flags=_SAMPLED,
                trace_state=state,
            )
            a = _attempt_attributes(url, method, path, i, code, kind)
            if i < last:
                a["piuptime.outcome"] = "retried"
            else:
                a["piuptime.outcome"] = "failed" if kind is not None else "answered"
            failed = kind is not None or (code is not None and code >= 400)
            spans.append(
                ReadableSpan(
                    method.decode("latin-1"),
                    client,
                    server,
                    self.resource,
                    a,
                    kind=SpanKind.CLIENT,
                    status=Status(StatusCode.ERROR, message) if failed else _UNSET,
                    start_time=offset + int(t0 * 1e9),
                    end_time=offset + int(t1 * 1e9),
                    instrumentation_scope=self.scope,
                )
            )
        return spans


def _attempt_attributes(
    url: str, method: bytes, path: bytes, index: int, code: int | None, kind: str | None
) -> dict[str, Any]:
    """A CLIENT span's attributes (OpenTelemetry HTTP client conventions + ``piuptime.*``).
    ``url.full`` leaves the query out: it may carry credentials."""
    parts = urlsplit(url)
    attrs: dict[str, Any] = {
        "http.request.method": method.decode("latin-1"),
        "server.address": parts.hostname or "",
        "url.full": url + path.partition(b"?")[0].decode("latin-1"),
        "piuptime.target": url,
        "piuptime.attempt": index + 1,
    }
    if parts.port is not None:
        attrs["server.port"] = parts.port
    if index:
        attrs["http.request.resend_count"] = index
    if code is not None:
        attrs["http.response.status_code"] = code
    if kind is not None:
        attrs["error.type"] = kind
    elif code is not None and code >= 400:
        attrs["error.type"] = str(code)
    return attrs
