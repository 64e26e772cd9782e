"""The scripted behaviours and the HTTP/1.1 server core shared by the four fake providers.

Each fake is a real TCP server on 127.0.0.1 (asyncio streams + httptools' request parser), so the
gateway meets real sockets: keep-alive, chunked streams, Content-Length bodies, and every way a
provider can misbehave on the wire (a cut, a stall, silence, a TCP reset, a garbled event). The
response bytes are written by hand, so nothing between the fake and the socket tidies them up.

A fake subclass only renders: it routes a request to a ``Call`` (or a static reply for auth,
validation and unknown paths, which never consume a scripted behaviour), and turns behaviours
into its own protocol's bytes (``Rendered``). This module plays them on the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import math
import socket
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Self
from urllib.parse import parse_qsl

import httptools
import orjson

__all__ = [
    "Answer",
    "Behaviour",
    "Call",
    "Cut",
    "Error",
    "FakeServer",
    "Malformed",
    "NoEnd",
    "Rendered",
    "Reset",
    "Seen",
    "Silent",
    "Stall",
    "StreamError",
    "content_policy",
    "context_length",
    "overloaded",
    "rate_limited",
    "server_error",
    "unauthorized",
]


# ---------------------------------------------------------------------------------------------
# behaviours


@dataclass
class Answer:
    """A good answer, rendered in the fake's protocol.

    ``text``: the generated text; ``"{model}"`` in it is replaced by the model name (plain
    replace, so JSON text is safe). ``None`` → ``"Hello from {model}."``, or no text at all when
    ``tool_calls`` is given, or ``{"message": "Hello from {model}."}`` when the request asked for
    a JSON ``response_format`` (OpenAI) / ``responseMimeType`` (Gemini) / ``format`` (Ollama).
    ``tool_calls``: ``[{"name": str, "arguments": dict, "id"?: str}]``.
    ``finish``: canonical ``stop`` | ``length`` | ``tool_calls`` | ``content_filter``, mapped to
    the provider's own word (Anthropic end_turn/max_tokens/tool_use/refusal, Gemini
    STOP/MAX_TOKENS/STOP/SAFETY, Ollama stop/length/stop/stop); any other value is sent as is.
    ``None`` → ``tool_calls`` when there are tool calls, else ``stop``.
    ``usage=False`` leaves out every token count the protocol would carry.
    ``model``: the model name the provider reports (``None`` → the one requested).
    Timing: ``head_delay`` before the response head; ``first_token_delay`` after the head,
    before the first stream event (a whole body waits both); ``chunk_gap`` between stream events.
    ``pieces``: the text (and each tool call's JSON arguments) is streamed in this many pieces.
    """

    text: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    finish: str | None = None
    usage: bool = True
    prompt_tokens: int = 10
    completion_tokens: int = 5
    model: str | None = None
    head_delay: float = 0.0
    first_token_delay: float = 0.0
    chunk_gap: float = 0.0
    pieces: int = 3
    embedding_dims: int = 8


@dataclass
class Error:
    """An error answer. ``status`` None → the provider's status for ``kind`` (400 when neither).
    ``kind``: rate_limited | server | context_length | content_policy | overloaded |
    unauthorized | bad_request | not_found (None → from ``status``). ``body`` None → the
    provider's canonical error body for the kind (``message``/``code`` override its message and
    its code — OpenAI ``code``, Anthropic ``error.type``, Gemini ``status``); a dict/list is sent
    as JSON, str/bytes as is. ``retry_after`` (seconds) → ``retry-after`` (and the provider's own
    reset headers; Gemini: a RetryInfo ``retryDelay`` in the body). ``headers`` are added last
    (they override). The fake's error for a streamed request is the same whole JSON body."""

    status: int | None = None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    message: str | None = None
    code: str | None = None
    kind: str | None = None
    retry_after: float | None = None
    head_delay: float = 0.0

    def resolved_kind(self) -> str:
        if self.kind is not None:
            return self.kind
        status = self.status or 400
        return {
            401: "unauthorized",
            403: "unauthorized",
            404: "not_found",
            429: "rate_limited",
            503: "overloaded",
            529: "overloaded",
        }.get(status, "server" if status >= 500 else "bad_request")


def rate_limited(retry_after: float | None = None, **kw: Any) -> Error:
    """429 in the provider's words, with ``retry-after`` when given (None: no Retry-After)."""
    return Error(status=429, kind="rate_limited", retry_after=retry_after, **kw)


def server_error(status: int = 500, **kw: Any) -> Error:
    return Error(status=status, kind="server", **kw)


def context_length(**kw: Any) -> Error:
    """The provider's real answer to a prompt too long for the model (400 everywhere)."""
    return Error(kind="context_length", **kw)


def content_policy(**kw: Any) -> Error:
    """The provider's content refusal (Gemini: a 200 with ``promptFeedback.blockReason``)."""
    return Error(kind="content_policy", **kw)


def overloaded(**kw: Any) -> Error:
    """Anthropic 529 overloaded_error; the others 503."""
    return Error(kind="overloaded", **kw)


def unauthorized(**kw: Any) -> Error:
    """A bad key: 401 (Gemini: 400 INVALID_ARGUMENT / API_KEY_INVALID, as Google answers)."""
    return Error(kind="unauthorized", **kw)


@dataclass
class Cut:
    """Stream ``after`` events, then close the connection (no chunked terminator). A whole body:
    the head (with the full Content-Length) and half the body, then close."""

    after: int = 1
    answer: Answer = field(default_factory=Answer)


@dataclass
class Stall:
    """Stream ``after`` events, then go silent with the socket open until the client leaves or
    the fake stops. A whole body: the head, then silence."""

    after: int = 1
    answer: Answer = field(default_factory=Answer)


@dataclass
class Silent:
    """Read the request and never answer (no head); the socket stays open."""


@dataclass
class Reset:
    """A TCP RST (SO_LINGER 0) right after reading the request."""


@dataclass
class NoEnd:
    """A stream complete at the HTTP level (chunked terminator) without the protocol's end
    marker: no ``[DONE]`` (OpenAI), no ``message_stop`` (Anthropic), no ``done: true`` line
    (Ollama), no last chunk with finishReason/usageMetadata (Gemini). A whole body: normal."""

    answer: Answer = field(default_factory=Answer)


@dataclass
class Malformed:
    """A normal stream with one garbled event (invalid JSON, proper framing) inserted before
    event ``at`` (0-based). A whole body: 200 with a truncated JSON document."""

    at: int = 1
    answer: Answer = field(default_factory=Answer)


@dataclass
class StreamError:
    """Stream ``after`` events, then the provider's in-stream error (OpenAI ``data:
    {"error": ...}``, Anthropic ``event: error``, Gemini ``data: {"error": ...}``, Ollama
    ``{"error": "..."}``), then the body ends (chunked terminator, no end marker). ``kind``,
    ``message``, ``code`` as in ``Error`` (default: overloaded for Anthropic, server elsewhere).
    A whole body: the same as ``Error(kind=kind)``."""

    after: int = 1
    kind: str | None = None
    message: str | None = None
    code: str | None = None
    answer: Answer = field(default_factory=Answer)

    def as_error(self) -> Error:
        return Error(kind=self.kind or "server", message=self.message, code=self.code)


Behaviour = Answer | Error | Cut | Stall | Silent | Reset | NoEnd | Malformed | StreamError


# ---------------------------------------------------------------------------------------------
# what the fake saw


@dataclass
class Seen:
    """One request as received. ``headers``: lower-case names (repeats joined with ``, ``);
    ``json``: the parsed body, None when empty or not JSON; ``at``: time.monotonic() when the
    request was complete; ``behaviour``: what answered it (None for a static reply)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    json: Any
    at: float
    behaviour: Any = None

    @property
    def model(self) -> str | None:
        if isinstance(self.json, dict) and isinstance(self.json.get("model"), str):
            return str(self.json["model"])
        if "/models/" in self.path:  # Gemini: /v1beta/models/{model}:method
            return self.path.split("/models/", 1)[1].split(":", 1)[0]
        return None


@dataclass
class Call:
    """A routed request the script answers. ``op``: chat | embed | models | ..."""

    seen: Seen
    op: str
    stream: bool = False
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rendered:
    """A response in the fake's protocol: a whole ``body``, or stream ``events`` (each already
    framed: one HTTP chunk each) followed by the ``end`` marker events."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "application/json"
    body: bytes | None = None
    events: list[bytes] | None = None
    end: list[bytes] = field(default_factory=list)


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def split_pieces(text: str, n: int) -> list[str]:
    """``text`` in at most ``n`` non-empty pieces of near-equal length (``[]`` for "")."""
    if not text:
        return []
    n = max(1, min(n, len(text)))
    size = math.ceil(len(text) / n)
    return [text[i : i + size] for i in range(0, len(text), size)]


def fake_vector(text: str, dims: int) -> list[float]:
    """A deterministic unit-ish vector for ``text``."""
    digest = hashlib.sha256(text.encode()).digest()
    while len(digest) < dims:
        digest += hashlib.sha256(digest).digest()
    return [round((b - 127.5) / 127.5, 6) for b in digest[:dims]]


_REASONS = {529: "Site Overloaded"}


def reason(status: int) -> str:
    if status in _REASONS:
        return _REASONS[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def head_bytes(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason(status)}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# ---------------------------------------------------------------------------------------------
# the server


class _Gone(Exception):
    """The client went away while we were writing."""


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.queue: asyncio.Queue[Seen | None] = asyncio.Queue()
        self.gone = asyncio.Event()
        self.keep_alive = True
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._parser = httptools.HttpRequestParser(self)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1")
        self._headers[key] = f"{self._headers[key]}, {val}" if key in self._headers else val

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        url = httptools.parse_url(self._url)
        path = url.path.decode("latin-1") if url.path else "/"
        query = dict(parse_qsl(url.query.decode("latin-1"))) if url.query else {}
        body = b"".join(self._body)
        try:
            parsed = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            parsed = None
        self.keep_alive = self._parser.should_keep_alive()
        self.queue.put_nowait(
            Seen(
                method=self._parser.get_method().decode(),
                path=path,
                query=query,
                headers=self._headers,
                body=body,
                json=parsed,
                at=time.monotonic(),
            )
        )

    async def read_loop(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                self._parser.feed_data(data)
        except (ConnectionError, httptools.HttpParserError, OSError):
            pass
        finally:
            self.gone.set()
            self.queue.put_nowait(None)

    async def send(self, data: bytes) -> None:
        if self.writer.is_closing() or self.gone.is_set():
            raise _Gone
        self.writer.write(data)
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as e:
            raise _Gone from e


class FakeServer:
    """The shared core: ``await start()`` / ``await stop()``, ``port``, ``base_url``, ``keys``,
    ``models``, ``requests`` (every ``Seen``), ``script(*behaviours)`` (FIFO; when empty,
    ``default``, which is ``Answer()``), ``script_ops`` (None, or the ops whose requests take
    scripted behaviours: chat, embed, models...), ``connections`` (open now) and ``opened``
    (accepted in all). Auth failures, request-validation errors and unknown paths are answered
    before the script and never consume a behaviour."""

    name = "fake"
    base_path = ""
    default_models: tuple[str, ...] = ()

    def __init__(self, keys: list[str] | None = None, models: list[str] | None = None) -> None:
        self.keys: list[str] = list(keys or [])
        self.models: list[str] = list(models or self.default_models)
        self.requests: list[Seen] = []
        self.default: Behaviour = Answer()
        #: the ops that take scripted behaviours (None: all); the others get ``default``
        self.script_ops: set[str] | None = None
        self.opened = 0
        self.port = 0
        self._queue: deque[Behaviour] = deque()
        self._conns: dict[_Conn, asyncio.Task[Any]] = {}
        self._server: asyncio.AbstractServer | None = None
        self._ids = 0

    # -- public API ------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.base_path}"

    @property
    def connections(self) -> int:
        return len(self._conns)

    @property
    def pending(self) -> int:
        """Scripted behaviours not used yet."""
        return len(self._queue)

    def script(self, *behaviours: Behaviour) -> None:
        self._queue.extend(behaviours)

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._conns.values())
        for conn, task in list(self._conns.items()):
            conn.writer.transport.abort()
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- for subclasses ----------------------------------------------------------------------

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def route(self, seen: Seen) -> Call | Rendered:
        raise NotImplementedError

    def render_answer(self, call: Call, answer: Answer) -> Rendered:
        raise NotImplementedError

    def render_error(self, call: Call, error: Error) -> Rendered:
        raise NotImplementedError

    def stream_error_event(self, call: Call, error: StreamError) -> bytes:
        raise NotImplementedError

    def garbled_event(self, call: Call) -> bytes:
        raise NotImplementedError

    def answer_text(self, call: Call, answer: Answer, json_mode: bool = False) -> str:
        model = answer.model or call.model
        if answer.text is not None:
            return answer.text.replace("{model}", model)
        if answer.tool_calls:
            return ""
        if json_mode:
            return '{"message": "Hello from ' + model + '."}'
        return f"Hello from {model}."

    # -- playing a behaviour on the socket -----------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(reader, writer)
        task = asyncio.current_task()
        assert task is not None
        self._conns[conn] = task
        self.opened += 1
        reading = asyncio.create_task(conn.read_loop())
        try:
            while True:
                seen = await conn.queue.get()
                if seen is None:
                    break
                self.requests.append(seen)
                if not await self._serve(conn, seen) or not conn.keep_alive:
                    break
        except (_Gone, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # only stop() cancels: end quietly (asyncio's stream callback would log a cancelled
            # client_connected_cb task as an error)
            pass
        finally:
            reading.cancel()
            with contextlib.suppress(BaseException):
                await reading
            if not writer.is_closing():
                writer.close()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            self._conns.pop(conn, None)

    async def _serve(self, conn: _Conn, seen: Seen) -> bool:
        """Answer one request; False when the connection must end."""
        routed = self.route(seen)
        if isinstance(routed, Rendered):
            await self._send_whole(conn, routed)
            return True
        call = routed
        if self.script_ops is not None and call.op not in self.script_ops:
            behaviour: Behaviour = self.default
        else:
            behaviour = self._queue.popleft() if self._queue else self.default
        seen.behaviour = behaviour
        if isinstance(behaviour, Answer):
            return await self._play(conn, call, self.render_answer(call, behaviour), behaviour)
        if isinstance(behaviour, Error):
            await _sleep(behaviour.head_delay)
            rendered = self.render_error(call, behaviour)
            return await self._play(conn, call, rendered, Answer())
        if isinstance(behaviour, Silent):
            await conn.gone.wait()
            return False
        if isinstance(behaviour, Reset):
            sock = conn.writer.get_extra_info("socket")
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.writer.transport.abort()
            return False
        if isinstance(behaviour, NoEnd):
            rendered = self.render_answer(call, behaviour.answer)
            rendered.end = []
            return await self._play(conn, call, rendered, behaviour.answer)
        if isinstance(behaviour, Malformed):
            rendered = self.render_answer(call, behaviour.answer)
            if rendered.events is not None:
                at = max(0, min(behaviour.at, len(rendered.events)))
                rendered.events.insert(at, self.garbled_event(call))
            elif rendered.body is not None:
                rendered.body = rendered.body[: max(1, len(rendered.body) // 2)]
            return await self._play(conn, call, rendered, behaviour.answer)
        if isinstance(behaviour, StreamError):
            rendered = self.render_answer(call, behaviour.answer)
            if rendered.events is None:
                return await self._play(conn, call, self.render_error(call, behaviour.as_error()))
            rendered.events = [
                *rendered.events[: behaviour.after],
                self.stream_error_event(call, behaviour),
            ]
            rendered.end = []
            return await self._play(conn, call, rendered, behaviour.answer)
        if isinstance(behaviour, Cut | Stall):
            answer = behaviour.answer
            rendered = self.render_answer(call, answer)
            await _sleep(answer.head_delay)
            if rendered.events is None:
                body = rendered.body or b""
                await conn.send(self._head(rendered, len(body)))
                if isinstance(behaviour, Cut):
                    await _sleep(answer.first_token_delay)
                    await conn.send(body[: len(body) // 2])
                    return False
                await conn.gone.wait()
                return False
            await conn.send(self._head(rendered, None))
            events = [*rendered.events, *rendered.end][: behaviour.after]
            await self._stream_events(conn, events, answer)
            if isinstance(behaviour, Stall):
                await conn.gone.wait()
            return False
        raise TypeError(f"not a behaviour: {behaviour!r}")

    def _head(self, rendered: Rendered, length: int | None) -> bytes:
        headers = [
            ("date", email.utils.formatdate(usegmt=True)),
            ("content-type", rendered.content_type),
        ]
        if length is None:
            headers += [("transfer-encoding", "chunked"), ("cache-control", "no-cache")]
        else:
            headers.append(("content-length", str(length)))
        return head_bytes(rendered.status, headers + rendered.headers)

    async def _send_whole(self, conn: _Conn, rendered: Rendered) -> None:
        body = rendered.body or b""
        await conn.send(self._head(rendered, len(body)) + body)

    async def _stream_events(self, conn: _Conn, events: list[bytes], answer: Answer) -> None:
        for i, event in enumerate(events):
            await _sleep(answer.first_token_delay if i == 0 else answer.chunk_gap)
            await conn.send(chunk(event))

    async def _play(
        self, conn: _Conn, call: Call, rendered: Rendered, answer: Answer | None = None
    ) -> bool:
        answer = answer or Answer()
        if rendered.events is None:
            await _sleep(answer.head_delay + answer.first_token_delay)
            await self._send_whole(conn, rendered)
            return True
        await _sleep(answer.head_delay)
        await conn.send(self._head(rendered, None))
        await self._stream_events(conn, [*rendered.events, *rendered.end], answer)
        await conn.send(b"0\r\n\r\n")
        return True


async def _sleep(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)
