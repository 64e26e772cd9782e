"""Helpers for the http1 *server* tests: a real ``Server`` on a loopback port, and raw-socket
clients that send exact bytes and parse responses with their own small parser (independent of
the code under test). Nothing here mocks our code; waiting is polling with a deadline."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import orjson

from piuptime.http1.server import Handler, Request, Responder, Server, ServerLimits

HOST = "127.0.0.1"
TIMEOUT = 5.0


@dataclass
class Seen:
    """What a handler observed of one request."""

    method: bytes
    path: bytes
    query: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""


@dataclass
class ServerUnderTest:
    """A listening server plus what its handler saw and what ``on_error`` reported."""

    server: Server
    port: int
    ssl_client: ssl.SSLContext | None = None
    seen: list[Seen] = field(default_factory=list)
    errors: list[tuple[Request | None, int, str]] = field(default_factory=list)

    @property
    def paths(self) -> list[bytes]:
        return [s.path for s in self.seen]

    async def connect(self) -> RawClient:
        reader, writer = await asyncio.open_connection(
            HOST,
            self.port,
            ssl=self.ssl_client,
            server_hostname="localhost" if self.ssl_client else None,
        )
        return RawClient(reader, writer)


@asynccontextmanager
async def serve(
    make_handler: Callable[[ServerUnderTest], Handler],
    limits: ServerLimits | None = None,
    *,
    ssl_server: ssl.SSLContext | None = None,
    ssl_client: ssl.SSLContext | None = None,
) -> AsyncIterator[ServerUnderTest]:
    """Run a server on 127.0.0.1:<free port>; ``make_handler`` gets the ``ServerUnderTest``
    (so the handler can record into ``seen``) and returns the handler."""
    errors: list[tuple[Request | None, int, str]] = []

    async def placeholder(req: Request, resp: Responder) -> None:  # replaced below
        raise AssertionError

    server = Server(
        placeholder,
        limits or ServerLimits(),
        ssl=ssl_server,
        on_error=lambda req, status, msg: errors.append((req, status, msg)),
    )
    await server.listen(HOST, 0)
    sut = ServerUnderTest(server, server.sockets[0].getsockname()[1], ssl_client, errors=errors)
    server.handler = make_handler(sut)
    try:
        yield sut
    finally:
        server.abort_all()
        await eventually(lambda: server.active_connections == 0)


async def eventually(predicate: Callable[[], object], within: float = TIMEOUT) -> None:
    """Poll ``predicate`` until true or fail at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.002)


# --- handlers ------------------------------------------------------------------------------------


async def read_body(req: Request) -> bytes:
    parts = []
    while chunk := await req.read():
        parts.append(chunk)
    return b"".join(parts)


def echo(sut: ServerUnderTest) -> Handler:
    """Records the request, reads its whole body and answers 200 with a JSON summary
    (``content-length`` framed), echoing the body under ``"body"``."""

    async def handler(req: Request, resp: Responder) -> None:
        seen = Seen(req.method, req.path, req.query, req.version, list(req.headers))
        sut.seen.append(seen)
        seen.body = await read_body(req)
        resp.send(
            200,
            orjson.dumps(
                {
                    "method": req.method.decode(),
                    "path": req.path.decode(),
                    "body": seen.body.decode("latin-1"),
                }
            ),
        )

    return handler


def record_then(
    action: Callable[[Request, Responder], Awaitable[None]],
) -> Callable[[ServerUnderTest], Handler]:
    """A handler factory that records the request head, then runs ``action``."""

    def make(sut: ServerUnderTest) -> Handler:
        async def handler(req: Request, resp: Responder) -> None:
            sut.seen.append(Seen(req.method, req.path, req.query, req.version, list(req.headers)))
            await action(req, resp)

        return handler

    return make


# --- raw client ----------------------------------------------------------------------------------


@dataclass
class RawResponse:
    version: bytes
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunked: bool = False

    def header(self, name: bytes) -> bytes | None:
        values = [v for n, v in self.headers if n == name]
        assert len(values) <= 1, f"repeated {name!r}"
        return values[0] if values else None

    def json(self) -> object:
        return orjson.loads(self.body)


class RawClient:
    """A socket that sends exact bytes and reads responses strictly."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, method: bytes = b"GET", within: float = TIMEOUT) -> RawResponse:
        """Read one response (1xx included) and its body."""
        async with asyncio.timeout(within):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head[:-4].split(b"\r\n")
            version, status, reason = [*lines[0].split(b" ", 2), b""][:3]
            assert version in (b"HTTP/1.1", b"HTTP/1.0"), lines[0]
            headers = []
            for line in lines[1:]:
                name, sep, value = line.partition(b":")
                assert sep and name == name.strip() and name == name.lower(), line
                headers.append((name, value.strip()))
            resp = RawResponse(version, int(status), reason, headers, b"")
            code = resp.status
            if code < 200 or code in (204, 304) or method == b"HEAD":
                return resp
            te = resp.header(b"transfer-encoding")
            length = resp.header(b"content-length")
            assert not (te and length), "both content-length and transfer-encoding"
            if te is not None:
                assert te == b"chunked"
                resp.chunked = True
                resp.body = await self._read_chunked()
            elif length is not None:
                resp.body = await self.reader.readexactly(int(length))
            else:
                resp.body = await self.reader.read()  # close-delimited
            return resp

    async def _read_chunked(self) -> bytes:
        body = []
        while True:
            line = await self.reader.readuntil(b"\r\n")
            size = int(line[:-2], 16)
            assert line[:-2] == b"%x" % size, line
            if size == 0:
                assert await self.reader.readexactly(2) == b"\r\n"
                return b"".join(body)
            body.append(await self.reader.readexactly(size))
            assert await self.reader.readexactly(2) == b"\r\n"

    async def closed(self, within: float = TIMEOUT) -> bool:
        """True when the server closed (EOF or reset) before the deadline, with no more bytes."""
        try:
            async with asyncio.timeout(within):
                rest = await self.reader.read()
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        assert rest == b"", f"unexpected bytes after the response: {rest[:200]!r}"
        return True

    async def still_open(self, wait: float = 0.05) -> bool:
        """True when nothing (no EOF) arrives within ``wait`` seconds."""
        try:
            async with asyncio.timeout(wait):
                data = await self.reader.read(1)
        except TimeoutError:
            return True
        assert data == b"", f"unexpected bytes {data!r}"
        return False

    def close(self) -> None:
        self.writer.close()


def request(
    method: str = "GET",
    path: str = "/",
    body: bytes | None = None,
    headers: list[tuple[str, str]] | None = None,
    version: str = "1.1",
) -> bytes:
    """Serialise a simple request (Host added for HTTP/1.1, content-length for a body)."""
    lines = [f"{method} {path} HTTP/{version}"]
    if version == "1.1":
        lines.append("Host: test")
    for name, value in headers or []:
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
