"""Hot reload: atomic swap, invalid files change nothing, pools survive, zero failed requests."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support import (
    NotifySocket,
    RawClient,
    SeenRequest,
    Upstream,
    fetch,
    gateway_yaml,
    piuptime_cmd,
    process,
    python_env,
    start_app,
    wait_until,
)

ROUTES = """\
  - name: api
    match: {path: /api/}
    upstream: main
"""


@pytest.fixture
async def ups() -> AsyncIterator[list[Upstream]]:
    servers = [await Upstream(name=f"u{i}").start() for i in range(2)]
    yield servers
    for s in servers:
        await s.stop()


async def test_reload_swaps_routes_and_keeps_unchanged_pools(
    ups: list[Upstream], tmp_path: Path
) -> None:
    text = gateway_yaml({"main": [ups[0].port], "other": [ups[1].port]}, ROUTES)
    app, port = await start_app(text, tmp_path, watch_interval=0)
    try:
        assert (await fetch(port, "/api/")).status == 200
        pool_before = app.runtime.upstreams["main"].targets[0].pool
        assert (await fetch(port, "/new")).status == 404
        (tmp_path / "piuptime.yaml").write_text(
            text + "  - name: new\n    match: {path: /new}\n    upstream: other\n"
        )
        assert await app.reload("test")
        r = await fetch(port, "/new")
        assert r.status == 200 and r.body == b"u1"
        assert app.runtime.upstreams["main"].targets[0].pool is pool_before
        assert (await fetch(port, "/api/")).status == 200
        assert ups[0].connections == 1, "the unchanged upstream's pooled connection survived"
    finally:
        await app.stop()


async def test_invalid_file_changes_nothing_and_says_why(
    ups: list[Upstream], tmp_path: Path
) -> None:
    text = gateway_yaml({"main": [ups[0].port]}, ROUTES)
    app, port = await start_app(text, tmp_path, watch_interval=0)
    try:
        runtime = app.runtime
        (tmp_path / "piuptime.yaml").write_text(text.replace("upstream: main", "upstream: nope"))
        assert not await app.reload("test")
        assert app.runtime is runtime
        assert app.reloads.failed == 1
        assert "nope" in (app.reloads.last_error or "")
        assert "piuptime.yaml:" in (app.reloads.last_error or "")
        (tmp_path / "piuptime.yaml").write_text("gateway: [unclosed\n")
        assert not await app.reload("test")
        assert app.reloads.failed == 2
        assert (await fetch(port, "/api/")).status == 200
    finally:
        await app.stop()


async def test_file_change_is_picked_up(ups: list[Upstream], tmp_path: Path) -> None:
    text = gateway_yaml({"main": [ups[0].port]}, ROUTES)
    app, port = await start_app(text, tmp_path, watch_interval=0.05)
    try:
        new = tmp_path / "new.yaml"
        new.write_text(text.replace("path: /api/", "path: /moved/"))
        new.replace(tmp_path / "piuptime.yaml")  # atomic rename, as editors do
        await wait_until(lambda: app.reloads.succeeded == 1, what="file-change reload")
        assert (await fetch(port, "/moved/")).status == 200
        assert (await fetch(port, "/api/")).status == 404
    finally:
        await app.stop()


async def test_in_flight_request_finishes_on_the_old_config(
    ups: list[Upstream], tmp_path: Path
) -> None:
    release = asyncio.Event()

    async def slow(req: SeenRequest, w: asyncio.StreamWriter) -> None:
        await release.wait()
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nold")
        await w.drain()

    ups[0].handler = slow
    text = gateway_yaml({"main": [ups[0].port]}, ROUTES)
    app, port = await start_app(text, tmp_path, watch_interval=0)
    try:
        pending = asyncio.ensure_future(fetch(port, "/api/"))
        await wait_until(lambda: len(ups[0].seen) == 1)
        (tmp_path / "piuptime.yaml").write_text(text.replace("/api/", "/v2/"))
        assert await app.reload("test")
        assert (await fetch(port, "/api/")).status == 404
        release.set()
        r = await pending
        assert r.status == 200 and r.body == b"old"
    finally:
        await app.stop()


class Load:
    """Keep-alive clients hammering the gateway; any non-200 or error is a failure."""

    def __init__(self, port: int, clients: int = 6) -> None:
        self.port = port
        self.ok = 0
        self.failed: list[str] = []
        self._stop = asyncio.Event()
        self.tasks = [asyncio.ensure_future(self._client(i)) for i in range(clients)]

    async def _client(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                c = await RawClient.connect(self.port)
                # New connections now and then, so accept + first request are covered too.
                for _ in range(50):
                    if self._stop.is_set():
                        break
                    r = await c.request("GET", f"/api/{i}/{n}")
                    n += 1
                    if r.status == 200:
                        self.ok += 1
                    else:
                        self.failed.append(f"status {r.status}: {r.body[:200]!r}")
                await c.close()
            except Exception as exc:
                self.failed.append(repr(exc))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self.tasks)


async def test_100_reloads_under_load_zero_failed_requests(
    ups: list[Upstream], tmp_path: Path
) -> None:
    """A separate gateway process, SIGHUP-reloaded 100 times while clients keep it busy."""
    cfg = tmp_path / "piuptime.yaml"

    def config(i: int) -> str:
        # Every reload changes something: weights, an extra route, the other upstream.
        text = gateway_yaml(
            {"main": [ups[0].port, ups[1].port], "side": [ups[1].port]},
            ROUTES + f"  - name: extra\n    match: {{path: /extra-{i}}}\n    upstream: side\n",
        )
        return text.replace(
            f'{{url: "http://127.0.0.1:{ups[1].port}"}}',
            f'{{url: "http://127.0.0.1:{ups[1].port}", weight: {1 + i % 3}}}',
            1,
        )

    cfg.write_text(config(0).replace('"127.0.0.1:0"', '"127.0.0.1:0"'))
    notify = NotifySocket(tmp_path / "notify.sock")
    env = python_env() | {"NOTIFY_SOCKET": notify.path}
    with process(
        piuptime_cmd("run", "-c", str(cfg), "--watch-interval", "0"),
        env=env,
        stderr=subprocess.PIPE,
    ) as proc:
        await asyncio.to_thread(notify.wait, "READY=1")
        port = _port_from_status(notify)
        load = Load(port)
        await wait_until(lambda: load.ok > 50, 10, "load running")
        for i in range(1, 101):
            cfg.write_text(config(i))
            ready_before = notify.count("READY=1")
            proc.send_signal(signal.SIGHUP)
            await asyncio.to_thread(notify.wait, "READY=1", ready_before + 1)
        await asyncio.sleep(0.2)  # a little more load on the final config
        await load.stop()
        assert (await fetch(port, "/extra-100")).status == 200
        assert load.failed == [], load.failed[:5]
        assert load.ok > 500
        assert notify.count("RELOADING=1") == 100
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert "rejected" not in err
    notify.close()


def _port_from_status(notify: NotifySocket) -> int:
    """READY=1 carries STATUS=serving on http://127.0.0.1:PORT."""
    for _, m in notify.messages:
        if "READY=1" in m and "http://" in m:
            return int(m.rsplit(":", 1)[1].split()[0].strip(","))
    raise AssertionError(notify.messages)
