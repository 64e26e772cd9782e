"""Failover with real processes: devices are SIGKILLed, SIGSTOPped, flapped and made to fail
while 20 keep-alive clients load the gateway (issue 3).

The targets are ``piuptime.demo.device`` subprocesses recording every request they receive
(``failover_support.Device``); the gateway runs in-process. What the gateway says about its
targets is read from its admin listener's ``GET /status``; the access log (``attempts``,
``tried``) from its file.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.failover_support import (
    Device,
    Load,
    access_log,
    devices,
    gateway_config,
    target,
    upstream_status,
)
from tests.support import fetch, start_app, wait_until


async def _gateway(devs: list[Device], upstream: str, tmp_path: Path, route: str = "") -> Any:
    text = gateway_config(devs, upstream, tmp_path / "access.log", route)
    return await start_app(text, tmp_path)


async def _warm(load: Load, devs: list[Device]) -> None:
    """Load is flowing and every device has served some of it."""
    await load.more(300)
    await wait_until(lambda: all(d.count("/api") > 20 for d in devs), 10, "traffic on every device")


def _epoch(iso: str) -> float:
    """Seconds since the epoch of an access-log ``time`` (``2026-12-02T11:28:58.783Z``)."""
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def _logged(log: Path, n: int) -> list[dict[str, Any]]:
    """The access log once it holds ``n`` lines (it is written in batches, off the hot path)."""
    await wait_until(lambda: len(access_log(log)) >= n, 10, f"{n} access-log lines")
    return access_log(log)


# -- a: a target is SIGKILLed ---------------------------------------------------------------

KILL = """\
balance: round_robin
timeouts: {connect: 1s, ttfb: 2s, read: 5s, total: 10s}
retries: {attempts: 1}
health:
  passive: {consecutive_failures: 3, eject_for: 30s}
"""


async def test_sigkilled_target_zero_failed_gets_and_no_more_traffic(tmp_path: Path) -> None:
    async with devices(tmp_path) as devs:
        app, port = await _gateway(devs, KILL, tmp_path)
        load = Load(port).start()
        try:
            await _warm(load, devs)
            dead = devs[1]
            dead.kill()
            t_kill = time.monotonic()

            async def out() -> bool:
                t = target(await upstream_status(app), dead)
                return bool(t["ejected"] or not t["healthy"])

            await _wait_async(out, 5, "the killed target out of service")
            detected = time.monotonic() - t_kill
            attempts_then = target(await upstream_status(app), dead)["requests_total"]
            await load.more(1500)
            attempts_now = target(await upstream_status(app), dead)["requests_total"]
        finally:
            await load.stop()
            await app.stop()
        assert load.failures() == [], load.failures()[:10]
        assert attempts_now == attempts_then, "the gateway still sent attempts to the dead target"
        lines = await _logged(tmp_path / "access.log", load.done)
        assert all(line["status"] == 200 for line in lines)
        # The last 1000 requests never even tried the dead target.
        assert not [line for line in lines[-1000:] if dead.url in line["tried"]]
        # Requests caught by the kill were retried on another target.
        retried = [line for line in lines if line["attempts"] > 1]
        assert retried and all(line["tried"][0] == dead.url for line in retried)
        assert all(line["tried"][-1] != dead.url for line in retried)
        print(f"\nkill: detected after {detected * 1000:.0f} ms, {len(retried)} requests retried")


async def _wait_async(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


CRASH = """\
balance: round_robin
timeouts: {connect: 1s, ttfb: 2s, read: 5s, total: 10s}
retries: {attempts: 2}
health:
  passive: {consecutive_failures: 50}
"""


async def test_post_that_reached_a_dying_target_is_not_sent_again(tmp_path: Path) -> None:
    """A device reads a POST's body, then dies without answering (``POST /crash``). Without an
    Idempotency-Key the gateway must not re-send it: 502, and only that device got the body.
    With one, the same failure is retried on another target (so the check above can see a
    re-send when there is one)."""
    async with devices(tmp_path, 3, "--allow-crash") as devs:
        app, port = await _gateway(devs, CRASH, tmp_path)
        try:
            # Pooled keep-alive connections to every device first: the POST then goes out on a
            # reused connection, where the client's own stale-connection retry could re-send it.
            for _ in range(6):
                assert (await fetch(port, "/warm")).status == 200
            body = f"no-key-{uuid.uuid4()}"
            r = await fetch(port, "/crash", method="POST", body=body.encode())
            assert r.status == 502, r
            got = [d for d in devs if any(s["body"] == body for s in d.seen())]
            assert len(got) == 1, f"the POST body reached {[d.name for d in got]}"
            await wait_until(lambda: not got[0].alive(), 5, "the crashed device exited")
            assert sum(d.alive() for d in devs) == 2

            keyed = f"keyed-{uuid.uuid4()}"
            r = await fetch(
                port,
                "/crash",
                method="POST",
                body=keyed.encode(),
                headers={"Idempotency-Key": keyed},
            )
            assert r.status == 502, r
            got = [d for d in devs if any(s["body"] == keyed for s in d.seen())]
            assert len(got) == 2, "a POST with an Idempotency-Key is retried on another target"
        finally:
            await app.stop()
        lines = await _logged(tmp_path / "access.log", 8)
        crash = [line for line in lines if line["path"] == "/crash"]
        assert [line["status"] for line in crash] == [502, 502]
        assert crash[0]["attempts"] == 1 and crash[1]["attempts"] >= 2


# -- b: a target accepts connections and never answers --------------------------------------

TTFB = 0.3
STALL = """\
balance: round_robin
timeouts: {connect: 1s, ttfb: 300ms, read: 5s, total: 10s}
retries: {attempts: 1}
health:
  passive: {consecutive_failures: 3, eject_for: 30s}
"""


@pytest.mark.slow
async def test_stalled_target_is_ejected_with_p99_within_one_retry(tmp_path: Path) -> None:
    async with devices(tmp_path) as devs:
        app, port = await _gateway(devs, STALL, tmp_path)
        load = Load(port).start()
        stuck = devs[2]
        try:
            await _warm(load, devs)
            stuck.stall()
            t_fault = time.monotonic()

            async def ejected() -> bool:
                return bool(target(await upstream_status(app), stuck)["ejected"])

            await _wait_async(ejected, 5, "the stalled target ejected")
            detected = time.monotonic() - t_fault
            ejected_at = time.time()
            await load.more(4000)
            # and, however loaded the machine, enough answers that finished well after it
            settled = time.monotonic() + TTFB + 0.2
            await wait_until(
                lambda: sum(1 for s in load.samples if s.start + s.latency > settled) >= 400,
                30,
                "400 answers after the ejection settled",
            )
        finally:
            await load.stop()
            stuck.cont()
            await app.stop()
        assert load.failures() == [], load.failures()[:10]
        p99 = load.p99(since=t_fault)
        worst = max(s.latency for s in load.samples if s.start >= t_fault)
        print(
            f"\nstall: ejected after {detected * 1000:.0f} ms; since the fault p99 "
            f"{p99 * 1000:.0f} ms, max {worst * 1000:.0f} ms"
        )
        assert p99 <= TTFB + 0.2, f"p99 {p99:.3f}s"
        lines = await _logged(tmp_path / "access.log", load.done)
        # Requests that waited on the stalled target were retried on another one.
        retried = [line for line in lines if line["attempts"] > 1]
        assert retried and all(line["tried"][0] == stuck.url for line in retried)
        assert all(line["tried"][-1] != stuck.url for line in retried)
        assert all(line["status"] == 200 for line in lines)
        # Once ejected, no request is sent to it: every request that finished later than a
        # whole attempt (ttfb) and a little after the ejection was seen never tried it. (By
        # completion time, not log position: on a loaded machine a request that started just
        # before the ejection can finish among the last ones logged.)
        after = [line for line in lines if _epoch(line["time"]) > ejected_at + TTFB + 0.15]
        assert len(after) >= 300, len(after)
        assert not [line for line in after if stuck.url in line["tried"]]


# -- c: a flapping target: its breaker opens, probes and closes -----------------------------

DOWN = UP = 2.0
FLAP = """\
balance: round_robin
timeouts: {connect: 500ms, ttfb: 1s, read: 5s, total: 10s}
retries: {attempts: 2}
health:
  passive: {enabled: false}
breaker: {window: 1s, min_requests: 5, failure_ratio: 50%, open_for: 250ms, max_open_for: 1s,
          half_open_probes: 2}
"""


@pytest.mark.slow
async def test_flapping_target_breaker_opens_probes_and_closes(tmp_path: Path) -> None:
    async with devices(tmp_path) as devs:
        app, port = await _gateway(devs, FLAP, tmp_path)
        flappy = devs[0]
        seen: list[tuple[float, str, int]] = []  # (time, breaker state, opened_total) changes
        stop = asyncio.Event()

        async def watch() -> None:
            while not stop.is_set():
                t = target(await upstream_status(app), flappy)
                now = (t["breaker"], t["breaker_opened_total"])
                if not seen or seen[-1][1:] != now:
                    seen.append((time.monotonic(), *now))
                await asyncio.sleep(0.005)

        def entered(state: str, after: float) -> Callable[[], bool]:
            return lambda: any(s[1] == state and s[0] >= after for s in seen)

        def still(state: str, since: float) -> Callable[[], bool]:
            return lambda: seen[-1][1] == state and seen[-1][0] >= since

        def served_over(n: int) -> Callable[[], bool]:
            return lambda: flappy.count("/api") > n

        watcher = asyncio.ensure_future(watch())
        load = Load(port).start()
        cycles = []
        try:
            await _warm(load, devs)
            for _ in range(2):
                flappy.kill()
                t_down = time.monotonic()
                opened_before = seen[-1][2]
                await wait_until(
                    entered("open", t_down), DOWN, "the breaker open while the target is down"
                )
                await asyncio.sleep(max(0.0, t_down + DOWN - time.monotonic()))
                reopened = seen[-1][2] - opened_before
                flappy.spawn()
                await flappy.ready()
                t_up = time.monotonic()
                served = flappy.count("/api")
                await wait_until(
                    still("closed", t_up),
                    UP + 2,
                    "the breaker closed again once the target is back",
                )
                closed_after = time.monotonic() - t_up
                await wait_until(served_over(served + 50), UP, "traffic back")
                await asyncio.sleep(max(0.0, t_up + UP - time.monotonic()))
                cycles.append((reopened, closed_after))
        finally:
            stop.set()
            await watcher
            await load.stop()
            await app.stop()
        print(f"\nflap: (times opened while down, s to close once up) per cycle: {cycles}")
        print("breaker states seen:", [(round(t - seen[0][0], 3), s, n) for t, s, n in seen])
        assert load.failures() == [], load.failures()[:10]
        for reopened, _ in cycles:
            # Opened once, then every failed half-open probe while down opened it again.
            assert reopened >= 2, cycles
        states = [s for _, s, _ in seen]
        assert states.count("open") >= 2 and states[-1] == "closed"


# -- d: every target answers 503: retries stay inside the budget ----------------------------

BUDGET = 0.2
FLOOR = 3.0
WINDOW = 10.0  # the retry budget's sliding window
ALL_503 = f"""\
balance: round_robin
timeouts: {{connect: 1s, ttfb: 2s, read: 5s, total: 10s}}
retries: {{attempts: 2, budget: {BUDGET:.0%}, min_per_second: {FLOOR:g}}}
health:
  passive: {{enabled: false}}
breaker: {{enabled: false}}
"""


async def test_retries_against_all_503_stay_within_the_budget(tmp_path: Path) -> None:
    async with devices(tmp_path, 3, "--status", "503") as devs:
        app, port = await _gateway(devs, ALL_503, tmp_path)
        t0 = time.monotonic()
        load = Load(port).start()
        try:
            await load.more(3000, timeout=15)
        finally:
            await load.stop()
            duration = time.monotonic() - t0
            status = await upstream_status(app)
            await app.stop()
        requests = load.done
        attempts = sum(d.count("/api") for d in devs)
        # The floor allows min_per_second x the window in any window, so over a run shorter
        # than the window it is the whole window's allowance.
        allowed = (1 + BUDGET) * requests + FLOOR * max(duration, WINDOW)
        print(
            f"\n503s: {requests} requests, {attempts} attempts at the devices "
            f"({attempts / requests:.3f} per request, allowed {allowed:.0f}); "
            f"budget denied {status['retry_budget']['denied_total']} retries"
        )
        assert load.errors == []
        assert load.statuses() == {503: requests}
        assert requests < attempts <= allowed
        assert status["retry_budget"]["denied_total"] > 0


# -- Retry-After keeps a target out for that long -------------------------------------------

RETRY_AFTER = """\
balance: round_robin
timeouts: {connect: 1s, ttfb: 2s, read: 5s, total: 10s}
retries: {attempts: 1}
health:
  passive: {enabled: false}
breaker: {enabled: false}
"""


async def test_retry_after_keeps_the_target_out_for_that_long(tmp_path: Path) -> None:
    async with devices(tmp_path, 3, only={0: ["--status", "503", "--retry-after", "2"]}) as devs:
        app, port = await _gateway(devs, RETRY_AFTER, tmp_path)
        busy = devs[0]
        try:
            n = 0

            async def get() -> None:
                nonlocal n
                r = await fetch(port, f"/api/{n}")
                n += 1
                assert r.status == 200, r

            while busy.count("/api") == 0:
                await get()
            t_first = time.monotonic()
            assert target(await upstream_status(app), busy)["retry_after_s"] > 1.5
            for _ in range(30):
                await get()
            assert busy.count("/api") == 1, "a target that said Retry-After got more attempts"
            while busy.count("/api") == 1:
                assert time.monotonic() - t_first < 5, "the target never came back"
                await get()
            back = time.monotonic() - t_first
        finally:
            await app.stop()
        print(f"\nretry-after 2s: the target got its next attempt after {back:.2f}s")
        assert back >= 1.9
