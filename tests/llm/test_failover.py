"""Failure semantics of the AI gateway, each through the real gateway against a fake OpenAI
API that misbehaves on purpose (docs/llm.md, "Failure semantics"). The official ``openai`` SDK
is the client, with its own retries off so that every retry seen is the gateway's."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from piuptime.llm import groups as groups_module
from tests.llm.fakes import (
    Answer,
    Cut,
    Error,
    FakeOpenAI,
    Malformed,
    NoEnd,
    Reset,
    Silent,
    Stall,
    StreamError,
    content_policy,
    context_length,
    rate_limited,
    server_error,
    unauthorized,
)
from tests.llm.support import gateway, llm_yaml, metric
from tests.support import free_port

MSG = [{"role": "user", "content": "hi"}]

#: timeouts short enough for tests, long enough for a loaded CI machine
TIMEOUTS = "  timeouts: {connect: 1s, first_byte: 1s, first_token: 1s, idle: 1s, total: 10s}"


@pytest.fixture
async def second_openai() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as fake:
        yield fake


def two_deployments(
    a: FakeOpenAI | str,
    b: FakeOpenAI | str,
    *,
    timeouts: str = TIMEOUTS,
    group_extra: str = "",
    extra: str = "",
) -> str:
    """Group ``chat``: deployment A (model ``model-a`` at ``a``) then B (``model-b`` at ``b``),
    strategy priority."""
    url_a = a.base_url if isinstance(a, FakeOpenAI) else a
    url_b = b.base_url if isinstance(b, FakeOpenAI) else b
    models = (
        "    chat:\n"
        "      deployments:\n"
        "        - {provider: a, model: model-a}\n"
        "        - {provider: b, model: model-b}\n"
    )
    if group_extra:
        models += group_extra
    return llm_yaml(
        {
            "a": f'{{kind: openai, base_url: "{url_a}"}}',
            "b": f'{{kind: openai, base_url: "{url_b}"}}',
        },
        models,
        extra=timeouts + ("\n" + extra if extra else ""),
    )


def client(port: int) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-client", max_retries=0, timeout=20
    )


def models_seen(*fakes: FakeOpenAI) -> list[str | None]:
    seen = sorted((r.at, r.model) for f in fakes for r in f.requests if "chat" in r.path)
    return [m for _, m in seen]


async def collect(stream: Any) -> tuple[str, str | None, Any]:
    text, finish, usage = "", None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    return text, finish, usage


# -- 429 ----------------------------------------------------------------------------------------


async def test_429_with_retry_after_moves_on_and_holds_the_deployment_off(
    fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> None:
    fake_openai.script(rate_limited(retry_after=30))
    async with gateway(two_deployments(fake_openai, second_openai)) as (app, port):
        c = client(port)
        r = await c.chat.completions.with_raw_response.create(model="chat", messages=MSG)
        assert r.parse().model == "model-b"
        assert r.headers["x-piuptime-deployment"] == "b/model-b"
        for _ in range(3):  # A said "not for 30 s": it is not asked again
            done = await c.chat.completions.create(model="chat", messages=MSG)
            assert done.model == "model-b"
        assert models_seen(fake_openai, second_openai) == ["model-a"] + ["model-b"] * 4
        assert metric(app, "llm_errors", kind="rate_limited", deployment="a/model-a") == 1
        await c.close()


async def test_429_with_retry_after_waits_when_the_deadline_allows(
    fake_openai: FakeOpenAI,
) -> None:
    fake_openai.script(rate_limited(retry_after=0.4))
    config = llm_yaml(
        {"a": f'{{kind: openai, base_url: "{fake_openai.base_url}"}}'},
        "    chat:\n      deployments:\n        - {provider: a, model: model-a}\n",
        extra=TIMEOUTS,
    )
    async with gateway(config) as (_app, port):
        c = client(port)
        done = await c.chat.completions.create(model="chat", messages=MSG)
        assert done.choices[0].message.content == "Hello from model-a."
        first, second = fake_openai.requests
        assert second.at - first.at >= 0.39  # never sooner than Retry-After
        await c.close()


async def test_429_without_retry_after_backs_off_with_jitter_and_never_hammers(
    fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(groups_module, "_BACKOFF_BASE", 0.2)
    # a 429 with no time at all (no Retry-After, no x-ratelimit-reset-* of a limit that ran
    # out, which are honoured): what a vLLM or LM Studio server in front of a busy GPU sends
    bare = Error(status=429, kind="bad_request", message="Too many requests", code="rate_limit")
    fake_openai.script(bare, bare)
    config = llm_yaml(
        {"a": f'{{kind: openai, base_url: "{fake_openai.base_url}"}}'},
        "    chat:\n      deployments:\n        - {provider: a, model: model-a}\n",
        extra=TIMEOUTS,
    )
    async with gateway(config) as (_app, port):
        c = client(port)
        with pytest.raises(openai.RateLimitError) as info:
            await c.chat.completions.create(model="chat", messages=MSG)
        assert int(info.value.response.headers["retry-after"]) >= 1
        first, second = fake_openai.requests
        gap = second.at - first.at
        assert 0.1 <= gap <= 0.35  # base 0.2 s with full jitter in its upper half
        # held off (the second back-off doubles: 0.2-0.4 s): the next request waits it out
        # inside its deadline instead of asking sooner, and gets the answer
        done = await c.chat.completions.create(model="chat", messages=MSG)
        assert done.model == "model-a"
        third = fake_openai.requests[2]
        assert third.at - second.at >= 0.19
        await c.close()


# -- 5xx, resets, refused connections -------------------------------------------------------------


async def test_5xx_is_retried_once_on_the_same_deployment_then_fails_over(
    fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> None:
    fake_openai.script(server_error(500), server_error(502))
    async with gateway(two_deployments(fake_openai, second_openai)) as (_app, port):
        c = client(port)
        r = await c.chat.completions.with_raw_response.create(model="chat", messages=MSG)
        assert r.parse().model == "model-b"
        assert r.headers["x-piuptime-attempts"] == "3"
        assert models_seen(fake_openai, second_openai) == ["model-a", "model-a", "model-b"]
        await c.close()


async def test_5xx_once_then_success_on_the_retry(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(server_error(503))
    async with gateway(two_deployments(fake_openai, fake_openai)) as (_app, port):
        c = client(port)
        done = await c.chat.completions.create(model="chat", messages=MSG)
        assert done.model == "model-a"
        assert models_seen(fake_openai) == ["model-a", "model-a"]
        await c.close()


async def test_connection_reset_is_retried_once_then_fails_over(
    fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> None:
    fake_openai.script(Reset(), Reset())
    async with gateway(two_deployments(fake_openai, second_openai)) as (_app, port):
        c = client(port)
        done = await c.chat.completions.create(model="chat", messages=MSG)
        assert done.model == "model-b"
        assert models_seen(fake_openai, second_openai) == ["model-a", "model-a", "model-b"]
        await c.close()


async def test_refused_connection_fails_over(second_openai: FakeOpenAI) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    async with gateway(two_deployments(dead, second_openai)) as (_app, port):
        c = client(port)
        t0 = time.monotonic()
        done = await c.chat.completions.create(model="chat", messages=MSG)
        assert done.model == "model-b"
        assert time.monotonic() - t0 < 1.0
        await c.close()


async def test_connect_timeout_fails_over(second_openai: FakeOpenAI) -> None:
    # a listener whose backlog is full never completes the handshake: a real connect timeout
    hold = socket.socket()
    hold.bind(("127.0.0.1", 0))
    hold.listen(0)
    fillers = []
    try:
        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(hold.getsockname())
            except BlockingIOError:
                pass
            fillers.append(s)
        url = f"http://127.0.0.1:{hold.getsockname()[1]}/v1"
        timeouts = "  timeouts: {connect: 300ms, first_byte: 1s, first_token: 1s, idle: 1s}"
        async with gateway(two_deployments(url, second_openai, timeouts=timeouts)) as (_a, port):
            c = client(port)
            done = await c.chat.completions.create(model="chat", messages=MSG)
            assert done.model == "model-b"
            await c.close()
    finally:
        for s in fillers:
            s.close()
        hold.close()


# -- silence and slowness -------------------------------------------------------------------------


async def test_silent_deployment_times_out_on_first_byte_and_is_not_retried(
    fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> None:
    fake_openai.script(Silent())
    timeouts = "  timeouts: {first_byte: 300ms, first_token: 300ms, idle: 1s, total: 10s}"
    async with gateway(two_deployments(fake_openai, second_openai, timeouts=timeouts)) as (
        app,
        port,
    ):
        c = client(port)
        t0 = time.monotonic()
        done = await c.chat.completions.create(model="chat", messages=MSG)
        elapsed = time.monotonic() - t0
        assert done.model == "model-b"
        assert 0.29 <= elapsed < 2.0
        assert models_seen(fake_openai, second_openai) == ["model-a", "model-b"]
        assert metric(app, "llm_errors", kind="timeout") == 1
        await c.close()


async def test_total_deadline_bounds_everything(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Silent(), Silent(), Silent())
    timeouts = "  timeouts: {first_byte: 5s, first_token: 5s, idle: 5s, total: 500ms}"
    async with gateway(two_deployments(fake_openai, fake_openai, timeouts=timeouts)) as (
        _app,
        port,
    ):
        c = client(port)
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as info:
            await c.chat.completions.create(model="chat", messages=MSG)
        assert info.value.status_code == 504
        assert time.monotonic() - t0 < 2.0
        await c.close()


async def test_slow_first_token_fails_over_before_the_client_sees_anything(
    fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> None:
    fake_openai.script(Answer(first_token_delay=2.0))
    timeouts = "  timeouts: {first_byte: 5s, first_token: 300ms, idle: 5s, total: 10s}"
    async with gateway(two_deployments(fake_openai, second_openai, timeouts=timeouts)) as (
        _app,
        port,
    ):
        c = client(port)
        stream = await c.chat.completions.create(model="chat", messages=MSG, stream=True)
        text, finish, _ = await collect(stream)
        assert text == "Hello from model-b."
        assert finish == "stop"
        await c.close()


# -- broken streams -------------------------------------------------------------------------------


async def test_stream_cut_before_the_first_token_fails_over(
    fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> None:
    fake_openai.script(Cut(after=1), Cut(after=1))  # only the role chunk, then the socket closes
    async with gateway(two_deployments(fake_openai, second_openai)) as (_app, port):
        c = client(port)
        stream = await c.chat.completions.create(model="chat", messages=MSG, stream=True)
        text, finish, _ = await collect(stream)
        assert (text, finish) == ("Hello from model-b.", "stop")
        await c.close()


# a gap between events, so the first token reaches the client before the fault
SLOW = Answer(chunk_gap=0.05)


@pytest.mark.parametrize(
    "fault",
    [Cut(after=2, answer=SLOW), Stall(after=2, answer=SLOW), StreamError(after=2, answer=SLOW)],
    ids=["cut", "stall", "error-event"],
)
async def test_stream_broken_mid_answer_ends_with_an_error_event_never_a_normal_finish(
    fake_openai: FakeOpenAI, second_openai: FakeOpenAI, fault: Any
) -> None:
    fake_openai.script(fault)
    timeouts = "  timeouts: {first_byte: 2s, first_token: 2s, idle: 300ms, total: 10s}"
    async with gateway(two_deployments(fake_openai, second_openai, timeouts=timeouts)) as (
        app,
        port,
    ):
        c = client(port)
        stream = await c.chat.completions.create(
            model="chat", messages=MSG, stream=True, stream_options={"include_usage": True}
        )
        text, finish = "", None
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
        assert finish is None  # never presented as finished
        assert text and "Hello from model-a.".startswith(text) and text != "Hello from model-a."
        assert "model-a" in str(info.value)
        assert models_seen(second_openai) == []  # model-b cannot continue model-a's answer
        assert metric(app, "llm_errors", kind="stream_interrupted") == 1
        # the process is healthy: the next request is answered
        done = await c.chat.completions.create(model="chat", messages=MSG)
        assert done.choices[0].message.content
        await c.close()


async def test_malformed_chunk_is_skipped_and_the_stream_completes(
    fake_openai: FakeOpenAI,
) -> None:
    fake_openai.script(Malformed(at=2))
    async with gateway(two_deployments(fake_openai, fake_openai)) as (_app, port):
        c = client(port)
        stream = await c.chat.completions.create(model="chat", messages=MSG, stream=True)
        text, finish, _ = await collect(stream)
        assert finish == "stop"
        assert text == "Hello from model-a."
        await c.close()


async def test_stream_without_done_is_finalised_at_once_with_usage(
    fake_openai: FakeOpenAI,
) -> None:
    fake_openai.script(NoEnd(answer=Answer(usage=False)))
    async with gateway(two_deployments(fake_openai, fake_openai)) as (_app, port):
        c = client(port)
        t0 = time.monotonic()
        stream = await c.chat.completions.create(
            model="chat", messages=MSG, stream=True, stream_options={"include_usage": True}
        )
        text, finish, usage = await collect(stream)
        assert time.monotonic() - t0 < 1.0  # not waiting for an idle timeout
        assert (text, finish) == ("Hello from model-a.", "stop")
        assert usage is not None and usage.completion_tokens > 0 and usage.prompt_tokens > 0
        await c.close()


# -- never retried ---------------------------------------------------------------------------------


async def test_context_length_goes_to_the_larger_context_group(
    fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> None:
    fake_openai.script(context_length())
    config = llm_yaml(
        {
            "a": f'{{kind: openai, base_url: "{fake_openai.base_url}"}}',
            "b": f'{{kind: openai, base_url: "{second_openai.base_url}"}}',
        },
        "    chat:\n"
        "      context_fallback: big\n"
        "      deployments:\n"
        "        - {provider: a, model: model-a}\n"
        "        - {provider: a, model: model-a2}\n"
        "    big:\n"
        "      deployments:\n"
        "        - {provider: b, model: model-big}\n",
        extra=TIMEOUTS,
    )
    async with gateway(config) as (_app, port):
        c = client(port)
        done = await c.chat.completions.create(model="chat", messages=MSG)
        assert done.model == "model-big"
        # not retried on model-a, and not on the same group's other small deployment either
        assert models_seen(fake_openai, second_openai) == ["model-a", "model-big"]
        await c.close()


async def test_context_length_without_a_larger_group_is_a_clear_400(
    fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> None:
    fake_openai.script(context_length())
    async with gateway(two_deployments(fake_openai, second_openai)) as (_app, port):
        c = client(port)
        with pytest.raises(openai.BadRequestError) as info:
            await c.chat.completions.create(model="chat", messages=MSG)
        assert info.value.code == "context_length_exceeded"
        assert models_seen(fake_openai, second_openai) == ["model-a"]
        await c.close()


async def test_content_policy_is_never_retried_and_the_reason_is_passed_on(
    fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> None:
    fake_openai.script(content_policy(message="Your request was rejected by the safety system."))
    async with gateway(two_deployments(fake_openai, second_openai)) as (_app, port):
        c = client(port)
        with pytest.raises(openai.BadRequestError) as info:
            await c.chat.completions.create(model="chat", messages=MSG)
        assert "rejected by the safety system" in str(info.value)
        assert models_seen(fake_openai, second_openai) == ["model-a"]
        await c.close()


async def test_a_fallbacks_rejection_never_hides_the_real_failure(
    fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> None:
    fake_openai.script(server_error(500, message="boom: the GPU fell off"), server_error(500))
    second_openai.script(unauthorized())
    async with gateway(two_deployments(fake_openai, second_openai)) as (_app, port):
        c = client(port)
        with pytest.raises(openai.APIStatusError) as info:
            await c.chat.completions.create(model="chat", messages=MSG)
        assert info.value.status_code == 502
        assert "the GPU fell off" in str(info.value)
        await c.close()


# -- breaker, attribution ------------------------------------------------------------------------


async def test_breaker_takes_a_failing_deployment_out_probes_and_brings_it_back(
    fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> None:
    fake_openai.script(*[server_error(500)] * 4)
    extra = "  breaker: {failures: 4, open_for: 300ms}"
    async with gateway(two_deployments(fake_openai, second_openai, extra=extra)) as (app, port):
        c = client(port)
        for _ in range(2):  # 2 requests x 2 attempts on A: 4 failures open the breaker
            assert (await c.chat.completions.create(model="chat", messages=MSG)).model == "model-b"
        assert len(fake_openai.requests) == 4
        assert metric(app, "llm_breaker_opened", deployment="a/model-a") == 1
        for _ in range(3):  # open: A is not asked
            assert (await c.chat.completions.create(model="chat", messages=MSG)).model == "model-b"
        assert len(fake_openai.requests) == 4
        group = app.llm.groups["chat"]
        assert group.deployments[0].breaker_state == "open"
        deadline = time.monotonic() + 5
        while group.deployments[0].breaker_state == "open":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        # half open: the next request probes A, which is healthy again
        assert (await c.chat.completions.create(model="chat", messages=MSG)).model == "model-a"
        assert group.deployments[0].breaker_state == "closed"
        await c.close()


async def test_the_model_that_answered_is_named_and_billed(
    fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> None:
    fake_openai.script(server_error(500), server_error(500))
    second_openai.script(Answer(prompt_tokens=100, completion_tokens=50))
    extra = (
        "  prices:\n    model-a: {input: 1000, output: 1000}\n    model-b: {input: 2, output: 4}"
    )
    async with gateway(two_deployments(fake_openai, second_openai, extra=extra)) as (app, port):
        entries: list[dict[str, Any]] = []
        app.handler.observers = (*app.handler.observers, entries.append)
        c = client(port)
        done = await c.chat.completions.create(model="chat", messages=MSG)
        assert done.model == "model-b"
        assert done.usage is not None and done.usage.prompt_tokens == 100
        entry = entries[-1]
        assert entry["llm_deployment"] == "b/model-b"
        assert entry["llm_tried"] == ["a/model-a", "a/model-a", "b/model-b"]
        assert entry["prompt_tokens"] == 100 and entry["completion_tokens"] == 50
        assert entry["cost_usd"] == pytest.approx((100 * 2 + 50 * 4) / 1e6)
        assert metric(app, "llm_tokens", deployment="b/model-b", type="prompt") == 100
        assert metric(app, "llm_tokens", deployment="a/model-a") == 0
        assert metric(app, "llm_cost_usd", deployment="a/model-a") == 0
        await c.close()


# -- carrying a broken stream on ---------------------------------------------------------------


def _continuing(a: FakeOpenAI, b_kind: str, b_url: str) -> str:
    return llm_yaml(
        {
            "a": f'{{kind: openai, base_url: "{a.base_url}"}}',
            "b": f'{{kind: {b_kind}, base_url: "{b_url}", keys: ["k"]}}',
        },
        "    chat:\n"
        "      continue_streams: true\n"
        "      deployments:\n"
        "        - {provider: a, model: model-a}\n"
        "        - {provider: b, model: model-b}\n",
        extra="  timeouts: {first_byte: 2s, first_token: 2s, idle: 300ms, total: 10s}",
    )


async def test_a_broken_stream_is_continued_by_a_deployment_that_can_continue(
    fake_openai: FakeOpenAI, fake_anthropic: Any
) -> None:
    fake_openai.script(Cut(after=3, answer=Answer(text="The answer is forty", chunk_gap=0.05)))
    fake_anthropic.script(Answer(text="-two."))
    async with gateway(_continuing(fake_openai, "anthropic", fake_anthropic.base_url)) as (
        app,
        port,
    ):
        entries: list[dict[str, Any]] = []
        app.handler.observers = (*app.handler.observers, entries.append)
        c = client(port)
        stream = await c.chat.completions.create(
            model="chat", messages=MSG, stream=True, stream_options={"include_usage": True}
        )
        text, finish, usage = await collect(stream)
        # two pieces of A ("The answer is forty" in 3 pieces, the role chunk first), then B
        sent_by_a = text[: len(text) - len("-two.")]
        assert text.endswith("-two.") and "The answer is forty".startswith(sent_by_a)
        assert finish == "stop"
        prefill = fake_anthropic.requests[-1].json["messages"][-1]
        assert prefill["role"] == "assistant"
        assert prefill["content"] in (
            sent_by_a.rstrip(),
            [{"type": "text", "text": sent_by_a.rstrip()}],
        )
        assert usage is not None and usage.completion_tokens > 5  # both were billed
        entry = entries[-1]
        assert entry["llm_continued"] is True and entry["llm_deployment"] == "b/model-b"
        assert entry["llm_tried"] == ["a/model-a", "b/model-b"]
        await c.close()


async def test_no_continuation_where_the_fallback_cannot_continue(
    fake_openai: FakeOpenAI, second_openai: FakeOpenAI
) -> None:
    fake_openai.script(Cut(after=3, answer=Answer(chunk_gap=0.05)))
    async with gateway(_continuing(fake_openai, "openai", second_openai.base_url)) as (
        _app,
        port,
    ):
        c = client(port)
        stream = await c.chat.completions.create(model="chat", messages=MSG, stream=True)
        with pytest.raises(openai.APIError, match="model-a"):
            await collect(stream)
        assert models_seen(second_openai) == []
        await c.close()
