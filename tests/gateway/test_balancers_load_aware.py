"""least_conn, peak-EWMA (two random choices), consistent hashing with bounded load, slow start."""

from __future__ import annotations

import collections
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from piuptime.gateway.balancer import (
    Balancer,
    HashRing,
    LeastConn,
    LoadBalancer,
    PeakEwma,
    make_balancer,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("name", ["round_robin", "least_conn", "ewma", "hash"])
def test_every_strategy_is_a_load_balancer(name: str) -> None:
    b = make_balancer(name, [1, 2, 3])
    assert isinstance(b, LoadBalancer)
    assert b.pick(exclude={0, 1, 2}) is None
    for _ in range(50):
        i = b.pick(exclude={1}, key=b"k")
        assert i in (0, 2)
        b.started(i)
        b.finished(i, 0.01)
    with pytest.raises(ValueError, match="unknown"):
        make_balancer("random", [1])


# -- least connections --------------------------------------------------------------------------


def test_least_conn_prefers_the_idle_target() -> None:
    b = LeastConn([1, 1, 1])
    for _ in range(5):
        b.started(0)
    b.started(1)
    assert b.pick() == 2
    b.started(2)
    b.started(2)
    assert b.pick() == 1


def test_least_conn_spreads_in_flight_by_weight() -> None:
    b = LeastConn([3, 1, 2])
    for _ in range(600):
        b.started(b.pick())  # type: ignore[arg-type]
    assert b.in_flight == [300, 100, 200]


def test_least_conn_round_robins_ties_when_requests_are_short() -> None:
    b = LeastConn([1, 1, 1])
    seen = []
    for _ in range(9):
        i = b.pick()
        assert i is not None
        b.started(i)
        b.finished(i, 0.001)
        seen.append(i)
    assert collections.Counter(seen) == {0: 3, 1: 3, 2: 3}


# -- peak EWMA ----------------------------------------------------------------------------------


def test_ewma_sends_most_traffic_to_the_faster_target() -> None:
    clock = Clock()
    b = PeakEwma([1, 1, 1], rng=random.Random(7), clock=clock)
    latency = {0: 0.002, 1: 0.050, 2: 0.002}
    picks = collections.Counter()
    for _ in range(3000):
        i = b.pick()
        assert i is not None
        picks[i] += 1
        b.started(i)
        clock.now += 0.001
        b.finished(i, latency[i])
    assert picks[1] < 0.1 * 3000, picks
    assert abs(picks[0] - picks[2]) < 0.15 * 3000, picks


def test_ewma_even_when_all_are_equal() -> None:
    clock = Clock()
    b = PeakEwma([1, 1, 1, 1], rng=random.Random(1), clock=clock)
    picks = collections.Counter()
    for _ in range(4000):
        i = b.pick()
        assert i is not None
        picks[i] += 1
        b.started(i)
        clock.now += 0.001
        b.finished(i, 0.01)
    for i in range(4):
        assert 800 < picks[i] < 1200, picks


def test_ewma_peak_reacts_at_once_and_forgets_with_idle_time() -> None:
    clock = Clock()
    b = PeakEwma([1, 1], tau=10.0, clock=clock)
    b.started(0)
    b.finished(0, 0.010)
    b.started(0)
    b.finished(0, 2.0)  # one slow answer: the average jumps to it
    assert b.latency(0) == pytest.approx(2.0)
    clock.now += 30  # three time constants idle
    assert b.latency(0) == pytest.approx(2.0 * 2.718281828**-3, rel=1e-3)
    b.started(1)
    b.finished(1, None)  # a failure costs the penalty
    assert b.latency(1) == pytest.approx(b.failure_penalty)


# -- consistent hashing with bounded load ------------------------------------------------------


def _keys(n: int) -> list[bytes]:
    return [f"client-{i}".encode() for i in range(n)]


def test_hash_is_sticky_and_spreads_by_weight() -> None:
    ring = HashRing([1, 2, 1])
    owners = collections.Counter(ring.owner(k) for k in _keys(20000))
    assert ring.owner(b"client-7") == ring.owner(b"client-7")
    for i, share in ((0, 0.25), (1, 0.5), (2, 0.25)):
        assert abs(owners[i] / 20000 - share) < 0.06, owners
    # pick() without load agrees with owner()
    assert all(ring.pick(key=k) == ring.owner(k) for k in _keys(200))


def test_adding_a_target_moves_about_one_nth_of_the_keys() -> None:
    keys = _keys(20000)
    for n in (3, 5, 10):
        before = HashRing([1] * n)
        after = HashRing([1] * (n + 1))
        moved = sum(before.owner(k) != after.owner(k) for k in keys)
        share = moved / len(keys)
        assert share <= 1.3 / (n + 1), (n, share)
        # and every moved key moved to the new target
        assert all(after.owner(k) == n for k in keys if before.owner(k) != after.owner(k))


def test_excluding_a_target_moves_only_its_keys() -> None:
    ring = HashRing([1, 1, 1, 1])
    for k in _keys(2000):
        owner = ring.owner(k)
        chosen = ring.pick(exclude={2}, key=k)
        if owner != 2:
            assert chosen == owner
        else:
            assert chosen in (0, 1, 3)


def test_one_hot_key_cannot_melt_one_device() -> None:
    ring = HashRing([1, 1, 1, 1], balance_factor=1.25)
    for _ in range(400):  # 400 concurrent requests, all with the same key
        i = ring.pick(key=b"the-hot-camera")
        assert i is not None
        ring.started(i)
    # Fair share is 100 each; nobody may hold more than ceil(1.25 * 400 / 4) = 125.
    assert max(ring.in_flight) <= 125, ring.in_flight
    assert sum(ring.in_flight) == 400


@settings(max_examples=40, deadline=None)
@given(
    weights=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    keys=st.lists(st.binary(min_size=1, max_size=12), min_size=1, max_size=200),
    factor=st.floats(1.0, 3.0),
)
def test_bounded_load_property(weights: list[int], keys: list[bytes], factor: float) -> None:
    ring = HashRing(weights, balance_factor=factor)
    total_w = sum(weights)
    for k in keys:
        i = ring.pick(key=k)
        assert i is not None
        # The chosen target was under its bound before this attempt.
        total = sum(ring.in_flight) + 1
        assert ring.in_flight[i] < max(1, -(-factor * total * weights[i] // total_w)) + 1
        ring.started(i)


# -- slow start -------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Balancer, LeastConn])
def test_slow_start_factor_scales_a_targets_share(cls: type) -> None:
    b = cls([1, 1])
    b.set_factor(0, 0.25)
    picks = collections.Counter()
    for _ in range(1000):
        i = b.pick()
        picks[i] += 1
        b.started(i)
        b.finished(i, 0.001)
    assert abs(picks[0] / 1000 - 0.2) < 0.05, picks  # 0.25 : 1
    b.set_factor(0, 1.0)
    picks.clear()
    for _ in range(1000):
        i = b.pick()
        picks[i] += 1
        b.started(i)
        b.finished(i, 0.001)
    assert abs(picks[0] - picks[1]) <= 2
