"""Fake LLM providers that speak the providers' published wire protocols on real sockets.

See ``base`` for the behaviours (``Answer``, ``Error`` and its constructors, ``Cut``, ``Stall``,
``Silent``, ``Reset``, ``NoEnd``, ``Malformed``, ``StreamError``) and the server core.
"""

from __future__ import annotations

from .anthropic_fake import FakeAnthropic
from .base import (
    Answer,
    Behaviour,
    Cut,
    Error,
    FakeServer,
    Malformed,
    NoEnd,
    Reset,
    Seen,
    Silent,
    Stall,
    StreamError,
    content_policy,
    context_length,
    overloaded,
    rate_limited,
    server_error,
    unauthorized,
)
from .gemini_fake import FakeGemini
from .ollama_fake import FakeOllama
from .openai_fake import FakeOpenAI

__all__ = [
    "Answer",
    "Behaviour",
    "Cut",
    "Error",
    "FakeAnthropic",
    "FakeGemini",
    "FakeOllama",
    "FakeOpenAI",
    "FakeServer",
    "Malformed",
    "NoEnd",
    "Reset",
    "Seen",
    "Silent",
    "Stall",
    "StreamError",
    "content_policy",
    "context_length",
    "overloaded",
    "rate_limited",
    "server_error",
    "unauthorized",
]
