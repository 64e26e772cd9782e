"""The Anthropic-compatible ``/v1/messages`` through the real gateway, with the official
``anthropic`` SDK as the client, in front of an OpenAI-protocol provider."""

from __future__ import annotations

import anthropic
import pytest

from tests.llm.fakes import Answer, Cut, FakeOpenAI, rate_limited
from tests.llm.support import gateway, llm_yaml


def _config(fake: FakeOpenAI, plugins: str = "") -> str:
    routes = ""
    if plugins:
        routes = f"  routes:\n    - {{path: /v1/, plugins: {plugins}}}"
    text = llm_yaml(
        {"up": f'{{kind: openai, base_url: "{fake.base_url}"}}'},
        "    chat:\n      deployments:\n        - {provider: up, model: gpt-4o-mini}\n",
        routes=routes,
        extra="  timeouts: {first_byte: 2s, first_token: 2s, idle: 300ms, total: 10s}",
    )
    return text


def _client(port: int, key: str = "x") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=f"http://127.0.0.1:{port}", api_key=key, max_retries=0, timeout=20
    )


async def test_messages_create(fake_openai: FakeOpenAI) -> None:
    async with gateway(_config(fake_openai)) as (_app, port):
        c = _client(port)
        msg = await c.messages.create(
            model="chat",
            max_tokens=100,
            system="be brief",
            messages=[{"role": "user", "content": "hi"}],
        )
        assert msg.content[0].type == "text"
        assert msg.content[0].text == "Hello from gpt-4o-mini."
        assert msg.stop_reason == "end_turn"
        assert msg.usage.input_tokens == 10 and msg.usage.output_tokens == 5
        sent = fake_openai.requests[-1].json
        assert sent["messages"][0] == {"role": "system", "content": "be brief"}
        assert sent["max_tokens"] == 100
        await c.close()


async def test_messages_stream_with_tool_use(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Answer(tool_calls=[{"name": "get_weather", "arguments": {"city": "Oslo"}}]))
    async with gateway(_config(fake_openai)) as (_app, port):
        c = _client(port)
        async with c.messages.stream(
            model="chat",
            max_tokens=100,
            tools=[
                {
                    "name": "get_weather",
                    "description": "weather",
                    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                }
            ],
            messages=[{"role": "user", "content": "weather in Oslo?"}],
        ) as stream:
            final = await stream.get_final_message()
        assert final.stop_reason == "tool_use"
        tool = next(b for b in final.content if b.type == "tool_use")
        assert tool.name == "get_weather" and tool.input == {"city": "Oslo"}
        sent = fake_openai.requests[-1].json
        assert sent["tools"][0]["function"]["name"] == "get_weather"
        await c.close()


async def test_messages_stream_text(fake_openai: FakeOpenAI) -> None:
    async with gateway(_config(fake_openai)) as (_app, port):
        c = _client(port)
        async with c.messages.stream(
            model="chat", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert text == "Hello from gpt-4o-mini."
        assert final.stop_reason == "end_turn"
        await c.close()


async def test_messages_errors_are_in_anthropic_shape(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(rate_limited(retry_after=60))
    async with gateway(_config(fake_openai)) as (_app, port):
        c = _client(port)
        with pytest.raises(anthropic.NotFoundError) as nf:
            await c.messages.create(
                model="nope", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
            )
        assert nf.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
        with pytest.raises(anthropic.RateLimitError) as rl:
            await c.messages.create(
                model="chat", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
            )
        assert int(rl.value.response.headers["retry-after"]) >= 59
        with pytest.raises(anthropic.BadRequestError):
            await c.messages.create(model="chat", max_tokens=10, messages=[])
        await c.close()


async def test_messages_stream_cut_mid_answer_raises_in_the_sdk(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Cut(after=2, answer=Answer(chunk_gap=0.05)))
    async with gateway(_config(fake_openai)) as (_app, port):
        c = _client(port)
        with pytest.raises(anthropic.APIStatusError):
            async with c.messages.stream(
                model="chat", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
            ) as stream:
                async for _ in stream:
                    pass
        await c.close()


async def test_key_auth_with_the_anthropic_header(fake_openai: FakeOpenAI) -> None:
    text = _config(fake_openai, plugins="{key_auth: {header_names: [x-api-key]}}")
    text += "consumers:\n  app: {keys: [sk-app-1]}\n"
    async with gateway(text) as (_app, port):
        bad = _client(port, key="wrong")
        with pytest.raises(anthropic.AuthenticationError):
            await bad.messages.create(
                model="chat", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
            )
        good = _client(port, key="sk-app-1")
        msg = await good.messages.create(
            model="chat", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
        assert msg.content[0].text == "Hello from gpt-4o-mini."  # type: ignore[union-attr]
        assert "x-api-key" not in fake_openai.requests[-1].headers
        await bad.close()
        await good.close()
