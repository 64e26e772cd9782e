"""OpenAI Chat Completions, and every server that speaks it (vLLM, llama.cpp server, LM Studio).

The canonical shape inside the gateway *is* this protocol, so the adapter mostly passes bodies
through: the request gets the deployment's model and parameters, a streamed one always asks for
the usage chunk (``stream_options.include_usage``) for accounting; answers keep the provider's
own ``model`` and fields, with finish reasons brought to the four canonical ones.

The helpers at the top (Retry-After parsing, id generation, header building) are shared with the
other adapters.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import orjson

from piuptime.config.llm import LlmProvider

from ..sse import SSEReader
from .base import (
    AUTH,
    BAD_REQUEST,
    CONTENT_POLICY,
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

__all__ = ["OpenAIAdapter", "OpenAIStreamDecoder"]

# --------------------------------------------------------------------------- shared helpers

#: finish reasons the canonical shape knows, and what other servers' ones mean
CANONICAL_FINISH = frozenset(("stop", "length", "tool_calls", "content_filter"))
_FINISH_ALIASES = {
    "function_call": "tool_calls",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "eos": "stop",
    "eos_token": "stop",
    "stop_sequence": "stop",
    "end_turn": "stop",
}


def canonical_finish(reason: str) -> str:
    """Any server's finish reason as one of stop, length, tool_calls, content_filter."""
    if reason in CANONICAL_FINISH:
        return reason
    return _FINISH_ALIASES.get(reason, "stop")


def new_id(prefix: str) -> str:
    """``chatcmpl-<hex>``, ``call_<hex>``: 24 random hex digits after the prefix."""
    return prefix + os.urandom(12).hex()


def base_path(url: str) -> str:
    """The path part of a base URL, without its trailing slash (``""`` for none)."""
    return urlsplit(url).path.rstrip("/")


def extra_headers(cfg: LlmProvider) -> Headers:
    """The provider's configured extra headers, names lower-cased."""
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in cfg.headers.items()]


def with_key(
    base: Headers, key: str | None, name: bytes = b"authorization", prefix: bytes = b"Bearer "
) -> Headers:
    """``base`` (a fresh list) plus the API key's header, when there is a key."""
    if key is None:
        return list(base)
    return [*base, (name, prefix + key.encode("latin-1"))]


def header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower-case), compared case-insensitively."""
    for key, value in headers:
        if key == name or key.lower() == name:
            return value
    return None


def retry_after(headers: Headers) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (preferred, fractional) or ``retry-after``
    (seconds or an HTTP date); None when neither is there or readable."""
    ms = header(headers, b"retry-after-ms")
    if ms is not None:
        try:
            value = float(ms)
        except ValueError:
            pass
        else:
            if value >= 0 and value == value and value != float("inf"):
                return value / 1000.0
    raw = header(headers, b"retry-after")
    if raw is None:
        return None
    text = raw.decode("latin-1").strip()
    try:
        value = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        return max(0.0, when.timestamp() - time.time())
    if value < 0 or value != value or value == float("inf"):
        return None
    return value


_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(text: str) -> float | None:
    """``"6m0s"``, ``"1.5s"``, ``"20ms"`` (OpenAI's ``x-ratelimit-reset-*``) in seconds."""
    text = text.strip()
    if not text:
        return None
    total = 0.0
    pos = 0
    for match in _GO_DURATION.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT[match.group(2)]
        pos = match.end()
    return total if pos == len(text) else None


def json_or_none(body: bytes) -> Any:
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def body_excerpt(body: bytes, status: int) -> str:
    """A message for an error body that is not JSON: its start, or the status."""
    text = body[:300].decode("utf-8", "replace").strip()
    return text or f"provider answered HTTP {status}"


def usage_of(prompt: Any, completion: Any, total: Any = None) -> dict[str, int]:
    p = prompt if isinstance(prompt, int) else 0
    c = completion if isinstance(completion, int) else 0
    t = total if isinstance(total, int) else p + c
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": t}


def kind_by_status(status: int) -> str:
    """The kind an error status means when its body says nothing more precise."""
    if status == 429:
        return RATE_LIMITED
    if status in (401, 403):
        return AUTH
    if status == 404:
        return NOT_FOUND
    if status == 529:
        return OVERLOADED
    if status >= 500 or status in (408, 409):
        return SERVER
    if 400 <= status < 500:
        return BAD_REQUEST
    return PROTOCOL


_CONTEXT_WORDS = (
    "context length",
    "context_length",
    "maximum context",
    "context window",
    "context size",
    "exceeds the maximum number of tokens",
    "prompt is too long",
)


def looks_like_context_length(message: str) -> bool:
    low = message.lower()
    return any(word in low for word in _CONTEXT_WORDS)


def split_data_url(url: str) -> tuple[str, str] | None:
    """``data:image/png;base64,AAAA`` → ``("image/png", "AAAA")``; None for anything else
    (an http URL, or a data URL that is not base64)."""
    if not url.startswith("data:"):
        return None
    head, comma, data = url.partition(",")
    if not comma or not head.endswith(";base64"):
        return None
    mime = head[5:-7].split(";", 1)[0] or "application/octet-stream"
    return mime, data


def content_text(content: Any) -> str:
    """A message's text: the string itself, or its text parts joined (other parts ignored)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def bad_request(message: str) -> ProviderError:
    """A request this provider cannot take (raised by ``chat_request`` before any I/O)."""
    return ProviderError(BAD_REQUEST, message, status=400, type="invalid_request_error")


# --------------------------------------------------------------------------- the adapter

_JSON = b"application/json"
_MAX_TOOL_CALL_ID = 40  # OpenAI refuses longer tool call ids


class OpenAIAdapter:
    kind = "openai"
    supports_embeddings = True

    def __init__(self, cfg: LlmProvider) -> None:
        self.cfg = cfg
        base = base_path(cfg.url)
        self._chat_path = (base + "/chat/completions").encode()
        self._embeddings_path = (base + "/embeddings").encode()
        extra = extra_headers(cfg)
        self._json_headers: Headers = [(b"content-type", _JSON), (b"accept", _JSON), *extra]
        self._sse_headers: Headers = [
            (b"content-type", _JSON),
            (b"accept", b"text/event-stream"),
            *extra,
        ]

    # chat

    def chat_request(
        self, body: dict[str, Any], deployment: Deployment, stream: bool, key: str | None
    ) -> WireRequest:
        params = deployment.params
        out = {**params, **body} if params else {**body}
        out["model"] = deployment.model
        messages = out.get("messages")
        if isinstance(messages, list):
            short = _short_tool_call_ids(messages)
            if short is not None:
                out["messages"] = short
        if stream:
            out["stream"] = True
            options = out.get("stream_options")
            if isinstance(options, dict) and options:
                out["stream_options"] = {**options, "include_usage": True}
            else:
                out["stream_options"] = {"include_usage": True}
            headers = with_key(self._sse_headers, key)
        else:
            out.pop("stream", None)
            out.pop("stream_options", None)
            headers = with_key(self._json_headers, key)
        return WireRequest(b"POST", self._chat_path, headers, orjson.dumps(out))

    def chat_response(self, data: bytes, deployment: Deployment) -> dict[str, Any]:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ProviderError(PROTOCOL, "the provider's answer is not JSON", status=200) from None
        if not isinstance(obj, dict):
            raise ProviderError(PROTOCOL, "the provider's answer is not a JSON object", status=200)
        choices = obj.get("choices")
        if not isinstance(choices, list):
            if obj.get("error") or obj.get("object") == "error":
                raise _error_from_object(obj, 200)
            raise ProviderError(PROTOCOL, "the provider's answer has no choices", status=200)
        for choice in choices:
            if isinstance(choice, dict):
                reason = choice.get("finish_reason")
                if reason is not None and reason not in CANONICAL_FINISH:
                    choice["finish_reason"] = canonical_finish(str(reason))
        if not obj.get("model"):
            obj["model"] = deployment.model
        if not obj.get("id"):
            obj["id"] = new_id("chatcmpl-")
        if "object" not in obj:
            obj["object"] = "chat.completion"
        if "created" not in obj:
            obj["created"] = int(time.time())
        if obj.get("usage", 0) is None:
            del obj["usage"]
        return obj

    def stream_decoder(self, deployment: Deployment) -> OpenAIStreamDecoder:
        return OpenAIStreamDecoder(deployment.model)

    # embeddings

    def embeddings_request(
        self, body: dict[str, Any], deployment: Deployment, key: str | None
    ) -> WireRequest:
        params = deployment.params
        out = {**params, **body} if params else {**body}
        out["model"] = deployment.model
        headers = with_key(self._json_headers, key)
        return WireRequest(b"POST", self._embeddings_path, headers, orjson.dumps(out))

    def embeddings_response(self, data: bytes, deployment: Deployment) -> dict[str, Any]:
        obj = json_or_none(data)
        if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
            if isinstance(obj, dict) and (obj.get("error") or obj.get("object") == "error"):
                raise _error_from_object(obj, 200)
            raise ProviderError(
                PROTOCOL, "the provider's embeddings answer has no data", status=200
            )
        if not obj.get("model"):
            obj["model"] = deployment.model
        if "object" not in obj:
            obj["object"] = "list"
        return obj

    # errors

    def classify(self, status: int, headers: Headers, body: bytes) -> ProviderError:
        obj = json_or_none(body)
        if isinstance(obj, dict) and (obj.get("error") is not None or "message" in obj):
            err = _error_from_object(obj, status)
        else:
            err = ProviderError(kind_by_status(status), body_excerpt(body, status), status=status)
        if err.kind == RATE_LIMITED or status in (429, 503, 529):
            err.retry_after = retry_after(headers)
            if err.retry_after is None and status == 429:
                err.retry_after = _ratelimit_reset(headers)
        return err


def _error_from_object(obj: dict[str, Any], status: int) -> ProviderError:
    """An OpenAI error body (``{"error": {message, type, param, code}}``), or what compatible
    servers send instead: ``{"error": "text"}`` (LM Studio, Ollama's compat layer) or vLLM's
    top-level ``{"object": "error", "message", "type", "code"}``."""
    err = obj.get("error")
    if isinstance(err, dict):
        fields = err
    elif isinstance(err, str):
        fields = {"message": err}
    else:
        fields = obj
    message = fields.get("message")
    message = message if isinstance(message, str) and message else f"provider error ({status})"
    etype = fields.get("type")
    etype = etype if isinstance(etype, str) else None
    code = fields.get("code")
    code = code if isinstance(code, str) else None
    param = fields.get("param")
    param = param if isinstance(param, str) else None
    return ProviderError(
        _error_kind(status, etype, code, message),
        message,
        status=status,
        code=code,
        type=etype,
        param=param,
    )


def _error_kind(status: int, etype: str | None, code: str | None, message: str) -> str:
    if code == "insufficient_quota":
        # billing, not pace: this key will not work sooner for waiting; set it aside
        return AUTH
    if status in (401, 403, 404, 429):
        return kind_by_status(status)
    if code == "context_length_exceeded" or etype == "exceed_context_size_error":
        return CONTEXT_LENGTH
    if code in ("content_policy_violation", "content_filter") or etype == "content_filter":
        return CONTENT_POLICY
    if status in (0, 200):
        # an error carried in a 2xx body or inside a stream: by what it says
        if code == "rate_limit_exceeded" or etype in ("rate_limit_error", "tokens", "requests"):
            return RATE_LIMITED
        if etype in ("invalid_request_error", "BadRequestError"):
            return CONTEXT_LENGTH if looks_like_context_length(message) else BAD_REQUEST
        return SERVER
    if looks_like_context_length(message):
        return CONTEXT_LENGTH
    return kind_by_status(status)


def _ratelimit_reset(headers: Headers) -> float | None:
    """OpenAI's ``x-ratelimit-reset-{requests,tokens}`` for the limit that ran out."""
    waits: list[float] = []
    for which in (b"requests", b"tokens"):
        remaining = header(headers, b"x-ratelimit-remaining-" + which)
        reset = header(headers, b"x-ratelimit-reset-" + which)
        if reset is None or (remaining is not None and remaining.strip() not in (b"0", b"0.0")):
            continue
        seconds = go_duration(reset.decode("latin-1"))
        if seconds is not None:
            waits.append(seconds)
    return max(waits) if waits else None


def _short_id(tool_call_id: str) -> str:
    return "call_" + hashlib.sha256(tool_call_id.encode()).hexdigest()[:24]


def _short_tool_call_ids(messages: list[Any]) -> list[Any] | None:
    """Tool call ids longer than OpenAI accepts (another provider's, e.g. Gemini's carrying a
    thought signature) replaced by a stable short hash, in the calls and in the tool messages
    that answer them. None (no copy) when every id is fine, the usual case."""
    out: list[Any] | None = None
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            continue
        role = msg.get("role")
        if role == "tool":
            tid = msg.get("tool_call_id")
            if isinstance(tid, str) and len(tid) > _MAX_TOOL_CALL_ID:
                if out is None:
                    out = list(messages)
                out[i] = {**msg, "tool_call_id": _short_id(tid)}
        elif role == "assistant":
            calls = msg.get("tool_calls")
            if not isinstance(calls, list):
                continue
            if any(
                isinstance(c, dict)
                and isinstance(c.get("id"), str)
                and len(c["id"]) > _MAX_TOOL_CALL_ID
                for c in calls
            ):
                if out is None:
                    out = list(messages)
                out[i] = {
                    **msg,
                    "tool_calls": [
                        {**c, "id": _short_id(c["id"])}
                        if isinstance(c, dict)
                        and isinstance(c.get("id"), str)
                        and len(c["id"]) > _MAX_TOOL_CALL_ID
                        else c
                        for c in calls
                    ],
                }
    return out


# --------------------------------------------------------------------------- streaming


class OpenAIStreamDecoder:
    """``data: {chunk}`` events until ``data: [DONE]``. The usage-only chunk
    (``choices: []``, ``usage: {...}``) is swallowed into ``usage``; ``usage`` keys on other
    chunks are taken off, so the handler alone decides what usage the client sees."""

    __slots__ = ("_model", "_reader", "_text", "done", "finish_reason", "malformed", "usage")

    def __init__(self, model: str) -> None:
        self.done = False
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        self.malformed = 0
        self._model = model
        self._reader = SSEReader()
        self._text: list[str] = []

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        return self._events(self._reader.feed(data))

    def close(self) -> list[dict[str, Any]]:
        return self._events(self._reader.close())

    def text_out(self) -> str:
        return "".join(self._text)

    def _events(self, events: list[tuple[str, str]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for _event, payload in events:
            if payload == "[DONE]":
                self.done = True
                continue
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                self.malformed += 1
                continue
            if not isinstance(obj, dict):
                self.malformed += 1
                continue
            if obj.get("error") is not None or obj.get("object") == "error":
                raise _error_from_object(obj, 0)
            usage = obj.pop("usage", None)
            if isinstance(usage, dict):
                self.usage = usage_of(
                    usage.get("prompt_tokens"),
                    usage.get("completion_tokens"),
                    usage.get("total_tokens"),
                )
            choices = obj.get("choices")
            if not isinstance(choices, list):
                if usage is None:
                    self.malformed += 1
                continue
            if not choices:
                continue  # the usage chunk, or Azure's prompt_filter_results
            text = self._text
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta")
                if delta:
                    content = delta.get("content")
                    if content:
                        text.append(content)
                    for extra in ("reasoning_content", "refusal"):
                        value = delta.get(extra)
                        if value and isinstance(value, str):
                            text.append(value)
                    calls = delta.get("tool_calls")
                    if calls:
                        for call in calls:
                            fn = call.get("function") if isinstance(call, dict) else None
                            if fn:
                                name = fn.get("name")
                                if name:
                                    text.append(name)
                                args = fn.get("arguments")
                                if args:
                                    text.append(args)
                reason = choice.get("finish_reason")
                if reason is not None:
                    if reason not in CANONICAL_FINISH:
                        reason = canonical_finish(str(reason))
                        choice["finish_reason"] = reason
                    self.finish_reason = reason
            if not obj.get("model"):
                obj["model"] = self._model
            out.append(obj)
        return out
