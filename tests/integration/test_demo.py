"""`piuptime demo`: devices and gateway come up, traffic spreads, Ctrl-C stops everything."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import shlex
import signal
import subprocess
import threading
from typing import IO

import openai

from tests.support import fetch, free_port, piuptime_cmd, process, python_env, wait_until


async def test_demo_serves_spreads_load_and_stops_cleanly() -> None:
    port, device_port = _demo_ports()
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
        # the AI gateway: pi-1 answers demo-chat in OpenAI's protocol, whole and streamed
        ask = {"model": "demo-chat", "messages": [{"role": "user", "content": "hello"}]}
        chat = await fetch(
            port,
            "/v1/chat/completions",
            method="POST",
            body=json.dumps(ask).encode(),
            headers={"content-type": "application/json"},
        )
        assert chat.status == 200 and chat.header(b"x-piuptime-deployment") == b"pi-1/tiny"
        assert json.loads(chat.body)["choices"][0]["message"]["content"] == "pi-1 heard: hello"
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="demo", max_retries=0
        )
        stream = await client.chat.completions.create(
            model="demo-chat",
            messages=[{"role": "user", "content": "hi there"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        await client.close()
        assert text == "pi-1 heard: hi there" and usage is not None and usage.completion_tokens == 4
        # the policies route: a key, a cache, a rate limit of 5 per 10 s
        assert (await fetch(port, "/api/temperature")).status == 401
        key = {"apikey": "demo-kitchen-key"}
        first = await fetch(port, "/api/temperature", headers=key)
        assert first.status == 200 and first.header(b"x-cache") == b"MISS"
        assert first.header(b"x-request-id") is not None
        second = await fetch(port, "/api/temperature", headers=key)
        assert second.header(b"x-cache") == b"HIT" and second.body == first.body
        statuses = [(await fetch(port, "/api/t", headers=key)).status for _ in range(5)]
        # 5 allowed in all (two above); a 10 s window boundary crossed meanwhile may let the
        # sliding window's decay admit one more, never two
        assert statuses[:3] == [200, 200, 200] and statuses[-1] == 429, statuses
        # Ctrl-C in a terminal signals the whole foreground process group.
        os.killpg(proc.pid, signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 15) == 0
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert "curl" in err and "Ctrl-C" in err
        for i in range(3):
            await wait_until(lambda i=i: _free(device_port + i), 10, "devices stopped")


def _demo_ports() -> tuple[int, int]:
    """A gateway port and a first device port, with the two after it, that the demo can bind
    (the demo refuses to start otherwise): free now, and distinct."""
    while True:
        port, device_port = free_port(), free_port()
        ports = {port, device_port, device_port + 1, device_port + 2}
        if len(ports) == 4 and all(_bindable(p) for p in ports):
            return port, device_port


def _bindable(port: int) -> bool:
    """What the demo checks: a bind with SO_REUSEADDR (an outgoing connection's local port, or
    a listener, makes it fail)."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free(port: int) -> bool:
    return not _listening(port)


async def test_demo_banner_kill_line_moves_the_traffic_and_status_shows_it() -> None:
    """Follow the banner: ``kill -9 <pid>`` of a device, no request fails, and the printed
    ``piuptime status`` line shows that device out of service."""
    port, device_port = _demo_ports()
    with process(
        piuptime_cmd("demo", "--port", str(port), "--device-port", str(device_port)),
        env=python_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    ) as proc:
        assert proc.stderr is not None
        banner: list[str] = []
        reader = threading.Thread(target=_read_lines, args=(proc.stderr, banner), daemon=True)
        reader.start()

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"demo exited with {proc.returncode}: {''.join(banner)}")
            return _listening(port)

        await wait_until(up, 15, "demo gateway")
        await wait_until(lambda: any("Ctrl-C" in line for line in banner), 5, "the banner")
        kill = [line.split() for line in banner if line.strip().startswith("kill -9 ")]
        assert len(kill) == 1, banner
        pid = int(kill[0][2])
        # The pid printed is the one pi-2 reports in its answers.
        pids = {}
        for _ in range(4):
            r = await fetch(port, "/sensors/t")
            pids[json.loads(r.body)["device"]] = json.loads(r.body)["pid"]
        assert pids["pi-2"] == pid
        (status_line,) = [line for line in banner if " status -c " in line]
        os.kill(pid, signal.SIGKILL)
        answered = collections.Counter()
        for _ in range(12):
            r = await fetch(port, "/sensors/t")
            assert r.status == 200, r
            answered[json.loads(r.body)["device"]] += 1
        assert "pi-2" not in answered
        out = await asyncio.to_thread(
            subprocess.run,
            [*shlex.split(status_line), "--json"],
            capture_output=True,
            text=True,
            env=python_env(),
            timeout=20,
        )
        assert out.returncode == 0, out.stderr
        targets = json.loads(out.stdout)["upstreams"]["devices"]["targets"]
        (pi2,) = [t for t in targets if t["url"] == f"http://127.0.0.1:{device_port + 1}"]
        assert pi2["ejected"] or not pi2["healthy"], pi2
        os.killpg(proc.pid, signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 15) == 0
        reader.join(5)


def _read_lines(stream: IO[bytes], into: list[str]) -> None:
    for line in stream:
        into.append(line.decode(errors="replace"))
