"""The Anthropic-compatible front end: ``POST /v1/messages`` for clients of the anthropic SDK.

A Messages request is translated into the canonical (OpenAI chat) request, served by any
provider, and the canonical answer (whole, or chunk by chunk) translated back into an
Anthropic ``Message`` or Anthropic's SSE event sequence.

Supported: ``system`` (a string or text blocks), text / image (base64 and url) / document
(base64 PDF, plain text) / ``tool_use`` / ``tool_result`` blocks, custom tools,
``tool_choice`` (with ``disable_parallel_tool_use``), ``max_tokens``, ``stop_sequences``,
``temperature``, ``top_p``, ``metadata.user_id``, ``output_config.format`` (structured
outputs → ``response_format`` json_schema) and ``stream``.

Not carried (no canonical equivalent): ``cache_control`` marks, ``top_k``, ``thinking`` (and
thinking blocks in the history, which are dropped), ``service_tier``, citations. A
``tool_result`` with ``is_error: true`` keeps its content with an ``"Error: "`` prefix, since
OpenAI's tool messages have no error flag. Server tools (web search, code execution...) and
Anthropic-defined client tools (bash, text editor, computer use) are refused with a 400.
"""

from __future__ import annotations

import os
from typing import Any

import orjson

from .sse import sse_event

__all__ = [
    "ERROR_TYPES",
    "MessagesStreamWriter",
    "anthropic_error_body",
    "chat_to_message",
    "error_type",
    "messages_to_chat",
]

#: HTTP status → Anthropic's error ``type``
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

#: canonical finish reason → Anthropic stop reason
STOP_REASONS: dict[str, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status (other 4xx: invalid_request_error, other
    5xx: api_error)."""
    known = ERROR_TYPES.get(status)
    if known is not None:
        return known
    return "api_error" if status >= 500 else "invalid_request_error"


def anthropic_error_body(type: str, message: str) -> bytes:
    """An error body in Anthropic's shape: ``{"type": "error", "error": {type, message}}``."""
    return orjson.dumps({"type": "error", "error": {"type": type, "message": message}})


# ---------------------------------------------------------------------------------------------
# request: Anthropic → canonical


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _text_of(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    _need(isinstance(text, str), f"{where}: a text block needs a text string")
    assert isinstance(text, str)
    return text


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    _need(isinstance(source, dict), f"{where}: an image block needs a source")
    assert isinstance(source, dict)
    stype = source.get("type")
    if stype == "base64":
        media_type, data = source.get("media_type"), source.get("data")
        _need(
            isinstance(media_type, str) and isinstance(data, str),
            f"{where}: a base64 image source needs media_type and data",
        )
        url = f"data:{media_type};base64,{data}"
    elif stype == "url":
        raw_url = source.get("url")
        _need(
            isinstance(raw_url, str) and bool(raw_url), f"{where}: a url image source needs a url"
        )
        url = str(raw_url)
    else:
        raise ValueError(f"{where}: image source type {stype!r} is not supported")
    return {"type": "image_url", "image_url": {"url": url}}


def _document_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    _need(isinstance(source, dict), f"{where}: a document block needs a source")
    assert isinstance(source, dict)
    stype = source.get("type")
    if stype == "base64" and source.get("media_type") == "application/pdf":
        data = source.get("data")
        _need(isinstance(data, str), f"{where}: a base64 document source needs data")
        file: dict[str, Any] = {"file_data": f"data:application/pdf;base64,{data}"}
        title = block.get("title")
        file["filename"] = title if isinstance(title, str) and title else "document.pdf"
        return {"type": "file", "file": file}
    if stype == "text":
        data = source.get("data")
        _need(isinstance(data, str), f"{where}: a text document source needs data")
        return {"type": "text", "text": data}
    raise ValueError(f"{where}: only base64 PDF and text documents are supported")


def _user_parts(content: list[Any], where: str) -> tuple[list[dict[str, Any]], list[Any]]:
    """(parts, tool_result blocks) of a user message's blocks."""
    parts: list[dict[str, Any]] = []
    results: list[Any] = []
    for i, block in enumerate(content):
        at = f"{where}.content[{i}]"
        _need(isinstance(block, dict), f"{at}: a content block is an object")
        btype = block.get("type")
        if btype == "text":
            parts.append({"type": "text", "text": _text_of(block, at)})
        elif btype == "image":
            parts.append(_image_part(block, at))
        elif btype == "document":
            parts.append(_document_part(block, at))
        elif btype == "tool_result":
            results.append((block, at))
        elif btype in ("thinking", "redacted_thinking"):
            continue
        else:
            raise ValueError(f"{at}: content block type {btype!r} is not supported here")
    return parts, results


def _tool_message(block: dict[str, Any], where: str) -> dict[str, Any]:
    tool_use_id = block.get("tool_use_id")
    _need(isinstance(tool_use_id, str) and bool(tool_use_id), f"{where}: needs a tool_use_id")
    raw = block.get("content")
    content: str | list[dict[str, Any]]
    if raw is None:
        content = ""
    elif isinstance(raw, str):
        content = raw
    elif isinstance(raw, list):
        parts, nested = _user_parts(raw, where)
        _need(not nested, f"{where}: a tool_result cannot hold a tool_result")
        if all(p["type"] == "text" for p in parts):
            content = "".join(p["text"] for p in parts) if len(parts) <= 1 else parts
        else:
            content = parts
    else:
        raise ValueError(f"{where}: tool_result content is a string or a list of blocks")
    if block.get("is_error") is True:
        if isinstance(content, str):
            content = "Error: " + content
        else:
            content = [{"type": "text", "text": "Error:"}, *content]
    return {"role": "tool", "tool_call_id": tool_use_id, "content": content}


def _assistant(content: list[Any], where: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for i, block in enumerate(content):
        at = f"{where}.content[{i}]"
        _need(isinstance(block, dict), f"{at}: a content block is an object")
        btype = block.get("type")
        if btype == "text":
            texts.append(_text_of(block, at))
        elif btype == "tool_use":
            tid, name, args = block.get("id"), block.get("name"), block.get("input")
            _need(isinstance(tid, str) and bool(tid), f"{at}: a tool_use block needs an id")
            _need(isinstance(name, str) and bool(name), f"{at}: a tool_use block needs a name")
            _need(isinstance(args, dict), f"{at}: a tool_use block's input is an object")
            calls.append(
                {
                    "id": tid,
                    "type": "function",
                    "function": {"name": name, "arguments": orjson.dumps(args).decode()},
                }
            )
        elif btype in ("thinking", "redacted_thinking"):
            continue
        else:
            raise ValueError(f"{at}: content block type {btype!r} is not supported here")
    # no text: None beside tool calls, "" alone (a null content alone is refused by OpenAI)
    msg: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts else (None if calls else ""),
    }
    if calls:
        msg["tool_calls"] = calls
    return msg


def _messages(raw: Any) -> list[dict[str, Any]]:
    _need(isinstance(raw, list), "messages: expected a list of messages")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        _need(isinstance(msg, dict), f"{where}: a message is an object")
        role, content = msg.get("role"), msg.get("content")
        _need(role in ("user", "assistant"), f"{where}.role: expected user or assistant")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        _need(isinstance(content, list), f"{where}.content: a string or a list of blocks")
        if role == "assistant":
            out.append(_assistant(content, where))
            continue
        parts, results = _user_parts(content, where)
        # tool results answer the previous assistant turn: they come first, as tool messages
        for block, at in results:
            out.append(_tool_message(block, at))
        if parts:
            if len(parts) == 1 and parts[0]["type"] == "text":
                out.append({"role": "user", "content": parts[0]["text"]})
            else:
                out.append({"role": "user", "content": parts})
        elif not results:
            out.append({"role": "user", "content": ""})
    return out


def _system(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        return {"role": "system", "content": raw} if raw else None
    _need(isinstance(raw, list), "system: a string or a list of text blocks")
    texts: list[str] = []
    for i, block in enumerate(raw):
        at = f"system[{i}]"
        _need(
            isinstance(block, dict) and block.get("type") == "text",
            f"{at}: the system prompt holds text blocks only",
        )
        texts.append(_text_of(block, at))
    if not texts:
        return None
    if len(texts) == 1:
        return {"role": "system", "content": texts[0]}
    return {"role": "system", "content": [{"type": "text", "text": t} for t in texts]}


def _tools(raw: Any) -> list[dict[str, Any]]:
    _need(isinstance(raw, list), "tools: expected a list")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(raw):
        at = f"tools[{i}]"
        _need(isinstance(tool, dict), f"{at}: a tool is an object")
        ttype = tool.get("type")
        _need(
            ttype in (None, "custom"),
            f"{at}: tool type {ttype!r} is not supported (only custom tools with input_schema)",
        )
        name, schema = tool.get("name"), tool.get("input_schema")
        _need(isinstance(name, str) and bool(name), f"{at}: a tool needs a name")
        _need(isinstance(schema, dict), f"{at}: a tool needs an input_schema object")
        fn: dict[str, Any] = {"name": name}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        fn["parameters"] = schema
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(raw: Any, out: dict[str, Any]) -> None:
    _need(isinstance(raw, dict), "tool_choice: expected an object with a type")
    ctype = raw.get("type")
    if ctype == "auto":
        out["tool_choice"] = "auto"
    elif ctype == "any":
        out["tool_choice"] = "required"
    elif ctype == "none":
        out["tool_choice"] = "none"
    elif ctype == "tool":
        name = raw.get("name")
        _need(isinstance(name, str) and bool(name), "tool_choice: type tool needs a name")
        out["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        raise ValueError(f"tool_choice.type: {ctype!r} is not auto, any, tool or none")
    if raw.get("disable_parallel_tool_use") is True and ctype != "none":
        out["parallel_tool_calls"] = False


def _number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    _need(
        isinstance(value, int | float) and not isinstance(value, bool),
        f"{key}: expected a number",
    )
    assert isinstance(value, int | float)
    return value


def messages_to_chat(body: Any) -> dict[str, Any]:
    """An Anthropic Messages request → the canonical chat request. ``ValueError`` (with the
    field at fault) for a request Anthropic would refuse, or one this gateway cannot carry."""
    _need(isinstance(body, dict), "the request body is a JSON object")
    model = body.get("model")
    _need(isinstance(model, str) and bool(model), "model: required (a string)")
    max_tokens = body.get("max_tokens")
    _need(
        isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 0,
        "max_tokens: required (an integer >= 0)",
    )
    messages = _messages(body.get("messages"))
    system = _system(body.get("system"))
    out: dict[str, Any] = {
        "model": model,
        "messages": [system, *messages] if system else messages,
        "max_tokens": max_tokens,
    }
    if body.get("tools") is not None:
        tools = _tools(body["tools"])
        if tools:
            out["tools"] = tools
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], out)
    stops = body.get("stop_sequences")
    if stops is not None:
        _need(
            isinstance(stops, list) and all(isinstance(s, str) for s in stops),
            "stop_sequences: expected a list of strings",
        )
        if stops:
            out["stop"] = stops
    for key in ("temperature", "top_p"):
        value = _number(body, key)
        if value is not None:
            out[key] = value
    metadata = body.get("metadata")
    if metadata is not None:
        _need(isinstance(metadata, dict), "metadata: expected an object")
        user = metadata.get("user_id")
        if isinstance(user, str) and user:
            out["user"] = user
    config = body.get("output_config")
    if isinstance(config, dict) and isinstance(config.get("format"), dict):
        fmt = config["format"]
        _need(
            fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict),
            "output_config.format: expected {type: json_schema, schema}",
        )
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True},
        }
    stream = body.get("stream")
    _need(stream is None or isinstance(stream, bool), "stream: expected a boolean")
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


# ---------------------------------------------------------------------------------------------
# response: canonical → Anthropic


def _message_id(raw: Any) -> str:
    if isinstance(raw, str) and raw:
        if raw.startswith("msg_"):
            return raw
        return "msg_" + raw.removeprefix("chatcmpl-")
    return "msg_" + os.urandom(12).hex()


def _tool_input(arguments: Any) -> dict[str, Any]:
    """Anthropic's ``input`` is an object: the parsed arguments; arguments that are not a JSON
    object are kept as a string under ``_raw_arguments`` rather than lost."""
    if isinstance(arguments, dict):
        return arguments
    if not arguments:
        return {}
    try:
        parsed = orjson.loads(arguments)
    except (orjson.JSONDecodeError, TypeError):
        return {"_raw_arguments": arguments}
    return parsed if isinstance(parsed, dict) else {"_raw_arguments": arguments}


def _usage(raw: Any) -> dict[str, int]:
    if not isinstance(raw, dict):
        return {"input_tokens": 0, "output_tokens": 0}
    raw_prompt = raw.get("prompt_tokens")
    prompt = raw_prompt if isinstance(raw_prompt, int) else 0
    completion = raw.get("completion_tokens")
    out: dict[str, int] = {
        "input_tokens": prompt,
        "output_tokens": completion if isinstance(completion, int) else 0,
    }
    details = raw.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if isinstance(cached, int) and 0 < cached <= prompt:
        out["input_tokens"] = prompt - cached
        out["cache_read_input_tokens"] = cached
    return out


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def chat_to_message(resp: dict[str, Any]) -> dict[str, Any]:
    """A canonical ``chat.completion`` → an Anthropic ``Message``."""
    choices = resp.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    message = choice.get("message") if isinstance(choice, dict) else None
    message = message if isinstance(message, dict) else {}
    content: list[dict[str, Any]] = []
    text = _content_text(message.get("content"))
    if not text and isinstance(message.get("refusal"), str):
        text = message["refusal"]
    if text:
        content.append({"type": "text", "text": text})
    for i, call in enumerate(message.get("tool_calls") or ()):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            continue
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{os.urandom(8).hex()}{i}",
                "name": fn.get("name") or "",
                "input": _tool_input(fn.get("arguments")),
            }
        )
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    stop = STOP_REASONS.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"
    if stop == "end_turn" and any(b["type"] == "tool_use" for b in content):
        # some providers say "stop" after tool calls: Anthropic clients run tools on tool_use
        stop = "tool_use"
    return {
        "id": _message_id(resp.get("id")),
        "type": "message",
        "role": "assistant",
        "model": resp.get("model") or "",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": _usage(resp.get("usage")),
    }


# ---------------------------------------------------------------------------------------------
# stream: canonical chunks → Anthropic SSE


def _event(name: bytes, payload: dict[str, Any]) -> bytes:
    return sse_event(orjson.dumps(payload), name)


class MessagesStreamWriter:
    """Canonical ``chat.completion.chunk`` dicts → Anthropic's SSE events, in the order the
    anthropic SDK's accumulator expects: ``message_start``; per content block
    ``content_block_start`` / ``content_block_delta``... / ``content_block_stop`` (text blocks
    with ``text_delta``, tool_use blocks with ``input_json_delta``); ``message_delta`` with the
    stop reason and output tokens; ``message_stop``.

    ``message_start`` is written by :meth:`start`, or by the first :meth:`chunk`/:meth:`finish`
    that needs it (with the first chunk's model when that came first). ``input_tokens`` (an
    estimate known before the answer, if any) goes into ``message_start``; the final counts
    go into ``message_delta``.
    """

    __slots__ = (
        "_block",
        "_finish",
        "_id",
        "_input_tokens",
        "_model",
        "_next",
        "_started",
        "_tools",
        "_usage",
    )

    def __init__(
        self, model: str = "", *, message_id: str | None = None, input_tokens: int = 0
    ) -> None:
        self._model = model
        self._id = _message_id(message_id)
        self._input_tokens = input_tokens
        self._started = False
        self._block: int | None = None  # the open content block's index
        self._next = 0  # the next content block index
        self._tools: dict[int, int] = {}  # canonical tool call index → content block index
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None

    def start(self, model: str | None = None) -> bytes:
        """``message_start`` (once; later calls return nothing)."""
        if self._started:
            return b""
        self._started = True
        if model:
            self._model = model
        message: dict[str, Any] = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": self._model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self._input_tokens, "output_tokens": 0},
        }
        return _event(b"message_start", {"type": "message_start", "message": message})

    def ping(self) -> bytes:
        return _event(b"ping", {"type": "ping"})

    def _close_block(self, out: list[bytes]) -> None:
        if self._block is not None:
            out.append(
                _event(b"content_block_stop", {"type": "content_block_stop", "index": self._block})
            )
            self._block = None

    def _open(self, block: dict[str, Any], out: list[bytes]) -> int:
        self._close_block(out)
        index = self._next
        self._next += 1
        self._block = index
        out.append(
            _event(
                b"content_block_start",
                {"type": "content_block_start", "index": index, "content_block": block},
            )
        )
        return index

    def chunk(self, c: dict[str, Any]) -> bytes:
        out: list[bytes] = []
        if not self._started:
            model = c.get("model")
            out.append(self.start(model if isinstance(model, str) else None))
        usage = c.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        choices = c.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return b"".join(out)
        choice = choices[0]
        if isinstance(choice.get("finish_reason"), str):
            self._finish = choice["finish_reason"]
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return b"".join(out)
        text = delta.get("content")
        if isinstance(text, str) and text:
            if self._block is None or self._block in self._tools.values():
                self._open({"type": "text", "text": ""}, out)
            out.append(
                _event(
                    b"content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": self._block,
                        "delta": {"type": "text_delta", "text": text},
                    },
                )
            )
        for call in delta.get("tool_calls") or ():
            if not isinstance(call, dict):
                continue
            tindex = call.get("index", 0)
            fn = call.get("function")
            fn = fn if isinstance(fn, dict) else {}
            bindex = self._tools.get(tindex)
            if bindex is None:
                tid = call.get("id")
                block: dict[str, Any] = {
                    "type": "tool_use",
                    "id": tid if isinstance(tid, str) and tid else "toolu_" + os.urandom(12).hex(),
                    "name": fn.get("name") or "",
                    "input": {},
                }
                bindex = self._open(block, out)
                self._tools[tindex] = bindex
            args = fn.get("arguments")
            if isinstance(args, str) and args:
                out.append(
                    _event(
                        b"content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": bindex,
                            "delta": {"type": "input_json_delta", "partial_json": args},
                        },
                    )
                )
        return b"".join(out)

    def finish(
        self, finish_reason: str | None = None, usage: dict[str, Any] | None = None
    ) -> bytes:
        """Closes the open block, then ``message_delta`` (stop reason, usage) and
        ``message_stop``."""
        out: list[bytes] = []
        if not self._started:
            out.append(self.start())
        self._close_block(out)
        reason = finish_reason or self._finish
        counts = _usage(usage if usage is not None else self._usage)
        stop = STOP_REASONS.get(reason, "end_turn") if reason else "end_turn"
        if stop == "end_turn" and self._tools:
            # some providers say "stop" after tool calls: Anthropic clients run tools on tool_use
            stop = "tool_use"
        delta_usage: dict[str, int] = {"output_tokens": counts["output_tokens"]}
        if usage is not None or self._usage is not None:
            delta_usage["input_tokens"] = counts["input_tokens"]
            if "cache_read_input_tokens" in counts:
                delta_usage["cache_read_input_tokens"] = counts["cache_read_input_tokens"]
        out.append(
            _event(
                b"message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": delta_usage,
                },
            )
        )
        out.append(_event(b"message_stop", {"type": "message_stop"}))
        return b"".join(out)

    def error(self, kind_type: str, message: str) -> bytes:
        """An ``error`` event in Anthropic's shape (the stream ends after it)."""
        return sse_event(anthropic_error_body(kind_type, message), b"error")
