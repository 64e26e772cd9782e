"""sd_notify and the loop-fed watchdog, against a real unix datagram socket."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from piuptime.systemd import Notifier


class Collector:
    """A NOTIFY_SOCKET stand-in: records (arrival time, message) from its own thread."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, predicate: str, timeout: float = 5.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for _, m in self.messages if predicate in m]
            if found:
                return found
            time.sleep(0.01)
        raise AssertionError(f"no message with {predicate!r}; got {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def collector(tmp_path: Path):  # type: ignore[no-untyped-def]
    c = Collector(str(tmp_path / "notify.sock"))
    yield c
    c.close()


def test_ready_reloading_stopping(collector: Collector) -> None:
    n = Notifier({"NOTIFY_SOCKET": collector.sock.getsockname()})
    assert n.enabled
    n.ready("serving on x")
    n.reloading()
    n.ready()
    n.stopping()
    collector.wait_for("STOPPING=1")
    msgs = [m for _, m in collector.messages]
    assert msgs[0].startswith("READY=1") and "STATUS=serving on x" in msgs[0]
    assert msgs[1].startswith("RELOADING=1") and "MONOTONIC_USEC=" in msgs[1]
    assert msgs[2].startswith("READY=1")
    assert msgs[3].startswith("STOPPING=1")
    n.close()


def test_abstract_namespace_socket() -> None:
    name = f"piuptime-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        n.ready()
        assert sock.recv(100).startswith(b"READY=1")
        n.close()
    finally:
        sock.close()


def test_no_socket_is_a_silent_no_op() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.notify("READY=1") is False
    n.close()


def test_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.notify("READY=1") is False


def test_watchdog_pid_mismatch_disables_watchdog(collector: Collector) -> None:
    env = {
        "NOTIFY_SOCKET": collector.sock.getsockname(),
        "WATCHDOG_USEC": "100000",
        "WATCHDOG_PID": str(os.getpid() + 1),
    }
    assert Notifier(env).watchdog_interval is None
    env["WATCHDOG_PID"] = str(os.getpid())
    assert Notifier(env).watchdog_interval == pytest.approx(0.1)


async def test_watchdog_pings_stop_while_the_loop_is_blocked(collector: Collector) -> None:
    env = {"NOTIFY_SOCKET": collector.sock.getsockname(), "WATCHDOG_USEC": "100000"}
    n = Notifier(env)
    loop = asyncio.get_running_loop()
    n.start_watchdog(loop)  # pings every 50 ms
    deadline = time.monotonic() + 5
    while sum("WATCHDOG=1" in m for _, m in collector.messages) < 3:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    blocked_from = time.monotonic()
    time.sleep(0.5)  # noqa: ASYNC251 - deliberately block the event loop, as a bug would
    blocked_until = time.monotonic()
    while not any(t > blocked_until for t, m in collector.messages if "WATCHDOG=1" in m):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    n.close()
    pings = [t for t, m in collector.messages if "WATCHDOG=1" in m]
    during = [t for t in pings if blocked_from + 0.01 < t < blocked_until - 0.01]
    assert during == [], "a blocked loop must not feed the watchdog"
    assert any(t > blocked_until for t in pings), "pings resume once the loop runs again"
