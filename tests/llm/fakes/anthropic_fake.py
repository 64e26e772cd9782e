"""A fake Anthropic Messages API: ``POST /v1/messages`` whole and streamed, with Anthropic's checks
(``x-api-key``, ``anthropic-version``, ``max_tokens``, no ``system`` role in ``messages``), its
error body ``{"type": "error", "error": {"type", "message"}, "request_id"}``, 529
``overloaded_error``, ``retry-after`` and the ``anthropic-ratelimit-*`` headers.

A stream has every event type in the documented order: ``message_start``,
``content_block_start``, ``ping``, ``content_block_delta`` (``text_delta``; ``input_json_delta``
for tool use, starting with an empty ``partial_json``), ``content_block_stop``,
``message_delta`` (``stop_reason``, ``usage.output_tokens``), ``message_stop``.
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
    split_pieces,
)

__all__ = ["FakeAnthropic"]

_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}


def _event(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + dumps(obj) + b"\n\n"


def _rfc3339(seconds_from_now: float) -> str:
    t = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds_from_now)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeAnthropic(FakeServer):
    name = "anthropic"
    base_path = ""
    default_models = ("claude-sonnet-4-5", "claude-haiku-4-5")

    # -- routing -------------------------------------------------------------------------------

    def route(self, seen: Seen) -> Call | Rendered:
        if self.keys:
            # the API key goes in x-api-key; the current SDKs send it as a Bearer token
            key = seen.headers.get("x-api-key")
            auth = seen.headers.get("authorization", "")
            if key is None and auth.lower().startswith("bearer "):
                key = auth[7:]
            if key is None:
                return self._err(401, "authentication_error", "x-api-key header is required")
            if key not in self.keys:
                return self._err(401, "authentication_error", "invalid x-api-key")
        if seen.method == "GET" and seen.path == "/v1/models":
            return Call(seen, "models")
        if "anthropic-version" not in seen.headers:
            return self._err(400, "invalid_request_error", "anthropic-version: header is required")
        if seen.method == "POST" and seen.path in ("/v1/messages", "/v1/messages/count_tokens"):
            body = seen.json
            if not isinstance(body, dict):
                return self._err(
                    400, "invalid_request_error", "There was an error parsing the body"
                )
            problem = self._check(body, count=seen.path.endswith("count_tokens"))
            if problem:
                return self._err(400, "invalid_request_error", problem)
            op = "count" if seen.path.endswith("count_tokens") else "chat"
            return Call(seen, op, stream=bool(body.get("stream")), model=str(body["model"]))
        return self._err(404, "not_found_error", "Not Found")

    @staticmethod
    def _check(body: dict[str, Any], count: bool) -> str | None:
        if not isinstance(body.get("model"), str):
            return "model: Field required"
        if not count and not isinstance(body.get("max_tokens"), int):
            return "max_tokens: Field required"
        messages = body.get("messages")
        if not isinstance(messages, list):
            return "messages: Field required"
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            if role == "system":
                return (
                    'messages: Unexpected role "system". The Messages API accepts a top-level '
                    '`system` parameter, not "system" as an input message role.'
                )
            if role not in ("user", "assistant"):
                return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        return None

    def _headers(
        self, remaining: int = 49, reset: float = 1.0, retry_after: float | None = None
    ) -> list[tuple[str, str]]:
        at = _rfc3339(reset)
        headers = [
            ("request-id", f"req_fake{self.next_id():016d}"),
            ("anthropic-organization-id", "00000000-0000-0000-0000-000000000000"),
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", str(remaining)),
            ("anthropic-ratelimit-requests-reset", at),
            ("anthropic-ratelimit-tokens-limit", "100000"),
            ("anthropic-ratelimit-tokens-remaining", "99000" if remaining else "0"),
            ("anthropic-ratelimit-tokens-reset", at),
            ("anthropic-ratelimit-input-tokens-limit", "80000"),
            ("anthropic-ratelimit-input-tokens-remaining", "79000" if remaining else "0"),
            ("anthropic-ratelimit-input-tokens-reset", at),
            ("anthropic-ratelimit-output-tokens-limit", "20000"),
            ("anthropic-ratelimit-output-tokens-remaining", "19000" if remaining else "0"),
            ("anthropic-ratelimit-output-tokens-reset", at),
        ]
        if retry_after is not None:
            headers.append(("retry-after", f"{retry_after:g}"))
        return headers

    def _err(
        self,
        status: int,
        type_: str,
        message: str,
        headers: list[tuple[str, str]] | None = None,
        body: bytes | None = None,
    ) -> Rendered:
        rid = f"req_fake{self.next_id():016d}"
        if body is None:
            body = dumps(
                {
                    "type": "error",
                    "error": {"type": type_, "message": message},
                    "request_id": rid,
                }
            )
        return Rendered(
            status=status,
            headers=headers if headers is not None else [("request-id", rid)],
            body=body,
        )

    # -- answers -------------------------------------------------------------------------------

    def render_answer(self, call: Call, answer: Answer) -> Rendered:
        if call.op == "models":
            data = [
                {
                    "type": "model",
                    "id": m,
                    "display_name": m,
                    "created_at": "2025-01-01T00:00:00Z",
                }
                for m in self.models
            ]
            body = {
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
            return Rendered(headers=self._headers(), body=dumps(body))
        if call.op == "count":
            return Rendered(
                headers=self._headers(), body=dumps({"input_tokens": answer.prompt_tokens})
            )
        return self._message(call, answer)

    def _message(self, call: Call, answer: Answer) -> Rendered:
        text = self.answer_text(call, answer)
        tools = [
            {
                "type": "tool_use",
                "id": tc.get("id") or f"toolu_fake{self.next_id():014d}",
                "name": tc["name"],
                "input": tc.get("arguments", {}),
            }
            for tc in answer.tool_calls or []
        ]
        canonical = answer.finish or ("tool_calls" if tools else "stop")
        stop_reason = _STOP.get(canonical, canonical)
        model = answer.model or call.model
        mid = f"msg_fake{self.next_id():016d}"
        blocks: list[dict[str, Any]] = []
        if text or not tools:
            blocks.append({"type": "text", "text": text})
        blocks += tools
        usage_full = {
            "input_tokens": answer.prompt_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": answer.completion_tokens,
            "service_tier": "standard",
        }
        if not call.stream:
            msg: dict[str, Any] = {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": blocks,
                "stop_reason": stop_reason,
                "stop_sequence": None,
            }
            if answer.usage:
                msg["usage"] = usage_full
            return Rendered(headers=self._headers(), body=dumps(msg))

        start: dict[str, Any] = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
        }
        if answer.usage:
            start["usage"] = {**usage_full, "output_tokens": 1}
        events = [_event("message_start", {"type": "message_start", "message": start})]
        ping = _event("ping", {"type": "ping"})
        for index, block in enumerate(blocks):
            if block["type"] == "text":
                first: dict[str, Any] = {"type": "text", "text": ""}
                deltas = [
                    {"type": "text_delta", "text": piece}
                    for piece in split_pieces(block["text"], answer.pieces)
                ]
            else:
                first = {**block, "input": {}}
                args = dumps(block["input"]).decode()
                deltas = [
                    {"type": "input_json_delta", "partial_json": piece}
                    for piece in ["", *split_pieces(args, answer.pieces)]
                ]
            events.append(
                _event(
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": first},
                )
            )
            if index == 0:
                events.append(ping)
            events += [
                _event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": d},
                )
                for d in deltas
            ]
            events.append(
                _event("content_block_stop", {"type": "content_block_stop", "index": index})
            )
        delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
        }
        if answer.usage:
            delta["usage"] = {"output_tokens": answer.completion_tokens}
        events.append(_event("message_delta", delta))
        return Rendered(
            headers=self._headers(),
            content_type="text/event-stream; charset=utf-8",
            events=events,
            end=[_event("message_stop", {"type": "message_stop"})],
        )

    # -- errors --------------------------------------------------------------------------------

    _KINDS: dict[str, tuple[int, str, str]] = {
        "rate_limited": (
            429,
            "rate_limit_error",
            "This request would exceed the rate limit for your organization "
            "(00000000-0000-0000-0000-000000000000) of 50 requests per minute. For details, "
            "refer to: https://docs.claude.com/en/api/rate-limits. You can see the response "
            "headers for current usage. Please reduce the prompt length or the maximum tokens "
            "requested, or try again later. You may also contact sales at "
            "https://www.anthropic.com/contact-sales to discuss your options for a rate limit "
            "increase.",
        ),
        "server": (500, "api_error", "Internal server error"),
        "overloaded": (529, "overloaded_error", "Overloaded"),
        "context_length": (
            400,
            "invalid_request_error",
            "prompt is too long: 208310 tokens > 200000 maximum",
        ),
        "content_policy": (
            400,
            "invalid_request_error",
            "Output blocked by content filtering policy",
        ),
        "unauthorized": (401, "authentication_error", "invalid x-api-key"),
        "not_found": (404, "not_found_error", "model: {model}"),
        "bad_request": (400, "invalid_request_error", "Invalid request"),
    }

    def render_error(self, call: Call, error: Error) -> Rendered:
        kind = error.resolved_kind()
        status, type_, message = self._KINDS.get(kind, self._KINDS["bad_request"])
        status = error.status or status
        if status == 403:
            type_ = "permission_error"
            message = "Your API key does not have permission to use the specified resource."
        elif status == 413:
            type_, message = "request_too_large", "Request exceeds the maximum allowed size."
        message = error.message or message.replace("{model}", call.model)
        if kind == "rate_limited":
            reset = error.retry_after if error.retry_after is not None else 60.0
            headers = self._headers(remaining=0, reset=reset, retry_after=error.retry_after)
        else:
            headers = self._headers(retry_after=error.retry_after)
        headers += list(error.headers.items())
        body = None if error.body is None else _raw(error.body)
        return self._err(status, error.code or type_, message, headers=headers, body=body)

    def stream_error_event(self, call: Call, error: StreamError) -> bytes:
        kind = error.kind or "overloaded"
        _, type_, message = self._KINDS.get(kind, self._KINDS["server"])
        return _event(
            "error",
            {
                "type": "error",
                "error": {"type": error.code or type_, "message": error.message or message},
            },
        )

    def garbled_event(self, call: Call) -> bytes:
        return (
            b"event: content_block_delta\n"
            b'data: {"type": "content_block_delta", "index": 0, "delta": {\n\n'
        )


def _raw(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return dumps(body)
