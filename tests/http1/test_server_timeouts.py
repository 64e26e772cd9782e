"""Timeouts over real sockets: header (slowloris), idle keep-alive and request body."""

from __future__ import annotations

import asyncio

from piuptime.http1.errors import BodyTimeout
from piuptime.http1.server import Request, Responder, ServerLimits
from tests.http1.server_helpers import echo, eventually, read_body, record_then, request, serve

SHORT = 0.2


async def elapsed_since(start: float) -> float:
    return asyncio.get_running_loop().time() - start


async def test_half_a_head_gets_408_and_close() -> None:
    async with serve(echo, ServerLimits(header_timeout=SHORT)) as sut:
        client = await sut.connect()
        start = asyncio.get_running_loop().time()
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        resp = await client.response()
        assert resp.status == 408
        assert resp.header(b"connection") == b"close"
        assert await client.closed()
        assert SHORT * 0.9 <= await elapsed_since(start) < SHORT + 1.0
        assert sut.seen == []
        assert [e[1] for e in sut.errors] == [408]


async def test_slowloris_trickle_does_not_extend_the_header_timeout() -> None:
    async with serve(echo, ServerLimits(header_timeout=SHORT)) as sut:
        client = await sut.connect()
        start = asyncio.get_running_loop().time()
        head = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 50
        sender = asyncio.create_task(trickle(client.writer, head))
        resp = await client.response()
        assert resp.status == 408
        assert await elapsed_since(start) < SHORT + 1.0
        sender.cancel()
        assert sut.seen == []


async def trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    for i in range(len(data)):
        writer.write(data[i : i + 1])
        await asyncio.sleep(0.02)


async def test_silent_connection_is_closed_without_a_response() -> None:
    async with serve(echo, ServerLimits(header_timeout=SHORT)) as sut:
        client = await sut.connect()
        assert await client.closed()  # no 408: nothing was asked
        assert sut.errors == []


async def test_header_timeout_applies_to_the_next_request_too() -> None:
    async with serve(echo, ServerLimits(header_timeout=SHORT)) as sut:
        client = await sut.connect()
        await client.send(request())
        assert (await client.response()).status == 200
        await client.send(b"GET /next HTTP/1.1\r\n")
        assert (await client.response()).status == 408
        assert await client.closed()


async def test_idle_keep_alive_connection_closes_silently() -> None:
    async with serve(echo, ServerLimits(idle_timeout=SHORT)) as sut:
        client = await sut.connect()
        await client.send(request())
        assert (await client.response()).status == 200
        start = asyncio.get_running_loop().time()
        assert await client.closed()
        assert SHORT * 0.9 <= await elapsed_since(start) < SHORT + 1.0
        assert sut.errors == []
        await eventually(lambda: sut.server.active_connections == 0)


async def test_idle_timeout_does_not_cut_a_slow_handler() -> None:
    async def slow(req: Request, resp: Responder) -> None:
        await asyncio.sleep(SHORT * 2)  # longer than idle and header timeouts
        resp.send(200, b"{}")

    async with serve(
        record_then(slow), ServerLimits(idle_timeout=SHORT, header_timeout=SHORT)
    ) as sut:
        client = await sut.connect()
        await client.send(request())
        assert (await client.response()).status == 200
        assert await client.still_open(0.01)


async def test_body_timeout_gives_408() -> None:
    async with serve(echo, ServerLimits(body_timeout=SHORT)) as sut:
        client = await sut.connect()
        await client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        start = asyncio.get_running_loop().time()
        resp = await client.response()
        assert resp.status == 408
        assert resp.json() == {
            "error": {
                "status": 408,
                "code": "body_timeout",
                "message": "request body not received in time",
            }
        }
        assert await client.closed()
        assert SHORT * 0.9 <= await elapsed_since(start) < SHORT + 1.0


async def test_body_bytes_reset_the_body_timeout() -> None:
    # the whole body takes longer than the timeout; each gap stays well below it
    async with serve(echo, ServerLimits(body_timeout=SHORT * 3)) as sut:
        client = await sut.connect()
        await client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
        for byte in b"abcd":
            await asyncio.sleep(SHORT)
            await client.send(bytes([byte]))
        resp = await client.response()
        assert resp.json() == {"method": "POST", "path": "/", "body": "abcd"}


async def test_body_timeout_after_the_response_started_closes() -> None:
    outcome: list[str] = []

    async def stream_then_read(req: Request, resp: Responder) -> None:
        resp.start(200, [])
        resp.write(b"early")
        await resp.drain()
        try:
            await read_body(req)
        except BodyTimeout:
            outcome.append("timeout")
            raise

    async with serve(record_then(stream_then_read), ServerLimits(body_timeout=SHORT)) as sut:
        client = await sut.connect()
        await client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        data = await client.reader.read()  # until the server closes
        assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"5\r\nearly\r\n")
        assert outcome == ["timeout"]
