"""The circuit breaker: scripted transitions and a hypothesis state machine against a model."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from piuptime.gateway.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, **kw: object) -> CircuitBreaker:
    opts: dict[str, object] = {
        "window": 10.0,
        "buckets": 10,
        "min_requests": 10,
        "failure_ratio": 0.5,
        "open_for": 5.0,
        "max_open_for": 40.0,
        "half_open_probes": 2,
        "clock": clock,
    }
    opts.update(kw)
    return CircuitBreaker(**opts)  # type: ignore[arg-type]


def test_opens_on_failure_ratio_only_after_min_requests() -> None:
    clock = Clock()
    b = make(clock)
    for _ in range(4):
        assert b.allow()
        b.record(False)
    assert b.state == "closed"  # 4 failures, but fewer than min_requests outcomes
    for _ in range(5):
        b.record(True)
    assert b.state == "closed"  # 4/9 failed
    b.record(False)
    assert b.state == "open"  # 5/10 failed
    assert not b.allow()
    assert b.retry_after() == pytest.approx(5.0)


def test_half_open_admits_bounded_probes_then_closes() -> None:
    clock = Clock()
    b = make(clock)
    for _ in range(10):
        b.record(False)
    assert b.state == "open"
    clock.now += 5.0
    assert b.allow() and b.allow()
    assert b.state == "half_open"
    assert not b.allow()  # only two probes at once
    b.record(True)
    assert b.allow()  # a slot freed
    b.record(True)
    assert b.state == "closed"
    assert b.window_counts() == (0, 0)
    b.release()  # the third probe was abandoned: harmless once closed


def test_failed_probe_reopens_for_longer_and_success_resets() -> None:
    clock = Clock()
    b = make(clock)
    for _ in range(10):
        b.record(False)
    for expected in (10.0, 20.0, 40.0, 40.0):
        clock.now += b.retry_after()
        assert b.allow()
        b.record(False)
        assert b.state == "open"
        assert b.retry_after() == pytest.approx(expected)
    clock.now += b.retry_after()
    assert b.allow() and b.allow()
    b.record(True)
    b.record(True)
    assert b.state == "closed"
    for _ in range(10):
        b.record(False)
    assert b.retry_after() == pytest.approx(5.0)  # back to the base open time


def test_old_failures_slide_out_of_the_window() -> None:
    clock = Clock()
    b = make(clock)
    for _ in range(9):
        b.record(False)
    clock.now += 11.0
    assert b.window_counts() == (0, 0)
    b.record(False)
    assert b.state == "closed"


def test_release_frees_a_probe_slot() -> None:
    clock = Clock()
    b = make(clock, half_open_probes=1)
    for _ in range(10):
        b.record(False)
    clock.now += 5
    assert b.allow()
    assert not b.allow()
    b.release()
    assert b.allow()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_ratio=0)
    with pytest.raises(ValueError):
        CircuitBreaker(half_open_probes=0)


class BreakerMachine(RuleBasedStateMachine):
    """Drive the breaker with random outcomes and time; check it against simple invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.b = make(self.clock)
        self.outstanding = 0  # allowed attempts without an outcome yet
        self.outcomes: list[tuple[float, bool]] = []

    @rule()
    def try_attempt(self) -> None:
        state_before = self.b.state
        open_until = self.clock.now + self.b.retry_after()
        allowed = self.b.allow()
        if state_before == "closed":
            assert allowed
        if state_before == "open" and self.clock.now < open_until:
            assert not allowed
        if allowed:
            self.outstanding += 1

    @precondition(lambda self: self.outstanding > 0)
    @rule(ok=st.booleans())
    def finish(self, ok: bool) -> None:
        self.outstanding -= 1
        before = self.b.state
        self.b.record(ok)
        if before == "half_open" and not ok:
            assert self.b.state == "open"

    @precondition(lambda self: self.outstanding > 0)
    @rule()
    def abandon(self) -> None:
        self.outstanding -= 1
        self.b.release()

    @rule(dt=st.floats(0.0, 20.0))
    def wait(self, dt: float) -> None:
        self.clock.now += dt

    @invariant()
    def probes_bounded(self) -> None:
        assert 0 <= self.b._probes <= self.b.half_open_probes
        assert self.b.state in ("closed", "open", "half_open")

    @invariant()
    def open_time_bounded(self) -> None:
        assert self.b.retry_after() <= self.b.max_open_for


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)
