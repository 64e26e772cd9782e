"""A fake OpenAI API: Chat Completions (whole and SSE), embeddings, models, and OpenAI's errors.

Wire format as OpenAI documents it: ``chat.completion`` bodies, ``chat.completion.chunk`` SSE
events ending with ``data: [DONE]``, a usage-only last chunk (``choices: []``) only when the
request set ``stream_options.include_usage`` (and then ``"usage": null`` on every other chunk),
streamed tool calls as ``index``/``id``/``type``/``function.name`` then argument pieces, errors as
``{"error": {"message", "type", "param", "code"}}`` and the ``x-ratelimit-*`` headers.
"""

from __future__ import annotations

import base64
import struct
import time
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

__all__ = ["FakeOpenAI"]


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1s``, ``6m0s``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:g}s"
    return f"{int(seconds // 60)}m{seconds % 60:g}s"


def _sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


class FakeOpenAI(FakeServer):
    name = "openai"
    base_path = "/v1"
    default_models = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")

    # -- routing -------------------------------------------------------------------------------

    def route(self, seen: Seen) -> Call | Rendered:
        auth = seen.headers.get("authorization", "")
        if self.keys:
            key = auth[7:] if auth.lower().startswith("bearer ") else ""
            if key not in self.keys:
                if not key:
                    msg = (
                        "You didn't provide an API key. You need to provide your API key in an "
                        "Authorization header using Bearer auth (i.e. Authorization: Bearer "
                        "YOUR_KEY), or as the password field (with blank username) if you're "
                        "accessing the API from your browser and are prompted for a username "
                        "and password. You can obtain an API key from "
                        "https://platform.openai.com/account/api-keys."
                    )
                    code = None
                else:
                    msg = (
                        f"Incorrect API key provided: {_redact(key)}. You can find your API key "
                        "at https://platform.openai.com/account/api-keys."
                    )
                    code = "invalid_api_key"
                return self._error_rendered(401, msg, "invalid_request_error", None, code)
        method, path = seen.method, seen.path
        if method == "POST" and path == "/v1/chat/completions":
            body = seen.json
            if not isinstance(body, dict):
                return self._bad_json()
            if not body.get("model"):
                return self._error_rendered(
                    400, "you must provide a model parameter", "invalid_request_error", None, None
                )
            if not isinstance(body.get("messages"), list) or not body["messages"]:
                return self._error_rendered(
                    400,
                    "Missing required parameter: 'messages'.",
                    "invalid_request_error",
                    "messages",
                    "missing_required_parameter",
                )
            return Call(seen, "chat", stream=bool(body.get("stream")), model=str(body["model"]))
        if method == "POST" and path == "/v1/embeddings":
            body = seen.json
            if not isinstance(body, dict):
                return self._bad_json()
            if not body.get("model") or "input" not in body:
                return self._error_rendered(
                    400,
                    "Missing required parameter: 'input'.",
                    "invalid_request_error",
                    "input",
                    "missing_required_parameter",
                )
            return Call(seen, "embed", model=str(body["model"]))
        if method == "GET" and path == "/v1/models":
            return Call(seen, "models")
        if method == "GET" and path.startswith("/v1/models/"):
            return Call(seen, "model", model=path.removeprefix("/v1/models/"))
        return self._error_rendered(
            404, f"Invalid URL ({method} {path})", "invalid_request_error", None, None
        )

    def _bad_json(self) -> Rendered:
        return self._error_rendered(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
            "but what was sent was not valid JSON. If you have trouble figuring out how to fix "
            "this, please contact us through our help center at help.openai.com.)",
            "invalid_request_error",
            None,
            None,
        )

    def _ratelimit_headers(
        self, remaining: int = 9999, reset: float = 0.006
    ) -> list[tuple[str, str]]:
        return [
            ("x-request-id", f"req_fake{self.next_id():08d}"),
            ("openai-processing-ms", "1"),
            ("x-ratelimit-limit-requests", "10000"),
            ("x-ratelimit-limit-tokens", "10000000"),
            ("x-ratelimit-remaining-requests", str(remaining)),
            ("x-ratelimit-remaining-tokens", "9999990" if remaining else "0"),
            ("x-ratelimit-reset-requests", _duration(reset)),
            ("x-ratelimit-reset-tokens", _duration(reset)),
        ]

    def _error_rendered(
        self,
        status: int,
        message: str,
        type_: str,
        param: str | None,
        code: str | None,
        headers: list[tuple[str, str]] | None = None,
    ) -> Rendered:
        body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        return Rendered(
            status=status,
            headers=headers if headers is not None else self._ratelimit_headers(),
            body=dumps(body),
        )

    # -- answers -------------------------------------------------------------------------------

    def render_answer(self, call: Call, answer: Answer) -> Rendered:
        if call.op == "chat":
            return self._chat(call, answer)
        if call.op == "embed":
            return self._embed(call, answer)
        created = 1_700_000_000
        if call.op == "model":
            obj = {"id": call.model, "object": "model", "created": created, "owned_by": "system"}
            return Rendered(headers=self._ratelimit_headers(), body=dumps(obj))
        data = [
            {"id": m, "object": "model", "created": created, "owned_by": "system"}
            for m in self.models
        ]
        return Rendered(
            headers=self._ratelimit_headers(), body=dumps({"object": "list", "data": data})
        )

    def _usage(self, answer: Answer) -> dict[str, Any]:
        return {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def _tool_calls(self, answer: Answer) -> list[dict[str, Any]]:
        out = []
        for tc in answer.tool_calls or []:
            args = tc.get("arguments", {})
            out.append(
                {
                    "id": tc.get("id") or f"call_fake{self.next_id():06d}",
                    "type": "function",
                    "function": {
                        "name": tc["name"],
                        "arguments": args if isinstance(args, str) else dumps(args).decode(),
                    },
                }
            )
        return out

    def _chat(self, call: Call, answer: Answer) -> Rendered:
        body = call.seen.json
        rf = body.get("response_format") or {}
        json_mode = isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema")
        text = self.answer_text(call, answer, json_mode)
        tool_calls = self._tool_calls(answer)
        finish = answer.finish or ("tool_calls" if tool_calls else "stop")
        model = answer.model or call.model
        cid = f"chatcmpl-fake{self.next_id():08d}"
        created = int(time.time())
        headers = self._ratelimit_headers()
        if not call.stream:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": text if (text or not tool_calls) else None,
                "refusal": None,
                "annotations": [],
            }
            if tool_calls:
                message["tool_calls"] = tool_calls
            resp: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
                ],
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
            }
            if answer.usage:
                resp["usage"] = self._usage(answer)
            return Rendered(headers=headers, body=dumps(resp))

        opts = body.get("stream_options") or {}
        include_usage = bool(isinstance(opts, dict) and opts.get("include_usage")) and answer.usage

        def ev(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            c: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                ],
            }
            if include_usage:
                c["usage"] = None
            return _sse(c)

        events = [
            ev(
                {
                    "role": "assistant",
                    "content": "" if (text or not tool_calls) else None,
                    "refusal": None,
                }
            )
        ]
        events += [ev({"content": piece}) for piece in split_pieces(text, answer.pieces)]
        for i, tc in enumerate(tool_calls):
            fn = tc["function"]
            events.append(
                ev(
                    {
                        "tool_calls": [
                            {
                                "index": i,
                                "id": tc["id"],
                                "type": "function",
                                "function": {"name": fn["name"], "arguments": ""},
                            }
                        ]
                    }
                )
            )
            events += [
                ev({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
                for piece in split_pieces(fn["arguments"], answer.pieces)
            ]
        events.append(ev({}, finish))
        if include_usage:
            events.append(
                _sse(
                    {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "service_tier": "default",
                        "system_fingerprint": "fp_fake",
                        "choices": [],
                        "usage": self._usage(answer),
                    }
                )
            )
        return Rendered(
            headers=headers,
            content_type="text/event-stream; charset=utf-8",
            events=events,
            end=[b"data: [DONE]\n\n"],
        )

    def _embed(self, call: Call, answer: Answer) -> Rendered:
        body = call.seen.json
        inputs = body["input"]
        if isinstance(inputs, str) or (
            isinstance(inputs, list) and inputs and isinstance(inputs[0], int)
        ):
            inputs = [inputs]
        dims = body.get("dimensions") or answer.embedding_dims
        b64 = body.get("encoding_format") == "base64"
        data = []
        for i, item in enumerate(inputs):
            vec = fake_vector(str(item), int(dims))
            emb: Any = vec
            if b64:
                emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        resp: dict[str, Any] = {
            "object": "list",
            "data": data,
            "model": answer.model or call.model,
        }
        if answer.usage:
            resp["usage"] = {
                "prompt_tokens": answer.prompt_tokens,
                "total_tokens": answer.prompt_tokens,
            }
        return Rendered(headers=self._ratelimit_headers(), body=dumps(resp))

    # -- errors --------------------------------------------------------------------------------

    def render_error(self, call: Call, error: Error) -> Rendered:
        kind = error.resolved_kind()
        model = call.model or "gpt-4o-mini"
        status, message, type_, param, code = {
            "rate_limited": (
                429,
                f"Rate limit reached for {model} in organization org-fake on requests per min "
                "(RPM): Limit 3, Used 3, Requested 1. Please try again in 20s. Visit "
                "https://platform.openai.com/account/rate-limits to learn more.",
                "requests",
                None,
                "rate_limit_exceeded",
            ),
            "server": (
                500,
                "The server had an error while processing your request. Sorry about that!",
                "server_error",
                None,
                None,
            ),
            "overloaded": (
                503,
                "The engine is currently overloaded, please try again later.",
                "server_error",
                None,
                None,
            ),
            "context_length": (
                400,
                "This model's maximum context length is 128000 tokens. However, your messages "
                "resulted in 130412 tokens. Please reduce the length of the messages.",
                "invalid_request_error",
                "messages",
                "context_length_exceeded",
            ),
            "content_policy": (
                400,
                "Your request was rejected as a result of our safety system. Your request may "
                "contain content that is not allowed by our safety system.",
                "invalid_request_error",
                None,
                "content_policy_violation",
            ),
            "unauthorized": (
                401,
                "Incorrect API key provided: sk-fake***********1234. You can find your API key "
                "at https://platform.openai.com/account/api-keys.",
                "invalid_request_error",
                None,
                "invalid_api_key",
            ),
            "not_found": (
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                "invalid_request_error",
                None,
                "model_not_found",
            ),
        }.get(kind, (400, "Invalid request.", "invalid_request_error", None, None))
        status = error.status or status
        if error.retry_after is not None or kind == "rate_limited":
            reset = error.retry_after if error.retry_after is not None else 20.0
            headers = self._ratelimit_headers(remaining=0, reset=reset)
        else:
            headers = self._ratelimit_headers()
        if error.retry_after is not None:
            headers.append(("retry-after", f"{error.retry_after:g}"))
            headers.append(("retry-after-ms", str(round(error.retry_after * 1000))))
        headers += list(error.headers.items())
        if error.body is None:
            body = dumps(
                {
                    "error": {
                        "message": error.message or message,
                        "type": type_,
                        "param": param,
                        "code": error.code or code,
                    }
                }
            )
        else:
            body = _raw(error.body)
        return Rendered(status=status, headers=headers, body=body)

    def stream_error_event(self, call: Call, error: StreamError) -> bytes:
        kind = error.kind or "server"
        message = error.message or (
            "The server had an error while processing your request. Sorry about that!"
            if kind in ("server", "overloaded")
            else "An error occurred during streaming."
        )
        type_ = "server_error" if kind in ("server", "overloaded") else "invalid_request_error"
        return _sse(
            {"error": {"message": message, "type": type_, "param": None, "code": error.code}}
        )

    def garbled_event(self, call: Call) -> bytes:
        return (
            b'data: {"id": "chatcmpl-garbled", "object": "chat.completion.chunk", "choices": [{\n\n'
        )


def _redact(key: str) -> str:
    return key[:3] + "*" * max(0, len(key) - 7) + key[-4:] if len(key) > 8 else "*" * len(key)


def _raw(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return dumps(body)
