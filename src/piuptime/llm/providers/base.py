"""What every provider adapter gives the LLM handler.

The gateway speaks one canonical shape inside: OpenAI's Chat Completions (requests, responses
and ``chat.completion.chunk`` stream chunks) and OpenAI's embeddings, as plain dicts parsed by
orjson. An adapter translates a canonical request into its provider's wire request, and the
provider's answer (whole, or stream event by event) back into canonical dicts. It never does
I/O: the handler owns sockets, timeouts, retries and fail-over, so adapters are pure and tested
as such.

Error classification is the adapter's other job: ``classify`` turns a provider's error status,
headers and body into a ``ProviderError`` whose ``kind`` drives what the handler does next
(retry, fail over, fall back to a larger-context group, or pass the error on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

Headers = list[tuple[bytes, bytes]]

# ProviderError.kind values
RATE_LIMITED = "rate_limited"  # 429 (or a provider's quota error): honour retry_after
OVERLOADED = "overloaded"  # Anthropic 529 and the like: another deployment, later this one
SERVER = "server"  # 5xx: retry once on the same deployment, then fail over
CONNECT = "connect"  # refused, reset, connect timeout (raised by the handler, not adapters)
TIMEOUT = "timeout"  # first byte, first token or idle timeout (raised by the handler)
CONTEXT_LENGTH = "context_length"  # the prompt is too long for the model: never retried there
CONTENT_POLICY = "content_policy"  # refused for content: never retried, reason passed on
AUTH = "auth"  # 401/403: this key is bad; another key or deployment may work
BAD_REQUEST = "bad_request"  # the request itself is wrong: passed to the client, not retried
NOT_FOUND = "not_found"  # the model does not exist at this deployment: fail over
PROTOCOL = "protocol"  # the provider broke its own protocol (truncated stream, bad JSON)


class ProviderError(Exception):
    """A provider's refusal or failure, classified.

    ``status``: the HTTP status the provider sent (0 when none arrived). ``retry_after``:
    seconds from Retry-After (or the provider's own reset header), None when not given.
    ``code``/``param``/``type``: what goes into OpenAI's error shape for the client.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        status: int = 0,
        retry_after: float | None = None,
        code: str | None = None,
        type: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.code = code
        self.type = type
        self.param = param

    def __repr__(self) -> str:
        return f"ProviderError({self.kind!r}, {self.message!r}, status={self.status})"


@dataclass(slots=True)
class Deployment:
    """One concrete model at one provider, as an attempt needs it (from ``llm.models``)."""

    provider: str  # the provider's name in config
    model: str  # the model name the provider knows
    params: dict[str, Any] = field(default_factory=dict)  # merged into the request body


@dataclass(slots=True)
class WireRequest:
    """The provider request an adapter built: the path is appended to the provider's base_url
    path; headers carry auth but not host, content-length or framing."""

    method: bytes
    path: bytes
    headers: Headers
    body: bytes | None


class StreamDecoder(Protocol):
    """Turns a provider's streamed response body into canonical chunks, incrementally.

    ``feed`` takes the next bytes as they arrived (any split, even mid-line) and returns the
    ``chat.completion.chunk`` dicts now complete. A malformed event is skipped and counted in
    ``malformed``; an error event in the stream raises ``ProviderError``. After the body ended,
    ``close`` returns whatever the last bytes completed.

    State the handler reads: ``done`` (the provider's own end marker was seen: ``[DONE]``,
    ``message_stop``, Ollama's ``"done": true``, or Gemini's last candidate with a finish
    reason), ``finish_reason`` (the last one seen, canonical: stop, length, tool_calls,
    content_filter), ``usage`` (canonical ``{"prompt_tokens", "completion_tokens",
    "total_tokens"}`` once the provider gave it), ``text_out`` (the generated text so far,
    for counting tokens when the provider gives no usage), ``malformed``.
    """

    done: bool
    finish_reason: str | None
    usage: dict[str, int] | None
    malformed: int

    def feed(self, data: bytes) -> list[dict[str, Any]]: ...

    def close(self) -> list[dict[str, Any]]: ...

    def text_out(self) -> str: ...


class Adapter(Protocol):
    """One provider kind (``openai``, ``ollama``, ``anthropic``, ``gemini``)."""

    kind: str
    supports_embeddings: bool

    def chat_request(
        self, body: dict[str, Any], deployment: Deployment, stream: bool, key: str | None
    ) -> WireRequest:
        """The provider request for a canonical chat request ``body`` (whose ``model`` is the
        client-visible group name; the adapter sends ``deployment.model``)."""
        ...

    def chat_response(self, data: bytes, deployment: Deployment) -> dict[str, Any]:
        """A provider's whole (non-streamed) 2xx answer as a canonical ``chat.completion``.
        Raises ``ProviderError`` (kind ``protocol``) for a body it cannot read, or the
        provider's own refusal carried in a 2xx (Gemini's blocked prompt)."""
        ...

    def stream_decoder(self, deployment: Deployment) -> StreamDecoder: ...

    def embeddings_request(
        self, body: dict[str, Any], deployment: Deployment, key: str | None
    ) -> WireRequest: ...

    def embeddings_response(self, data: bytes, deployment: Deployment) -> dict[str, Any]: ...

    def classify(self, status: int, headers: Headers, body: bytes) -> ProviderError:
        """A non-2xx answer as a ProviderError (kind, message, retry_after, code)."""
        ...
