"""rate_limit with the in-process (memory) store: exact limits, the sliding window and the token
bucket on a controlled clock, several limits, keying, headers, config errors; and through the
real gateway over sockets."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from piuptime.config import ConfigError, load_config, parse_config
from piuptime.config.plugins.ratelimit import RateLimit
from piuptime.gateway.clientip import TrustedProxies
from piuptime.gateway.consumers import Consumer, Consumers
from piuptime.gateway.plugins import REGISTRY, Ctx, PluginEnv, Reply, _load_handlers
from piuptime.gateway.plugins.ratelimit import RateLimitPlugin, make_subject
from piuptime.observe.metrics import Metrics
from piuptime.state.memory import MemoryStores
from tests.support import Upstream, fetch, gateway_yaml, start_app


class Clock:
    def __init__(self, t: float = 13 * 86400.0) -> None:  # a multiple of every window used here
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def _env(clock: Clock, trusted: tuple[str, ...] = ()) -> PluginEnv:
    return PluginEnv(
        stores=MemoryStores(clock=clock),
        shared=None,
        metrics=Metrics(),
        consumers=Consumers({}),
        upstreams={},
        spawn=lambda work: None,
        trusted_proxies=TrustedProxies(trusted),
    )


def _plugin(clock: Clock, **options: Any) -> RateLimitPlugin:
    config = RateLimit.model_validate(options)
    return RateLimitPlugin(config, _env(clock), SimpleNamespace(name="r"))  # type: ignore[arg-type]


def _ctx(
    plugin: RateLimitPlugin,
    ip: str = "192.0.2.1",
    headers: list[tuple[bytes, bytes]] | None = None,
    consumer: Consumer | None = None,
) -> Ctx:
    req = SimpleNamespace(headers=headers or [], client_addr=ip)
    route = SimpleNamespace(name="r", upstream=None)
    ctx = Ctx(req, None, route, None, plugin.env)  # type: ignore[arg-type]
    ctx.consumer = consumer
    return ctx


def _hit(plugin: RateLimitPlugin, **kw: Any) -> tuple[Reply | None, dict[bytes, bytes]]:
    ctx = _ctx(plugin, **kw)
    result = plugin.on_request(ctx)
    assert result is None or isinstance(result, Reply), "the memory store answers synchronously"
    headers = dict(ctx.response_headers)
    if isinstance(result, Reply):
        headers.update(dict(result.headers))
    return result, headers


def _allowed(plugin: RateLimitPlugin, n: int, **kw: Any) -> int:
    return sum(_hit(plugin, **kw)[0] is None for _ in range(n))


# -- the arithmetic, on a controlled clock ------------------------------------------------------


def test_exact_limit_then_429_with_retry_after_and_headers() -> None:
    clock = Clock()
    rl = _plugin(clock, limit=5, window="1m", per="ip")
    for left in (4, 3, 2, 1, 0):
        reply, h = _hit(rl)
        assert reply is None
        assert h[b"ratelimit-limit"] == b"5"
        assert h[b"ratelimit-remaining"] == str(left).encode()
        assert h[b"ratelimit-reset"] == b"60"
        assert h[b"ratelimit-policy"] == b"5;w=60"
    clock.advance(15)
    reply, h = _hit(rl)
    assert reply is not None and reply.status == 429
    body = json.loads(reply.body)["error"]
    assert body["code"] == "rate_limited" and "5 requests per 60s" in body["message"]
    assert h[b"ratelimit-remaining"] == b"0"
    # the window ends in 45 s; then the 5 counted decay over the next: one passes 12 s later
    assert h[b"retry-after"] == b"57"
    assert rl.rejections.value == 1


def test_sliding_window_across_the_boundary() -> None:
    clock = Clock()
    rl = _plugin(clock, limit=10, window="1s", per="route")
    clock.advance(0.5)
    assert _allowed(rl, 12) == 10  # 10 in the first window
    clock.advance(0.5)  # the next window starts: the previous 10 still weigh fully
    assert _hit(rl)[0] is not None
    clock.advance(0.25)  # 10 * 0.75 = 7.5 → two more fit (7.5 + 2 <= 10)
    assert _allowed(rl, 5) == 2
    clock.advance(0.5)  # 10 * 0.25 + 2 = 4.5 → five more
    assert _allowed(rl, 10) == 5
    clock.advance(1.0)  # next window, 0.75 in: the previous 7 weigh 0.25 → 1.75, eight more
    assert _allowed(rl, 10) == 8
    clock.advance(5)  # long idle: everything forgotten
    assert _allowed(rl, 20) == 10


def test_sliding_window_retry_after_is_enough() -> None:
    """Waiting Retry-After seconds is always enough for the next request (single client)."""
    clock = Clock()
    rl = _plugin(clock, limit=3, window="2s", per="ip")
    for start in (0.0, 0.3, 1.1, 1.9):
        clock.advance(10 - (clock.t % 10) + start)  # a fresh window pair, ``start`` into it
        assert _allowed(rl, 3) == 3
        reply, h = _hit(rl)
        assert reply is not None
        clock.advance(int(h[b"retry-after"]))
        assert _hit(rl)[0] is None, start


def test_token_bucket_refills_at_limit_per_window() -> None:
    clock = Clock()
    rl = _plugin(clock, limit=10, window="1s", burst=4, algorithm="token_bucket", per="ip")
    assert _allowed(rl, 6) == 4  # the burst
    reply, h = _hit(rl)
    assert reply is not None and h[b"retry-after"] == b"1"
    assert h[b"ratelimit-limit"] == b"4" and h[b"ratelimit-remaining"] == b"0"
    assert h[b"ratelimit-policy"] == b"10;w=1;burst=4"
    clock.advance(0.1)  # 10/s: one token back
    assert _allowed(rl, 3) == 1
    clock.advance(0.25)  # two and a half
    assert _allowed(rl, 3) == 2
    clock.advance(10)  # full again, never beyond the burst
    assert _allowed(rl, 10) == 4


def test_token_bucket_burst_defaults_to_the_limit() -> None:
    clock = Clock()
    rl = _plugin(clock, limit=3, window="1m", algorithm="token_bucket", per="ip")
    reply, h = _hit(rl)
    assert h[b"ratelimit-limit"] == b"3" and h[b"ratelimit-remaining"] == b"2"
    assert h[b"ratelimit-reset"] == b"20"  # one token comes back every 20 s
    assert _allowed(rl, 5) == 2
    reply, h = _hit(rl)
    assert reply is not None and h[b"retry-after"] == b"20"


def test_several_limits_must_all_pass_and_the_tightest_is_reported() -> None:
    clock = Clock()
    rl = _plugin(
        clock, limits=[{"limit": 2, "window": "1s"}, {"limit": 3, "window": "1m"}], per="ip"
    )
    _, h = _hit(rl)  # 1/s: 1 left; per minute: 2 left → the per-second one is reported
    assert (h[b"ratelimit-limit"], h[b"ratelimit-remaining"]) == (b"2", b"1")
    assert h[b"ratelimit-policy"] == b"2;w=1, 3;w=60"
    assert _hit(rl)[0] is None
    reply, h = _hit(rl)  # the per-second limit refuses
    assert reply is not None and h[b"ratelimit-limit"] == b"2" and h[b"retry-after"] == b"2"
    clock.advance(2)
    _, h = _hit(rl)  # third of the minute: the per-minute limit (0 left) is now the tightest
    assert (h[b"ratelimit-limit"], h[b"ratelimit-remaining"]) == (b"3", b"0")
    clock.advance(2)
    reply, h = _hit(rl)  # the per-second window is free, the minute is not
    assert reply is not None and h[b"ratelimit-limit"] == b"3"
    assert int(h[b"retry-after"]) > 50


def test_cost_counts_several_hits() -> None:
    clock = Clock()
    rl = _plugin(clock, limit=10, window="1m", cost=4, per="ip")
    assert _allowed(rl, 5) == 2


def test_keyed_per_ip_header_route_and_consumer() -> None:
    clock = Clock()
    by_ip = _plugin(clock, limit=1, window="1m", per="ip")
    assert _hit(by_ip, ip="10.0.0.1")[0] is None
    assert _hit(by_ip, ip="10.0.0.1")[0] is not None
    assert _hit(by_ip, ip="10.0.0.2")[0] is None

    by_route = _plugin(clock, limit=1, window="1m", per="route", scope="another")
    assert _hit(by_route, ip="10.0.0.1")[0] is None
    assert _hit(by_route, ip="10.0.0.2")[0] is not None

    by_header = _plugin(clock, limit=1, window="1m", per="header:X-Device-Id", scope="hdr")
    a = [(b"x-device-id", b"pi-1")]
    b = [(b"x-device-id", b"pi-2")]
    assert _hit(by_header, headers=a)[0] is None
    assert _hit(by_header, headers=a, ip="10.9.9.9")[0] is not None  # same device, elsewhere
    assert _hit(by_header, headers=b)[0] is None
    # no header: counted by address, not in one bucket shared by every header-less client
    assert _hit(by_header, ip="10.0.0.7")[0] is None
    assert _hit(by_header, ip="10.0.0.8")[0] is None
    assert _hit(by_header, ip="10.0.0.8")[0] is not None

    by_consumer = _plugin(clock, limit=1, window="1m", per="consumer", scope="cons")
    alice = Consumer("alice", frozenset())
    bob = Consumer("bob", frozenset())
    assert _hit(by_consumer, consumer=alice, ip="10.0.0.1")[0] is None
    assert _hit(by_consumer, consumer=alice, ip="10.0.0.2")[0] is not None  # follows alice
    assert _hit(by_consumer, consumer=bob, ip="10.0.0.1")[0] is None
    # unauthenticated: falls back to the address (so it is not shared with a consumer)
    assert _hit(by_consumer, ip="10.0.0.1")[0] is None
    assert _hit(by_consumer, ip="10.0.0.1")[0] is not None


def test_subject_functions() -> None:
    env = _env(Clock())
    req = SimpleNamespace(headers=[(b"x-key", b"k" * 500)], client_addr="10.1.1.1")
    ctx = Ctx(req, None, SimpleNamespace(upstream=None), None, env)  # type: ignore[arg-type]
    assert make_subject("ip")(ctx) == "ip:10.1.1.1"
    assert make_subject("consumer")(ctx) == "ip:10.1.1.1"
    assert make_subject("route")(ctx) == "-"
    long_value = make_subject("header:X-Key")(ctx)
    assert long_value.startswith("h#") and len(long_value) == 66  # hashed, bounded
    ctx.consumer = Consumer("kitchen-app", frozenset())
    assert make_subject("consumer")(ctx) == "c:kitchen-app"


def test_headers_false_keeps_retry_after() -> None:
    clock = Clock()
    rl = _plugin(clock, limit=1, window="1m", per="ip", headers=False, status=503, message="slow")
    _, h = _hit(rl)
    assert h == {}
    reply, h = _hit(rl)
    assert reply is not None and reply.status == 503
    assert json.loads(reply.body)["error"]["message"] == "slow"
    assert set(h) == {b"content-type", b"retry-after"}


def test_memory_store_keeps_the_callback_fast_path() -> None:
    """on_request answers at once (no awaitable) for a memory store, allowed or refused."""
    rl = _plugin(Clock(), limit=1, window="1s", per="ip")
    assert rl.on_request(_ctx(rl)) is None
    assert type(rl.on_request(_ctx(rl))) is Reply


# -- config errors, with positions --------------------------------------------------------------

_BASE = """\
upstreams:
  u: {targets: ["http://127.0.0.1:9"]}
routes:
  - name: r
    match: {path: /}
    upstream: u
    plugins:
      rate_limit: %s
"""


def _errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "rl.yaml", {})
    return [str(e) for e in info.value.errors]


def test_design_example_and_several_limits_validate() -> None:
    config = parse_config(_BASE % "{limit: 100, window: 1m, per: consumer}", "rl.yaml", {})
    rl = config.routes[0].plugins.rate_limit
    assert rl is not None and (rl.limit, rl.window, rl.per) == (100, 60.0, "consumer")
    assert rl.algorithm == "sliding_window" and rl.store == "memory" and rl.status == 429
    config = parse_config(
        _BASE % "{limits: [{limit: 10, window: 1s}, {limit: 1000, window: 1d}], per: ip}",
        "rl.yaml",
        {},
    )
    rl = config.routes[0].plugins.rate_limit
    assert rl is not None and [(s.limit, s.window) for _, s in rl.specs()] == [
        (10, 1.0),
        (1000, 86400.0),
    ]


@pytest.mark.parametrize(
    ("plugin", "expected"),
    [
        (
            "{limit: 10, window: 1s, per: consumers}",
            "8:48: routes[0].plugins.rate_limit.per: "
            "expected consumer, ip, route or header:<Name> (e.g. header:X-Device-Id), got "
            "'consumers'; did you mean 'consumer'?",
        ),
        (
            "{limit: 10, window: 1s, per: 'header:'}",
            "8:48: routes[0].plugins.rate_limit.per: header:<Name> needs an HTTP header name",
        ),
        ("{limit: 0, window: 1s}", "8:27: routes[0].plugins.rate_limit.limit: must be at least 1"),
        ("{limit: -3, window: 1s}", "8:27: routes[0].plugins.rate_limit.limit: must be at least 1"),
        (
            "{limit: 5, window: 0s}",
            "8:38: routes[0].plugins.rate_limit.window: must be longer than 0s",
        ),
        (
            "{limit: 5, window: soon}",
            "8:38: routes[0].plugins.rate_limit.window: expected a duration like 250ms",
        ),
        ("{limit: 5, window: -1s}", "8:38: routes[0].plugins.rate_limit.window: "),
        (
            "{limit: 5, window: 400d}",
            "8:38: routes[0].plugins.rate_limit.window: a window is at most 366d",
        ),
        ("{limit: 5}", "8:19: routes[0].plugins.rate_limit: required key 'window' is missing"),
        (
            "{limits: [{limit: 1, window: 1s}, {limit: 0, window: 1m}]}",
            "8:61: routes[0].plugins.rate_limit.limits[1].limit: must be at least 1",
        ),
        (
            "{limit: 5, window: 1s, burst: 3}",
            "8:42: routes[0].plugins.rate_limit.burst: burst "
            "applies to algorithm: token_bucket only",
        ),
        (
            "{limit: 5, window: 1s, limits: [{limit: 1, window: 1s}]}",
            "8:20: routes[0].plugins.rate_limit.limit: write either limit and window",
        ),
        (
            "{limit: 5, window: 1s, cost: 6}",
            "8:48: routes[0].plugins.rate_limit.cost: cost 6 is more than the limit 5",
        ),
        (
            "{limit: 5, window: 1s, on_store_error: ignore}",
            "8:58: routes[0].plugins.rate_limit.on_store_error: expected one of 'allow' or 'deny'",
        ),
        (
            "{limit: 5, window: 1s, store: redis}",
            "8:49: routes[0].plugins.rate_limit.store: "
            "store: redis needs a Redis to use, but the top-level store.redis is not set",
        ),
    ],
)
def test_config_errors_have_positions(plugin: str, expected: str) -> None:
    errors = _errors(_BASE % plugin)
    assert len(errors) == 1, errors
    assert errors[0].startswith("rl.yaml:" + expected), errors[0]


def test_redis_store_accepted_when_store_redis_is_set() -> None:
    text = (_BASE % "{limit: 5, window: 1s, store: redis}") + "store: {redis: redis://r:6379/0}\n"
    config = parse_config(text, "rl.yaml", {})
    assert config.routes[0].plugins.rate_limit is not None
    # a global plugin too: the check reads the top-level plugins section
    text = (
        _BASE % "{limit: 5, window: 1s}"
    ) + "plugins:\n  rate_limit: {limit: 1, window: 1s, store: redis}\n"
    assert _errors(text) == [
        "rl.yaml:10:45: plugins.rate_limit.store: store: redis needs a Redis to use, but the "
        "top-level store.redis is not set; add store: {redis: redis://127.0.0.1:6379/0} or use "
        "store: memory"
    ]


def test_validate_command_reports_the_missing_redis(tmp_path: Path) -> None:
    from piuptime.config import validate_main

    path = tmp_path / "p.yaml"
    path.write_text(_BASE % "{limit: 5, window: 1s, store: redis}")
    out = __import__("io").StringIO()
    assert validate_main(str(path), out) == 1
    assert f"{path}:8:49: routes[0].plugins.rate_limit.store: store: redis needs" in out.getvalue()
    with pytest.raises(ConfigError):
        load_config(path)


def test_registered() -> None:
    _load_handlers()
    assert REGISTRY["rate_limit"] is RateLimitPlugin
    assert RateLimitPlugin.priority == 1000


# -- through the gateway ------------------------------------------------------------------------


@pytest.fixture
async def up() -> AsyncIterator[Upstream]:
    server = await Upstream(name="u0").start()
    yield server
    await server.stop()


def _route(name: str, path: str, plugin: str) -> str:
    return f"""\
  - name: {name}
    match: {{path: {path}}}
    upstream: main
    plugins:
      rate_limit: {plugin}
"""


async def test_gateway_exact_limit_headers_and_metric(up: Upstream) -> None:
    app, port = await start_app(
        gateway_yaml({"main": [up.port]}, _route("api", "/api", "{limit: 3, window: 1m, per: ip}"))
    )
    try:
        for left in (2, 1, 0):
            r = await fetch(port, "/api")
            assert r.status == 200 and r.body == b"u0"
            assert r.header(b"ratelimit-limit") == b"3"
            assert r.header(b"ratelimit-remaining") == str(left).encode()
            assert 1 <= int(r.header(b"ratelimit-reset") or b"0") <= 60
        r = await fetch(port, "/api")
        assert r.status == 429
        assert json.loads(r.body)["error"]["code"] == "rate_limited"
        assert r.header(b"content-type") == b"application/json"
        assert int(r.header(b"retry-after") or b"0") >= 1
        assert r.header(b"ratelimit-remaining") == b"0"
        assert len(up.seen) == 3
        snap = app.metrics.snapshot()
        assert snap["piuptime_ratelimit_rejections_total"] == {"route=api": 1.0}
    finally:
        await app.stop()


async def test_gateway_sliding_window_frees_up_after_retry_after(up: Upstream) -> None:
    """A short window with real time: exhaust it, then the next request passes by Retry-After."""
    app, port = await start_app(
        gateway_yaml({"main": [up.port]}, _route("api", "/", "{limit: 4, window: 1s, per: route}"))
    )
    try:
        statuses = [(await fetch(port, "/")).status for _ in range(6)]
        assert statuses.count(200) >= 4 and statuses[-1] == 429
        refused_at = time.monotonic()
        retry = int((await fetch(port, "/")).header(b"retry-after") or b"0")
        assert 1 <= retry <= 2
        while (await fetch(port, "/")).status == 429:
            assert time.monotonic() - refused_at < retry + 0.5, "not free after Retry-After"
            await asyncio.sleep(0.02)
    finally:
        await app.stop()


async def test_gateway_token_bucket_refill(up: Upstream) -> None:
    plugin = "{limit: 20, window: 1s, burst: 3, algorithm: token_bucket, per: ip}"
    app, port = await start_app(gateway_yaml({"main": [up.port]}, _route("api", "/", plugin)))
    try:
        statuses = [(await fetch(port, "/")).status for _ in range(4)]
        assert statuses[:3] == [200, 200, 200] and statuses[3] == 429
        t0 = time.monotonic()
        while (await fetch(port, "/")).status == 429:  # a token every 50 ms
            assert time.monotonic() - t0 < 1.0
            await asyncio.sleep(0.01)
    finally:
        await app.stop()


async def test_gateway_several_limits(up: Upstream) -> None:
    plugin = "{limits: [{limit: 2, window: 1m}, {limit: 3, window: 1h}], per: ip}"
    app, port = await start_app(gateway_yaml({"main": [up.port]}, _route("api", "/", plugin)))
    try:
        r = await fetch(port, "/")
        assert (r.header(b"ratelimit-limit"), r.header(b"ratelimit-remaining")) == (b"2", b"1")
        assert r.header(b"ratelimit-policy") == b"2;w=60, 3;w=3600"
        assert (await fetch(port, "/")).status == 200
        assert (await fetch(port, "/")).status == 429
    finally:
        await app.stop()


async def test_gateway_keys_by_forwarded_address_behind_a_trusted_proxy(up: Upstream) -> None:
    routes = _route("api", "/", "{limit: 2, window: 1m, per: ip}")
    app, port = await start_app(
        gateway_yaml({"main": [up.port]}, routes, gateway="  trusted_proxies: [127.0.0.1]")
    )
    try:
        a = {"X-Forwarded-For": "198.51.100.7"}
        b = {"X-Forwarded-For": "198.51.100.8, 127.0.0.1"}  # the proxy's own hop is skipped
        assert [(await fetch(port, "/", headers=a)).status for _ in range(3)] == [200, 200, 429]
        assert [(await fetch(port, "/", headers=b)).status for _ in range(3)] == [200, 200, 429]
    finally:
        await app.stop()
    # from an untrusted peer the header is ignored: every client above is 127.0.0.1
    app, port = await start_app(gateway_yaml({"main": [up.port]}, routes))
    try:
        a = {"X-Forwarded-For": "198.51.100.7"}
        b = {"X-Forwarded-For": "198.51.100.8"}
        assert (await fetch(port, "/", headers=a)).status == 200
        assert (await fetch(port, "/", headers=b)).status == 200
        assert (await fetch(port, "/", headers=a)).status == 429
    finally:
        await app.stop()


async def test_gateway_per_header_and_shared_scope(up: Upstream) -> None:
    routes = (
        _route("a", "/a", "{limit: 2, window: 1m, per: 'header:X-Device-Id', scope: devices}")
        + _route("b", "/b", "{limit: 2, window: 1m, per: 'header:X-Device-Id', scope: devices}")
        + _route("c", "/c", "{limit: 2, window: 1m, per: 'header:X-Device-Id'}")
    )
    app, port = await start_app(gateway_yaml({"main": [up.port]}, routes))
    try:
        pi1 = {"X-Device-Id": "pi-1"}
        assert (await fetch(port, "/a", headers=pi1)).status == 200
        assert (await fetch(port, "/b", headers=pi1)).status == 200
        assert (await fetch(port, "/a", headers=pi1)).status == 429  # one limit over a and b
        assert (await fetch(port, "/b", headers={"X-Device-Id": "pi-2"})).status == 200
        assert (await fetch(port, "/c", headers=pi1)).status == 200  # c has its own
    finally:
        await app.stop()


async def test_gateway_global_plugin_limits_each_route_and_can_be_turned_off(
    up: Upstream,
) -> None:
    routes = """\
  - name: a
    match: {path: /a}
    upstream: main
  - name: b
    match: {path: /b}
    upstream: main
  - name: free
    match: {path: /free}
    upstream: main
    plugins: {rate_limit: false}
"""
    extra = "plugins:\n  rate_limit: {limit: 1, window: 1m, per: route}\n"
    app, port = await start_app(gateway_yaml({"main": [up.port]}, routes, extra))
    try:
        assert [(await fetch(port, "/a")).status for _ in range(2)] == [200, 429]
        assert [(await fetch(port, "/b")).status for _ in range(2)] == [200, 429]
        assert [(await fetch(port, "/free")).status for _ in range(3)] == [200, 200, 200]
        assert (await fetch(port, "/free")).header(b"ratelimit-limit") is None
    finally:
        await app.stop()


async def test_gateway_headers_on_upstream_errors_too(up: Upstream) -> None:
    """Every answer of the route carries the headers, the gateway's own 502 included."""

    async def broken(req: Any, w: asyncio.StreamWriter) -> None:
        w.transport.abort()

    up.handler = broken
    app, port = await start_app(
        gateway_yaml({"main": [up.port]}, _route("api", "/", "{limit: 5, window: 1m, per: ip}"))
    )
    try:
        r = await fetch(port, "/")
        assert r.status == 502 and r.header(b"ratelimit-remaining") == b"4"
    finally:
        await app.stop()


async def test_gateway_counters_survive_a_reload(up: Upstream, tmp_path: Path) -> None:
    text = gateway_yaml({"main": [up.port]}, _route("api", "/", "{limit: 2, window: 1m, per: ip}"))
    app, port = await start_app(text, tmp_path)
    try:
        assert (await fetch(port, "/")).status == 200
        (tmp_path / "piuptime.yaml").write_text(text.replace("per: ip}", "per: ip, cost: 1}"))
        assert await app.reload("test")
        assert (await fetch(port, "/")).status == 200
        assert (await fetch(port, "/")).status == 429
    finally:
        await app.stop()


async def test_gateway_per_consumer_with_key_auth(up: Upstream) -> None:
    """With the real key_auth plugin (skipped until it exists)."""
    _load_handlers()
    if "key_auth" not in REGISTRY:
        pytest.skip("key_auth is not built yet")
    routes = """\
  - name: api
    match: {path: /}
    upstream: main
    plugins:
      key_auth: {}
      rate_limit: {limit: 2, window: 1m, per: consumer}
"""
    extra = """\
consumers:
  alice: {keys: [alice-key-0123456789]}
  bob: {keys: [bob-key-0123456789ab]}
"""
    app, port = await start_app(gateway_yaml({"main": [up.port]}, routes, extra))
    try:
        alice = {"apikey": "alice-key-0123456789"}
        bob = {"apikey": "bob-key-0123456789ab"}
        assert [(await fetch(port, "/", headers=alice)).status for _ in range(3)] == [
            200,
            200,
            429,
        ]
        # same address, another consumer: its own limit
        assert (await fetch(port, "/", headers=bob)).status == 200
    finally:
        await app.stop()
