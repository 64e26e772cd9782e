"""Active health checks against real local servers that change their answers."""

from __future__ import annotations

import asyncio
import random
import socket

from piuptime.gateway.health import ActiveChecker, CheckSettings, ProbeTarget
from tests.support import SeenRequest, Upstream


def settings(**kw: object) -> CheckSettings:
    base: dict[str, object] = {
        "interval": 0.05,
        "timeout": 0.3,
        "healthy_after": 2,
        "unhealthy_after": 3,
    }
    base.update(kw)
    return CheckSettings(**base)  # type: ignore[arg-type]


class Switchable:
    """An upstream whose health endpoint answers with a status we choose."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b"ok"
        self.hang = False
        self.up = Upstream()

    async def start(self) -> Switchable:
        async def handler(req: SeenRequest, w: asyncio.StreamWriter) -> None:
            if self.hang:
                await asyncio.sleep(10)
            w.write(
                b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n\r\n" % (self.status, len(self.body))
                + self.body
            )
            await w.drain()

        self.up.handler = handler
        await self.up.start()
        return self


async def test_thresholds_and_transitions() -> None:
    dev = await Switchable().start()
    changes: list[tuple[int, bool]] = []
    c = ActiveChecker(
        [ProbeTarget("http", "127.0.0.1", dev.up.port)],
        settings(),
        lambda i, h: changes.append((i, h)),
    )
    try:
        for _ in range(3):
            assert await c.probe_once(0)
        dev.status = 503
        assert not await c.probe_once(0)
        assert not await c.probe_once(0)
        assert c.healthy == [True]  # two failures: still healthy
        assert not await c.probe_once(0)
        assert c.healthy == [False] and changes == [(0, False)]
        assert c.last_error[0] == "status 503"
        dev.status = 200
        assert await c.probe_once(0)
        assert c.healthy == [False]
        assert await c.probe_once(0)
        assert c.healthy == [True] and changes == [(0, False), (0, True)]
        seen = dev.up.seen[-1]
        assert seen.path == b"/healthz" and dict(seen.headers)[b"user-agent"].startswith(b"piu")
    finally:
        await c.stop()
        await dev.up.stop()


async def test_body_match_method_host_and_timeout() -> None:
    dev = await Switchable().start()
    c = ActiveChecker(
        [ProbeTarget("http", "127.0.0.1", dev.up.port)],
        settings(
            method="HEAD",
            path="/status",
            host="device.local",
            body_contains=None,
            unhealthy_after=1,
        ),
    )
    b = ActiveChecker(
        [ProbeTarget("http", "127.0.0.1", dev.up.port)],
        settings(body_contains=b'"ready"', unhealthy_after=1),
    )
    try:
        assert await c.probe_once(0)
        seen = dev.up.seen[-1]
        assert seen.method == b"HEAD" and seen.path == b"/status"
        assert dict(seen.headers)[b"host"] == b"device.local"
        assert not await b.probe_once(0)
        assert "body does not contain" in (b.last_error[0] or "")
        dev.body = b'{"state": "ready"}'
        assert await b.probe_once(0)
        dev.hang = True
        assert not await b.probe_once(0)
        assert "within 0.3s" in (b.last_error[0] or "")
    finally:
        await c.stop()
        await b.stop()
        await dev.up.stop()


async def test_tcp_check_and_a_dead_port() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    c = ActiveChecker(
        [ProbeTarget("tcp", "127.0.0.1", port)], settings(kind="tcp", unhealthy_after=1)
    )
    try:
        assert await c.probe_once(0)
        listener.close()
        assert not await c.probe_once(0)
        assert c.healthy == [False]
    finally:
        await c.stop()


async def test_background_probing_is_jittered_and_finds_a_dead_target() -> None:
    devs = [await Switchable().start() for _ in range(3)]
    changes: list[tuple[int, bool]] = []
    c = ActiveChecker(
        [ProbeTarget("http", "127.0.0.1", d.up.port) for d in devs],
        settings(interval=0.05, jitter=0.5, unhealthy_after=2),
        lambda i, h: changes.append((i, h)),
        rng=random.Random(3),
    )
    c.start()
    try:
        deadline = asyncio.get_running_loop().time() + 5
        while min(len(d.up.seen) for d in devs) < 3:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        await devs[1].up.stop()  # the device dies: refused connections
        while (1, False) not in changes:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        assert c.healthy == [True, False, True]
    finally:
        await c.stop()
        for d in devs:
            await d.up.stop()
