"""Client framing on real sockets: response bodies (CL, chunked, close-delimited, none), interim
responses, strict rejection of ambiguous framing, and how requests are serialised."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from piuptime.http1.client import RemoteProtocolError, WriteError
from tests.http1.client_helpers import (
    HOST,
    OK,
    Conn,
    Server,
    eventually,
    get,
    read_all,
    serve_ok,
)


def answer(*responses: bytes, close: bool = False):  # type: ignore[no-untyped-def]
    """A handler that answers the n-th request on each connection with ``responses[n]``."""

    async def handler(conn: Conn) -> None:
        for response in responses:
            if await conn.read_request() is None:
                return
            conn.write(response)
        if close:
            conn.writer.close()
        else:
            await conn.read_request()  # keep the connection open until the client leaves

    return handler


async def test_content_length_body_and_headers() -> None:
    raw = b"HTTP/1.1 201 Created\r\nX-Thing:  a b  \r\nContent-Length: 5\r\nX-Thing: c\r\n\r\nhello"
    async with Server(answer(raw)) as server:
        pool = server.pool()
        resp = await pool.request(b"GET", b"/", HOST)
        assert (resp.status, resp.reason, resp.version) == (201, b"Created", b"1.1")
        assert resp.headers == [
            (b"x-thing", b"a b"),
            (b"content-length", b"5"),
            (b"x-thing", b"c"),
        ]
        assert resp.content_length == 5
        assert not resp.chunked
        assert resp.keep_alive
        assert await read_all(resp) == b"hello"
        await pool.aclose()


async def test_chunked_body_with_trailers() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: dropped\r\n\r\n"
    )
    async with Server(answer(raw, OK)) as server:
        pool = server.pool()
        resp = await pool.request(b"GET", b"/", HOST)
        assert resp.chunked
        assert resp.content_length is None
        assert await read_all(resp) == b"hello world"
        assert resp.headers == [(b"transfer-encoding", b"chunked")]
        assert await get(pool) == b"ok"
        assert server.accepts == 1
        await pool.aclose()


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.0 200 OK\r\n\r\nuntil the end",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end",
        b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
    ],
    ids=["http1.0", "connection-close", "no-length"],
)
async def test_close_delimited_body(raw: bytes) -> None:
    async with Server(answer(raw, close=True)) as server:
        pool = server.pool()
        resp = await pool.request(b"GET", b"/", HOST)
        assert not resp.keep_alive
        assert resp.content_length is None
        assert await read_all(resp) == b"until the end"
        assert await get(pool) == b"until the end"
        assert server.accepts == 2  # never reused
        await pool.aclose()


async def test_http10_keep_alive_is_reused() -> None:
    raw = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
    async with Server(answer(raw, raw)) as server:
        pool = server.pool()
        assert await get(pool) == b"ok"
        assert await get(pool) == b"ok"
        assert server.accepts == 1
        await pool.aclose()


async def test_connection_close_with_length_is_not_reused() -> None:
    raw = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with Server(answer(raw, close=True)) as server:
        pool = server.pool()
        resp = await pool.request(b"GET", b"/", HOST)
        assert not resp.keep_alive
        assert await read_all(resp) == b"ok"
        assert await get(pool) == b"ok"
        assert server.accepts == 2
        await pool.aclose()


async def test_head_response_has_no_body_and_connection_is_reused() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    chunked_head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with Server(answer(head, chunked_head, OK)) as server:
        pool = server.pool()
        for _ in range(2):
            resp = await pool.request(b"HEAD", b"/", HOST)
            assert resp.status == 200
            assert await resp.read() == b""
            resp.release()
        assert await get(pool) == b"ok"
        assert server.accepts == 1
        await pool.aclose()


@pytest.mark.parametrize("status", [204, 304])
async def test_no_body_statuses(status: int) -> None:
    raw = b"HTTP/1.1 %d X\r\nContent-Length: 7\r\n\r\n" % status
    async with Server(answer(raw, OK)) as server:
        pool = server.pool()
        resp = await pool.request(b"GET", b"/", HOST)
        assert resp.status == status
        assert await read_all(resp) == b""
        assert await get(pool) == b"ok"
        assert server.accepts == 1
        await pool.aclose()


async def test_interim_100_continue_is_skipped() -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK
    async with Server(answer(raw, OK)) as server:
        pool = server.pool()
        resp = await pool.request(b"POST", b"/", HOST, body=b"data")
        assert resp.status == 200
        assert resp.headers == [(b"content-length", b"2")]
        assert await read_all(resp) == b"ok"
        assert await get(pool) == b"ok"
        assert server.accepts == 1
        await pool.aclose()


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\nok",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",  # no Upgrade header
    ],
    ids=["cl-te", "te-cl", "two-cl", "negative-cl", "bad-cl", "bad-status", "garbage", "101-bare"],
)
async def test_malformed_response_is_rejected_and_not_reused(raw: bytes) -> None:
    async with Server(answer(raw, close=False)) as server:
        pool = server.pool()
        with pytest.raises(RemoteProtocolError) as info:
            await pool.request(b"GET", b"/", HOST)
        assert info.value.request_sent
        assert info.value.response_started
        assert pool.in_use == 0
        assert pool.idle == 0
        await pool.aclose()


async def test_extra_bytes_after_the_response_close_the_connection() -> None:
    async with Server(answer(OK + b"HTTP/1.1 200 OK\r\n", OK)) as server:
        pool = server.pool()
        resp = await pool.request(b"GET", b"/", HOST)
        assert await read_all(resp) == b"ok"  # the response itself was fine
        assert pool.idle == 0  # but the connection is not trusted again
        assert await get(pool) == b"ok"
        assert server.accepts == 2
        await pool.aclose()


async def test_body_after_head_response_closes_the_connection() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    broken = answer(raw, OK)

    async def handler(conn: Conn) -> None:
        await (broken(conn) if conn.index == 0 else serve_ok(conn))

    async with Server(handler) as server:
        pool = server.pool()
        resp = await pool.request(b"HEAD", b"/", HOST)
        assert await read_all(resp) == b""
        await eventually(lambda: pool.idle == 0, what="connection dropped")
        assert await get(pool) == b"ok"
        assert server.accepts == 2
        await pool.aclose()


async def test_truncated_body_raises_after_delivering_what_arrived() -> None:
    async def handler(conn: Conn) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        await conn.writer.drain()
        conn.writer.close()

    async with Server(handler) as server:
        pool = server.pool()
        resp = await pool.request(b"GET", b"/", HOST)
        assert await resp.read() == b"half"
        with pytest.raises(RemoteProtocolError) as info:
            await resp.read()
        assert info.value.response_started
        resp.release()
        assert pool.in_use == 0
        await pool.aclose()


# ---- request serialisation


class Recorder:
    """Answers ``ok`` and keeps every request it parsed."""

    def __init__(self) -> None:
        self.requests: list = []  # type: ignore[type-arg]

    async def __call__(self, conn: Conn) -> None:
        while (request := await conn.read_request()) is not None:
            self.requests.append(request)
            conn.write(OK)


async def test_request_head_is_sent_as_given() -> None:
    rec = Recorder()
    async with Server(rec) as server:
        pool = server.pool()
        headers = [(b"host", b"example.com"), (b"X-Mixed", b"Case"), (b"accept", b"*/*")]
        resp = await pool.request(b"GET", b"/a/b?c=d", headers)
        await read_all(resp)
        assert rec.requests[0].raw_head == (
            b"GET /a/b?c=d HTTP/1.1\r\nhost: example.com\r\nX-Mixed: Case\r\naccept: */*\r\n\r\n"
        )
        await pool.aclose()


async def test_bytes_body_gets_content_length() -> None:
    rec = Recorder()
    async with Server(rec) as server:
        pool = server.pool()
        await get(pool, method=b"POST", body=b"x" * 100_000)  # larger than the inline limit
        await get(pool, method=b"PUT", body=b"small")
        await get(pool, method=b"POST")  # no body: content-length: 0 for a body method
        await get(pool, method=b"DELETE")
        first, second, third, fourth = rec.requests
        assert first.header(b"content-length") == b"100000"
        assert first.body == b"x" * 100_000
        assert second.header(b"content-length") == b"5"
        assert second.body == b"small"
        assert third.header(b"content-length") == b"0"
        assert fourth.header(b"content-length") is None
        assert server.accepts == 1
        await pool.aclose()


async def test_caller_framing_headers_are_respected() -> None:
    rec = Recorder()
    async with Server(rec) as server:
        pool = server.pool()
        await read_all(
            await pool.request(b"POST", b"/", [*HOST, (b"Content-Length", b"3")], body=b"abc")
        )
        await read_all(
            await pool.request(
                b"POST", b"/", [*HOST, (b"transfer-encoding", b"chunked")], body=b"abc"
            )
        )
        assert rec.requests[0].raw_head.count(b"ontent-") == 1
        assert rec.requests[0].body == b"abc"
        assert rec.requests[1].header(b"content-length") is None
        assert rec.requests[1].body == b"abc"
        with pytest.raises(ValueError):
            await pool.request(b"POST", b"/", [*HOST, (b"content-length", b"4")], body=b"abc")
        with pytest.raises(ValueError):
            await pool.request(b"POST", b"/", HOST, body=b"abc", content_length=2)
        await pool.aclose()


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_streamed_body_is_chunked_without_length() -> None:
    rec = Recorder()
    async with Server(rec) as server:
        pool = server.pool()
        await get(pool, method=b"POST", body=chunks(b"hello", b"", b" ", b"world"))
        request = rec.requests[0]
        assert request.header(b"transfer-encoding") == b"chunked"
        assert request.header(b"content-length") is None
        assert request.body == b"hello world"
        await get(pool, method=b"POST", body=chunks())  # empty stream: just the terminator
        assert rec.requests[1].body == b""
        assert server.accepts == 1
        await pool.aclose()


async def test_streamed_body_with_content_length() -> None:
    rec = Recorder()
    async with Server(rec) as server:
        pool = server.pool()
        await get(pool, method=b"PUT", body=chunks(b"abc", b"def"), content_length=6)
        request = rec.requests[0]
        assert request.header(b"content-length") == b"6"
        assert request.header(b"transfer-encoding") is None
        assert request.body == b"abcdef"
        assert server.accepts == 1
        await pool.aclose()


@pytest.mark.parametrize("parts", [(b"abc",), (b"abc", b"defg")], ids=["short", "long"])
async def test_streamed_body_length_mismatch_is_an_error(parts: tuple[bytes, ...]) -> None:
    async with Server(Recorder()) as server:
        pool = server.pool()
        with pytest.raises(WriteError):
            await pool.request(b"PUT", b"/", HOST, body=chunks(*parts), content_length=6)
        assert pool.in_use == 0
        assert pool.idle == 0
        await pool.aclose()


async def test_large_streamed_body_waits_for_drain() -> None:
    """16 MiB to a server with a tiny receive buffer: the client awaits drain between chunks,
    so the body source is never far ahead of what the server has read (without drain it would
    run the whole body into the transport buffer at once)."""
    total = 16 * 1024 * 1024
    part = b"z" * 65536
    received = 0
    ahead = 0

    async def reader(conn: Conn) -> None:
        nonlocal received
        await conn.reader.readuntil(b"\r\n\r\n")
        while received < total:
            received += len(await conn.reader.read(65536))
        conn.write(OK)
        await conn.read_request()

    async def body() -> AsyncIterator[bytes]:
        nonlocal ahead
        for produced in range(0, total, len(part)):
            ahead = max(ahead, produced - received)
            yield part

    async with Server(reader, rcvbuf=16384) as server:
        pool = server.pool()
        assert await get(pool, method=b"POST", body=body(), content_length=total) == b"ok"
        assert received == total
        assert ahead < 4 * 1024 * 1024, ahead
        await pool.aclose()


async def test_oversized_response_head_is_rejected() -> None:
    async def endless_headers(conn: Conn) -> None:
        await conn.read_request()
        conn.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(100_000):
            conn.write(b"x-filler-%d: %s\r\n" % (i, b"v" * 100))
            await conn.writer.drain()

    async with Server(endless_headers) as server:
        pool = server.pool()
        with pytest.raises(RemoteProtocolError, match="head larger"):
            await pool.request(b"GET", b"/", HOST)
        assert pool.in_use == 0
        await pool.aclose()
