"""The OpenAI-compatible API through the real gateway, with the official SDK as the client."""

from __future__ import annotations

import openai
import pytest

from tests.llm.fakes import FakeOpenAI
from tests.llm.support import gateway, llm_yaml


def _config(fake: FakeOpenAI) -> str:
    return llm_yaml(
        {"up": f'{{kind: openai, base_url: "{fake.base_url}", keys: ["sk-up"]}}'},
        "    chat:\n      deployments:\n        - {provider: up, model: gpt-4o-mini}\n",
    )


async def test_chat_non_streaming(fake_openai: FakeOpenAI) -> None:
    async with gateway(_config(fake_openai)) as (_app, port):
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0
        )
        r = await client.chat.completions.with_raw_response.create(
            model="chat", messages=[{"role": "user", "content": "hi"}]
        )
        completion = r.parse()
        assert completion.choices[0].message.content == "Hello from gpt-4o-mini."
        assert completion.model == "gpt-4o-mini"
        assert completion.usage is not None and completion.usage.prompt_tokens == 10
        assert r.headers["x-piuptime-deployment"] == "up/gpt-4o-mini"
        assert float(r.headers["x-piuptime-overhead-ms"]) >= 0
        seen = fake_openai.requests[-1]
        assert seen.headers["authorization"] == "Bearer sk-up"
        assert seen.model == "gpt-4o-mini"
        await client.close()


async def test_chat_streaming_with_usage(fake_openai: FakeOpenAI) -> None:
    async with gateway(_config(fake_openai)) as (_app, port):
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0
        )
        stream = await client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text = ""
        usage = None
        finish = None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        assert text == "Hello from gpt-4o-mini."
        assert finish == "stop"
        assert usage is not None and usage.completion_tokens == 5
        await client.close()


async def test_models_and_unknown_model(fake_openai: FakeOpenAI) -> None:
    async with gateway(_config(fake_openai)) as (_app, port):
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0
        )
        models = await client.models.list()
        assert [m.id for m in models.data] == ["chat"]
        with pytest.raises(openai.NotFoundError) as info:
            await client.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "hi"}]
            )
        assert info.value.code == "model_not_found"
        await client.close()
