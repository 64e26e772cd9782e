"""traffic_split through the real gateway: raw upstreams over sockets, a raw client."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from tests.support import RawClient, SeenRequest, Upstream, fetch, start_app


@pytest.fixture
async def ups() -> AsyncIterator[dict[str, Upstream]]:
    servers = {n: await Upstream(name=n).start() for n in ("v1", "v2", "v3")}
    yield servers
    for s in servers.values():
        await s.stop()


def config(ups: dict[str, Upstream], routes: str, extra: str = "", upstreams: str = "") -> str:
    lines = ["gateway:", '  listen: ["127.0.0.1:0"]', "  access_log: {path: off}", "upstreams:"]
    for name, server in ups.items():
        lines.append(f'  {name}: {{targets: ["http://127.0.0.1:{server.port}"]}}')
    return "\n".join([*lines, upstreams.rstrip(), "routes:", routes.rstrip(), extra]) + "\n"


async def served_by(client: RawClient, path: str = "/", **kw: object) -> str:
    r = await client.request("GET", path, **kw)  # type: ignore[arg-type]
    assert r.status == 200, r.body
    return r.body.decode()


async def test_header_cookie_query_and_path_prefix_rules(ups: dict[str, Upstream]) -> None:
    routes = """\
  - name: r
    match: {path: /}
    upstream: v1
    plugins:
      traffic_split:
        rules:
          - when: {header: {X-Canary: 1}}
            upstream: v2
          - when: {cookie: {canary: "yes"}}
            upstream: v2
          - when: {query: {beta: "on"}}
            upstream: v3
          - when: {path_prefix: [/labs/, /beta/]}
            upstream: v3
          - when: {header: {User-Agent: {regex: "^curl/8\\\\."}, X-Skip: {present: false}}}
            upstream: v3
"""
    app, port = await start_app(config(ups, routes))
    c = await RawClient.connect(port)
    try:
        assert await served_by(c) == "v1"
        assert await served_by(c, headers={"X-Canary": "1"}) == "v2"
        assert await served_by(c, headers={"X-Canary": "0"}) == "v1"
        assert await served_by(c, headers={"Cookie": "a=b; canary=yes; c=d"}) == "v2"
        assert await served_by(c, headers={"Cookie": "canary=no"}) == "v1"
        assert await served_by(c, headers={"Cookie": "xcanary=yes"}) == "v1"
        assert await served_by(c, "/x?a=1&beta=on") == "v3"
        assert await served_by(c, "/x?beta=%6Fn") == "v3"  # percent-decoded
        assert await served_by(c, "/x?beta=off") == "v1"
        assert await served_by(c, "/labs/thing") == "v3"
        assert await served_by(c, "/beta/") == "v3"
        assert await served_by(c, "/betamax") == "v1"
        assert await served_by(c, headers={"User-Agent": "curl/8.5.0"}) == "v3"
        assert await served_by(c, headers={"User-Agent": "curl/8.5.0", "X-Skip": "1"}) == "v1"
        assert await served_by(c, headers={"User-Agent": "Mozilla/5.0 curl/8.5"}) == "v1"
        # the first matching rule wins
        assert await served_by(c, "/labs/?beta=on", headers={"X-Canary": "1"}) == "v2"
        # the request itself reaches the chosen upstream unchanged
        assert ups["v2"].seen[-1].path == b"/labs/?beta=on"
        counts = app.metrics.snapshot()["piuptime_traffic_split_requests_total"]
        assert counts == {
            "route=r,upstream=v1": 8,
            "route=r,upstream=v2": 3,
            "route=r,upstream=v3": 5,
        }
    finally:
        await c.close()
        await app.stop()


async def test_weighted_10_90_is_exact_with_smooth_round_robin(ups: dict[str, Upstream]) -> None:
    routes = """\
  - name: r
    match: {path: /}
    upstream: v1
    plugins:
      traffic_split:
        rules:
          - weighted: [{upstream: v2, weight: 10}, {weight: 90}, {upstream: v3, weight: 0}]
"""
    app, port = await start_app(config(ups, routes))
    c = await RawClient.connect(port)
    try:
        sides = [await served_by(c) for _ in range(100)]
        assert Counter(sides) == {"v2": 10, "v1": 90}
        # interleaved, not in a burst: one canary request in every ten
        assert all(sides[i : i + 10].count("v2") == 1 for i in range(0, 100, 10))
    finally:
        await c.close()
        await app.stop()


async def test_sticky_cookie_keeps_each_user_on_one_side(ups: dict[str, Upstream]) -> None:
    routes = """\
  - name: r
    match: {path: /}
    upstream: v1
    plugins:
      traffic_split:
        sticky: cookie:user
        rules:
          - weighted: [{upstream: v2, weight: 50}, {weight: 50}]
"""
    app, port = await start_app(config(ups, routes))
    c = await RawClient.connect(port)
    try:
        sides: dict[str, set[str]] = {}
        for _ in range(4):
            for user in range(30):
                side = await served_by(c, headers={"Cookie": f"theme=dark; user=u{user}"})
                sides.setdefault(f"u{user}", set()).add(side)
        assert all(len(s) == 1 for s in sides.values()), sides
        # both sides get users (the hash spreads them)
        assert {next(iter(s)) for s in sides.values()} == {"v1", "v2"}
        # no cookie: plain weighted round-robin
        anonymous = [await served_by(c) for _ in range(4)]
        assert Counter(anonymous) == {"v1": 2, "v2": 2}
    finally:
        await c.close()
        await app.stop()


async def test_sticky_header_and_ip_on_a_rule(ups: dict[str, Upstream]) -> None:
    routes = """\
  - name: r
    match: {path: /}
    upstream: v1
    plugins:
      traffic_split:
        rules:
          - when: {path_prefix: /h/}
            weighted: [{upstream: v2, weight: 1}, {upstream: v3, weight: 1}]
            sticky: header:X-User
          - weighted: [{upstream: v2, weight: 1}, {upstream: v3, weight: 1}]
            sticky: ip
"""
    app, port = await start_app(config(ups, routes))
    c = await RawClient.connect(port)
    try:
        for user in ("ann", "bob", "cy"):
            got = {await served_by(c, "/h/", headers={"X-User": user}) for _ in range(5)}
            assert len(got) == 1
        assert len({await served_by(c, "/any") for _ in range(6)}) == 1  # one client address
    finally:
        await c.close()
        await app.stop()


async def test_api_versions_by_header_or_by_route(ups: dict[str, Upstream]) -> None:
    # The documented example: one /api/ route, Accept-Version picks api-v2; and /v2/ as its
    # own route with strip_prefix.
    servers = {"api-v1": ups["v1"], "api-v2": ups["v2"]}
    routes = """\
  - name: api
    match: {path: /api/}
    upstream: api-v1
    plugins:
      traffic_split:
        rules:
          - when: {header: {Accept-Version: "2"}}
            upstream: api-v2
  - name: api-v2
    match: {path: /v2/}
    upstream: api-v2
    strip_prefix: true
"""
    app, port = await start_app(config(servers, routes))
    try:
        r = await fetch(port, "/api/users")
        assert r.body == b"v1" and ups["v1"].seen[-1].path == b"/api/users"
        r = await fetch(port, "/api/users", headers={"Accept-Version": "2"})
        assert r.body == b"v2" and ups["v2"].seen[-1].path == b"/api/users"
        r = await fetch(port, "/v2/users")
        assert r.body == b"v2" and ups["v2"].seen[-1].path == b"/users"
    finally:
        await app.stop()


async def test_global_split_applies_to_every_route_unless_switched_off(
    ups: dict[str, Upstream],
) -> None:
    routes = """\
  - name: a
    match: {path: /a}
    upstream: v1
  - name: b
    match: {path: /b}
    upstream: v3
    plugins: {traffic_split: false}
"""
    extra = """\
plugins:
  traffic_split:
    rules:
      - when: {header: {X-Canary: "1"}}
        upstream: v2
"""
    app, port = await start_app(config(ups, routes, extra))
    try:
        assert (await fetch(port, "/a", headers={"X-Canary": "1"})).body == b"v2"
        assert (await fetch(port, "/a")).body == b"v1"
        assert (await fetch(port, "/b", headers={"X-Canary": "1"})).body == b"v3"
    finally:
        await app.stop()


async def test_retries_and_accounting_stay_in_the_chosen_upstream(
    ups: dict[str, Upstream],
) -> None:
    """A canary with one failing target: its 503 is retried on the canary's other target, by
    the canary's retry rules, on the callback fast path as on the general one; the route's own
    upstream (which would not retry) is never charged."""

    async def unavailable(req: SeenRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy")
        await writer.drain()

    bad = await Upstream(name="bad", handler=unavailable).start()
    try:
        v1, v2 = ups["v1"], ups["v2"]
        text = f"""\
gateway:
  listen: ["127.0.0.1:0"]
  access_log: {{path: off}}
upstreams:
  v1:
    targets: ["http://127.0.0.1:{v1.port}"]
    retries: {{attempts: 0, statuses: []}}
  v2:
    targets: ["http://127.0.0.1:{bad.port}", "http://127.0.0.1:{v2.port}"]
    retries: {{attempts: 1, budget: 100%, backoff: 1ms}}
    health: {{passive: {{enabled: false}}}}
    breaker: {{enabled: false}}
routes:
  - name: r
    match: {{path: /}}
    upstream: v1
    plugins:
      traffic_split:
        rules:
          - when: {{header: {{X-Canary: "1"}}}}
            upstream: v2
"""
        app, port = await start_app(text)
        c = await RawClient.connect(port)
        try:
            for _ in range(12):  # idle pooled connections: later ones take the fast path
                assert await served_by(c, headers={"X-Canary": "1"}) == "v2"
            assert bad.seen and v1.seen == []
            rt = app.runtime
            canary = rt.upstreams["v2"]
            assert [t.in_flight for t in canary.targets] == [0, 0]
            assert canary.targets[1].requests_total == 12
            assert canary.targets[0].failures_total == len(bad.seen)
            own = rt.upstreams["v1"].targets[0]
            assert (own.requests_total, own.in_flight) == (0, 0)
        finally:
            await c.close()
            await app.stop()
    finally:
        await bad.stop()
