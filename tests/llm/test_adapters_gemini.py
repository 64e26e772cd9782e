"""The gemini adapter: canonical requests → ``generateContent`` / ``streamGenerateContent``
/ ``batchEmbedContents``; Gemini's answers and SSE streams → canonical; google.rpc errors
classified.

Payloads follow the Gemini API reference (GenerateContentRequest/Response, Part, Schema,
google.rpc.Status with RetryInfo/ErrorInfo details)."""

from __future__ import annotations

import base64
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
from piuptime.llm.providers.gemini import GeminiAdapter, gemini_schema


def adapter(**kw: Any) -> GeminiAdapter:
    a = make_adapter(LlmProvider(kind="gemini", **kw))
    assert isinstance(a, GeminiAdapter)
    return a


DEP = Deployment(provider="google", model="gemini-2.5-flash")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": ["string", "null"], "enum": ["c", "f", None]},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


def sent(wire: Any) -> Any:
    assert wire.body is not None
    return orjson.loads(wire.body)


def chat(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": "smart", "messages": messages, **extra}


# -- requests -------------------------------------------------------------------------------


def test_chat_request_translation() -> None:
    body = chat(
        [
            {"role": "system", "content": "You are a weather bot."},
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare these skies"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                    },
                    {"type": "image_url", "image_url": {"url": "https://example.com/sky.webp?x=1"}},
                ],
            },
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": ""},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "sky": "clear"}'},
            {"role": "tool", "tool_call_id": "call_2", "content": "14:02"},
            {"role": "user", "content": "Thanks"},
        ],
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice="auto",
        temperature=0.3,
        top_p=0.95,
        seed=7,
        n=1,
        max_completion_tokens=256,
        stop=["END"],
        response_format={"type": "json_object"},
    )
    before = copy.deepcopy(body)
    wire = adapter().chat_request(body, DEP, False, "AIza-test")
    assert body == before
    assert wire.method == b"POST"
    assert wire.path == b"/v1beta/models/gemini-2.5-flash:generateContent"
    headers = dict(wire.headers)
    assert headers[b"x-goog-api-key"] == b"AIza-test"
    assert b"authorization" not in headers
    assert headers[b"content-type"] == b"application/json"
    assert sent(wire) == {
        "systemInstruction": {"parts": [{"text": "You are a weather bot."}, {"text": "Be brief."}]},
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": "Compare these skies"},
                    {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
                    {
                        "fileData": {
                            "mimeType": "image/webp",
                            "fileUri": "https://example.com/sky.webp?x=1",
                        }
                    },
                ],
            },
            {
                "role": "model",
                "parts": [
                    {"text": "Let me check."},
                    {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                    {"functionCall": {"name": "get_time", "args": {}}},
                ],
            },
            {
                "role": "user",
                "parts": [
                    {
                        "functionResponse": {
                            "name": "get_weather",
                            "response": {"temp": 21, "sky": "clear"},
                        }
                    },
                    {"functionResponse": {"name": "get_time", "response": {"output": "14:02"}}},
                    {"text": "Thanks"},
                ],
            },
        ],
        "tools": [
            {
                "functionDeclarations": [
                    {
                        "name": "get_weather",
                        "description": "Current weather in a city",
                        "parameters": {
                            "type": "object",
                            "properties": {
                                "city": {"type": "string", "description": "City name"},
                                "unit": {
                                    "type": "string",
                                    "nullable": True,
                                    "enum": ["c", "f", None],
                                },
                            },
                            "required": ["city"],
                        },
                    },
                    {"name": "get_time"},
                ]
            }
        ],
        "toolConfig": {"functionCallingConfig": {"mode": "AUTO"}},
        "generationConfig": {
            "temperature": 0.3,
            "topP": 0.95,
            "seed": 7,
            "candidateCount": 1,
            "maxOutputTokens": 256,
            "stopSequences": ["END"],
            "responseMimeType": "application/json",
        },
    }


def test_streamed_request_path_and_accept() -> None:
    wire = adapter().chat_request(chat([{"role": "user", "content": "hi"}]), DEP, True, "k")
    assert wire.path == b"/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert dict(wire.headers)[b"accept"] == b"text/event-stream"
    assert sent(wire) == {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


@pytest.mark.parametrize(
    ("base_url", "model", "path"),
    [
        (None, "gemini-2.0-flash", b"/v1beta/models/gemini-2.0-flash:generateContent"),
        (None, "models/gemini-2.0-flash", b"/v1beta/models/gemini-2.0-flash:generateContent"),
        ("https://proxy.example/google/v1beta", "g", b"/google/v1beta/models/g:generateContent"),
        ("https://proxy.example/v1", "g", b"/v1/models/g:generateContent"),
        ("http://127.0.0.1:9999/fake", "g", b"/fake/v1beta/models/g:generateContent"),
    ],
)
def test_paths(base_url: str | None, model: str, path: bytes) -> None:
    dep = Deployment("google", model)
    wire = adapter(base_url=base_url).chat_request(chat([]), dep, False, None)
    assert wire.path == path
    assert b"x-goog-api-key" not in dict(wire.headers)


@pytest.mark.parametrize(
    ("choice", "config"),
    [
        ("auto", {"mode": "AUTO"}),
        ("none", {"mode": "NONE"}),
        ("required", {"mode": "ANY"}),
        (
            {"type": "function", "function": {"name": "get_time"}},
            {"mode": "ANY", "allowedFunctionNames": ["get_time"]},
        ),
    ],
)
def test_tool_choice(choice: Any, config: dict[str, Any]) -> None:
    body = chat([{"role": "user", "content": "hi"}], tools=[TIME_TOOL], tool_choice=choice)
    assert sent(adapter().chat_request(body, DEP, False, None))["toolConfig"] == {
        "functionCallingConfig": config
    }


def test_json_schema_response_format() -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}},
            "kind": {"const": "recipe"},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["name"],
        "additionalProperties": False,
        "$defs": {"tag": {"type": "string", "maxLength": 20, "additionalProperties": False}},
    }
    body = chat(
        [{"role": "user", "content": "a recipe"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "recipe", "schema": schema, "strict": True},
        },
    )
    gc = sent(adapter().chat_request(body, DEP, False, None))["generationConfig"]
    assert gc == {
        "responseMimeType": "application/json",
        "responseSchema": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}},
                "kind": {"enum": ["recipe"]},
                "note": {"type": "string", "nullable": True},
            },
            "required": ["name"],
        },
    }


def test_recursive_schema_is_bounded() -> None:
    schema = {
        "type": "object",
        "properties": {"child": {"$ref": "#/$defs/node"}},
        "$defs": {"node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/node"}}}},
    }
    out = gemini_schema(schema)
    depth = 0
    while "properties" in out:
        out = out["properties"]["child"]
        depth += 1
    assert 10 < depth < 40


def test_deployment_params() -> None:
    dep = Deployment(
        "google",
        "gemini-2.5-pro",
        {
            "temperature": 0.1,
            "generationConfig": {"thinkingConfig": {"thinkingBudget": 1024}, "topK": 40},
            "safetySettings": [
                {"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_ONLY_HIGH"}
            ],
        },
    )
    out = sent(
        adapter().chat_request(
            chat([{"role": "user", "content": "hi"}], temperature=1.0, max_tokens=10),
            dep,
            False,
            None,
        )
    )
    assert out["generationConfig"] == {
        "thinkingConfig": {"thinkingBudget": 1024},
        "topK": 40,
        "temperature": 1.0,
        "maxOutputTokens": 10,
    }
    assert out["safetySettings"][0]["threshold"] == "BLOCK_ONLY_HIGH"


def test_pdf_file_part_and_empty_assistant_turn() -> None:
    body = chat(
        [
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
            },
            {"role": "assistant", "content": None},
            {"role": "user", "content": "Go on"},
        ]
    )
    contents = sent(adapter().chat_request(body, DEP, False, None))["contents"]
    assert contents == [
        {
            "role": "user",
            "parts": [
                {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}},
                {"text": "Summarise"},
                {"text": "Go on"},
            ],
        }
    ]


def test_input_audio_part() -> None:
    body = chat(
        [
            {
                "role": "user",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": "UklGR", "format": "mp3"}}
                ],
            }
        ]
    )
    parts = sent(adapter().chat_request(body, DEP, False, None))["contents"][0]["parts"]
    assert parts == [{"inlineData": {"mimeType": "audio/mp3", "data": "UklGR"}}]


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "tool", "tool_call_id": "call_x", "content": "1"}],
        [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,hi"}}]}],
        [{"role": "robot", "content": "hi"}],
    ],
)
def test_refused_before_sending(messages: list[dict[str, Any]]) -> None:
    with pytest.raises(ProviderError) as info:
        adapter().chat_request(chat(messages), DEP, False, None)
    assert info.value.kind == BAD_REQUEST


# -- whole answers --------------------------------------------------------------------------

USAGE = {
    "promptTokenCount": 12,
    "candidatesTokenCount": 9,
    "totalTokenCount": 21,
    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 12}],
}


def answer(parts: list[dict[str, Any]], finish: str = "STOP", **extra: Any) -> dict[str, Any]:
    return {
        "candidates": [
            {
                "content": {"parts": parts, "role": "model"},
                "finishReason": finish,
                "avgLogprobs": -0.11,
                "index": 0,
            }
        ],
        "usageMetadata": USAGE,
        "modelVersion": "gemini-2.5-flash-preview-05-20",
        "responseId": "7mYfaPzKLqGs1MkPp8_Y0Qc",
        **extra,
    }


def test_chat_response_text() -> None:
    got = adapter().chat_response(
        orjson.dumps(answer([{"text": "Hello "}, {"text": "there"}])), DEP
    )
    assert got == {
        "id": "chatcmpl-7mYfaPzKLqGs1MkPp8_Y0Qc",
        "object": "chat.completion",
        "created": got["created"],
        "model": "gemini-2.5-flash-preview-05-20",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there", "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
    }


def test_chat_response_thinking() -> None:
    body = answer(
        [{"text": "Let me think about it", "thought": True}, {"text": "42"}],
        usageMetadata={
            "promptTokenCount": 10,
            "candidatesTokenCount": 2,
            "thoughtsTokenCount": 30,
            "totalTokenCount": 42,
        },
    )
    got = adapter().chat_response(orjson.dumps(body), DEP)
    assert got["choices"][0]["message"]["content"] == "42"
    assert got["usage"] == {"prompt_tokens": 10, "completion_tokens": 32, "total_tokens": 42}


def test_chat_response_function_calls() -> None:
    body = answer(
        [
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
            {"functionCall": {"name": "get_time", "args": {}}},
        ]
    )
    got = adapter().chat_response(orjson.dumps(body), DEP)
    choice = got["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert [orjson.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {}]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c["id"]) for c in calls)
    assert calls[0]["id"] != calls[1]["id"]


def test_thought_signature_round_trip() -> None:
    signature = base64.b64encode(bytes(range(250, 256)) * 20 + b"\xfb").decode()
    assert "+" in signature and "/" in signature and signature.endswith("=")
    body = answer(
        [
            {
                "functionCall": {"name": "get_weather", "args": {"city": "Oslo"}},
                "thoughtSignature": signature,
            }
        ]
    )
    got = adapter().chat_response(orjson.dumps(body), DEP)
    call = got["choices"][0]["message"]["tool_calls"][0]
    assert re.fullmatch(r"call_[0-9a-f]{24}_ts_[A-Za-z0-9_-]+", call["id"])
    history = chat(
        [
            {"role": "user", "content": "Weather in Oslo?"},
            got["choices"][0]["message"],
            {"role": "tool", "tool_call_id": call["id"], "content": "cold"},
        ]
    )
    contents = sent(adapter().chat_request(history, DEP, False, None))["contents"]
    assert contents[1] == {
        "role": "model",
        "parts": [
            {
                "functionCall": {"name": "get_weather", "args": {"city": "Oslo"}},
                "thoughtSignature": signature,
            }
        ],
    }
    assert contents[2]["parts"][0]["functionResponse"]["name"] == "get_weather"


def test_function_call_id_from_gemini_kept() -> None:
    body = answer([{"functionCall": {"id": "fc-1", "name": "get_time", "args": {}}}])
    got = adapter().chat_response(orjson.dumps(body), DEP)
    assert got["choices"][0]["message"]["tool_calls"][0]["id"] == "fc-1"


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("IMAGE_SAFETY", "content_filter"),
        ("OTHER", "stop"),
        ("MALFORMED_FUNCTION_CALL", "stop"),
        ("FINISH_REASON_UNSPECIFIED", "stop"),
    ],
)
def test_finish_reasons(reason: str, finish: str) -> None:
    got = adapter().chat_response(orjson.dumps(answer([{"text": "x"}], reason)), DEP)
    assert got["choices"][0]["finish_reason"] == finish
    decoder, _ = decode(sse(answer([{"text": "x"}], reason)))
    assert decoder.finish_reason == finish and decoder.done


def test_safety_stop_without_content() -> None:
    body = {
        "candidates": [
            {
                "finishReason": "SAFETY",
                "index": 0,
                "safetyRatings": [
                    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}
                ],
            }
        ],
        "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8},
    }
    got = adapter().chat_response(orjson.dumps(body), DEP)
    assert got["choices"][0]["finish_reason"] == "content_filter"
    assert got["choices"][0]["message"]["content"] == ""
    assert got["model"] == "gemini-2.5-flash"


def test_several_candidates() -> None:
    body = answer([{"text": "one"}])
    body["candidates"].append(
        {
            "content": {"parts": [{"text": "two"}], "role": "model"},
            "finishReason": "MAX_TOKENS",
            "index": 1,
        }
    )
    got = adapter().chat_response(orjson.dumps(body), DEP)
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in got["choices"]] == [
        (0, "one", "stop"),
        (1, "two", "length"),
    ]


BLOCKED = {
    "promptFeedback": {
        "blockReason": "PROHIBITED_CONTENT",
        "safetyRatings": [{"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"}],
    },
    "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8},
    "modelVersion": "gemini-2.5-flash",
}


def test_blocked_prompt() -> None:
    with pytest.raises(ProviderError) as info:
        adapter().chat_response(orjson.dumps(BLOCKED), DEP)
    assert info.value.kind == CONTENT_POLICY
    assert "PROHIBITED_CONTENT" in info.value.message
    assert info.value.code == "content_filter"
    decoder = adapter().stream_decoder(DEP)
    with pytest.raises(ProviderError) as info:
        decoder.feed(sse(BLOCKED))
    assert info.value.kind == CONTENT_POLICY


@pytest.mark.parametrize("data", [b"", b"{", b'"x"', b"{}", b'{"candidates":[]}'])
def test_chat_response_unreadable(data: bytes) -> None:
    with pytest.raises(ProviderError) as info:
        adapter().chat_response(data, DEP)
    assert info.value.kind == PROTOCOL


# -- streams --------------------------------------------------------------------------------


def sse(*objs: Any) -> bytes:
    return b"".join(
        b"data: " + (o if isinstance(o, bytes) else orjson.dumps(o)) + b"\r\n\r\n" for o in objs
    )


def piece(parts: list[dict[str, Any]], finish: str | None = None) -> dict[str, Any]:
    cand: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish:
        cand["finishReason"] = finish
    return {
        "candidates": [cand],
        "usageMetadata": {"promptTokenCount": 12, "totalTokenCount": 12},
        "modelVersion": "gemini-2.5-flash",
        "responseId": "Vx5faK3sJ",
    }


def last(parts: list[dict[str, Any]], finish: str = "STOP") -> dict[str, Any]:
    out = piece(parts, finish)
    out["usageMetadata"] = USAGE
    return out


TEXT_STREAM = sse(
    piece([{"text": "Thinking hard", "thought": True}]),
    piece([{"text": "The sky"}]),
    piece([{"text": " is blue ☀️"}]),
    last([{"text": "."}]),
)
TOOL_STREAM = sse(
    piece([{"text": "Checking."}]),
    last(
        [
            {
                "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                "thoughtSignature": "Q2lRQg==",
            },
            {"functionCall": {"name": "get_time", "args": {}}},
        ]
    ),
)


def decode(data: bytes, pieces: list[bytes] | None = None) -> tuple[Any, list[dict[str, Any]]]:
    decoder = adapter().stream_decoder(DEP)
    out: list[dict[str, Any]] = []
    for p in pieces if pieces is not None else [data]:
        out += decoder.feed(p)
    out += decoder.close()
    return decoder, out


def test_stream_text() -> None:
    decoder, chunks = decode(TEXT_STREAM)
    assert decoder.done and decoder.finish_reason == "stop"
    assert decoder.usage == {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}
    assert decoder.text_out() == "Thinking hardThe sky is blue ☀️."
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant"},
        {"content": "The sky"},
        {"content": " is blue ☀️"},
        {"content": "."},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "stop"]
    assert {c["id"] for c in chunks} == {"chatcmpl-Vx5faK3sJ"}
    assert all(
        c["object"] == "chat.completion.chunk" and c["model"] == "gemini-2.5-flash" for c in chunks
    )


def test_stream_function_calls() -> None:
    decoder, chunks = decode(TOOL_STREAM)
    assert decoder.done and decoder.finish_reason == "tool_calls"
    delta = chunks[-1]["choices"][0]["delta"]
    calls = delta["tool_calls"]
    assert [c["index"] for c in calls] == [0, 1]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert calls[0]["function"]["arguments"] == '{"city":"Paris"}'
    assert "_ts_Q2lRQg" in calls[0]["id"] and "_ts_" not in calls[1]["id"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert 'get_weather{"city":"Paris"}' in decoder.text_out()


def test_stream_without_finish_is_not_done() -> None:
    decoder, chunks = decode(sse(piece([{"text": "a"}]), piece([{"text": "b"}])))
    assert not decoder.done and decoder.finish_reason is None
    assert decoder.usage == {"prompt_tokens": 12, "completion_tokens": 0, "total_tokens": 12}
    assert len(chunks) == 2


def test_stream_malformed_skipped() -> None:
    data = sse(piece([{"text": "a"}]), b"{broken", b"[]", last([{"text": "b"}]))
    decoder, chunks = decode(data)
    assert decoder.malformed == 2 and decoder.done
    assert decoder.text_out() == "ab" and len(chunks) == 2


def test_stream_error_event() -> None:
    decoder = adapter().stream_decoder(DEP)
    decoder.feed(sse(piece([{"text": "a"}])))
    event = {
        "error": {
            "code": 503,
            "message": "The model is overloaded. Please try again later.",
            "status": "UNAVAILABLE",
        }
    }
    with pytest.raises(ProviderError) as info:
        decoder.feed(sse(event))
    assert info.value.kind == OVERLOADED and info.value.status == 503


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, start = [], 0
    for p in points:
        out.append(data[start:p])
        start = p
    return [*out, data[start:]]


def normal(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = copy.deepcopy(chunks)
    for c in out:
        c["created"] = None
        for tc in c["choices"][0]["delta"].get("tool_calls", []):
            tc["id"] = tc["id"][29:]  # the random part differs between decoders
    return out


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from([TEXT_STREAM, TOOL_STREAM, TEXT_STREAM.replace(b"\r\n", b"\n")]),
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
    dep = Deployment("google", "text-embedding-004", {"taskType": "RETRIEVAL_DOCUMENT"})
    wire = adapter().embeddings_request(
        {
            "model": "embed",
            "input": ["What is the meaning of life?", "How old is the sun?"],
            "dimensions": 256,
        },
        dep,
        "k",
    )
    assert wire.path == b"/v1beta/models/text-embedding-004:batchEmbedContents"
    assert dict(wire.headers)[b"x-goog-api-key"] == b"k"
    req = {
        "model": "models/text-embedding-004",
        "outputDimensionality": 256,
        "taskType": "RETRIEVAL_DOCUMENT",
    }
    assert sent(wire) == {
        "requests": [
            {**req, "content": {"parts": [{"text": "What is the meaning of life?"}]}},
            {**req, "content": {"parts": [{"text": "How old is the sun?"}]}},
        ]
    }
    single = sent(adapter().embeddings_request({"input": "hi"}, dep, None))
    assert len(single["requests"]) == 1
    answer = {"embeddings": [{"values": [0.013168523, -0.008711934]}, {"values": [0.1, 0.2]}]}
    assert adapter().embeddings_response(orjson.dumps(answer), dep) == {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 0, "embedding": [0.013168523, -0.008711934]},
            {"object": "embedding", "index": 1, "embedding": [0.1, 0.2]},
        ],
        "model": "text-embedding-004",
    }
    with pytest.raises(ProviderError):
        adapter().embeddings_request({"input": [[1, 2]]}, dep, None)
    with pytest.raises(ProviderError) as info:
        adapter().embeddings_response(b"{}", dep)
    assert info.value.kind == PROTOCOL


# -- errors ---------------------------------------------------------------------------------


def status(code: int, message: str, rpc: str, *details: dict[str, Any]) -> bytes:
    err: dict[str, Any] = {"code": code, "message": message, "status": rpc}
    if details:
        err["details"] = list(details)
    return orjson.dumps({"error": err})


QUOTA = status(
    429,
    "You exceeded your current quota, please check your plan and billing details.",
    "RESOURCE_EXHAUSTED",
    {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [
            {
                "quotaMetric": "generativelanguage.googleapis.com/"
                "generate_content_free_tier_requests",
                "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                "quotaValue": "10",
            }
        ],
    },
    {"@type": "type.googleapis.com/google.rpc.Help", "links": [{"description": "Learn more"}]},
    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "34s"},
)


def test_classify_rate_limit_retry_delay() -> None:
    e = adapter().classify(429, [], QUOTA)
    assert e.kind == RATE_LIMITED and e.status == 429
    assert e.retry_after == 34.0
    assert e.message.startswith("You exceeded your current quota")
    # the body's RetryInfo wins; a Retry-After header serves when the body has none
    e = adapter().classify(429, [(b"retry-after", b"5")], status(429, "slow", "RESOURCE_EXHAUSTED"))
    assert e.retry_after == 5.0


def test_classify_fractional_retry_delay_and_array_framing() -> None:
    body = (
        b"["
        + status(
            429,
            "quota",
            "RESOURCE_EXHAUSTED",
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1.5s"},
        )
        + b"]"
    )
    e = adapter().classify(429, [], body)
    assert e.kind == RATE_LIMITED and e.retry_after == 1.5


@pytest.mark.parametrize(
    ("code", "body", "kind"),
    [
        (
            400,
            status(
                400,
                "The input token count (1200000) exceeds the maximum number of tokens allowed "
                "(1048576).",
                "INVALID_ARGUMENT",
            ),
            CONTEXT_LENGTH,
        ),
        (
            400,
            status(
                400,
                "API key not valid. Please pass a valid API key.",
                "INVALID_ARGUMENT",
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                },
            ),
            AUTH,
        ),
        (
            403,
            status(403, "Permission denied: Consumer has been suspended.", "PERMISSION_DENIED"),
            AUTH,
        ),
        (
            401,
            status(401, "Request had invalid authentication credentials.", "UNAUTHENTICATED"),
            AUTH,
        ),
        (
            404,
            status(
                404,
                "models/gemini-9 is not found for API version v1beta, or is not supported for "
                "generateContent.",
                "NOT_FOUND",
            ),
            NOT_FOUND,
        ),
        (
            400,
            status(
                400,
                "* GenerateContentRequest.contents: contents is not specified",
                "INVALID_ARGUMENT",
            ),
            BAD_REQUEST,
        ),
        (
            400,
            status(400, "User location is not supported for the API use.", "FAILED_PRECONDITION"),
            BAD_REQUEST,
        ),
        (500, status(500, "An internal error has occurred.", "INTERNAL"), SERVER),
        (
            503,
            status(503, "The model is overloaded. Please try again later.", "UNAVAILABLE"),
            OVERLOADED,
        ),
        (503, status(503, "The service is currently unavailable.", "UNAVAILABLE"), SERVER),
        (
            504,
            status(504, "Deadline expired before operation could complete.", "DEADLINE_EXCEEDED"),
            SERVER,
        ),
        (502, b"<html>502 Bad Gateway</html>", SERVER),
        (413, b"", BAD_REQUEST),
    ],
)
def test_classify(code: int, body: bytes, kind: str) -> None:
    e = adapter().classify(code, [], body)
    assert e.kind == kind and e.status == code and e.message
    if kind == CONTEXT_LENGTH:
        assert e.code == "context_length_exceeded"
