"""Streamed request bodies when the upstream answers before the body is finished: an early
error response, and a full-duplex echo that would deadlock a send-everything-first client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.http1.client_helpers import HOST, Conn, Server, read_all, serve_ok


async def test_early_response_while_the_body_is_still_streaming() -> None:
    """An upstream that rejects the request after the head: the client hands over the 413
    instead of failing on the write, and does not reuse the half-sent connection."""
    more = asyncio.Event()

    async def reject(conn: Conn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        conn.write(b"HTTP/1.1 413 Too Large\r\ncontent-length: 4\r\nconnection: close\r\n\r\nnope")
        await conn.writer.drain()
        more.set()
        await conn.reader.read()  # discard whatever else comes until the client leaves

    async def body() -> AsyncIterator[bytes]:
        yield b"first"
        await more.wait()  # the body source is slower than the upstream's answer
        yield b"second"
        await asyncio.Event().wait()  # and then never ends

    async with Server(reject) as server:
        pool = server.pool()
        resp = await pool.request(b"POST", b"/", HOST, body=body())
        assert resp.status == 413
        assert await read_all(resp) == b"nope"
        assert (pool.in_use, pool.idle) == (0, 0)
        await pool.aclose()


async def test_full_duplex_echo_does_not_deadlock() -> None:
    """The upstream streams its answer while still reading the request: the response is
    returned at once and the rest of the body goes out in the background."""
    total = 4 * 1024 * 1024
    part = b"d" * 65536

    async def echo(conn: Conn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total)
        sent = 0
        while sent < total:
            data = await conn.reader.read(65536)
            conn.write(data)
            sent += len(data)
            await conn.writer.drain()
        await serve_ok(conn)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(total // len(part)):
            yield part

    async with Server(echo, rcvbuf=32768) as server:
        pool = server.pool(read_timeout=5)
        resp = await pool.request(b"POST", b"/", HOST, body=body(), content_length=total)
        assert resp.status == 200
        assert len(await read_all(resp)) == total
        assert pool.idle == 1  # body fully sent and response fully read: reusable
        assert await read_all(await pool.request(b"GET", b"/", HOST)) == b"ok"
        assert server.accepts == 1
        await pool.aclose()


class SourceGone(Exception):
    """Stands in for the downstream client disconnecting mid-upload."""


async def test_body_source_error_passes_through_and_closes_the_connection() -> None:
    seen_eof = asyncio.Event()

    async def upload(conn: Conn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        await conn.reader.read()  # until the client closes
        seen_eof.set()

    async def body() -> AsyncIterator[bytes]:
        yield b"partial"
        raise SourceGone

    async with Server(upload) as server:
        pool = server.pool()
        with pytest.raises(SourceGone):
            await pool.request(b"POST", b"/", HOST, body=body())
        assert (pool.in_use, pool.idle) == (0, 0)
        await asyncio.wait_for(seen_eof.wait(), 5)
        await pool.aclose()
