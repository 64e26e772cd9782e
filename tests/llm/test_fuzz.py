"""Malformed requests never hurt the AI gateway: hypothesis sends arbitrary JSON (and non-JSON)
to the OpenAI- and Anthropic-compatible endpoints, in front of a fake of each provider kind.
Every answer is a clean 2xx or 4xx with an error document (or a 502 naming the provider that
refused), never a 500, and the gateway keeps answering."""

from __future__ import annotations

import asyncio
import http.client
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import uvloop
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.llm.fakes import FakeAnthropic, FakeGemini, FakeOllama, FakeOpenAI
from tests.llm.support import llm_yaml
from tests.support import start_app


class _Running:
    """The gateway and four fakes on their own loop in a thread (hypothesis drives it from the
    test's thread with a plain synchronous client)."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.fakes: list[Any] = []
        self.app: Any = None
        self.port = 0

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def start(self) -> None:
        fakes = [FakeOpenAI(), FakeAnthropic(), FakeGemini(), FakeOllama()]
        for f in fakes:
            await f.start()
        self.fakes = fakes
        kinds = ["openai", "anthropic", "gemini", "ollama"]
        providers = {
            k: f'{{kind: {k}, base_url: "{f.base_url}"}}' for k, f in zip(kinds, fakes, strict=True)
        }
        models = "".join(
            f"    {k}:\n      deployments:\n        - {{provider: {k}, model: m-{k}}}\n"
            for k in kinds
        )
        models += "    emb:\n      mode: embeddings\n      deployments:\n"
        models += "        - {provider: openai, model: e}\n"
        text = llm_yaml(
            providers,
            models,
            extra="  timeouts: {first_byte: 2s, first_token: 2s, idle: 1s, total: 5s}",
        )
        self.app, self.port = await start_app(text)

    async def stop(self) -> None:
        await self.app.stop()
        for f in self.fakes:
            await f.stop()


@pytest.fixture(scope="module")
def running() -> Iterator[_Running]:
    r = _Running()
    r.run(r.start())
    try:
        yield r
    finally:
        r.run(r.stop())
        r.loop.call_soon_threadsafe(r.loop.stop)
        r.thread.join(5)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
_keys = st.sampled_from(
    ["messages", "tools", "tool_choice", "stream", "stream_options", "response_format",
     "max_tokens", "stop", "system", "temperature", "n", "input", "content", "role"]
)  # fmt: skip
_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system", "tool", "developer", "x"]),
        "content": st.text(max_size=30),
    },
    optional={
        "tool_calls": _json,
        "tool_call_id": _json,
        "name": _json,
    },
)
_body = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["openai", "anthropic", "gemini", "ollama", "emb", "nope"]),
        "messages": st.lists(_message, min_size=1, max_size=3),
    },
    optional={
        "stream": st.booleans() | _json,
        "max_tokens": st.integers(min_value=-5, max_value=100_000) | _json,
    },
).flatmap(
    lambda base: st.dictionaries(_keys, _json, max_size=3).map(lambda extra: {**extra, **base})
)

_PATHS = ["/v1/chat/completions", "/v1/messages", "/v1/embeddings"]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    body=st.one_of(_body, _body, _body, _json),
    path=st.sampled_from(_PATHS),
    raw=st.booleans(),
)
def test_arbitrary_bodies_get_a_clean_answer(
    running: _Running, body: Any, path: str, raw: bool
) -> None:
    content = orjson.dumps(body) if not raw else orjson.dumps(body)[:-1] + b"\x00"
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
    try:
        conn.request("POST", path, body=content, headers={"content-type": "application/json"})
        r = conn.getresponse()
        text = r.read().decode("utf-8", "replace")
        event(f"{path} {r.status}")
        assert r.status != 500, text
        assert r.status in (200, 400, 404, 413, 422, 502), (r.status, text)
        if r.status != 200:
            doc = orjson.loads(text)
            assert doc.get("error"), doc
        elif (r.getheader("content-type") or "").startswith("text/event-stream"):
            assert text.rstrip().endswith(("[DONE]", '"message_stop"}')) or "error" in text
        # the gateway is still healthy
        conn.request("GET", "/v1/models")
        ok = conn.getresponse()
        ok.read()
        assert ok.status == 200
    finally:
        conn.close()
