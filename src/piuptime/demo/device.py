"""A small stand-in for a device service (a Pi running a sensor API), served by our own http1.

Endpoints: ``/`` and ``/sensors/...`` (a JSON reading from this device), ``/healthz``,
``POST /echo`` (echoes the body), ``/stream`` (a chunked response in several writes),
``/slow?ms=N`` (answers after N ms), and ``POST /v1/chat/completions`` in OpenAI's protocol
(whole or streamed): no model runs here, the device answers "<name> heard: <your last message>"
with its token counts, so the demo's AI gateway has something local to route to and fail over
between.

For failure drills and tests:

- ``--record FILE`` appends one JSON line per request it receives (``device``, ``pid``,
  ``method``, ``path``, ``body``), written before the answer, so a test can count the attempts a
  device saw and check which request bodies reached it, even after the device was killed.
- ``--status N`` answers every request but ``/healthz`` with status N (a device whose service is
  failing while the device itself is up); ``--retry-after S`` adds ``Retry-After: S`` to those.
- ``--allow-crash`` turns on ``POST /crash``: the device reads the body, records it, then exits at
  once (exit code 1) without answering, like a process that dies mid-request.

Run: ``python -m piuptime.demo.device --name pi-1 --port 9001``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import time
from typing import Any
from urllib.parse import parse_qs

import orjson
import uvloop

from piuptime.http1.server import Request, Responder, Server, ServerLimits

JSON = b"application/json"


class Device:
    def __init__(
        self,
        name: str,
        *,
        record: str | None = None,
        status: int | None = None,
        retry_after: str | None = None,
        allow_crash: bool = False,
    ) -> None:
        self.name = name
        self.started = time.time()
        self.requests = 0
        self.status = status
        self.retry_after = retry_after.encode() if retry_after else None
        self.allow_crash = allow_crash
        # O_APPEND and one write per line: whole lines even when a restarted device (same file)
        # or a reader races with it, and nothing is lost to a buffer when the process is killed.
        self._record_fd = (
            os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if record is not None
            else None
        )
        self._pid = os.getpid()

    def _record(self, req: Request, path: str, body: bytes) -> None:
        assert self._record_fd is not None
        line = orjson.dumps(
            {
                "device": self.name,
                "pid": self._pid,
                "method": req.method.decode("latin-1"),
                "path": path,
                "body": body.decode("latin-1"),
            }
        )
        os.write(self._record_fd, line + b"\n")

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
        body = b""
        if req.has_body:
            parts = []
            while chunk := await req.read():
                parts.append(chunk)
            body = b"".join(parts)
        if self._record_fd is not None:
            self._record(req, path, body)
        if path == "/healthz":
            resp.send(200, b'{"status":"ok"}', [(b"x-device", name)])
        elif self.status is not None:
            headers = [(b"x-device", name)]
            if self.retry_after is not None:
                headers.append((b"retry-after", self.retry_after))
            resp.send(
                self.status, orjson.dumps({"device": self.name, "status": self.status}), headers
            )
        elif path == "/v1/chat/completions" and req.method == b"POST":
            await self.chat(body, resp)
        elif path == "/crash" and self.allow_crash and req.method == b"POST":
            os._exit(1)  # dies holding the request: no answer, the connection is reset
        elif path == "/echo":
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

    async def chat(self, body: bytes, resp: Responder) -> None:
        """OpenAI Chat Completions, whole or as server-sent events (with the usage chunk when
        ``stream_options.include_usage`` asks for it)."""
        try:
            request = orjson.loads(body)
            messages = request["messages"]
            last = str(messages[-1].get("content", "")) if messages else ""
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, IndexError):
            error = {
                "message": "expected a chat completion request",
                "type": "invalid_request_error",
            }
            resp.send(400, orjson.dumps({"error": {**error, "param": None, "code": None}}))
            return
        model = str(request.get("model") or "demo")
        words = f"{self.name} heard: {last}".split(" ")
        prompt = sum(len(str(m.get("content", "")).split()) + 3 for m in messages) + 3
        usage = {"prompt_tokens": prompt, "completion_tokens": len(words)}
        usage["total_tokens"] = prompt + len(words)
        base = {"id": f"chatcmpl-{self.name}-{self.requests}", "created": int(time.time())}
        base["model"] = model
        if request.get("stream") is not True:
            message = {"role": "assistant", "content": " ".join(words)}
            choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
            answer = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            resp.send(200, orjson.dumps(answer), [(b"x-device", self.name.encode())])
            return
        resp.start(
            200, [(b"content-type", b"text/event-stream"), (b"x-device", self.name.encode())]
        )

        def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            chunk = {**base, "object": "chat.completion.chunk", "choices": [choice]}
            return b"data: " + orjson.dumps(chunk) + b"\n\n"

        resp.write(event({"role": "assistant", "content": ""}))
        for i, word in enumerate(words):
            resp.write(event({"content": word if i == 0 else " " + word}))
            await resp.drain()
            await asyncio.sleep(0.02)  # a token at a time, like a small model on a Pi
        resp.write(event({}, "stop"))
        options = request.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            chunk = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        resp.end(b"data: [DONE]\n\n")


async def serve(name: str, host: str, port: int, **options: Any) -> None:
    device = Device(name, **options)
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
    parser.add_argument(
        "--record",
        metavar="FILE",
        help="append one JSON line per request received (method, path, body) to FILE",
    )
    parser.add_argument(
        "--status",
        type=int,
        metavar="N",
        help="answer every request but /healthz with status N (a failing service)",
    )
    parser.add_argument(
        "--retry-after",
        metavar="SECONDS",
        help="with --status: add Retry-After: SECONDS to those answers",
    )
    parser.add_argument(
        "--allow-crash",
        action="store_true",
        help="POST /crash reads and records its body, then the process exits without answering",
    )
    args = parser.parse_args()
    uvloop.run(
        serve(
            args.name,
            args.host,
            args.port,
            record=args.record,
            status=args.status,
            retry_after=args.retry_after,
            allow_crash=args.allow_crash,
        )
    )


if __name__ == "__main__":
    main()
