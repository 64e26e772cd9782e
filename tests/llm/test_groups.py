"""Model groups: strategies, key pools, per-deployment limits and the breaker, as units (with a
clock of their own) and through the gateway against fake providers."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import openai
import pytest

from piuptime.config.llm import LlmBreaker, LlmConfig
from piuptime.llm.groups import DeploymentState, Group, KeyPool, build_groups
from tests.llm.fakes import Answer, FakeOpenAI, unauthorized
from tests.llm.support import gateway, llm_yaml

MSG = [{"role": "user", "content": "hi"}]
METRICS_DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def group_of(strategy: str, weights: tuple[int, ...] = (1, 1, 1), **dep: Any) -> Group:
    cfg = LlmConfig.model_validate(
        {
            "providers": {"p": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
            "models": {
                "g": {
                    "strategy": strategy,
                    "deployments": [
                        {"provider": "p", "model": f"m{i}", "weight": w, **dep}
                        for i, w in enumerate(weights)
                    ],
                }
            },
        }
    )
    _, groups = build_groups(cfg)
    return groups["g"]


def test_priority_keeps_the_listed_order() -> None:
    g = group_of("priority")
    assert [d.config.model for d in g.order()] == ["m0", "m1", "m2"]


def test_weighted_first_picks_follow_the_weights() -> None:
    g = group_of("weighted", (1, 3, 6))
    firsts = collections.Counter(g.order()[0].config.model for _ in range(6000))
    assert firsts["m0"] == pytest.approx(600, rel=0.2)
    assert firsts["m1"] == pytest.approx(1800, rel=0.1)
    assert firsts["m2"] == pytest.approx(3600, rel=0.1)
    assert all(len(g.order()) == 3 for _ in range(10))  # every deployment, once


def test_least_latency_measures_each_then_prefers_the_fastest() -> None:
    g = group_of("least_latency")
    d0, d1, d2 = g.deployments
    d0.succeeded(0.5)
    d1.succeeded(0.1)
    assert g.order()[0] is d2  # not measured yet: measured first
    d2.succeeded(0.3)
    assert [d.config.model for d in g.order()] == ["m1", "m2", "m0"]
    for _ in range(10):  # m1 slows down: the moving average follows
        d1.succeeded(2.0)
    assert g.order()[0] is d2


def test_least_busy_prefers_the_fewest_in_flight() -> None:
    g = group_of("least_busy")
    d0, d1, d2 = g.deployments
    d0.begin()
    d0.begin()
    d2.begin()
    assert g.order()[0] is d1
    assert g.order()[-1] is d0


def test_key_pool_rotates_and_skips_keys_set_aside() -> None:
    clock = Clock()
    pool = KeyPool(["k1", "k2", "k3"], clock)
    assert [pool.pick()[1] for _ in range(4)] == ["k1", "k2", "k3", "k1"]
    pool.hold(1, 30)
    assert [pool.pick()[1] for _ in range(4)] == ["k3", "k1", "k3", "k1"]
    pool.hold(0, 30)
    pool.hold(2, 10)
    assert pool.pick() == (-2, None) and pool.usable_in() == pytest.approx(10)
    clock.now += 10
    assert pool.pick() == (2, "k3")
    assert KeyPool([], clock).pick() == (-1, None)


def _state(clock: Clock, **dep: Any) -> DeploymentState:
    cfg = LlmConfig.model_validate(
        {
            "providers": {"p": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
            "models": {"g": {"deployments": [{"provider": "p", "model": "m", **dep}]}},
        }
    )
    _, groups = build_groups(cfg, clock=clock)
    return groups["g"].deployments[0]


def test_rpm_limit_holds_until_the_oldest_request_is_a_minute_old() -> None:
    clock = Clock()
    d = _state(clock, rpm=2)
    d.begin()
    clock.now += 10
    d.begin()
    assert d.wait() == pytest.approx(50)
    clock.now += 50
    assert d.wait() == 0


def test_tpm_limit_counts_the_estimate_and_the_tokens_used() -> None:
    clock = Clock()
    d = _state(clock, tpm=1000)
    assert d.wait(estimated_tokens=900) == 0
    d.tokens_used(800)
    clock.now += 5
    assert d.wait(estimated_tokens=100) == 0
    assert d.wait(estimated_tokens=300) == pytest.approx(55)


def test_breaker_opens_probes_doubles_and_closes() -> None:
    clock = Clock()
    d = _state(clock)
    breaker = LlmBreaker(failures=2, open_for=10, max_open_for=25)
    assert not d.failed(breaker)
    assert d.failed(breaker) and d.breaker_state == "open"
    assert d.wait() == pytest.approx(10)
    clock.now += 10
    assert d.breaker_state == "half_open" and d.wait() == 0
    d.begin()  # the probe
    assert d.wait() == float("inf")  # one probe at a time
    assert d.failed(breaker)  # the probe failed: open twice as long
    assert d.wait() == pytest.approx(20)
    clock.now += 20
    d.begin()
    assert d.failed(breaker) and d.wait() == pytest.approx(25)  # capped
    clock.now += 25
    d.begin()
    d.succeeded(0.1)
    assert d.breaker_state == "closed" and d.wait() == 0


def test_hold_off_without_a_time_doubles_with_jitter() -> None:
    clock = Clock()
    d = _state(clock)
    holds = [d.hold_off(None) for _ in range(4)]
    for i, hold in enumerate(holds):
        ceiling = 2.0**i
        assert ceiling / 2 <= hold <= ceiling
    assert d.hold_off(7.0) == 7.0 and d.backoff_level == 0


# -- through the gateway -----------------------------------------------------------------------


def _client(port: int) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=20
    )


async def test_key_pool_spreads_requests_and_sets_a_refused_key_aside(
    fake_openai: FakeOpenAI,
) -> None:
    fake_openai.keys = ["good-1", "good-2"]
    config = llm_yaml(
        {
            "p": f'{{kind: openai, base_url: "{fake_openai.base_url}", '
            'keys: ["good-1", "revoked", "good-2"]}'
        },
        "    chat:\n      deployments:\n        - {provider: p, model: m}\n",
    )
    async with gateway(config) as (app, port):
        c = _client(port)
        for _ in range(6):
            done = await c.chat.completions.create(model="chat", messages=MSG)
            assert done.choices[0].message.content == "Hello from m."
        used = [r.headers["authorization"] for r in fake_openai.requests]
        # the revoked key was tried once, refused (401), and then set aside
        assert used.count("Bearer revoked") == 1
        assert used.count("Bearer good-1") >= 2 and used.count("Bearer good-2") >= 2
        keys = app.llm.providers["p"].keys
        assert keys.not_before[1] > keys.not_before[0]
        await c.close()


async def test_a_deployment_at_its_rpm_limit_is_skipped(fake_openai: FakeOpenAI) -> None:
    config = llm_yaml(
        {"p": f'{{kind: openai, base_url: "{fake_openai.base_url}"}}'},
        "    chat:\n      deployments:\n"
        "        - {provider: p, model: small, rpm: 2}\n"
        "        - {provider: p, model: spare}\n",
    )
    async with gateway(config) as (_app, port):
        c = _client(port)
        answered = [
            (await c.chat.completions.create(model="chat", messages=MSG)).model for _ in range(4)
        ]
        assert answered == ["small", "small", "spare", "spare"]
        await c.close()


async def test_weighted_split_through_the_gateway(fake_openai: FakeOpenAI) -> None:
    config = llm_yaml(
        {"p": f'{{kind: openai, base_url: "{fake_openai.base_url}"}}'},
        "    chat:\n      strategy: weighted\n      deployments:\n"
        "        - {provider: p, model: a, weight: 1}\n"
        "        - {provider: p, model: b, weight: 3}\n",
    )
    async with gateway(config) as (_app, port):
        c = _client(port)
        seen = collections.Counter(
            [
                (await c.chat.completions.create(model="chat", messages=MSG)).model
                for _ in range(200)
            ]
        )
        assert seen["a"] + seen["b"] == 200
        assert 25 <= seen["a"] <= 80  # 50 expected
        await c.close()


async def test_least_latency_through_the_gateway(
    fake_openai: FakeOpenAI,
) -> None:
    # both measured (the moving averages set as if "slow" took 80 ms): fast takes the load
    config = llm_yaml(
        {"p": f'{{kind: openai, base_url: "{fake_openai.base_url}"}}'},
        "    chat:\n      strategy: least_latency\n      deployments:\n"
        "        - {provider: p, model: slow}\n"
        "        - {provider: p, model: fast}\n",
    )
    async with gateway(config) as (app, port):
        deps = {d.config.model: d for d in app.llm.groups["chat"].deployments}
        deps["slow"].succeeded(0.08)
        deps["fast"].succeeded(0.001)
        c = _client(port)
        answered = [
            (await c.chat.completions.create(model="chat", messages=MSG)).model for _ in range(5)
        ]
        assert answered == ["fast"] * 5
        await c.close()


async def test_unauthorized_everywhere_is_a_502_naming_the_key_problem(
    fake_openai: FakeOpenAI,
) -> None:
    fake_openai.default = unauthorized()
    config = llm_yaml(
        {"p": f'{{kind: openai, base_url: "{fake_openai.base_url}", keys: ["k"]}}'},
        "    chat:\n      deployments:\n        - {provider: p, model: m}\n",
    )
    async with gateway(config) as (_app, port):
        c = _client(port)
        with pytest.raises(openai.APIStatusError) as info:
            await c.chat.completions.create(model="chat", messages=MSG)
        assert info.value.status_code == 502
        assert "API key" in str(info.value)
        await c.close()


async def test_response_format_and_params_reach_the_provider(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(Answer(text='{"ok": true}'))
    config = llm_yaml(
        {"p": f'{{kind: openai, base_url: "{fake_openai.base_url}"}}'},
        "    chat:\n      deployments:\n"
        "        - {provider: p, model: m, params: {temperature: 0.2, seed: 7}}\n",
    )
    async with gateway(config) as (_app, port):
        c = _client(port)
        done = await c.chat.completions.create(
            model="chat",
            messages=MSG,
            temperature=0.9,
            response_format={"type": "json_object"},
        )
        assert done.choices[0].message.content == '{"ok": true}'
        sent = fake_openai.requests[-1].json
        assert sent["response_format"] == {"type": "json_object"}
        assert sent["temperature"] == 0.9 and sent["seed"] == 7  # the client's value wins
        await c.close()


async def test_tokens_and_cost_by_consumer_in_metrics_and_the_access_log(
    fake_openai: FakeOpenAI,
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    fake_openai.script(Answer(prompt_tokens=30, completion_tokens=20))
    config = llm_yaml(
        {"p": f'{{kind: openai, base_url: "{fake_openai.base_url}"}}'},
        "    chat:\n      deployments:\n        - {provider: p, model: m}\n",
        routes="  routes:\n    - {path: /v1/, plugins: {key_auth: {}}}",
        extra="  prices: {m: {input: 1.0, output: 2.0}}\n"
        "consumers:\n  kitchen: {keys: [sk-kitchen]}",
    )
    async with gateway(config) as (app, port):
        entries: list[dict[str, Any]] = []
        app.handler.observers = (*app.handler.observers, entries.append)
        c = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-kitchen", max_retries=0
        )
        await c.chat.completions.create(model="chat", messages=MSG)
        stream = await c.chat.completions.create(model="chat", messages=MSG, stream=True)
        async for _ in stream:
            pass
        await c.close()
        text = app.metrics.render()
    families = list(text_string_to_metric_families(text))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families
        for s in family.samples
    }
    docs = METRICS_DOC.read_text()
    for family in families:  # every AI-gateway family is documented
        if family.name.startswith("piuptime_llm_"):
            name = family.name + "_total" if family.type == "counter" else family.name
            assert f"`{name}`" in docs, f"{name} is not in docs/metrics.md"

    def value(name: str, **labels: str) -> float:
        return sum(
            v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)
        )

    assert value("piuptime_llm_tokens_total", consumer="kitchen", type="prompt") == 30 + 10
    assert value("piuptime_llm_tokens_total", consumer="kitchen", type="completion") == 20 + 5
    assert value("piuptime_llm_cost_usd_total", consumer="kitchen") == pytest.approx(
        (40 * 1.0 + 25 * 2.0) / 1e6
    )
    assert value("piuptime_llm_requests_total", model="chat", status="ok") == 2
    assert value("piuptime_llm_ttft_seconds_count", model="chat") == 2
    assert [e["consumer"] for e in entries] == ["kitchen", "kitchen"]
    assert entries[0]["llm_model"] == "chat" and entries[0]["llm_deployment"] == "p/m"
    assert entries[1]["usage_source"] == "provider" and entries[1]["ttft_ms"] > 0


async def test_a_rate_limited_key_is_set_aside_and_the_next_key_serves(
    fake_openai: FakeOpenAI,
) -> None:
    from tests.llm.fakes import rate_limited

    fake_openai.script(rate_limited(retry_after=60))
    config = llm_yaml(
        {"p": f'{{kind: openai, base_url: "{fake_openai.base_url}", keys: ["k1", "k2"]}}'},
        "    chat:\n      deployments:\n        - {provider: p, model: m}\n",
    )
    async with gateway(config) as (_app, port):
        c = _client(port)
        for _ in range(3):
            done = await c.chat.completions.create(model="chat", messages=MSG)
            assert done.model == "m"
        used = [r.headers["authorization"] for r in fake_openai.requests]
        assert used == ["Bearer k1", "Bearer k2", "Bearer k2", "Bearer k2"]
        await c.close()
