"""Flow control over real sockets: a client that does not read cannot make the server buffer a
large response, a handler that does not read cannot make it buffer a large request body, and
the fast paths (``drain`` when not paused, ``read`` of a buffered body) never suspend."""

from __future__ import annotations

import asyncio
import socket

from piuptime.http1.errors import ClientDisconnected
from piuptime.http1.server import HIGH_WATER, Request, Responder, ServerLimits
from tests.http1.server_helpers import (
    HOST,
    RawClient,
    ServerUnderTest,
    eventually,
    read_body,
    record_then,
    request,
    serve,
)

MB = 1024 * 1024
CHUNK = 64 * 1024


async def small_buffer_client(sut: ServerUnderTest) -> RawClient:
    """A client socket with a small receive buffer, so a non-reading client fills up fast."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (HOST, sut.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    return RawClient(reader, writer)


async def test_slow_reader_cannot_make_the_server_buffer_a_large_response() -> None:
    total = 50 * MB
    state = {"sent": 0, "in_drain": False, "max_buffer": 0}

    async def stream(req: Request, resp: Responder) -> None:
        resp.start(200, [(b"content-length", str(total).encode())])
        transport = resp._transport  # probe: what the server holds in user space
        block = b"x" * CHUNK
        while state["sent"] < total:
            resp.write(block)
            state["sent"] += CHUNK
            state["max_buffer"] = max(state["max_buffer"], transport.get_write_buffer_size())
            state["in_drain"] = True
            await resp.drain()
            state["in_drain"] = False
        resp.end()

    async with serve(record_then(stream)) as sut:
        client = await small_buffer_client(sut)
        await client.send(request())
        # the client reads nothing: the handler must end up parked in drain()
        await eventually(lambda: state["in_drain"] and state["sent"] > 0)
        parked_at = state["sent"]
        assert parked_at < 10 * MB, parked_at  # kernel buffers + high water, not 50 MB
        assert state["max_buffer"] <= HIGH_WATER + CHUNK
        # now read everything: the stream completes and every byte arrives
        head = await client.reader.readuntil(b"\r\n\r\n")
        assert b"content-length: %d" % total in head
        received = 0
        while received < total:
            received += len(await client.reader.read(MB))
        assert received == total
        assert state["sent"] == total


async def test_drain_wait_is_bounded_by_body_timeout() -> None:
    outcome: list[str] = []

    async def stream(req: Request, resp: Responder) -> None:
        resp.start(200, [])
        try:
            while True:
                resp.write(b"x" * CHUNK)
                await resp.drain()
        except ClientDisconnected:
            outcome.append("disconnected")

    async with serve(record_then(stream), ServerLimits(body_timeout=0.2)) as sut:
        client = await small_buffer_client(sut)
        await client.send(request())
        await eventually(lambda: outcome == ["disconnected"])
        await eventually(lambda: sut.server.active_connections == 0)


async def test_slow_handler_pauses_reading_of_a_large_body() -> None:
    total = 8 * MB
    release = asyncio.Event()
    held: list[Request] = []

    async def slow(req: Request, resp: Responder) -> None:
        held.append(req)
        await release.wait()
        body = await read_body(req)
        resp.send(200, b'{"length": %d}' % len(body))

    async with serve(record_then(slow)) as sut:
        client = await sut.connect()
        client.writer.transport.set_write_buffer_limits(high=0)
        client.writer.write(
            b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % total + b"y" * total
        )
        # the server stops reading, so the bytes back up into the client's own buffer
        await eventually(lambda: len(held) == 1)
        (conn,) = sut.server._connections
        await eventually(lambda: conn._read_paused)
        assert client.writer.transport.get_write_buffer_size() > total // 2
        (req,) = held
        assert req._buffered <= HIGH_WATER + 256 * 1024  # at most one read past the mark
        release.set()
        resp = await client.response()
        assert resp.json() == {"length": total}


async def test_pipelined_requests_beyond_the_limit_pause_reading() -> None:
    release = asyncio.Event()

    async def handler(req: Request, resp: Responder) -> None:
        if req.path == b"/0":
            await release.wait()
        resp.send(200, req.path, content_type=b"text/plain")

    count = 200
    async with serve(record_then(handler), ServerLimits(max_pipeline=4)) as sut:
        client = await sut.connect()
        # send in several writes so the server sees them over several reads
        for i in range(count):
            client.writer.write(request("GET", f"/{i}"))
            if i % 20 == 19:
                await client.writer.drain()
                await asyncio.sleep(0)
        (conn,) = sut.server._connections
        await eventually(lambda: conn._read_paused)
        queued = len(conn._queue)
        assert 4 < queued < count - 1
        release.set()
        for i in range(count):
            assert (await client.response()).body == f"/{i}".encode()
        assert sut.paths == [f"/{i}".encode() for i in range(count)]


async def test_fast_paths_do_not_suspend() -> None:
    results: list[object] = []

    async def handler(req: Request, resp: Responder) -> None:
        # the body arrived with the head: read() must complete without suspending
        coro = req.read()
        try:
            coro.send(None)
        except StopIteration as done:
            results.append(done.value)
        else:  # pragma: no cover - would mean a suspension
            results.append("suspended")
            coro.close()
        end = req.read()
        try:
            end.send(None)
        except StopIteration as done:
            results.append(done.value)
        resp.start(200, [(b"content-length", b"2")])
        resp.write(b"o")
        drain = resp.drain()
        try:
            drain.send(None)
        except StopIteration:
            results.append("drained")
        resp.end(b"k")

    async with serve(record_then(handler)) as sut:
        client = await sut.connect()
        await client.send(request("POST", "/", body=b"abc"))
        assert (await client.response()).body == b"ok"
    assert results == [b"abc", b"", "drained"]
