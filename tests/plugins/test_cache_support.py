"""Helpers of the cache tests (no tests here): a controllable cache clock, an upstream whose
answers each test scripts, and readers for the cache's metrics and zones."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from piuptime.gateway.plugins import cache as cache_plugin
from tests.support import SeenRequest, Upstream

Answer = tuple[int, list[tuple[str, str]], bytes]


class Clock:
    """Replaces the cache's wall clock: ages and expiry move only when a test says."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(cache_plugin, "now", c)
    return c


def write_answer(
    writer: asyncio.StreamWriter,
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    chunked: bool = False,
    head: bool = False,
) -> None:
    lines = [f"HTTP/1.1 {status} X"]
    lines += [f"{k}: {v}" for k, v in headers]
    if status in (204, 304):
        pass
    elif chunked:
        lines.append("transfer-encoding: chunked")
    else:
        lines.append(f"content-length: {len(body)}")
    out = ("\r\n".join(lines) + "\r\n\r\n").encode()
    if head or status in (204, 304):
        writer.write(out)
    elif chunked:
        chunks = [body[i : i + 700] for i in range(0, len(body), 700)]
        writer.write(out + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n")
    else:
        writer.write(out + body)


class Scripted:
    """An upstream whose answer to each request comes from ``answer(request)`` (sync or
    async); ``gate``, when set, holds every answer until it is opened."""

    def __init__(self, answer: Callable[[SeenRequest], Answer | Awaitable[Answer]]) -> None:
        self.answer = answer
        self.server = Upstream(name="scripted")
        self.server.handler = self._handle
        self.gate: asyncio.Event | None = None
        self.chunked = False

    @property
    def seen(self) -> list[SeenRequest]:
        return self.server.seen

    @property
    def port(self) -> int:
        return self.server.port

    def count(self, path: str | None = None, method: str | None = None) -> int:
        return sum(
            1
            for r in self.seen
            if (path is None or r.path.decode() == path)
            and (method is None or r.method.decode() == method)
        )

    async def _handle(self, req: SeenRequest, writer: asyncio.StreamWriter) -> None:
        if self.gate is not None:
            await self.gate.wait()
        got = self.answer(req)
        if not isinstance(got, tuple):
            got = await got
        status, headers, body = got
        write_answer(
            writer, status, headers, body, chunked=self.chunked, head=req.method == b"HEAD"
        )
        await writer.drain()

    async def start(self) -> Scripted:
        await self.server.start()
        return self

    async def stop(self) -> None:
        if self.gate is not None:
            self.gate.set()
        await self.server.stop()


def cache_counts(app: Any, route: str) -> dict[str, float]:
    """``piuptime_cache_requests_total`` of one route, by status (those not zero)."""
    samples = app.metrics.snapshot().get("piuptime_cache_requests_total", {})
    out: dict[str, float] = {}
    for labels, value in samples.items():
        parts = dict(p.split("=", 1) for p in labels.split(","))
        if parts["route"] == route and value:
            out[parts["status"]] = value
    return out


def metric(app: Any, name: str, labels: str = "") -> float:
    return float(app.metrics.snapshot().get(name, {}).get(labels, 0.0))


def zone_of(app: Any, name: str) -> Any:
    from piuptime.gateway.cache.store import zones

    return zones(app.plugin_env.keep)[name]
