"""stale-if-error for real: a device process behind a cached route is SIGKILLed; the cached
route keeps answering from its stale copies while an uncached route on the same upstream fails,
and, with a second device, the uncached route fails over while the cache keeps serving."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.failover_support import Device, devices, upstream_yaml
from tests.plugins.test_cache_support import Clock, clock, metric
from tests.support import fetch, start_app

_ = clock


def config(devs: list[Device], upstream: str = "") -> str:
    return (
        "gateway:\n"
        '  listen: ["127.0.0.1:0"]\n'
        "  access_log: {path: off}\n"
        "upstreams:\n"
        + upstream_yaml(devs, upstream or "timeouts: {connect: 1s, read: 2s}")
        + """\
routes:
  - name: cached
    match: {path: /sensors/}
    upstream: devs
    plugins:
      cache: {ttl: 10s, stale_if_error: 5m}
  - name: live
    match: {path: /live/}
    upstream: devs
    strip_prefix: true
"""
    )


async def test_killed_device_cached_route_serves_stale_uncached_fails(
    tmp_path: Path, clock: Clock
) -> None:
    async with devices(tmp_path, 1) as devs:
        dev = devs[0]
        app, port = await start_app(config(devs))
        try:
            paths = [f"/sensors/{i}" for i in range(3)]
            first = {}
            for p in paths:
                r = await fetch(port, p)
                assert (r.status, r.header(b"x-cache")) == (200, b"MISS")
                first[p] = r.body
                assert json.loads(r.body)["device"] == "d0"
            assert (await fetch(port, "/live/x")).status == 200
            dev.kill()
            assert not dev.alive()
            # still fresh: hits, the device is not needed
            r = await fetch(port, paths[0])
            assert (r.status, r.body, r.header(b"x-cache")) == (200, first[paths[0]], b"HIT")
            clock.advance(60)  # past the ttl, well within stale_if_error
            for _ in range(3):
                for p in paths:
                    r = await fetch(port, p)
                    assert (r.status, r.body, r.header(b"x-cache")) == (200, first[p], b"STALE")
                    assert int(r.header(b"age") or 0) >= 60
                r = await fetch(port, "/live/x")
                assert r.status in (502, 503), r  # nothing to fall back on
                assert r.header(b"x-cache") is None
            # a URL never cached has nothing stale either
            r = await fetch(port, "/sensors/new")
            assert r.status in (502, 503) and r.header(b"x-cache") == b"MISS"
            clock.advance(300)  # beyond stale_if_error: the outage shows
            r = await fetch(port, paths[0])
            assert r.status in (502, 503) and r.header(b"x-cache") == b"EXPIRED"
            stale = metric(app, "piuptime_cache_requests_total", "route=cached,status=stale")
            assert stale == 9
        finally:
            await app.stop()


async def test_killed_device_with_a_second_target(tmp_path: Path, clock: Clock) -> None:
    """The uncached route fails over to the surviving device; the cached route keeps its
    copies while fresh and, once stale, refills from the survivor (no stale copy needed)."""
    async with devices(tmp_path, 2) as devs:
        app, port = await start_app(config(devs, "timeouts: {connect: 1s, read: 2s}"))
        try:
            r = await fetch(port, "/sensors/a")
            owner = json.loads(r.body)["device"]
            dead = next(d for d in devs if d.name == owner)
            dead.kill()
            r2 = await fetch(port, "/sensors/a")
            assert (r2.body, r2.header(b"x-cache")) == (r.body, b"HIT")
            for _ in range(4):
                r = await fetch(port, "/live/x")
                assert r.status == 200
                assert json.loads(r.body)["device"] != owner
            clock.advance(60)
            r = await fetch(port, "/sensors/a")
            assert r.status == 200 and r.header(b"x-cache") == b"EXPIRED"
            assert json.loads(r.body)["device"] != owner
            assert (await fetch(port, "/sensors/a")).header(b"x-cache") == b"HIT"
        finally:
            await app.stop()
