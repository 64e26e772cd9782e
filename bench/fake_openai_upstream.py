"""A fast, minimal OpenAI-compatible upstream for benchmarks: it answers at once.

    python bench/fake_openai_upstream.py PORT

``POST .../chat/completions`` answers a fixed tiny completion, as one JSON body or, with
``"stream": true``, as Server-Sent Events in one chunked write (a role chunk, two content
chunks, the finish chunk, a usage chunk when ``stream_options.include_usage`` is set, then
``data: [DONE]``). ``GET .../models`` lists ``gpt-4o-mini``. Keep-alive, HTTP/1.1, uvloop +
httptools, one asyncio Protocol per connection and no tasks: the upstream must never be what a
gateway benchmark measures. Not a product (no error handling beyond 404/400).
"""

from __future__ import annotations

import asyncio
import sys
import time

import httptools
import orjson
import uvloop

MODEL = "gpt-4o-mini"
CONTENT = ("Hello", " there!")


def _completion() -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(CONTENT), "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
        }
    )


def _chunk(delta: dict[str, object], finish: str | None, created: int) -> dict[str, object]:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": created,
        "model": MODEL,
        "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def _stream(include_usage: bool) -> bytes:
    created = int(time.time())
    events: list[object] = [
        _chunk({"role": "assistant", "content": "", "refusal": None}, None, created),
        *(_chunk({"content": c}, None, created) for c in CONTENT),
        _chunk({}, "stop", created),
    ]
    if include_usage:
        usage = _chunk({}, None, created)
        usage["choices"] = []
        usage["usage"] = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
        events.append(usage)
    body = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    # the whole stream as one HTTP chunk, then the last chunk
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


COMPLETION = _completion()
RESP_JSON = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(COMPLETION),
    COMPLETION,
)
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
RESP_STREAM = STREAM_HEAD + _stream(False)
RESP_STREAM_USAGE = STREAM_HEAD + _stream(True)
MODELS = orjson.dumps(
    {
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "bench"}],
    }
)
RESP_MODELS = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
    % (len(MODELS), MODELS)
)
RESP_404 = (
    b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
)
RESP_400 = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
)


class Conn(asyncio.Protocol):
    __slots__ = ("body", "parser", "transport", "url")

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        url, body = self.url, b"".join(self.body)
        self.url, self.body = b"", []
        path = url.split(b"?", 1)[0]
        method = self.parser.get_method()
        if method == b"POST" and path.endswith(b"/chat/completions"):
            try:
                req = orjson.loads(body)
            except orjson.JSONDecodeError:
                resp = RESP_400
            else:
                if req.get("stream"):
                    opts = req.get("stream_options") or {}
                    resp = RESP_STREAM_USAGE if opts.get("include_usage") else RESP_STREAM
                else:
                    resp = RESP_JSON
        elif method == b"GET" and path.endswith(b"/models"):
            resp = RESP_MODELS
        else:
            resp = RESP_404
        assert self.transport is not None
        self.transport.write(resp)
        if not self.parser.should_keep_alive():
            self.transport.close()


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Conn, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    port = int(sys.argv[1])
    uvloop.run(serve(port))


if __name__ == "__main__":
    main()
