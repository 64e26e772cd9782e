"""Request/response exchanges over real sockets: keep-alive, pipelining, HTTP/1.0, body framing
both ways, HEAD/204/304, Expect: 100-continue, and what the server does when a handler
misbehaves."""

from __future__ import annotations

import asyncio
import re

from piuptime.http1.errors import BodyTooLarge
from piuptime.http1.server import Request, Responder, ServerLimits
from tests.http1.server_helpers import (
    ServerUnderTest,
    echo,
    eventually,
    read_body,
    record_then,
    request,
    serve,
)


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async with serve(echo) as sut:
        client = await sut.connect()
        for i in range(3):
            await client.send(request("POST", f"/r{i}", body=b"x" * i))
            resp = await client.response()
            assert resp.status == 200
            assert resp.header(b"connection") is None
            assert resp.json() == {"method": "POST", "path": f"/r{i}", "body": "x" * i}
        assert await client.still_open()
        assert sut.server.active_connections == 1


async def test_pipelined_requests_are_answered_in_order_one_at_a_time() -> None:
    running = 0
    peak = 0

    def make(sut: ServerUnderTest):  # type: ignore[no-untyped-def]
        async def handler(req: Request, resp: Responder) -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            body = await read_body(req)
            # the first request is the slowest: later ones must still wait their turn
            for _ in range(5 if req.path == b"/0" else 0):
                await asyncio.sleep(0)
            sut.seen.append(req)  # type: ignore[arg-type]
            resp.start(200, [(b"x-path", req.path)])
            resp.write(body)
            resp.end(b"!")
            running -= 1

        return handler

    chunked = (
        b"POST /3 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    raw = (
        request("GET", "/0")
        + request("POST", "/1", body=b"one")
        + request("GET", "/2")
        + chunked
        + request("PUT", "/4", body=b"four")
    )
    async with serve(make) as sut:
        client = await sut.connect()
        await client.send(raw)
        bodies = []
        for i in range(5):
            resp = await client.response()
            assert resp.header(b"x-path") == f"/{i}".encode()
            assert resp.chunked
            bodies.append(resp.body)
        assert bodies == [b"!", b"one!", b"!", b"abcde!", b"four!"]
        assert peak == 1
        assert await client.still_open()


async def test_http10_without_keep_alive_closes() -> None:
    async with serve(echo) as sut:
        client = await sut.connect()
        await client.send(b"GET /a HTTP/1.0\r\n\r\n")
        resp = await client.response()
        assert resp.status == 200
        assert resp.header(b"connection") == b"close"
        assert await client.closed()
        assert sut.seen[0].version == b"1.0"


async def test_http10_keep_alive_is_honoured() -> None:
    async with serve(echo) as sut:
        client = await sut.connect()
        for path in ("/a", "/b"):
            await client.send(f"GET {path} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode())
            resp = await client.response()
            assert resp.status == 200
            assert resp.header(b"connection") == b"keep-alive"
        assert await client.still_open()
        assert sut.paths == [b"/a", b"/b"]


async def test_http10_streamed_response_is_close_delimited() -> None:
    async def stream(req: Request, resp: Responder) -> None:
        resp.start(200, [(b"content-type", b"text/plain")])
        for part in (b"one ", b"two ", b"three"):
            resp.write(part)
            await resp.drain()
        resp.end()

    async with serve(record_then(stream)) as sut:
        client = await sut.connect()
        await client.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        resp = await client.response()
        assert resp.header(b"transfer-encoding") is None
        assert resp.header(b"content-length") is None
        assert resp.header(b"connection") == b"close"
        assert resp.body == b"one two three"


async def test_chunked_request_body_arriving_in_pieces() -> None:
    async with serve(echo) as sut:
        client = await sut.connect()
        await client.send(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"4\r\nab", b"cd\r\n", b"1;ext=1\r\ne\r", b"\n0\r\n", b"\r\n"):
            await client.send(piece)
            await asyncio.sleep(0)
        resp = await client.response()
        assert resp.json() == {"method": "POST", "path": "/up", "body": "abcde"}
        seen = sut.seen[0]
        assert (b"transfer-encoding", b"chunked") in seen.headers


async def test_request_attributes() -> None:
    captured: list[Request] = []

    async def capture(req: Request, resp: Responder) -> None:
        captured.append(req)
        await read_body(req)
        resp.send(200, b"{}")

    raw = (
        b"POST /p/a%20th?x=1&y=2 HTTP/1.1\r\nHOST: example.com:8080 \r\n"
        b"X-Multi: one\r\nx-multi:  two  \r\nContent-Length: 3\r\n\r\nabc"
        b"GET http://other.example/abs?q HTTP/1.1\r\nHost: ignored\r\n\r\n"
        b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    async with serve(lambda sut: capture) as sut:
        client = await sut.connect()
        await client.send(raw)
        for _ in range(3):
            assert (await client.response()).status == 200
    first, absolute, star = captured
    assert first.method == b"POST"
    assert first.target == b"/p/a%20th?x=1&y=2"
    assert first.path == b"/p/a%20th"
    assert first.query == b"x=1&y=2"
    assert first.version == b"1.1"
    assert first.host == b"example.com:8080"
    assert first.headers == [
        (b"host", b"example.com:8080"),
        (b"x-multi", b"one"),
        (b"x-multi", b"two"),
        (b"content-length", b"3"),
    ]
    assert first.content_length == 3 and not first.chunked and first.has_body
    assert first.keep_alive and first.upgrade is None and not first.expect_continue
    assert first.client_addr == "127.0.0.1" and first.client_port > 0 and not first.tls
    assert first.body_done
    assert absolute.path == b"/abs" and absolute.query == b"q"
    assert absolute.host == b"other.example"
    assert not absolute.has_body and absolute.content_length is None
    assert star.path == b"*" and star.query == b""


async def test_content_length_response_and_custom_headers() -> None:
    async def answer(req: Request, resp: Responder) -> None:
        resp.start(
            201,
            [
                (b"content-length", b"5"),
                (b"x-a", b"1"),
                (b"connection", b"keep-alive"),  # dropped: the server owns framing
                (b"transfer-encoding", b"chunked"),  # dropped
                (b"keep-alive", b"timeout=5"),  # dropped
            ],
        )
        resp.write(b"he")
        resp.end(b"llo")

    async with serve(record_then(answer)) as sut:
        client = await sut.connect()
        await client.send(request())
        resp = await client.response()
        assert resp.status == 201 and resp.reason == b"Created"
        assert [n for n, _ in resp.headers] == [b"content-length", b"x-a", b"date"]
        assert re.fullmatch(
            rb"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", resp.header(b"date") or b""
        )
        assert resp.body == b"hello"
        assert await client.still_open()


async def test_writing_past_content_length_is_cut_and_closes() -> None:
    async def answer(req: Request, resp: Responder) -> None:
        resp.start(200, [(b"content-length", b"3")])
        resp.end(b"too long")

    async with serve(record_then(answer)) as sut:
        client = await sut.connect()
        await client.send(request())
        resp = await client.response()
        assert resp.body == b"too"
        assert await client.closed()


async def test_custom_reason_and_informational_response() -> None:
    async def answer(req: Request, resp: Responder) -> None:
        resp.start(103, [(b"link", b"</a.css>; rel=preload")])
        resp.start(299, [(b"content-length", b"0")], reason=b"Fine Thanks")
        resp.end()

    async with serve(record_then(answer)) as sut:
        client = await sut.connect()
        await client.send(request())
        early = await client.response()
        assert early.status == 103 and early.header(b"link") == b"</a.css>; rel=preload"
        final = await client.response()
        assert final.status == 299 and final.reason == b"Fine Thanks"


async def test_head_204_304_have_no_body_and_keep_the_connection() -> None:
    async def answer(req: Request, resp: Responder) -> None:
        if req.path == b"/204":
            resp.send(204, b"")
        elif req.path == b"/304":
            resp.start(304, [(b"etag", b'"x"')])
            resp.write(b"ignored")
            resp.end()
        elif req.path == b"/head-stream":
            resp.start(200, [])
            resp.write(b"ignored")
            resp.end(b"ignored")
        else:
            resp.send(200, b"a body that HEAD must not carry", content_type=b"text/plain")

    async with serve(record_then(answer)) as sut:
        client = await sut.connect()
        await client.send(request("HEAD", "/"))
        head = await client.response(method=b"HEAD")
        assert head.header(b"content-length") == b"31"
        await client.send(request("GET", "/204"))
        assert (await client.response()).status == 204
        await client.send(request("GET", "/304"))
        r304 = await client.response()
        assert r304.status == 304 and r304.header(b"transfer-encoding") is None
        await client.send(request("HEAD", "/head-stream"))
        assert (await client.response(method=b"HEAD")).status == 200
        # if any body bytes had leaked, this response would not parse
        await client.send(request("GET", "/"))
        last = await client.response()
        assert last.body == b"a body that HEAD must not carry"
        assert await client.still_open()


async def test_expect_100_continue() -> None:
    async with serve(echo) as sut:
        client = await sut.connect()
        await client.send(
            b"POST /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        interim = await client.response()
        assert interim.status == 100
        await client.send(b"hello")
        final = await client.response()
        assert final.json() == {"method": "POST", "path": "/up", "body": "hello"}
        assert await client.still_open()


async def test_expect_100_continue_refused_without_reading_closes() -> None:
    async def refuse(req: Request, resp: Responder) -> None:
        assert req.expect_continue
        resp.send_error(413, "body_too_large", "no thanks")

    async with serve(record_then(refuse)) as sut:
        client = await sut.connect()
        await client.send(
            b"POST /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        resp = await client.response()
        assert resp.status == 413
        assert resp.json() == {
            "error": {"status": 413, "code": "body_too_large", "message": "no thanks"}
        }
        assert await client.closed()


async def test_expect_100_continue_over_limit_gets_413_without_100() -> None:
    async with serve(echo, ServerLimits(max_body_bytes=4)) as sut:
        client = await sut.connect()
        await client.send(
            b"POST /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        resp = await client.response()
        assert resp.status == 413
        assert await client.closed()
        assert [e[1] for e in sut.errors] == [413]


async def test_per_request_body_limit_override() -> None:
    async def handler(req: Request, resp: Responder) -> None:
        req.max_body_bytes = 100 if req.path == b"/big" else 3
        try:
            body = await read_body(req)
        except BodyTooLarge:
            resp.send_error(413, "body_too_large", "too big")
            return
        resp.send(200, body)

    async with serve(lambda sut: handler, ServerLimits(max_body_bytes=10)) as sut:
        client = await sut.connect()
        await client.send(request("POST", "/big", body=b"x" * 50))
        assert (await client.response()).body == b"x" * 50
        await client.send(request("POST", "/small", body=b"x" * 5))
        assert (await client.response()).status == 413
        assert await client.closed()  # the unread body leaves the framing unknown


async def test_handler_exception_gives_500_and_closes() -> None:
    async def boom(req: Request, resp: Responder) -> None:
        raise RuntimeError("boom")

    async with serve(record_then(boom)) as sut:
        client = await sut.connect()
        await client.send(request())
        resp = await client.response()
        assert resp.status == 500
        assert resp.json() == {
            "error": {"status": 500, "code": "internal_error", "message": "internal server error"}
        }
        assert await client.closed()
        assert [e[1] for e in sut.errors] == [500]


async def test_handler_returning_without_a_response_gives_500() -> None:
    async def nothing(req: Request, resp: Responder) -> None:
        return

    async with serve(record_then(nothing)) as sut:
        client = await sut.connect()
        await client.send(request())
        assert (await client.response()).status == 500
        assert await client.closed()


async def test_handler_that_does_not_end_a_started_response_closes() -> None:
    async def unfinished(req: Request, resp: Responder) -> None:
        resp.start(200, [])
        resp.write(b"partial")

    async with serve(record_then(unfinished)) as sut:
        client = await sut.connect()
        await client.send(request())
        head = await client.reader.readuntil(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head
        rest = await client.reader.read()  # EOF without the terminating chunk
        assert rest == b"7\r\npartial\r\n"


async def test_unread_body_that_fully_arrived_keeps_the_connection() -> None:
    async def ignore_body(req: Request, resp: Responder) -> None:
        resp.send(200, b"ok", content_type=b"text/plain")

    async with serve(record_then(ignore_body)) as sut:
        client = await sut.connect()
        await client.send(request("POST", "/a", body=b"small") + request("GET", "/b"))
        assert (await client.response()).body == b"ok"
        assert (await client.response()).body == b"ok"
        assert sut.paths == [b"/a", b"/b"]
        assert await client.still_open()


async def test_unread_body_still_arriving_closes_after_the_response() -> None:
    async def ignore_body(req: Request, resp: Responder) -> None:
        resp.send(200, b"ok", content_type=b"text/plain")

    async with serve(record_then(ignore_body)) as sut:
        client = await sut.connect()
        await client.send(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\npartial")
        assert (await client.response()).body == b"ok"
        await client.send(b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await client.closed()
        assert sut.paths == [b"/a"]


async def test_handler_can_be_swapped_while_serving() -> None:
    async def first(req: Request, resp: Responder) -> None:
        resp.send(200, b"1")

    async def second(req: Request, resp: Responder) -> None:
        resp.send(200, b"2")

    async with serve(lambda sut: first) as sut:
        client = await sut.connect()
        await client.send(request())
        assert (await client.response()).body == b"1"
        sut.server.handler = second
        await client.send(request())
        assert (await client.response()).body == b"2"


async def test_client_disconnect_is_seen_by_a_reading_handler() -> None:
    outcome: list[str] = []

    async def reader(req: Request, resp: Responder) -> None:
        try:
            await read_body(req)
        except Exception as exc:
            outcome.append(type(exc).__name__)
            raise

    async with serve(record_then(reader)) as sut:
        client = await sut.connect()
        await client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        await eventually(lambda: sut.server.active_requests == 1)
        client.close()
        await eventually(lambda: outcome == ["ClientDisconnected"])
        await eventually(lambda: sut.server.active_connections == 0)
        assert sut.server.active_requests == 0


async def test_client_half_close_still_gets_its_answers() -> None:
    async with serve(echo) as sut:
        client = await sut.connect()
        await client.send(request("POST", "/a", body=b"1") + request("GET", "/b"))
        client.writer.write_eof()
        assert (await client.response()).json() == {"method": "POST", "path": "/a", "body": "1"}
        assert (await client.response()).json() == {"method": "GET", "path": "/b", "body": ""}
        assert await client.closed()


async def test_expect_100_continue_not_sent_once_body_bytes_arrived() -> None:
    async with serve(echo) as sut:
        client = await sut.connect()
        await client.send(
            b"POST /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 6\r\n\r\nabc"
        )
        await eventually(lambda: sut.paths == [b"/up"])
        await client.send(b"def")
        resp = await client.response()
        assert resp.status == 200  # no interim 100: the client did not wait for it
        assert resp.json() == {"method": "POST", "path": "/up", "body": "abcdef"}


async def test_start_fields_frames_like_start() -> None:
    """``start_fields`` (pre-serialised fields, as the proxy sends them): a length is kept,
    no length means chunked for 1.1 and close-delimited for 1.0, HEAD gets no body."""

    async def handler(req: Request, resp: Responder) -> None:
        if req.path == b"/len":
            resp.start_fields(200, b"x-a: 1\r\ncontent-length: 3\r\n", 3)
            resp.end(b"abc")
        else:
            resp.start_fields(201, b"x-a: 2\r\n", None, b"Made")
            resp.write(b"ab")
            await resp.drain()
            resp.end(b"c")

    async with serve(record_then(handler)) as sut:
        client = await sut.connect()
        await client.send(b"GET /len HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = await client.response()
        assert (resp.status, resp.header(b"x-a"), resp.header(b"content-length")) == (
            200,
            b"1",
            b"3",
        )
        assert resp.body == b"abc" and resp.header(b"date") is not None
        await client.send(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = await client.response()
        assert resp.status == 201 and resp.header(b"transfer-encoding") == b"chunked"
        assert resp.body == b"abc"
        await client.send(b"HEAD /len HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = await client.response(b"HEAD")
        assert resp.header(b"content-length") == b"3" and resp.body == b""
        assert await client.still_open()
        client = await sut.connect()
        await client.send(b"GET /stream HTTP/1.0\r\n\r\n")
        resp = await client.response()
        assert resp.header(b"transfer-encoding") is None
        assert resp.header(b"connection") == b"close" and resp.body == b"abc"
