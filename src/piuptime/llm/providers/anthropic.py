"""Anthropic's Messages API (``POST {base}/v1/messages``) as a provider.

Requests (canonical OpenAI chat → Anthropic):

- ``system``/``developer`` messages, wherever they are, become the top-level ``system`` (a
  string for one plain message, text blocks otherwise). Consecutive messages of the same role
  are merged into one turn, because Anthropic requires user and assistant to alternate.
- Parts: text; ``image_url`` (a ``data:`` URL becomes a ``base64`` source, an ``http(s)`` URL a
  ``url`` source); ``file`` with a ``data:application/pdf`` (or ``text/plain``) ``file_data``
  becomes a ``document`` block. Other part types are refused (``ProviderError`` BAD_REQUEST).
- Assistant ``tool_calls`` become ``tool_use`` blocks (``input`` = the parsed arguments; an
  argument string that is not a JSON object is refused). ``tool`` messages become
  ``tool_result`` blocks; consecutive tool results share one user turn, before any other user
  content of that turn.
- ``tools`` → ``{name, description, input_schema}``; ``tool_choice`` auto/required/none/
  ``{function}`` → ``{type: auto|any|none|tool}``; ``parallel_tool_calls: false`` →
  ``disable_parallel_tool_use``.
- ``max_tokens`` is required by Anthropic: it is taken from ``max_completion_tokens``, then
  ``max_tokens`` (the deployment's params count), else :data:`DEFAULT_MAX_TOKENS` (4096).
- ``stop`` → ``stop_sequences``; ``temperature`` (clamped to Anthropic's 0..1 range: OpenAI
  allows up to 2), ``top_p``; ``user`` → ``metadata.user_id``.
- ``response_format``: ``json_schema`` → Anthropic's structured outputs,
  ``output_config.format = {type: json_schema, schema}`` (always strict there; the models that
  lack structured outputs answer 400, which is passed on). ``json_object`` has no Anthropic
  equivalent and is NOT forwarded: the output is not constrained (no system prompt is added).
  ``text`` is the default and is dropped.
- ``n`` > 1 is refused (Anthropic returns one answer); ``seed``, ``logprobs``, penalties,
  ``logit_bias`` and ``stream_options`` have no Anthropic counterpart and are dropped.
- ``deployment.params`` are merged under the client's values; params that are not canonical
  keys (``top_k``, ``thinking``, ``service_tier``, ``output_config``...) are passed to
  Anthropic as they are, so a deployment can configure Anthropic-only features. A param set
  to null is never sent, even when the client gave it: ``{temperature: null, top_p: null}``
  for the models that refuse sampling parameters (Claude Opus 4.7 and later answer 400).

Responses: text blocks joined; ``tool_use`` → ``tool_calls`` with the arguments as a JSON
string; thinking and server-tool blocks are not part of the canonical answer. Stop reasons:
``end_turn``/``stop_sequence``/``pause_turn`` → stop, ``max_tokens``/
``model_context_window_exceeded`` → length, ``tool_use`` → tool_calls, ``refusal`` →
content_filter. Usage: prompt tokens = ``input_tokens`` + ``cache_creation_input_tokens`` +
``cache_read_input_tokens``.

Anthropic has no embeddings API: ``supports_embeddings`` is False.
"""

from __future__ import annotations

import base64
import binascii
import time
from datetime import UTC, datetime
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

__all__ = ["DEFAULT_MAX_TOKENS", "AnthropicAdapter", "AnthropicStreamDecoder"]

#: ``max_tokens`` sent when neither the client nor the deployment gave one (Anthropic requires
#: it; 4096 is within every current model's output limit).
DEFAULT_MAX_TOKENS = 4096

# canonical request keys this adapter translates or deliberately drops; any other key of the
# deployment's params is passed to Anthropic unchanged
_CANONICAL_KEYS = frozenset(
    {
        "model",
        "messages",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "n",
        "seed",
        "user",
        "stream",
        "stream_options",
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "frequency_penalty",
        "presence_penalty",
        "functions",
        "function_call",
        "modalities",
        "audio",
        "prediction",
        "store",
        "reasoning_effort",
        "service_tier",
        "metadata",
    }
)
# canonical key → the Anthropic key it becomes (for params set to null)
_WIRE_NAMES = {"stop": "stop_sequences", "user": "metadata", "response_format": "output_config"}
# params keys that are Anthropic's own even though the canonical set has a key of that name
_PARAM_PASSTHROUGH = frozenset({"service_tier", "metadata"})

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_ERROR_KINDS = {
    "rate_limit_error": RATE_LIMITED,
    "overloaded_error": OVERLOADED,
    "api_error": SERVER,
    "timeout_error": SERVER,
    "authentication_error": AUTH,
    "permission_error": AUTH,
    "billing_error": AUTH,
    "not_found_error": NOT_FOUND,
    "request_too_large": BAD_REQUEST,
    "invalid_request_error": BAD_REQUEST,
}

_CONTEXT_MARKERS = (
    "prompt is too long",
    "exceed context limit",
    "exceeds the context window",
    "context window",
)
_POLICY_MARKERS = ("content filtering policy", "content policy", "usage policy")


def _bad(message: str) -> ProviderError:
    return ProviderError(BAD_REQUEST, message, status=400, type="invalid_request_error")


# ---------------------------------------------------------------------------------------------
# request


def _image_block(url: str) -> dict[str, Any]:
    if url.startswith("data:"):
        media_type, data = _split_data_url(url)
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise _bad("an image_url is an http(s) URL or a data: URL")


def _split_data_url(url: str) -> tuple[str, str]:
    head, comma, data = url.partition(",")
    if not comma or not head.endswith(";base64"):
        raise _bad("a data: URL must be base64-encoded (data:<media type>;base64,<data>)")
    media_type = head[5:-7]
    if not media_type:
        raise _bad("a data: URL needs a media type")
    return media_type, data


def _file_block(part: dict[str, Any]) -> dict[str, Any]:
    file = part.get("file")
    data_url = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data_url, str) or not data_url.startswith("data:"):
        raise _bad("a file part is sent to Anthropic only with file_data as a data: URL")
    media_type, data = _split_data_url(data_url)
    if media_type == "application/pdf":
        return {
            "type": "document",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    if media_type == "text/plain":
        try:
            text = base64.b64decode(data, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise _bad("a text/plain file part is not base64-encoded UTF-8") from None
        return {
            "type": "document",
            "source": {"type": "text", "media_type": media_type, "data": text},
        }
    raise _bad(f"Anthropic takes PDF or plain-text documents, not {media_type}")


def _blocks(content: Any, role: str) -> list[dict[str, Any]]:
    """Canonical content (str, parts or None) as Anthropic blocks; empty text is left out
    (Anthropic refuses empty text blocks)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise _bad(f"the content of a {role} message is a string or a list of parts")
    out: list[dict[str, Any]] = []
    for part in content:
        if not isinstance(part, dict):
            raise _bad("a content part is an object")
        ptype = part.get("type")
        if ptype == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad("a text part needs a text string")
            if text:
                out.append({"type": "text", "text": text})
        elif ptype == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise _bad("an image_url part needs image_url.url")
            out.append(_image_block(url))
        elif ptype == "file":
            out.append(_file_block(part))
        elif ptype == "refusal":
            refusal = part.get("refusal")
            if isinstance(refusal, str) and refusal:
                out.append({"type": "text", "text": refusal})
        else:
            raise _bad(f"content part type {ptype!r} is not supported by Anthropic")
    return out


def _tool_use(call: Any) -> dict[str, Any]:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise _bad("a tool call is {id, type: function, function: {name, arguments}}")
    fn = call["function"]
    args = fn.get("arguments") or "{}"
    if isinstance(args, str):
        try:
            parsed = orjson.loads(args)
        except orjson.JSONDecodeError:
            raise _bad(f"the arguments of tool call {call.get('id')!r} are not JSON") from None
    else:
        parsed = args
    if not isinstance(parsed, dict):
        raise _bad(f"the arguments of tool call {call.get('id')!r} are not a JSON object")
    return {
        "type": "tool_use",
        "id": call.get("id") or "",
        "name": fn.get("name") or "",
        "input": parsed,
    }


def _tool_result(msg: dict[str, Any]) -> dict[str, Any]:
    content = msg.get("content")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": msg.get("tool_call_id") or ""}
    if isinstance(content, str):
        if content:
            block["content"] = content
    elif content is not None:
        block["content"] = _blocks(content, "tool")
    return block


def _system_text(content: Any) -> list[dict[str, Any]]:
    blocks = _blocks(content, "system")
    for b in blocks:
        if b["type"] != "text":
            raise _bad("a system message holds text only")
    return blocks


def _messages(messages: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system text blocks, alternating Anthropic messages)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages is a non-empty list")
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []  # {"role", "content": [blocks]}
    for msg in messages:
        if not isinstance(msg, dict):
            raise _bad("a message is an object")
        role = msg.get("role")
        if role in ("system", "developer"):
            system.extend(_system_text(msg.get("content")))
            continue
        if role == "user":
            arole, blocks = "user", _blocks(msg.get("content"), "user")
        elif role == "assistant":
            arole, blocks = "assistant", _blocks(msg.get("content"), "assistant")
            for call in msg.get("tool_calls") or ():
                blocks.append(_tool_use(call))
        elif role == "tool":
            arole, blocks = "user", [_tool_result(msg)]
        else:
            raise _bad(f"message role {role!r} is not supported")
        if not blocks:
            continue  # an empty message (Anthropic refuses empty turns): nothing to say
        if turns and turns[-1]["role"] == arole:
            prev = turns[-1]["content"]
            if role == "tool":
                # tool results go first in a user turn, after earlier tool results
                at = 0
                while at < len(prev) and prev[at]["type"] == "tool_result":
                    at += 1
                prev[at:at] = blocks
            else:
                prev.extend(blocks)
        else:
            turns.append({"role": arole, "content": blocks})
    out: list[dict[str, Any]] = []
    for turn in turns:
        blocks = turn["content"]
        if len(blocks) == 1 and blocks[0]["type"] == "text":
            out.append({"role": turn["role"], "content": blocks[0]["text"]})
        else:
            out.append(turn)
    return system, out


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _bad("tools is a list")
    out: list[dict[str, Any]] = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type", "function") != "function":
            raise _bad("a tool is {type: function, function: {name, description, parameters}}")
        entry: dict[str, Any] = {"name": fn.get("name") or ""}
        if fn.get("description"):
            entry["description"] = fn["description"]
        schema = fn.get("parameters")
        entry["input_schema"] = (
            schema if isinstance(schema, dict) else {"type": "object", "properties": {}}
        )
        out.append(entry)
    return out


def _tool_choice(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if choice == "auto":
        return {"type": "auto"}
    if choice == "required":
        return {"type": "any"}
    if choice == "none":
        return {"type": "none"}
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if isinstance(name, str) and name:
            return {"type": "tool", "name": name}
    raise _bad("tool_choice is auto, none, required or {type: function, function: {name}}")


def _base_path(url: str) -> bytes:
    path = urlsplit(url).path.rstrip("/")
    # a base_url given as ".../v1" (as for OpenAI) means the same API root
    if path.endswith("/v1"):
        path = path[:-3]
    return (path + "/v1/messages").encode()


class AnthropicAdapter:
    kind = "anthropic"
    supports_embeddings = False

    def __init__(self, cfg: LlmProvider) -> None:
        self.cfg = cfg
        self._path = _base_path(cfg.url)
        extra: Headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1"))
            for k, v in cfg.headers.items()
            if k.lower() not in ("host", "content-length", "x-api-key", "anthropic-version")
        ]
        self._headers: Headers = [
            (b"anthropic-version", cfg.anthropic_version.encode("latin-1")),
            (b"content-type", b"application/json"),
            *extra,
        ]

    # -- chat ---------------------------------------------------------------------------------

    def chat_body(
        self, body: dict[str, Any], deployment: Deployment, stream: bool
    ) -> dict[str, Any]:
        """The Anthropic request body (a dict) for a canonical request."""
        params = deployment.params
        req = {**params, **body} if params else body
        system, messages = _messages(req.get("messages"))
        out: dict[str, Any] = {"model": deployment.model}
        if system:
            if len(system) == 1:
                out["system"] = system[0]["text"]
            else:
                out["system"] = system
        out["messages"] = messages
        max_tokens = req.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = req.get("max_tokens")
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_TOKENS
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise _bad("max_tokens is a non-negative integer")
        out["max_tokens"] = max_tokens
        n = req.get("n")
        if n is not None and n != 1:
            raise _bad("Anthropic returns one choice: n must be 1")
        stop = req.get("stop")
        if isinstance(stop, str):
            out["stop_sequences"] = [stop]
        elif isinstance(stop, list) and stop:
            out["stop_sequences"] = stop
        temperature = req.get("temperature")
        if isinstance(temperature, int | float) and not isinstance(temperature, bool):
            out["temperature"] = min(max(float(temperature), 0.0), 1.0)
        if req.get("top_p") is not None:
            out["top_p"] = req["top_p"]
        user = req.get("user")
        if isinstance(user, str) and user:
            out["metadata"] = {"user_id": user}
        tools = req.get("tools")
        if tools:  # a tool_choice without tools has nothing to choose from: dropped
            out["tools"] = _tools(tools)
            tc = _tool_choice(req.get("tool_choice"))
            if req.get("parallel_tool_calls") is False:
                tc = tc or {"type": "auto"}
                if tc["type"] != "none":
                    tc["disable_parallel_tool_use"] = True
            if tc is not None:
                out["tool_choice"] = tc
        fmt = req.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise _bad("response_format json_schema needs json_schema.schema")
            config = dict(params.get("output_config") or {}) if params else {}
            config["format"] = {"type": "json_schema", "schema": schema}
            out["output_config"] = config
        if params:
            for key, value in params.items():
                if value is None:
                    # a null param: never sent, whatever the client asked (the newest models
                    # refuse temperature, top_p and top_k with a 400)
                    out.pop(_WIRE_NAMES.get(key, key), None)
                elif (key not in _CANONICAL_KEYS or key in _PARAM_PASSTHROUGH) and key not in out:
                    out[key] = value
        if stream:
            out["stream"] = True
        return out

    def chat_request(
        self, body: dict[str, Any], deployment: Deployment, stream: bool, key: str | None
    ) -> WireRequest:
        headers = list(self._headers)
        if key:
            headers.insert(0, (b"x-api-key", key.encode("latin-1")))
        headers.append((b"accept", b"text/event-stream" if stream else b"application/json"))
        data = orjson.dumps(self.chat_body(body, deployment, stream))
        return WireRequest(b"POST", self._path, headers, data)

    def chat_response(self, data: bytes, deployment: Deployment) -> dict[str, Any]:
        try:
            resp = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ProviderError(PROTOCOL, "Anthropic sent a body that is not JSON") from None
        if isinstance(resp, dict) and resp.get("type") == "error":
            raise _error_from_body(resp, 200)
        if not isinstance(resp, dict) or not isinstance(resp.get("content"), list):
            raise ProviderError(PROTOCOL, "Anthropic sent an answer without content blocks")
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in resp["content"]:
            if not isinstance(block, dict):
                continue
            btype = block.get("type")
            if btype == "text":
                texts.append(block.get("text") or "")
            elif btype == "tool_use":
                calls.append(
                    {
                        "id": block.get("id") or f"toolu_{len(calls)}",
                        "type": "function",
                        "function": {
                            "name": block.get("name") or "",
                            "arguments": orjson.dumps(block.get("input") or {}).decode(),
                        },
                    }
                )
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(texts) if texts else None,
            "refusal": None,
        }
        if calls:
            message["tool_calls"] = calls
        stop = resp.get("stop_reason")
        out: dict[str, Any] = {
            "id": resp.get("id") or "msg",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": resp.get("model") or deployment.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": FINISH_REASONS.get(stop, "stop") if stop else "stop",
                    "logprobs": None,
                }
            ],
        }
        usage = _usage(resp.get("usage"))
        if usage is not None:
            out["usage"] = usage
        return out

    def stream_decoder(self, deployment: Deployment) -> AnthropicStreamDecoder:
        return AnthropicStreamDecoder(deployment)

    # -- embeddings ---------------------------------------------------------------------------

    def embeddings_request(
        self, body: dict[str, Any], deployment: Deployment, key: str | None
    ) -> WireRequest:
        raise _bad("Anthropic has no embeddings API")

    def embeddings_response(self, data: bytes, deployment: Deployment) -> dict[str, Any]:
        raise _bad("Anthropic has no embeddings API")

    # -- errors -------------------------------------------------------------------------------

    def classify(self, status: int, headers: Headers, body: bytes) -> ProviderError:
        try:
            parsed = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            parsed = None
        err = _error_from_body(parsed, status)
        if err.kind in (RATE_LIMITED, OVERLOADED) or status in (429, 529, 503):
            err.retry_after = retry_after(headers)
        return err


def _error_from_body(parsed: Any, status: int) -> ProviderError:
    etype: str | None = None
    message = ""
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict):
            raw_type, raw_message = error.get("type"), error.get("message")
            etype = raw_type if isinstance(raw_type, str) else None
            message = raw_message if isinstance(raw_message, str) else ""
    if not message:
        message = f"Anthropic answered HTTP {status}" if status else "Anthropic reported an error"
    kind = _kind(status, etype, message)
    return ProviderError(kind, message, status=status, code=etype, type=etype)


def _kind(status: int, etype: str | None, message: str) -> str:
    lowered = message.lower()
    if status == 429:
        return RATE_LIMITED
    if status == 529:
        return OVERLOADED
    if status in (401, 403):
        return AUTH
    if etype == "invalid_request_error" or status == 400:
        if any(m in lowered for m in _CONTEXT_MARKERS):
            return CONTEXT_LENGTH
        if any(m in lowered for m in _POLICY_MARKERS):
            return CONTENT_POLICY
    if etype in _ERROR_KINDS:
        return _ERROR_KINDS[etype]
    if status == 404:
        return NOT_FOUND
    if status >= 500:
        return SERVER
    if status == 0:
        return SERVER
    return BAD_REQUEST


def _header(headers: Headers, name: bytes) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v.decode("latin-1").strip()
    return None


def _seconds_until(value: str, now: float) -> float | None:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, moment.timestamp() - now)


_RESETS = (b"requests", b"tokens", b"input-tokens", b"output-tokens")


def retry_after(headers: Headers, now: float | None = None) -> float | None:
    """Seconds to wait: ``retry-after`` (seconds or an HTTP date), else the latest
    ``anthropic-ratelimit-*-reset`` (RFC 3339) of the limits whose ``-remaining`` is 0 (of all
    of them when none says which ran out)."""
    now = time.time() if now is None else now
    value = _header(headers, b"retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - now)
            except (TypeError, ValueError):
                pass
    exhausted: list[float] = []
    every: list[float] = []
    for limit in _RESETS:
        reset = _header(headers, b"anthropic-ratelimit-" + limit + b"-reset")
        if not reset:
            continue
        seconds = _seconds_until(reset, now)
        if seconds is None:
            continue
        every.append(seconds)
        if _header(headers, b"anthropic-ratelimit-" + limit + b"-remaining") == "0":
            exhausted.append(seconds)
    chosen = exhausted or every
    return max(chosen) if chosen else None


def _usage(raw: Any) -> dict[str, int] | None:
    if not isinstance(raw, dict):
        return None
    prompt = 0
    for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
        value = raw.get(key)
        if isinstance(value, int):
            prompt += value
    completion = raw.get("output_tokens")
    completion = completion if isinstance(completion, int) else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


# ---------------------------------------------------------------------------------------------
# stream


class AnthropicStreamDecoder:
    """Anthropic's SSE events → canonical chunks.

    ``message_start`` gives the id, model and input tokens (and a first chunk with the
    assistant role); text blocks and ``text_delta`` give content; a ``tool_use`` block start
    gives the tool call's id and name, ``input_json_delta`` its arguments; thinking, citations
    and server-tool blocks are not canonical content and are skipped; ``message_delta`` gives
    the finish reason (a chunk of its own) and the output tokens; ``message_stop`` ends the
    stream; ``ping`` and unknown events are ignored; ``error`` raises ``ProviderError``.

    ``usage`` is set from ``message_delta`` (Anthropic's counts there are cumulative), so a
    stream cut before it has no usage; ``prompt_tokens`` keeps what ``message_start`` said.
    """

    __slots__ = (
        "_blocks",
        "_created",
        "_id",
        "_model",
        "_reader",
        "_text",
        "_usage_raw",
        "done",
        "finish_reason",
        "malformed",
        "prompt_tokens",
        "usage",
    )

    def __init__(self, deployment: Deployment) -> None:
        self._reader = SSEReader()
        self._id = "msg"
        self._model = deployment.model
        self._created = int(time.time())
        self._blocks: dict[int, int] = {}  # content block index → tool call index
        self._text: list[str] = []
        self._usage_raw: dict[str, int] = {}
        self.done = False
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        self.malformed = 0
        self.prompt_tokens: int | None = None

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        return self._events(self._reader.feed(data))

    def close(self) -> list[dict[str, Any]]:
        return self._events(self._reader.close())

    def text_out(self) -> str:
        return "".join(self._text)

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def _events(self, events: list[tuple[str, str]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for name, data in events:
            try:
                ev = orjson.loads(data)
            except orjson.JSONDecodeError:
                self.malformed += 1
                continue
            if not isinstance(ev, dict):
                self.malformed += 1
                continue
            etype = ev.get("type")
            if not isinstance(etype, str):
                etype = name
            self._event(etype, ev, out)
        return out

    def _take_usage(self, raw: Any) -> None:
        if not isinstance(raw, dict):
            return
        for key in (
            "input_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
            "output_tokens",
        ):
            value = raw.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                self._usage_raw[key] = value

    def _event(self, etype: str, ev: dict[str, Any], out: list[dict[str, Any]]) -> None:
        if etype == "content_block_delta":
            delta = ev.get("delta")
            if not isinstance(delta, dict):
                self.malformed += 1
                return
            dtype = delta.get("type")
            if dtype == "text_delta":
                text = delta.get("text")
                if isinstance(text, str) and text:
                    self._text.append(text)
                    out.append(self._chunk({"content": text}))
            elif dtype == "input_json_delta":
                partial = delta.get("partial_json")
                tool = self._blocks.get(ev.get("index", -1))
                if tool is not None and isinstance(partial, str) and partial:
                    self._text.append(partial)
                    out.append(
                        self._chunk(
                            {"tool_calls": [{"index": tool, "function": {"arguments": partial}}]}
                        )
                    )
            # thinking_delta, signature_delta, citations_delta: not canonical content
        elif etype == "content_block_start":
            block = ev.get("content_block")
            if not isinstance(block, dict):
                self.malformed += 1
                return
            btype = block.get("type")
            if btype == "text":
                text = block.get("text")
                if isinstance(text, str) and text:
                    self._text.append(text)
                    out.append(self._chunk({"content": text}))
            elif btype == "tool_use":
                tool = len(self._blocks)
                self._blocks[ev.get("index", tool)] = tool
                start = block.get("input")
                args = orjson.dumps(start).decode() if isinstance(start, dict) and start else ""
                self._text.append(block.get("name") or "")
                self._text.append(args)
                call = {
                    "index": tool,
                    "id": block.get("id") or f"toolu_{tool}",
                    "type": "function",
                    "function": {"name": block.get("name") or "", "arguments": args},
                }
                out.append(self._chunk({"tool_calls": [call]}))
        elif etype == "message_start":
            message = ev.get("message")
            if not isinstance(message, dict):
                self.malformed += 1
                return
            if isinstance(message.get("id"), str):
                self._id = message["id"]
            if isinstance(message.get("model"), str) and message["model"]:
                self._model = message["model"]
            self._take_usage(message.get("usage"))
            usage = _usage(self._usage_raw)
            self.prompt_tokens = usage["prompt_tokens"] if usage else None
            out.append(self._chunk({"role": "assistant", "content": ""}))
        elif etype == "message_delta":
            delta = ev.get("delta")
            stop = delta.get("stop_reason") if isinstance(delta, dict) else None
            self._take_usage(ev.get("usage"))
            self.usage = _usage(self._usage_raw)
            if isinstance(stop, str):
                self.finish_reason = FINISH_REASONS.get(stop, "stop")
                out.append(self._chunk({}, self.finish_reason))
        elif etype == "message_stop":
            self.done = True
        elif etype == "error":
            raise _error_from_body(ev, 0)
        # content_block_stop, ping and event types added later: nothing to do
