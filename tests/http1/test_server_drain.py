"""Graceful stop: ``close_listeners``, ``drain`` and ``abort_all``, and the counters."""

from __future__ import annotations

import asyncio

import pytest

from piuptime.http1.server import Request, Responder
from tests.http1.server_helpers import (
    HOST,
    echo,
    eventually,
    read_body,
    record_then,
    request,
    serve,
)


async def test_in_flight_request_finishes_during_drain() -> None:
    release = asyncio.Event()

    async def slow(req: Request, resp: Responder) -> None:
        await release.wait()
        resp.send(200, b"{}")

    async with serve(record_then(slow)) as sut:
        server = sut.server
        busy = await sut.connect()
        await busy.send(request("GET", "/busy"))
        idle = await sut.connect()
        await eventually(lambda: server.active_requests == 1 and server.active_connections == 2)

        server.close_listeners()
        assert await idle.closed()  # idle keep-alive connection closed at once
        with pytest.raises(OSError):
            await asyncio.open_connection(HOST, sut.port)  # no new connections

        drained = asyncio.create_task(server.drain(5.0))
        await asyncio.sleep(0)
        assert not drained.done()
        release.set()
        resp = await busy.response()
        assert resp.status == 200
        assert resp.header(b"connection") == b"close"  # started after the drain began
        assert await busy.closed()
        assert await drained is True
        assert server.active_requests == 0
        busy.close()  # the server half-closed and lingers until the client closes too
        await eventually(lambda: server.active_connections == 0)


async def test_busy_connection_closes_after_its_current_response() -> None:
    release = asyncio.Event()

    async def handler(req: Request, resp: Responder) -> None:
        resp.start(200, [])
        resp.write(b"started before the drain")
        await resp.drain()
        await release.wait()
        resp.end()

    async with serve(record_then(handler)) as sut:
        client = await sut.connect()
        await client.send(request() + request("GET", "/queued"))
        await eventually(lambda: sut.server.active_requests == 1)
        sut.server.close_listeners()
        release.set()
        resp = await client.response()
        assert resp.body == b"started before the drain"
        assert await client.closed()  # the pipelined second request is not served
        assert sut.paths == [b"/"]
        assert await sut.server.drain(1.0)


async def test_drain_times_out_then_abort_all_closes_everything() -> None:
    async def stuck(req: Request, resp: Responder) -> None:
        await read_body(req)  # the client never sends it

    async with serve(record_then(stuck)) as sut:
        client = await sut.connect()
        await client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        await eventually(lambda: sut.server.active_requests == 1)
        assert await sut.server.drain(0.05) is False
        sut.server.abort_all()
        assert await client.closed()
        await eventually(lambda: sut.server.active_requests == 0)
        assert sut.server.active_connections == 0


async def test_drain_with_nothing_open_returns_true() -> None:
    async with serve(echo) as sut:
        client = await sut.connect()
        await client.send(request())
        assert (await client.response()).status == 200
        client.close()
        await eventually(lambda: sut.server.active_connections == 0)
        assert await sut.server.drain(1.0) is True
