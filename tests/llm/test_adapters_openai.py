"""The openai adapter: requests built, answers and streams decoded, errors classified.

Payloads follow OpenAI's published Chat Completions / embeddings formats and the variants
OpenAI-compatible servers send (vLLM, llama.cpp server, LM Studio, Azure)."""

from __future__ import annotations

import copy
import time
from email.utils import formatdate
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
from piuptime.llm.providers.openai import (
    OpenAIAdapter,
    canonical_finish,
    go_duration,
    retry_after,
)


def adapter(**kw: Any) -> OpenAIAdapter:
    a = make_adapter(LlmProvider(kind="openai", **kw))
    assert isinstance(a, OpenAIAdapter)
    return a


DEP = Deployment(provider="oa", model="gpt-4o-mini-2024-07-18")

CHAT_BODY: dict[str, Any] = {
    "model": "smart",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What's the weather in Paris?"},
    ],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ],
    "temperature": 0.7,
}


def sse(*objs: Any) -> bytes:
    out = b""
    for obj in objs:
        data = obj if isinstance(obj, bytes) else orjson.dumps(obj)
        out += b"data: " + data + b"\n\n"
    return out


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-AzQ1",
        "object": "chat.completion.chunk",
        "created": 1741569952,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_06737a9306",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        "usage": None,
        **extra,
    }


USAGE_CHUNK = {
    "id": "chatcmpl-AzQ1",
    "object": "chat.completion.chunk",
    "created": 1741569952,
    "model": "gpt-4o-mini-2024-07-18",
    "system_fingerprint": "fp_06737a9306",
    "choices": [],
    "usage": {
        "prompt_tokens": 19,
        "completion_tokens": 10,
        "total_tokens": 29,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    },
}

TEXT_STREAM = sse(
    chunk({"role": "assistant", "content": "", "refusal": None}),
    chunk({"content": "Bonjour"}),
    chunk({"content": " à Paris "}),
    chunk({"content": "☀️"}),
    chunk({}, "stop"),
    USAGE_CHUNK,
    b"[DONE]",
)

TOOL_STREAM = sse(
    chunk(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ],
            "refusal": None,
        }
    ),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"'}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'city":"Par'}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'is"}'}}]}),
    chunk(
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": "{}"},
                }
            ]
        }
    ),
    chunk({}, "tool_calls"),
    USAGE_CHUNK,
    b"[DONE]",
)


def decode(data: bytes, pieces: list[bytes] | None = None) -> tuple[Any, list[dict[str, Any]]]:
    decoder = adapter().stream_decoder(DEP)
    out: list[dict[str, Any]] = []
    for piece in pieces if pieces is not None else [data]:
        out += decoder.feed(piece)
    out += decoder.close()
    return decoder, out


# -- requests -----------------------------------------------------------------------------


def test_chat_request_non_streamed() -> None:
    a = adapter(keys=["sk-test"], headers={"OpenAI-Organization": "org-1"})
    dep = Deployment("oa", "gpt-4o-mini", {"temperature": 0.1, "top_p": 0.9})
    body = {**CHAT_BODY, "stream": False, "stream_options": {"include_usage": True}}
    before = copy.deepcopy(body)
    wire = a.chat_request(body, dep, False, "sk-test")
    assert body == before  # the client's body is left as it was (the handler may retry it)
    assert wire.method == b"POST"
    assert wire.path == b"/v1/chat/completions"
    headers = dict(wire.headers)
    assert headers[b"authorization"] == b"Bearer sk-test"
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"accept"] == b"application/json"
    assert headers[b"openai-organization"] == b"org-1"
    assert b"host" not in headers and b"content-length" not in headers
    assert wire.body is not None
    sent = orjson.loads(wire.body)
    assert sent["model"] == "gpt-4o-mini"
    assert sent["temperature"] == 0.7  # the client's value wins
    assert sent["top_p"] == 0.9  # the deployment's default fills in
    assert "stream" not in sent and "stream_options" not in sent
    assert sent["messages"] == CHAT_BODY["messages"]
    assert sent["tools"] == CHAT_BODY["tools"]


def test_chat_request_streamed_always_asks_for_usage() -> None:
    a = adapter()
    body = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": False, "x": 1}}
    wire = a.chat_request(body, DEP, True, "k")
    assert wire.body is not None
    sent = orjson.loads(wire.body)
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True, "x": 1}
    assert dict(wire.headers)[b"accept"] == b"text/event-stream"
    assert body["stream_options"] == {"include_usage": False, "x": 1}
    wire = a.chat_request({**CHAT_BODY}, DEP, True, "k")
    assert wire.body is not None
    assert orjson.loads(wire.body)["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("base_url", "chat", "embeddings"),
    [
        (None, b"/v1/chat/completions", b"/v1/embeddings"),
        ("http://127.0.0.1:8000/v1", b"/v1/chat/completions", b"/v1/embeddings"),
        ("http://lmstudio:1234/api/v0/", b"/api/v0/chat/completions", b"/api/v0/embeddings"),
        ("http://llamacpp:8080", b"/chat/completions", b"/embeddings"),
    ],
)
def test_paths_follow_base_url(base_url: str | None, chat: bytes, embeddings: bytes) -> None:
    a = adapter(base_url=base_url)
    assert a.chat_request(CHAT_BODY, DEP, False, None).path == chat
    assert a.embeddings_request({"input": "x"}, DEP, None).path == embeddings


def test_no_key_no_authorization() -> None:
    wire = adapter().chat_request(CHAT_BODY, DEP, False, None)
    assert b"authorization" not in dict(wire.headers)


def test_images_and_tool_history_pass_through() -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"},
                },
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "f", "arguments": '{"a":1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    wire = adapter().chat_request({"model": "g", "messages": messages}, DEP, False, None)
    assert wire.body is not None
    assert orjson.loads(wire.body)["messages"] == messages


def test_long_tool_call_ids_shortened_consistently() -> None:
    long_id = "call_" + "a" * 24 + "_ts_" + "Q" * 200  # a Gemini id carrying a signature
    messages = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": long_id, "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "call_ok", "type": "function", "function": {"name": "g", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": long_id, "content": "1"},
        {"role": "tool", "tool_call_id": "call_ok", "content": "2"},
    ]
    before = copy.deepcopy(messages)
    wire = adapter().chat_request({"messages": messages}, DEP, False, None)
    assert messages == before
    assert wire.body is not None
    sent = orjson.loads(wire.body)["messages"]
    short = sent[1]["tool_calls"][0]["id"]
    assert len(short) <= 40 and short.startswith("call_")
    assert sent[2]["tool_call_id"] == short
    assert sent[1]["tool_calls"][1]["id"] == "call_ok"
    assert sent[3]["tool_call_id"] == "call_ok"


# -- whole answers --------------------------------------------------------------------------

OPENAI_ANSWER = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
    "object": "chat.completion",
    "created": 1741569952,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello! How can I assist you today?",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 19,
        "completion_tokens": 10,
        "total_tokens": 29,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    },
    "service_tier": "default",
    "system_fingerprint": "fp_06737a9306",
}


def test_chat_response_passes_the_body_through() -> None:
    got = adapter().chat_response(orjson.dumps(OPENAI_ANSWER), DEP)
    assert got == OPENAI_ANSWER


def test_chat_response_tool_calls() -> None:
    answer = copy.deepcopy(OPENAI_ANSWER)
    answer["choices"][0]["message"] = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
            }
        ],
        "refusal": None,
    }
    answer["choices"][0]["finish_reason"] = "tool_calls"
    got = adapter().chat_response(orjson.dumps(answer), DEP)
    assert got["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert got["choices"][0]["finish_reason"] == "tool_calls"


def test_chat_response_fills_what_a_compatible_server_left_out() -> None:
    # llama.cpp-style answer: no model, usage null
    body = {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi"},
                "finish_reason": "eos",
            }
        ],
        "usage": None,
    }
    got = adapter().chat_response(orjson.dumps(body), DEP)
    assert got["model"] == DEP.model
    assert got["id"].startswith("chatcmpl-")
    assert got["object"] == "chat.completion"
    assert isinstance(got["created"], int)
    assert "usage" not in got
    assert got["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("given_reason", "expected"),
    [
        ("stop", "stop"),
        ("length", "length"),
        ("tool_calls", "tool_calls"),
        ("content_filter", "content_filter"),
        ("function_call", "tool_calls"),
        ("eos", "stop"),
        ("something_new", "stop"),
    ],
)
def test_finish_reasons(given_reason: str, expected: str) -> None:
    assert canonical_finish(given_reason) == expected
    answer = copy.deepcopy(OPENAI_ANSWER)
    answer["choices"][0]["finish_reason"] = given_reason
    got = adapter().chat_response(orjson.dumps(answer), DEP)
    assert got["choices"][0]["finish_reason"] == expected
    decoder, chunks = decode(sse(chunk({"content": "x"}), chunk({}, given_reason), b"[DONE]"))
    assert decoder.finish_reason == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == expected


@pytest.mark.parametrize("data", [b"", b"not json", b"[1,2]", b'{"object":"chat.completion"}'])
def test_chat_response_unreadable(data: bytes) -> None:
    with pytest.raises(ProviderError) as info:
        adapter().chat_response(data, DEP)
    assert info.value.kind == PROTOCOL


def test_chat_response_error_in_a_200() -> None:
    body = {"error": {"message": "The server had an error", "type": "server_error"}}
    with pytest.raises(ProviderError) as info:
        adapter().chat_response(orjson.dumps(body), DEP)
    assert info.value.kind == SERVER
    assert info.value.message == "The server had an error"


# -- streams --------------------------------------------------------------------------------


def test_stream_text() -> None:
    decoder, chunks = decode(TEXT_STREAM)
    assert decoder.done
    assert decoder.finish_reason == "stop"
    assert decoder.usage == {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29}
    assert decoder.malformed == 0
    assert decoder.text_out() == "Bonjour à Paris ☀️"
    assert len(chunks) == 5  # the usage-only chunk is swallowed
    assert all("usage" not in c for c in chunks)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[1]["model"] == "gpt-4o-mini-2024-07-18"


def test_stream_tool_call_argument_deltas() -> None:
    decoder, chunks = decode(TOOL_STREAM)
    assert decoder.done and decoder.finish_reason == "tool_calls"
    calls: dict[int, dict[str, str]] = {}
    for c in chunks:
        for call in c["choices"][0]["delta"].get("tool_calls", []):
            slot = calls.setdefault(call["index"], {"id": "", "name": "", "arguments": ""})
            slot["id"] = call.get("id") or slot["id"]
            slot["name"] += call["function"].get("name") or ""
            slot["arguments"] += call["function"].get("arguments") or ""
    assert calls == {
        0: {
            "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA",
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
        },
        1: {"id": "call_2", "name": "get_time", "arguments": "{}"},
    }
    assert decoder.text_out() == 'get_weather{"city":"Paris"}get_time{}'


def test_stream_refusal_and_reasoning_count_as_output() -> None:
    data = sse(
        chunk({"role": "assistant", "reasoning_content": "hmm "}),
        chunk({"refusal": "I can't help with that."}),
        chunk({}, "stop"),
        b"[DONE]",
    )
    decoder, _ = decode(data)
    assert decoder.text_out() == "hmm I can't help with that."


def test_stream_usage_on_the_last_content_chunk() -> None:
    # some compatible servers put usage on the finishing chunk instead of a chunk of its own
    data = sse(
        chunk({"role": "assistant", "content": "a"}),
        chunk(
            {},
            "length",
            usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        ),
        b"[DONE]",
    )
    decoder, chunks = decode(data)
    assert decoder.usage == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    assert len(chunks) == 2 and "usage" not in chunks[1]
    assert decoder.finish_reason == "length"


def test_stream_model_missing_gets_the_deployments() -> None:
    c = chunk({"content": "x"})
    del c["model"]
    _, chunks = decode(sse(c))
    assert chunks[0]["model"] == DEP.model


def test_stream_malformed_events_skipped_and_counted() -> None:
    data = sse(chunk({"content": "a"})) + b"data: {not json\n\n" + b"data: [1]\n\n"
    data += b'data: {"id":"x"}\n\n' + sse(chunk({"content": "b"}, "stop"), b"[DONE]")
    decoder, chunks = decode(data)
    assert decoder.malformed == 3
    assert decoder.text_out() == "ab"
    assert decoder.done and len(chunks) == 2


def test_stream_azure_prompt_filter_chunk_is_not_malformed() -> None:
    first = {
        "choices": [],
        "created": 0,
        "id": "",
        "model": "",
        "object": "",
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
    }
    decoder, chunks = decode(sse(first, chunk({"content": "x"}, "stop"), b"[DONE]"))
    assert decoder.malformed == 0 and len(chunks) == 1


def test_stream_without_done_marker() -> None:
    data = sse(chunk({"content": "a"}), chunk({}, "stop"))
    decoder, _ = decode(data)
    assert not decoder.done
    assert decoder.finish_reason == "stop"
    assert decoder.usage is None


def test_stream_cut_mid_event() -> None:
    decoder, chunks = decode(sse(chunk({"content": "a"})) + b'data: {"id":"chatcmpl-AzQ1","ch')
    assert len(chunks) == 1 and decoder.finish_reason is None and not decoder.done
    assert decoder.malformed == 0


@pytest.mark.parametrize(
    ("event", "kind"),
    [
        ({"error": {"message": "The server had an error", "type": "server_error"}}, SERVER),
        (
            {
                "error": {
                    "message": "Rate limit reached",
                    "type": "requests",
                    "code": "rate_limit_exceeded",
                }
            },
            RATE_LIMITED,
        ),
        (
            {"object": "error", "message": "maximum context length", "type": "BadRequestError"},
            CONTEXT_LENGTH,
        ),
        ({"error": {"message": "filtered", "code": "content_filter"}}, CONTENT_POLICY),
        ({"error": "model crashed"}, SERVER),
    ],
)
def test_stream_error_event_raises(event: dict[str, Any], kind: str) -> None:
    decoder = adapter().stream_decoder(DEP)
    assert decoder.feed(sse(chunk({"content": "a"}))) != []
    with pytest.raises(ProviderError) as info:
        decoder.feed(sse(event))
    assert info.value.kind == kind
    assert info.value.message


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, start = [], 0
    for p in points:
        out.append(data[start:p])
        start = p
    return [*out, data[start:]]


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from([TEXT_STREAM, TOOL_STREAM, TEXT_STREAM.replace(b"\n", b"\r\n")]),
    st.lists(st.integers(min_value=0, max_value=100_000), max_size=60),
)
def test_stream_any_split_same_result(data: bytes, cuts: list[int]) -> None:
    whole, expected = decode(data)
    decoder, chunks = decode(data, split(data, cuts))
    assert chunks == expected
    assert decoder.usage == whole.usage
    assert decoder.text_out() == whole.text_out()
    assert (decoder.done, decoder.finish_reason, decoder.malformed) == (
        whole.done,
        whole.finish_reason,
        whole.malformed,
    )


# -- embeddings -----------------------------------------------------------------------------


def test_embeddings() -> None:
    a = adapter(keys=["k"])
    dep = Deployment("oa", "text-embedding-3-small", {"dimensions": 256})
    body = {"model": "embed", "input": ["a", "b"], "encoding_format": "float"}
    wire = a.embeddings_request(body, dep, "k")
    assert wire.path == b"/v1/embeddings"
    assert wire.body is not None
    assert orjson.loads(wire.body) == {
        "model": "text-embedding-3-small",
        "input": ["a", "b"],
        "encoding_format": "float",
        "dimensions": 256,
    }
    answer = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292]},
            {"object": "embedding", "index": 1, "embedding": [0.1, 0.2]},
        ],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 2, "total_tokens": 2},
    }
    assert a.embeddings_response(orjson.dumps(answer), dep) == answer
    del answer["model"]
    assert a.embeddings_response(orjson.dumps(answer), dep)["model"] == "text-embedding-3-small"
    with pytest.raises(ProviderError) as info:
        a.embeddings_response(b'{"object":"list"}', dep)
    assert info.value.kind == PROTOCOL


# -- errors ---------------------------------------------------------------------------------


def err(message: str, etype: str | None, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": etype, "param": param, "code": code}}
    )


def test_classify_rate_limit_retry_after_seconds() -> None:
    body = err(
        "Rate limit reached for gpt-4o-mini in organization org-x on requests per min (RPM): "
        "Limit 3, Used 3, Requested 1.",
        "requests",
        "rate_limit_exceeded",
    )
    e = adapter().classify(429, [(b"Retry-After", b"20")], body)
    assert e.kind == RATE_LIMITED and e.status == 429
    assert e.retry_after == 20.0
    assert e.code == "rate_limit_exceeded" and e.type == "requests"
    assert e.message.startswith("Rate limit reached")


def test_classify_retry_after_ms_preferred() -> None:
    headers = [(b"retry-after", b"20"), (b"retry-after-ms", b"1500")]
    assert adapter().classify(429, headers, b"").retry_after == 1.5


def test_classify_retry_after_http_date() -> None:
    date = formatdate(time.time() + 30, usegmt=True).encode()
    got = adapter().classify(429, [(b"retry-after", date)], b"").retry_after
    assert got is not None and 27 <= got <= 31


def test_classify_ratelimit_reset_headers() -> None:
    headers = [
        (b"x-ratelimit-remaining-requests", b"0"),
        (b"x-ratelimit-reset-requests", b"6m0s"),
        (b"x-ratelimit-remaining-tokens", b"1000"),
        (b"x-ratelimit-reset-tokens", b"1s"),
    ]
    assert adapter().classify(429, headers, b"").retry_after == 360.0


def test_classify_rate_limit_without_any_hint() -> None:
    e = adapter().classify(429, [], err("slow down", "requests", "rate_limit_exceeded"))
    assert e.kind == RATE_LIMITED and e.retry_after is None


@pytest.mark.parametrize(
    ("status", "body", "kind", "code"),
    [
        (
            400,
            err(
                "This model's maximum context length is 128000 tokens. However, your messages "
                "resulted in 130000 tokens. Please reduce the length of the messages.",
                "invalid_request_error",
                "context_length_exceeded",
                "messages",
            ),
            CONTEXT_LENGTH,
            "context_length_exceeded",
        ),
        (
            # vLLM
            400,
            orjson.dumps(
                {
                    "object": "error",
                    "message": "This model's maximum context length is 4096 tokens. However, you "
                    "requested 5000 tokens (4000 in the messages, 1000 in the completion).",
                    "type": "BadRequestError",
                    "param": None,
                    "code": 400,
                }
            ),
            CONTEXT_LENGTH,
            None,
        ),
        (
            # llama.cpp server
            400,
            orjson.dumps(
                {
                    "error": {
                        "code": 400,
                        "message": "the request exceeds the available context size, try "
                        "increasing it",
                        "type": "exceed_context_size_error",
                        "n_prompt_tokens": 5000,
                        "n_ctx": 4096,
                    }
                }
            ),
            CONTEXT_LENGTH,
            None,
        ),
        (
            400,
            err(
                "Your request was rejected as a result of our safety system.",
                "invalid_request_error",
                "content_policy_violation",
            ),
            CONTENT_POLICY,
            "content_policy_violation",
        ),
        (
            # Azure OpenAI
            400,
            err(
                "The response was filtered due to the prompt triggering Azure OpenAI's content "
                "management policy.",
                None,
                "content_filter",
                "prompt",
            ),
            CONTENT_POLICY,
            "content_filter",
        ),
        (
            401,
            err("Incorrect API key provided: sk-xx.", "invalid_request_error", "invalid_api_key"),
            AUTH,
            "invalid_api_key",
        ),
        (
            403,
            err("Country not supported", "request_forbidden", "unsupported_country"),
            AUTH,
            "unsupported_country",
        ),
        (
            429,
            err(
                "You exceeded your current quota, please check your plan and billing details.",
                "insufficient_quota",
                "insufficient_quota",
            ),
            AUTH,
            "insufficient_quota",
        ),
        (
            404,
            err(
                "The model `gpt-5-nope` does not exist or you do not have access to it.",
                "invalid_request_error",
                "model_not_found",
                None,
            ),
            NOT_FOUND,
            "model_not_found",
        ),
        (
            400,
            err("Invalid 'temperature'", "invalid_request_error", None, "temperature"),
            BAD_REQUEST,
            None,
        ),
        (
            422,
            orjson.dumps({"error": "'messages' field is required"}),
            BAD_REQUEST,
            None,
        ),  # LM Studio
        (
            500,
            err("The server had an error while processing your request.", "server_error", None),
            SERVER,
            None,
        ),
        (502, b"<html><body>Bad Gateway</body></html>", SERVER, None),
        (503, b"", SERVER, None),
        (529, b'{"error":{"message":"Overloaded","type":"overloaded_error"}}', OVERLOADED, None),
    ],
)
def test_classify(status: int, body: bytes, kind: str, code: str | None) -> None:
    e = adapter().classify(status, [], body)
    assert e.kind == kind
    assert e.status == status
    assert e.code == code
    assert e.message


def test_classify_keeps_the_providers_message_and_param() -> None:
    e = adapter().classify(
        400, [], err("Invalid 'temperature': 3", "invalid_request_error", None, "temperature")
    )
    assert e.message == "Invalid 'temperature': 3"
    assert e.param == "temperature" and e.type == "invalid_request_error"


def test_classify_non_json_body_message() -> None:
    e = adapter().classify(502, [], b"<html>Bad Gateway</html>")
    assert e.message == "<html>Bad Gateway</html>"
    assert adapter().classify(500, [], b"").message == "provider answered HTTP 500"


def test_classify_503_retry_after() -> None:
    assert adapter().classify(503, [(b"retry-after", b"5")], b"").retry_after == 5.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("", None), ("x", None)],
)
def test_go_duration(value: str, expected: float | None) -> None:
    assert go_duration(value) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], None),
        ([(b"retry-after", b"nonsense")], None),
        ([(b"retry-after", b"-3")], None),
        ([(b"retry-after", b"0")], 0.0),
        ([(b"retry-after-ms", b"bad"), (b"retry-after", b"2")], 2.0),
        ([(b"retry-after", b"Wed, 21 Oct 2015 07:28:00 GMT")], 0.0),  # in the past
    ],
)
def test_retry_after(headers: list[tuple[bytes, bytes]], expected: float | None) -> None:
    assert retry_after(headers) == expected
