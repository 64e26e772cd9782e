"""Malformed and ambiguous requests (request smuggling material), table-driven.

Every case hides ``GET /smuggled`` where a server that misread the framing would see a second
request. Each must be answered with the expected status and a JSON error, the connection must
close, and the handler must never see ``/smuggled``."""

from __future__ import annotations

import asyncio

import pytest

from piuptime.http1.server import ServerLimits
from tests.http1.server_helpers import echo, eventually, serve

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


def post(headers: bytes, body: bytes, version: bytes = b"1.1") -> bytes:
    host = b"Host: x\r\n" if version == b"1.1" else b""
    return b"POST /first HTTP/" + version + b"\r\n" + host + headers + b"\r\n" + body


CASES: list[tuple[str, bytes, int]] = [
    # -- Content-Length ------------------------------------------------------------------------
    (
        "cl-and-te",
        post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        400,
    ),
    (
        "te-and-cl",
        post(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n" + SMUGGLED),
        400,
    ),
    ("cl-list", post(b"Content-Length: 5, 5\r\n", b"hello" + SMUGGLED), 400),
    (
        "cl-repeated-equal",
        post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello" + SMUGGLED),
        400,
    ),
    (
        "cl-repeated-different",
        post(b"Content-Length: 5\r\nContent-Length: 40\r\n", b"hello" + SMUGGLED),
        400,
    ),
    ("cl-plus", post(b"Content-Length: +5\r\n", b"hello" + SMUGGLED), 400),
    ("cl-negative", post(b"Content-Length: -1\r\n", b"hello" + SMUGGLED), 400),
    ("cl-hex", post(b"Content-Length: 0x5\r\n", b"hello" + SMUGGLED), 400),
    ("cl-inner-space", post(b"Content-Length: 5 5\r\n", b"hello" + SMUGGLED), 400),
    ("cl-empty", post(b"Content-Length: \r\n", b"hello" + SMUGGLED), 400),
    ("cl-overflow", post(b"Content-Length: 99999999999999999999999\r\n", b"hello" + SMUGGLED), 400),
    # -- Transfer-Encoding ---------------------------------------------------------------------
    (
        "te-gzip-chunked",
        post(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        501,
    ),
    (
        "te-chunked-gzip",
        post(b"Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n" + SMUGGLED),
        400,
    ),
    (
        "te-chunked-then-gzip-header",
        post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n", b"0\r\n\r\n" + SMUGGLED),
        400,
    ),
    (
        "te-chunked-twice",
        post(
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLED
        ),
        400,
    ),
    (
        "te-chunked-chunked",
        post(b"Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        400,
    ),
    (
        "te-deflate-gzip-chunked",
        post(
            b"Transfer-Encoding: deflate\r\nTransfer-Encoding: gzip, chunked\r\n",
            b"0\r\n\r\n" + SMUGGLED,
        ),
        501,
    ),
    # RFC 9112 6.3: a request whose final coding is not chunked has no determinable length → 400
    ("te-xchunked", post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n" + SMUGGLED), 400),
    ("te-identity", post(b"Transfer-Encoding: identity\r\n", SMUGGLED), 400),
    ("te-gzip-only", post(b"Transfer-Encoding: gzip\r\n", SMUGGLED), 400),
    ("te-empty-element", post(b"Transfer-Encoding: , chunked\r\n", b"0\r\n\r\n" + SMUGGLED), 400),
    (
        "te-space-before-colon",
        post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        400,
    ),
    ("te-obs-fold", post(b"Transfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n" + SMUGGLED), 400),
    ("te-http10", post(b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLED, b"1.0"), 400),
    # -- chunk framing (the head is fine: the handler starts, its read fails) ----------------
    (
        "chunk-size-0x",
        post(b"Transfer-Encoding: chunked\r\n", b"0x5\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
        400,
    ),
    (
        "chunk-size-negative",
        post(b"Transfer-Encoding: chunked\r\n", b"-1\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
        400,
    ),
    (
        "chunk-size-overflow",
        post(b"Transfer-Encoding: chunked\r\n", b"ffffffffffffffffff\r\nx\r\n0\r\n\r\n" + SMUGGLED),
        400,
    ),
    (
        "chunk-size-junk",
        post(b"Transfer-Encoding: chunked\r\n", b"5junk\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
        400,
    ),
    (
        "chunk-size-space-junk",
        post(b"Transfer-Encoding: chunked\r\n", b"5 junk\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
        400,
    ),
    (
        "chunk-missing-crlf",
        post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhelloXX0\r\n\r\n" + SMUGGLED),
        400,
    ),
    ("chunk-bare-lf", post(b"Transfer-Encoding: chunked\r\n", b"5\nhello\n0\n\n" + SMUGGLED), 400),
    (
        "chunk-ext-bare-lf",
        post(b"Transfer-Encoding: chunked\r\n", b"5;a\nb\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
        400,
    ),
    (
        "chunk-longer-than-size",
        post(b"Transfer-Encoding: chunked\r\n", b"3\r\nhello\r\n0\r\n\r\n" + SMUGGLED),
        400,
    ),
    # -- head syntax ---------------------------------------------------------------------------
    ("obs-fold", b"GET /first HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n" + SMUGGLED, 400),
    ("nul-in-value", b"GET /first HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n" + SMUGGLED, 400),
    ("ctl-in-value", b"GET /first HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n" + SMUGGLED, 400),
    ("del-in-value", b"GET /first HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n\r\n" + SMUGGLED, 400),
    ("bare-cr-in-value", b"GET /first HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n" + SMUGGLED, 400),
    ("bare-lf-everywhere", b"GET /first HTTP/1.1\nHost: x\n\n" + SMUGGLED, 400),
    ("bare-lf-in-head", b"GET /first HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n" + SMUGGLED, 400),
    ("ctl-in-name", b"GET /first HTTP/1.1\r\nHost: x\r\nX\x01A: b\r\n\r\n" + SMUGGLED, 400),
    ("space-in-name", b"GET /first HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n" + SMUGGLED, 400),
    ("empty-name", b"GET /first HTTP/1.1\r\nHost: x\r\n: b\r\n\r\n" + SMUGGLED, 400),
    ("no-colon", b"GET /first HTTP/1.1\r\nHost: x\r\nXA\r\n\r\n" + SMUGGLED, 400),
    ("nul-in-request-line", b"GET /fi\x00rst HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLED, 400),
    ("space-in-target", b"GET /fi rst HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLED, 400),
    ("bad-method-chars", b"G@T /first HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLED, 400),
    ("unknown-method", b"FROB /first HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLED, 501),
    ("connect", b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n" + SMUGGLED, 501),
    ("http-2.0", b"GET /first HTTP/2.0\r\nHost: x\r\n\r\n" + SMUGGLED, 505),
    ("http-1.2", b"GET /first HTTP/1.2\r\nHost: x\r\n\r\n" + SMUGGLED, 505),
    ("http-3.0", b"GET /first HTTP/3.0\r\nHost: x\r\n\r\n" + SMUGGLED, 505),
    ("http-0.9", b"GET /first\r\n\r\n" + SMUGGLED, 505),
    ("missing-host", b"GET /first HTTP/1.1\r\nX-A: b\r\n\r\n" + SMUGGLED, 400),
    ("two-hosts", b"GET /first HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n" + SMUGGLED, 400),
    ("two-hosts-case", b"GET /first HTTP/1.1\r\nHost: x\r\nhOST: x\r\n\r\n" + SMUGGLED, 400),
    # -- limits --------------------------------------------------------------------------------
    (
        "head-too-large",
        b"GET /first HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n" + SMUGGLED,
        431,
    ),
    (
        "too-many-headers",
        b"GET /first HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 20 + b"\r\n" + SMUGGLED,
        431,
    ),
    ("uri-too-long", b"GET /first" + b"a" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLED, 414),
    ("body-too-large-cl", post(b"Content-Length: 5000\r\n", b"x" * 100 + SMUGGLED), 413),
    (
        "body-too-large-chunked",
        post(
            b"Transfer-Encoding: chunked\r\n",
            b"800\r\n" + b"x" * 2048 + b"\r\n0\r\n\r\n" + SMUGGLED,
        ),
        413,
    ),
]

LIMITS = ServerLimits(max_header_bytes=2048, max_header_count=10, max_body_bytes=1024)


@pytest.mark.parametrize(("raw", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_refused_and_closed(raw: bytes, status: int) -> None:
    async with serve(echo, LIMITS) as sut:
        client = await sut.connect()
        await client.send(raw)
        resp = await client.response()
        assert resp.status == status
        assert resp.header(b"connection") == b"close"
        assert resp.header(b"content-type") == b"application/json"
        error = resp.json()
        assert isinstance(error, dict) and error["error"]["status"] == status
        assert await client.closed()
        assert b"/smuggled" not in sut.paths
        assert set(sut.paths) <= {b"/first"}
        assert [e[1] for e in sut.errors] == [status]


@pytest.mark.parametrize(
    "raw",
    [
        post(b"Transfer-Encoding:\tchunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
        post(b"Transfer-Encoding: Chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
        post(b"Transfer-Encoding: chunked \r\n", b"5\r\nhello\r\n0\r\n\r\n"),
        post(b"Transfer-Encoding: chunked\r\n", b"5;name=value\r\nhello\r\n0\r\n\r\n"),
        post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n"),
        post(b"Content-Length:  5 \r\n", b"hello"),
        post(b"Content-Length: 005\r\n", b"hello"),
    ],
    ids=[
        "te-tab",
        "te-case",
        "te-trailing-space",
        "chunk-ext",
        "trailer",
        "cl-ows",
        "cl-leading-zeros",
    ],
)
async def test_unusual_but_valid_framing_is_accepted(raw: bytes) -> None:
    async with serve(echo) as sut:
        client = await sut.connect()
        await client.send(raw + SMUGGLED)
        first = await client.response()
        assert first.status == 200
        assert first.json() == {"method": "POST", "path": "/first", "body": "hello"}
        second = await client.response()  # the "smuggled" request is a real, separate request
        assert second.status == 200
        assert sut.paths == [b"/first", b"/smuggled"]
        assert sut.errors == []


async def test_error_after_valid_pipelined_requests_comes_in_order() -> None:
    good = b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
    bad = b"GET /bad HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n"
    async with serve(echo) as sut:
        client = await sut.connect()
        await client.send(good + good + bad + SMUGGLED)
        assert (await client.response()).status == 200
        assert (await client.response()).status == 200
        assert (await client.response()).status == 400
        assert await client.closed()
        assert sut.paths == [b"/first", b"/first"]


async def test_bad_chunk_in_pipelined_request_is_answered_in_its_turn() -> None:
    good = b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
    bad = post(b"Transfer-Encoding: chunked\r\n", b"zz\r\n")
    async with serve(echo) as sut:
        client = await sut.connect()
        await client.send(good + bad + SMUGGLED)
        assert (await client.response()).status == 200
        assert (await client.response()).status == 400
        assert await client.closed()
        assert b"/smuggled" not in sut.paths


async def test_upgrade_request_with_a_body_is_served_as_a_plain_request() -> None:
    raw = post(b"Connection: upgrade\r\nUpgrade: h2c\r\nContent-Length: 5\r\n", b"hello")
    async with serve(echo) as sut:
        client = await sut.connect()
        await client.send(raw + SMUGGLED)
        resp = await client.response()
        assert resp.status == 200
        assert resp.json() == {"method": "POST", "path": "/first", "body": "hello"}
        assert resp.header(b"connection") == b"close"
        assert await client.closed()
        assert sut.paths == [b"/first"]


async def test_chunked_upgrade_request_body_is_read_too() -> None:
    raw = post(
        b"Connection: upgrade\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n",
        b"5\r\nhello\r\n0\r\n\r\n",
    )
    async with serve(echo) as sut:
        client = await sut.connect()
        await client.send(raw + SMUGGLED)
        resp = await client.response()
        assert resp.json() == {"method": "POST", "path": "/first", "body": "hello"}
        assert await client.closed()
        assert sut.paths == [b"/first"]


async def test_request_after_connection_close_is_ignored() -> None:
    raw = b"GET /first HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    async with serve(echo) as sut:
        client = await sut.connect()
        await client.send(raw + SMUGGLED)
        resp = await client.response()
        assert resp.status == 200
        assert resp.header(b"connection") == b"close"
        assert await client.closed()
        assert sut.paths == [b"/first"]
        assert sut.errors == []


async def test_upgrade_request_body_arriving_later_is_read_too() -> None:
    head = post(b"Connection: upgrade\r\nUpgrade: h2c\r\nContent-Length: 10\r\n", b"")
    async with serve(echo) as sut:
        client = await sut.connect()
        await client.send(head)
        await eventually(lambda: sut.paths == [b"/first"])
        await client.send(b"hello")
        await client.send(b"world" + SMUGGLED)
        resp = await client.response()
        assert resp.json() == {"method": "POST", "path": "/first", "body": "helloworld"}
        assert await client.closed()
        assert sut.paths == [b"/first"]


async def test_huge_header_sent_in_pieces_is_refused_before_the_head_ends() -> None:
    async with serve(echo, LIMITS) as sut:
        client = await sut.connect()
        await client.send(b"GET /first HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(10):  # 10 x 1000 bytes of one header value, never finished
            client.writer.write(b"v" * 1000)
            await client.writer.drain()
            await asyncio.sleep(0)
        resp = await client.response()
        assert resp.status == 431
        assert await client.closed()
        assert sut.seen == []


async def test_many_headers_sent_in_pieces_are_refused() -> None:
    async with serve(echo, LIMITS) as sut:
        client = await sut.connect()
        await client.send(b"GET /first HTTP/1.1\r\nHost: x\r\n")
        for _ in range(3):
            client.writer.write(b"X-A: b\r\n" * 6)
            await client.writer.drain()
            await asyncio.sleep(0)
        resp = await client.response()
        assert resp.status == 431
        assert await client.closed()


async def test_long_url_sent_in_pieces_gets_414() -> None:
    async with serve(echo, LIMITS) as sut:
        client = await sut.connect()
        await client.send(b"GET /first")
        for _ in range(3):
            client.writer.write(b"a" * 1000)
            await client.writer.drain()
            await asyncio.sleep(0)
        resp = await client.response()
        assert resp.status == 414
        assert await client.closed()


async def test_too_many_trailer_fields_are_refused() -> None:
    body = b"5\r\nhello\r\n0\r\n" + b"X-T: v\r\n" * 20 + b"\r\n"
    async with serve(echo, LIMITS) as sut:
        client = await sut.connect()
        await client.send(post(b"Transfer-Encoding: chunked\r\n", body) + SMUGGLED)
        resp = await client.response()
        assert resp.status == 431  # the handler's read fails; the server answers
        assert await client.closed()
        assert b"/smuggled" not in sut.paths
