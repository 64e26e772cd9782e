"""HTTP/1.1 client for the data plane: a keep-alive connection pool per upstream target.

Layers, bottom up (httpx's split, our own code):

- ``_Connection``: one socket, an asyncio Protocol fed to ``httptools.HttpResponseParser``
  (llhttp). It runs one exchange at a time (no pipelining): writes the request, parses the
  response, buffers the body with back-pressure and owns the single read-timeout timer.
- ``Response`` / ``Tunnel``: what the caller holds. The body is read chunk by chunk from a
  per-response buffer; ``release()`` gives the connection back; ``detach()`` turns a ``101``
  into a raw byte tunnel.
- ``Pool``: connections to one (scheme, host, port): LIFO idle reuse, ``max_connections`` with
  a FIFO wait queue, ``max_idle``, idle expiry, TLS, and the one safe retry.

Hot-path rules: bytes everywhere, ``__slots__``, one ``transport.write`` for a small request,
no future when data is already buffered, one re-armed timer per connection instead of a
``wait_for`` per read. See ``docs/http1-client.md`` for the behaviour in prose.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, cast

import httptools

__all__ = [
    "ConnectError",
    "ConnectTimeout",
    "PendingExchange",
    "Pool",
    "PoolOptions",
    "PoolTimeout",
    "ReadTimeout",
    "RemoteProtocolError",
    "Response",
    "Tunnel",
    "UpstreamError",
    "WriteError",
]

# Unread body bytes above which the socket stops being read (resumed once the caller reads).
_HIGH_WATER = 64 * 1024
# Largest response head (status line, headers, interim responses) accepted from an upstream.
_MAX_HEAD = 64 * 1024
# A bytes request body up to this size is joined with the head into a single write.
_INLINE_BODY = 64 * 1024
_BODY_METHODS = frozenset((b"POST", b"PUT", b"PATCH"))
# Methods that may be sent twice once they were written (RFC 9110 9.2.2).
IDEMPOTENT_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))
_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
_WATCHED_HEADERS = frozenset((b"content-length", b"transfer-encoding", b"connection", b"upgrade"))

# Connection life cycle, as the pool sees it.
_CONNECTING, _BUSY, _IDLE, _DETACHED, _DEAD = range(5)


# --------------------------------------------------------------------------------------- errors


class UpstreamError(Exception):
    """Base of every error the client raises about talking to the upstream.

    ``request_sent``: some of the request was handed to the socket, so the upstream may have
    acted on it. ``response_started``: at least one response byte arrived. The gateway uses the
    pair to decide whether a request may be retried on another target.
    """

    _retry_safe = False  # set on instances: the peer closed a connection before answering

    def __init__(
        self, message: str, *, request_sent: bool = False, response_started: bool = False
    ) -> None:
        super().__init__(message)
        self.request_sent = request_sent
        self.response_started = response_started


class ConnectError(UpstreamError):
    """The TCP connection or the TLS handshake failed (refused, unreachable, bad certificate)."""


class ConnectTimeout(UpstreamError):
    """Connecting (TCP + TLS handshake) took longer than ``connect_timeout``."""


class ReadTimeout(UpstreamError):
    """The upstream went quiet for ``read_timeout``: before the first response byte, between
    body bytes, or while it would not accept more of a streamed request body."""


class WriteError(UpstreamError):
    """The request could not be written: the connection broke, or a streamed body did not
    match its declared ``content-length``."""


class RemoteProtocolError(UpstreamError):
    """The upstream broke HTTP/1.1: malformed or ambiguous framing, data where none belongs,
    or the connection closed before the response was complete."""


class PoolTimeout(UpstreamError):
    """No connection slot freed up within ``connect_timeout`` (``max_connections`` reached)."""


# -------------------------------------------------------------------------------------- options


@dataclass(slots=True)
class PoolOptions:
    """Limits, timeouts and TLS settings of one pool (see docs/http1-client.md)."""

    max_connections: int = 256  # open (busy + idle); more waiters queue for a free connection
    max_idle: int = 64  # idle keep-alive connections kept
    idle_timeout: float = 60.0  # idle connections older than this are closed
    connect_timeout: float = 2.0
    read_timeout: float = 30.0  # time to first response byte, and max gap between body bytes
    ttfb_timeout: float | None = None  # time to the response head, when not read_timeout
    tls_verify: bool = True
    ca_file: str | None = None
    server_hostname: str | None = None  # SNI and verification name override


# ------------------------------------------------------------------------------------- response


class Response:
    """Status line and headers of an upstream response, and a flow-controlled body stream.

    Header names are lower-cased bytes, values bytes with surrounding whitespace stripped, in
    arrival order. ``keep_alive`` says whether the connection can carry another request after
    this one: it follows the version and the ``Connection`` header, and is False for a body
    delimited by the connection closing. Always call ``release()`` (or ``detach()`` after a 101)
    when done, also on errors, or the pool slot stays taken.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_done",
        "_error",
        "_until_eof",
        "_waiter",
        "chunked",
        "content_length",
        "headers",
        "keep_alive",
        "reason",
        "status",
        "version",
    )

    def __init__(
        self,
        conn: _Connection | None,
        status: int,
        reason: bytes,
        version: bytes,
        headers: list[tuple[bytes, bytes]],
        content_length: int | None,
        chunked: bool,
        keep_alive: bool,
    ) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self._conn: _Connection | None = conn
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._done = False  # the whole body has been received
        self._until_eof = False  # body delimited by the connection closing
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None

    @classmethod
    def whole(
        cls, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> Response:
        """A complete answer already in memory, on no connection (the fast lane hands a
        retryable one to the Python path this way)."""
        resp = cls(None, status, reason, b"1.1", headers, len(body), False, True)
        if body:
            resp._chunks.append(body)
        resp._done = True
        return resp

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason.decode('latin-1')!r}>"

    async def read(self) -> bytes:
        """Return the next body chunk (everything buffered so far), ``b""`` at the end.

        Does not suspend when data is already buffered. Raises ``ReadTimeout`` or
        ``RemoteProtocolError`` if the upstream stalls or breaks off mid-body (after any bytes
        that did arrive have been returned).
        """
        while True:
            if self._chunks:
                return self._take()
            if self._done:
                return b""
            if self._error is not None:
                raise self._error
            conn = self._conn
            if conn is None:
                raise RuntimeError("Response.read() after release() with the body unfinished")
            waiter = conn._loop.create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None

    def release(self) -> None:
        """Give the connection back: to the pool when the whole response arrived and the
        connection is keep-alive (and the request body was fully sent), otherwise close it.
        Safe to call more than once."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn._release()

    def detach(self) -> Tunnel:
        """After ``101 Switching Protocols``: take the connection over as a raw byte tunnel.

        The connection leaves the pool for good (its slot is freed); bytes that arrived right
        after the 101 head are the first the tunnel returns.
        """
        conn = self._conn
        tunnel = conn._tunnel if conn is not None else None
        if conn is None or tunnel is None:
            raise RuntimeError("detach() needs an unreleased 101 Switching Protocols response")
        self._conn = None
        conn._detach()
        return tunnel

    def _take(self) -> bytes:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        conn = self._conn
        if conn is not None and conn._read_paused:
            conn._resume_reading()
        return data

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._waiter is not None:
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Tunnel:
    """Raw bytes in both directions over a connection upgraded by ``101``.

    ``read()`` returns ``b""`` once the upstream closed (or the connection broke); ``write()``
    raises ``WriteError`` once it is closed. Reading is flow-controlled like a response body.
    """

    __slots__ = ("_buffered", "_chunks", "_conn", "_eof", "_waiter")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None

    async def read(self) -> bytes:
        """The next bytes from the upstream (all buffered so far), ``b""`` at EOF."""
        while True:
            if self._chunks:
                chunks = self._chunks
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                if self._conn._read_paused:
                    self._conn._resume_reading()
                return data
            if self._eof:
                return b""
            waiter = self._conn._loop.create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None

    def write(self, data: bytes) -> None:
        """Queue bytes for the upstream; pair with ``drain()`` to respect back-pressure."""
        conn = self._conn
        if conn._closed or conn._transport is None:
            raise WriteError("tunnel is closed", request_sent=True, response_started=True)
        conn._transport.write(data)

    async def drain(self) -> None:
        """Return once the socket accepts more data (at once unless it is backed up)."""
        conn = self._conn
        while conn._write_paused and not conn._closed:
            await conn._wait_writable()
        if conn._closed:
            raise WriteError("tunnel is closed", request_sent=True, response_started=True)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._conn._close(None)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER:
            self._conn._pause_reading()
        self._wake()

    def _feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


# ----------------------------------------------------------------------------------- connection


class _Connection(asyncio.Protocol):
    """One upstream socket running one request/response exchange at a time."""

    __slots__ = (
        "_body_sent",
        "_closed",
        "_complete",
        "_conn_header",
        "_content_length",
        "_drain_waiter",
        "_error",
        "_fire",
        "_got_any",
        "_head_size",
        "_head_waiter",
        "_headers",
        "_idempotent",
        "_idle_since",
        "_interim",
        "_is_head",
        "_last",
        "_loop",
        "_notify",
        "_parser",
        "_parser_dirty",
        "_pool",
        "_read_paused",
        "_reason",
        "_req_head",
        "_resp",
        "_sender",
        "_sent_any",
        "_state",
        "_te",
        "_timeout",
        "_timer",
        "_timer_at",
        "_transport",
        "_tunnel",
        "_upgrade",
        "_uses",
        "_write_paused",
    )

    def __init__(self, pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._parser_dirty = False  # after a HEAD response llhttp still expects its body
        self._state = _CONNECTING
        self._uses = 0
        self._idle_since = 0.0
        self._closed = False
        self._error: UpstreamError | None = None
        # the exchange in flight
        self._resp: Response | None = None
        self._complete = False  # the whole response has been received
        self._is_head = False
        self._sent_any = False
        self._body_sent = False
        self._got_any = False
        self._head_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._tunnel: Tunnel | None = None
        # a request sent by Pool.send_nowait: who to call, and its head (for the safe retry)
        self._notify: Callable[[], None] | None = None
        self._fire = False
        self._req_head = b""
        self._idempotent = True
        # flow control and the read timer
        self._read_paused = False
        self._write_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._last = 0.0
        self._timeout = pool._options.ttfb_timeout or pool._options.read_timeout
        # the response head being parsed
        self._interim = False
        self._head_size = 0
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._content_length: bytes | None = None
        self._te: bytes | None = None
        self._conn_header: bytes | None = None
        self._upgrade = False

    # ---- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._last = self._loop.time()

    def data_received(self, data: bytes) -> None:
        self._last = self._loop.time()
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel._feed(data)
            return
        if self._state != _BUSY or self._complete:
            # Nothing is owed: bytes now mean a broken or desynchronised upstream.
            self._close(None)
            return
        self._got_any = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._switch_to_tunnel(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            self._close(self._protocol_error(exc))
        else:
            if self._resp is None:  # everything so far is head: keep it bounded
                self._head_size += len(data)
                if self._head_size > _MAX_HEAD:
                    message = f"response head larger than {_MAX_HEAD} bytes"
                    self._close(
                        RemoteProtocolError(
                            message, request_sent=self._sent_any, response_started=True
                        )
                    )
        if self._fire:
            self._fire = False
            notify = self._notify
            if notify is not None:
                self._notify = None
                notify()

    def eof_received(self) -> bool | None:
        self._on_lost(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost(exc)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._last = self._loop.time()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---- httptools callbacks

    def on_message_begin(self) -> None:
        if self._resp is not None:
            raise RemoteProtocolError("upstream sent data after the response")
        self._interim = False
        self._reason = b""
        self._headers = []
        self._content_length = self._te = self._conn_header = None
        self._upgrade = False

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._resp is not None:
            return  # a trailer after a chunked body: dropped
        name = name.lower()
        value = value.rstrip()
        self._headers.append((name, value))
        if name in _WATCHED_HEADERS:
            if name == b"content-length":
                self._content_length = value
            elif name == b"transfer-encoding":
                te = self._te
                self._te = value if te is None else te + b", " + value
            elif name == b"connection":
                ch = self._conn_header
                self._conn_header = value if ch is None else ch + b", " + value
            else:
                self._upgrade = True

    def on_headers_complete(self) -> None:
        parser = self._parser
        status: int = parser.get_status_code()
        if status < 200 and status != 101:
            self._interim = True  # 100 Continue, 102, 103: skipped
            return
        raw_version: str = parser.get_http_version()
        version = _VERSIONS.get(raw_version) or raw_version.encode()
        cl = self._content_length
        te = self._te
        if cl is not None and te is not None:
            raise RemoteProtocolError("response has both content-length and transfer-encoding")
        chunked = te is not None and _is_chunked(te)
        resp = Response(
            self,
            status,
            self._reason,
            version,
            self._headers,
            int(cl) if cl is not None else None,  # llhttp has validated the digits
            chunked,
            _keep_alive(version, self._conn_header),
        )
        if status == 101:
            if not self._upgrade:
                raise RemoteProtocolError("101 response without an upgrade header")
            resp.keep_alive = False
            resp._done = True
        elif self._is_head or status == 204 or status == 304:
            resp._done = True
            self._complete = True
            self._parser_dirty = self._is_head
        elif not chunked and cl is None:
            resp._until_eof = True
            resp.keep_alive = False
        self._resp = resp
        if self._timeout != self._pool._options.read_timeout:
            self._timeout = self._pool._options.read_timeout  # past the head: the idle limit
        if self._notify is not None and (
            resp._done or resp.content_length is None or resp.content_length > _HIGH_WATER
        ):
            self._fire = True  # not a small body on its way: the caller takes over now
        if self._head_waiter is not None or self._drain_waiter is not None:
            self._wake_sender()

    def on_body(self, data: bytes) -> None:
        resp = self._resp
        if resp is None or resp._done:
            raise RemoteProtocolError("upstream sent a body where none belongs")
        resp._feed(data)
        if resp._buffered > _HIGH_WATER and not self._read_paused:
            self._pause_reading()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        resp = self._resp
        if resp is not None and not resp._done:
            resp._done = True
            if resp._waiter is not None:
                resp._wake()
        self._complete = True
        if self._notify is not None:
            self._fire = True

    # ---- the exchange

    def start(self, is_head: bool) -> None:
        """Begin an exchange: reset per-request state (fails if the upstream already closed)."""
        if self._parser_dirty:
            self._parser = httptools.HttpResponseParser(self)
            self._parser_dirty = False
        self._uses += 1
        self._resp = None
        self._notify = None
        self._fire = False
        self._complete = False
        self._is_head = is_head
        self._sent_any = False
        self._body_sent = False
        self._got_any = False
        self._error = None
        self._head_size = 0
        options = self._pool._options
        if options.ttfb_timeout is not None:
            self._timeout = options.ttfb_timeout
        if self._closed or self._transport is None:
            error = WriteError("upstream closed the connection before the request was sent")
            error._retry_safe = True
            raise error

    def head_error(self) -> UpstreamError:
        """Why the response head will never come (the connection closed under the exchange)."""
        return self._error or RemoteProtocolError(
            "connection closed", request_sent=self._sent_any, response_started=self._got_any
        )

    def write_request(self, head: bytes, body: bytes | None, chunked: bool) -> None:
        """Head and a bytes body in one write (two for a large body, no copy)."""
        transport = self._transport
        assert transport is not None
        if chunked:
            if body:
                transport.writelines((head, b"%x\r\n" % len(body), body, b"\r\n0\r\n\r\n"))
            else:
                transport.write(head + b"0\r\n\r\n")
        elif not body:
            transport.write(head)
        elif len(body) <= _INLINE_BODY:
            transport.write(head + body)
        else:
            transport.writelines((head, body))
        self._sent_any = True
        self._body_sent = True
        self._watch()

    async def send_stream(
        self, head: bytes, body: AsyncIterable[bytes], chunked: bool, length: int | None
    ) -> None:
        """Stream the body, awaiting drain between chunks.

        If the upstream answers before the body is finished (an early 4xx, or a full-duplex
        echo), the rest is sent by a background task so the caller gets the response now; the
        connection is then only reused if that task finished sending the body.
        """
        transport = self._transport
        assert transport is not None
        transport.write(head)
        self._sent_any = True
        chunks = aiter(body)
        sent = await self._pump(chunks, chunked, length, 0, stop_on_head=True)
        if sent is not None:
            self._sender = self._loop.create_task(self._pump_rest(chunks, chunked, length, sent))

    async def _pump(
        self,
        chunks: AsyncIterator[bytes],
        chunked: bool,
        length: int | None,
        sent: int,
        *,
        stop_on_head: bool,
    ) -> int | None:
        """Copy chunks to the socket. Return None when done, or the byte count so far when it
        stopped because the response head arrived (``stop_on_head``)."""
        while True:
            if self._closed:
                if self._resp is not None:
                    return None  # the upstream answered and closed: let the caller read it
                raise self._error or WriteError(
                    "connection closed while sending the request body", request_sent=True
                )
            if stop_on_head and self._resp is not None:
                return sent
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            if not chunk:
                continue
            sent += len(chunk)
            if length is not None and sent > length:
                raise WriteError("request body longer than its content-length", request_sent=True)
            if self._closed or self._transport is None:
                continue  # reported at the top of the loop
            if chunked:
                self._transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                self._transport.write(chunk)
            if self._write_paused:
                await self._wait_writable()
        if length is not None and sent != length:
            raise WriteError("request body shorter than its content-length", request_sent=True)
        if self._closed or self._transport is None:
            if self._resp is not None:
                return None
            raise self._error or WriteError(
                "connection closed while sending the request body", request_sent=True
            )
        if chunked:
            self._transport.write(b"0\r\n\r\n")
        self._body_sent = True
        if not self._complete:
            self._watch()
        return None

    async def _pump_rest(
        self, chunks: AsyncIterator[bytes], chunked: bool, length: int | None, sent: int
    ) -> None:
        """Background continuation of ``_pump`` after an early response; failures close the
        connection (the caller sees them on ``Response.read()`` if the body is unfinished)."""
        try:
            await self._pump(chunks, chunked, length, sent, stop_on_head=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._sender = None
            if isinstance(exc, UpstreamError):
                self._close(exc)
            else:
                self._close(WriteError(f"request body source failed: {exc!r}", request_sent=True))
        else:
            self._sender = None

    async def _wait_writable(self) -> None:
        """Wait for resume_writing, the response head, or the connection closing."""
        waiter = self._loop.create_future()
        self._drain_waiter = waiter
        self._watch()
        try:
            await waiter
        finally:
            self._drain_waiter = None

    def _wake_sender(self) -> None:
        """Wake the request coroutine: the head arrived or the connection failed."""
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        notify = self._notify
        if notify is not None and self._closed:
            self._notify = None
            notify()

    # ---- the callback-driven exchange (Pool.send_nowait)

    def complete_response(self) -> Response | None:
        """The response of a ``send_nowait`` request when it arrived whole (its body buffered,
        the connection ready to be released), else None: then ``await wait_response()``."""
        resp = self._resp
        if (
            resp is None
            or not self._complete
            or not resp._done
            or resp._error is not None
            or resp.status == 101
            or self._tunnel is not None
        ):
            return None
        return resp

    def buffered_body(self) -> bytes:
        """The whole body of a ``complete_response()`` (taken: a second call gives b"")."""
        resp = self._resp
        if resp is None or not resp._chunks:
            return b""
        return resp._take()

    async def wait_response(self) -> Response:
        """Finish a ``send_nowait`` exchange the usual way: wait for the head, with the same
        errors and the same safe retry as ``Pool.request``."""
        self._notify = None
        self._fire = False
        return await self._pool._exchange(
            self,
            self._req_head,
            None,
            False,
            None,
            self._is_head,
            True,
            self._idempotent,
            sent=True,
        )

    # ---- flow control and the read timer

    def _pause_reading(self) -> None:
        if not self._read_paused and self._transport is not None and not self._closed:
            self._read_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused:
            self._read_paused = False
            if self._transport is not None and not self._closed:
                self._transport.resume_reading()
                self._watch()

    def _watch(self) -> None:
        """Start (or restart) the no-progress clock; one timer per connection, re-armed lazily
        (moved earlier only when the limit shrank: a time-to-first-byte below the read limit)."""
        self._last = now = self._loop.time()
        due = now + self._timeout
        timer = self._timer
        if timer is None or due < self._timer_at:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(due, self._on_timer)
            self._timer_at = due

    def _on_timer(self) -> None:
        self._timer = None
        if not self._waiting_on_upstream():
            return  # re-armed by _watch() when waiting starts again
        due = self._last + self._timeout
        if due > self._loop.time():
            self._timer = self._loop.call_at(due, self._on_timer)
            self._timer_at = due
            return
        if self._resp is None and self._body_sent:
            message = f"no response from upstream within {self._timeout:g}s"
        elif self._resp is None:
            message = f"upstream did not accept the request body for {self._timeout:g}s"
        else:
            message = f"upstream sent no body bytes for {self._timeout:g}s"
        self._close(
            ReadTimeout(message, request_sent=self._sent_any, response_started=self._got_any)
        )

    def _waiting_on_upstream(self) -> bool:
        """True while progress depends on the upstream alone (not on us or our caller)."""
        if self._closed or self._state != _BUSY or self._tunnel is not None:
            return False
        if self._drain_waiter is not None:
            return True
        if not self._body_sent or self._complete:
            return False
        return not self._read_paused

    # ---- endings

    def _switch_to_tunnel(self, rest: bytes) -> None:
        self._complete = True
        tunnel = self._tunnel = Tunnel(self)
        if rest:
            tunnel._feed(rest)

    def _protocol_error(self, exc: Exception) -> UpstreamError:
        cause = exc.__context__
        if isinstance(cause, UpstreamError):
            error = cause
        else:
            error = RemoteProtocolError(f"malformed response from upstream: {exc}")
        error.request_sent = self._sent_any
        error.response_started = True
        return error

    def _on_lost(self, exc: Exception | None) -> None:
        """The socket closed under us (EOF, reset, TLS failure)."""
        if self._closed:
            return
        resp = self._resp
        if (
            resp is not None
            and resp._until_eof
            and not resp._done
            and exc is None
            and self._state == _BUSY
        ):
            resp._done = True  # a close-delimited body ends here
            self._complete = True
            resp._wake()
        self._close(self._lost_error(exc))

    def _lost_error(self, exc: Exception | None) -> UpstreamError | None:
        """The error the exchange in flight sees when the socket closes (None if harmless)."""
        if self._state != _BUSY or self._complete or self._tunnel is not None:
            return None
        why = f"reset ({exc!r})" if exc is not None else "closed"
        error: UpstreamError
        if self._resp is not None:
            error = RemoteProtocolError(
                f"upstream connection {why} before the end of the response body",
                request_sent=True,
                response_started=True,
            )
        elif not self._body_sent:
            error = WriteError(
                f"upstream connection {why} while sending the request",
                request_sent=self._sent_any,
                response_started=self._got_any,
            )
        else:
            error = RemoteProtocolError(
                f"upstream connection {why} before a response",
                request_sent=True,
                response_started=self._got_any,
            )
        error._retry_safe = not self._got_any
        return error

    def _close(self, error: UpstreamError | None) -> None:
        """Tear the connection down (idempotent) and wake whoever waits on it. With an error
        the socket is aborted and the error delivered to the unfinished exchange."""
        if self._closed:
            return
        self._closed = True
        if error is not None:
            self._error = error
        resp = self._resp
        if resp is not None and not resp._done:
            if error is not None:
                resp._error = error
            resp._wake()  # a reader blocked in another task must not hang
        self._wake_sender()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        sender = self._sender
        if sender is not None:
            self._sender = None
            sender.cancel()
        if self._tunnel is not None:
            self._tunnel._feed_eof()
        transport = self._transport
        if transport is not None:
            if error is not None or not self._complete:
                transport.abort()
            else:
                transport.close()
        if self._state == _IDLE:
            self._pool._idle_lost(self)

    def _reusable(self) -> bool:
        resp = self._resp
        return (
            not self._closed
            and self._complete
            and self._body_sent
            and self._tunnel is None
            and resp is not None
            and resp.keep_alive
        )

    def _release(self) -> None:
        """Called by Response.release(): back to the pool, or closed."""
        if self._state != _BUSY:
            return
        if self._reusable():
            if self._read_paused:
                self._resume_reading()
            self._resp = None
            self._pool._checkin(self)
        else:
            self._pool._retire(self)

    def _detach(self) -> None:
        self._pool._detach(self)


PendingExchange = _Connection
"""What ``Pool.send_nowait`` returns: ``complete_response()``, ``buffered_body()`` and
``await wait_response()`` are its public methods."""


def _is_chunked(te: bytes) -> bool:
    """True when ``chunked`` is the final transfer coding (RFC 9112 6.3)."""
    if te == b"chunked":
        return True
    return te.rsplit(b",", 1)[-1].strip().lower() == b"chunked"


def _keep_alive(version: bytes, connection: bytes | None) -> bool:
    """Persistence per RFC 9112 9.3: 1.1 unless ``close``; 1.0 only with ``keep-alive``."""
    if connection is None:
        return version == b"1.1"
    value = connection.lower()
    if value == b"keep-alive":
        return version in (b"1.1", b"1.0")
    if value == b"close":
        return False
    tokens = {token.strip() for token in value.split(b",")}
    if b"close" in tokens:
        return False
    return version == b"1.1" or (version == b"1.0" and b"keep-alive" in tokens)


def _build_head(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]] | bytes,
    body: bytes | AsyncIterable[bytes] | None,
    content_length: int | None,
) -> tuple[bytes, bool, int | None]:
    """Serialise the request head and settle the body framing.

    Returns ``(head, chunked, length)``; ``length`` is the declared size of a streamed body.
    The caller's headers are sent as given; only ``content-length`` or
    ``transfer-encoding: chunked`` is added when the body needs framing and has none.
    ``headers`` may come already serialised (``name: value\r\n`` lines, without framing
    fields): then they are not scanned.
    """
    cl: bytes | None = None
    te: bytes | None = None
    if isinstance(headers, bytes):
        if body is None and not content_length:
            if method in _BODY_METHODS:
                headers += b"content-length: 0\r\n"
            return b"%s %s HTTP/1.1\r\n%s\r\n" % (method, target, headers), False, None
        parts = [method, b" ", target, b" HTTP/1.1\r\n", headers]
        append = parts.append
    else:
        parts = [method, b" ", target, b" HTTP/1.1\r\n"]
        append = parts.append
        for name, value in headers:
            size = len(name)
            if size == 14 or size == 17:
                lname = name.lower()
                if lname == b"content-length":
                    cl = value
                elif lname == b"transfer-encoding":
                    te = value
            append(name)
            append(b": ")
            append(value)
            append(b"\r\n")
    chunked = False
    length: int | None = None
    declared = _declared_length(cl, content_length)
    if te is not None:
        if te.strip().lower() != b"chunked" or cl is not None:
            raise ValueError("request transfer-encoding must be exactly 'chunked', without CL")
        if body is None:
            raise ValueError("transfer-encoding: chunked given without a body")
        chunked = True
    elif body is None:
        if declared:
            raise ValueError("content-length given without a body")
        if cl is None and method in _BODY_METHODS:
            append(b"content-length: 0\r\n")
    elif isinstance(body, bytes):
        if declared is not None and declared != len(body):
            raise ValueError("content-length does not match the body")
        if cl is None:
            append(b"content-length: %d\r\n" % len(body))
    elif declared is not None:
        length = declared
        if cl is None:
            append(b"content-length: %d\r\n" % declared)
    else:
        chunked = True
        append(b"transfer-encoding: chunked\r\n")
    append(b"\r\n")
    return b"".join(parts), chunked, length


def _declared_length(header: bytes | None, given: int | None) -> int | None:
    if header is None:
        return given
    if not header.isdigit():
        raise ValueError(f"invalid content-length header {header!r}")
    value = int(header)
    if given is not None and given != value:
        raise ValueError("content_length argument disagrees with the content-length header")
    return value


# ----------------------------------------------------------------------------------------- pool


class Pool:
    """Keep-alive connections to one upstream target (scheme, host, port).

    ``in_use`` counts connections checked out or being opened, ``idle`` those parked for reuse,
    ``opened_total`` every connection ever established. Idle connections are reused most
    recently used first; at ``max_connections`` requests wait in FIFO order (``PoolTimeout``
    after ``connect_timeout``).
    """

    __slots__ = (
        "_closed",
        "_host",
        "_idle",
        "_loop",
        "_open",
        "_options",
        "_port",
        "_server_hostname",
        "_ssl",
        "_sweeper",
        "_waiters",
        "opened_total",
        "scheme",
        "shared",
    )

    def __init__(self, scheme: str, host: str, port: int, options: PoolOptions) -> None:
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {scheme!r}")
        self.scheme = scheme
        self._host = host
        self._port = port
        self._options = options
        self._ssl = _tls_context(options) if scheme == "https" else None
        self._server_hostname = (options.server_hostname or host) if self._ssl else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: deque[_Connection] = deque()  # oldest left, most recently used right
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._open = 0  # connecting + busy + idle
        self._closed = False
        self._sweeper: asyncio.TimerHandle | None = None
        self.opened_total = 0
        # another client's connections to the same target that count against
        # max_connections (the gateway's fast lane): ``.connections``, ``.close_one_idle()``
        self.shared: Any = None

    def __repr__(self) -> str:
        return (
            f"<Pool {self.scheme}://{self._host}:{self._port} in_use={self.in_use} "
            f"idle={self.idle}>"
        )

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def options(self) -> PoolOptions:
        return self._options

    @property
    def in_use(self) -> int:
        return self._open - len(self._idle)

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        """Requests queued for a connection (``max_connections`` reached)."""
        return len(self._waiters)

    @property
    def full(self) -> bool:
        """Every connection slot is taken: a new request would queue."""
        return self._open + self._shared_open() >= self._options.max_connections and not self._idle

    @property
    def open(self) -> int:
        """Connections open or opening (busy and idle)."""
        return self._open

    def _shared_open(self) -> int:
        shared = self.shared
        return 0 if shared is None else int(shared.connections)

    def wake_waiters(self) -> None:
        """The client sharing ``max_connections`` (``shared``) freed slots, which this pool
        does not see: hand them to the requests queued here, in order (closing the other
        side's idle connections to make room)."""
        limit = self._options.max_connections
        shared = self.shared
        while self._waiters:
            if self._open + self._shared_open() >= limit and not (
                shared is not None and shared.close_one_idle()
            ):
                return
            self._open += 1  # reserved for the first live waiter, or given back
            self._free_slot()

    def close_one_idle(self) -> bool:
        """Close the least recently used idle connection, freeing its slot for whoever shares
        ``max_connections`` with this pool; False when none is idle."""
        if not self._idle:
            return False
        self._discard(self._idle.popleft())
        return True

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]] | bytes,
        body: bytes | AsyncIterator[bytes] | None = None,
        content_length: int | None = None,
        idempotent: bool | None = None,
    ) -> Response:
        """Send a request and return the response once its head arrived.

        ``headers`` go out as given (include ``host``): a list of (name, value) pairs, or bytes
        already serialised as ``name: value\r\n`` lines without framing fields (what the
        proxy builds). A bytes body gets a ``content-length``;
        an async-iterator body is sent with ``content-length`` when one is given (argument or
        header), otherwise chunked. A request that fails on a reused connection because the
        upstream had closed it, before any response byte and with a replayable body, is sent
        once more on a fresh connection — once it was written, only when ``idempotent``
        (default: the method is), since the upstream may have acted on it before it died.
        """
        head, chunked, length = _build_head(method, target, headers, body, content_length)
        is_head = method == b"HEAD"
        if idempotent is None:
            idempotent = method in IDEMPOTENT_METHODS
        replayable = body is None or isinstance(body, bytes)
        conn = self._pop_idle() if self._idle else None
        if conn is None:
            conn = await self._acquire(fresh=False)
        return await self._exchange(
            conn, head, body, chunked, length, is_head, replayable, idempotent, sent=False
        )

    def send_nowait(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]] | bytes,
        on_ready: Callable[[], None],
        idempotent: bool | None = None,
    ) -> _Connection | None:
        """Send a bodyless request at once on an idle keep-alive connection, if there is one.

        Returns None (nothing sent) when no idle connection is ready. Otherwise ``on_ready()``
        is called once, from a protocol callback, when the whole response arrived with a small
        (``content-length`` up to 64 KiB, or no) body, or earlier when it will not (a large,
        chunked or close-delimited body, a 101) or the exchange failed. Then the caller takes
        ``complete_response()`` (and ``buffered_body()``) from the returned connection when it is
        not None, and releases it; otherwise it awaits ``wait_response()``, which gives what
        ``request()`` would have given (the response, or the error, after the safe retry).
        """
        if not self._idle or self._closed:
            return None
        head, _, _ = _build_head(method, target, headers, None, None)
        conn = self._pop_idle()
        if conn is None:
            return None
        try:
            conn.start(method == b"HEAD")
        except UpstreamError:
            self._retire(conn)
            return None
        conn._req_head = head
        conn._idempotent = method in IDEMPOTENT_METHODS if idempotent is None else idempotent
        conn._notify = on_ready
        conn.write_request(head, None, False)
        return conn

    async def _exchange(
        self,
        conn: _Connection,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        chunked: bool,
        length: int | None,
        is_head: bool,
        replayable: bool,
        idempotent: bool,
        *,
        sent: bool,
    ) -> Response:
        """Send (unless ``sent``) and wait for the response head, with the one safe retry."""
        while True:  # at most twice: the safe retry
            try:
                if not sent:
                    conn.start(is_head)
                    if body is None or isinstance(body, bytes):
                        conn.write_request(head, body, chunked)
                    else:
                        await conn.send_stream(head, body, chunked, length)
                sent = False
                while (resp := conn._resp) is None:
                    if conn._closed:
                        raise conn.head_error()
                    waiter = conn._loop.create_future()
                    conn._head_waiter = waiter
                    try:
                        await waiter
                    finally:
                        conn._head_waiter = None
                return resp
            except UpstreamError as exc:
                self._retire(conn)
                if not (
                    exc._retry_safe
                    and conn._uses > 1
                    and replayable
                    and (idempotent or not exc.request_sent)
                ):
                    raise
            except BaseException:
                self._retire(conn)
                raise
            conn = await self._acquire(fresh=True)

    async def aclose(self) -> None:
        """Close idle connections now and refuse new requests; connections in use close when
        their response is released; queued waiters get ``ConnectError``."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self._idle:
            self._discard(self._idle.popleft())
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectError("connection pool is closed"))

    # ---- acquiring

    async def _acquire(self, fresh: bool) -> _Connection:
        """A connection for one exchange: an idle one (unless ``fresh``), a new one while under
        ``max_connections``, else the next one freed, in FIFO order."""
        if self._closed:
            raise ConnectError("connection pool is closed")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if not fresh and self._idle:
            conn = self._pop_idle()
            if conn is not None:
                return conn
        limit = self._options.max_connections
        if self._open + self._shared_open() < limit or (
            self._open < limit and self.shared is not None and self.shared.close_one_idle()
        ):
            self._open += 1
            return await self._connect()
        grant = await self._wait_turn()
        if grant is None:
            return await self._connect()  # the slot was handed to us
        if fresh:  # replace the handed-over keep-alive connection, keeping its slot
            grant._state = _DEAD
            grant._close(None)
            return await self._connect()
        return grant

    def _pop_idle(self) -> _Connection | None:
        """The most recently used idle connection that is still good, or None."""
        idle = self._idle
        assert self._loop is not None
        oldest_allowed = self._loop.time() - self._options.idle_timeout
        while idle:
            conn = idle.pop()
            if conn._idle_since <= oldest_allowed:
                self._discard(conn)  # the newest is expired, so are all the others
                while idle:
                    self._discard(idle.popleft())
                return None
            if conn._closed or conn._transport is None or conn._transport.is_closing():
                self._discard(conn)
                continue
            conn._state = _BUSY
            return conn
        return None

    async def _wait_turn(self) -> _Connection | None:
        """Queue for a freed slot (None) or a handed-over idle connection."""
        assert self._loop is not None
        waiter: asyncio.Future[_Connection | None] = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._options.connect_timeout):
                grant = await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._give_back(waiter.result())
            else:
                waiter.cancel()
            if isinstance(exc, TimeoutError):
                raise PoolTimeout(
                    f"no connection to {self._host}:{self._port} freed within "
                    f"{self._options.connect_timeout:g}s (max_connections="
                    f"{self._options.max_connections})"
                ) from None
            raise
        if self._closed:
            self._give_back(grant)
            raise ConnectError("connection pool is closed")
        return grant

    def _give_back(self, grant: _Connection | None) -> None:
        if grant is None:
            self._free_slot()
        else:
            self._checkin(grant)

    async def _connect(self) -> _Connection:
        """Open a connection in an already reserved slot (the slot is freed on failure)."""
        assert self._loop is not None
        loop = self._loop
        conn = _Connection(self, loop)
        options = self._options
        try:
            async with asyncio.timeout(options.connect_timeout):
                await loop.create_connection(
                    lambda: conn,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._server_hostname,
                )
        except BaseException as exc:
            conn._state = _DEAD
            conn._close(None)
            self._free_slot()
            where = f"{self.scheme}://{self._host}:{self._port}"
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout(
                    f"connecting to {where} took over {options.connect_timeout:g}s"
                ) from None
            if isinstance(exc, OSError):
                raise ConnectError(f"cannot connect to {where}: {exc}") from exc
            raise
        self.opened_total += 1
        conn._state = _BUSY
        return conn

    # ---- giving back

    def _checkin(self, conn: _Connection) -> None:
        """A healthy keep-alive connection is free: hand it to the first waiter, else park it."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                conn._state = _BUSY
                waiter.set_result(conn)
                return
        if self._closed or self._options.max_idle <= 0:
            self._retire(conn)
            return
        assert self._loop is not None
        conn._state = _IDLE
        # Idle since the response's last byte: when the upstream's own keep-alive timer
        # started too (and one loop.time() call fewer per request).
        conn._idle_since = conn._last
        idle = self._idle
        idle.append(conn)
        if len(idle) > self._options.max_idle:
            self._discard(idle.popleft())
        if self._sweeper is None:
            self._sweeper = self._loop.call_at(
                idle[0]._idle_since + self._options.idle_timeout, self._sweep
            )

    def _retire(self, conn: _Connection) -> None:
        """A checked-out connection is done for: close it and free its slot."""
        if conn._state == _BUSY:
            conn._state = _DEAD
            self._free_slot()
        conn._close(None)

    def _detach(self, conn: _Connection) -> None:
        """A 101 tunnel leaves the pool: its slot is freed, the socket stays open."""
        if conn._state == _BUSY:
            conn._state = _DETACHED
            self._free_slot()

    def _discard(self, conn: _Connection) -> None:
        """Close a connection already taken off the idle deque and free its slot."""
        conn._state = _DEAD
        conn._close(None)
        self._free_slot()

    def _idle_lost(self, conn: _Connection) -> None:
        """An idle connection closed (peer EOF/reset or unexpected bytes)."""
        conn._state = _DEAD
        try:
            self._idle.remove(conn)
        except ValueError:
            pass
        self._free_slot()

    def _free_slot(self) -> None:
        """Pass a freed slot to the first live waiter (who will connect), else release it."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._open -= 1

    def _sweep(self) -> None:
        """Timer: close idle connections past idle_timeout, re-arm for the next oldest."""
        self._sweeper = None
        assert self._loop is not None
        idle = self._idle
        timeout = self._options.idle_timeout
        oldest_allowed = self._loop.time() - timeout
        while idle and idle[0]._idle_since <= oldest_allowed:
            self._discard(idle.popleft())
        if idle:
            self._sweeper = self._loop.call_at(idle[0]._idle_since + timeout, self._sweep)


def _tls_context(options: PoolOptions) -> ssl.SSLContext:
    """Verification on by default against the system CAs (or only ``ca_file`` when given)."""
    context = ssl.create_default_context(cafile=options.ca_file)
    if not options.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context
