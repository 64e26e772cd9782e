"""Counting tokens locally, for when a provider's answer carries no usage.

The tokenizer is ``toktok`` (PyPI ``toktok-rs``): a Rust BPE whose counts are identical to
tiktoken's, with the ``o200k_base`` ranks (GPT-4o, GPT-4.1, GPT-5, the o-series) compiled into
its extension module. Nothing is downloaded at run time, unlike tiktoken, which fetches its
encodings on first use. Wheels: manylinux x86_64 and aarch64 (Raspberry Pi), macOS, Windows;
4.5 MB each, no dependencies.

Other providers' models (Claude, Gemini, Llama, Qwen) use other vocabularies, so for them the
count is an estimate, usually within about 10-20% on English text.

Cost, measured on x86_64 (a Raspberry Pi 5 is a few times slower):

- importing this module imports nothing heavy; the tokenizer is imported and its encoding
  built on the first count: about 0.3 s, holding the GIL (so it blocks the event loop once per
  process), and about 65 MB of resident memory from then on. ``preload()`` does it at a moment
  of the caller's choosing; ``loaded()`` tells whether it happened.
- counting: about 10 µs per call plus 2-3 µs per KB of text (3 ms for 1 MB). The GIL is
  released while counting, so a caller with very large bodies can count in a thread.

Counts never treat ``<|endoftext|>``-like strings in user text as special tokens.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import orjson

__all__ = [
    "ENCODING",
    "IMAGE_TOKENS_HIGH",
    "IMAGE_TOKENS_LOW",
    "REPLY_PRIMING_TOKENS",
    "TOKENS_PER_MESSAGE",
    "TOKENS_PER_NAME",
    "count_chat_prompt",
    "count_completion",
    "count_embedding_input",
    "count_text",
    "loaded",
    "preload",
]

ENCODING = "o200k_base"

#: OpenAI's convention for chat prompts: each message is wrapped in
#: ``<|start|>{role}<|message|>{content}<|end|>`` (3 tokens besides the role and the content),
#: a ``name`` costs one more, and the reply is primed with ``<|start|>assistant<|message|>``.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3

#: Images are not decoded to count their tiles. OpenAI charges 85 tokens for a ``detail: low``
#: image and 85 + 170 per 512 px tile otherwise; the estimate for ``high``/``auto`` (or no
#: detail) is a 1024 x 1024 image after OpenAI's resizing: 4 tiles, 765 tokens.
IMAGE_TOKENS_LOW = 85
IMAGE_TOKENS_HIGH = 765

_lock = threading.Lock()
_counter: Callable[[list[str]], list[int]] | None = None


def _load() -> Callable[[list[str]], list[int]]:
    global _counter
    with _lock:
        if _counter is None:
            import toktok  # type: ignore[import-untyped]  # lazily, on first use

            batch_count = toktok.batch_count
            batch_count(["warm"], ENCODING, threads=1)  # builds the encoding now

            def counter(texts: list[str]) -> list[int]:
                result: list[int] = batch_count(texts, ENCODING, threads=1)
                return result

            _counter = counter
        return _counter


def loaded() -> bool:
    """Whether the tokenizer is already in memory."""
    return _counter is not None


def preload() -> None:
    """Load the tokenizer now (about 0.3 s holding the GIL, about 65 MB) instead of on the
    first count."""
    _load()


def _count_all(texts: list[str]) -> int:
    if not texts:
        return 0
    counter = _counter or _load()
    return sum(counter(texts))


def count_text(text: str) -> int:
    """Tokens in ``text``."""
    if not text:
        return 0
    return _count_all([text])


def count_completion(text: str, tool_calls: Iterable[Any] | None = None) -> int:
    """Tokens of a generated answer: its text and, when given, its tool calls (canonical
    ``{function: {name, arguments}}`` items) counted by name and arguments."""
    texts = [text] if text else []
    if tool_calls:
        _tool_call_texts(tool_calls, texts)
    return _count_all(texts)


def count_chat_prompt(body: dict[str, Any]) -> int:
    """Prompt tokens of a canonical chat request, by OpenAI's per-message convention.

    Counted: each message's role, name and content (text parts; images as ``IMAGE_TOKENS_*``;
    audio and file parts not at all, their base64 is no measure of their tokens; unknown parts
    as their JSON), assistant ``tool_calls`` by name and arguments, the ``tools`` definitions
    and a ``json_schema`` response format as their JSON.
    """
    texts: list[str] = []
    fixed = REPLY_PRIMING_TOKENS
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            fixed += TOKENS_PER_MESSAGE
            role = message.get("role")
            if isinstance(role, str):
                texts.append(role)
            name = message.get("name")
            if isinstance(name, str) and name:
                texts.append(name)
                fixed += TOKENS_PER_NAME
            fixed += _content_texts(message.get("content"), texts)
            tool_calls = message.get("tool_calls")
            if isinstance(tool_calls, list):
                _tool_call_texts(tool_calls, texts)
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        texts.append(orjson.dumps(tools).decode())
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        schema = response_format.get("json_schema")
        if schema is not None:
            texts.append(orjson.dumps(schema).decode())
    return fixed + _count_all(texts)


def count_embedding_input(value: Any) -> int:
    """Tokens of an embeddings request's ``input``: a string, a list of strings, or token
    arrays (a list of ints, or a list of them), which count as their length."""
    if isinstance(value, str):
        return count_text(value)
    if not isinstance(value, list) or not value:
        return 0
    if all(isinstance(item, int) for item in value):
        return len(value)
    texts: list[str] = []
    fixed = 0
    for item in value:
        if isinstance(item, str):
            if item:
                texts.append(item)
        elif isinstance(item, list):
            fixed += len(item)
    return fixed + _count_all(texts)


def _content_texts(content: Any, texts: list[str]) -> int:
    """Append the countable text of a message's ``content``; return the fixed estimates."""
    if isinstance(content, str):
        if content:
            texts.append(content)
        return 0
    if not isinstance(content, list):
        return 0
    fixed = 0
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" or kind == "refusal":
            value = part.get(kind)
            if isinstance(value, str) and value:
                texts.append(value)
        elif kind == "image_url":
            image = part.get("image_url")
            detail = image.get("detail") if isinstance(image, dict) else None
            fixed += IMAGE_TOKENS_LOW if detail == "low" else IMAGE_TOKENS_HIGH
        elif kind in ("input_audio", "file"):
            continue
        else:
            texts.append(orjson.dumps(part).decode())
    return fixed


def _tool_call_texts(tool_calls: Iterable[Any], texts: list[str]) -> None:
    for call in tool_calls:
        if not isinstance(call, dict):
            continue
        function = call.get("function")
        if not isinstance(function, dict):
            continue
        for key in ("name", "arguments"):
            value = function.get(key)
            if isinstance(value, str) and value:
                texts.append(value)
