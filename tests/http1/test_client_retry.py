"""The one safe retry: only a reused connection the upstream had closed, before any response
byte, with a replayable body; sent once more on a fresh connection, never otherwise."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from piuptime.http1.client import ReadTimeout, RemoteProtocolError, UpstreamError
from tests.http1.client_helpers import OK, Conn, Server, get, serve_ok

Behaviour = Callable[[Conn], Awaitable[None]]


def first_then(second: Behaviour, later: Behaviour = serve_ok) -> Behaviour:
    """Connection 0 answers its first request, then does ``second``; later connections do
    ``later``. Records every request target the server read, per connection."""

    async def handler(conn: Conn) -> None:
        if conn.index != 0:
            await later(conn)
            return
        await conn.read_request()
        conn.write(OK)
        await second(conn)

    return handler


async def close_on_request(conn: Conn) -> None:
    """Read the request, then close without a byte of response (the keep-alive race)."""
    await conn.read_request()
    conn.writer.close()


async def reset_on_request(conn: Conn) -> None:
    await conn.read_request()
    conn.abort()


class Echo:
    """Answers each request with its body; remembers what it saw."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, conn: Conn) -> None:
        while (request := await conn.read_request()) is not None:
            self.bodies.append(request.body)
            conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(request.body))
            conn.write(request.body)


@pytest.mark.parametrize("fault", [close_on_request, reset_on_request], ids=["eof", "reset"])
async def test_stale_keep_alive_connection_is_retried_on_a_fresh_one(fault: Behaviour) -> None:
    async with Server(first_then(fault)) as server:
        pool = server.pool()
        assert await get(pool) == b"ok"
        assert await get(pool) == b"ok"  # failed on the reused connection, retried fresh
        assert server.accepts == 2
        assert pool.opened_total == 2
        assert (pool.in_use, pool.idle) == (0, 1)
        await pool.aclose()


async def test_retry_resends_a_bytes_body() -> None:
    echo = Echo()
    async with Server(first_then(close_on_request, echo)) as server:
        pool = server.pool()
        assert await get(pool) == b"ok"
        assert await get(pool, method=b"PUT", body=b"payload") == b"payload"
        # a POST the caller declares idempotent (an Idempotency-Key, say) is re-sent too
        echo2 = Echo()
        async with Server(first_then(close_on_request, echo2)) as server2:
            pool2 = server2.pool()
            assert await get(pool2) == b"ok"
            assert await get(pool2, method=b"POST", body=b"p", idempotent=True) == b"p"
            await pool2.aclose()
        assert echo.bodies == [b"payload"]
        assert server.accepts == 2
        await pool.aclose()


async def test_no_resend_of_a_written_post_on_a_stale_connection() -> None:
    """The upstream may have acted on a POST before its connection died: not sent twice."""
    echo = Echo()
    async with Server(first_then(close_on_request, echo)) as server:
        pool = server.pool()
        assert await get(pool) == b"ok"
        with pytest.raises(RemoteProtocolError) as info:
            await get(pool, method=b"POST", body=b"payload")
        assert info.value.request_sent and not info.value.response_started
        assert echo.bodies == []
        assert server.accepts == 1
        await pool.aclose()


async def test_no_retry_when_a_fresh_connection_fails() -> None:
    async with Server(close_on_request) as server:
        pool = server.pool()
        with pytest.raises(RemoteProtocolError) as info:
            await get(pool)
        assert info.value.request_sent
        assert not info.value.response_started
        assert server.accepts == 1
        assert pool.in_use == 0
        await pool.aclose()


async def test_retry_happens_at_most_once() -> None:
    async with Server(first_then(close_on_request, close_on_request)) as server:
        pool = server.pool()
        assert await get(pool) == b"ok"
        with pytest.raises(UpstreamError):
            await get(pool)
        assert server.accepts == 2
        assert pool.in_use == 0
        await pool.aclose()


async def test_no_retry_for_a_streamed_body() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"once"

    async with Server(first_then(close_on_request)) as server:
        pool = server.pool()
        assert await get(pool) == b"ok"
        with pytest.raises(UpstreamError) as info:
            await get(pool, method=b"POST", body=body())
        assert info.value.request_sent
        assert not info.value.response_started
        assert server.accepts == 1
        assert pool.in_use == 0
        await pool.aclose()


async def test_no_retry_after_a_response_byte_arrived() -> None:
    async def partial_then_close(conn: Conn) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200")
        await conn.writer.drain()
        conn.writer.close()

    async with Server(first_then(partial_then_close)) as server:
        pool = server.pool()
        assert await get(pool) == b"ok"
        with pytest.raises(RemoteProtocolError) as info:
            await get(pool)
        assert info.value.response_started
        assert server.accepts == 1
        await pool.aclose()


async def test_no_retry_after_a_read_timeout_on_a_reused_connection() -> None:
    async def silent(conn: Conn) -> None:
        await conn.read_request()
        await conn.read_request()

    async with Server(first_then(silent)) as server:
        pool = server.pool(read_timeout=0.1)
        assert await get(pool) == b"ok"
        with pytest.raises(ReadTimeout):
            await get(pool)
        assert server.accepts == 1
        await pool.aclose()
