"""Provider adapters, one module per ``kind``, imported only when a config uses that kind."""

from __future__ import annotations

import importlib

from piuptime.config.llm import LlmProvider

from .base import Adapter, Deployment, ProviderError, StreamDecoder, WireRequest

__all__ = ["Adapter", "Deployment", "ProviderError", "StreamDecoder", "WireRequest", "make_adapter"]

_CLASSES = {
    "openai": ("piuptime.llm.providers.openai", "OpenAIAdapter"),
    "ollama": ("piuptime.llm.providers.ollama", "OllamaAdapter"),
    "anthropic": ("piuptime.llm.providers.anthropic", "AnthropicAdapter"),
    "gemini": ("piuptime.llm.providers.gemini", "GeminiAdapter"),
}


def make_adapter(config: LlmProvider) -> Adapter:
    """The adapter for one configured provider (its base URL, keys' header style, version)."""
    module, name = _CLASSES[config.kind]
    cls = getattr(importlib.import_module(module), name)
    adapter: Adapter = cls(config)
    return adapter
