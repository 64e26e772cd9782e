"""Redis for tests: the machine's shared server, or a private ``redis-server`` to kill and restart.

- :func:`shared_redis_url` answers the URL of the Redis at 127.0.0.1:6379, starting one
  (``redis-server --daemonize yes --port 6379 --save "" --appendonly no``) when none answers.
  Tests that use it must keep to their own key prefix and never stop it.
- :class:`RedisServer` runs a private ``redis-server`` on a free port in a temporary directory,
  for fault tests: :meth:`~RedisServer.kill` (SIGKILL), :meth:`~RedisServer.pause` /
  :meth:`~RedisServer.resume` (SIGSTOP / SIGCONT), and :meth:`~RedisServer.start` again on the
  same port.
- The fixtures ``shared_redis`` (session) and ``private_redis`` (per test) wrap them; import
  them into a ``conftest.py`` to use them.

When there is no ``redis-server`` binary the tests that need one are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED_HOST = "127.0.0.1"
SHARED_PORT = 6379


def redis_server_binary() -> str | None:
    """The ``redis-server`` to run: ``$REDIS_SERVER``, then ``PATH``, then the usual places."""
    found = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if found:
        return found
    for candidate in (
        "/usr/bin/redis-server",
        "/usr/local/bin/redis-server",
        "/usr/sbin/redis-server",
    ):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def require_redis_server() -> str:
    binary = redis_server_binary()
    if binary is None:
        pytest.skip(
            "redis-server is not installed (apt-get install redis-server, or set REDIS_SERVER)"
        )
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ping(host: str, port: int, timeout: float = 0.2) -> bool:
    """True when a Redis at host:port answers PING (a raw socket: no client library involved)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def wait_for_ping(host: str, port: int, *, up: bool, timeout: float = 5.0) -> None:
    """Poll until a Redis at host:port answers (``up``) or stops answering; fail after timeout."""
    deadline = time.monotonic() + timeout
    while ping(host, port) != up:
        if time.monotonic() > deadline:
            state = "answer" if up else "stop answering"
            raise RuntimeError(f"redis at {host}:{port} did not {state} within {timeout}s")
        time.sleep(0.01)


def shared_redis_url(db: int = 0) -> str:
    """The machine's shared Redis (127.0.0.1:6379), started in the background if it is not up."""
    if not ping(SHARED_HOST, SHARED_PORT):
        binary = require_redis_server()
        subprocess.run(
            [
                binary,
                "--daemonize",
                "yes",
                "--port",
                str(SHARED_PORT),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            cwd=tempfile.gettempdir(),
        )
        wait_for_ping(SHARED_HOST, SHARED_PORT, up=True)
    return f"redis://{SHARED_HOST}:{SHARED_PORT}/{db}"


class RedisServer:
    """A private ``redis-server`` subprocess on 127.0.0.1 (nothing kept on disk)."""

    def __init__(self, port: int | None = None) -> None:
        self.binary = require_redis_server()
        self.port = port if port is not None else free_port()
        self.host = "127.0.0.1"
        self._dir = Path(tempfile.mkdtemp(prefix="piuptime-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 5.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("already running")
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                self.host,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._dir),
                "--logfile",
                str(self._dir / "log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_ping(self.host, self.port, up=True, timeout=timeout)
        except RuntimeError:
            self.kill()
            log = (
                (self._dir / "log").read_text(errors="replace")[-2000:]
                if (self._dir / "log").exists()
                else ""
            )
            raise RuntimeError(
                f"private redis-server did not start on {self.port}:\n{log}"
            ) from None

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-use, as in a crash."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)  # a paused server must die too
                self.proc.kill()
            self.proc.wait(timeout=5)
            self.proc = None

    def pause(self) -> None:
        """SIGSTOP: connections open, nothing answers (a hung or unreachable server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(scope="session")
def shared_redis() -> str:
    """URL of the shared Redis at 127.0.0.1:6379 (started if absent; never stopped)."""
    return shared_redis_url()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A private redis-server, running, on its own port; killed at the end of the test."""
    with RedisServer() as server:
        yield server
