"""Helpers for the fast-lane tests (tests/gateway/test_lane.py): a config builder, which path
served what (``FastLane.requests`` / ``.handovers``), raw exchanges, and fake upstream answers
written byte for byte (informational answers, chunked and close-delimited bodies, stalls)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.support import RawClient, Reply, SeenRequest, Upstream, start_app

Handler = Callable[[SeenRequest, asyncio.StreamWriter], Awaitable[None]]


def config(
    ports: list[int],
    *,
    fast_lane: bool = True,
    upstream: str = "",
    route: str = "",
    gateway: str = "",
    path: str = "/",
    more_routes: str = "",
    more_upstreams: str = "",
    access_log: str = "off",
) -> str:
    """One upstream ``devs`` of ``ports`` and one route ``r`` on ``path`` (a prefix when it ends
        in /); ``upstream``, ``route`` and ``gateway`` hold more keys of those sections (YAML lines,
        unindented), ``more_routes`` and ``more_upstreams`` more entries of those sections (YAML
    lines indented as they would be there)."""
    lines = ["gateway:", '  listen: ["127.0.0.1:0"]', f"  access_log: {{path: {access_log}}}"]
    if not fast_lane:
        lines.append("  fast_lane: false")
    lines += ["  " + x for x in gateway.strip().splitlines()]
    lines += ["upstreams:", "  devs:", "    targets:"]
    lines += [f'      - {{url: "http://127.0.0.1:{p}"}}' for p in ports]
    if "timeouts" not in upstream:
        lines.append("    timeouts: {connect: 1s, read: 2s}")
    lines += ["    " + x for x in upstream.strip().splitlines()]
    lines += more_upstreams.rstrip().splitlines()
    lines += ["routes:", "  - name: r", f'    match: {{path: "{path}"}}', "    upstream: devs"]
    lines += ["    " + x for x in route.strip().splitlines()]
    lines += more_routes.rstrip().splitlines()
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def running(text: str) -> AsyncIterator[tuple[Any, int]]:
    app, port = await start_app(text)
    try:
        yield app, port
    finally:
        await app.stop()


def served(app: Any) -> tuple[int, int]:
    """(requests the lanes forwarded themselves, connections they handed to the Python path)."""
    return sum(x.requests for x in app.lanes), sum(x.handovers for x in app.lanes)


def expect_served(app: Any, fast_lane: bool, lane: int, handed: int) -> None:
    """With the lane on: exactly ``lane`` requests forwarded by it and ``handed`` connections
    handed over; with it off: no lane at all."""
    if fast_lane:
        assert len(app.lanes) == 1
        assert served(app) == (lane, handed), f"(lane, handed) = {served(app)}"
    else:
        assert app.lanes == []


def target_state(app: Any, index: int = 0) -> dict[str, Any]:
    return app.runtime.snapshot()["upstreams"]["devs"]["targets"][index]  # type: ignore[no-any-return]


def pool_of(app: Any, index: int = 0) -> Any:
    return app.runtime.upstreams["devs"].targets[index].pool


# -- clients ---------------------------------------------------------------------------------


async def exchange(port: int, raw: bytes, head_only: bool = False) -> tuple[RawClient, Reply]:
    """Send ``raw`` on a new connection and read one answer; the connection stays open."""
    c = await RawClient.connect(port)
    await c.send(raw)
    return c, await c.read_response(head_only=head_only)


async def read_until_closed(c: RawClient, timeout: float = 5.0) -> bytes:
    """Everything the gateway sends until it closes the connection."""
    out = b""
    async with asyncio.timeout(timeout):
        while True:
            data = await c.reader.read(65536)
            if not data:
                return out
            out += data


def reset(c: RawClient) -> None:
    """Leave like a crashed client: close with a TCP reset (SO_LINGER 0), not a FIN."""
    sock = c.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.writer.transport.abort()


async def slow_reader(port: int, rcvbuf: int = 32768) -> RawClient:
    """A connection with a small receive buffer (a client that reads little at a time)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    r, w = await asyncio.open_connection(sock=sock)
    return RawClient(r, w)


def request(
    method: str = "GET",
    path: str = "/",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    version: str = "1.1",
    host: str | None = "test",
) -> bytes:
    """A raw request; a Content-Length is added for a body unless ``headers`` frame it."""
    hs = list(headers or [])
    if host is not None:
        hs.insert(0, ("Host", host))
    names = {k.lower() for k, _ in hs}
    if body and "content-length" not in names and "transfer-encoding" not in names:
        hs.append(("Content-Length", str(len(body))))
    head = f"{method} {path} HTTP/{version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hs)
    return head.encode() + b"\r\n" + body


# -- upstream answers ------------------------------------------------------------------------


def raw_answer(*parts: bytes, close: bool = False) -> Handler:
    """Write ``parts`` one by one (a drain after each), then close when ``close``."""

    async def handler(req: SeenRequest, w: asyncio.StreamWriter) -> None:
        for part in parts:
            w.write(part)
            await w.drain()
        if close:
            w.close()

    return handler


def echo_path() -> Handler:
    """200 with the request's path (and method) as the body."""

    async def handler(req: SeenRequest, w: asyncio.StreamWriter) -> None:
        body = req.method + b" " + req.path
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
        await w.drain()

    return handler


def status_answer(status: int, body: bytes = b"no", headers: bytes = b"") -> Handler:
    async def handler(req: SeenRequest, w: asyncio.StreamWriter) -> None:
        head = b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n%b\r\n" % (status, len(body), headers)
        w.write(head + body)
        await w.drain()

    return handler


@dataclass
class Flaky:
    """The first ``fail`` requests (over all upstreams sharing this object) get ``bad``; the rest
    the upstream's normal answer (its name)."""

    bad: Handler
    fail: int = 1
    calls: int = 0
    failed: list[str] = field(default_factory=list)  # the upstreams that gave ``bad``

    def handler(self, name: str) -> Handler:
        async def handle(req: SeenRequest, w: asyncio.StreamWriter) -> None:
            self.calls += 1
            if self.calls <= self.fail:
                self.failed.append(name)
                await self.bad(req, w)
                return
            body = name.encode()
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
            await w.drain()

        return handle


async def abort(req: SeenRequest, w: asyncio.StreamWriter) -> None:
    """Read the request, then die without an answer."""
    w.transport.abort()


async def hang(req: SeenRequest, w: asyncio.StreamWriter) -> None:
    """Never answer (until the gateway gives up on the connection)."""
    await asyncio.sleep(30)


@dataclass
class CountingUpstream(Upstream):
    """An ``Upstream`` that also keeps the most connections it ever had open at once."""

    open_now: int = 0
    max_open: int = 0

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        try:
            await super()._conn(reader, writer)
        finally:
            self.open_now -= 1


@dataclass
class BigBody:
    """An answer of ``total`` bytes written in 64 KiB pieces, each after the previous drained,
    from a socket with a small send buffer; ``written`` counts what was handed to the transport,
    ``writer`` is the upstream side of the connection."""

    total: int
    written: int = 0
    writer: asyncio.StreamWriter | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @staticmethod
    def piece(i: int) -> bytes:
        return bytes([i % 251]) * 65536

    def body(self) -> bytes:
        return b"".join(self.piece(i) for i in range(self.total // 65536))

    async def __call__(self, req: SeenRequest, w: asyncio.StreamWriter) -> None:
        assert self.total % 65536 == 0
        self.writer = w
        sock = w.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % self.total)
        for i in range(self.total // 65536):
            w.write(self.piece(i))
            self.written += 65536
            await w.drain()
        self.done.set()

    @property
    def left_upstream(self) -> int:
        """Bytes of the answer that left the upstream process (into its socket)."""
        assert self.writer is not None
        return self.written - self.writer.transport.get_write_buffer_size()


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A port whose connection attempts hang: a listener that never accepts, its accept queue
    filled (the kernel then drops further SYNs, so connecting times out)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(("127.0.0.1", port))
            fillers.append(c)
        yield port
    finally:
        for c in fillers:
            c.close()
        server.close()


async def wait_stalled(value: Callable[[], int], timeout: float = 10.0, polls: int = 10) -> int:
    """Poll ``value`` until it stopped changing for ``polls`` polls in a row (20 ms apart), within
    ``timeout``; returns it."""
    deadline = time.monotonic() + timeout
    last, same = value(), 0
    while same < polls:
        if time.monotonic() > deadline:
            raise AssertionError(f"still changing after {timeout}s: {value()}")
        await asyncio.sleep(0.02)
        now = value()
        same = same + 1 if now == last else 0
        last = now
    return last
