"""The Anthropic-compatible front end (``POST /v1/messages``): Messages requests to canonical,
canonical answers and chunks back to Anthropic's Message and SSE events. Requests are the
bytes the official anthropic SDK sends; answers and streams are read back by the SDK itself
(through an in-memory transport: a check of our bytes with the SDK's own parser)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import httpx2
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from piuptime.config.llm import LlmProvider
from piuptime.llm.anthropic_api import (
    ERROR_TYPES,
    MessagesStreamWriter,
    anthropic_error_body,
    chat_to_message,
    error_type,
    messages_to_chat,
)
from piuptime.llm.providers.anthropic import AnthropicAdapter
from piuptime.llm.providers.base import Deployment
from piuptime.llm.sse import SSEReader

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="  # noqa: E501

Handler = Callable[[httpx2.Request], httpx2.Response]


def sdk(handler: Handler) -> anthropic.Anthropic:
    transport = httpx2.MockTransport(handler)
    return anthropic.Anthropic(
        api_key="sk-ant-test",
        base_url="http://gateway.test",
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    )


def sse_response(body: bytes) -> Handler:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    return handler


def json_response(payload: dict[str, Any], status: int = 200) -> Handler:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, headers={"content-type": "application/json"}, json=payload)

    return handler


def sent_by_sdk(**kwargs: Any) -> dict[str, Any]:
    """The JSON body the anthropic SDK sends for ``messages.create(**kwargs)``."""
    seen: list[bytes] = []
    answer = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }

    def handler(request: httpx2.Request) -> httpx2.Response:
        assert request.url.path == "/v1/messages"
        seen.append(request.read())
        return httpx2.Response(200, json=answer)

    sdk(handler).messages.create(**kwargs)
    body: dict[str, Any] = orjson.loads(seen[0])
    return body


TOOLS: list[Any] = [
    {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "input_schema": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    }
]

CONVERSATION: list[Any] = [
    {"role": "user", "content": "What's the weather like in San Francisco?"},
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "I'll check the weather."},
            {
                "type": "tool_use",
                "id": "toolu_01A09q90qw90lq917835lq9",
                "name": "get_weather",
                "input": {"location": "San Francisco, CA", "unit": "celsius"},
            },
        ],
    },
    {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_01A09q90qw90lq917835lq9",
                "content": "15 degrees",
            },
            {"type": "text", "text": "Also, what is in this picture?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        ],
    },
]


# -- request ----------------------------------------------------------------------------------


def test_sdk_request_to_canonical() -> None:
    body = sent_by_sdk(
        model="smart",
        max_tokens=1024,
        system=[
            {
                "type": "text",
                "text": "You are a weather bot.",
                "cache_control": {"type": "ephemeral"},
            },
            {"type": "text", "text": "Answer briefly."},
        ],
        messages=CONVERSATION,
        tools=TOOLS,
        tool_choice={"type": "auto", "disable_parallel_tool_use": True},
        stop_sequences=["\n\nHuman:"],
        metadata={"user_id": "user-123"},
        # this SDK version dropped the sampling parameters (the newest models refuse them);
        # older clients still send them
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 40},
    )
    chat = messages_to_chat(body)
    assert chat == {
        "model": "smart",
        "max_tokens": 1024,
        "messages": [
            {
                "role": "system",
                "content": [
                    {"type": "text", "text": "You are a weather bot."},
                    {"type": "text", "text": "Answer briefly."},
                ],
            },
            {"role": "user", "content": "What's the weather like in San Francisco?"},
            {
                "role": "assistant",
                "content": "I'll check the weather.",
                "tool_calls": [
                    {
                        "id": "toolu_01A09q90qw90lq917835lq9",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": '{"location":"San Francisco, CA","unit":"celsius"}',
                        },
                    }
                ],
            },
            {
                "role": "tool",
                "tool_call_id": "toolu_01A09q90qw90lq917835lq9",
                "content": "15 degrees",
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Also, what is in this picture?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                ],
            },
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Get the current weather in a given location",
                    "parameters": TOOLS[0]["input_schema"],
                },
            }
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "stop": ["\n\nHuman:"],
        "temperature": 0.5,
        "top_p": 0.9,
        "user": "user-123",
    }


def test_streaming_request_asks_for_usage() -> None:
    chat = messages_to_chat(
        {
            "model": "m",
            "max_tokens": 5,
            "stream": True,
            "system": "Be nice.",
            "messages": [{"role": "user", "content": "hi"}],
        }
    )
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    assert chat["messages"][0] == {"role": "system", "content": "Be nice."}


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        (
            {"type": "tool", "name": "get_weather"},
            {"type": "function", "function": {"name": "get_weather"}},
        ),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: Any) -> None:
    chat = messages_to_chat(
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "x"}],
            "tools": TOOLS,
            "tool_choice": choice,
        }
    )
    assert chat["tool_choice"] == expected
    assert "parallel_tool_calls" not in chat


def test_tool_results_come_first_and_keep_blocks() -> None:
    chat = messages_to_chat(
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "results:"},
                        {"type": "tool_result", "tool_use_id": "t1"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "t2",
                            "content": [
                                {"type": "text", "text": "chart:"},
                                {
                                    "type": "image",
                                    "source": {
                                        "type": "base64",
                                        "media_type": "image/png",
                                        "data": PNG,
                                    },
                                },
                            ],
                        },
                        {
                            "type": "tool_result",
                            "tool_use_id": "t3",
                            "content": [{"type": "text", "text": "boom"}],
                            "is_error": True,
                        },
                        {
                            "type": "tool_result",
                            "tool_use_id": "t4",
                            "content": [
                                {"type": "text", "text": "a"},
                                {"type": "text", "text": "b"},
                            ],
                        },
                    ],
                }
            ],
        }
    )
    assert chat["messages"] == [
        {"role": "tool", "tool_call_id": "t1", "content": ""},
        {
            "role": "tool",
            "tool_call_id": "t2",
            "content": [
                {"type": "text", "text": "chart:"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "t3", "content": "Error: boom"},
        {
            "role": "tool",
            "tool_call_id": "t4",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        },
        {"role": "user", "content": "results:"},
    ]


def test_documents_thinking_and_structured_output() -> None:
    chat = messages_to_chat(
        {
            "model": "m",
            "max_tokens": 5,
            "output_config": {
                "format": {"type": "json_schema", "schema": {"type": "object"}},
                "effort": "low",
            },
            "thinking": {"type": "enabled", "budget_tokens": 2000},
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "document",
                            "source": {
                                "type": "base64",
                                "media_type": "application/pdf",
                                "data": "JVBERi0=",
                            },
                            "title": "Q3",
                        },
                        {
                            "type": "document",
                            "source": {
                                "type": "text",
                                "media_type": "text/plain",
                                "data": "plain doc",
                            },
                        },
                    ],
                },
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                        {"type": "redacted_thinking", "data": "xyz"},
                        {"type": "text", "text": "Done."},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [{"type": "thinking", "thinking": "", "signature": "s"}],
                },
            ],
        }
    )
    assert chat["messages"][0]["content"] == [
        {
            "type": "file",
            "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "Q3"},
        },
        {"type": "text", "text": "plain doc"},
    ]
    assert chat["messages"][1] == {"role": "assistant", "content": "Done."}
    assert chat["messages"][2] == {"role": "assistant", "content": ""}  # thinking only
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": {"type": "object"}, "strict": True},
    }
    assert "thinking" not in chat


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "JSON object"),
        ({"max_tokens": 5, "messages": []}, "model"),
        ({"model": "m", "messages": []}, "max_tokens"),
        ({"model": "m", "max_tokens": "5", "messages": []}, "max_tokens"),
        ({"model": "m", "max_tokens": True, "messages": []}, "max_tokens"),
        ({"model": "m", "max_tokens": -1, "messages": []}, "max_tokens"),
        ({"model": "m", "max_tokens": 5}, "messages"),
        ({"model": "m", "max_tokens": 5, "messages": {"role": "user"}}, "messages"),
        (
            {"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
            "messages[0].role",
        ),
        (
            {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": 5}]},
            "messages[0].content",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": [{"type": "audio"}]}],
            },
            "'audio'",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": [{"type": "text"}]}],
            },
            "text",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}],
                    }
                ],
            },
            "image source type",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": "x"}],
                    }
                ],
            },
            "input is an object",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": [{"type": "tool_result"}]}],
            },
            "tool_use_id",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "assistant",
                        "content": [
                            {
                                "type": "server_tool_use",
                                "id": "s",
                                "name": "web_search",
                                "input": {},
                            }
                        ],
                    }
                ],
            },
            "server_tool_use",
        ),
        (
            {"model": "m", "max_tokens": 5, "messages": [], "system": [{"type": "image"}]},
            "system[0]",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [],
                "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            },
            "tools[0]",
        ),
        ({"model": "m", "max_tokens": 5, "messages": [], "tools": [{"name": "f"}]}, "input_schema"),
        (
            {"model": "m", "max_tokens": 5, "messages": [], "tool_choice": {"type": "sometimes"}},
            "tool_choice",
        ),
        (
            {"model": "m", "max_tokens": 5, "messages": [], "tool_choice": {"type": "tool"}},
            "tool_choice",
        ),
        (
            {"model": "m", "max_tokens": 5, "messages": [], "stop_sequences": "END"},
            "stop_sequences",
        ),
        ({"model": "m", "max_tokens": 5, "messages": [], "temperature": "hot"}, "temperature"),
        ({"model": "m", "max_tokens": 5, "messages": [], "stream": "yes"}, "stream"),
        ({"model": "m", "max_tokens": 5, "messages": [], "metadata": []}, "metadata"),
    ],
)
def test_invalid_requests(body: Any, message: str) -> None:
    with pytest.raises(ValueError, match=None) as exc:
        messages_to_chat(body)
    assert message in str(exc.value)


def test_round_trip_through_the_anthropic_adapter() -> None:
    original = sent_by_sdk(
        model="smart",
        max_tokens=512,
        system=[{"type": "text", "text": "Rule one."}, {"type": "text", "text": "Rule two."}],
        messages=[
            *CONVERSATION,
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "toolu_2",
                        "name": "get_weather",
                        "input": {"location": "Paris"},
                    },
                    {
                        "type": "tool_use",
                        "id": "toolu_3",
                        "name": "get_weather",
                        "input": {"location": "Rome"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "content": [
                            {"type": "text", "text": "see chart"},
                            {
                                "type": "image",
                                "source": {
                                    "type": "base64",
                                    "media_type": "image/jpeg",
                                    "data": "/9j/4AAQ",
                                },
                            },
                        ],
                    },
                    {"type": "tool_result", "tool_use_id": "toolu_3", "content": "20 degrees"},
                ],
            },
        ],
        tools=TOOLS,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        stop_sequences=["STOP"],
        metadata={"user_id": "u1"},
        extra_body={"temperature": 0.2, "top_p": 0.8},
        output_config={
            "format": {
                "type": "json_schema",
                "schema": {"type": "object", "additionalProperties": False},
            }
        },
    )
    chat = messages_to_chat(original)
    dep = Deployment(provider="claude", model="claude-sonnet-4-5")
    wire = AnthropicAdapter(LlmProvider(kind="anthropic")).chat_request(chat, dep, False, "k")
    assert wire.body is not None
    again = orjson.loads(wire.body)
    assert again == {**original, "model": "claude-sonnet-4-5"}


# -- response ---------------------------------------------------------------------------------


def canonical(message: dict[str, Any], finish: str = "stop", **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion",
        "created": 1741570283,
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "refusal": None, **message},
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
        **extra,
    }


def test_chat_to_message_with_tools_read_by_the_sdk() -> None:
    resp = canonical(
        {
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"location": "Boston"}'},
                },
                {
                    "id": "call_def",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": ""},
                },
                {
                    "id": "call_ghi",
                    "type": "function",
                    "function": {"name": "broken", "arguments": '{"loc'},
                },
            ],
        },
        "tool_calls",
        usage={
            "prompt_tokens": 82,
            "completion_tokens": 17,
            "total_tokens": 99,
            "prompt_tokens_details": {"cached_tokens": 64},
        },
    )
    out = chat_to_message(resp)
    assert out == {
        "id": "msg_B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "type": "message",
        "role": "assistant",
        "model": "gpt-4o-2024-08-06",
        "content": [
            {"type": "text", "text": "Let me look."},
            {
                "type": "tool_use",
                "id": "call_abc",
                "name": "get_weather",
                "input": {"location": "Boston"},
            },
            {"type": "tool_use", "id": "call_def", "name": "get_time", "input": {}},
            {
                "type": "tool_use",
                "id": "call_ghi",
                "name": "broken",
                "input": {"_raw_arguments": '{"loc'},
            },
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 18, "output_tokens": 17, "cache_read_input_tokens": 64},
    }
    message = sdk(json_response(out)).messages.create(
        model="x", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
    )
    assert isinstance(message, anthropic.types.Message)
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use", "tool_use"]
    block = message.content[1]
    assert isinstance(block, anthropic.types.ToolUseBlock)
    assert block.input == {"location": "Boston"} and block.id == "call_abc"
    assert message.usage.input_tokens == 18 and message.usage.cache_read_input_tokens == 64


@pytest.mark.parametrize(
    ("finish", "stop"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("content_filter", "refusal"),
        (None, "end_turn"),
    ],
)
def test_chat_to_message_stop_reasons(finish: str | None, stop: str) -> None:
    out = chat_to_message(canonical({"content": "x"}, finish))  # type: ignore[arg-type]
    assert out["stop_reason"] == stop


def test_tool_calls_with_finish_stop_are_tool_use() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert (
        chat_to_message(canonical({"content": None, "tool_calls": [call]}))["stop_reason"]
        == "tool_use"
    )
    w = MessagesStreamWriter("m")
    data = w.chunk(chunk(tool(0, id="c1", name="f", args="{}"))) + w.finish("stop", None)
    assert final(data).stop_reason == "tool_use"


def test_chat_to_message_edge_cases() -> None:
    out = chat_to_message(
        {
            "id": "msg_keep",
            "model": "m",
            "choices": [
                {
                    "message": {"content": None, "refusal": "I can't help with that."},
                    "finish_reason": "content_filter",
                }
            ],
        }
    )
    assert out["id"] == "msg_keep"
    assert out["content"] == [{"type": "text", "text": "I can't help with that."}]
    assert out["usage"] == {"input_tokens": 0, "output_tokens": 0}
    out = chat_to_message(
        {
            "choices": [
                {
                    "message": {
                        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
                    },
                    "finish_reason": "stop",
                }
            ]
        }
    )
    assert out["id"].startswith("msg_") and len(out["id"]) > 10
    assert out["content"] == [{"type": "text", "text": "ab"}]
    out = chat_to_message({"choices": []})
    assert out["content"] == [] and out["stop_reason"] == "end_turn"
    sdk_message = sdk(json_response(out)).messages.create(
        model="x", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
    )
    assert sdk_message.content == []


# -- errors -----------------------------------------------------------------------------------


def test_error_types_and_body() -> None:
    assert ERROR_TYPES[400] == "invalid_request_error"
    assert [error_type(s) for s in (400, 401, 403, 404, 413, 429, 500, 529)] == [
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
        "rate_limit_error",
        "api_error",
        "overloaded_error",
    ]
    assert error_type(409) == "invalid_request_error" and error_type(502) == "api_error"
    assert orjson.loads(anthropic_error_body("rate_limit_error", "slow down")) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "slow down"},
    }


@pytest.mark.parametrize(
    ("status", "exc"),
    [
        (400, anthropic.BadRequestError),
        (401, anthropic.AuthenticationError),
        (403, anthropic.PermissionDeniedError),
        (404, anthropic.NotFoundError),
        (429, anthropic.RateLimitError),
        (500, anthropic.InternalServerError),
        (529, anthropic.InternalServerError),
    ],
)
def test_sdk_reads_error_bodies(status: int, exc: type[Exception]) -> None:
    body = anthropic_error_body(error_type(status), "the reason")

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, headers={"content-type": "application/json"}, content=body)

    with pytest.raises(exc) as err:
        sdk(handler).messages.create(
            model="x", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    assert isinstance(err.value, anthropic.APIStatusError)
    assert err.value.status_code == status
    assert err.value.body == {
        "type": "error",
        "error": {"type": error_type(status), "message": "the reason"},
    }


# -- stream writer ----------------------------------------------------------------------------


def chunk(
    delta: dict[str, Any], finish: str | None = None, model: str = "gpt-4o-mini"
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def tool(
    index: int, *, id: str | None = None, name: str | None = None, args: str | None = None
) -> dict[str, Any]:
    call: dict[str, Any] = {"index": index, "function": {}}
    if id is not None:
        call["id"] = id
        call["type"] = "function"
    if name is not None:
        call["function"]["name"] = name
    if args is not None:
        call["function"]["arguments"] = args
    return {"tool_calls": [call]}


def events(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    reader = SSEReader()
    out = [(name, orjson.loads(payload)) for name, payload in reader.feed(data)]
    assert reader.close() == []
    for name, payload in out:
        assert payload["type"] == name
    return out


def final(data: bytes) -> anthropic.types.Message:
    with sdk(sse_response(data)).messages.stream(
        model="x", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        message = stream.get_final_message()
    return message


def test_writer_text_and_tools_read_by_the_sdk() -> None:
    w = MessagesStreamWriter()
    data = w.chunk(chunk({"role": "assistant", "content": ""}, model="gpt-4o-mini-2024-07-18"))
    data += w.chunk(chunk({"content": "Checking "}))
    data += w.chunk(chunk({"content": "now."}))
    data += w.chunk(chunk(tool(0, id="call_1", name="get_weather", args="")))
    data += w.chunk(chunk(tool(0, args='{"location"')))
    data += w.chunk(chunk(tool(0, args=': "Boston"}')))
    data += w.chunk(chunk(tool(1, id="call_2", name="get_time", args="{}")))
    data += w.chunk(chunk({}, "tool_calls"))
    data += w.chunk(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [],
            "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42},
        }
    )
    data += w.finish(None, None)
    assert [name for name, _ in events(data)] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    message = final(data)
    assert message.model == "gpt-4o-mini-2024-07-18"
    assert message.id.startswith("msg_")
    assert message.stop_reason == "tool_use"
    assert message.usage.input_tokens == 30 and message.usage.output_tokens == 12
    assert len(message.content) == 3
    text, first, second = message.content
    assert isinstance(text, anthropic.types.TextBlock) and text.text == "Checking now."
    assert isinstance(first, anthropic.types.ToolUseBlock)
    assert (first.id, first.name, first.input) == ("call_1", "get_weather", {"location": "Boston"})
    assert isinstance(second, anthropic.types.ToolUseBlock)
    assert (second.id, second.name, second.input) == ("call_2", "get_time", {})


def test_writer_text_after_a_tool_opens_a_new_block_and_usage_from_finish() -> None:
    w = MessagesStreamWriter("fallback-model", input_tokens=7)
    data = w.start() + w.start()
    data += w.chunk(chunk(tool(0, name="lookup", args='{"q": 1}')))  # no id: one is made
    data += w.chunk(chunk({"content": "Also..."}))
    data += w.finish("length", {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13})
    start = events(data)[0][1]
    assert start["message"]["usage"] == {"input_tokens": 7, "output_tokens": 0}
    assert start["message"]["model"] == "fallback-model"
    message = final(data)
    assert message.stop_reason == "max_tokens"
    assert [b.type for b in message.content] == ["tool_use", "text"]
    block = message.content[0]
    assert isinstance(block, anthropic.types.ToolUseBlock)
    assert block.id.startswith("toolu_") and block.input == {"q": 1}
    assert message.usage.input_tokens == 9 and message.usage.output_tokens == 4


def test_writer_empty_answer() -> None:
    w = MessagesStreamWriter("m")
    data = w.finish("stop", None)
    assert [name for name, _ in events(data)] == ["message_start", "message_delta", "message_stop"]
    message = final(data)
    assert message.content == [] and message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 0


def test_writer_ping_and_content_filter() -> None:
    w = MessagesStreamWriter("m")
    data = (
        w.chunk(chunk({"content": "partial"}))
        + w.ping()
        + w.chunk(chunk({"content": ""}))
        + w.finish("content_filter", None)
    )
    message = final(data)
    assert message.stop_reason == "refusal"
    assert [b.type for b in message.content] == ["text"]


def test_writer_error_event_raises_in_the_sdk() -> None:
    w = MessagesStreamWriter("m")
    data = w.chunk(chunk({"content": "Once upon"})) + w.error(
        "overloaded_error", "the provider stopped mid-answer"
    )
    names = [name for name, _ in events(data)]
    assert (
        names[-1] == "error" and "message_stop" not in names and "content_block_stop" not in names
    )
    assert events(data)[-1][1] == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "the provider stopped mid-answer"},
    }
    with pytest.raises(anthropic.APIStatusError) as err:
        final(data)
    assert "the provider stopped mid-answer" in str(err.value)


# the same answer from an Anthropic provider, through the gateway's two translations
PROVIDER_STREAM = b"".join(
    b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n"
    for e in [
        {
            "type": "message_start",
            "message": {
                "id": "msg_01",
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": "claude-sonnet-4-5-20250929",
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 472, "output_tokens": 2},
            },
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "Okay, let's check the weather"},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": " for San Francisco, CA:"},
        },
        {"type": "content_block_stop", "index": 0},
        {"type": "ping"},
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {
                "type": "tool_use",
                "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                "name": "get_weather",
                "input": {},
            },
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": ""},
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": '{"location":'},
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": ' "San Francisc'},
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": 'o, CA", "unit": "fahrenheit"}'},
        },
        {"type": "content_block_stop", "index": 1},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 89},
        },
        {"type": "message_stop"},
    ]
)


def test_provider_stream_through_decoder_and_writer() -> None:
    dec = AnthropicAdapter(LlmProvider(kind="anthropic")).stream_decoder(
        Deployment(provider="p", model="m")
    )
    w = MessagesStreamWriter()
    data = b"".join(w.chunk(c) for c in dec.feed(PROVIDER_STREAM) + dec.close())
    assert dec.done
    data += w.finish(dec.finish_reason, dec.usage)
    message = final(data)
    assert message.model == "claude-sonnet-4-5-20250929"
    assert message.stop_reason == "tool_use"
    assert message.usage.input_tokens == 472 and message.usage.output_tokens == 89
    text, call = message.content
    assert isinstance(text, anthropic.types.TextBlock)
    assert text.text == "Okay, let's check the weather for San Francisco, CA:"
    assert isinstance(call, anthropic.types.ToolUseBlock)
    assert call.id == "toolu_01T1x1fJ34qAmk2tNTrN7Up6"
    assert call.input == {"location": "San Francisco, CA", "unit": "fahrenheit"}


_piece = st.one_of(
    st.tuples(st.just("text"), st.text(min_size=1, max_size=12)),
    st.tuples(
        st.just("tool"),
        st.dictionaries(
            st.text(max_size=5),
            st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.text(max_size=5),
            max_size=3,
        ),
    ),
)


@settings(max_examples=40, deadline=None)
@given(pieces=st.lists(_piece, max_size=6), split=st.integers(min_value=1, max_value=7))
def test_writer_output_is_what_the_sdk_accumulates(
    pieces: list[tuple[str, Any]], split: int
) -> None:
    w = MessagesStreamWriter("m")
    data = b""
    expected: list[tuple[str, Any]] = []
    tools = 0
    for kind, value in pieces:
        if kind == "text":
            data += w.chunk(chunk({"content": value}))
            if expected and expected[-1][0] == "text":
                expected[-1] = ("text", expected[-1][1] + value)
            else:
                expected.append(("text", value))
        else:
            args = orjson.dumps(value).decode()
            data += w.chunk(chunk(tool(tools, id=f"call_{tools}", name="f", args="")))
            for i in range(0, len(args), split):
                data += w.chunk(chunk(tool(tools, args=args[i : i + split])))
            expected.append(("tool", value))
            tools += 1
    data += w.finish(
        "tool_calls" if tools else "stop",
        {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    )
    message = final(data)
    got: list[tuple[str, Any]] = []
    for block in message.content:
        if isinstance(block, anthropic.types.TextBlock):
            got.append(("text", block.text))
        else:
            assert isinstance(block, anthropic.types.ToolUseBlock)
            got.append(("tool", block.input))
    assert got == expected
