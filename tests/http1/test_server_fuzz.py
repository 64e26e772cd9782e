"""Property: how the bytes of valid pipelined requests are split across reads changes nothing.

Random requests (methods, paths, queries, headers, Content-Length or chunked bodies) are
serialised back to back and sent once in a single write and once split at random byte
boundaries. The handler must observe exactly the generated requests both times, and the
responses must be byte-for-byte equal (apart from ``date``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from itertools import pairwise

import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from piuptime.http1.server import Request, Responder, Server, ServerLimits
from tests.http1.server_helpers import HOST, RawClient, RawResponse, read_body

TOKEN = "abcdefghijklmnopqrstuvwxyz0123456789-"
PATH = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%/"
VALUE = "".join(chr(c) for c in range(0x21, 0x7F))


@dataclass
class Spec:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunks: list[int] | None  # chunk sizes when chunked, else Content-Length
    raw: bytes = b""


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT"]))
    path = "/" + draw(st.text(PATH, max_size=20))
    query = draw(st.one_of(st.none(), st.text(PATH + "=&", max_size=12)))
    target = (path if query is None else f"{path}?{query}").encode()
    names = draw(
        st.lists(st.text(TOKEN, min_size=1, max_size=12).map(lambda n: "x-" + n), max_size=5)
    )
    headers = [
        (name.encode(), draw(st.text(VALUE + " ", max_size=30)).strip().encode()) for name in names
    ]
    body = b""
    chunks = None
    if method != b"GET":
        body = draw(st.binary(max_size=3000))
        if draw(st.booleans()):
            cuts = sorted(draw(st.sets(st.integers(1, max(1, len(body) - 1)), max_size=6)))
            cuts = [c for c in cuts if 0 < c < len(body)]
            bounds = [0, *cuts, len(body)]
            chunks = [b - a for a, b in pairwise(bounds) if b > a]
    spec = Spec(method, target, headers, body, chunks)
    spec.raw = serialise(spec, draw(st.booleans()))
    return spec


def serialise(spec: Spec, chunk_ext: bool) -> bytes:
    lines = [b"%s %s HTTP/1.1" % (spec.method, spec.target), b"Host: fuzz"]
    lines += [b"%s: %s" % (n, v) for n, v in spec.headers]
    if spec.chunks is None:
        if spec.method != b"GET":
            lines.append(b"Content-Length: %d" % len(spec.body))
        return b"\r\n".join(lines) + b"\r\n\r\n" + spec.body
    lines.append(b"Transfer-Encoding: chunked")
    out = [b"\r\n".join(lines), b"\r\n\r\n"]
    pos = 0
    for size in spec.chunks:
        ext = b";n=v" if chunk_ext else b""
        out += [b"%x%s\r\n" % (size, ext), spec.body[pos : pos + size], b"\r\n"]
        pos += size
    out.append(b"0\r\n\r\n")
    return b"".join(out)


def expected_headers(spec: Spec) -> list[tuple[bytes, bytes]]:
    framing = []
    if spec.chunks is not None:
        framing = [(b"transfer-encoding", b"chunked")]
    elif spec.method != b"GET":
        framing = [(b"content-length", b"%d" % len(spec.body))]
    return [(b"host", b"fuzz"), *spec.headers, *framing]


async def handler_for(seen: list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]]):  # type: ignore[no-untyped-def]
    async def handler(req: Request, resp: Responder) -> None:
        body = await read_body(req)
        seen.append((req.method, req.target, list(req.headers), body))
        if len(seen) % 2:  # alternate content-length and chunked responses
            resp.send(200, body, headers=[(b"x-target", req.target)], content_type=b"text/plain")
        else:
            resp.start(201, [(b"x-target", req.target)])
            for i in range(0, len(body), 700):
                resp.write(body[i : i + 700])
                await resp.drain()
            resp.end()

    return handler


async def exchange(raw: bytes, cuts: list[int], count: int) -> tuple[list, list[RawResponse]]:  # type: ignore[type-arg]
    seen: list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]] = []
    server = Server(await handler_for(seen), ServerLimits())
    await server.listen(HOST, 0)
    try:
        reader, writer = await asyncio.open_connection(HOST, server.sockets[0].getsockname()[1])
        client = RawClient(reader, writer)
        bounds = [0, *cuts, len(raw)]
        for a, b in pairwise(bounds):
            writer.write(raw[a:b])
            await writer.drain()
            await asyncio.sleep(0)
        responses = [await client.response() for _ in range(count)]
        writer.close()
        return seen, responses
    finally:
        server.abort_all()


def comparable(resp: RawResponse) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
    return resp.status, [h for h in resp.headers if h[0] != b"date"], resp.body, resp.chunked


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(specs(), min_size=1, max_size=5), st.data())
def test_split_points_do_not_change_what_is_seen_or_answered(
    requests: list[Spec], data: st.DataObject
) -> None:
    raw = b"".join(s.raw for s in requests)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(raw) - 1), max_size=12), label="cuts"))

    whole_seen, whole_resp = uvloop.run(exchange(raw, [], len(requests)))
    split_seen, split_resp = uvloop.run(exchange(raw, cuts, len(requests)))

    expected = [(s.method, s.target, expected_headers(s), s.body) for s in requests]
    assert whole_seen == expected
    assert split_seen == expected
    assert [comparable(r) for r in split_resp] == [comparable(r) for r in whole_resp]
    for spec, resp in zip(requests, whole_resp, strict=True):
        assert resp.body == spec.body
        assert resp.header(b"x-target") == spec.target
