"""`piuptime demo`: devices and gateway come up, traffic spreads, Ctrl-C stops everything."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess

from tests.support import fetch, free_port, piuptime_cmd, process, python_env, wait_until


async def test_demo_serves_spreads_load_and_stops_cleanly() -> None:
    port = free_port()
    device_port = free_port()
    while any(not _free(device_port + i) for i in range(3)):
        device_port = free_port()
    with process(
        piuptime_cmd("demo", "--port", str(port), "--device-port", str(device_port)),
        env=python_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    ) as proc:
        await wait_until(lambda: _listening(port), 15, "demo gateway")
        devices = collections.Counter()
        for _ in range(8):
            r = await fetch(port, "/sensors/temperature")
            assert r.status == 200
            devices[json.loads(r.body)["device"]] += 1
        assert devices == {"pi-1": 4, "pi-2": 2, "pi-3": 2}
        assert (await fetch(port, "/device/healthz")).body == b'{"status":"ok"}'
        echo = await fetch(port, "/echo", method="POST", body=b"hello")
        assert echo.body == b"hello"
        assert (await fetch(port, "/nope")).status == 404
        # Ctrl-C in a terminal signals the whole foreground process group.
        os.killpg(proc.pid, signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 15) == 0
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert "curl" in err and "Ctrl-C" in err
        for i in range(3):
            await wait_until(lambda i=i: _free(device_port + i), 10, "devices stopped")


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free(port: int) -> bool:
    return not _listening(port)
