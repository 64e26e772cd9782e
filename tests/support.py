"""Test helpers shared by the integration tests: ports, an independent HTTP client, processes.

The client here is deliberately *not* piuptime's own: raw asyncio streams plus httptools' response
parser, so a bug in ``piuptime.http1.client`` cannot hide itself in the tests that use this.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httptools

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` until true or fail after ``timeout`` (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


def wait_until_sync(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.01)


@dataclass
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    reason: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_all(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]


class _Collect:
    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.done = False
        self.head_done = False
        self.more = False  # a next (pipelined) response began in the same bytes

    def on_message_begin(self) -> None:
        if self.done:
            self.more = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.done:
            self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        if not self.done:
            self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True


def _first_message_end(raw: bytes) -> int:
    """Length of the first complete response in ``raw`` (the shortest prefix that parses
    to a complete message; completeness only grows with the prefix, so bisect)."""

    def complete(n: int) -> bool:
        c = _Collect()
        with contextlib.suppress(httptools.HttpParserError):
            httptools.HttpResponseParser(c).feed_data(raw[:n])
        return c.done

    lo, hi = 0, len(raw)
    while lo < hi:
        mid = (lo + hi) // 2
        if complete(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


class RawClient:
    """One keep-alive connection; ``request`` sends raw bytes or a simple request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.closed = False

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1", ssl: object = None) -> RawClient:
        kwargs: dict[str, object] = {}
        if ssl is not None:
            kwargs = {"ssl": ssl, "server_hostname": "localhost"}
        r, w = await asyncio.open_connection(host, port, **kwargs)  # type: ignore[arg-type]
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_response(self, head_only: bool = False, timeout: float = 10.0) -> Reply:
        c = _Collect()
        p = httptools.HttpResponseParser(c)
        buf = self._leftover if hasattr(self, "_leftover") else b""
        self._leftover = b""
        self._raw = [buf]
        if buf:
            self._feed(p, c, buf, head_only)
        while not c.done and not (head_only and c.head_done):
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                with contextlib.suppress(httptools.HttpParserError):
                    p.feed_data(b"")
                if not c.done and not c.head_done:
                    raise ConnectionError("connection closed before a response")
                self.closed = True
                break
            self._feed(p, c, data, head_only)
        return Reply(p.get_status_code(), c.headers, b"".join(c.body))

    def _feed(
        self, p: httptools.HttpResponseParser, c: _Collect, data: bytes, head_only: bool
    ) -> None:
        if data is not self._raw[0]:
            self._raw.append(data)
        try:
            p.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            self._leftover = data[offset:]
            c.done = True
        if c.more:
            # Pipelined responses arrived in one read: keep what follows this one.
            raw = b"".join(self._raw)
            end = _first_message_end(raw)
            self._leftover = raw[end:]
        if head_only and c.head_done:
            # Everything after the head belongs to the next response.
            idx = data.find(b"\r\n\r\n")
            self._leftover = data[idx + 4 :] if idx >= 0 else b""

    async def request(
        self,
        method: str = "GET",
        path: str = "/",
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        host: str = "test",
    ) -> Reply:
        hs = {"Host": host, **(headers or {})}
        if body is not None and "Transfer-Encoding" not in hs:
            hs["Content-Length"] = str(len(body))
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hs.items())
        await self.send(head.encode() + b"\r\n" + (body or b""))
        return await self.read_response(head_only=method == "HEAD")

    async def is_closed_by_peer(self, timeout: float = 5.0) -> bool:
        try:
            data = await asyncio.wait_for(self.reader.read(1), timeout)
        except (ConnectionError, TimeoutError):
            return isinstance(sys.exc_info()[1], ConnectionError)
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def fetch(port: int, path: str = "/", method: str = "GET", **kw: object) -> Reply:
    """One request on a fresh connection."""
    c = await RawClient.connect(port)
    try:
        return await c.request(method, path, **kw)  # type: ignore[arg-type]
    finally:
        await c.close()


# -- upstream servers for tests -------------------------------------------------------------


@dataclass
class SeenRequest:
    method: bytes
    path: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


Handler = Callable[[SeenRequest, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Upstream:
    """A raw asyncio HTTP/1.1 upstream that records what it got; behaviour per test."""

    name: str = "up"
    seen: list[SeenRequest] = field(default_factory=list)
    connections: int = 0
    server: asyncio.AbstractServer | None = None
    port: int = 0
    handler: Handler | None = None
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> Upstream:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        try:
            while True:
                req = await _read_request(reader)
                if req is None:
                    break
                self.seen.append(req)
                if self.handler is not None:
                    await self.handler(req, writer)
                else:
                    body = self.name.encode()
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-upstream: "
                        + self.name.encode()
                        + b"\r\ncontent-length: "
                        + str(len(body)).encode()
                        + b"\r\n\r\n"
                        + body
                    )
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def stop(self) -> None:
        """Stop like a dead device: no new connections, and open ones are reset."""
        for w in list(self.writers):
            w.transport.abort()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)


class _RequestCollect(_Collect):
    def __init__(self) -> None:
        super().__init__()
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url


async def _read_request(reader: asyncio.StreamReader) -> SeenRequest | None:
    """Read one request (the gateway's client never pipelines, so no leftover handling)."""
    c = _RequestCollect()
    parser = httptools.HttpRequestParser(c)
    while not c.done:
        data = await reader.read(65536)
        if not data:
            return None
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            c.done = True
    return SeenRequest(parser.get_method(), c.url, c.headers, b"".join(c.body))


# -- processes ------------------------------------------------------------------------------


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextlib.contextmanager
def process(args: list[str], **kw: object) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, **kw)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


class NotifySocket:
    """A NOTIFY_SOCKET for a child process; collects its sd_notify messages."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                continue
            except OSError:
                return

    def count(self, text: str) -> int:
        return sum(text in m for _, m in self.messages)

    def wait(self, text: str, count: int = 1, timeout: float = 10.0) -> float:
        """Wait until ``text`` was seen ``count`` times; returns the arrival time of that one."""
        wait_until_sync(lambda: self.count(text) >= count, timeout, f"sd_notify {text!r}")
        return [t for t, m in self.messages if text in m][count - 1]

    def close(self) -> None:
        self._stop.set()
        self._t.join()
        self.sock.close()


def piuptime_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "piuptime", *args]


# -- the gateway in-process -----------------------------------------------------------------


async def start_app(text: str, tmp_path: Path | None = None, **kw: object):  # type: ignore[no-untyped-def]
    """Start an App from YAML text (written to a file when ``tmp_path`` is given, so it can be
    reloaded). Listeners should use port 0; returns (app, port of the first listener)."""
    from piuptime.app import App
    from piuptime.config import load_config, parse_config

    path = None
    if tmp_path is not None:
        path = tmp_path / "piuptime.yaml"
        path.write_text(text)
        config = load_config(path)
    else:
        config = parse_config(text, "test.yaml")
    app = App(config, path, **kw)  # type: ignore[arg-type]
    await app.start()
    port = app.servers[0].sockets[0].getsockname()[1]
    return app, port


def gateway_yaml(
    upstreams: dict[str, list[int]], routes: str, extra: str = "", gateway: str = ""
) -> str:
    """A config with port-0 listener, given upstream target ports and a routes block."""
    lines = ["gateway:", '  listen: ["127.0.0.1:0"]', "  access_log: {path: off}"]
    if gateway:
        lines.append(gateway.rstrip())
    lines.append("upstreams:")
    for name, ports in upstreams.items():
        lines.append(f"  {name}:")
        lines.append("    targets:")
        for p in ports:
            lines.append(f'      - {{url: "http://127.0.0.1:{p}"}}')
        lines.append("    timeouts: {connect: 1s, read: 2s}")
    lines.append("routes:")
    lines.append(routes.rstrip())
    if extra:
        lines.append(extra.rstrip())
    return "\n".join(lines) + "\n"
