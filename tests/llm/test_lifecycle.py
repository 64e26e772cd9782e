"""The AI gateway's life around requests: a client that leaves mid-stream, reloads that keep
what was learnt, the admin status, and the Anthropic SDK in front of an Anthropic provider."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import anthropic
import openai

from tests.llm.fakes import Answer, FakeAnthropic, FakeOpenAI, server_error
from tests.llm.support import gateway, llm_yaml, metric
from tests.support import RawClient, wait_until

MSG = [{"role": "user", "content": "hi"}]


def _one(fake: FakeOpenAI, extra: str = "") -> str:
    return llm_yaml(
        {"p": f'{{kind: openai, base_url: "{fake.base_url}"}}'},
        "    chat:\n      deployments:\n        - {provider: p, model: m}\n",
        extra=extra,
    )


async def test_a_client_leaving_mid_stream_frees_the_upstream_and_blames_nobody(
    fake_openai: FakeOpenAI,
) -> None:
    fake_openai.script(Answer(text="x" * 400, pieces=200, chunk_gap=0.01))
    async with gateway(_one(fake_openai)) as (app, port):
        entries: list[dict[str, Any]] = []
        app.handler.observers = (*app.handler.observers, entries.append)
        c = await RawClient.connect(port)
        body = b'{"model": "chat", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
        await c.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%b" % (len(body), body)
        )
        head = await c.read_response(head_only=True)
        assert head.status == 200
        await c.close()  # gone after the first chunks
        t0 = asyncio.get_running_loop().time()
        await wait_until(lambda: bool(entries), 5, "the request logged")
        # the generation is cut off at once (the fake would stream for 2 s): the upstream
        # connection is closed, not kept for a client that is gone
        assert asyncio.get_running_loop().time() - t0 < 1.0
        await wait_until(lambda: fake_openai.connections == 0, 5, "the upstream connection closed")
        assert entries[0]["llm_error"] == "client_disconnected"
        dep = app.llm.groups["chat"].deployments[0]
        assert dep.breaker_failures == 0 and dep.in_flight == 0
        assert metric(app, "llm_errors") == 0
        # the next client is served normally
        oc = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert (await oc.chat.completions.create(model="chat", messages=MSG)).model == "m"
        await oc.close()


async def test_reload_keeps_the_state_of_unchanged_deployments(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.script(server_error(500), server_error(500))
    text = _one(fake_openai, extra="  breaker: {failures: 2, open_for: 60s}")
    async with gateway(text, tmp_path=tmp_path, watch_interval=0) as (app, port):
        c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        try:
            await c.chat.completions.create(model="chat", messages=MSG)
        except openai.APIStatusError as exc:
            assert exc.status_code == 502
        before = app.llm.groups["chat"].deployments[0]
        assert before.breaker_state == "open"
        pool = app.llm.providers["p"].pool
        # a new group beside it: the unchanged deployment keeps its open breaker and its pool
        (tmp_path / "piuptime.yaml").write_text(
            text.replace(
                "  models:\n",
                "  models:\n    other:\n      deployments:\n        - {provider: p, model: o}\n",
            )
        )
        assert await app.reload("test")
        assert app.llm.groups["chat"].deployments[0] is before
        assert app.llm.providers["p"].pool is pool
        assert set(app.llm.groups) == {"chat", "other"}
        other = await c.chat.completions.create(model="other", messages=MSG)
        assert other.model == "o"
        # an invalid change is refused and changes nothing
        (tmp_path / "piuptime.yaml").write_text(text.replace("provider: p,", "provider: q,"))
        assert not await app.reload("test")
        assert set(app.llm.groups) == {"chat", "other"}
        await c.close()


async def test_admin_status_shows_the_deployments(fake_openai: FakeOpenAI) -> None:
    from tests.support import fetch

    text = _one(fake_openai) + 'admin: {listen: "127.0.0.1:0", token: t0k}\n'
    async with gateway(text) as (app, port):
        c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        await c.chat.completions.create(model="chat", messages=MSG)
        await c.close()
        admin_port = app.admin.address.rsplit(":", 1)[1]
        r = await fetch(int(admin_port), "/status", headers={"authorization": "Bearer t0k"})
        assert r.status == 200
        import orjson

        (dep,) = orjson.loads(r.body)["llm"]["chat"]
        assert dep["deployment"] == "p/m" and dep["breaker"] == "closed"
        assert dep["requests_total"] == 1 and dep["ttft_ewma_ms"] > 0


async def test_anthropic_sdk_in_front_of_an_anthropic_provider(
    fake_anthropic: FakeAnthropic,
) -> None:
    fake_anthropic.keys = ["sk-ant"]
    fake_anthropic.script(
        Answer(tool_calls=[{"name": "lookup", "arguments": {"q": "pi"}}]),
        Answer(text="It is 3.14.", pieces=4),
    )
    text = llm_yaml(
        {"c": f'{{kind: anthropic, base_url: "{fake_anthropic.base_url}", keys: ["sk-ant"]}}'},
        "    claude:\n      deployments:\n"
        "        - {provider: c, model: claude-3-5-haiku-latest}\n",
    )
    tools = [
        {
            "name": "lookup",
            "description": "look a thing up",
            "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
        }
    ]
    async with gateway(text) as (_app, port):
        c = anthropic.AsyncAnthropic(
            base_url=f"http://127.0.0.1:{port}", api_key="x", max_retries=0
        )
        first = await c.messages.create(
            model="claude",
            max_tokens=64,
            tools=tools,
            messages=[{"role": "user", "content": "pi?"}],
        )
        assert first.stop_reason == "tool_use"
        call = next(b for b in first.content if b.type == "tool_use")
        assert call.input == {"q": "pi"}
        async with c.messages.stream(
            model="claude",
            max_tokens=64,
            tools=tools,
            messages=[
                {"role": "user", "content": "pi?"},
                {"role": "assistant", "content": first.content},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "3.14"}],
                },
            ],
        ) as stream:
            text_out = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert text_out == "It is 3.14." and final.stop_reason == "end_turn"
        sent = fake_anthropic.requests[-1].json
        assert sent["messages"][-1]["content"][0]["type"] == "tool_result"
        assert sent["messages"][1]["content"][0]["type"] == "tool_use"
        assert fake_anthropic.requests[-1].headers["x-api-key"] == "sk-ant"
        await c.close()
