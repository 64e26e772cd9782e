"""/metrics of a real gateway after real traffic over sockets, parsed with prometheus_client's
parser: requests by route, status class and consumer; the three latency histograms; plugin
metrics; reloads; per-target state as targets die; the live admin endpoint."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

from tests.observe.test_metrics import ROOT, Scrape, check_histogram
from tests.support import SeenRequest, Upstream, fetch, free_port, start_app, wait_until

KEY = "alice-key-0123456789"


async def answer_500(req: SeenRequest, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\nboom")
    await writer.drain()


def traffic_config(good: int, dead: int, failing: int, admin: bool = False) -> str:
    targets = "\n".join(
        f"""  {name}:
    targets: [{{url: "http://127.0.0.1:{port}"}}]
    timeouts: {{connect: 1s, read: 2s}}"""
        for name, port in (("good", good), ("dead", dead), ("failing", failing))
    )
    return f"""\
gateway:
  listen: ["127.0.0.1:0"]
  access_log: {{path: off}}
{"admin: {listen: 127.0.0.1:0, token: s3cret}" if admin else ""}
consumers:
  alice: {{keys: ["{KEY}"]}}
upstreams:
{targets}
routes:
  - {{name: open, match: {{path: /open/}}, upstream: good}}
  - name: keyed
    match: {{path: /keyed/}}
    upstream: good
    plugins:
      key_auth: {{}}
      rate_limit: {{limit: 2, window: 1m, per: consumer}}
  - {{name: dead, match: {{path: /dead/}}, upstream: dead}}
  - {{name: failing, match: {{path: /failing}}, upstream: failing}}
  - name: cached
    match: {{path: /cached/}}
    upstream: good
    plugins:
      cache: {{ttl: 10s}}
"""


async def test_requests_histograms_and_plugin_metrics_after_real_traffic() -> None:
    good = await Upstream("good").start()
    failing = await Upstream("failing", handler=answer_500).start()
    dead = free_port()  # nothing listens there
    app, port = await start_app(traffic_config(good.port, dead, failing.port))
    try:
        for _ in range(3):
            assert (await fetch(port, "/open/a")).status == 200
        assert (await fetch(port, "/nowhere")).status == 404
        assert (await fetch(port, "/keyed/x")).status == 401
        statuses = [
            (await fetch(port, "/keyed/x", headers={"apikey": KEY})).status for _ in range(3)
        ]
        assert statuses == [200, 200, 429]
        assert (await fetch(port, "/dead/x")).status == 502
        assert (await fetch(port, "/failing")).status == 500
        caches = [(await fetch(port, "/cached/c")).header(b"x-cache") for _ in range(2)]
        assert caches == [b"MISS", b"HIT"]

        s = Scrape(app.metrics.render())
        req = "piuptime_requests_total"
        assert s.types["piuptime_requests"] == "counter"
        expected = {
            ("open", "2xx", ""): 3,
            ("", "4xx", ""): 1,
            ("keyed", "4xx", ""): 1,
            ("keyed", "2xx", "alice"): 2,
            ("keyed", "4xx", "alice"): 1,
            ("dead", "5xx", ""): 1,
            ("failing", "5xx", ""): 1,
            ("cached", "2xx", ""): 2,
        }
        got = {
            (labels["route"], labels["status_class"], labels["consumer"]): v
            for labels, v in s.series(req)
        }
        assert got == expected

        # every request observed once in the total and overhead histograms; upstream time only
        # for those that reached a target (not the 404, 401, 429 or the cache hit)
        reached = {"open": 3, "": 0, "keyed": 2, "dead": 1, "failing": 1, "cached": 1}
        for route, n in reached.items():
            answered = s.total(req, route=route)
            assert check_histogram(s, "piuptime_request_duration_seconds", route=route) == answered
            assert check_histogram(s, "piuptime_gateway_overhead_seconds", route=route) == answered
            assert check_histogram(s, "piuptime_upstream_duration_seconds", route=route) == n
            total = s.value("piuptime_request_duration_seconds_sum", route=route) or 0.0
            upstream = s.value("piuptime_upstream_duration_seconds_sum", route=route) or 0.0
            overhead = s.value("piuptime_gateway_overhead_seconds_sum", route=route) or 0.0
            assert 0 < total < 10 and upstream <= total
            assert abs(total - upstream - overhead) < 1e-4 * answered + 1e-9  # rounding to µs

        # the plugins' own metrics
        assert (
            s.value(
                "piuptime_auth_rejections_total", route="keyed", plugin="key_auth", reason="missing"
            )
            == 1
        )
        assert s.value("piuptime_ratelimit_rejections_total", route="keyed") == 1
        assert s.value("piuptime_cache_requests_total", route="cached", status="miss") == 1
        assert s.value("piuptime_cache_requests_total", route="cached", status="hit") == 1
        assert any(v >= 1 for _, v in s.series("piuptime_cache_memory_entries"))

        # targets: the dead one was tried twice (one retry), failed twice, never answered
        dead_t = {"upstream": "dead", "target": f"http://127.0.0.1:{dead}"}
        assert s.value("piuptime_target_requests_total", **dead_t) == 2
        assert s.value("piuptime_target_failures_total", **dead_t) == 2
        assert s.value("piuptime_upstream_retries_total", upstream="dead") == 1
        assert s.value("piuptime_upstream_retries_total", upstream="good") == 0
        assert s.value("piuptime_upstream_retry_budget_denied_total", upstream="dead") == 0
        assert s.value("piuptime_target_latency_ewma_seconds", **dead_t) is None
        good_t = {"upstream": "good", "target": f"http://127.0.0.1:{good.port}"}
        assert s.value("piuptime_target_requests_total", **good_t) == 6  # 3 open, 2 keyed, 1 miss
        assert s.value("piuptime_target_failures_total", **good_t) == 0
        assert (s.value("piuptime_target_latency_ewma_seconds", **good_t) or 0) > 0
        failing_t = {"upstream": "failing", "target": f"http://127.0.0.1:{failing.port}"}
        assert s.value("piuptime_target_failures_total", **failing_t) == 1  # a 5xx is a failure
        for t in (dead_t, good_t, failing_t):
            assert s.value("piuptime_target_in_flight", **t) == 0
            assert s.value("piuptime_target_healthy", **t) == 1
            assert s.value("piuptime_target_breaker_state", **t, state="closed") == 1

        # the process and the build are there; reloads not yet made
        assert (s.value("piuptime_process_resident_memory_bytes") or 0) > 2**20
        assert s.value("piuptime_config_reloads_total", result="success") == 0
        assert s.value("piuptime_config_last_reload_successful") == 1

        # every family the gateway publishes is documented
        docs = (ROOT / "docs" / "metrics.md").read_text()
        for family, kind in s.types.items():
            name = family + "_total" if kind == "counter" else family
            assert f"`{name}`" in docs, f"{name} is not in docs/metrics.md"
    finally:
        await app.stop()
        await good.stop()
        await failing.stop()


async def test_reloads_are_counted_with_the_time_of_the_last_success(tmp_path: Path) -> None:
    up = await Upstream().start()
    text = traffic_config(up.port, free_port(), up.port)
    before = time.time()
    app, _ = await start_app(text, tmp_path, watch_interval=0)
    try:
        s = Scrape(app.metrics.render())
        loaded = s.value("piuptime_config_last_reload_success_timestamp_seconds")
        assert loaded is not None and before - 1 <= loaded <= time.time()  # the start
        (tmp_path / "piuptime.yaml").write_text(text.replace("/open/", "/opened/"))
        assert await app.reload("test")
        s = Scrape(app.metrics.render())
        assert s.value("piuptime_config_reloads_total", result="success") == 1
        assert s.value("piuptime_config_reloads_total", result="failure") == 0
        assert s.value("piuptime_config_last_reload_success_timestamp_seconds") == (
            app.reloads.last_success
        )
        assert s.value("piuptime_config_last_reload_successful") == 1
        (tmp_path / "piuptime.yaml").write_text(text + "  - {name: broken}\n")
        assert not await app.reload("test")
        s = Scrape(app.metrics.render())
        assert s.value("piuptime_config_reloads_total", result="success") == 1
        assert s.value("piuptime_config_reloads_total", result="failure") == 1
        assert s.value("piuptime_config_last_reload_success_timestamp_seconds") == (
            app.reloads.last_success
        )
        assert s.value("piuptime_config_last_reload_successful") == 0
    finally:
        await app.stop()
        await up.stop()


FLEET = """\
gateway:
  listen: ["127.0.0.1:0"]
  access_log: {{path: off}}
upstreams:
  pair:
    targets: [{{url: "http://127.0.0.1:{a}"}}, {{url: "http://127.0.0.1:{b}"}}]
    timeouts: {{connect: 1s, read: 5s}}
    health:
      passive: {{consecutive_failures: 1, eject_for: 30s, max_ejected: 50%}}
    breaker: {{min_requests: 1, failure_ratio: 50%, open_for: 30s}}
  checked:
    targets: [{{url: "http://127.0.0.1:{c}"}}]
    health:
      active: {{path: /, interval: 100ms, timeout: 500ms, healthy_after: 1, unhealthy_after: 1}}
  slow:
    targets: [{{url: "http://127.0.0.1:{d}"}}]
    timeouts: {{connect: 1s, read: 5s}}
routes:
  - {{name: pair, match: {{path: /pair/}}, upstream: pair}}
  - {{name: slow, match: {{path: /slow/}}, upstream: slow}}
"""


async def test_target_state_follows_a_dying_target() -> None:
    release = asyncio.Event()

    async def held(req: SeenRequest, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()

    a, b, c = [await Upstream(n).start() for n in "abc"]
    d = await Upstream("d", handler=held).start()
    app, port = await start_app(FLEET.format(a=a.port, b=b.port, c=c.port, d=d.port))
    ta = {"upstream": "pair", "target": f"http://127.0.0.1:{a.port}"}
    tb = {"upstream": "pair", "target": f"http://127.0.0.1:{b.port}"}
    tc = {"upstream": "checked", "target": f"http://127.0.0.1:{c.port}"}
    td = {"upstream": "slow", "target": f"http://127.0.0.1:{d.port}"}

    def scrape() -> Scrape:
        return Scrape(app.metrics.render())

    try:
        # in flight: a request held by its target
        pending = asyncio.ensure_future(fetch(port, "/slow/x"))
        await wait_until(lambda: scrape().value("piuptime_target_in_flight", **td) == 1, 10)
        release.set()
        assert (await pending).status == 200
        await wait_until(lambda: scrape().value("piuptime_target_in_flight", **td) == 0, 10)

        # the active check sees c die
        await wait_until(lambda: scrape().value("piuptime_target_healthy", **tc) == 1, 10)
        await c.stop()
        await wait_until(lambda: scrape().value("piuptime_target_healthy", **tc) == 0, 10)
        assert scrape().value("piuptime_target_ejected", **tc) == 0  # down by the check

        # b dies: traffic finds out, ejects it, opens its breaker, retries on a
        s = scrape()
        assert s.value("piuptime_target_healthy", **tb) == 1
        assert s.value("piuptime_target_breaker_state", **tb, state="closed") == 1
        await b.stop()
        for _ in range(4):
            assert (await fetch(port, "/pair/x")).status == 200  # a answers, retried if need be
        s = scrape()
        assert s.value("piuptime_target_healthy", **tb) == 0
        assert s.value("piuptime_target_ejected", **tb) == 1
        assert s.value("piuptime_target_ejections_total", **tb) == 1
        assert s.value("piuptime_target_breaker_state", **tb, state="open") == 1
        assert s.value("piuptime_target_breaker_state", **tb, state="closed") == 0
        assert s.value("piuptime_target_breaker_opened_total", **tb) == 1
        failures = s.value("piuptime_target_failures_total", **tb)
        assert failures == 1  # once out, b is not asked again
        assert s.value("piuptime_upstream_retries_total", upstream="pair") == failures
        assert s.value("piuptime_target_healthy", **ta) == 1
        assert s.value("piuptime_target_requests_total", **ta) == 4
        assert s.value("piuptime_upstream_panic", upstream="pair") == 0
        assert (
            s.value("piuptime_requests_total", route="pair", status_class="2xx", consumer="") == 4
        )
    finally:
        release.set()
        await app.stop()
        for u in (a, b, c, d):
            await u.stop()


async def test_live_metrics_endpoint_on_the_admin_listener() -> None:
    good = await Upstream("good").start()
    app, port = await start_app(traffic_config(good.port, free_port(), good.port, admin=True))
    try:
        assert (await fetch(port, "/open/x")).status == 200
        assert app.admin is not None
        admin = int(app.admin.port)
        assert (await fetch(admin, "/metrics")).status == 401
        reply = await fetch(admin, "/metrics", headers={"Authorization": "Bearer s3cret"})
        assert reply.status == 200
        assert (reply.header(b"content-type") or b"").startswith(b"text/plain")
        s = Scrape(reply.body.decode())
        assert (
            s.value("piuptime_requests_total", route="open", status_class="2xx", consumer="") == 1
        )
        assert check_histogram(s, "piuptime_request_duration_seconds", route="open") == 1
        assert re.search(r"^# TYPE piuptime_request_duration_seconds histogram$", s.text, re.M)
    finally:
        await app.stop()
        await good.stop()
