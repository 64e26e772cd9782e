"""systemd integration: ``sd_notify`` readiness and a watchdog fed by the event loop itself.

The protocol is one datagram per message to the unix socket named in ``$NOTIFY_SOCKET`` (a leading
``@`` means the Linux abstract namespace). Outside systemd the variable is unset and every call is a
no-op, so the gateway never needs to know whether it runs under systemd.

The watchdog ping is scheduled with ``loop.call_later``: it is sent only when the loop gets round
to running callbacks. A loop blocked by a bug stops the pings and systemd restarts the process,
which is the point of ``WatchdogSec``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time

log = logging.getLogger("piuptime.systemd")


class Notifier:
    """Sends sd_notify messages; silent when not started by systemd."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr: str | None = None
        self._sock: socket.socket | None = None
        if addr:
            self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
        self.watchdog_interval = _watchdog_interval(env)
        self._timer: asyncio.TimerHandle | None = None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, message: str) -> bool:
        """Send one message (``READY=1``, ``STATUS=...``); False if it could not be sent."""
        if self._sock is None or self._addr is None:
            return False
        try:
            self._sock.sendto(message.encode(), self._addr)
        except OSError as exc:  # a full or vanished socket must never hurt serving
            log.debug("sd_notify failed: %s", exc)
            return False
        return True

    def ready(self, status: str = "serving") -> None:
        self.notify(f"READY=1\nSTATUS={status}")

    def reloading(self) -> None:
        # systemd >= 253 wants MONOTONIC_USEC with RELOADING=1 (Type=notify-reload).
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading configuration")

    def stopping(self) -> None:
        self.notify("STOPPING=1\nSTATUS=draining and stopping")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def start_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ping WATCHDOG=1 at half the interval systemd asked for, from the loop itself."""
        if self.watchdog_interval is None or self._sock is None:
            return
        period = self.watchdog_interval / 2

        def ping() -> None:
            self.notify("WATCHDOG=1")
            self._timer = loop.call_later(period, ping)

        ping()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def _watchdog_interval(env: dict[str, str] | os._Environ[str]) -> float | None:
    """Seconds from ``$WATCHDOG_USEC``, if the watchdog is meant for this process."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None
