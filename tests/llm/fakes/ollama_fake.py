"""A fake Ollama server: its native API, as Ollama documents it.

``POST /api/chat`` streams NDJSON unless the body says ``"stream": false``: one object a line
(``model``, ``created_at``, ``message: {role, content}``, ``done: false``), tool calls whole in
one line with ``arguments`` as an object, then the final ``done: true`` object with
``done_reason``, ``total_duration``, ``load_duration``, ``prompt_eval_count``,
``prompt_eval_duration``, ``eval_count``, ``eval_duration``. ``POST /api/embed``,
``GET /api/tags``, ``GET /api/version``. Errors are ``{"error": "..."}``; a mid-stream error is
such an object on its own line. A key is required (``Authorization: Bearer``) only when
``keys`` is set, as in front of a proxied Ollama.
"""

from __future__ import annotations

import datetime
from typing import Any

from .base import (
    Answer,
    Call,
    Error,
    FakeServer,
    Rendered,
    Seen,
    StreamError,
    dumps,
    fake_vector,
    split_pieces,
)

__all__ = ["FakeOllama"]

_DONE = {"stop": "stop", "length": "length", "tool_calls": "stop", "content_filter": "stop"}


def _now() -> str:
    t = datetime.datetime.now(datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


def _line(obj: Any) -> bytes:
    return dumps(obj) + b"\n"


def _raw(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return dumps(body)


class FakeOllama(FakeServer):
    name = "ollama"
    base_path = ""
    default_models = ("llama3.2:latest", "qwen2.5:0.5b", "nomic-embed-text:latest")

    def route(self, seen: Seen) -> Call | Rendered:
        if self.keys:
            auth = seen.headers.get("authorization", "")
            key = auth[7:] if auth.lower().startswith("bearer ") else ""
            if key not in self.keys:
                return self._err(401, "unauthorized")
        method, path = seen.method, seen.path
        if method in ("GET", "HEAD") and path == "/":
            return Rendered(content_type="text/plain; charset=utf-8", body=b"Ollama is running")
        if method == "GET" and path == "/api/version":
            return self._whole({"version": "0.12.6"})
        if method == "GET" and path == "/api/tags":
            return Call(seen, "tags")
        if method == "POST" and path in ("/api/chat", "/api/embed"):
            body = seen.json
            if not isinstance(body, dict):
                return self._err(400, "invalid character 'x' looking for beginning of value")
            if not body.get("model"):
                return self._err(400, "model is required")
            if path == "/api/chat":
                stream = body.get("stream", True) is not False
                return Call(seen, "chat", stream=stream, model=str(body["model"]))
            return Call(seen, "embed", model=str(body["model"]))
        return Rendered(status=404, content_type="text/plain", body=b"404 page not found")

    def _err(
        self, status: int, message: str, headers: list[tuple[str, str]] | None = None
    ) -> Rendered:
        return Rendered(
            status=status,
            headers=headers or [],
            content_type="application/json; charset=utf-8",
            body=dumps({"error": message}),
        )

    def _whole(self, obj: Any) -> Rendered:
        return Rendered(content_type="application/json; charset=utf-8", body=dumps(obj))

    # -- answers -------------------------------------------------------------------------------

    def render_answer(self, call: Call, answer: Answer) -> Rendered:
        if call.op == "tags":
            return self._whole({"models": [self._tag(m) for m in self.models]})
        body = call.seen.json
        if call.op == "embed":
            inputs = body.get("input", "")
            inputs = [inputs] if isinstance(inputs, str) else list(inputs)
            dims = body.get("dimensions") or answer.embedding_dims
            out: dict[str, Any] = {
                "model": answer.model or call.model,
                "embeddings": [fake_vector(str(i), dims) for i in inputs],
                "total_duration": 14143917,
                "load_duration": 1019500,
            }
            if answer.usage:
                out["prompt_eval_count"] = answer.prompt_tokens
            return self._whole(out)
        return self._chat(call, answer)

    @staticmethod
    def _tag(name: str) -> dict[str, Any]:
        return {
            "name": name,
            "model": name,
            "modified_at": "2025-01-01T00:00:00.000000000Z",
            "size": 2019393189,
            "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": "llama",
                "families": ["llama"],
                "parameter_size": "3.2B",
                "quantization_level": "Q4_K_M",
            },
        }

    def _chat(self, call: Call, answer: Answer) -> Rendered:
        body = call.seen.json
        fmt = body.get("format")
        text = self.answer_text(call, answer, json_mode=fmt == "json" or isinstance(fmt, dict))
        tool_calls = [
            {"function": {"name": tc["name"], "arguments": tc.get("arguments", {})}}
            | ({"id": tc["id"]} if tc.get("id") else {})
            for tc in answer.tool_calls or []
        ]
        finish = answer.finish or ("tool_calls" if tool_calls else "stop")
        model = answer.model or call.model
        stats: dict[str, Any] = {"total_duration": 4883583458, "load_duration": 1334875}
        if answer.usage:
            stats |= {
                "prompt_eval_count": answer.prompt_tokens,
                "prompt_eval_duration": 342546000,
                "eval_count": answer.completion_tokens,
                "eval_duration": 4535599000,
            }
        final: dict[str, Any] = {
            "model": model,
            "created_at": _now(),
            "message": {"role": "assistant", "content": ""},
            "done_reason": _DONE.get(finish, finish),
            "done": True,
            **stats,
        }
        if not call.stream:
            final["message"] = {"role": "assistant", "content": text}
            if tool_calls:
                final["message"]["tool_calls"] = tool_calls
            return self._whole(final)
        lines = [
            _line(
                {
                    "model": model,
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": piece},
                    "done": False,
                }
            )
            for piece in split_pieces(text, answer.pieces)
        ]
        if tool_calls:
            lines.append(
                _line(
                    {
                        "model": model,
                        "created_at": _now(),
                        "message": {"role": "assistant", "content": "", "tool_calls": tool_calls},
                        "done": False,
                    }
                )
            )
        return Rendered(content_type="application/x-ndjson", events=lines, end=[_line(final)])

    # -- errors --------------------------------------------------------------------------------

    _KINDS: dict[str, tuple[int, str]] = {
        "rate_limited": (429, "rate limit exceeded, please try again later"),
        "server": (500, "llama runner process has terminated: exit status 2"),
        "overloaded": (503, "server busy, please try again.  maximum pending requests exceeded"),
        "context_length": (400, "the input length exceeds the context length"),
        "content_policy": (400, "request blocked by content policy"),
        "unauthorized": (401, "unauthorized"),
        "not_found": (404, 'model "{model}" not found, try pulling it first'),
        "bad_request": (400, "invalid request"),
    }

    def render_error(self, call: Call, error: Error) -> Rendered:
        status, message = self._KINDS.get(error.resolved_kind(), self._KINDS["bad_request"])
        status = error.status or status
        message = error.message or message.replace("{model}", call.model)
        headers = []
        if error.retry_after is not None:
            headers.append(("retry-after", f"{error.retry_after:g}"))
        headers += list(error.headers.items())
        r = self._err(status, message, headers)
        if error.body is not None:
            r.body = _raw(error.body)
        return r

    def stream_error_event(self, call: Call, error: StreamError) -> bytes:
        message = error.message or (
            "an error was encountered while running the model: unexpected EOF"
        )
        return _line({"error": message})

    def garbled_event(self, call: Call) -> bytes:
        return b'{"model": "x", "message": {"role": "assistant", "content": "\n'
