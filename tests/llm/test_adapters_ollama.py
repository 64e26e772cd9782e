"""The ollama adapter: canonical requests → native ``/api/chat`` and ``/api/embed``; Ollama's
answers and NDJSON streams → canonical; Ollama's errors classified.

Payloads follow Ollama's API documentation (docs/api.md)."""

from __future__ import annotations

import copy
import re
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from piuptime.config.llm import LlmProvider
from piuptime.llm.providers import make_adapter
from piuptime.llm.providers.base import (
    AUTH,
    BAD_REQUEST,
    CONTEXT_LENGTH,
    NOT_FOUND,
    OVERLOADED,
    PROTOCOL,
    RATE_LIMITED,
    SERVER,
    Deployment,
    ProviderError,
)
from piuptime.llm.providers.ollama import OllamaAdapter


def adapter(**kw: Any) -> OllamaAdapter:
    a = make_adapter(LlmProvider(kind="ollama", **kw))
    assert isinstance(a, OllamaAdapter)
    return a


DEP = Deployment(provider="pi", model="llama3.2:3b")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather for a location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string"},
                "format": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location", "format"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


def sent(wire: Any) -> Any:
    assert wire.body is not None
    return orjson.loads(wire.body)


# -- requests -------------------------------------------------------------------------------


def test_chat_request_translation() -> None:
    body = {
        "model": "local",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {
                        "type": "image_url",
                        "image_url": {
                            "url": "data:image/jpeg;base64,/9j/4AAQSkZJRg==",
                            "detail": "auto",
                        },
                    },
                    {"type": "text", "text": "And the weather?"},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_abc",
                        "type": "function",
                        "function": {
                            "name": "get_current_weather",
                            "arguments": '{"location":"Paris, FR","format":"celsius"}',
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_abc", "content": "22 degrees, sunny"},
        ],
        "tools": [WEATHER_TOOL],
        "temperature": 0.2,
        "top_p": 0.9,
        "seed": 42,
        "stop": "###",
        "max_tokens": 128,
        "response_format": {"type": "json_object"},
    }
    before = copy.deepcopy(body)
    wire = adapter().chat_request(body, DEP, False, None)
    assert body == before
    assert wire.method == b"POST" and wire.path == b"/api/chat"
    headers = dict(wire.headers)
    assert b"authorization" not in headers
    assert headers[b"accept"] == b"application/json"
    assert sent(wire) == {
        "model": "llama3.2:3b",
        "stream": False,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "system", "content": "Answer in French."},
            {
                "role": "user",
                "content": "What is in this picture?\nAnd the weather?",
                "images": ["/9j/4AAQSkZJRg=="],
            },
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "function": {
                            "name": "get_current_weather",
                            "arguments": {"location": "Paris, FR", "format": "celsius"},
                        }
                    }
                ],
            },
            {"role": "tool", "content": "22 degrees, sunny", "tool_name": "get_current_weather"},
        ],
        "tools": [WEATHER_TOOL],
        "format": "json",
        "options": {
            "temperature": 0.2,
            "top_p": 0.9,
            "seed": 42,
            "stop": ["###"],
            "num_predict": 128,
        },
    }


def test_chat_request_streamed_with_key_and_base_path() -> None:
    a = adapter(base_url="https://gpu.example/ollama", headers={"X-Tenant": "t1"})
    wire = a.chat_request({"messages": [{"role": "user", "content": "hi"}]}, DEP, True, "secret")
    assert wire.path == b"/ollama/api/chat"
    headers = dict(wire.headers)
    assert headers[b"authorization"] == b"Bearer secret"
    assert headers[b"accept"] == b"application/x-ndjson"
    assert headers[b"x-tenant"] == b"t1"
    assert sent(wire)["stream"] is True


def test_deployment_params_merge_under_the_client() -> None:
    dep = Deployment(
        "pi",
        "qwen2.5:7b",
        {
            "options": {"num_ctx": 8192, "temperature": 0.1, "num_predict": 64},
            "keep_alive": "30m",
            "top_p": 0.5,
        },
    )
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.9,
        "max_completion_tokens": 32,
    }
    out = sent(adapter().chat_request(body, dep, False, None))
    assert out["options"] == {"num_ctx": 8192, "temperature": 0.9, "num_predict": 32, "top_p": 0.5}
    assert out["keep_alive"] == "30m"
    # without the client's values the deployment's stand
    out = sent(adapter().chat_request({"messages": []}, dep, False, None))
    assert out["options"] == {"num_ctx": 8192, "temperature": 0.1, "num_predict": 64, "top_p": 0.5}


def test_json_schema_format() -> None:
    schema = {
        "type": "object",
        "properties": {"age": {"type": "integer"}, "available": {"type": "boolean"}},
        "required": ["age", "available"],
    }
    body = {
        "messages": [{"role": "user", "content": "Ollama is 22 years old and busy."}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "info", "schema": schema, "strict": True},
        },
    }
    assert sent(adapter().chat_request(body, DEP, False, None))["format"] == schema
    body["response_format"] = {"type": "text"}
    assert "format" not in sent(adapter().chat_request(body, DEP, False, None))


def test_tool_choice() -> None:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [WEATHER_TOOL, TIME_TOOL],
    }
    assert len(sent(adapter().chat_request(body, DEP, False, None))["tools"]) == 2
    body["tool_choice"] = "none"
    assert "tools" not in sent(adapter().chat_request(body, DEP, False, None))
    body["tool_choice"] = {"type": "function", "function": {"name": "get_time"}}
    assert sent(adapter().chat_request(body, DEP, False, None))["tools"] == [TIME_TOOL]


def test_strict_is_dropped_from_tools() -> None:
    tool = copy.deepcopy(WEATHER_TOOL)
    tool["function"]["strict"] = True
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [tool]}
    assert sent(adapter().chat_request(body, DEP, False, None))["tools"] == [WEATHER_TOOL]
    assert tool["function"]["strict"] is True


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    ],
)
def test_unsupported_parts_refused_before_sending(part: dict[str, Any]) -> None:
    body = {"messages": [{"role": "user", "content": [part]}]}
    with pytest.raises(ProviderError) as info:
        adapter().chat_request(body, DEP, False, None)
    assert info.value.kind == BAD_REQUEST and info.value.status == 400


def test_broken_tool_arguments_become_an_empty_object() -> None:
    body = {
        "messages": [
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{bad"}}
                ],
            }
        ]
    }
    out = sent(adapter().chat_request(body, DEP, False, None))
    assert out["messages"][0]["tool_calls"][0]["function"]["arguments"] == {}


# -- whole answers --------------------------------------------------------------------------

ANSWER = {
    "model": "llama3.2:3b",
    "created_at": "2023-12-12T14:13:43.416799Z",
    "message": {"role": "assistant", "content": "Hello! How are you today?"},
    "done": True,
    "done_reason": "stop",
    "total_duration": 5191566416,
    "load_duration": 2154458,
    "prompt_eval_count": 26,
    "prompt_eval_duration": 383809000,
    "eval_count": 298,
    "eval_duration": 4799921000,
}

TOOL_ANSWER = {
    "model": "llama3.2:3b",
    "created_at": "2024-07-22T20:33:28.123648Z",
    "message": {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "function": {
                    "name": "get_current_weather",
                    "arguments": {"format": "celsius", "location": "Paris, FR"},
                }
            }
        ],
    },
    "done_reason": "stop",
    "done": True,
    "total_duration": 885095291,
    "load_duration": 3753500,
    "prompt_eval_count": 122,
    "prompt_eval_duration": 328493000,
    "eval_count": 33,
    "eval_duration": 552222000,
}


def test_chat_response_text() -> None:
    got = adapter().chat_response(orjson.dumps(ANSWER), DEP)
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{24}", got["id"])
    assert isinstance(got["created"], int)
    assert got == {
        "id": got["id"],
        "object": "chat.completion",
        "created": got["created"],
        "model": "llama3.2:3b",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello! How are you today?",
                    "refusal": None,
                },
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 26, "completion_tokens": 298, "total_tokens": 324},
    }


def test_chat_response_tool_calls() -> None:
    got = adapter().chat_response(orjson.dumps(TOOL_ANSWER), DEP)
    choice = got["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"])
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_current_weather"
    assert orjson.loads(call["function"]["arguments"]) == {
        "format": "celsius",
        "location": "Paris, FR",
    }


@pytest.mark.parametrize(
    ("done_reason", "finish"),
    [("stop", "stop"), ("length", "length"), ("load", "stop"), (None, "stop")],
)
def test_chat_response_finish_reasons(done_reason: str | None, finish: str) -> None:
    answer = {**ANSWER, "done_reason": done_reason}
    got = adapter().chat_response(orjson.dumps(answer), DEP)
    assert got["choices"][0]["finish_reason"] == finish


def test_chat_response_usage_when_prompt_cached() -> None:
    answer = {k: v for k, v in ANSWER.items() if k != "prompt_eval_count"}
    got = adapter().chat_response(orjson.dumps(answer), DEP)
    assert got["usage"] == {"prompt_tokens": 0, "completion_tokens": 298, "total_tokens": 298}
    bare = {k: v for k, v in answer.items() if k != "eval_count"}
    assert "usage" not in adapter().chat_response(orjson.dumps(bare), DEP)


def test_chat_response_model_missing() -> None:
    answer = {k: v for k, v in ANSWER.items() if k != "model"}
    assert adapter().chat_response(orjson.dumps(answer), DEP)["model"] == "llama3.2:3b"


@pytest.mark.parametrize("data", [b"", b"nope", b"[]", b'{"done":true}'])
def test_chat_response_unreadable(data: bytes) -> None:
    with pytest.raises(ProviderError) as info:
        adapter().chat_response(data, DEP)
    assert info.value.kind == PROTOCOL


def test_chat_response_error_body() -> None:
    with pytest.raises(ProviderError) as info:
        adapter().chat_response(b'{"error":"model \\"x\\" not found, try pulling it first"}', DEP)
    assert info.value.kind == NOT_FOUND


# -- streams --------------------------------------------------------------------------------


def line(content: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "llama3.2:3b",
        "created_at": "2023-08-04T08:52:19.385406455-07:00",
        "message": {"role": "assistant", "content": content, **extra},
        "done": False,
    }


FINAL = {
    "model": "llama3.2:3b",
    "created_at": "2023-08-04T19:22:45.499127Z",
    "message": {"role": "assistant", "content": ""},
    "done": True,
    "done_reason": "stop",
    "total_duration": 4883583458,
    "load_duration": 1334875,
    "prompt_eval_count": 26,
    "prompt_eval_duration": 342546000,
    "eval_count": 282,
    "eval_duration": 4535599000,
}


def ndjson(*objs: Any) -> bytes:
    return b"".join((o if isinstance(o, bytes) else orjson.dumps(o)) + b"\n" for o in objs)


TEXT_STREAM = ndjson(line("The"), line(" sky"), line(" is blue ☁️"), FINAL)
TOOL_STREAM = ndjson(
    line("", thinking="The user wants weather."),
    line(
        "",
        tool_calls=[
            {"function": {"name": "get_current_weather", "arguments": {"location": "Paris"}}},
            {"function": {"name": "get_time", "arguments": {}}},
        ],
    ),
    line("", tool_calls=[{"function": {"name": "get_time", "arguments": {"tz": "UTC"}}}]),
    FINAL,
)


def decode(data: bytes, pieces: list[bytes] | None = None) -> tuple[Any, list[dict[str, Any]]]:
    decoder = adapter().stream_decoder(DEP)
    out: list[dict[str, Any]] = []
    for piece in pieces if pieces is not None else [data]:
        out += decoder.feed(piece)
    out += decoder.close()
    return decoder, out


def test_stream_text() -> None:
    decoder, chunks = decode(TEXT_STREAM)
    assert decoder.done and decoder.finish_reason == "stop"
    assert decoder.usage == {"prompt_tokens": 26, "completion_tokens": 282, "total_tokens": 308}
    assert decoder.text_out() == "The sky is blue ☁️"
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": "The"},
        {"content": " sky"},
        {"content": " is blue ☁️"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert all(
        c["object"] == "chat.completion.chunk" and c["model"] == "llama3.2:3b" for c in chunks
    )


def test_stream_tool_calls() -> None:
    decoder, chunks = decode(TOOL_STREAM)
    assert decoder.done and decoder.finish_reason == "tool_calls"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}  # thinking is not passed on
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [c["index"] for c in calls] == [0, 1, 2]
    assert [c["function"]["name"] for c in calls] == ["get_current_weather", "get_time", "get_time"]
    assert [orjson.loads(c["function"]["arguments"]) for c in calls] == [
        {"location": "Paris"},
        {},
        {"tz": "UTC"},
    ]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 3
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert "The user wants weather." in decoder.text_out()
    assert '{"location":"Paris"}' in decoder.text_out()


def test_stream_length() -> None:
    decoder, chunks = decode(ndjson(line("a"), {**FINAL, "done_reason": "length"}))
    assert decoder.finish_reason == "length"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stream_final_line_with_content() -> None:
    final = {**FINAL, "message": {"role": "assistant", "content": "!"}}
    decoder, chunks = decode(ndjson(final))
    assert decoder.done
    assert chunks == [
        {
            "id": chunks[0]["id"],
            "object": "chat.completion.chunk",
            "created": chunks[0]["created"],
            "model": "llama3.2:3b",
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "!"},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
        }
    ]


def test_stream_without_done() -> None:
    decoder, chunks = decode(ndjson(line("a"), line("b")))
    assert not decoder.done and decoder.finish_reason is None and decoder.usage is None
    assert len(chunks) == 2


def test_stream_last_line_without_newline() -> None:
    decoder, _ = decode(ndjson(line("a")) + orjson.dumps(FINAL))
    assert decoder.done and decoder.usage is not None


def test_stream_malformed_lines_skipped() -> None:
    decoder, chunks = decode(ndjson(line("a"), b"{oops", b"42", line("b"), FINAL))
    assert decoder.malformed == 2
    assert decoder.text_out() == "ab"
    assert decoder.done and len(chunks) == 3


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("an error was encountered while running the model: unexpected EOF", SERVER),
        ("input length exceeds maximum context length", CONTEXT_LENGTH),
    ],
)
def test_stream_error_line_raises(message: str, kind: str) -> None:
    decoder = adapter().stream_decoder(DEP)
    decoder.feed(ndjson(line("a")))
    with pytest.raises(ProviderError) as info:
        decoder.feed(ndjson({"error": message}))
    assert info.value.kind == kind and info.value.message == message


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, start = [], 0
    for p in points:
        out.append(data[start:p])
        start = p
    return [*out, data[start:]]


def normal(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chunks with the generated ids and times blanked (they differ between decoders)."""
    out = copy.deepcopy(chunks)
    for c in out:
        c["id"] = c["created"] = None
        for tc in c["choices"][0]["delta"].get("tool_calls", []):
            tc["id"] = None
    return out


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from([TEXT_STREAM, TOOL_STREAM, ndjson(line("a"), b"{bad", FINAL)]),
    st.lists(st.integers(min_value=0, max_value=100_000), max_size=60),
)
def test_stream_any_split_same_result(data: bytes, cuts: list[int]) -> None:
    whole, expected = decode(data)
    decoder, chunks = decode(data, split(data, cuts))
    assert normal(chunks) == normal(expected)
    assert (decoder.done, decoder.finish_reason, decoder.usage, decoder.malformed) == (
        whole.done,
        whole.finish_reason,
        whole.usage,
        whole.malformed,
    )
    assert decoder.text_out() == whole.text_out()


# -- embeddings -----------------------------------------------------------------------------


def test_embeddings() -> None:
    a = adapter()
    dep = Deployment("pi", "all-minilm", {"keep_alive": "5m", "truncate": True})
    wire = a.embeddings_request(
        {"model": "embed", "input": ["Why is the sky blue?", "Why is the grass green?"]}, dep, None
    )
    assert wire.path == b"/api/embed"
    assert sent(wire) == {
        "model": "all-minilm",
        "input": ["Why is the sky blue?", "Why is the grass green?"],
        "keep_alive": "5m",
        "truncate": True,
    }
    answer = {
        "model": "all-minilm",
        "embeddings": [[0.010071029, -0.0017594862, 0.05007221], [-0.0098027075, 0.06042469]],
        "total_duration": 14143917,
        "load_duration": 1019500,
        "prompt_eval_count": 8,
    }
    assert a.embeddings_response(orjson.dumps(answer), dep) == {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": 0,
                "embedding": [0.010071029, -0.0017594862, 0.05007221],
            },
            {"object": "embedding", "index": 1, "embedding": [-0.0098027075, 0.06042469]},
        ],
        "model": "all-minilm",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }
    single = sent(a.embeddings_request({"input": "one", "dimensions": 64}, DEP, None))
    assert single == {"model": "llama3.2:3b", "input": "one", "dimensions": 64}


def test_embeddings_refusals() -> None:
    with pytest.raises(ProviderError) as info:
        adapter().embeddings_request({"input": [[1, 2, 3]]}, DEP, None)
    assert info.value.kind == BAD_REQUEST
    with pytest.raises(ProviderError):
        adapter().embeddings_request({"input": 5}, DEP, None)
    with pytest.raises(ProviderError) as info:
        adapter().embeddings_response(b'{"model":"x"}', DEP)
    assert info.value.kind == PROTOCOL


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (404, b'{"error":"model \\"llama9\\" not found, try pulling it first"}', NOT_FOUND),
        (400, b'{"error":"input length exceeds maximum context length"}', CONTEXT_LENGTH),
        (500, b'{"error":"the input length exceeds the context length"}', CONTEXT_LENGTH),
        (400, b'{"error":"invalid options: foo"}', BAD_REQUEST),
        (
            500,
            b'{"error":"model requires more system memory (5.5 GiB) than is available (3.1 GiB)"}',
            SERVER,
        ),
        (
            503,
            b'{"error":"server busy, please try again.  maximum pending requests exceeded"}',
            OVERLOADED,
        ),
        (429, b'{"error":"too many requests"}', RATE_LIMITED),
        (401, b"unauthorized", AUTH),  # a reverse proxy in front of Ollama
        (502, b"", SERVER),
    ],
)
def test_classify(status: int, body: bytes, kind: str) -> None:
    e = adapter().classify(status, [(b"retry-after", b"3")], body)
    assert e.kind == kind and e.status == status and e.message
    if kind in (RATE_LIMITED, OVERLOADED):
        assert e.retry_after == 3.0
    if kind == CONTEXT_LENGTH:
        assert e.code == "context_length_exceeded"


def test_classify_keeps_ollamas_message() -> None:
    e = adapter().classify(
        404, [], b'{"error":"model \\"llama9\\" not found, try pulling it first"}'
    )
    assert e.message == 'model "llama9" not found, try pulling it first'
