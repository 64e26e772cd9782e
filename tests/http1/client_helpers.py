"""Byte-exact test servers for the HTTP/1.1 client tests.

Each server runs a coroutine per accepted connection, ``handler(conn)``, that reads requests
with ``conn.read_request()`` and writes whatever bytes the test wants, so faults (stalls,
resets, malformed framing, early closes) are injected for real on loopback sockets.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from piuptime.http1.client import Pool, PoolOptions, Response

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


@dataclass
class Request:
    """A request as the test server parsed it (names lower-cased)."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw_head: bytes

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass
class Conn:
    """One accepted connection, as seen by a handler."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    index: int  # 0 for the first accepted connection, 1 for the next, ...
    requests: int = 0  # requests read so far on this connection

    async def read_request(self) -> Request | None:
        """Read one request (head + CL or chunked body); None at EOF before a request."""
        try:
            raw_head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = raw_head[:-4].split(b"\r\n")
        method, target, _ = lines[0].split(b" ", 2)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        request = Request(method, target, headers, b"", raw_head)
        if request.header(b"transfer-encoding") == b"chunked":
            request.body = await self._read_chunked()
        elif (length := request.header(b"content-length")) is not None:
            request.body = await self.reader.readexactly(int(length))
        self.requests += 1
        return request

    async def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return bytes(body)
            body += await self.reader.readexactly(size)
            await self.reader.readexactly(2)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def abort(self) -> None:
        """Close with a TCP reset."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            linger_zero = b"\x01\x00\x00\x00\x00\x00\x00\x00"
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_zero)
        self.writer.transport.abort()


Handler = Callable[[Conn], Awaitable[None]]


async def serve_ok(conn: Conn) -> None:
    """Answer every request on the connection with ``200 ok`` (keep-alive)."""
    while await conn.read_request() is not None:
        conn.write(OK)


@dataclass
class Server:
    """``async with Server(handler) as server``: a loopback server counting accepts."""

    handler: Handler = serve_ok
    ssl: ssl.SSLContext | None = None
    rcvbuf: int | None = None  # SO_RCVBUF for accepted sockets (set before listen)
    accepts: int = 0
    conns: list[Conn] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def __aenter__(self) -> Server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.bind(("127.0.0.1", 0))
        self._server = await asyncio.start_server(self._accept, sock=sock, ssl=self.ssl)
        self.port = sock.getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for conn in self.conns:
            conn.writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(reader, writer, self.accepts)
        self.accepts += 1
        self.conns.append(conn)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(conn)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or the test is over
        finally:
            self._tasks.discard(task)
            writer.close()

    def pool(self, **options: object) -> Pool:
        scheme = "https" if self.ssl else "http"
        return Pool(scheme, "127.0.0.1", self.port, PoolOptions(**options))  # type: ignore[arg-type]


async def eventually(
    predicate: Callable[[], bool], what: str = "condition", within: float = 5.0
) -> None:
    """Poll ``predicate`` until true, failing after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


async def read_all(resp: Response) -> bytes:
    """The whole body, then release the response."""
    chunks = []
    try:
        while chunk := await resp.read():
            chunks.append(chunk)
    finally:
        resp.release()
    return b"".join(chunks)


async def get(pool: Pool, target: bytes = b"/", method: bytes = b"GET", **kw: object) -> bytes:
    """One request with a host header; returns the body and releases."""
    resp = await pool.request(method, target, [(b"host", b"test")], **kw)  # type: ignore[arg-type]
    return await read_all(resp)


HOST = [(b"host", b"test")]
