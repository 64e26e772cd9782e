"""The fake providers speak their protocols: driven by the official SDKs (OpenAI, Anthropic) or by
plain HTTP (Gemini, Ollama), with no gateway in between; and each misbehaviour is observable on
the wire."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import anthropic
import httpx2 as httpx
import openai
import pytest

from tests.llm.fakes import (
    Answer,
    Cut,
    Error,
    FakeAnthropic,
    FakeGemini,
    FakeOllama,
    FakeOpenAI,
    Malformed,
    NoEnd,
    Reset,
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
from tests.support import wait_until

MSGS: Any = [{"role": "user", "content": "Say hello."}]
WEATHER: Any = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}


def sse_data(raw: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body (LF or CRLF)."""
    text = raw.decode().replace("\r\n", "\n")
    out = []
    for block in text.split("\n\n"):
        lines = [ln[6:] for ln in block.split("\n") if ln.startswith("data: ")]
        if lines:
            out.append("\n".join(lines))
    return out


_BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
RAW_CHAT = (
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)


def err_body(e: Any) -> Any:
    """An SDK error's parsed body."""
    return e.body


def oai(fake: FakeOpenAI, key: str = "sk-test") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=fake.base_url, api_key=key, max_retries=0, timeout=5)


# ---------------------------------------------------------------------------------------------
# OpenAI


async def test_openai_chat_whole(fake_openai: FakeOpenAI) -> None:
    async with oai(fake_openai) as client:
        r = await client.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert r.object == "chat.completion"
    assert r.model == "gpt-4o-mini"
    assert r.choices[0].message.content == "Hello from gpt-4o-mini."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.total_tokens == 15
    seen = fake_openai.requests[0]
    assert seen.method == "POST" and seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == "Bearer sk-test"
    assert seen.json["messages"] == MSGS
    assert seen.model == "gpt-4o-mini"


async def test_openai_stream_include_usage(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Answer(text="one two three four", pieces=4, prompt_tokens=7))
    async with oai(fake_openai) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o",
            messages=MSGS,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])
    assert all(c.object == "chat.completion.chunk" and c.model == "gpt-4o" for c in chunks)


async def test_openai_stream_without_include_usage_has_no_usage(fake_openai: FakeOpenAI) -> None:
    async with (
        httpx.AsyncClient() as http,
        http.stream(
            "POST",
            fake_openai.base_url + "/chat/completions",
            json={"model": "m", "messages": MSGS, "stream": True},
        ) as r,
    ):
        assert r.headers["transfer-encoding"] == "chunked"
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join([c async for c in r.aiter_raw()])
    data = sse_data(raw)
    assert data[-1] == "[DONE]"
    assert all("usage" not in json.loads(d) for d in data[:-1])


async def test_openai_tool_calls_stream_and_whole(fake_openai: FakeOpenAI) -> None:
    tools: Any = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    fake_openai.script(Answer(tool_calls=[WEATHER]), Answer(tool_calls=[WEATHER], pieces=4))
    async with oai(fake_openai) as client:
        r = await client.chat.completions.create(model="m", messages=MSGS, tools=tools)
        assert r.choices[0].finish_reason == "tool_calls"
        assert r.choices[0].message.content is None
        tool_calls: Any = r.choices[0].message.tool_calls
        tc = tool_calls[0]
        assert tc.function.name == "get_weather"
        assert json.loads(tc.function.arguments) == WEATHER["arguments"]

        async with client.chat.completions.stream(
            model="m",
            messages=MSGS,
            tools=tools,
        ) as s:
            final = await s.get_final_completion()
    msg = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert msg.tool_calls and msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == WEATHER["arguments"]
    assert msg.tool_calls[0].id.startswith("call_")
    # the arguments really came in pieces, after a first delta with id/type/name
    assert fake_openai.requests[1].json["stream"] is True


async def test_openai_response_format_echoes_json(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Answer(text='{"city": "Paris"}'))
    async with oai(fake_openai) as client:
        r = await client.chat.completions.create(
            model="m",
            messages=MSGS,
            response_format={"type": "json_object"},
        )
        assert json.loads(r.choices[0].message.content or "") == {"city": "Paris"}
        r = await client.chat.completions.create(
            model="m",
            messages=MSGS,
            response_format={"type": "json_object"},
        )
        assert json.loads(r.choices[0].message.content or "") == {"message": "Hello from m."}


async def test_openai_usage_false_omits_usage(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Answer(usage=False), Answer(usage=False))
    async with oai(fake_openai) as client:
        r = await client.chat.completions.create(model="m", messages=MSGS)
        assert r.usage is None
        stream = await client.chat.completions.create(
            model="m",
            messages=MSGS,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    assert all(c.choices and c.usage is None for c in chunks)


async def test_openai_embeddings_and_models(fake_openai: FakeOpenAI) -> None:
    async with oai(fake_openai) as client:
        e = await client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        assert [d.index for d in e.data] == [0, 1]
        assert len(e.data[0].embedding) == 8
        assert e.data[0].embedding != e.data[1].embedding
        assert e.usage.prompt_tokens == 10
        e = await client.embeddings.create(
            model="text-embedding-3-small", input="a", dimensions=4, encoding_format="float"
        )
        assert len(e.data[0].embedding) == 4
        models = [m.id async for m in client.models.list()]
    assert models == fake_openai.models


async def test_openai_keys_required(fake_openai: FakeOpenAI) -> None:
    fake_openai.keys = ["sk-good"]
    async with oai(fake_openai, key="sk-badbadbad") as client:
        with pytest.raises(openai.AuthenticationError) as ei:
            await client.chat.completions.create(model="m", messages=MSGS)
    assert ei.value.status_code == 401
    assert ei.value.code == "invalid_api_key"
    body = ei.value.body
    assert isinstance(body, dict) and body["type"] == "invalid_request_error"
    assert body["param"] is None
    async with oai(fake_openai, key="sk-good") as client:
        r = await client.chat.completions.create(model="m", messages=MSGS)
    assert r.choices[0].message.content == "Hello from m."


async def test_openai_errors(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(
        rate_limited(retry_after=2),
        rate_limited(),
        server_error(502),
        context_length(),
        content_policy(),
        overloaded(),
        unauthorized(),
        Error(418, body={"error": {"message": "teapot"}}, headers={"x-extra": "1"}),
    )
    async with oai(fake_openai) as client:

        async def fail() -> openai.APIStatusError:
            with pytest.raises(openai.APIStatusError) as ei:
                await client.chat.completions.create(model="m", messages=MSGS)
            return ei.value

        e = await fail()
        assert isinstance(e, openai.RateLimitError)
        assert e.response.headers["retry-after"] == "2"
        assert e.response.headers["x-ratelimit-remaining-requests"] == "0"
        assert e.response.headers["x-ratelimit-reset-requests"] == "2s"
        assert e.code == "rate_limit_exceeded"
        e = await fail()
        assert isinstance(e, openai.RateLimitError)
        assert "retry-after" not in e.response.headers
        e = await fail()
        assert isinstance(e, openai.InternalServerError) and e.status_code == 502
        assert e.type == "server_error"
        e = await fail()
        assert isinstance(e, openai.BadRequestError) and e.code == "context_length_exceeded"
        assert "maximum context length" in e.message
        e = await fail()
        assert isinstance(e, openai.BadRequestError) and e.code == "content_policy_violation"
        e = await fail()
        assert e.status_code == 503
        e = await fail()
        assert isinstance(e, openai.AuthenticationError)
        e = await fail()
        assert e.status_code == 418 and e.response.headers["x-extra"] == "1"
        # the script is used up: the default answer again
        r = await client.chat.completions.create(model="m", messages=MSGS)
        assert r.choices[0].message.content == "Hello from m."
    assert fake_openai.pending == 0


async def test_openai_stream_error_event(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(StreamError(after=2, message="boom"))
    async with oai(fake_openai) as client:
        stream = await client.chat.completions.create(model="m", messages=MSGS, stream=True)
        got = []
        with pytest.raises(openai.APIError, match="boom"):
            async for c in stream:
                got.append(c)
    assert len(got) == 2


async def test_openai_keep_alive_one_connection(fake_openai: FakeOpenAI) -> None:
    async with httpx.AsyncClient() as http:
        for _ in range(3):
            r = await http.post(
                fake_openai.base_url + "/chat/completions", json={"model": "m", "messages": MSGS}
            )
            assert r.status_code == 200
        async with http.stream(
            "POST",
            fake_openai.base_url + "/chat/completions",
            json={"model": "m", "messages": MSGS, "stream": True},
        ) as r:
            await r.aread()
        r = await http.get(fake_openai.base_url + "/models")
        assert r.status_code == 200
    assert fake_openai.opened == 1
    await wait_until(lambda: fake_openai.connections == 0, 2, "the connection closed")


async def test_openai_unknown_path_and_bad_body(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(server_error())
    async with httpx.AsyncClient() as http:
        r = await http.post(fake_openai.base_url + "/nope", json={})
        assert r.status_code == 404
        assert r.json()["error"]["message"] == "Invalid URL (POST /v1/nope)"
        r = await http.post(fake_openai.base_url + "/chat/completions", content=b"{nope")
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # static replies do not use the script
    assert fake_openai.pending == 1


async def test_openai_delays(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Answer(head_delay=0.1, first_token_delay=0.1, chunk_gap=0.05, pieces=2))
    async with (
        httpx.AsyncClient() as http,
        http.stream(
            "POST",
            fake_openai.base_url + "/chat/completions",
            json={"model": "m", "messages": MSGS, "stream": True},
        ) as r,
    ):
        t0 = time.monotonic()
        it = r.aiter_raw()
        await it.__anext__()
        first = time.monotonic() - t0
        async for _ in it:
            pass
        total = time.monotonic() - t0
    assert first >= 0.09
    assert total >= first + 4 * 0.045  # 2 pieces + finish + [DONE] after the role chunk


# ---------------------------------------------------------------------------------------------
# Anthropic


def ant(fake: FakeAnthropic, key: str = "sk-ant-test") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=fake.base_url, api_key=key, max_retries=0, timeout=5)


async def test_anthropic_message_whole(fake_anthropic: FakeAnthropic) -> None:
    async with ant(fake_anthropic) as client:
        m = await client.messages.create(
            model="claude-haiku-4-5",
            max_tokens=100,
            system="Be brief.",
            messages=MSGS,
        )
    assert m.type == "message" and m.role == "assistant"
    assert m.model == "claude-haiku-4-5"
    assert m.content[0].type == "text" and m.content[0].text == "Hello from claude-haiku-4-5."
    assert m.stop_reason == "end_turn"
    assert m.usage.input_tokens == 10 and m.usage.output_tokens == 5
    seen = fake_anthropic.requests[0]
    # this SDK sends the key as a Bearer token; x-api-key is checked in the raw tests below
    assert seen.headers["authorization"] == "Bearer sk-ant-test"
    assert seen.headers["anthropic-version"]
    assert seen.json["system"] == "Be brief."


async def test_anthropic_stream_every_event_type(fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.script(Answer(text="Hi there, friend", pieces=3, completion_tokens=4))
    async with (
        ant(fake_anthropic) as client,
        client.messages.stream(
            model="claude-sonnet-4-5",
            max_tokens=100,
            messages=MSGS,
        ) as stream,
    ):
        types = [event.type async for event in stream]
        final = await stream.get_final_message()
    block: Any = final.content[0]
    assert block.text == "Hi there, friend"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 4 and final.usage.input_tokens == 10
    assert types[0] == "message_start" and types[-1] == "message_stop"
    for t in ("content_block_start", "content_block_delta", "content_block_stop", "message_delta"):
        assert t in types


async def test_anthropic_stream_wire_order(fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.script(Answer(text="Hi", pieces=1, tool_calls=[WEATHER]))
    async with (
        httpx.AsyncClient() as http,
        http.stream(
            "POST",
            fake_anthropic.base_url + "/v1/messages",
            headers={"anthropic-version": "2023-06-01"},
            json={"model": "c", "max_tokens": 10, "messages": MSGS, "stream": True},
        ) as r,
    ):
        raw = (await r.aread()).decode()
    names = [ln[7:] for ln in raw.split("\n") if ln.startswith("event: ")]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",  # the empty partial_json first
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    data = [json.loads(d) for d in sse_data(raw.encode())]
    assert data[5]["content_block"]["type"] == "tool_use"
    assert data[6]["delta"] == {"type": "input_json_delta", "partial_json": ""}
    assert json.loads(data[7]["delta"]["partial_json"]) == WEATHER["arguments"]
    assert data[9]["delta"]["stop_reason"] == "tool_use"
    assert data[9]["usage"] == {"output_tokens": 5}


async def test_anthropic_tool_use_stream_final_message(fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.script(Answer(tool_calls=[WEATHER]), Answer(tool_calls=[WEATHER]))
    tools: Any = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    async with ant(fake_anthropic) as client:
        m = await client.messages.create(
            model="c",
            max_tokens=100,
            messages=MSGS,
            tools=tools,
        )
        assert m.stop_reason == "tool_use"
        assert m.content[0].type == "tool_use" and m.content[0].input == WEATHER["arguments"]
        async with client.messages.stream(
            model="c",
            max_tokens=100,
            messages=MSGS,
            tools=tools,
        ) as stream:
            final = await stream.get_final_message()
    block = final.content[0]
    assert block.type == "tool_use" and block.name == "get_weather"
    assert block.input == WEATHER["arguments"] and block.id.startswith("toolu_")
    assert final.stop_reason == "tool_use"


async def test_anthropic_errors(fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.script(
        overloaded(),
        rate_limited(retry_after=3),
        context_length(),
        server_error(),
        content_policy(),
    )
    async with ant(fake_anthropic) as client:

        async def fail() -> anthropic.APIStatusError:
            with pytest.raises(anthropic.APIStatusError) as ei:
                await client.messages.create(model="c", max_tokens=10, messages=MSGS)
            return ei.value

        e = await fail()
        assert e.status_code == 529
        assert err_body(e)["error"]["type"] == "overloaded_error"
        assert err_body(e)["type"] == "error"
        e = await fail()
        assert isinstance(e, anthropic.RateLimitError)
        assert e.response.headers["retry-after"] == "3"
        assert e.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
        assert e.response.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
        e = await fail()
        assert isinstance(e, anthropic.BadRequestError)
        assert err_body(e)["error"]["message"].startswith("prompt is too long")
        e = await fail()
        assert isinstance(e, anthropic.InternalServerError)
        assert err_body(e)["error"]["type"] == "api_error"
        e = await fail()
        assert isinstance(e, anthropic.BadRequestError)


async def test_anthropic_checks_headers_and_body(fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.keys = ["sk-ant-good"]
    async with ant(fake_anthropic, key="sk-ant-bad") as client:
        with pytest.raises(anthropic.AuthenticationError) as ei:
            await client.messages.create(model="c", max_tokens=10, messages=MSGS)
    assert err_body(ei.value)["error"] == {
        "type": "authentication_error",
        "message": "invalid x-api-key",
    }
    async with httpx.AsyncClient() as http:
        url = fake_anthropic.base_url + "/v1/messages"
        ok = {"x-api-key": "sk-ant-good", "anthropic-version": "2023-06-01"}
        body = {"model": "c", "max_tokens": 10, "messages": MSGS}
        r = await http.post(url, headers={"anthropic-version": "2023-06-01"}, json=body)
        assert r.status_code == 401
        assert r.json()["error"]["message"] == "x-api-key header is required"
        r = await http.post(url, headers={**ok, "x-api-key": "sk-ant-bad"}, json=body)
        assert r.status_code == 401 and r.json()["type"] == "error"
        r = await http.post(url, headers={"x-api-key": "sk-ant-good"}, json=body)
        assert r.status_code == 400 and "anthropic-version" in r.json()["error"]["message"]
        r = await http.post(url, headers=ok, json={"model": "c", "messages": MSGS})
        assert r.status_code == 400 and r.json()["error"]["message"] == "max_tokens: Field required"
        r = await http.post(
            url, headers=ok, json={**body, "messages": [{"role": "system", "content": "x"}, *MSGS]}
        )
        assert r.status_code == 400 and "top-level `system`" in r.json()["error"]["message"]
        r = await http.post(url, headers=ok, json=body)
        assert r.status_code == 200 and r.headers["anthropic-ratelimit-requests-limit"] == "50"


async def test_anthropic_error_event_mid_stream(fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.script(StreamError(after=4))
    got = []
    async with ant(fake_anthropic) as client:
        with pytest.raises(anthropic.APIStatusError) as ei:
            async with client.messages.stream(
                model="c",
                max_tokens=10,
                messages=MSGS,
            ) as stream:
                async for event in stream:
                    got.append(event.type)
    assert "Overloaded" in str(ei.value)
    assert got[0] == "message_start" and "message_stop" not in got


async def test_anthropic_no_end_and_usage_false(fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.script(NoEnd(), NoEnd(answer=Answer(usage=False)))
    for usage in (True, False):
        async with (
            httpx.AsyncClient() as http,
            http.stream(
                "POST",
                fake_anthropic.base_url + "/v1/messages",
                headers={"anthropic-version": "2023-06-01"},
                json={"model": "c", "max_tokens": 10, "messages": MSGS, "stream": True},
            ) as r,
        ):
            raw = await r.aread()
        events = [json.loads(d) for d in sse_data(raw)]
        assert events[-1]["type"] == "message_delta"
        assert ("usage" in events[-1]) is usage
        assert ("usage" in events[0]["message"]) is usage


# ---------------------------------------------------------------------------------------------
# Gemini

GEM_BODY = {"contents": [{"role": "user", "parts": [{"text": "Say hello."}]}]}


async def test_gemini_generate_content(fake_gemini: FakeGemini) -> None:
    fake_gemini.keys = ["AIza-good"]
    url = fake_gemini.base_url + "/v1beta/models/gemini-2.5-flash:generateContent"
    async with httpx.AsyncClient() as http:
        r = await http.post(url, headers={"x-goog-api-key": "AIza-good"}, json=GEM_BODY)
        assert r.status_code == 200
        body = r.json()
        cand = body["candidates"][0]
        assert cand["content"] == {
            "parts": [{"text": "Hello from gemini-2.5-flash."}],
            "role": "model",
        }
        assert cand["finishReason"] == "STOP"
        assert body["usageMetadata"]["promptTokenCount"] == 10
        assert body["usageMetadata"]["candidatesTokenCount"] == 5
        assert body["usageMetadata"]["totalTokenCount"] == 15
        assert body["modelVersion"] == "gemini-2.5-flash"
        # the key may come in the query instead
        r = await http.post(url, params={"key": "AIza-good"}, json=GEM_BODY)
        assert r.status_code == 200
        r = await http.post(url, params={"key": "AIza-bad"}, json=GEM_BODY)
        assert r.status_code == 400
        err = r.json()["error"]
        assert (
            err["status"] == "INVALID_ARGUMENT" and err["details"][0]["reason"] == "API_KEY_INVALID"
        )
        r = await http.post(url, json=GEM_BODY)
        assert r.status_code == 403 and r.json()["error"]["status"] == "PERMISSION_DENIED"
    assert fake_gemini.requests[0].model == "gemini-2.5-flash"
    assert fake_gemini.requests[1].query == {"key": "AIza-good"}


async def test_gemini_checks_the_request(fake_gemini: FakeGemini) -> None:
    url = fake_gemini.base_url + "/v1beta/models/gemini-2.5-flash:generateContent"
    async with httpx.AsyncClient() as http:
        r = await http.post(url, json={"model": "x", "messages": MSGS})
        assert r.status_code == 400
        assert 'Unknown name "model"' in r.json()["error"]["message"]
        r = await http.post(
            url, json={"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}
        )
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "Please use a valid role: user, model."


async def test_gemini_stream_sse(fake_gemini: FakeGemini) -> None:
    fake_gemini.script(Answer(text="abcdef", pieces=3))
    url = fake_gemini.base_url + "/v1beta/models/gemini-2.5-pro:streamGenerateContent"
    async with (
        httpx.AsyncClient() as http,
        http.stream("POST", url, params={"alt": "sse"}, json=GEM_BODY) as r,
    ):
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = await r.aread()
    assert b"\r\n\r\n" in raw and b"[DONE]" not in raw
    chunks = [json.loads(d) for d in sse_data(raw)]
    text = "".join(
        p.get("text", "") for c in chunks for p in c["candidates"][0]["content"]["parts"]
    )
    assert text == "abcdef"
    assert all("finishReason" not in c["candidates"][0] for c in chunks[:-1])
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert chunks[-1]["usageMetadata"]["candidatesTokenCount"] == 5
    assert "candidatesTokenCount" not in chunks[0]["usageMetadata"]


async def test_gemini_function_call_and_blocked_prompt(fake_gemini: FakeGemini) -> None:
    fake_gemini.script(Answer(tool_calls=[WEATHER]), content_policy(), content_policy())
    base = fake_gemini.base_url + "/v1beta/models/gemini-2.5-flash"
    async with httpx.AsyncClient() as http:
        r = await http.post(base + ":generateContent", json=GEM_BODY)
        parts = r.json()["candidates"][0]["content"]["parts"]
        assert parts == [{"functionCall": {"name": "get_weather", "args": WEATHER["arguments"]}}]
        r = await http.post(base + ":generateContent", json=GEM_BODY)
        assert r.status_code == 200
        body = r.json()
        assert body["promptFeedback"]["blockReason"] == "SAFETY" and "candidates" not in body
        r = await http.post(base + ":streamGenerateContent?alt=sse", json=GEM_BODY)
        chunks = [json.loads(d) for d in sse_data(r.content)]
        assert len(chunks) == 1 and chunks[0]["promptFeedback"]["blockReason"] == "SAFETY"


async def test_gemini_errors_with_retry_info(fake_gemini: FakeGemini) -> None:
    fake_gemini.script(rate_limited(retry_after=12), context_length(), overloaded(), server_error())
    url = fake_gemini.base_url + "/v1beta/models/gemini-2.5-flash:generateContent"
    async with httpx.AsyncClient() as http:
        r = await http.post(url, json=GEM_BODY)
        err = r.json()["error"]
        assert r.status_code == 429 and err["code"] == 429 and err["status"] == "RESOURCE_EXHAUSTED"
        retry = [d for d in err["details"] if d["@type"].endswith("google.rpc.RetryInfo")]
        assert retry == [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "12s"}]
        r = await http.post(url, json=GEM_BODY)
        err = r.json()["error"]
        assert r.status_code == 400 and err["status"] == "INVALID_ARGUMENT"
        assert "exceeds the maximum number of tokens" in err["message"]
        r = await http.post(url, json=GEM_BODY)
        assert r.status_code == 503 and r.json()["error"]["status"] == "UNAVAILABLE"
        r = await http.post(url, json=GEM_BODY)
        assert r.status_code == 500 and r.json()["error"]["status"] == "INTERNAL"


async def test_gemini_embeddings_and_models(fake_gemini: FakeGemini) -> None:
    base = fake_gemini.base_url + "/v1beta/models"
    req = {"model": "models/text-embedding-004", "content": {"parts": [{"text": "a"}]}}
    async with httpx.AsyncClient() as http:
        r = await http.post(
            base + "/text-embedding-004:batchEmbedContents",
            json={"requests": [req, {**req, "outputDimensionality": 4}]},
        )
        embs = r.json()["embeddings"]
        assert [len(e["values"]) for e in embs] == [8, 4]
        r = await http.get(base)
        names = [m["name"] for m in r.json()["models"]]
    assert names == [f"models/{m}" for m in fake_gemini.models]


async def test_gemini_no_end_and_stream_error(fake_gemini: FakeGemini) -> None:
    fake_gemini.script(NoEnd(), StreamError(after=1, message="bad things"))
    url = fake_gemini.base_url + "/v1beta/models/g:streamGenerateContent?alt=sse"
    async with httpx.AsyncClient() as http:
        r = await http.post(url, json=GEM_BODY)
        chunks = [json.loads(d) for d in sse_data(r.content)]
        assert chunks and all("finishReason" not in c["candidates"][0] for c in chunks)
        r = await http.post(url, json=GEM_BODY)
        chunks = [json.loads(d) for d in sse_data(r.content)]
    assert len(chunks) == 2 and chunks[1]["error"]["message"] == "bad things"


# ---------------------------------------------------------------------------------------------
# Ollama


async def test_ollama_chat_streams_ndjson_by_default(fake_ollama: FakeOllama) -> None:
    fake_ollama.script(Answer(text="Hi there", pieces=2, prompt_tokens=26, completion_tokens=3))
    async with httpx.AsyncClient() as http:
        r = await http.post(
            fake_ollama.base_url + "/api/chat", json={"model": "llama3.2", "messages": MSGS}
        )
    assert r.headers["content-type"] == "application/x-ndjson"
    assert r.headers["transfer-encoding"] == "chunked"
    lines = [json.loads(ln) for ln in r.content.splitlines()]
    assert [ln["done"] for ln in lines] == [False, False, True]
    assert "".join(ln["message"]["content"] for ln in lines) == "Hi there"
    final = lines[-1]
    assert final["done_reason"] == "stop"
    assert final["prompt_eval_count"] == 26 and final["eval_count"] == 3
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[key], int)
    assert all(ln["model"] == "llama3.2" and ln["created_at"].endswith("Z") for ln in lines)


async def test_ollama_whole_tools_and_usage_false(fake_ollama: FakeOllama) -> None:
    fake_ollama.script(Answer(tool_calls=[WEATHER]), Answer(usage=False))
    body = {"model": "llama3.2", "messages": MSGS, "stream": False}
    async with httpx.AsyncClient() as http:
        r = await http.post(fake_ollama.base_url + "/api/chat", json=body)
        msg = r.json()["message"]
        assert msg["tool_calls"] == [
            {"function": {"name": "get_weather", "arguments": WEATHER["arguments"]}}
        ]
        assert r.json()["done"] is True
        r = await http.post(fake_ollama.base_url + "/api/chat", json=body)
        assert r.json()["message"]["content"] == "Hello from llama3.2."
        assert "prompt_eval_count" not in r.json() and "eval_count" not in r.json()


async def test_ollama_embed_tags_errors(fake_ollama: FakeOllama) -> None:
    fake_ollama.script(Error(404, kind="not_found"), context_length(), StreamError(after=1))
    base = fake_ollama.base_url
    async with httpx.AsyncClient() as http:
        r = await http.post(
            base + "/api/embed", json={"model": "nomic-embed-text", "input": ["a", "b"]}
        )
        assert r.status_code == 404
        assert r.json() == {"error": 'model "nomic-embed-text" not found, try pulling it first'}
        r = await http.post(base + "/api/chat", json={"model": "m", "messages": MSGS})
        assert r.status_code == 400 and "context length" in r.json()["error"]
        r = await http.post(base + "/api/chat", json={"model": "m", "messages": MSGS})
        lines = [json.loads(ln) for ln in r.content.splitlines()]
        assert lines[0]["done"] is False and "error" in lines[1]
        r = await http.post(base + "/api/embed", json={"model": "nomic-embed-text", "input": "a"})
        assert len(r.json()["embeddings"]) == 1 and len(r.json()["embeddings"][0]) == 8
        r = await http.get(base + "/api/tags")
        assert [m["name"] for m in r.json()["models"]] == fake_ollama.models
        fake_ollama.keys = ["k"]
        r = await http.get(base + "/api/tags")
        assert r.status_code == 401 and r.json() == {"error": "unauthorized"}
        r = await http.get(base + "/api/tags", headers={"authorization": "Bearer k"})
        assert r.status_code == 200


async def test_ollama_no_end(fake_ollama: FakeOllama) -> None:
    fake_ollama.script(NoEnd())
    async with httpx.AsyncClient() as http:
        r = await http.post(
            fake_ollama.base_url + "/api/chat", json={"model": "m", "messages": MSGS}
        )
    lines = [json.loads(ln) for ln in r.content.splitlines()]
    assert lines and not any(ln["done"] for ln in lines)


@pytest.mark.parametrize("which", ["anthropic", "gemini", "ollama"])
async def test_misbehaviour_in_every_protocol(
    which: str, fake_anthropic: FakeAnthropic, fake_gemini: FakeGemini, fake_ollama: FakeOllama
) -> None:
    fake, url, body, headers = {
        "anthropic": (
            fake_anthropic,
            "/v1/messages",
            {"model": "c", "max_tokens": 9, "messages": MSGS, "stream": True},
            {"anthropic-version": "2023-06-01"},
        ),
        "gemini": (fake_gemini, "/v1beta/models/g:streamGenerateContent?alt=sse", GEM_BODY, {}),
        "ollama": (fake_ollama, "/api/chat", {"model": "m", "messages": MSGS}, {}),
    }[which]
    fake.script(Cut(after=2), Silent(), Reset(), Malformed(at=1))
    async with httpx.AsyncClient(timeout=httpx.Timeout(2.0, read=0.2)) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post(fake.base_url + url, json=body, headers=headers)
        with pytest.raises(httpx.ReadTimeout):
            await http.post(fake.base_url + url, json=body, headers=headers)
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            await http.post(fake.base_url + url, json=body, headers=headers)
        r = await http.post(fake.base_url + url, json=body, headers=headers)
    assert r.status_code == 200
    items = sse_data(r.content) if which != "ollama" else r.content.decode().splitlines()
    bad = []
    for i, item in enumerate(items):
        try:
            json.loads(item)
        except ValueError:
            bad.append(i)
    assert bad == [1]
    await wait_until(lambda: fake.connections == 0, 2, "every connection closed")


# ---------------------------------------------------------------------------------------------
# misbehaviour on the wire (the OpenAI fake; the others share the code that plays them)


async def _stream_raw(fake: FakeOpenAI, timeout: float = 2.0) -> bytes:
    got = bytearray()
    async with (
        httpx.AsyncClient(timeout=timeout) as http,
        http.stream(
            "POST",
            fake.base_url + "/chat/completions",
            json={"model": "m", "messages": MSGS, "stream": True},
        ) as r,
    ):
        async for c in r.aiter_raw():
            got += c
    return bytes(got)


async def test_cut_stream_breaks(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Cut(after=2))
    with pytest.raises(httpx.RemoteProtocolError):
        await _stream_raw(fake_openai)
    await wait_until(lambda: fake_openai.connections == 0, 2, "the cut connection closed")


async def test_cut_stream_sends_n_events_first(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Cut(after=2))
    got = bytearray()
    with pytest.raises(httpx.RemoteProtocolError):
        async with (
            httpx.AsyncClient() as http,
            http.stream(
                "POST",
                fake_openai.base_url + "/chat/completions",
                json={"model": "m", "messages": MSGS, "stream": True},
            ) as r,
        ):
            async for c in r.aiter_raw():
                got += c
    assert len(sse_data(bytes(got))) == 2


async def test_cut_whole_body(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Cut())
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post(
                fake_openai.base_url + "/chat/completions", json={"model": "m", "messages": MSGS}
            )


async def test_stall_stream_times_out_and_is_released(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Stall(after=1))
    got = bytearray()
    with pytest.raises(httpx.ReadTimeout):
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(2.0, read=0.3)) as http,
            http.stream(
                "POST",
                fake_openai.base_url + "/chat/completions",
                json={"model": "m", "messages": MSGS, "stream": True},
            ) as r,
        ):
            async for c in r.aiter_raw():
                got += c
    assert len(sse_data(bytes(got))) == 1
    # the client left: the fake lets the connection go
    await wait_until(lambda: fake_openai.connections == 0, 2, "the stalled connection closed")


async def test_stall_whole_body_sends_head_only(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Stall())
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(2.0, read=0.2)) as http,
        http.stream(
            "POST",
            fake_openai.base_url + "/chat/completions",
            json={"model": "m", "messages": MSGS},
        ) as r,
    ):
        assert r.status_code == 200
        with pytest.raises(httpx.ReadTimeout):
            await r.aread()


async def test_silent_never_answers(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Silent())
    async with httpx.AsyncClient(timeout=httpx.Timeout(2.0, read=0.2)) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(
                fake_openai.base_url + "/chat/completions", json={"model": "m", "messages": MSGS}
            )
    assert len(fake_openai.requests) == 1
    await wait_until(lambda: fake_openai.connections == 0, 2, "the silent connection closed")


async def test_silent_connection_closed_by_stop() -> None:
    fake = await FakeOpenAI().start()
    fake.script(Silent())
    reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
    writer.write(RAW_CHAT)
    await wait_until(lambda: len(fake.requests) == 1, 2, "the request arrived")
    assert fake.connections == 1
    await fake.stop()
    assert fake.connections == 0
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()


async def test_reset_is_a_tcp_rst(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Reset())
    reader, writer = await asyncio.open_connection("127.0.0.1", fake_openai.port)
    writer.write(RAW_CHAT)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 2)
    writer.close()
    fake_openai.script(Reset())
    async with httpx.AsyncClient() as http:
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            await http.post(
                fake_openai.base_url + "/chat/completions", json={"model": "m", "messages": MSGS}
            )


async def test_no_end_marker(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(NoEnd())
    data = sse_data(await _stream_raw(fake_openai))  # the HTTP body ends cleanly
    assert "[DONE]" not in data
    assert json.loads(data[-1])["choices"][0]["finish_reason"] == "stop"


async def test_malformed_event(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Malformed(at=1))
    data = sse_data(await _stream_raw(fake_openai))
    assert data[-1] == "[DONE]"
    bad = []
    for i, d in enumerate(data[:-1]):
        try:
            json.loads(d)
        except ValueError:
            bad.append(i)
    assert bad == [1]
    fake_openai.script(Malformed())
    async with httpx.AsyncClient() as http:
        r = await http.post(
            fake_openai.base_url + "/chat/completions", json={"model": "m", "messages": MSGS}
        )
    assert r.status_code == 200
    with pytest.raises(ValueError):
        json.loads(r.content)


async def test_requests_recorded_with_arrival_time(fake_openai: FakeOpenAI) -> None:
    t0 = time.monotonic()
    async with httpx.AsyncClient() as http:
        await http.get(fake_openai.base_url + "/models?limit=2", headers={"X-Custom": "A"})
    seen = fake_openai.requests[0]
    assert seen.method == "GET" and seen.path == "/v1/models" and seen.query == {"limit": "2"}
    assert seen.headers["x-custom"] == "A" and seen.json is None
    assert t0 <= seen.at <= time.monotonic()


async def test_script_ops_and_default(fake_openai: FakeOpenAI) -> None:
    fake_openai.script_ops = {"chat"}
    fake_openai.script(server_error())
    fake_openai.default = overloaded()
    async with httpx.AsyncClient() as http:
        r = await http.get(fake_openai.base_url + "/models")
        assert r.status_code == 503  # not scripted: the default
        assert fake_openai.pending == 1
        body = {"model": "m", "messages": MSGS}
        r = await http.post(fake_openai.base_url + "/chat/completions", json=body)
        assert r.status_code == 500
        r = await http.post(fake_openai.base_url + "/chat/completions", json=body)
        assert r.status_code == 503
    assert [type(s.behaviour).__name__ for s in fake_openai.requests] == ["Error"] * 3
