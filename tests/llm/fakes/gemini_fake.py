"""A fake Gemini API (Generative Language, ``v1beta``; ``v1`` answers the same).

``POST /v1beta/models/{model}:generateContent`` → a ``GenerateContentResponse``;
``:streamGenerateContent?alt=sse`` → SSE (``data: {...}`` + CRLF CRLF, no ``[DONE]``) of
``GenerateContentResponse`` chunks, every one with ``usageMetadata`` (prompt counts only), the
last with ``finishReason`` and the full ``usageMetadata``; without ``alt=sse`` a streamed JSON
array, as Google does. ``:embedContent``, ``:batchEmbedContents``, ``GET /v1beta/models``.
The key in ``x-goog-api-key`` or ``?key=``. Errors ``{"error": {"code", "message", "status",
"details"}}`` with a ``google.rpc.RetryInfo`` ``retryDelay`` for a 429 given ``retry_after``.
Tool calls are ``functionCall`` parts; ``content_policy()`` is a 200 with
``promptFeedback.blockReason`` and no candidates, as Gemini blocks a prompt.
Checks as Google's JSON parser does: unknown top-level fields (``messages``...), roles other
than ``user``/``model``, missing ``contents``.
"""

from __future__ import annotations

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

__all__ = ["FakeGemini"]

_FINISH = {"stop": "STOP", "length": "MAX_TOKENS", "tool_calls": "STOP", "content_filter": "SAFETY"}

_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

_FIELDS = {
    "contents",
    "tools",
    "toolConfig",
    "safetySettings",
    "systemInstruction",
    "generationConfig",
    "cachedContent",
    "labels",
    "tool_config",
    "safety_settings",
    "system_instruction",
    "generation_config",
    "cached_content",
}

_METHODS = ("generateContent", "streamGenerateContent", "embedContent", "batchEmbedContents")


def _duration(seconds: float) -> str:
    """A protobuf Duration in JSON: ``12s``, ``0.250s``."""
    return f"{int(seconds)}s" if seconds == int(seconds) else f"{seconds:.3f}s"


def _raw(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return dumps(body)


class FakeGemini(FakeServer):
    name = "gemini"
    base_path = ""
    default_models = ("gemini-2.5-flash", "gemini-2.5-pro", "text-embedding-004")

    _HEADERS = [("vary", "Origin, X-Origin, Referer"), ("server", "scaffolding on HTTPServer2")]

    # -- routing -------------------------------------------------------------------------------

    def route(self, seen: Seen) -> Call | Rendered:
        if self.keys:
            key = seen.headers.get("x-goog-api-key") or seen.query.get("key")
            if not key:
                return self._err(
                    403,
                    "Method doesn't allow unregistered callers (callers without established "
                    "identity). Please use API Key or other form of API consumer identity to "
                    "call this API.",
                )
            if key not in self.keys:
                return self._bad_key()
        path = seen.path
        version, _, rest = path.lstrip("/").partition("/")
        if version not in ("v1beta", "v1") or not rest.startswith("models"):
            return self._err(404, f"Method not found: {seen.method} {path}")
        if seen.method == "GET" and rest == "models":
            return Call(seen, "models")
        name, _, method = rest.removeprefix("models/").partition(":")
        if seen.method == "GET" and not method:
            return Call(seen, "model", model=name)
        if seen.method != "POST" or method not in _METHODS:
            return self._err(404, f"Method not found: {seen.method} {path}")
        body = seen.json
        if not isinstance(body, dict):
            return self._err(400, "Invalid JSON payload received.")
        if method in ("generateContent", "streamGenerateContent"):
            problem = self._check(body)
            if problem:
                return self._err(400, problem)
            return Call(
                seen,
                "chat",
                stream=method == "streamGenerateContent",
                model=name,
                extra={"sse": seen.query.get("alt") == "sse"},
            )
        if method == "batchEmbedContents" and not isinstance(body.get("requests"), list):
            return self._err(400, "* BatchEmbedContentsRequest.requests: requests is required\n")
        if method == "embedContent" and not isinstance(body.get("content"), dict):
            return self._err(400, "* EmbedContentRequest.content: content is not specified\n")
        return Call(seen, method, model=name)

    @staticmethod
    def _check(body: dict[str, Any]) -> str | None:
        for key in body:
            if key not in _FIELDS:
                return f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.'
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            return "* GenerateContentRequest.contents: contents is not specified\n"
        for c in contents:
            if not isinstance(c, dict) or c.get("role", "user") not in (
                "user",
                "model",
                "function",
            ):
                return "Please use a valid role: user, model."
            if not c.get("parts"):
                return (
                    "* GenerateContentRequest.contents.parts: contents.parts must not be empty.\n"
                )
        return None

    def _err(
        self,
        code: int,
        message: str,
        status: str | None = None,
        details: list[dict[str, Any]] | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> Rendered:
        err: dict[str, Any] = {
            "code": code,
            "message": message,
            "status": status or _STATUS.get(code, "UNKNOWN"),
        }
        if details:
            err["details"] = details
        return Rendered(
            status=code,
            headers=[*self._HEADERS, *(headers or [])],
            content_type="application/json; charset=UTF-8",
            body=dumps({"error": err}),
        )

    def _bad_key(self, headers: list[tuple[str, str]] | None = None) -> Rendered:
        message = "API key not valid. Please pass a valid API key."
        return self._err(
            400,
            message,
            details=[
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                },
                {
                    "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
                    "locale": "en-US",
                    "message": message,
                },
            ],
            headers=headers,
        )

    # -- answers -------------------------------------------------------------------------------

    def _whole(self, obj: Any) -> Rendered:
        return Rendered(
            headers=list(self._HEADERS),
            content_type="application/json; charset=UTF-8",
            body=dumps(obj),
        )

    def _stream(self, call: Call, chunks: list[Any], last: list[Any]) -> Rendered:
        if call.extra.get("sse"):
            frame = [b"data: " + dumps(c) + b"\r\n\r\n" for c in [*chunks, *last]]
            content_type = "text/event-stream"
        else:  # a JSON array, streamed element by element
            frame = [(b"[" if i == 0 else b",\r\n") + dumps(c) for i, c in enumerate(chunks + last)]
            frame.append(b"]")
            last = [*last, None]
            content_type = "application/json; charset=UTF-8"
        split = len(frame) - len(last)
        return Rendered(
            headers=list(self._HEADERS),
            content_type=content_type,
            events=frame[:split],
            end=frame[split:],
        )

    def render_answer(self, call: Call, answer: Answer) -> Rendered:
        if call.op == "models":
            return self._whole({"models": [self._model_info(m) for m in self.models]})
        if call.op == "model":
            return self._whole(self._model_info(call.model))
        body = call.seen.json
        if call.op == "embedContent":
            dims = body.get("outputDimensionality") or answer.embedding_dims
            return self._whole({"embedding": {"values": fake_vector(_text(body), dims)}})
        if call.op == "batchEmbedContents":
            embeddings = [
                {
                    "values": fake_vector(
                        _text(req), req.get("outputDimensionality") or answer.embedding_dims
                    )
                }
                for req in body["requests"]
            ]
            return self._whole({"embeddings": embeddings})
        return self._generate(call, answer)

    @staticmethod
    def _model_info(name: str) -> dict[str, Any]:
        embed = "embedding" in name
        return {
            "name": f"models/{name}",
            "version": "001",
            "displayName": name,
            "inputTokenLimit": 2048 if embed else 1048576,
            "outputTokenLimit": 1 if embed else 65536,
            "supportedGenerationMethods": (
                ["embedContent"] if embed else ["generateContent", "countTokens"]
            ),
        }

    def _generate(self, call: Call, answer: Answer) -> Rendered:
        body = call.seen.json
        config = body.get("generationConfig") or body.get("generation_config") or {}
        mime = config.get("responseMimeType") or config.get("response_mime_type")
        text = self.answer_text(call, answer, json_mode=mime == "application/json")
        calls = [
            {"functionCall": {"name": tc["name"], "args": tc.get("arguments", {})}}
            for tc in answer.tool_calls or []
        ]
        finish = answer.finish or ("tool_calls" if calls else "stop")
        reason = _FINISH.get(finish, finish)
        model = answer.model or call.model
        rid = f"fakeResp{self.next_id():012d}"
        p, c = answer.prompt_tokens, answer.completion_tokens
        full_usage = {
            "promptTokenCount": p,
            "candidatesTokenCount": c,
            "totalTokenCount": p + c,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": p}],
        }

        def response(parts: list[Any], finish_reason: str | None, usage: Any) -> Any:
            cand: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
            if finish_reason:
                cand["finishReason"] = finish_reason
            out: dict[str, Any] = {"candidates": [cand]}
            if answer.usage and usage:
                out["usageMetadata"] = usage
            out["modelVersion"] = model
            out["responseId"] = rid
            return out

        if not call.stream:
            parts = ([{"text": text}] if text or not calls else []) + calls
            return self._whole(response(parts, reason, full_usage))
        partial = {
            "promptTokenCount": p,
            "totalTokenCount": p,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": p}],
        }
        chunks = [response([{"text": t}], None, partial) for t in split_pieces(text, answer.pieces)]
        if calls:
            chunks.append(response(calls, None, partial))
        last = response([{"text": ""}], reason, full_usage)
        return self._stream(call, chunks, [last])

    # -- errors --------------------------------------------------------------------------------

    _KINDS: dict[str, tuple[int, str]] = {
        "rate_limited": (
            429,
            "You exceeded your current quota, please check your plan and billing details. For "
            "more information on this error, head to: "
            "https://ai.google.dev/gemini-api/docs/rate-limits.",
        ),
        "server": (
            500,
            "An internal error has occurred. Please retry or report in "
            "https://developers.generativeai.google/guide/troubleshooting",
        ),
        "overloaded": (503, "The model is overloaded. Please try again later."),
        "context_length": (
            400,
            "The input token count (1234567) exceeds the maximum number of tokens allowed "
            "(1048576).",
        ),
        "not_found": (
            404,
            "models/{model} is not found for API version v1beta, or is not supported for "
            "generateContent. Call ListModels to see the list of available models and their "
            "supported methods.",
        ),
        "bad_request": (400, "Request contains an invalid argument."),
    }

    def render_error(self, call: Call, error: Error) -> Rendered:
        kind = error.resolved_kind()
        headers = list(error.headers.items())
        if error.body is not None:
            r = self._err(error.status or 400, "", headers=headers)
            r.body = _raw(error.body)
            return r
        if kind == "content_policy" and error.status is None and call.op == "chat":
            return self._blocked(call, error)
        if kind == "unauthorized" and error.status in (None, 400):
            return self._bad_key(headers)
        status, message = self._KINDS.get(kind, self._KINDS["bad_request"])
        if kind == "unauthorized":
            message = "Request had invalid authentication credentials."
        elif kind == "content_policy":
            message = "The request was blocked for safety reasons."
        status = error.status or status
        message = error.message or message.replace("{model}", call.model)
        details: list[dict[str, Any]] = []
        if kind == "rate_limited":
            details = [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {
                            "quotaMetric": (
                                "generativelanguage.googleapis.com/"
                                "generate_content_free_tier_requests"
                            ),
                            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                            "quotaDimensions": {"location": "global", "model": call.model},
                            "quotaValue": "10",
                        }
                    ],
                },
                {
                    "@type": "type.googleapis.com/google.rpc.Help",
                    "links": [
                        {
                            "description": "Learn more about Gemini API quotas",
                            "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                        }
                    ],
                },
            ]
        if error.retry_after is not None:
            details.append(
                {
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": _duration(error.retry_after),
                }
            )
        return self._err(status, message, error.code, details, headers)

    def _blocked(self, call: Call, error: Error) -> Rendered:
        p = 10
        obj = {
            "promptFeedback": {
                "blockReason": error.code or "SAFETY",
                "safetyRatings": [
                    {"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "NEGLIGIBLE"},
                    {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "NEGLIGIBLE"},
                    {"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"},
                    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"},
                ],
            },
            "usageMetadata": {"promptTokenCount": p, "totalTokenCount": p},
            "modelVersion": call.model,
            "responseId": f"fakeResp{self.next_id():012d}",
        }
        if call.stream:
            r = self._stream(call, [], [obj])
            r.events, r.end = [*(r.events or []), *r.end], []
            r.headers += list(error.headers.items())
            return r
        r = self._whole(obj)
        r.headers += list(error.headers.items())
        return r

    def stream_error_event(self, call: Call, error: StreamError) -> bytes:
        kind = error.kind or "server"
        status, message = self._KINDS.get(kind, self._KINDS["server"])
        err = {
            "error": {
                "code": status,
                "message": error.message or message.replace("{model}", call.model),
                "status": error.code or _STATUS.get(status, "UNKNOWN"),
            }
        }
        if call.extra.get("sse"):
            return b"data: " + dumps(err) + b"\r\n\r\n"
        return b",\r\n" + dumps(err)

    def garbled_event(self, call: Call) -> bytes:
        if call.extra.get("sse"):
            return b'data: {"candidates": [{"content": {"parts": [{"text": \r\n\r\n'
        return b',\r\n{"candidates": [{"content": '


def _text(req: dict[str, Any]) -> str:
    content = req.get("content") or {}
    return " ".join(str(p.get("text", "")) for p in content.get("parts") or [])
