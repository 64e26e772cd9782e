"""Upgrade tunnels driven by a raw-socket client: 101 then raw bytes both ways, including bytes
that arrived in the same packet as the request head."""

from __future__ import annotations

from piuptime.http1.server import Request, Responder
from tests.http1.server_helpers import eventually, record_then, serve

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\n"
    b"Upgrade: WebSocket\r\nSec-WebSocket-Key: abc\r\n\r\n"
)


async def shouting_tunnel(req: Request, resp: Responder) -> None:
    """Upgrade, then echo every tunnel read upper-cased until the client's EOF."""
    assert req.upgrade == b"websocket"
    tunnel = resp.upgrade([(b"sec-websocket-accept", b"xyz"), (b"connection", b"dropped")])
    while data := await tunnel.read():
        tunnel.write(data.upper())
        await tunnel.drain()
    tunnel.write(b"BYE")


async def test_tunnel_echoes_bytes_including_those_sent_with_the_head() -> None:
    async with serve(record_then(shouting_tunnel)) as sut:
        client = await sut.connect()
        await client.send(UPGRADE + b"early bytes")
        resp = await client.response()
        assert resp.status == 101
        assert resp.reason == b"Switching Protocols"
        assert resp.header(b"upgrade") == b"websocket"
        assert resp.header(b"connection") == b"upgrade"
        assert resp.header(b"sec-websocket-accept") == b"xyz"
        assert await client.reader.readexactly(11) == b"EARLY BYTES"
        # bytes that look like HTTP are just bytes now
        await client.send(b"get /not-http HTTP/1.1\r\n\r\n")
        assert await client.reader.readexactly(26) == b"GET /NOT-HTTP HTTP/1.1\r\n\r\n"
        client.writer.write_eof()
        assert await client.reader.read() == b"BYE"  # then the server closes
        assert sut.paths == [b"/ws"]
        await eventually(lambda: sut.server.active_connections == 0)


async def test_large_tunnel_transfer_both_ways() -> None:
    async with serve(record_then(shouting_tunnel)) as sut:
        client = await sut.connect()
        await client.send(UPGRADE)
        assert (await client.response()).status == 101
        payload = b"abcdefgh" * 256 * 1024  # 2 MiB
        client.writer.write(payload)
        received = b""
        while len(received) < len(payload):
            received += await client.reader.read(1 << 20)
        assert received == payload.upper()


async def test_upgrade_answered_normally_closes_the_connection() -> None:
    async def refuse(req: Request, resp: Responder) -> None:
        assert req.upgrade == b"websocket"
        resp.send_error(403, "forbidden", "no websockets here")

    async with serve(record_then(refuse)) as sut:
        client = await sut.connect()
        await client.send(UPGRADE + b"\x81\x05hello")
        resp = await client.response()
        assert resp.status == 403
        assert resp.header(b"connection") == b"close"
        assert await client.closed()


async def test_upgrade_header_without_connection_upgrade_is_a_plain_request() -> None:
    async def plain(req: Request, resp: Responder) -> None:
        assert req.upgrade is None
        resp.send(200, b"{}")

    async with serve(record_then(plain)) as sut:
        client = await sut.connect()
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
        assert (await client.response()).status == 200
        assert await client.still_open()


async def test_tunnel_close_from_the_handler() -> None:
    async def one_shot(req: Request, resp: Responder) -> None:
        tunnel = resp.upgrade([])
        tunnel.write(b"hello")
        tunnel.close()

    async with serve(record_then(one_shot)) as sut:
        client = await sut.connect()
        await client.send(UPGRADE)
        resp = await client.response()
        assert resp.header(b"upgrade") == b"websocket"
        assert await client.reader.read() == b"hello"
