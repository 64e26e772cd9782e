"""Real processes for the failover tests: demo devices as subprocesses, a keep-alive load
generator, and readers for what the gateway reports (``/status``, the access log).

The devices are ``python -m piuptime.demo.device`` processes with ``--record FILE``: every
request a device receives is appended to its file as one JSON line before it answers, so a test
can count the attempts that reached each device, and see which request bodies reached it, even
after the device was SIGKILLed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import RawClient, fetch, free_port, python_env, wait_until

# -- devices --------------------------------------------------------------------------------


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Device:
    """One demo device process on a fixed port; it can be killed, stalled and restarted."""

    def __init__(self, name: str, workdir: Path, *args: str) -> None:
        self.name = name
        self.port = free_port()
        self.record = workdir / f"{name}.jsonl"
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False  # SIGSTOPped
        self.generations = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        """Start the process (again, on the same port, after a kill)."""
        assert self.proc is None or self.proc.poll() is not None
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "piuptime.demo.device",
                "--name",
                self.name,
                "--port",
                str(self.port),
                "--record",
                str(self.record),
                *self.args,
            ],
            env=python_env(),
            stdout=subprocess.DEVNULL,
        )
        self.generations += 1

    async def ready(self, timeout: float = 15.0) -> None:
        proc = self.proc
        assert proc is not None

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"device {self.name} exited with {proc.returncode}")
            return _listening(self.port)

        await wait_until(up, timeout, f"device {self.name} listening")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the kernel resets its connections and refuses new ones."""
        assert self.proc is not None
        self.cont()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stall(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel, nothing is ever answered."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.stopped = True

    def cont(self) -> None:
        if self.stopped and self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.stopped = False

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.cont()
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def seen(self) -> list[dict[str, Any]]:
        """Every request this device (every generation of it) received, in order."""
        if not self.record.exists():
            return []
        lines = self.record.read_bytes().split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def count(self, prefix: str = "/") -> int:
        return sum(1 for r in self.seen() if r["path"].startswith(prefix))


@contextlib.asynccontextmanager
async def devices(  # type: ignore[no-untyped-def]
    workdir: Path, n: int = 3, *args: str, only: dict[int, list[str]] | None = None
):
    """``n`` devices named d0..d{n-1}, each run with ``args`` (plus ``only[i]`` for device
    ``i``), started in parallel; yields once all are listening."""
    only = only or {}
    devs = [Device(f"d{i}", workdir, *args, *only.get(i, [])) for i in range(n)]
    try:
        for d in devs:
            d.spawn()
        for d in devs:
            await d.ready()
        yield devs
    finally:
        for d in devs:
            d.close()


# -- the gateway's config -------------------------------------------------------------------


def upstream_yaml(devs: list[Device], body: str = "", name: str = "devs") -> str:
    """An ``upstreams:`` entry for ``devs``; ``body`` holds more keys, indented by 4."""
    lines = [f"  {name}:", "    targets:"]
    lines += [f'      - {{url: "{d.url}"}}' for d in devs]
    lines += [f"    {line}" for line in body.strip("\n").splitlines()]
    return "\n".join(lines) + "\n"


def gateway_config(devs: list[Device], upstream: str, access_log: Path, route: str = "") -> str:
    return (
        "gateway:\n"
        '  listen: ["127.0.0.1:0"]\n'
        f"  access_log: {{path: {access_log}}}\n"
        'admin: {listen: "127.0.0.1:0"}\n'
        "upstreams:\n"
        + upstream_yaml(devs, upstream)
        + "routes:\n"
        + "  - name: r\n"
        + "    match: {path: /}\n"
        + "    upstream: devs\n"
        + "".join(f"    {line}\n" for line in route.strip("\n").splitlines())
    )


async def upstream_status(app: Any, name: str = "devs") -> dict[str, Any]:
    """The upstream's entry of the admin listener's ``GET /status``."""
    r = await fetch(admin_port(app), "/status")
    assert r.status == 200, r
    return json.loads(r.body)["upstreams"][name]  # type: ignore[no-any-return]


def admin_port(app: Any) -> int:
    """The port of the app's admin listener (``admin: {listen: 127.0.0.1:0}``)."""
    return int(app.admin.server.sockets[0].getsockname()[1])


def target(status: dict[str, Any], dev: Device) -> dict[str, Any]:
    for t in status["targets"]:
        if t["url"] == dev.url:
            return t  # type: ignore[no-any-return]
    raise AssertionError(f"{dev.url} not in {status['targets']}")


def access_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    return [json.loads(line) for line in lines if line.strip()]


# -- load -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    start: float  # time.monotonic() when sent
    latency: float  # seconds to the whole response
    status: int
    path: str


@dataclass
class Load:
    """``clients`` keep-alive connections sending GETs back to back. A connection error is a
    failure (recorded, then a new connection); any status is recorded as a sample."""

    port: int
    clients: int = 20
    prefix: str = "/api"
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> Load:
        self._tasks = [asyncio.ensure_future(self._client(i)) for i in range(self.clients)]
        return self

    async def _client(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                c = await RawClient.connect(self.port)
            except OSError as exc:
                self.errors.append(f"connect: {exc!r}")
                continue
            path = ""
            try:
                while not self._stop.is_set():
                    path = f"{self.prefix}/{i}/{n}"
                    n += 1
                    t0 = time.monotonic()
                    r = await c.request("GET", path)
                    self.samples.append(Sample(t0, time.monotonic() - t0, r.status, path))
                    if c.closed or r.header(b"connection") == b"close":
                        break
            except Exception as exc:
                self.errors.append(f"{path}: {exc!r}")
            finally:
                await c.close()

    @property
    def done(self) -> int:
        return len(self.samples)

    async def more(self, n: int, timeout: float = 10.0) -> None:
        """Wait until ``n`` more responses arrived."""
        target = self.done + n
        await wait_until(lambda: self.done >= target, timeout, f"{n} more responses")

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def statuses(self, since: float = 0.0) -> Counter[int]:
        return Counter(s.status for s in self.samples if s.start >= since)

    def failures(self, since: float = 0.0, ok: int = 200) -> list[str]:
        bad = [f"{s.path}: {s.status}" for s in self.samples if s.start >= since and s.status != ok]
        return self.errors + bad

    def p99(self, since: float = 0.0) -> float:
        return percentile([s.latency for s in self.samples if s.start >= since], 0.99)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
