"""``Pool.send_nowait``: the callback-driven exchange on an idle connection, and its hand-over to
``wait_response()`` (same answers, errors and safe retry as ``request()``) for anything else."""

from __future__ import annotations

import asyncio

import pytest

from piuptime.http1.client import PendingExchange, Pool, ReadTimeout
from tests.http1.client_helpers import HOST, OK, Conn, Server, get, read_all


async def sent(pool: Pool, target: bytes = b"/", method: bytes = b"GET") -> PendingExchange:
    """send_nowait on the pool's idle connection; returns once ``on_ready`` was called."""
    ready = asyncio.get_running_loop().create_future()
    pending = pool.send_nowait(method, target, HOST, lambda: ready.set_result(None))
    assert pending is not None
    await asyncio.wait_for(ready, 5)
    return pending


async def test_nothing_is_sent_without_an_idle_connection() -> None:
    async with Server() as server:
        pool = server.pool()
        assert pool.send_nowait(b"GET", b"/", HOST, lambda: None) is None
        assert server.accepts == 0
        await pool.aclose()


async def test_a_small_whole_response_is_ready_with_its_body() -> None:
    async with Server() as server:
        pool = server.pool()
        assert await get(pool) == b"ok"
        pending = await sent(pool)
        resp = pending.complete_response()
        assert resp is not None
        assert (resp.status, resp.content_length) == (200, 2)
        assert pending.buffered_body() == b"ok"
        resp.release()
        assert (pool.in_use, pool.idle, pool.opened_total) == (0, 1, 1)
        await pool.aclose()


async def large_then_chunked(conn: Conn) -> None:
    await conn.read_request()
    conn.write(OK)
    await conn.read_request()
    body = b"x" * 200_000
    conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
    await conn.read_request()
    conn.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
    await conn.read_request()


async def test_large_and_chunked_answers_continue_with_wait_response() -> None:
    async with Server(large_then_chunked) as server:
        pool = server.pool()
        assert await get(pool) == b"ok"
        pending = await sent(pool)
        resp = await pending.wait_response()
        assert await read_all(resp) == b"x" * 200_000
        pending = await sent(pool)
        if pending.complete_response() is None:  # chunked: ready at the head
            resp = await pending.wait_response()
            assert resp.chunked
            assert await read_all(resp) == b"hi"
        else:  # the whole chunked answer was already there
            assert pending.buffered_body() == b"hi"
            whole = pending.complete_response()
            assert whole is not None
            whole.release()
        assert server.accepts == 1
        await pool.aclose()


async def close_on_second(conn: Conn) -> None:
    if conn.index == 0:
        await conn.read_request()
        conn.write(OK)
        await conn.read_request()
        conn.writer.close()  # the keep-alive race: closed without answering
        return
    while await conn.read_request() is not None:
        conn.write(OK)


async def test_a_stale_connection_is_retried_fresh_by_wait_response() -> None:
    async with Server(close_on_second) as server:
        pool = server.pool()
        assert await get(pool) == b"ok"
        pending = await sent(pool)
        assert pending.complete_response() is None
        resp = await pending.wait_response()
        assert await read_all(resp) == b"ok"
        assert server.accepts == 2
        assert (pool.in_use, pool.idle) == (0, 1)
        await pool.aclose()


async def silent_on_second(conn: Conn) -> None:
    await conn.read_request()
    conn.write(OK)
    await conn.read_request()
    await asyncio.sleep(10)


async def test_a_silent_upstream_gives_read_timeout() -> None:
    async with Server(silent_on_second) as server:
        pool = server.pool(read_timeout=0.2)
        assert await get(pool) == b"ok"
        pending = await sent(pool)
        assert pending.complete_response() is None
        with pytest.raises(ReadTimeout):
            await pending.wait_response()
        assert (pool.in_use, pool.idle) == (0, 0)
        await pool.aclose()
