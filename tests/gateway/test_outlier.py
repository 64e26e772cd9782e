"""Passive ejection and the retry budget, on a controlled clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from piuptime.gateway.outlier import OutlierDetector, RetryBudget


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_consecutive_failures_eject_and_success_resets_the_count() -> None:
    clock = Clock()
    d = OutlierDetector(4, consecutive_failures=3, eject_for=10, clock=clock)
    d.record(0, False)
    d.record(0, False)
    d.record(0, True)
    d.record(0, False)
    assert not d.record(0, False)
    assert d.record(0, False)
    assert d.ejected() == {0}
    clock.now += 9.9
    assert d.is_ejected(0)
    clock.now += 0.2
    assert not d.is_ejected(0) and d.ejected() == set()


def test_ejection_time_grows_with_recent_ejections_and_is_capped() -> None:
    clock = Clock()
    d = OutlierDetector(
        4, consecutive_failures=1, eject_for=10, max_eject_multiplier=3, clock=clock
    )
    for expected in (10, 20, 30, 30):
        assert d.record(1, False)
        assert d.ejected_until(1) == clock.now + expected
        clock.now += expected
        assert not d.is_ejected(1)
    # A long healthy spell lets the multiplier decay, one step per eject_for.
    clock.now += 25
    assert d.multiplier(1) == 1


def test_never_more_than_max_ejected_but_always_one() -> None:
    clock = Clock()
    d = OutlierDetector(4, consecutive_failures=1, max_ejected=0.5, clock=clock)
    assert d.record(0, False) and d.record(1, False)
    assert not d.record(2, False) and not d.record(3, False)
    assert d.ejected() == {0, 1}
    single = OutlierDetector(1, consecutive_failures=1, max_ejected=0.5, clock=clock)
    assert single.record(0, False)  # one target may always be ejected


def test_active_check_ends_an_ejection_early() -> None:
    clock = Clock()
    d = OutlierDetector(2, consecutive_failures=1, eject_for=30, clock=clock)
    d.record(0, False)
    assert d.is_ejected(0)
    d.active_check_passed(0)
    assert not d.is_ejected(0)


def test_retry_budget_caps_retries_at_the_ratio_with_a_floor() -> None:
    clock = Clock()
    b = RetryBudget(0.2, min_per_second=1, window=10, clock=clock)
    granted = 0
    for _ in range(1000):
        b.request()
        granted += b.try_retry()
        clock.now += 0.001
    assert granted == 200  # 20% of 1000 requests in the window
    assert b.denied_total == 800
    quiet = RetryBudget(0.2, min_per_second=1, window=10, clock=clock)
    quiet.request()
    assert sum(quiet.try_retry() for _ in range(20)) == 10  # the floor: 1/s over 10 s


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 50), st.floats(0, 3)), min_size=1, max_size=40),
    st.floats(0.05, 0.5),
)
def test_attempts_never_exceed_one_plus_budget(
    steps: list[tuple[int, float]], ratio: float
) -> None:
    """With every attempt failing and every failure retried, attempts stay within
    (1 + ratio) x requests plus the floor over any window."""
    clock = Clock()
    b = RetryBudget(ratio, min_per_second=0.5, window=10, clock=clock)
    requests = attempts = 0
    for n, dt in steps:
        for _ in range(n):
            b.request()
            requests += 1
            attempts += 1
            while b.try_retry():
                attempts += 1
        clock.now += dt
    windows = max(1.0, clock.now - 50.0) / 10 + 1
    assert attempts <= (1 + ratio) * requests + 0.5 * 10 * windows
