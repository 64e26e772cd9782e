"""The anthropic provider adapter: canonical → Messages API requests, answers and every stream
event type back to canonical, and error classification (payloads in Anthropic's published
format)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from piuptime.config.llm import LlmProvider
from piuptime.llm.providers import make_adapter
from piuptime.llm.providers.anthropic import (
    DEFAULT_MAX_TOKENS,
    AnthropicAdapter,
    AnthropicStreamDecoder,
    retry_after,
)
from piuptime.llm.providers.base import (
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
    ProviderError,
)

DEP = Deployment(provider="claude", model="claude-sonnet-4-5")
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="  # noqa: E501


def adapter(**kw: Any) -> AnthropicAdapter:
    return AnthropicAdapter(LlmProvider(kind="anthropic", **kw))


def body_of(
    a: AnthropicAdapter, req: dict[str, Any], dep: Deployment = DEP, stream: bool = False
) -> Any:
    wire = a.chat_request(req, dep, stream, "sk-ant-test")
    assert wire.body is not None
    return orjson.loads(wire.body)


def chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "smart", "messages": list(messages), **extra}


# -- request ----------------------------------------------------------------------------------


def test_make_adapter_builds_the_anthropic_adapter() -> None:
    a = make_adapter(LlmProvider(kind="anthropic"))
    assert isinstance(a, AnthropicAdapter)
    assert a.kind == "anthropic" and a.supports_embeddings is False


@pytest.mark.parametrize(
    ("base_url", "path"),
    [
        (None, b"/v1/messages"),
        ("https://api.anthropic.com", b"/v1/messages"),
        ("https://api.anthropic.com/", b"/v1/messages"),
        ("https://api.anthropic.com/v1", b"/v1/messages"),
        ("http://proxy:8080/anthropic", b"/anthropic/v1/messages"),
    ],
)
def test_path_includes_the_base_url_path(base_url: str | None, path: bytes) -> None:
    a = adapter(base_url=base_url)
    wire = a.chat_request(chat({"role": "user", "content": "hi"}), DEP, False, "k")
    assert wire.method == b"POST" and wire.path == path


def test_headers_carry_key_version_and_extra_headers() -> None:
    a = adapter(anthropic_version="2023-06-01", headers={"anthropic-beta": "context-1m-2025-08-07"})
    wire = a.chat_request(chat({"role": "user", "content": "hi"}), DEP, False, "sk-ant-1")
    headers = dict(wire.headers)
    assert headers[b"x-api-key"] == b"sk-ant-1"
    assert headers[b"anthropic-version"] == b"2023-06-01"
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"accept"] == b"application/json"
    assert headers[b"anthropic-beta"] == b"context-1m-2025-08-07"
    assert b"host" not in headers and b"content-length" not in headers
    assert b"authorization" not in headers
    streamed = dict(
        a.chat_request(chat({"role": "user", "content": "hi"}), DEP, True, None).headers
    )
    assert streamed[b"accept"] == b"text/event-stream"
    assert b"x-api-key" not in streamed
    assert body_of(a, chat({"role": "user", "content": "hi"}), stream=True)["stream"] is True


def test_minimal_request() -> None:
    body = body_of(adapter(), chat({"role": "user", "content": "Hello, Claude"}))
    assert body == {
        "model": "claude-sonnet-4-5",
        "messages": [{"role": "user", "content": "Hello, Claude"}],
        "max_tokens": DEFAULT_MAX_TOKENS,
    }


def test_system_and_developer_messages_become_top_level_system() -> None:
    body = body_of(
        adapter(),
        chat({"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}),
    )
    assert body["system"] == "You are terse."
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    body = body_of(
        adapter(),
        chat(
            {"role": "system", "content": [{"type": "text", "text": "Rule one."}]},
            {"role": "user", "content": "hi"},
            {"role": "developer", "content": "Rule two."},
        ),
    )
    assert body["system"] == [
        {"type": "text", "text": "Rule one."},
        {"type": "text", "text": "Rule two."},
    ]
    assert body["messages"] == [{"role": "user", "content": "hi"}]


def test_consecutive_same_role_messages_are_merged() -> None:
    body = body_of(
        adapter(),
        chat(
            {"role": "user", "content": "first"},
            {"role": "user", "content": [{"type": "text", "text": "second"}]},
            {"role": "assistant", "content": "a"},
            {"role": "assistant", "content": ""},  # empty: left out
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "third"},
        ),
    )
    assert body["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}],
        },
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        },
        {"role": "user", "content": "third"},
    ]


def test_image_parts() -> None:
    body = body_of(
        adapter(),
        chat(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in these images?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"},
                    },
                ],
            }
        ),
    )
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "What is in these images?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


def test_pdf_file_part_becomes_a_document() -> None:
    body = body_of(
        adapter(),
        chat(
            {
                "role": "user",
                "content": [
                    {
                        "type": "file",
                        "file": {
                            "file_data": "data:application/pdf;base64,JVBERi0=",
                            "filename": "a.pdf",
                        },
                    },
                    {"type": "text", "text": "Summarise"},
                ],
            }
        ),
    )
    assert body["messages"][0]["content"][0] == {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="},
    }


@pytest.mark.parametrize(
    "part",
    [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "image_url", "image_url": {"url": "ftp://x/y.png"}},
        {"type": "image_url", "image_url": {"url": "data:image/png,notbase64"}},
        {"type": "file", "file": {"file_id": "file-abc"}},
    ],
)
def test_unsupported_parts_are_refused(part: dict[str, Any]) -> None:
    with pytest.raises(ProviderError) as exc:
        adapter().chat_request(chat({"role": "user", "content": [part]}), DEP, False, "k")
    assert exc.value.kind == BAD_REQUEST


def test_tool_calls_and_tool_results() -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris and London?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": "toolu_01A",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "toolu_01B",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "London"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_01A", "content": "18C sunny"},
        {
            "role": "tool",
            "tool_call_id": "toolu_01B",
            "content": [{"type": "text", "text": "12C rain"}],
        },
        {"role": "user", "content": "And tomorrow?"},
    ]
    body = body_of(adapter(), chat(*messages))
    assert body["messages"] == [
        {"role": "user", "content": "Weather in Paris and London?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check."},
                {
                    "type": "tool_use",
                    "id": "toolu_01A",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {
                    "type": "tool_use",
                    "id": "toolu_01B",
                    "name": "get_weather",
                    "input": {"city": "London"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "18C sunny"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01B",
                    "content": [{"type": "text", "text": "12C rain"}],
                },
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]


def test_tool_result_after_user_text_still_goes_first() -> None:
    body = body_of(
        adapter(),
        chat(
            {"role": "user", "content": "go"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "t1", "type": "function", "function": {"name": "f", "arguments": ""}}
                ],
            },
            {"role": "user", "content": "note"},
            {"role": "tool", "tool_call_id": "t1", "content": "done"},
        ),
    )
    assert body["messages"][1]["content"] == [
        {"type": "tool_use", "id": "t1", "name": "f", "input": {}}
    ]
    assert body["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "t1", "content": "done"},
        {"type": "text", "text": "note"},
    ]


@pytest.mark.parametrize("arguments", ["not json", "[1, 2]"])
def test_tool_arguments_must_be_a_json_object(arguments: str) -> None:
    msg = {
        "role": "assistant",
        "tool_calls": [
            {"id": "t", "type": "function", "function": {"name": "f", "arguments": arguments}}
        ],
    }
    with pytest.raises(ProviderError) as exc:
        adapter().chat_request(chat({"role": "user", "content": "x"}, msg), DEP, False, "k")
    assert exc.value.kind == BAD_REQUEST


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string"}},
                "required": ["location"],
            },
        },
    },
    {"type": "function", "function": {"name": "no_params"}},
]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, None),
        ("auto", {"type": "auto"}),
        ("required", {"type": "any"}),
        ("none", {"type": "none"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"type": "tool", "name": "get_weather"},
        ),
    ],
)
def test_tools_and_tool_choice(choice: Any, expected: Any) -> None:
    extra: dict[str, Any] = {"tools": TOOLS}
    if choice is not None:
        extra["tool_choice"] = choice
    body = body_of(adapter(), chat({"role": "user", "content": "x"}, **extra))
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Get the current weather in a given location",
            "input_schema": {
                "type": "object",
                "properties": {"location": {"type": "string"}},
                "required": ["location"],
            },
        },
        {"name": "no_params", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert body.get("tool_choice") == expected


def test_parallel_tool_calls_false_disables_parallel_tool_use() -> None:
    body = body_of(
        adapter(), chat({"role": "user", "content": "x"}, tools=TOOLS, parallel_tool_calls=False)
    )
    assert body["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    body = body_of(
        adapter(),
        chat(
            {"role": "user", "content": "x"},
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
        ),
    )
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}


def test_tool_choice_without_tools_is_dropped_and_bad_choice_refused() -> None:
    body = body_of(adapter(), chat({"role": "user", "content": "x"}, tool_choice="none"))
    assert "tool_choice" not in body and "tools" not in body
    with pytest.raises(ProviderError):
        adapter().chat_request(
            chat({"role": "user", "content": "x"}, tools=TOOLS, tool_choice="sometimes"),
            DEP,
            False,
            "k",
        )


def test_sampling_stop_user_and_max_tokens() -> None:
    body = body_of(
        adapter(),
        chat(
            {"role": "user", "content": "x"},
            max_tokens=100,
            temperature=0.3,
            top_p=0.9,
            stop="\n\nHuman:",
            user="user-42",
            seed=7,
            frequency_penalty=0.5,
            stream_options={"include_usage": True},
        ),
    )
    assert body["max_tokens"] == 100
    assert body["temperature"] == 0.3 and body["top_p"] == 0.9
    assert body["stop_sequences"] == ["\n\nHuman:"]
    assert body["metadata"] == {"user_id": "user-42"}
    for dropped in ("seed", "frequency_penalty", "stream_options", "stop", "user", "stream"):
        assert dropped not in body
    body = body_of(
        adapter(),
        chat(
            {"role": "user", "content": "x"},
            max_tokens=100,
            max_completion_tokens=50,
            stop=["a", "b"],
            temperature=1.7,
        ),
    )
    assert body["max_tokens"] == 50 and body["stop_sequences"] == ["a", "b"]
    assert body["temperature"] == 1.0  # OpenAI allows up to 2, Anthropic up to 1


def test_n_above_one_is_refused() -> None:
    with pytest.raises(ProviderError) as exc:
        adapter().chat_request(chat({"role": "user", "content": "x"}, n=2), DEP, False, "k")
    assert exc.value.kind == BAD_REQUEST and "n must be 1" in exc.value.message


def test_response_format() -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    body = body_of(
        adapter(),
        chat(
            {"role": "user", "content": "x"},
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "a", "schema": schema, "strict": True},
            },
        ),
    )
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    assert "system" not in body
    for fmt in ({"type": "json_object"}, {"type": "text"}):
        body = body_of(adapter(), chat({"role": "user", "content": "x"}, response_format=fmt))
        assert "output_config" not in body and "system" not in body


def test_deployment_params_are_defaults_and_anthropic_params_pass_through() -> None:
    dep = Deployment(
        provider="claude",
        model="claude-opus-4-1",
        params={
            "max_tokens": 2048,
            "temperature": 0.2,
            "top_k": 40,
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "output_config": {"effort": "low"},
            "service_tier": "standard_only",
        },
    )
    body = body_of(adapter(), chat({"role": "user", "content": "x"}, temperature=0.9), dep)
    assert body["model"] == "claude-opus-4-1"
    assert body["max_tokens"] == 2048
    assert body["temperature"] == 0.9  # the client's value wins
    assert body["top_k"] == 40
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert body["service_tier"] == "standard_only"
    assert body["output_config"] == {"effort": "low"}
    body = body_of(
        adapter(),
        chat(
            {"role": "user", "content": "x"},
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "a", "schema": {"type": "object"}},
            },
        ),
        dep,
    )
    assert body["output_config"] == {
        "effort": "low",
        "format": {"type": "json_schema", "schema": {"type": "object"}},
    }


def test_null_params_are_never_sent() -> None:
    dep = Deployment(
        provider="claude",
        model="claude-opus-4-7",
        params={
            "temperature": None,
            "top_p": None,
            "top_k": None,
            "stop": None,
            "max_tokens": 8000,
        },
    )
    body = body_of(
        adapter(),
        chat({"role": "user", "content": "x"}, temperature=0.7, top_p=0.5, stop=["END"]),
        dep,
    )
    assert body == {
        "model": "claude-opus-4-7",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 8000,
    }


def test_embeddings_are_refused() -> None:
    a = adapter()
    with pytest.raises(ProviderError) as exc:
        a.embeddings_request({"model": "e", "input": "x"}, DEP, "k")
    assert exc.value.kind == BAD_REQUEST
    with pytest.raises(ProviderError):
        a.embeddings_response(b"{}", DEP)


# -- response ---------------------------------------------------------------------------------


def test_text_response() -> None:
    data = orjson.dumps(
        {
            "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": [{"type": "text", "text": "Hi! My name is Claude."}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": 2095,
                "output_tokens": 503,
                "cache_creation_input_tokens": 100,
                "cache_read_input_tokens": 1000,
                "service_tier": "standard",
            },
        }
    )
    resp = adapter().chat_response(data, DEP)
    assert resp["id"] == "msg_013Zva2CMHLNnXjNJJKqJ2EF"
    assert resp["object"] == "chat.completion"
    assert isinstance(resp["created"], int)
    assert resp["model"] == "claude-sonnet-4-5-20250929"
    assert resp["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi! My name is Claude.", "refusal": None},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ]
    assert resp["usage"] == {"prompt_tokens": 3195, "completion_tokens": 503, "total_tokens": 3698}


def test_tool_use_response_with_thinking() -> None:
    data = orjson.dumps(
        {
            "id": "msg_01Aq9w938a90dw8q",
            "type": "message",
            "role": "assistant",
            "content": [
                {
                    "type": "thinking",
                    "thinking": "The user wants weather.",
                    "signature": "EqQBCgIYAhIM",
                },
                {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix"},
                {"type": "text", "text": "I'll check "},
                {"type": "text", "text": "the weather."},
                {
                    "type": "tool_use",
                    "id": "toolu_01A09q90qw90lq917835lq9",
                    "name": "get_weather",
                    "input": {"location": "San Francisco, CA", "unit": "celsius"},
                },
            ],
            "stop_reason": "tool_use",
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 20},
        }
    )
    resp = adapter().chat_response(data, Deployment(provider="p", model="fallback-name"))
    message = resp["choices"][0]["message"]
    assert message["content"] == "I'll check the weather."
    assert message["tool_calls"] == [
        {
            "id": "toolu_01A09q90qw90lq917835lq9",
            "type": "function",
            "function": {
                "name": "get_weather",
                "arguments": '{"location":"San Francisco, CA","unit":"celsius"}',
            },
        }
    ]
    assert resp["choices"][0]["finish_reason"] == "tool_calls"
    assert resp["model"] == "fallback-name"  # the answer named no model


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
        ("model_context_window_exceeded", "length"),
    ],
)
def test_stop_reasons(stop: str, finish: str) -> None:
    data = orjson.dumps(
        {
            "id": "m",
            "type": "message",
            "role": "assistant",
            "model": "c",
            "content": [],
            "stop_reason": stop,
            "usage": {"input_tokens": 1, "output_tokens": 0},
        }
    )
    resp = adapter().chat_response(data, DEP)
    assert resp["choices"][0]["finish_reason"] == finish
    assert resp["choices"][0]["message"]["content"] is None


def test_response_without_usage_has_no_usage() -> None:
    data = orjson.dumps(
        {
            "id": "m",
            "type": "message",
            "content": [{"type": "text", "text": "x"}],
            "stop_reason": "end_turn",
        }
    )
    assert "usage" not in adapter().chat_response(data, DEP)


@pytest.mark.parametrize("data", [b"not json", b"[]", b'{"id": "m"}'])
def test_unreadable_response_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(ProviderError) as exc:
        adapter().chat_response(data, DEP)
    assert exc.value.kind == PROTOCOL


def test_error_body_in_a_2xx_is_raised() -> None:
    data = orjson.dumps(
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    )
    with pytest.raises(ProviderError) as exc:
        adapter().chat_response(data, DEP)
    assert exc.value.kind == OVERLOADED


# -- stream -----------------------------------------------------------------------------------


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events
    )


MESSAGE_START = {
    "type": "message_start",
    "message": {
        "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": "claude-sonnet-4-5-20250929",
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 25, "cache_read_input_tokens": 5, "output_tokens": 1},
    },
}

TEXT_STREAM = sse(
    MESSAGE_START,
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
    {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "! Ça va ? 🙂"},
    },
    {"type": "content_block_stop", "index": 0},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 15},
    },
    {"type": "message_stop"},
)

TOOL_STREAM = sse(
    MESSAGE_START,
    {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "thinking", "thinking": "", "signature": ""},
    },
    {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "thinking_delta", "thinking": "I need the weather."},
    },
    {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3h"},
    },
    {"type": "content_block_stop", "index": 0},
    {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "text_delta", "text": "Okay, let me check."},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {
            "type": "citations_delta",
            "citation": {
                "type": "char_location",
                "cited_text": "x",
                "document_index": 0,
                "document_title": None,
                "start_char_index": 0,
                "end_char_index": 1,
            },
        },
    },
    {"type": "content_block_stop", "index": 1},
    {
        "type": "content_block_start",
        "index": 2,
        "content_block": {
            "type": "tool_use",
            "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
            "name": "get_weather",
            "input": {},
        },
    },
    {
        "type": "content_block_delta",
        "index": 2,
        "delta": {"type": "input_json_delta", "partial_json": ""},
    },
    {
        "type": "content_block_delta",
        "index": 2,
        "delta": {"type": "input_json_delta", "partial_json": '{"location":'},
    },
    {
        "type": "content_block_delta",
        "index": 2,
        "delta": {"type": "input_json_delta", "partial_json": ' "San Francisco, CA"}'},
    },
    {"type": "content_block_stop", "index": 2},
    {
        "type": "content_block_start",
        "index": 3,
        "content_block": {"type": "tool_use", "id": "toolu_02", "name": "get_time", "input": {}},
    },
    {
        "type": "content_block_delta",
        "index": 3,
        "delta": {"type": "input_json_delta", "partial_json": "{}"},
    },
    {"type": "content_block_stop", "index": 3},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 89},
    },
    {"type": "message_stop"},
)


def decode(
    data: bytes, pieces: list[int] | None = None
) -> tuple[AnthropicStreamDecoder, list[dict[str, Any]]]:
    dec = adapter().stream_decoder(DEP)
    out: list[dict[str, Any]] = []
    if pieces is None:
        out += dec.feed(data)
    else:
        start = 0
        for cut in sorted(pieces):
            out += dec.feed(data[start:cut])
            start = cut
        out += dec.feed(data[start:])
    out += dec.close()
    return dec, out


def deltas(chunks: list[dict[str, Any]]) -> list[tuple[dict[str, Any], Any]]:
    return [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks]


def test_text_stream() -> None:
    dec, chunks = decode(TEXT_STREAM)
    assert deltas(chunks) == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "Hello"}, None),
        ({"content": "! Ça va ? 🙂"}, None),
        ({}, "stop"),
    ]
    for c in chunks:
        assert c["id"] == "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY"
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == "claude-sonnet-4-5-20250929"
        assert "usage" not in c
    assert dec.done and dec.finish_reason == "stop"
    assert dec.usage == {"prompt_tokens": 30, "completion_tokens": 15, "total_tokens": 45}
    assert dec.prompt_tokens == 30
    assert dec.text_out() == "Hello! Ça va ? 🙂"
    assert dec.malformed == 0


def test_tool_stream_skips_thinking_and_citations() -> None:
    dec, chunks = decode(TOOL_STREAM)
    assert deltas(chunks) == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "Okay, let me check."}, None),
        (
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            },
            None,
        ),
        ({"tool_calls": [{"index": 0, "function": {"arguments": '{"location":'}}]}, None),
        ({"tool_calls": [{"index": 0, "function": {"arguments": ' "San Francisco, CA"}'}}]}, None),
        (
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "toolu_02",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": ""},
                    }
                ]
            },
            None,
        ),
        ({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}, None),
        ({}, "tool_calls"),
    ]
    assert dec.done and dec.finish_reason == "tool_calls"
    assert dec.usage == {"prompt_tokens": 30, "completion_tokens": 89, "total_tokens": 119}
    assert "I need the weather" not in dec.text_out()


def test_message_delta_usage_overrides_input_tokens() -> None:
    data = sse(
        MESSAGE_START,
        {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
            "usage": {"input_tokens": 40, "output_tokens": 3},
        },
        {"type": "message_stop"},
    )
    dec, chunks = decode(data)
    assert dec.usage == {"prompt_tokens": 45, "completion_tokens": 3, "total_tokens": 48}
    assert deltas(chunks)[-1] == ({}, "length")


def test_stream_cut_before_message_delta_has_no_usage_and_is_not_done() -> None:
    dec, _ = decode(TEXT_STREAM[: TEXT_STREAM.index(b"event: message_delta")])
    assert not dec.done and dec.usage is None and dec.finish_reason is None
    assert dec.prompt_tokens == 30
    assert dec.text_out() == "Hello! Ça va ? 🙂"


def test_unknown_events_and_malformed_data() -> None:
    data = (
        sse(MESSAGE_START)
        + b'event: some_future_event\ndata: {"type": "some_future_event", "x": 1}\n\n'
        + b": a comment\n\n"
        + b"event: content_block_delta\ndata: {not json\n\n"
        + b"event: content_block_delta\ndata: [1]\n\n"
        + sse(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {
                    "type": "server_tool_use",
                    "id": "srvtoolu_1",
                    "name": "web_search",
                    "input": {},
                },
            },
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": '{"query": "x"}'},
            },
            {"type": "content_block_stop", "index": 0},
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {
                    "type": "web_search_tool_result",
                    "tool_use_id": "srvtoolu_1",
                    "content": [],
                },
            },
            {"type": "content_block_stop", "index": 1},
            {
                "type": "content_block_start",
                "index": 2,
                "content_block": {"type": "text", "text": "Found it"},
            },
            {"type": "content_block_stop", "index": 2},
            {"type": "message_stop"},
        )
    )
    dec, chunks = decode(data)
    assert dec.malformed == 2
    assert deltas(chunks) == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "Found it"}, None),
    ]
    assert dec.done


@pytest.mark.parametrize(
    ("etype", "message", "kind"),
    [
        ("overloaded_error", "Overloaded", OVERLOADED),
        (
            "rate_limit_error",
            "Number of request tokens has exceeded your per-minute rate limit",
            RATE_LIMITED,
        ),
        ("api_error", "Internal server error", SERVER),
        ("invalid_request_error", "messages.1: tool_use ids must be unique", BAD_REQUEST),
        (
            "invalid_request_error",
            "prompt is too long: 208310 tokens > 200000 maximum",
            CONTEXT_LENGTH,
        ),
        ("some_new_error", "what", SERVER),
    ],
)
def test_error_event_raises(etype: str, message: str, kind: str) -> None:
    dec = adapter().stream_decoder(DEP)
    assert dec.feed(sse(MESSAGE_START))
    with pytest.raises(ProviderError) as exc:
        dec.feed(
            b'event: error\ndata: {"type": "error", "error": {"type": "'
            + etype.encode()
            + b'", "message": "'
            + message.encode()
            + b'"}}\n\n'
        )
    assert exc.value.kind == kind
    assert exc.value.message == message
    assert exc.value.type == etype


def normalised(chunks: list[dict[str, Any]]) -> list[Any]:
    return [{k: v for k, v in c.items() if k != "created"} for c in chunks]


@settings(max_examples=150, deadline=None)
@given(
    data=st.sampled_from([TEXT_STREAM, TOOL_STREAM, TEXT_STREAM.replace(b"\n", b"\r\n")]),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=30),
)
def test_stream_decoder_is_split_invariant(data: bytes, cuts: list[int]) -> None:
    whole_dec, whole = decode(data)
    dec, split = decode(data, [c % (len(data) + 1) for c in cuts])
    assert normalised(split) == normalised(whole)
    assert (
        dec.usage == whole_dec.usage and dec.done and dec.finish_reason == whole_dec.finish_reason
    )
    assert dec.text_out() == whole_dec.text_out()


def test_an_event_without_its_blank_line_is_dropped_at_close() -> None:
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": "x"},
    }
    data = sse(MESSAGE_START) + sse(block)[:-1]
    dec = adapter().stream_decoder(DEP)
    assert len(dec.feed(data)) == 1
    # per the SSE rules an event is dispatched by its blank line only
    assert dec.close() == []
    assert not dec.done


# -- classify ---------------------------------------------------------------------------------


def err_body(etype: str, message: str) -> bytes:
    return orjson.dumps(
        {
            "type": "error",
            "error": {"type": etype, "message": message},
            "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy",
        }
    )


@pytest.mark.parametrize(
    ("status", "etype", "message", "kind"),
    [
        (429, "rate_limit_error", "This request would exceed your rate limit", RATE_LIMITED),
        (529, "overloaded_error", "Overloaded", OVERLOADED),
        (401, "authentication_error", "invalid x-api-key", AUTH),
        (403, "permission_error", "Your API key does not have permission", AUTH),
        (402, "billing_error", "Your credit balance is too low", AUTH),
        (404, "not_found_error", "model: claude-nope", NOT_FOUND),
        (413, "request_too_large", "Request exceeds the maximum size", BAD_REQUEST),
        (
            400,
            "invalid_request_error",
            "prompt is too long: 210000 tokens > 200000 maximum",
            CONTEXT_LENGTH,
        ),
        (
            400,
            "invalid_request_error",
            "input length and `max_tokens` exceed context limit: 198000 + 8192 > 200000",
            CONTEXT_LENGTH,
        ),
        (
            400,
            "invalid_request_error",
            "Output blocked by content filtering policy",
            CONTENT_POLICY,
        ),
        (400, "invalid_request_error", "max_tokens: Field required", BAD_REQUEST),
        (500, "api_error", "Internal server error", SERVER),
        (504, "timeout_error", "Request timed out", SERVER),
        (503, "api_error", "upstream unavailable", SERVER),
        (422, "invalid_request_error", "weird", BAD_REQUEST),
    ],
)
def test_classify(status: int, etype: str, message: str, kind: str) -> None:
    err = adapter().classify(status, [(b"request-id", b"req_1")], err_body(etype, message))
    assert err.kind == kind
    assert err.message == message
    assert err.status == status
    assert err.code == etype and err.type == etype


def test_classify_body_that_is_not_anthropic_json() -> None:
    err = adapter().classify(502, [], b"<html>Bad Gateway</html>")
    assert err.kind == SERVER and "502" in err.message
    err = adapter().classify(418, [], b"")
    assert err.kind == BAD_REQUEST
    err = adapter().classify(404, [], b"{}")
    assert err.kind == NOT_FOUND


def test_429_retry_after_seconds() -> None:
    err = adapter().classify(
        429, [(b"Retry-After", b"17")], err_body("rate_limit_error", "slow down")
    )
    assert err.kind == RATE_LIMITED and err.retry_after == 17.0


def test_429_retry_after_http_date() -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    headers = [(b"retry-after", format_datetime(when, usegmt=True).encode())]
    err = adapter().classify(429, headers, err_body("rate_limit_error", "slow down"))
    assert err.retry_after is not None and 28 <= err.retry_after <= 30


def rfc3339(seconds: float, now: float) -> bytes:
    return datetime.fromtimestamp(now + seconds, UTC).isoformat().replace("+00:00", "Z").encode()


def test_429_reset_headers_of_the_exhausted_limit() -> None:
    now = time.time()
    headers = [
        (b"anthropic-ratelimit-requests-limit", b"50"),
        (b"anthropic-ratelimit-requests-remaining", b"12"),
        (b"anthropic-ratelimit-requests-reset", rfc3339(5, now)),
        (b"anthropic-ratelimit-tokens-remaining", b"0"),
        (b"anthropic-ratelimit-tokens-reset", rfc3339(40, now)),
        (b"anthropic-ratelimit-input-tokens-remaining", b"0"),
        (b"anthropic-ratelimit-input-tokens-reset", rfc3339(20, now)),
    ]
    assert retry_after(headers, now) == pytest.approx(40, abs=0.01)
    err = adapter().classify(429, headers, err_body("rate_limit_error", "x"))
    assert err.retry_after is not None and 38 <= err.retry_after <= 40
    # nothing says which limit ran out: the latest reset
    unknown = [
        (b"anthropic-ratelimit-requests-reset", rfc3339(5, now)),
        (b"anthropic-ratelimit-tokens-reset", rfc3339(9, now)),
    ]
    assert retry_after(unknown, now) == pytest.approx(9, abs=0.01)
    # a reset in the past: now
    assert retry_after([(b"anthropic-ratelimit-requests-reset", rfc3339(-5, now))], now) == 0.0
    # retry-after wins over the reset headers
    assert retry_after([(b"retry-after", b"3"), *headers], now) == 3.0


def test_retry_after_absent_or_unreadable() -> None:
    assert retry_after([]) is None
    assert (
        retry_after([(b"retry-after", b"soon"), (b"anthropic-ratelimit-requests-reset", b"later")])
        is None
    )
    err = adapter().classify(429, [], err_body("rate_limit_error", "x"))
    assert err.kind == RATE_LIMITED and err.retry_after is None
    err = adapter().classify(
        529, [(b"retry-after", b"2")], err_body("overloaded_error", "Overloaded")
    )
    assert err.kind == OVERLOADED and err.retry_after == 2.0
    err = adapter().classify(400, [(b"retry-after", b"2")], err_body("invalid_request_error", "x"))
    assert err.retry_after is None
