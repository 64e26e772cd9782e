"""UpstreamRuntime.choose: backups, panic, slow start, breaker gating and Retry-After holds."""

from __future__ import annotations

from collections import Counter

import pytest

from piuptime.config.load import parse_config
from piuptime.gateway import runtime as runtime_module
from piuptime.gateway.runtime import UpstreamRuntime


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(runtime_module, "_CLOCK", c)
    return c


def upstream(extra: str = "", targets: str = "") -> UpstreamRuntime:
    text = (
        "upstreams:\n  u:\n    targets:\n"
        + (targets or '      - "http://127.0.0.1:9001"\n      - "http://127.0.0.1:9002"\n')
        + "".join(f"    {line}\n" for line in extra.strip().splitlines())
        + "routes: [{name: r, match: {path: /}, upstream: u}]\n"
    )
    return UpstreamRuntime("u", parse_config(text).upstreams["u"])


def picks(u: UpstreamRuntime, n: int = 100) -> Counter[int]:
    out: Counter[int] = Counter()
    for _ in range(n):
        t = u.choose()
        assert t is not None
        out[t.index] += 1
    return out


def test_backup_only_when_every_primary_is_out(clock: Clock) -> None:
    backup = '      - {url: "http://127.0.0.1:9002", backup: true}\n'
    u = upstream(targets='      - "http://127.0.0.1:9001"\n' + backup)
    assert picks(u) == {0: 100}
    u._check_changed(0, False)  # the active check says the primary is down
    assert picks(u) == {1: 100}
    u._check_changed(0, True)
    u.slow_start = 0
    assert picks(u) == {0: 100}


def test_nothing_usable_means_panic_over_all_targets(clock: Clock) -> None:
    u = upstream()
    u._check_changed(0, False)
    u._check_changed(1, False)
    assert set(picks(u)) == {0, 1} and u.panic
    assert u.snapshot()["panic"] is True


def test_panic_threshold_spreads_before_everything_is_out(clock: Clock) -> None:
    u = upstream(
        "health: {panic_threshold: 60%}",
        targets="".join(f'      - "http://127.0.0.1:{9001 + i}"\n' for i in range(3)),
    )
    u._check_changed(0, False)
    u._check_changed(1, False)  # 1 of 3 usable < 60%: spread over all three
    assert set(picks(u, 60)) == {0, 1, 2} and u.panic


def test_slow_start_ramps_a_recovered_target_up(clock: Clock) -> None:
    u = upstream("slow_start: 10s")
    u._check_changed(0, False)
    picks(u, 10)
    u._check_changed(0, True)
    early = picks(u, 200)
    assert early[0] < 40  # about 5% of its weight at first
    clock.now += 5
    middle = picks(u, 200)
    assert 40 < middle[0] < 100  # half its weight: a third of the traffic
    clock.now += 6
    late = picks(u, 200)
    assert late[0] == 100 and not u.targets[0].troubled


def test_retry_after_hold_and_open_breaker_block_a_target(clock: Clock) -> None:
    u = upstream("breaker: {min_requests: 2, failure_ratio: 50%, open_for: 5s}")
    u.hold_off(u.targets[0], 3.0)
    assert picks(u) == {1: 100}
    assert u.retry_after() == pytest.approx(3.0)
    clock.now += 3.5
    u.slow_start = 0
    assert set(picks(u)) == {0, 1}
    t1 = u.targets[1]
    for _ in range(2):
        u.begin(t1)
        u.end(t1, False, None)
    assert t1.breaker is not None and t1.breaker.state == "open"
    assert picks(u) == {0: 100}
    u.hold_off(u.targets[0], 1.0)
    assert u.choose() is None  # both blocked: the caller answers 503 with Retry-After
    assert u.retry_after() == pytest.approx(1.0)


def test_half_open_breaker_admits_a_bounded_number_of_probes(clock: Clock) -> None:
    u = upstream(
        "breaker: {min_requests: 1, failure_ratio: 50%, open_for: 1s, half_open_probes: 2}",
        targets='      - "http://127.0.0.1:9001"\n',
    )
    t = u.targets[0]
    u.begin(t)
    u.end(t, False, None)
    assert u.choose() is None
    clock.now += 1.5
    assert u.choose() is t and u.choose() is t
    assert u.choose() is None  # both probe slots taken
    u.end(t, True, 0.01)
    u.end(t, True, 0.01)
    assert t.breaker is not None and t.breaker.state == "closed"
