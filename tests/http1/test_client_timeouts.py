"""Connect and read timeouts, connect failures, and read back-pressure, on real sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import pytest

from piuptime.http1.client import (
    ConnectError,
    ConnectTimeout,
    Pool,
    PoolOptions,
    ReadTimeout,
)
from tests.http1.client_helpers import HOST, Conn, Server, eventually, get, read_all


@pytest.fixture
def unaccepting_port() -> Iterator[int]:
    """A loopback port whose accept queue is full: new SYNs are dropped, connect hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):  # backlog 0 admits one; the rest only make sure the queue is full
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    yield port
    for sock in [*fillers, listener]:
        sock.close()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nobody listens on (bound then released)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


async def test_connect_timeout(unaccepting_port: int) -> None:
    pool = Pool("http", "127.0.0.1", unaccepting_port, PoolOptions(connect_timeout=0.1))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ConnectTimeout) as info:
        await get(pool)
    assert 0.09 < loop.time() - started < 2
    assert not info.value.request_sent
    assert not info.value.response_started
    assert (pool.in_use, pool.idle, pool.opened_total) == (0, 0, 0)
    await pool.aclose()


async def test_connection_refused(closed_port: int) -> None:
    pool = Pool("http", "127.0.0.1", closed_port, PoolOptions())
    with pytest.raises(ConnectError) as info:
        await get(pool)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert not info.value.request_sent
    assert pool.in_use == 0
    with pytest.raises(ConnectError):  # and again: nothing leaked
        await get(pool)
    assert pool.in_use == 0
    await pool.aclose()


async def test_unresolvable_host_is_a_connect_failure() -> None:
    """NXDOMAIN is a ConnectError; where no resolver answers, the lookup times out instead."""
    pool = Pool("http", "no-such-host.invalid", 80, PoolOptions(connect_timeout=1))
    with pytest.raises((ConnectError, ConnectTimeout)) as info:
        await get(pool)
    assert not info.value.request_sent
    assert pool.in_use == 0
    await pool.aclose()


async def test_read_timeout_before_the_first_byte() -> None:
    async def silent(conn: Conn) -> None:
        await conn.read_request()
        await conn.read_request()  # never answers

    async with Server(silent) as server:
        pool = server.pool(read_timeout=0.1)
        with pytest.raises(ReadTimeout) as info:
            await get(pool)
        assert info.value.request_sent
        assert not info.value.response_started
        assert (pool.in_use, pool.idle) == (0, 0)
        await pool.aclose()


async def test_read_timeout_between_body_chunks() -> None:
    async def stalls(conn: Conn) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        await conn.read_request()  # never finishes the body

    async with Server(stalls) as server:
        pool = server.pool(read_timeout=0.1)
        resp = await pool.request(b"GET", b"/", HOST)
        assert await resp.read() == b"abc"
        with pytest.raises(ReadTimeout) as info:
            await resp.read()
        assert info.value.response_started
        resp.release()
        assert (pool.in_use, pool.idle) == (0, 0)
        await pool.aclose()


async def test_read_timeout_is_a_gap_not_a_total() -> None:
    """A body trickling in faster than read_timeout never times out, however long it takes."""
    pieces = 12

    async def trickle(conn: Conn) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(pieces):
            await asyncio.sleep(0.03)  # the server's pace, not a wait in the test
            conn.write(b"1\r\nx\r\n")
        conn.write(b"0\r\n\r\n")
        await conn.read_request()

    async with Server(trickle) as server:
        pool = server.pool(read_timeout=0.1)  # total time ~0.36s > read_timeout
        assert await get(pool) == b"x" * pieces
        assert pool.idle == 1
        await pool.aclose()


async def test_slow_consumer_does_not_trip_the_read_timeout() -> None:
    """While reading is paused for back-pressure the upstream is not to blame."""

    async def big(conn: Conn) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n" + b"b" * 1048576)
        await conn.read_request()

    async with Server(big) as server:
        pool = server.pool(read_timeout=0.05)
        resp = await pool.request(b"GET", b"/", HOST)
        await eventually(lambda: resp._conn is not None and resp._conn._read_paused, "paused")
        loop = asyncio.get_running_loop()
        until = loop.time() + 0.15  # three read_timeouts with the caller not reading
        await eventually(lambda: loop.time() > until, "the consumer's delay")
        assert len(await read_all(resp)) == 1048576
        await pool.aclose()


async def test_read_back_pressure_bounds_the_client_buffer() -> None:
    """50 MB queued by the server, nothing read: the client pauses the socket at its high
    water mark instead of buffering the response (the rest waits in the kernel and server)."""
    total = 50 * 1024 * 1024
    server_conns: list[Conn] = []

    async def flood(conn: Conn) -> None:
        server_conns.append(conn)
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % total + b"f" * total)
        await conn.read_request()

    async with Server(flood) as server:
        pool = server.pool()
        resp = await pool.request(b"GET", b"/", HOST)
        conn = resp._conn
        assert conn is not None
        await eventually(lambda: conn._read_paused, "client paused reading")
        assert resp._buffered < 1024 * 1024  # 64 KiB high water + one socket read
        unsent = server_conns[0].writer.transport.get_write_buffer_size()
        assert unsent > 0  # the pressure is real: the server could not push it all
        received = 0
        while chunk := await resp.read():
            received += len(chunk)
            assert resp._buffered < 1024 * 1024
        assert received == total
        resp.release()
        assert pool.idle == 1
        await pool.aclose()


async def test_upstream_that_stops_reading_the_body_times_out() -> None:
    """A streamed body the upstream never reads: drain stalls, ReadTimeout after read_timeout."""

    async def deaf(conn: Conn) -> None:
        await conn.reader.readuntil(b"\r\n\r\n")
        await asyncio.Event().wait()  # never reads the body

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"e" * 65536

    async with Server(deaf, rcvbuf=4096) as server:
        pool = server.pool(read_timeout=0.2)
        with pytest.raises(ReadTimeout) as info:
            await get(pool, method=b"POST", body=endless())
        assert info.value.request_sent
        assert not info.value.response_started
        assert pool.in_use == 0
        await pool.aclose()


async def test_reused_connection_keeps_working_after_timer_fires_idle() -> None:
    """The per-connection timer outlives an exchange; firing while idle must not hurt."""
    async with Server() as server:
        pool = server.pool(read_timeout=0.05)
        assert await get(pool) == b"ok"
        loop = asyncio.get_running_loop()
        until = loop.time() + 0.12
        await eventually(lambda: loop.time() > until, "timer fired while idle")
        assert pool.idle == 1
        assert await get(pool) == b"ok"
        assert server.accepts == 1
        await pool.aclose()
