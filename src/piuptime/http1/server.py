"""HTTP/1.1 server: an asyncio Protocol on uvloop + httptools (llhttp).

One ``_Connection`` per socket parses requests with ``httptools.HttpRequestParser`` and runs the
handler for one request at a time; pipelined requests wait in a queue and are answered strictly
in order. Framing is strict: anything ambiguous (request smuggling material) is answered with an
error and the connection is closed. Reading and writing are flow-controlled, so a slow peer on
either side never makes the server buffer without bound. See ``docs/http1.md``.

The hot path avoids per-request dicts, regexes, logging and ``wait_for``: one ``Request``, one
``Responder`` and one task per request, one timer handle per connection re-armed lazily, one
``transport.write`` per response when the handler uses ``send`` or ``start`` + ``end``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl as ssl_module
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from time import perf_counter as _perf_counter
from typing import Any, NoReturn, cast

import httptools

from piuptime.http1._date import tail_close, tail_keep_alive, tail_plain
from piuptime.http1.errors import (
    BodyTimeout,
    BodyTooLarge,
    ClientDisconnected,
    MalformedBody,
    RequestError,
    error_body,
)

__all__ = ["Handler", "Request", "Responder", "Server", "ServerLimits", "Tunnel"]

log = logging.getLogger("piuptime.http1")

HIGH_WATER = 64 * 1024
"""Unread request-body (or tunnel) bytes above which the server stops reading the socket."""

LINGER_SECONDS = 2.0
"""At most this long a closing connection keeps reading (and discarding) what the client still
sends, so that unread bytes do not turn our close into a reset that destroys the answer."""

LINGER_IDLE = 0.5
"""A lingering connection closes once the client has been silent this long (or sends EOF)."""


@dataclass(slots=True)
class ServerLimits:
    """Per-request limits; the server reads ``Server.limits`` afresh for every request."""

    max_header_bytes: int = 16 * 1024  # request line + headers; over → 431 (414 if the URL alone)
    max_header_count: int = 100  # over → 431
    max_body_bytes: int = 10 * 1024 * 1024  # over → 413 (Request.max_body_bytes overrides)
    header_timeout: float = 10.0  # first byte of a request → end of its head; over → 408, close
    idle_timeout: float = 75.0  # keep-alive wait between requests; over → close silently
    body_timeout: float = 30.0  # max gap between body bytes while the handler waits; → 408
    max_pipeline: int = 16  # parsed-but-unanswered requests before reading pauses


# --- wire constants ------------------------------------------------------------------------------

_STATUS_LINES: dict[int, bytes] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode("ascii")) for s in HTTPStatus
}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_V11 = b"1.1"
_VERSIONS = {"1.1": _V11, "1.0": b"1.0"}
_HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"transfer-encoding"))
_SPECIAL = frozenset((b"host", b"content-length", b"transfer-encoding", b"expect", b"upgrade"))
_TOKEN_CHARS = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)

# framing of a response body
_F_NONE = 0  # HEAD, 1xx, 204, 304: no body on the wire
_F_LENGTH = 1  # content-length given by the handler
_F_CHUNKED = 2  # HTTP/1.1 without a length
_F_CLOSE = 3  # HTTP/1.0 without a length: the body ends when the connection closes

# what the connection's single timer is currently guarding
_T_NONE = 0
_T_IDLE = 1  # keep-alive wait between requests → close silently
_T_HEAD = 2  # a request head is arriving → 408 (or silent close if nothing arrived)
_T_BODY = 3  # the handler waits for body bytes → BodyTimeout
_T_LINGER = 4  # closing: stop discarding input and close

# what incoming bytes are for
_M_HTTP = 0  # fed to the parser
_M_STOPPED = 1  # parsing ended (error, last request, body limit): input ignored, reading paused
_M_UPGRADE = 2  # an upgrade request was parsed; bytes are kept for the tunnel
_M_LINGER = 3  # closing after an answer: input discarded until EOF or LINGER_SECONDS


_REASON_LINES: dict[tuple[int, bytes], bytes] = {
    (s.value, s.phrase.encode("ascii")): _STATUS_LINES[s.value] for s in HTTPStatus
}


def _status_line(status: int, reason: bytes | None) -> bytes:
    """``HTTP/1.1 <status> <reason>\\r\\n``, precomputed for every standard status (and for
    every standard status with its standard reason phrase)."""
    if reason is None:
        line = _STATUS_LINES.get(status)
        if line is not None:
            return line
        reason = b""
    else:
        line = _REASON_LINES.get((status, reason))
        if line is not None:
            return line
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


def _error_response(status: int, code: str, message: str) -> bytes:
    """A complete server-generated error response that closes the connection."""
    body = error_body(status, code, message)
    return b"".join(
        (
            _status_line(status, None),
            b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
            tail_close(),
            body,
        )
    )


def _head_size(url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """Bytes of a request head as parsed: the URL plus ``name: value\\r\\n`` per field."""
    return len(url) + sum(len(name) + len(value) + 4 for name, value in headers)


def _add_headers(
    parts: list[bytes], headers: Iterable[tuple[bytes, bytes]], skip_length: bool
) -> int | None:
    """Append ``name: value\\r\\n`` for each header to ``parts``; return the content-length
    found (dropped when ``skip_length``). Hop-by-hop framing headers are always dropped: the
    server owns ``connection``, ``keep-alive`` and ``transfer-encoding``."""
    length = None
    for name, value in headers:
        n = len(name)
        if n == 14 or n == 10 or n == 17:
            lower = name.lower()
            if lower == b"content-length":
                if skip_length:
                    continue
                length = int(value)
            elif lower in _HOP_BY_HOP:
                continue
        parts += (name, b": ", value, b"\r\n")
    return length


class _Abort(Exception):
    """Raised inside a parser callback to stop parsing (the reason is kept on the connection)."""


# --- request -------------------------------------------------------------------------------------


class Request:
    """One parsed request head plus its flow-controlled body (read with ``await read()``)."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_complete",
        "_conn",
        "_continue_sent",
        "_error",
        "_received",
        "_resp",
        "_te",
        "_upgrade_value",
        "_waiter",
        "body_done",
        "chunked",
        "client_addr",
        "client_port",
        "content_length",
        "expect_continue",
        "has_body",
        "headers",
        "host",
        "keep_alive",
        "max_body_bytes",
        "method",
        "path",
        "query",
        "resume",
        "start_time",
        "target",
        "tls",
        "upgrade",
        "version",
    )

    method: bytes
    target: bytes
    path: bytes
    query: bytes
    version: bytes
    keep_alive: bool
    has_body: bool
    start_time: float

    def __init__(self, conn: _Connection, max_body_bytes: int) -> None:
        self._conn = conn
        self.headers: list[tuple[bytes, bytes]] = []
        self.host = b""
        self.content_length: int | None = None
        self.chunked = False
        self.upgrade: bytes | None = None
        self.expect_continue = False
        self.client_addr = conn._client_addr
        self.client_port = conn._client_port
        self.tls = conn._tls
        self.max_body_bytes = max_body_bytes
        self.body_done = False
        self._te: list[bytes] | None = None
        self._upgrade_value: bytes | None = None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._received = 0
        self._complete = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: RequestError | None = None
        self._resp: Responder | None = None
        self._continue_sent = False
        # opaque to this layer: what another protocol that started the connection (the
        # gateway's fast lane) already did with this request; set on the first request only
        self.resume: object = None

    def __repr__(self) -> str:
        return f"<Request {self.method!r} {self.target!r} HTTP/{self.version.decode()}>"

    async def read(self) -> bytes:
        """The next body chunk, ``b""`` at the end.

        Returns at once (no suspension) while bytes are buffered. Sends ``100 Continue`` before
        the first wait when the client asked for it and no response has started. Raises
        ``BodyTooLarge``, ``BodyTimeout``, ``MalformedBody`` or ``ClientDisconnected``.
        """
        while True:
            error = self._error
            if error is not None:
                fresh = type(error)(error.message)  # a new instance: no traceback pile-up
                fresh.status, fresh.code = error.status, error.code
                raise fresh
            length = self.content_length
            if (length is not None and length > self.max_body_bytes) or (
                self._received > self.max_body_bytes
            ):
                raise self._too_large()
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                conn = self._conn
                if conn._read_paused:
                    conn._maybe_resume_reading()
                return data
            if self._complete:
                self.body_done = True
                return b""
            await self._wait()

    def _too_large(self) -> BodyTooLarge:
        """Give up on this body: parsing stops, the connection closes after the answer."""
        self._conn._stop_parsing()
        return BodyTooLarge(f"request body is over {self.max_body_bytes} bytes")

    async def _wait(self) -> None:
        """Suspend until body bytes, the end of the body, an error or the body timeout."""
        conn = self._conn
        if conn._closed or conn._eof:
            raise ClientDisconnected("client closed the connection before sending the body")
        if self.expect_continue and not self._continue_sent:
            self._continue_sent = True
            resp = self._resp
            if resp is not None and not resp.started and self._received == 0:
                conn._transport.write(_CONTINUE)  # not once the client sent body bytes anyway
        waiter: asyncio.Future[None] = conn._loop.create_future()
        self._waiter = waiter
        conn._set_timer(_T_BODY, conn._limits.body_timeout)
        try:
            await waiter
        finally:
            self._waiter = None
            if conn._timer_kind == _T_BODY:
                conn._timer_kind = _T_NONE

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: RequestError) -> None:
        """Make the current and every later ``read()`` raise ``error``."""
        if self._error is None:
            self._error = error
        self._wake()


# --- response ------------------------------------------------------------------------------------


class Responder:
    """Writes one response. ``start`` buffers the head; the first ``write``/``end``/``drain``
    sends it together with the first body bytes (one ``transport.write``)."""

    __slots__ = (
        "_conn",
        "_framing",
        "_head",
        "_keep_alive",
        "_remaining",
        "_req",
        "_transport",
        "bytes_sent",
        "ended",
        "started",
        "status",
    )

    def __init__(self, conn: _Connection, req: Request) -> None:
        self._conn = conn
        self._req = req
        self._transport = conn._transport
        self._head: bytes | None = None
        self._framing = _F_NONE
        self._remaining = 0
        self._keep_alive = False
        self.started = False
        self.ended = False
        self.status = 0
        self.bytes_sent = 0

    def start(
        self, status: int, headers: Iterable[tuple[bytes, bytes]], reason: bytes | None = None
    ) -> None:
        """Begin the response. A ``content-length`` header fixes the framing; otherwise chunked
        (HTTP/1.1) or close-delimited (HTTP/1.0). ``connection``, ``keep-alive`` and
        ``transfer-encoding`` headers are dropped: the server owns framing. A 1xx status is
        written at once as an informational response and a final one can follow."""
        if self.started:
            raise RuntimeError("response already started")
        parts: list[bytes] = []
        length = _add_headers(parts, headers, False)
        if status < 200:
            if not self._conn._closing:
                self._transport.write(_status_line(status, reason) + b"".join(parts) + b"\r\n")
            return
        self.start_fields(status, b"".join(parts), length, reason)

    def start_fields(
        self, status: int, fields: bytes, length: int | None, reason: bytes | None = None
    ) -> None:
        """``start`` for a caller that serialised its header fields itself: ``fields`` are
        ``name: value\\r\\n`` lines, free of ``connection``, ``keep-alive`` and
        ``transfer-encoding``, and carrying ``content-length: <length>`` when ``length`` is not
        None. No informational (1xx) status. One concatenation, no per-field work."""
        if self.started:
            raise RuntimeError("response already started")
        req = self._req
        self.started = True
        self.status = status
        keep_alive = req.keep_alive and not self._conn._draining
        if status == 204 or status == 304 or req.method == b"HEAD":
            self._framing = _F_NONE
        elif length is not None:
            self._framing = _F_LENGTH
            self._remaining = length
        elif req.version is _V11:
            self._framing = _F_CHUNKED
            fields += b"transfer-encoding: chunked\r\n"
        else:
            self._framing = _F_CLOSE
            keep_alive = False
        self._keep_alive = keep_alive
        if not keep_alive:
            tail = tail_close()
        elif req.version is _V11:
            tail = tail_plain()
        else:
            tail = tail_keep_alive()
        self._head = _status_line(status, reason) + fields + tail

    def write(self, data: bytes) -> None:
        """Send body bytes (chunk-encoded when the response is chunked)."""
        if not self.started or self.ended:
            raise RuntimeError("write() needs a started, unfinished response")
        if not data or self._framing == _F_NONE:
            return
        payload = self._frame(data)
        head = self._head
        if head is not None:
            self._head = None
            payload = head + payload
        if not self._conn._closing:
            self._transport.write(payload)

    def _frame(self, data: bytes) -> bytes:
        """Encode one body piece for the wire and count it."""
        framing = self._framing
        if framing == _F_CHUNKED:
            self.bytes_sent += len(data)
            return b"%x\r\n%b\r\n" % (len(data), data)
        if framing == _F_LENGTH:
            if len(data) > self._remaining:
                # more than announced: never put it on the wire, and give up the connection
                data = data[: self._remaining]
                self._keep_alive = False
            self._remaining -= len(data)
        self.bytes_sent += len(data)
        return data

    async def drain(self) -> None:
        """Wait while the socket is paused by back-pressure; returns at once otherwise.

        Also pushes out a head buffered by ``start``. Raises ``ClientDisconnected``."""
        conn = self._conn
        head = self._head
        if head is not None:
            self._head = None
            if not conn._closing:
                self._transport.write(head)
        if conn._write_paused:
            await conn._wait_writable()
        if conn._closed:
            raise ClientDisconnected("client connection closed")

    def end(self, data: bytes = b"") -> None:
        """Finish the response (with optional last bytes). Safe to call twice."""
        if self.ended:
            return
        if not self.started:
            raise RuntimeError("end() needs a started response")
        self.ended = True
        framing = self._framing
        if framing == _F_CHUNKED:
            payload = (self._frame(data) + b"0\r\n\r\n") if data else b"0\r\n\r\n"
        elif data and framing != _F_NONE:
            payload = self._frame(data)
        else:
            payload = b""
        if framing == _F_LENGTH and self._remaining != 0:
            self._keep_alive = False  # shorter than announced: the client must see the close
        head = self._head
        if head is not None:
            self._head = None
            payload = head + payload
        conn = self._conn
        if payload and not conn._closing:
            self._transport.write(payload)
        if not self._keep_alive:
            conn._close_after_response(self._req)

    def send(
        self,
        status: int,
        body: bytes,
        headers: Iterable[tuple[bytes, bytes]] = (),
        content_type: bytes | None = b"application/json",
    ) -> None:
        """A whole response in one write: status, ``content-type``, ``content-length``, body."""
        if self.started:
            raise RuntimeError("response already started")
        req = self._req
        conn = self._conn
        self.started = True
        self.ended = True
        self.status = status
        line = _STATUS_LINES.get(status) or _status_line(status, None)
        if status < 200 or status == 204 or status == 304:
            parts = [line]
            body = b""
        elif content_type:
            length = b"\r\ncontent-length: %d\r\n" % len(body)
            parts = [line, b"content-type: ", content_type, length]
        else:
            parts = [line, b"content-length: %d\r\n" % len(body)]
        if headers:
            _add_headers(parts, headers, True)
        keep_alive = req.keep_alive and not conn._draining
        self._keep_alive = keep_alive
        if not keep_alive:
            parts.append(tail_close())
        elif req.version is _V11:
            parts.append(tail_plain())
        else:
            parts.append(tail_keep_alive())
        if body and req.method != b"HEAD":
            parts.append(body)
            self.bytes_sent = len(body)
        if not conn._closing:
            self._transport.write(b"".join(parts))
        if not keep_alive:
            conn._close_after_response(req)

    def finish(self, exc: Exception | None = None) -> None:
        """For a handler that returned ``None``: it is done (``exc``: it failed), exactly as if
        its coroutine had returned (or raised ``exc``)."""
        if exc is None:
            self._conn._handler_returned(self._req, self)
        else:
            self._conn._handler_done(self._req, self, exc)

    def continue_with(self, work: Awaitable[None]) -> None:
        """For a handler that returned ``None``: finish the request by awaiting ``work`` in a
        task, exactly as if the handler had returned ``work``."""
        conn = self._conn
        conn._task = conn._loop.create_task(conn._run(self._req, self, work))

    @property
    def client_gone(self) -> bool:
        """The client's connection is closed: nothing written now reaches it."""
        return self._conn._closed

    @property
    def write_paused(self) -> bool:
        """True while the client is not reading fast enough: ``await drain()`` before more."""
        return self._conn._write_paused

    def send_error(self, status: int, code: str, message: str) -> None:
        """``send`` with ``error_body(status, code, message)`` as the JSON body."""
        self.send(status, error_body(status, code, message))

    def upgrade(self, status_line_headers: Iterable[tuple[bytes, bytes]]) -> Tunnel:
        """Answer ``101 Switching Protocols`` with these headers and switch to raw bytes.

        ``connection: upgrade`` is always sent, and ``upgrade: <requested>`` when missing.
        Bytes the client sent right after the request head come first from ``Tunnel.read``."""
        conn = self._conn
        req = self._req
        tunnel = conn._tunnel
        if self.started or tunnel is None or req.upgrade is None:
            raise RuntimeError("upgrade() needs an unanswered upgrade request")
        parts = [_STATUS_LINES[101]]
        has_upgrade = False
        for name, value in status_line_headers:
            lower = name.lower()
            if lower == b"connection":
                continue
            if lower == b"upgrade":
                has_upgrade = True
            parts += (name, b": ", value, b"\r\n")
        if not has_upgrade:
            parts += (b"upgrade: ", req.upgrade, b"\r\n")
        parts.append(b"connection: upgrade\r\n")
        parts.append(tail_plain())
        self.started = True
        self.ended = True
        self.status = 101
        if not conn._closing:
            self._transport.write(b"".join(parts))
        tunnel._open = True
        return tunnel


# --- tunnel --------------------------------------------------------------------------------------


class Tunnel:
    """Raw bytes both ways after ``101 Switching Protocols``; flow-controlled like bodies."""

    __slots__ = ("_buffered", "_chunks", "_conn", "_eof", "_open", "_waiter")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._eof = False
        self._open = False
        self._waiter: asyncio.Future[None] | None = None

    def _feed(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered > HIGH_WATER:
                self._conn._pause_reading()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> bytes:
        """The next bytes from the client, ``b""`` at EOF."""
        conn = self._conn
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                if conn._read_paused:
                    conn._maybe_resume_reading()
                return data
            if self._eof or conn._closed:
                return b""
            waiter: asyncio.Future[None] = conn._loop.create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None

    def write(self, data: bytes) -> None:
        """Send bytes to the client (dropped once the connection is closed)."""
        if data and not self._conn._closing:
            self._conn._transport.write(data)

    async def drain(self) -> None:
        """Wait while the client is not reading; raises ``ClientDisconnected`` once closed."""
        conn = self._conn
        if conn._write_paused:
            await conn._wait_writable()
        if conn._closed:
            raise ClientDisconnected("client connection closed")

    def close(self) -> None:
        """Close the connection (after flushing what was written)."""
        conn = self._conn
        if not conn._closing:
            conn._closing = True
            conn._transport.close()


class _BodyOnly:
    """Parser callbacks for re-framing the body of an upgrade request that carries one.

    llhttp treats everything after an upgrade request's head as the new protocol, even a
    declared body. When such a request has a body we do not upgrade: a second parser is fed a
    synthetic head with the same framing, then the real bytes, so the body is read normally."""

    __slots__ = ("_conn", "_done")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._done = False

    def on_body(self, body: bytes) -> None:
        self._conn.on_body(body)

    def on_message_complete(self) -> None:
        if not self._done:
            self._done = True
            self._conn.on_message_complete()

    def on_message_begin(self) -> None:
        if self._done:
            raise _Abort  # nothing after this request is read: the connection closes


# --- connection ----------------------------------------------------------------------------------


Handler = Callable[[Request, Responder], Awaitable[None] | None]
OnError = Callable[[Request | None, int, str], None]


class _Connection(asyncio.Protocol):
    """One client connection: parsing, the request queue, flow control and the timer."""

    __slots__ = (
        "_body_req",
        "_client_addr",
        "_client_port",
        "_closed",
        "_closing",
        "_completed",
        "_current",
        "_deadline",
        "_deferred",
        "_drain_waiter",
        "_draining",
        "_eof",
        "_head",
        "_head_new",
        "_head_raw",
        "_host_seen",
        "_limits",
        "_linger_until",
        "_loop",
        "_mode",
        "_parser",
        "_pending",
        "_queue",
        "_read_paused",
        "_read_size",
        "_reframe",
        "_reject",
        "_resume",
        "_server",
        "_task",
        "_timer",
        "_timer_at",
        "_timer_kind",
        "_tls",
        "_trailers",
        "_transport",
        "_tunnel",
        "_url",
        "_write_paused",
        "_write_timer",
    )

    _transport: asyncio.Transport

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._limits = server.limits
        self._parser: Any = httptools.HttpRequestParser(self)
        self._client_addr = ""
        self._client_port = 0
        self._tls = server._ssl is not None
        self._mode = _M_HTTP
        self._closed = False
        self._closing = False
        self._draining = server._draining
        self._eof = False
        self._read_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._linger_until = 0.0
        self._timer_kind = _T_NONE
        self._deadline = 0.0
        self._head: Request | None = None  # request whose head is being parsed
        self._head_new = False
        self._head_raw = 0
        self._read_size = 0
        self._completed = 0  # requests completed during the current read
        self._trailers = 0
        self._url = b""
        self._body_req: Request | None = None  # request whose body is being parsed
        self._host_seen = False
        self._reframe: Request | None = None
        self._current: Request | None = None  # request whose handler runs
        self._deferred: Request | None = None  # _current, its handler not called yet
        self._task: asyncio.Task[None] | None = None
        self._queue: deque[Request] = deque()
        self._pending: tuple[int, str, str, Request | None] | None = None
        self._reject: tuple[int, str, str] | None = None
        self._tunnel: Tunnel | None = None
        self._resume: object = None  # for the first request (see Server.adopt)

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._client_addr = str(peer[0])
            self._client_port = int(peer[1])
        self._server._connections.add(self)
        if self._draining:
            self._closing = True
            transport.close()
            return
        self._set_timer(_T_HEAD, self._limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self._mode != _M_HTTP:
            self._other_data(data)
            return
        self._read_size = len(data)
        self._completed = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            self._parse_failed(exc, data)
        else:
            if self._head is not None:
                self._head_incomplete(len(data))
        req = self._deferred
        if req is not None:
            self._deferred = None
            if self._current is req:
                self._start(req)

    def eof_received(self) -> bool | None:
        self._eof = True
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel._eof = True
            tunnel._wake()
            return not self._tls
        if self._mode == _M_LINGER:
            return None
        body_req = self._body_req
        if body_req is not None:
            body_req._fail(ClientDisconnected("client closed the connection during the body"))
        if self._current is not None or self._queue or self._pending is not None:
            return not self._tls  # keep the write side open to send the answer(s)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._closing = True
        self._server._connection_lost(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        for req in (self._current, self._body_req):
            if req is not None:
                req._wake()
        if self._tunnel is not None:
            self._tunnel._wake()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- httptools callbacks (hot path) --------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._mode != _M_HTTP:
            raise _Abort  # no request after the last one (close) is parsed
        limits = self._server.limits
        self._limits = limits
        self._head = req = Request(self, limits.max_body_bytes)
        if self._resume is not None:
            req.resume = self._resume
            self._resume = None
        self._head_new = True
        self._host_seen = False
        self._trailers = 0
        self._url = b""

    def on_url(self, url: bytes) -> None:
        if self._url:
            url = self._url + url
        self._url = url
        if len(url) > self._limits.max_header_bytes:
            self._refuse(414, "uri_too_long", "request-target is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Count and size are checked once the head is complete (or per read while it is not,
        # see _head_incomplete): a single read bounds what can pile up before that.
        req = self._head
        if req is None:
            self._trailer_field()
            return
        name = name.lower()
        value = value.rstrip(b" \t")
        if name in _SPECIAL:
            self._special_header(req, name, value)
        req.headers.append((name, value))

    def on_headers_complete(self) -> None:
        req = self._head
        assert req is not None
        self._head = None
        limits = self._limits
        if len(req.headers) > limits.max_header_count:
            self._refuse(431, "too_many_headers", "too many header fields")
        if not self._head_new or self._read_size > limits.max_header_bytes:
            self._check_head_size(req)  # the head may be larger than one small read
        parser = self._parser
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            self._refuse(505, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1")
        req.version = version
        if req._te is not None:
            self._check_transfer_encoding(req)
        if version is _V11:
            if not self._host_seen:
                self._refuse(400, "bad_request", "missing Host header")
        else:
            req.expect_continue = False
        req.method = method = parser.get_method()
        target = self._url
        req.target = target
        if target[0] == 47:  # "/": origin-form, the usual case
            req.path, _, req.query = target.partition(b"?")
        else:
            self._other_target(req, target)
        length = req.content_length
        req.has_body = (length is not None and length > 0) or req.chunked
        req.keep_alive = parser.should_keep_alive() and not self._draining
        if (req._upgrade_value is not None or method == b"CONNECT") and parser.should_upgrade():
            self._upgrade_request(req, method)
        req.start_time = _perf_counter()
        self._timer_kind = _T_NONE  # no head pending; no idle wait while a handler runs
        if self._reframe is not req:
            self._body_req = req  # completed by on_message_complete, body or not
        if self._current is None:
            # started once this read is parsed (see data_received): the handler may run
            # synchronously, and must see the request complete when its body was in this read
            self._current = req
            self._deferred = req
        else:
            queue = self._queue
            queue.append(req)
            if len(queue) > limits.max_pipeline:
                self._pause_reading()

    def on_body(self, body: bytes) -> None:
        req = self._body_req
        if req is None:
            raise _Abort
        req._chunks.append(body)
        size = len(body)
        req._received += size
        req._buffered += size
        if req._waiter is not None:
            req._wake()
        if req._buffered > HIGH_WATER and not self._read_paused:
            self._pause_reading()

    def on_message_complete(self) -> None:
        req = self._body_req
        if req is None:
            return  # an upgrade request whose body is re-framed (see _BodyOnly)
        self._body_req = None
        self._completed += 1
        req._complete = True
        if req._waiter is not None:
            req._wake()
        if not req.keep_alive and req.upgrade is None:
            self._stop_parsing()  # nothing after a request that ends the connection

    # -- head checks (rarely taken branches) ----------------------------------------------------

    def _special_header(self, req: Request, name: bytes, value: bytes) -> None:
        """Host, Content-Length, Transfer-Encoding, Expect, Upgrade: remembered and checked."""
        if name == b"host":
            if self._host_seen:
                self._refuse(400, "bad_request", "more than one Host header")
            self._host_seen = True
            req.host = value
        elif name == b"content-length":
            if not value.isdigit():  # llhttp checks too; this keeps int() honest
                self._refuse(400, "bad_request", "invalid Content-Length")
            req.content_length = int(value)
        elif name == b"transfer-encoding":
            if req._te is None:
                req._te = [value]
            else:
                req._te.append(value)
        elif name == b"expect":
            if value.lower() == b"100-continue":
                req.expect_continue = True
        else:  # upgrade
            req._upgrade_value = value.lower()

    def _check_transfer_encoding(self, req: Request) -> None:
        """Accept exactly one final ``chunked``, from HTTP/1.1 clients only (RFC 9112 6.1, 6.3).

        A body whose length cannot be determined (``chunked`` missing, not last, repeated,
        empty list elements) is 400; a well-framed body under a coding we do not decode
        (``gzip, chunked``) is 501."""
        assert req._te is not None
        if req.version != b"1.1":
            self._refuse(400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip().lower() for c in b",".join(req._te).split(b",")]
        if codings == [b"chunked"]:
            req.chunked = True
            return
        if codings[-1] != b"chunked" or codings.count(b"chunked") > 1 or b"" in codings:
            self._refuse(400, "bad_request", "invalid Transfer-Encoding")
        self._refuse(501, "not_implemented", "unsupported transfer-coding")

    def _other_target(self, req: Request, target: bytes) -> None:
        """``*`` (OPTIONS) or absolute-form (``http://host/path?q``, which also sets ``host``)."""
        if req.method == b"CONNECT":
            self._refuse(501, "not_implemented", "CONNECT is not supported")
        if target == b"*":
            req.path, req.query = target, b""
            return
        try:
            url = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            self._refuse(400, "bad_request", "invalid request-target")
        if not url.host:
            self._refuse(400, "bad_request", "invalid request-target")
        req.path = url.path or b"/"
        req.query = url.query or b""
        req.host = url.host if url.port is None else b"%s:%d" % (url.host, url.port)

    def _trailer_field(self) -> None:
        """A trailer field after a chunked body: counted against the header limit, dropped."""
        self._trailers += 1
        if self._trailers > self._limits.max_header_count:
            self._refuse(431, "too_many_headers", "too many trailer fields")

    def _check_head_size(self, req: Request) -> None:
        if _head_size(self._url, req.headers) > self._limits.max_header_bytes:
            self._refuse(431, "header_too_large", "request head is too large")

    def _upgrade_request(self, req: Request, method: bytes) -> None:
        """A request llhttp will treat as switching protocols (Upgrade, or CONNECT)."""
        if method == b"CONNECT":
            self._refuse(501, "not_implemented", "CONNECT is not supported")
        req.keep_alive = False  # whatever the answer, the connection ends with it
        if req.has_body:
            self._reframe = req  # answered as a plain request, see _BodyOnly
        else:
            req.upgrade = req._upgrade_value

    def _refuse(self, status: int, code: str, message: str) -> NoReturn:
        """Stop parsing from inside a callback; the connection answers ``status`` and closes."""
        self._reject = (status, code, message)
        raise _Abort(message)

    def _head_incomplete(self, size: int) -> None:
        """After a read that left a head unfinished: start its timer, bound its size.

        The first read of a head is measured precisely from what was parsed (URL, whole header
        lines); every further read while the same head is still unfinished is all head bytes.
        This bounds a huge header that httptools accumulates before calling ``on_header``."""
        req = self._head
        assert req is not None
        limits = self._limits
        if self._head_new:
            self._head_new = False
            self._head_raw = _head_size(self._url, req.headers)
            if self._timer_kind != _T_HEAD:
                self._set_timer(_T_HEAD, limits.header_timeout)
        else:
            self._head_raw += size
        if len(req.headers) > limits.max_header_count:
            self._stop_parsing()
            self._fail_request(431, "too_many_headers", "too many header fields")
        elif self._head_raw > limits.max_header_bytes:
            self._stop_parsing()
            self._fail_request(431, "header_too_large", "request head is too large")

    # -- errors ---------------------------------------------------------------------------------

    def _parse_failed(self, exc: Exception, data: bytes) -> None:
        """Map a parser error to the status the client gets, then answer it in order."""
        reject = self._reject
        self._reject = None
        if reject is None:
            if self._mode != _M_HTTP:
                return  # parsing was stopped on purpose (data after the last request)
            if isinstance(exc, httptools.HttpParserCallbackError) and not isinstance(
                exc.__context__, _Abort
            ):  # a bug in a callback, not the client's fault: say so
                log.error("HTTP parser callback failed", exc_info=exc.__context__)
                reject = (500, "internal_error", "internal server error")
            else:
                # the failing request starts the read when no request completed before it in it
                reject = _parser_error_status(exc, data if self._completed == 0 else b"")
        self._stop_parsing()
        self._fail_request(*reject)

    def _fail_request(self, status: int, code: str, message: str) -> None:
        """Queue an error answer after the requests already accepted, then close.

        If the broken request's handler is already running (its body failed), it learns it
        from ``read()``; letting the ``MalformedBody`` propagate makes the server answer."""
        self._head = None
        req = self._body_req
        if req is not None:
            self._body_req = None
            if status == 400:
                code = MalformedBody.code
            if req is self._current:
                error = MalformedBody(message)
                error.status, error.code = status, code
                req._fail(error)
                return
            if self._queue and self._queue[-1] is req:
                self._queue.pop()
        self._pending = (status, code, message, req)
        if self._current is None:
            self._answer_pending()

    def _answer_pending(self) -> None:
        """Write the queued server error, report it, close."""
        pending = self._pending
        assert pending is not None
        self._pending = None
        status, code, message, req = pending
        if not self._closing:
            self._transport.write(_error_response(status, code, message))
        self._server._report(req, status, message)
        self._close(linger=True)

    def _stop_parsing(self) -> None:
        """No more requests are read from this connection."""
        if self._mode == _M_HTTP:
            self._mode = _M_STOPPED
            self._pause_reading()

    # -- incoming bytes outside HTTP parsing ----------------------------------------------------

    def _other_data(self, data: bytes) -> None:
        mode = self._mode
        if mode == _M_UPGRADE:
            tunnel = self._tunnel
            assert tunnel is not None
            tunnel._feed(data)
        elif mode == _M_LINGER:  # discarded; the client is still talking, wait a little more
            self._set_timer(_T_LINGER, min(LINGER_IDLE, self._linger_until - self._loop.time()))
        # _M_STOPPED: left-over bytes after the last request, ignored

    def _upgraded(self, rest: bytes) -> None:
        """llhttp finished an upgrade request's head; ``rest`` is what followed it."""
        req = self._reframe
        if req is not None:
            self._reframe = None
            self._reframe_body(req, rest)
            return
        self._mode = _M_UPGRADE
        tunnel = Tunnel(self)
        self._tunnel = tunnel
        tunnel._feed(rest)

    def _reframe_body(self, req: Request, rest: bytes) -> None:
        """Continue with a parser that reads ``req``'s body with the framing it declared."""
        parser = httptools.HttpRequestParser(_BodyOnly(self))
        if req.chunked:
            parser.feed_data(b"PUT / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n")
        else:
            length = req.content_length or 0
            parser.feed_data(b"PUT / HTTP/1.1\r\ncontent-length: %d\r\n\r\n" % length)
        self._parser = parser
        self._body_req = req
        if rest:
            self.data_received(rest)

    # -- handler lifecycle ----------------------------------------------------------------------

    def _start(self, req: Request) -> None:
        """Run the handler for ``req`` (the only one running on this connection).

        The handler is called here; an awaitable it returns runs as a task. ``None`` means it
        carries on through callbacks and ends with ``Responder.finish`` or ``.continue_with``."""
        self._current = req
        resp = Responder(self, req)
        req._resp = resp
        server = self._server
        server.active_requests += 1
        try:
            work = server.handler(req, resp)
        except Exception as exc:
            self._handler_done(req, resp, exc)
            return
        if work is not None:
            self._task = self._loop.create_task(self._run(req, resp, work))

    async def _run(self, req: Request, resp: Responder, work: Awaitable[None]) -> None:
        try:
            await work
        except asyncio.CancelledError:
            self._handler_done(req, resp, ClientDisconnected("handler cancelled"))
            raise
        except Exception as exc:
            self._handler_done(req, resp, exc)
            return
        self._handler_returned(req, resp)

    def _handler_returned(self, req: Request, resp: Responder) -> None:
        """The handler finished without raising."""
        if (
            resp.ended
            and req._complete
            and not self._closing
            and not self._draining
            and self._mode == _M_HTTP
            and not self._queue
            and self._head is None
            and self._body_req is None
            and self._pending is None
            and not self._eof
        ):
            # the usual end of a keep-alive exchange: wait idle for the next request
            self._server.active_requests -= 1
            self._current = None
            self._task = None
            when = self._loop.time() + self._limits.idle_timeout
            self._timer_kind = _T_IDLE
            self._deadline = when
            if self._timer is None or when < self._timer_at:
                self._set_timer(_T_IDLE, self._limits.idle_timeout)
        else:
            self._handler_done(req, resp, None)

    def _handler_done(self, req: Request, resp: Responder, exc: Exception | None) -> None:
        """Decide what follows a handler: the next request, an error answer, or the close."""
        self._server.active_requests -= 1
        self._current = None
        self._task = None
        if self._closing:
            return
        if self._tunnel is not None and self._tunnel._open:
            self._closing = True
            self._transport.close()
            return
        if exc is not None or not resp.ended:
            self._handler_failed(req, resp, exc)
            return
        if not req._complete:
            self._close(linger=True)  # unread body: the framing of what follows is unknown
            return
        if self._draining:
            self._close(linger=True)
            return
        self._next()

    def _handler_failed(self, req: Request, resp: Responder, exc: Exception | None) -> None:
        """The handler raised or returned without finishing: answer if possible, then close."""
        if isinstance(exc, ClientDisconnected):
            self._closing = True
            self._transport.abort()
            return
        if isinstance(exc, RequestError):
            status, code, message = exc.status, exc.code, exc.message
        elif exc is not None:
            status, code, message = 500, "internal_error", "internal server error"
            log.error("handler failed for %r", req, exc_info=exc)
        else:
            status, code = 500, "internal_error"
            message = "handler returned without finishing the response"
        if not resp.started:
            self._transport.write(_error_response(status, code, message))
            self._server._report(req, status, message)
        self._close(linger=True)

    def _next(self) -> None:
        """After a complete keep-alive exchange: start the next queued request, or wait."""
        queue = self._queue
        if queue:
            self._start(queue.popleft())
            if self._read_paused:
                self._maybe_resume_reading()
        elif self._pending is not None:
            self._answer_pending()
        elif self._eof or self._mode != _M_HTTP:
            self._close(linger=False)
        elif self._head is None and self._body_req is None:
            self._set_timer(_T_IDLE, self._limits.idle_timeout)

    def _close_after_response(self, req: Request) -> None:
        """A response that ends the connection was written (called from ``end``/``send``).

        Plain TCP half-closes at once and reads until the client closes too; TLS (no
        half-close) lingers only when the client may still be sending a body."""
        self._close(linger=not self._tls or not req._complete)

    def _close(self, linger: bool) -> None:
        """Close after what was written. With ``linger`` keep reading (discarding) for a while
        so unread client bytes do not turn the close into a reset that loses our answer."""
        if self._closing:
            return
        self._closing = True
        current = self._current
        if current is not None and not current._complete:
            current._fail(ClientDisconnected("connection closing"))
        transport = self._transport
        if not linger:
            transport.close()
            return
        self._mode = _M_LINGER
        if transport.can_write_eof():
            transport.write_eof()
        self._linger_until = self._loop.time() + LINGER_SECONDS
        self._set_timer(_T_LINGER, LINGER_IDLE)
        self._server._check_drained()
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()

    # -- flow control ---------------------------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._read_paused and not self._closed:
            self._read_paused = True
            self._transport.pause_reading()

    def _maybe_resume_reading(self) -> None:
        """Resume reading unless some reason to stay paused remains."""
        if not self._read_paused or self._closing or self._mode == _M_STOPPED:
            return
        body_req = self._body_req
        if body_req is not None and body_req._buffered > HIGH_WATER:
            return
        if len(self._queue) > self._limits.max_pipeline:
            return
        tunnel = self._tunnel
        if tunnel is not None and tunnel._buffered > HIGH_WATER:
            return
        self._read_paused = False
        self._transport.resume_reading()

    async def _wait_writable(self) -> None:
        """Wait for ``resume_writing``; a client that does not read for ``body_timeout`` while
        we wait is cut off (its connection aborted)."""
        waiter = self._drain_waiter
        if waiter is None:
            waiter = self._drain_waiter = self._loop.create_future()
            if self._write_timer is None:
                self._write_timer = self._loop.call_later(
                    self._limits.body_timeout, self._write_stalled
                )
        await asyncio.shield(waiter)

    def _write_stalled(self) -> None:
        self._write_timer = None
        if self._write_paused and not self._closed:
            self._closing = True
            self._transport.abort()

    # -- the one timer --------------------------------------------------------------------------

    def _set_timer(self, kind: int, delay: float) -> None:
        """Guard ``kind`` until now + ``delay``. The handle is only re-created when the new
        deadline is earlier than the scheduled one; a later deadline is picked up when the
        handle fires, so keep-alive requests re-arm without touching the loop's timer heap."""
        when = self._loop.time() + delay
        self._timer_kind = kind
        self._deadline = when
        handle = self._timer
        if handle is None or when < self._timer_at:
            if handle is not None:
                handle.cancel()
            self._timer = self._loop.call_at(when, self._on_timer)
            self._timer_at = when

    def _on_timer(self) -> None:
        self._timer = None
        kind = self._timer_kind
        if kind == _T_NONE or self._closed:
            return
        if self._deadline - self._loop.time() > 0.001:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
            self._timer_at = self._deadline
            return
        self._timer_kind = _T_NONE
        if kind in (_T_IDLE, _T_LINGER):
            self._closing = True
            self._transport.close()
        elif kind == _T_HEAD:
            self._head_timed_out()
        elif kind == _T_BODY:
            self._body_timed_out()

    def _head_timed_out(self) -> None:
        """Slowloris guard: 408 if part of a head arrived, a silent close if nothing did."""
        if self._head is None:
            self._closing = True
            self._transport.close()
            return
        self._stop_parsing()
        self._fail_request(408, "request_timeout", "request head not received in time")

    def _body_timed_out(self) -> None:
        """The handler waited ``body_timeout`` for body bytes: it gets ``BodyTimeout`` (and the
        server answers 408 if it propagates); if its response already started, close."""
        req = self._current
        if req is None:
            return
        self._stop_parsing()
        req._fail(BodyTimeout("request body not received in time"))
        resp = req._resp
        if resp is not None and resp.started:
            self._closing = True
            self._transport.abort()

    def _drain_now(self) -> None:
        """Listeners closed: idle connections close now, busy ones after their response."""
        self._draining = True
        if (
            self._current is None
            and not self._queue
            and self._head is None
            and self._pending is None
            and not self._closing
        ):
            self._close(linger=False)


def _parser_error_status(exc: Exception, data: bytes) -> tuple[int, str, str]:
    """The status for an error llhttp found by itself."""
    message = str(exc) or "malformed request"
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        # unknown but well-formed method → 501; garbage → 400. ``data`` is the read holding
        # the request line when known (else empty: 400).
        method, space, _ = data.lstrip(b"\r\n").partition(b" ")
        if space and method and all(c in _TOKEN_CHARS for c in method):
            return 501, "not_implemented", "method not implemented"
        return 400, "bad_request", message
    if message == "Invalid HTTP version":
        return 505, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1"
    if "Transfer-Encoding" in message and "invalid `Transfer-Encoding`" in message:
        return 501, "not_implemented", "unsupported transfer-coding"
    return 400, "bad_request", message


# --- server --------------------------------------------------------------------------------------


class Server:
    """Listeners, live connections and the counters the app and the admin API read."""

    def __init__(
        self,
        handler: Handler,
        limits: ServerLimits,
        *,
        ssl: ssl_module.SSLContext | None = None,
        on_error: OnError | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self._ssl = ssl
        self._on_error = on_error
        self._servers: list[asyncio.Server] = []
        # every open client connection: ours, and those of a protocol set by
        # ``protocol_factory`` (which offer ``_closing``, ``_transport`` and ``_drain_now()``)
        self._connections: set[Any] = set()
        # makes the protocol of each accepted connection instead of ours (the gateway's fast
        # lane); that protocol may give a connection back with ``adopt``
        self.protocol_factory: Callable[[], asyncio.Protocol] | None = None
        self._draining = False
        self._all_closed: asyncio.Future[None] | None = None
        self.active_requests = 0

    @property
    def active_connections(self) -> int:
        """Open client connections."""
        return len(self._connections)

    @property
    def sockets(self) -> list[socket.socket]:
        """The bound listening sockets (a port of 0 shows the real port here)."""
        return [s for srv in self._servers for s in srv.sockets]

    async def listen(
        self,
        host: str,
        port: int,
        *,
        backlog: int = 2048,
        reuse_port: bool = False,
        sock: socket.socket | None = None,
    ) -> None:
        """Start accepting on ``host:port`` (or on an already bound ``sock``)."""
        loop = asyncio.get_running_loop()
        tls: dict[str, Any] = {}
        if self._ssl is not None:
            tls = {"ssl": self._ssl, "ssl_handshake_timeout": self.limits.header_timeout}
        if sock is not None:
            srv = await loop.create_server(self._protocol, sock=sock, backlog=backlog, **tls)
        else:
            srv = await loop.create_server(
                self._protocol, host, port, backlog=backlog, reuse_port=reuse_port, **tls
            )
        self._servers.append(srv)

    def _protocol(self) -> asyncio.Protocol:
        factory = self.protocol_factory
        if factory is not None:
            return factory()
        return _Connection(self)

    def adopt(
        self,
        transport: asyncio.Transport,
        data: bytes,
        resume: object = None,
        *,
        eof: bool = False,
        write_paused: bool = False,
    ) -> None:
        """Take over a connection another protocol accepted: ``data`` are the bytes it read
        and did not consume (parsed from the start of a request), ``resume`` goes to the first
        request parsed (``Request.resume``), ``eof``: the client already half-closed."""
        conn = _Connection(self)
        conn._resume = resume
        transport.set_protocol(conn)
        conn.connection_made(transport)
        if write_paused:
            conn.pause_writing()
        if data and not conn._closing:
            conn.data_received(data)
        if eof and not conn._closed and not conn.eof_received():
            conn._closing = True
            transport.close()

    def close_listeners(self) -> None:
        """Stop accepting; idle keep-alive connections close now, busy ones after their answer."""
        self._draining = True
        for srv in self._servers:
            srv.close()
        for conn in list(self._connections):
            conn._drain_now()

    async def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for every connection to finish its exchange; True if all did.

        A connection counts as finished once it is closing (a lingering close included)."""
        if not self._draining:
            self.close_listeners()
        if self._drained():
            return True
        if self._all_closed is None or self._all_closed.done():
            self._all_closed = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._all_closed), timeout)
        except TimeoutError:
            return self._drained()
        return True

    def _drained(self) -> bool:
        return all(conn._closing for conn in self._connections)

    def _check_drained(self) -> None:
        """Wake ``drain`` when the last busy connection finished (closed or is closing)."""
        waiter = self._all_closed
        if waiter is not None and not waiter.done() and self._drained():
            waiter.set_result(None)

    def abort_all(self) -> None:
        """Close every listener and connection at once."""
        self._draining = True
        for srv in self._servers:
            srv.close()
        for conn in list(self._connections):
            conn._closing = True
            conn._transport.abort()

    def _connection_lost(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        self._check_drained()

    def _report(self, req: Request | None, status: int, message: str) -> None:
        """Tell the ``on_error`` hook about an error the server answered itself."""
        hook = self._on_error
        if hook is None:
            return
        try:
            hook(req, status, message)
        except Exception:
            log.exception("on_error hook failed")
