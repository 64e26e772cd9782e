"""Ollama's native API: ``POST /api/chat`` (NDJSON stream) and ``POST /api/embed``.

The native endpoint rather than Ollama's OpenAI-compatible one: it takes ``options`` (context
size, sampling) and ``keep_alive`` per request, reports token counts on every answer, streams
tool calls, and answers errors as ``{"error": "..."}``.

Canonical → Ollama: system/developer messages become ``system``; image parts (base64 ``data:``
URLs only: adapters do no I/O) go to the message's ``images`` list; assistant tool calls carry
their arguments as objects; tool messages name their tool (``tool_name``) from the call they
answer; ``response_format`` becomes ``format`` (``"json"`` or the JSON schema); sampling
parameters and ``max_tokens`` go to ``options`` (``num_predict``). ``deployment.params`` are
defaults: their ``options`` merge under the request's own, other keys (``keep_alive``,
``think``, canonical parameters) apply unless the client set them.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from piuptime.config.llm import LlmProvider

from ..sse import NDJSONReader
from .base import (
    CONTEXT_LENGTH,
    NOT_FOUND,
    OVERLOADED,
    PROTOCOL,
    RATE_LIMITED,
    SERVER,
    Deployment,
    Headers,
    ProviderError,
    WireRequest,
)
from .openai import (
    bad_request,
    base_path,
    body_excerpt,
    content_text,
    extra_headers,
    json_or_none,
    kind_by_status,
    new_id,
    retry_after,
    split_data_url,
    usage_of,
    with_key,
)

__all__ = ["OllamaAdapter", "OllamaStreamDecoder"]

_JSON = b"application/json"

# canonical request key → Ollama option
_OPTIONS = (
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("top_k", "top_k"),
    ("seed", "seed"),
    ("presence_penalty", "presence_penalty"),
    ("frequency_penalty", "frequency_penalty"),
    ("max_tokens", "num_predict"),
    ("max_completion_tokens", "num_predict"),  # after max_tokens: the newer name wins
)
# top-level Ollama request keys a deployment (or a client that knows Ollama) may set
_PASSTHROUGH = ("keep_alive", "think")
_DONE_REASONS = {"stop": "stop", "length": "length"}


class OllamaAdapter:
    kind = "ollama"
    supports_embeddings = True

    def __init__(self, cfg: LlmProvider) -> None:
        self.cfg = cfg
        base = base_path(cfg.url)
        self._chat_path = (base + "/api/chat").encode()
        self._embed_path = (base + "/api/embed").encode()
        extra = extra_headers(cfg)
        self._json_headers: Headers = [(b"content-type", _JSON), (b"accept", _JSON), *extra]
        self._ndjson_headers: Headers = [
            (b"content-type", _JSON),
            (b"accept", b"application/x-ndjson"),
            *extra,
        ]

    # chat

    def chat_request(
        self, body: dict[str, Any], deployment: Deployment, stream: bool, key: str | None
    ) -> WireRequest:
        params = deployment.params
        merged = {**params, **body} if params else body
        out: dict[str, Any] = {
            "model": deployment.model,
            "messages": _messages(merged.get("messages")),
            "stream": stream,
        }
        tools = merged.get("tools")
        choice = merged.get("tool_choice")
        if isinstance(tools, list) and tools and choice != "none":
            if isinstance(choice, dict):
                # Ollama cannot force a tool: offer only the one the client named
                name = (choice.get("function") or {}).get("name")
                tools = [t for t in tools if (t.get("function") or {}).get("name") == name] or tools
            out["tools"] = [_tool(t) for t in tools]
        fmt = _format(merged.get("response_format"))
        if fmt is not None:
            out["format"] = fmt
        elif "format" in merged:
            out["format"] = merged["format"]
        options: dict[str, Any] = {}
        for source in (params.get("options"), body.get("options")):
            if isinstance(source, dict):
                options.update(source)
        for canonical, native in _OPTIONS:
            value = merged.get(canonical)
            if value is not None:
                options[native] = value
        stop = merged.get("stop")
        if stop is not None:
            options["stop"] = [stop] if isinstance(stop, str) else stop
        if options:
            out["options"] = options
        for name in _PASSTHROUGH:
            if name in merged:
                out[name] = merged[name]
        headers = with_key(self._ndjson_headers if stream else self._json_headers, key)
        return WireRequest(b"POST", self._chat_path, headers, orjson.dumps(out))

    def chat_response(self, data: bytes, deployment: Deployment) -> dict[str, Any]:
        obj = json_or_none(data)
        if not isinstance(obj, dict):
            raise ProviderError(PROTOCOL, "Ollama's answer is not a JSON object", status=200)
        if "error" in obj:
            raise _error(obj.get("error"), 200)
        msg = obj.get("message")
        if not isinstance(msg, dict):
            raise ProviderError(PROTOCOL, "Ollama's answer has no message", status=200)
        content = msg.get("content")
        content = content if isinstance(content, str) else ""
        calls = _tool_calls(msg.get("tool_calls"), None)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content if content or not calls else None,
            "refusal": None,
        }
        if calls:
            message["tool_calls"] = calls
        finish = "tool_calls" if calls else _DONE_REASONS.get(obj.get("done_reason") or "", "stop")
        out: dict[str, Any] = {
            "id": new_id("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": obj.get("model") or deployment.model,
            "choices": [
                {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            ],
        }
        usage = _usage(obj)
        if usage is not None:
            out["usage"] = usage
        return out

    def stream_decoder(self, deployment: Deployment) -> OllamaStreamDecoder:
        return OllamaStreamDecoder(deployment.model)

    # embeddings

    def embeddings_request(
        self, body: dict[str, Any], deployment: Deployment, key: str | None
    ) -> WireRequest:
        params = deployment.params
        merged = {**params, **body} if params else body
        text = merged.get("input")
        if isinstance(text, list) and text and not isinstance(text[0], str):
            raise bad_request("Ollama embeds text only, not token arrays")
        if not isinstance(text, (str, list)):
            raise bad_request("'input' must be a string or a list of strings")
        out: dict[str, Any] = {"model": deployment.model, "input": text}
        for name in ("dimensions", "truncate", "keep_alive", "options"):
            if name in merged:
                out[name] = merged[name]
        headers = with_key(self._json_headers, key)
        return WireRequest(b"POST", self._embed_path, headers, orjson.dumps(out))

    def embeddings_response(self, data: bytes, deployment: Deployment) -> dict[str, Any]:
        obj = json_or_none(data)
        if not isinstance(obj, dict):
            raise ProviderError(PROTOCOL, "Ollama's answer is not a JSON object", status=200)
        if "error" in obj:
            raise _error(obj.get("error"), 200)
        vectors = obj.get("embeddings")
        if not isinstance(vectors, list):
            raise ProviderError(PROTOCOL, "Ollama's answer has no embeddings", status=200)
        tokens = obj.get("prompt_eval_count")
        tokens = tokens if isinstance(tokens, int) else 0
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": vector}
                for i, vector in enumerate(vectors)
            ],
            "model": obj.get("model") or deployment.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    # errors

    def classify(self, status: int, headers: Headers, body: bytes) -> ProviderError:
        obj = json_or_none(body)
        if isinstance(obj, dict) and "error" in obj:
            err = _error(obj["error"], status)
        else:
            err = ProviderError(kind_by_status(status), body_excerpt(body, status), status=status)
        if err.kind in (RATE_LIMITED, OVERLOADED):
            err.retry_after = retry_after(headers)
        return err


def _error(value: Any, status: int) -> ProviderError:
    """Ollama's ``{"error": "text"}`` (a proxy in front may send an object instead)."""
    if isinstance(value, dict):
        message = value.get("message")
        message = message if isinstance(message, str) else orjson.dumps(value).decode()
    else:
        message = str(value) if value else f"Ollama error ({status})"
    low = message.lower()
    if (
        "context length" in low
        or "context window" in low
        or ("exceed" in low and ("context" in low or "token" in low))
    ):
        kind = CONTEXT_LENGTH
    elif status == 404 or (status in (0, 200) and "not found" in low):
        kind = NOT_FOUND
    elif status == 503 and "busy" in low:
        kind = OVERLOADED  # OLLAMA_MAX_QUEUE is full: another deployment, this one later
    elif status in (0, 200):
        kind = SERVER
    else:
        kind = kind_by_status(status)
    code = "context_length_exceeded" if kind == CONTEXT_LENGTH else None
    return ProviderError(kind, message, status=status, code=code)


def _usage(obj: dict[str, Any]) -> dict[str, int] | None:
    prompt = obj.get("prompt_eval_count")
    completion = obj.get("eval_count")
    if prompt is None and completion is None:
        return None
    # a prompt served wholly from Ollama's cache may come without prompt_eval_count
    return usage_of(prompt, completion)


def _tool(tool: Any) -> Any:
    """OpenAI's tool shape is Ollama's own; only ``strict`` is not Ollama's."""
    if isinstance(tool, dict):
        fn = tool.get("function")
        if isinstance(fn, dict) and "strict" in fn:
            fn = {k: v for k, v in fn.items() if k != "strict"}
            return {"type": "function", "function": fn}
    return tool


def _format(response_format: Any) -> Any:
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return schema if isinstance(schema, dict) else "json"
    return None


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise bad_request("'messages' must be a list")
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id → function name, for tool messages
    for msg in messages:
        if not isinstance(msg, dict):
            raise bad_request("each message must be an object")
        role = msg.get("role")
        content = msg.get("content")
        if role in ("system", "developer"):
            out.append({"role": "system", "content": content_text(content)})
        elif role == "user":
            item: dict[str, Any] = {"role": "user"}
            if isinstance(content, list):
                texts: list[str] = []
                images: list[str] = []
                for part in content:
                    _user_part(part, texts, images)
                item["content"] = "\n".join(texts)
                if images:
                    item["images"] = images
            else:
                item["content"] = content if isinstance(content, str) else ""
            out.append(item)
        elif role == "assistant":
            item = {"role": "assistant", "content": content_text(content)}
            calls = msg.get("tool_calls")
            if isinstance(calls, list) and calls:
                native = []
                for call in calls:
                    fn = call.get("function") or {}
                    name = fn.get("name") or ""
                    if isinstance(call.get("id"), str):
                        names[call["id"]] = name
                    native.append({"function": {"name": name, "arguments": _arguments(fn)}})
                item["tool_calls"] = native
            out.append(item)
        elif role == "tool":
            item = {"role": "tool", "content": content_text(content)}
            name = names.get(msg.get("tool_call_id") or "") or msg.get("name")
            if name:
                item["tool_name"] = name
            out.append(item)
        else:
            raise bad_request(f"unknown message role {role!r}")
    return out


def _user_part(part: Any, texts: list[str], images: list[str]) -> None:
    if not isinstance(part, dict):
        raise bad_request("each content part must be an object")
    kind = part.get("type")
    if kind == "text":
        texts.append(part.get("text") or "")
    elif kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        parsed = split_data_url(url) if isinstance(url, str) else None
        if parsed is None:
            raise bad_request(
                "Ollama takes images inline: send them as data:<type>;base64,... URLs"
            )
        images.append(parsed[1])
    else:
        raise bad_request(f"Ollama does not take {kind!r} content parts")


def _arguments(fn: dict[str, Any]) -> Any:
    """Canonical arguments are a JSON string; Ollama wants the object."""
    raw = fn.get("arguments")
    if isinstance(raw, dict):
        return raw
    if not raw:
        return {}
    try:
        value = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError):
        return {}  # another model's broken arguments: Ollama only takes an object
    return value if isinstance(value, dict) else {}


def _tool_calls(calls: Any, first_index: int | None) -> list[dict[str, Any]]:
    """Ollama's tool calls (arguments as objects) in canonical form; with ``first_index`` the
    stream delta form (numbered)."""
    if not isinstance(calls, list):
        return []
    out: list[dict[str, Any]] = []
    for call in calls:
        if not isinstance(call, dict):
            continue
        fn = call.get("function")
        if not isinstance(fn, dict):
            continue
        args = fn.get("arguments")
        arguments = args if isinstance(args, str) else orjson.dumps(args or {}).decode()
        cid = call.get("id")
        item: dict[str, Any] = {
            "id": cid if isinstance(cid, str) and cid else new_id("call_"),
            "type": "function",
            "function": {"name": fn.get("name") or "", "arguments": arguments},
        }
        if first_index is not None:
            item = {"index": first_index + len(out), **item}
        out.append(item)
    return out


class OllamaStreamDecoder:
    """One JSON object per line; the last has ``"done": true`` with ``done_reason`` and the
    token counts. Tool calls arrive whole, each becomes one delta. ``thinking`` text is not
    passed on (the canonical shape has no place for it) but counts in ``text_out``."""

    __slots__ = (
        "_created",
        "_id",
        "_model",
        "_reader",
        "_role_sent",
        "_text",
        "_tools",
        "done",
        "finish_reason",
        "malformed",
        "usage",
    )

    def __init__(self, model: str) -> None:
        self.done = False
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        self.malformed = 0
        self._model = model
        self._reader = NDJSONReader()
        self._text: list[str] = []
        self._id = new_id("chatcmpl-")
        self._created = int(time.time())
        self._role_sent = False
        self._tools = 0

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        return self._lines(self._reader.feed(data))

    def close(self) -> list[dict[str, Any]]:
        return self._lines(self._reader.close())

    def text_out(self) -> str:
        return "".join(self._text)

    def _lines(self, lines: list[bytes]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for line in lines:
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                self.malformed += 1
                continue
            if not isinstance(obj, dict):
                self.malformed += 1
                continue
            if "error" in obj:
                raise _error(obj["error"], 0)
            if self.done:
                continue
            delta: dict[str, Any] = {}
            if not self._role_sent:
                delta["role"] = "assistant"
                self._role_sent = True
            msg = obj.get("message")
            if isinstance(msg, dict):
                content = msg.get("content")
                if content and isinstance(content, str):
                    delta["content"] = content
                    self._text.append(content)
                thinking = msg.get("thinking")
                if thinking and isinstance(thinking, str):
                    self._text.append(thinking)
                calls = _tool_calls(msg.get("tool_calls"), self._tools)
                if calls:
                    self._tools += len(calls)
                    delta["tool_calls"] = calls
                    for call in calls:
                        self._text.append(call["function"]["name"])
                        self._text.append(call["function"]["arguments"])
            finish = None
            if obj.get("done") is True:
                self.done = True
                reason = obj.get("done_reason")
                finish = "tool_calls" if self._tools else _DONE_REASONS.get(reason or "", "stop")
                self.finish_reason = finish
                self.usage = _usage(obj)
            elif not delta:
                continue  # thinking only: nothing the client sees
            out.append(
                {
                    "id": self._id,
                    "object": "chat.completion.chunk",
                    "created": self._created,
                    "model": obj.get("model") or self._model,
                    "choices": [
                        {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                    ],
                }
            )
        return out
