"""Pool behaviour on real sockets: keep-alive reuse, LIFO, max_connections with a FIFO queue,
PoolTimeout, max_idle, idle expiry, connections the peer closed, release rules, aclose."""

from __future__ import annotations

import asyncio

import pytest

from piuptime.http1.client import ConnectError, Pool, PoolOptions, PoolTimeout
from tests.http1.client_helpers import HOST, OK, Conn, Server, eventually, get, read_all


class Gate:
    """A handler that answers each request with the connection index and the target, but only
    once the test opens the gate; records arrival order and connections seen closing."""

    def __init__(self, open_: bool = False) -> None:
        self.gate = asyncio.Event()
        if open_:
            self.gate.set()
        self.arrived: list[bytes] = []
        self.waiting = 0
        self.closed = 0

    async def __call__(self, conn: Conn) -> None:
        try:
            while (request := await conn.read_request()) is not None:
                self.arrived.append(request.target)
                self.waiting += 1
                await self.gate.wait()
                self.waiting -= 1
                body = b"%d %s" % (conn.index, request.target)
                conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        finally:
            self.closed += 1


async def test_sequential_requests_reuse_one_connection() -> None:
    async with Server() as server:
        pool = server.pool()
        for _ in range(5):
            assert await get(pool) == b"ok"
        assert server.accepts == 1
        assert pool.opened_total == 1
        assert (pool.in_use, pool.idle) == (0, 1)
        await pool.aclose()


async def test_idle_connections_are_reused_most_recent_first() -> None:
    gate = Gate()
    async with Server(gate) as server:
        pool = server.pool()
        tasks = [asyncio.ensure_future(pool.request(b"GET", b"/%d" % i, HOST)) for i in range(3)]
        await eventually(lambda: gate.waiting == 3, "three requests at the server")
        gate.gate.set()
        responses = await asyncio.gather(*tasks)
        bodies = [await read_all(resp) for resp in responses]  # released in this order
        last_released = bodies[-1].split()[0]
        assert pool.idle == 3
        assert (await get(pool, b"/next")).split()[0] == last_released
        await pool.aclose()


async def test_max_connections_queues_waiters_in_fifo_order() -> None:
    gate = Gate()
    async with Server(gate) as server:
        pool = server.pool(max_connections=2)
        tasks = []
        for i in range(6):
            tasks.append(asyncio.ensure_future(get(pool, b"/%d" % i)))
            await asyncio.sleep(0)  # queue them in a known order
        await eventually(lambda: gate.waiting == 2, "two requests at the server")
        assert pool.in_use == 2
        assert server.accepts == 2
        gate.gate.set()
        bodies = await asyncio.gather(*tasks)
        assert [body.split()[1] for body in bodies] == [b"/%d" % i for i in range(6)]
        assert gate.arrived[:2] == [b"/0", b"/1"]
        assert gate.arrived[2:] == [b"/2", b"/3", b"/4", b"/5"]  # FIFO
        assert server.accepts == 2
        assert (pool.in_use, pool.idle) == (0, 2)
        await pool.aclose()


async def test_pool_timeout_when_no_connection_frees() -> None:
    gate = Gate()
    async with Server(gate) as server:
        pool = server.pool(max_connections=1, connect_timeout=0.1)
        first = asyncio.ensure_future(get(pool, b"/first"))
        await eventually(lambda: gate.waiting == 1, "first request at the server")
        with pytest.raises(PoolTimeout) as info:
            await get(pool, b"/second")
        assert not info.value.request_sent
        assert not info.value.response_started
        gate.gate.set()
        assert await first == b"0 /first"
        assert await get(pool, b"/third") == b"0 /third"  # the slot was not leaked
        assert server.accepts == 1
        await pool.aclose()


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    gate = Gate()
    async with Server(gate) as server:
        pool = server.pool(max_connections=1)
        first = asyncio.ensure_future(get(pool, b"/first"))
        await eventually(lambda: gate.waiting == 1, "first request at the server")
        waiter = asyncio.ensure_future(get(pool, b"/cancelled"))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        gate.gate.set()
        await first
        assert await get(pool, b"/after") == b"0 /after"
        assert (pool.in_use, pool.idle) == (0, 1)
        await pool.aclose()


async def test_cancelled_request_closes_its_connection() -> None:
    gate = Gate()
    async with Server(gate) as server:
        pool = server.pool()
        task = asyncio.ensure_future(get(pool, b"/slow"))
        await eventually(lambda: gate.waiting == 1, "request at the server")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (pool.in_use, pool.idle) == (0, 0)
        gate.gate.set()
        await eventually(lambda: gate.closed == 1, "server saw the connection close")
        await pool.aclose()


async def test_max_idle_closes_the_surplus() -> None:
    gate = Gate()
    async with Server(gate) as server:
        pool = server.pool(max_idle=2)
        tasks = [asyncio.ensure_future(get(pool, b"/%d" % i)) for i in range(4)]
        await eventually(lambda: gate.waiting == 4, "four requests at the server")
        gate.gate.set()
        await asyncio.gather(*tasks)
        assert (pool.in_use, pool.idle) == (0, 2)
        await eventually(lambda: gate.closed == 2, "server saw two connections close")
        await pool.aclose()


async def test_idle_connections_expire() -> None:
    closed = asyncio.Event()

    async def handler(conn: Conn) -> None:
        while await conn.read_request() is not None:
            conn.write(OK)
        closed.set()

    async with Server(handler) as server:
        pool = server.pool(idle_timeout=0.05)
        assert await get(pool) == b"ok"
        assert pool.idle == 1
        await eventually(lambda: pool.idle == 0, "idle connection expired")
        await asyncio.wait_for(closed.wait(), 5)  # really closed, not just forgotten
        assert await get(pool) == b"ok"
        assert server.accepts == 2
        await pool.aclose()


async def test_expired_connection_is_not_handed_out() -> None:
    """The lazy check on acquire, independent of the sweep timer."""
    async with Server() as server:
        pool = server.pool(idle_timeout=0.05)
        assert await get(pool) == b"ok"
        assert pool._sweeper is not None
        pool._sweeper.cancel()  # only the check on acquire is left
        pool._sweeper = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 0.06
        await eventually(lambda: loop.time() > deadline, "idle_timeout passed")
        assert pool.idle == 1
        assert await get(pool) == b"ok"
        assert server.accepts == 2
        await pool.aclose()


async def test_connection_closed_by_peer_while_idle_is_dropped() -> None:
    async def one_shot(conn: Conn) -> None:
        await conn.read_request()
        conn.write(OK)  # says keep-alive, then closes anyway

    async with Server(one_shot) as server:
        pool = server.pool()
        assert await get(pool) == b"ok"
        await eventually(lambda: pool.idle == 0, "closed connection dropped from the pool")
        assert pool.in_use == 0
        assert await get(pool) == b"ok"
        assert server.accepts == 2
        await pool.aclose()


async def test_release_is_idempotent_and_early_release_closes() -> None:
    proceed = asyncio.Event()
    closed = asyncio.Event()

    async def handler(conn: Conn) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npart")
        await proceed.wait()
        await conn.read_request()
        closed.set()

    async with Server(handler) as server:
        pool = server.pool()
        resp = await pool.request(b"GET", b"/", HOST)
        assert await resp.read() == b"part"
        resp.release()
        resp.release()
        assert (pool.in_use, pool.idle) == (0, 0)
        proceed.set()
        await asyncio.wait_for(closed.wait(), 5)
        with pytest.raises(RuntimeError):
            await resp.read()
        await pool.aclose()


async def test_fully_received_but_unread_body_keeps_the_connection() -> None:
    async with Server() as server:
        pool = server.pool()
        resp = await pool.request(b"GET", b"/", HOST)
        await eventually(lambda: resp._done, "body received")
        resp.release()
        assert pool.idle == 1
        assert await resp.read() == b"ok"  # what was buffered is still there
        assert await get(pool) == b"ok"
        assert server.accepts == 1
        await pool.aclose()


async def test_aclose_closes_idle_and_refuses_new_requests() -> None:
    gate = Gate(open_=True)
    async with Server(gate) as server:
        pool = server.pool()
        assert await get(pool) == b"0 /"
        await pool.aclose()
        assert pool.idle == 0
        await eventually(lambda: gate.closed == 1, "server saw the idle connection close")
        with pytest.raises(ConnectError):
            await get(pool)


async def test_aclose_fails_waiters_and_closes_busy_on_release() -> None:
    gate = Gate()
    async with Server(gate) as server:
        pool = server.pool(max_connections=1)
        busy = asyncio.ensure_future(pool.request(b"GET", b"/busy", HOST))
        await eventually(lambda: gate.waiting == 1, "request at the server")
        waiter = asyncio.ensure_future(get(pool, b"/waiting"))
        await asyncio.sleep(0)
        await pool.aclose()
        with pytest.raises(ConnectError):
            await waiter
        gate.gate.set()
        assert await read_all(await busy) == b"0 /busy"
        assert (pool.in_use, pool.idle) == (0, 0)
        await eventually(lambda: gate.closed == 1, "busy connection closed after release")


def test_pool_can_be_built_outside_a_running_loop() -> None:
    pool = Pool("http", "127.0.0.1", 80, PoolOptions())
    assert (pool.in_use, pool.idle, pool.opened_total) == (0, 0, 0)
    with pytest.raises(ValueError):
        Pool("ftp", "127.0.0.1", 21, pool._options)


async def test_release_from_another_task_wakes_a_blocked_reader() -> None:
    async def stalls(conn: Conn) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        await conn.read_request()

    async with Server(stalls) as server:
        pool = server.pool()
        resp = await pool.request(b"GET", b"/", HOST)
        assert await resp.read() == b"abc"
        reader = asyncio.ensure_future(resp.read())
        await asyncio.sleep(0)
        resp.release()
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(reader, 5)
        assert pool.in_use == 0
        await pool.aclose()
