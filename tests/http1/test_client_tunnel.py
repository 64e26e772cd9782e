"""101 Switching Protocols: ``Response.detach()`` hands over a raw byte tunnel."""

from __future__ import annotations

import asyncio

import pytest

from piuptime.http1.client import WriteError
from tests.http1.client_helpers import HOST, Conn, Server, eventually, get, read_all

UPGRADE = [*HOST, (b"connection", b"upgrade"), (b"upgrade", b"echo")]
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n"


class EchoUpgrade:
    """Switches to an echo protocol: sends ``early`` right behind the 101 head, then echoes
    every byte until EOF; plain requests get ``200 ok``."""

    def __init__(self, early: bytes = b"") -> None:
        self.early = early
        self.eof = asyncio.Event()

    async def __call__(self, conn: Conn) -> None:
        while (request := await conn.read_request()) is not None:
            if request.header(b"upgrade") != b"echo":
                conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                continue
            conn.write(SWITCH + self.early)
            while data := await conn.reader.read(65536):
                conn.write(data)
                await conn.writer.drain()
            self.eof.set()
            return


async def test_detach_gives_an_echo_tunnel() -> None:
    echo = EchoUpgrade(early=b"early bytes")
    async with Server(echo) as server:
        pool = server.pool()
        resp = await pool.request(b"GET", b"/ws", UPGRADE)
        assert resp.status == 101
        assert resp.headers == [(b"upgrade", b"echo"), (b"connection", b"Upgrade")]
        assert not resp.keep_alive
        tunnel = resp.detach()
        assert pool.in_use == 0  # a tunnel no longer holds a pool slot
        assert await tunnel.read() == b"early bytes"
        for message in (b"ping", b"x" * 200_000):
            tunnel.write(message)
            await tunnel.drain()
            got = b""
            while len(got) < len(message):
                got += await tunnel.read()
            assert got == message
        resp.release()  # harmless after detach
        tunnel.close()
        await asyncio.wait_for(echo.eof.wait(), 5)
        assert await tunnel.read() == b""
        with pytest.raises(WriteError):
            tunnel.write(b"late")
        assert await get(pool) == b"ok"  # a new connection: the tunnel never returns
        assert server.accepts == 2
        await pool.aclose()


async def test_tunnel_read_returns_empty_when_the_upstream_closes() -> None:
    async def switch_and_close(conn: Conn) -> None:
        await conn.read_request()
        conn.write(SWITCH + b"bye")
        await conn.writer.drain()
        conn.writer.close()

    async with Server(switch_and_close) as server:
        pool = server.pool()
        tunnel = (await pool.request(b"GET", b"/", UPGRADE)).detach()
        data = b""
        while chunk := await tunnel.read():
            data += chunk
        assert data == b"bye"
        with pytest.raises(WriteError):
            await tunnel.drain()
        await pool.aclose()


async def test_tunnel_reading_is_flow_controlled() -> None:
    total = 8 * 1024 * 1024

    async def flood(conn: Conn) -> None:
        await conn.read_request()
        conn.write(SWITCH + b"t" * total)
        await conn.read_request()

    async with Server(flood) as server:
        pool = server.pool()
        resp = await pool.request(b"GET", b"/", UPGRADE)
        conn = resp._conn
        assert conn is not None
        tunnel = resp.detach()
        await eventually(lambda: conn._read_paused, "tunnel paused reading")
        assert tunnel._buffered < 1024 * 1024
        received = 0
        while received < total:
            received += len(await tunnel.read())
        assert received == total
        tunnel.close()
        await pool.aclose()


async def test_releasing_a_101_without_detach_closes_it() -> None:
    echo = EchoUpgrade()
    async with Server(echo) as server:
        pool = server.pool()
        resp = await pool.request(b"GET", b"/", UPGRADE)
        assert await read_all(resp) == b""
        assert (pool.in_use, pool.idle) == (0, 0)
        await asyncio.wait_for(echo.eof.wait(), 5)
        with pytest.raises(RuntimeError):
            resp.detach()
        await pool.aclose()


async def test_detach_requires_a_101() -> None:
    async with Server(EchoUpgrade()) as server:
        pool = server.pool()
        resp = await pool.request(b"GET", b"/", HOST)
        with pytest.raises(RuntimeError):
            resp.detach()
        assert await read_all(resp) == b"ok"
        assert pool.idle == 1
        await pool.aclose()
