"""A WebSocket echo through the gateway: the `websockets` library on both ends."""

from __future__ import annotations

import os

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from tests.support import gateway_yaml, start_app

ROUTES = """\
  - name: ws
    match: {path: /ws/}
    upstream: main
    strip_prefix: true
"""


async def _echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


async def test_websocket_echo_through_the_gateway() -> None:
    async with serve(_echo, "127.0.0.1", 0, max_size=None) as server:
        up_port = next(iter(server.sockets)).getsockname()[1]
        app, port = await start_app(gateway_yaml({"main": [up_port]}, ROUTES))
        try:
            async with connect(f"ws://127.0.0.1:{port}/ws/echo", max_size=None) as ws:
                for text in ["hello", "ünïcødé", "x" * 70000]:
                    await ws.send(text)
                    assert await ws.recv() == text
                blob = os.urandom(3 * 1024 * 1024)
                await ws.send(blob)
                assert await ws.recv() == blob
                # Many small frames in flight at once arrive intact and in order.
                for i in range(200):
                    await ws.send(f"m{i}")
                assert [await ws.recv() for _ in range(200)] == [f"m{i}" for i in range(200)]
                pong = await ws.ping()
                await pong
        finally:
            await app.stop()


async def test_websocket_rejected_by_upstream_is_a_normal_response() -> None:
    async def reject(ws: ServerConnection) -> None:  # never reached
        raise AssertionError

    def refuse(connection: ServerConnection, request: object) -> object:
        return connection.respond(403, "no\n")

    async with serve(reject, "127.0.0.1", 0, process_request=refuse) as server:
        up_port = next(iter(server.sockets)).getsockname()[1]
        app, port = await start_app(gateway_yaml({"main": [up_port]}, ROUTES))
        try:
            from websockets.exceptions import InvalidStatus

            try:
                async with connect(f"ws://127.0.0.1:{port}/ws/echo"):
                    raise AssertionError("should not connect")
            except InvalidStatus as exc:
                assert exc.response.status_code == 403
        finally:
            await app.stop()
