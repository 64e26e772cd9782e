"""The errors the LLM API answers with, in OpenAI's shape (and the status each kind gets)."""

from __future__ import annotations

import orjson

from piuptime.llm.providers.base import (
    AUTH,
    BAD_REQUEST,
    CONNECT,
    CONTENT_POLICY,
    CONTEXT_LENGTH,
    NOT_FOUND,
    OVERLOADED,
    PROTOCOL,
    RATE_LIMITED,
    SERVER,
    TIMEOUT,
    ProviderError,
)

__all__ = ["ApiError", "from_provider", "openai_error_body"]

#: OpenAI's error ``type`` for each status the gateway sends
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class ApiError(Exception):
    """An answer the gateway gives instead of a model's: status, OpenAI error fields, and
    ``retry_after`` (seconds) for 429/503."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        *,
        type: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.type = type or _TYPES.get(status, "server_error")
        self.param = param
        self.retry_after = retry_after
        self.kind = kind or code or "error"


def openai_error_body(err: ApiError) -> bytes:
    return orjson.dumps(
        {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    )


def from_provider(exc: ProviderError, where: str) -> ApiError:
    """The client's answer for a provider error that is passed on (not retried): the
    provider's own reason, with the status that fits its kind."""
    kind = exc.kind
    message = f"{where}: {exc.message}"
    if kind == CONTEXT_LENGTH:
        return ApiError(400, message, "context_length_exceeded", param="messages", kind=kind)
    if kind == CONTENT_POLICY:
        return ApiError(400, message, exc.code or "content_policy_violation", kind=kind)
    if kind == BAD_REQUEST:
        status = exc.status if 400 <= exc.status < 500 and exc.status != 429 else 400
        return ApiError(status, message, exc.code, type=exc.type, param=exc.param, kind=kind)
    if kind == RATE_LIMITED:
        return ApiError(429, message, "rate_limit_exceeded", retry_after=exc.retry_after, kind=kind)
    if kind == OVERLOADED:
        return ApiError(503, message, "overloaded", retry_after=exc.retry_after, kind=kind)
    if kind == TIMEOUT:
        return ApiError(504, message, "upstream_timeout", kind=kind)
    if kind == AUTH:
        return ApiError(502, message, "upstream_auth_failed", kind=kind)
    if kind == NOT_FOUND:
        return ApiError(502, message, "upstream_model_not_found", kind=kind)
    if kind in (SERVER, CONNECT, PROTOCOL):
        return ApiError(502, message, "upstream_error", kind=kind)
    return ApiError(502, message, "upstream_error", kind=kind)
