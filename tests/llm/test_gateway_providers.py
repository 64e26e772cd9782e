"""Every provider kind through the real gateway: the openai SDK talks to the gateway, the gateway
talks to a fake Anthropic, Gemini or Ollama server in that provider's own wire protocol."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.llm.fakes import (
    Answer,
    Cut,
    FakeAnthropic,
    FakeGemini,
    FakeOllama,
    FakeServer,
    Malformed,
    NoEnd,
    StreamError,
    context_length,
    overloaded,
    rate_limited,
)
from tests.llm.support import gateway, llm_yaml, metric

MSG = [{"role": "user", "content": "hi"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "the weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
MODEL = {
    "anthropic": "claude-3-5-haiku-latest",
    "gemini": "gemini-2.0-flash",
    "ollama": "llama3.2:1b",
}


@pytest.fixture(params=["anthropic", "gemini", "ollama"])
def fake(request: pytest.FixtureRequest) -> FakeServer:
    return request.getfixturevalue(f"fake_{request.param}")  # type: ignore[no-any-return]


def kind_of(fake: FakeServer) -> str:
    if isinstance(fake, FakeAnthropic):
        return "anthropic"
    if isinstance(fake, FakeGemini):
        return "gemini"
    assert isinstance(fake, FakeOllama)
    return "ollama"


def config(fake: FakeServer, extra_models: str = "") -> str:
    kind = kind_of(fake)
    fake.keys = ["k-1"]
    models = f"    chat:\n      deployments:\n        - {{provider: p, model: {MODEL[kind]}}}\n"
    if kind != "anthropic":
        embed = "text-embedding-004" if kind == "gemini" else "nomic-embed-text"
        models += (
            "    embed:\n      mode: embeddings\n"
            f"      deployments:\n        - {{provider: p, model: {embed}}}\n"
        )
    return llm_yaml(
        {"p": f'{{kind: {kind}, base_url: "{fake.base_url}", keys: ["k-1"]}}'},
        models + extra_models,
        extra="  timeouts: {first_byte: 2s, first_token: 2s, idle: 500ms, total: 10s}",
    )


def client(port: int) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=20
    )


async def collect(stream: Any) -> tuple[str, str | None, Any, dict[int, dict[str, str]]]:
    text, finish, usage = "", None, None
    calls: dict[int, dict[str, str]] = {}
    async for chunk in stream:
        if chunk.choices:
            choice = chunk.choices[0]
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or ():
                call = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                if tc.function and tc.function.name:
                    call["name"] += tc.function.name
                if tc.function and tc.function.arguments:
                    call["arguments"] += tc.function.arguments
        if chunk.usage is not None:
            usage = chunk.usage
    return text, finish, usage, calls


async def test_chat_whole(fake: FakeServer) -> None:
    model = MODEL[kind_of(fake)]
    async with gateway(config(fake)) as (_app, port):
        c = client(port)
        r = await c.chat.completions.create(
            model="chat", messages=[{"role": "system", "content": "be brief"}, *MSG]
        )
        assert r.choices[0].message.content == f"Hello from {model}."
        assert r.choices[0].finish_reason == "stop"
        assert r.usage is not None and r.usage.prompt_tokens == 10
        assert r.usage.completion_tokens == 5
        await c.close()


async def test_chat_streamed_with_usage(fake: FakeServer) -> None:
    model = MODEL[kind_of(fake)]
    async with gateway(config(fake)) as (_app, port):
        c = client(port)
        stream = await c.chat.completions.create(
            model="chat", messages=MSG, stream=True, stream_options={"include_usage": True}
        )
        text, finish, usage, _ = await collect(stream)
        assert (text, finish) == (f"Hello from {model}.", "stop")
        assert usage is not None and usage.completion_tokens == 5
        await c.close()


async def test_tool_calls_whole_and_streamed(fake: FakeServer) -> None:
    call = {"name": "get_weather", "arguments": {"city": "Oslo"}}
    fake.script(Answer(tool_calls=[call]), Answer(tool_calls=[call]))
    async with gateway(config(fake)) as (_app, port):
        c = client(port)
        r = await c.chat.completions.create(model="chat", messages=MSG, tools=TOOLS)  # type: ignore[arg-type]
        assert r.choices[0].finish_reason == "tool_calls"
        (tc,) = r.choices[0].message.tool_calls or []
        assert tc.function.name == "get_weather"  # type: ignore[union-attr]
        assert tc.function.arguments.replace(" ", "") == '{"city":"Oslo"}'  # type: ignore[union-attr]
        stream = await c.chat.completions.create(
            model="chat",
            messages=MSG,
            tools=TOOLS,
            stream=True,  # type: ignore[arg-type]
        )
        _, finish, _, calls = await collect(stream)
        assert finish == "tool_calls"
        assert calls[0]["name"] == "get_weather"
        assert calls[0]["arguments"].replace(" ", "") == '{"city":"Oslo"}'
        await c.close()


async def test_usage_counted_offline_when_the_provider_reports_none(fake: FakeServer) -> None:
    fake.script(Answer(usage=False))
    async with gateway(config(fake)) as (app, port):
        entries: list[dict[str, Any]] = []
        app.handler.observers = (*app.handler.observers, entries.append)
        c = client(port)
        r = await c.chat.completions.create(model="chat", messages=MSG)
        assert r.usage is not None and r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
        assert entries[-1]["usage_source"] == "counted"
        await c.close()


async def test_embeddings(fake: FakeServer) -> None:
    if kind_of(fake) == "anthropic":
        pytest.skip("Anthropic has no embeddings API")
    async with gateway(config(fake)) as (_app, port):
        c = client(port)
        r = await c.embeddings.create(model="embed", input=["one", "two"])
        assert [d.index for d in r.data] == [0, 1]
        assert len(r.data[0].embedding) == 8
        await c.close()


async def test_rate_limit_with_retry_after_is_passed_on(fake: FakeServer) -> None:
    fake.script(rate_limited(retry_after=90))
    async with gateway(config(fake)) as (_app, port):
        c = client(port)
        with pytest.raises(openai.RateLimitError) as info:
            await c.chat.completions.create(model="chat", messages=MSG)
        assert int(info.value.response.headers["retry-after"]) >= 89
        await c.close()


async def test_overload_moves_to_the_fallback_group(fake: FakeServer) -> None:
    fake.script(overloaded())
    extra = "    spare:\n      deployments:\n        - {provider: p, model: spare-model}\n"
    text = config(fake, extra).replace(
        "    chat:\n      deployments:", "    chat:\n      fallbacks: [spare]\n      deployments:"
    )
    async with gateway(text) as (app, port):
        c = client(port)
        r = await c.chat.completions.create(model="chat", messages=MSG)
        assert r.choices[0].message.content == "Hello from spare-model."
        assert metric(app, "llm_fallbacks", model="chat") == 1
        assert metric(app, "llm_errors", model="chat", kind="overloaded") == 1
        await c.close()


async def test_context_length_is_a_clear_400(fake: FakeServer) -> None:
    fake.script(context_length())
    async with gateway(config(fake)) as (_app, port):
        c = client(port)
        with pytest.raises(openai.BadRequestError) as info:
            await c.chat.completions.create(model="chat", messages=MSG)
        assert info.value.code == "context_length_exceeded"
        assert len([r for r in fake.requests if r.method == "POST"]) == 1
        await c.close()


#: stream events up to and including the first piece of text, per protocol (Anthropic sends
#: message_start, content_block_start and a ping first; Gemini and Ollama text at once)
FIRST_TEXT = {"anthropic": 4, "gemini": 1, "ollama": 1}


@pytest.mark.parametrize("fault", [Cut, StreamError], ids=["cut", "error-event"])
async def test_broken_stream_ends_with_an_error_event(fake: FakeServer, fault: Any) -> None:
    after = FIRST_TEXT[kind_of(fake)] + 1
    fake.script(fault(after=after, answer=Answer(chunk_gap=0.05, pieces=4)))
    async with gateway(config(fake)) as (_app, port):
        c = client(port)
        stream = await c.chat.completions.create(model="chat", messages=MSG, stream=True)
        text, finish = "", None
        with pytest.raises(openai.APIError):
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
        assert text and finish is None
        await c.close()


async def test_malformed_event_is_skipped(fake: FakeServer) -> None:
    fake.script(Malformed(at=2, answer=Answer(pieces=4)))
    async with gateway(config(fake)) as (_app, port):
        c = client(port)
        stream = await c.chat.completions.create(model="chat", messages=MSG, stream=True)
        text, finish, _, _ = await collect(stream)
        assert finish == "stop" and text
        await c.close()


async def test_stream_without_its_end_marker(fake: FakeServer) -> None:
    """Anthropic sends its stop reason (message_delta) before message_stop: without the latter
    the answer is still known to be whole, and is finalised at once. Gemini's and Ollama's
    finish reason is in their last event itself: without it the answer may be truncated,
    and is never presented as finished."""
    fake.script(NoEnd(answer=Answer()))
    async with gateway(config(fake)) as (_app, port):
        c = client(port)
        stream = await c.chat.completions.create(
            model="chat", messages=MSG, stream=True, stream_options={"include_usage": True}
        )
        if kind_of(fake) == "anthropic":
            text, finish, usage, _ = await collect(stream)
            assert finish == "stop" and text
            assert usage is not None and usage.completion_tokens > 0
        else:
            with pytest.raises(openai.APIError, match="truncated"):
                await collect(stream)
        await c.close()
