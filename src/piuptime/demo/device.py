"""A small stand-in for a device service (a Pi running a sensor API), served by our own http1.

Endpoints: ``/`` and ``/sensors/...`` (a JSON reading from this device), ``/healthz``,
``POST /echo`` (echoes the body), ``/stream`` (a chunked response in several writes),
``/slow?ms=N`` (answers after N ms).

Run: ``python -m piuptime.demo.device --name pi-1 --port 9001``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import time
from urllib.parse import parse_qs

import orjson
import uvloop

from piuptime.http1.server import Request, Responder, Server, ServerLimits

JSON = b"application/json"


class Device:
    def __init__(self, name: str) -> None:
        self.name = name
        self.started = time.time()
        self.requests = 0

    def reading(self, path: str) -> dict[str, object]:
        # A slowly drifting simulated sensor so successive answers visibly differ by device.
        t = time.time()
        phase = sum(self.name.encode()) % 17
        return {
            "device": self.name,
            "pid": os.getpid(),
            "path": path,
            "temperature_c": round(21.0 + 3 * math.sin(t / 60 + phase), 2),
            "uptime_s": round(t - self.started, 1),
            "requests": self.requests,
        }

    async def handle(self, req: Request, resp: Responder) -> None:
        self.requests += 1
        path = req.path.decode("latin-1")
        name = self.name.encode()
        if path == "/healthz":
            resp.send(200, b'{"status":"ok"}', [(b"x-device", name)])
        elif path == "/echo":
            parts = []
            while chunk := await req.read():
                parts.append(chunk)
            body = b"".join(parts)
            ctype = dict(req.headers).get(b"content-type", b"application/octet-stream")
            resp.send(200, body, [(b"x-device", name)], content_type=ctype)
        elif path == "/stream":
            resp.start(200, [(b"content-type", b"text/plain"), (b"x-device", name)])
            for i in range(5):
                resp.write(f"{self.name} line {i}\n".encode())
                await resp.drain()
            resp.end()
        elif path == "/slow":
            ms = float(parse_qs(req.query.decode("latin-1")).get("ms", ["500"])[0])
            await asyncio.sleep(ms / 1000)
            resp.send(200, orjson.dumps(self.reading(path)), [(b"x-device", name)])
        else:
            resp.send(200, orjson.dumps(self.reading(path)), [(b"x-device", name)])


async def serve(name: str, host: str, port: int) -> None:
    device = Device(name)
    server = Server(device.handle, ServerLimits())
    await server.listen(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"device {name} listening on http://{host}:{port}", flush=True)
    await stop.wait()
    server.close_listeners()
    await server.drain(2.0)
    server.abort_all()


def main() -> None:
    parser = argparse.ArgumentParser(description="A demo device service for piuptime demo.")
    parser.add_argument("--name", default="pi-1")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    args = parser.parse_args()
    uvloop.run(serve(args.name, args.host, args.port))


if __name__ == "__main__":
    main()
