"""Smooth weighted round-robin: nginx's exact sequence, exact shares per cycle, exclusions."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from piuptime.gateway.balancer import Balancer, LoadBalancer


def picks(b: Balancer, n: int, exclude: frozenset[int] = frozenset()) -> list[int | None]:
    return [b.pick(exclude) for _ in range(n)]


def test_nginx_documented_sequence() -> None:
    # nginx's commit message for smooth weighted round-robin: weights {5, 1, 1} give
    # "a a b a c a a" rather than "a a a a a b c".
    b = Balancer([5, 1, 1])
    assert "".join("abc"[i] for i in picks(b, 7) if i is not None) == "aabacaa"
    # ...and the cycle repeats from the same state.
    assert "".join("abc"[i] for i in picks(b, 7) if i is not None) == "aabacaa"


@pytest.mark.parametrize(
    ("weights", "sequence"),
    [
        ([1], [0, 0, 0]),
        ([1, 1, 1], [0, 1, 2, 0, 1, 2]),
        ([2, 1], [0, 1, 0, 0, 1, 0]),
        ([4, 2, 1], [0, 1, 0, 2, 0, 1, 0]),
    ],
)
def test_known_sequences(weights: list[int], sequence: list[int]) -> None:
    assert picks(Balancer(weights), len(sequence)) == sequence


@pytest.mark.parametrize("weights", [[5, 1, 1], [3, 2], [1, 7, 2, 4], [10, 10, 1]])
def test_every_cycle_has_exact_shares(weights: list[int]) -> None:
    b = Balancer(weights)
    total = sum(weights)
    for _ in range(50):
        counts = Counter(picks(b, total))
        assert [counts[i] for i in range(len(weights))] == weights


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=8))
def test_property_each_index_weight_times_per_cycle(weights: list[int]) -> None:
    b = Balancer(weights)
    for _ in range(3):
        counts = Counter(picks(b, sum(weights)))
        assert dict(counts) == dict(enumerate(weights))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=8).flatmap(
        lambda ws: st.tuples(
            st.just(ws), st.frozensets(st.integers(min_value=0, max_value=len(ws) - 1))
        )
    )
)
def test_property_exclusions_share_among_the_rest(
    case: tuple[list[int], frozenset[int]],
) -> None:
    weights, exclude = case
    b = Balancer(weights)
    remaining = {i: w for i, w in enumerate(weights) if i not in exclude}
    if not remaining:
        assert b.pick(exclude) is None
        return
    counts = Counter(picks(b, sum(remaining.values()), exclude))
    assert dict(counts) == remaining


def test_exclude_skips_and_all_excluded_is_none() -> None:
    b = Balancer([5, 1, 1])
    assert picks(b, 4, frozenset({0})) == [1, 2, 1, 2]
    assert b.pick({0, 1, 2}) is None
    assert b.pick([0, 1]) == 2  # any container works
    assert b.pick(range(3)) is None


def test_retry_excluding_the_tried_target() -> None:
    b = Balancer([1, 1, 1])
    first = b.pick()
    assert first is not None
    second = b.pick({first})
    assert second is not None and second != first
    third = b.pick({first, second})
    assert third is not None and third not in (first, second)
    assert b.pick({first, second, third}) is None


def test_all_excluded_does_not_disturb_state() -> None:
    b = Balancer([5, 1, 1])
    seq = []
    for _ in range(7):
        assert b.pick({0, 1, 2}) is None
        seq.append(b.pick())
    assert seq == [0, 0, 1, 0, 2, 0, 0]


def test_zero_weight_only_when_others_excluded() -> None:
    b = Balancer([0, 2, 1])
    assert 0 not in picks(b, 30)
    assert b.pick({1, 2}) == 0


def test_empty_and_invalid() -> None:
    assert Balancer([]).pick() is None
    assert len(Balancer([1, 2])) == 2
    with pytest.raises(ValueError, match="target 1"):
        Balancer([1, -1])


def test_satisfies_the_protocol() -> None:
    assert isinstance(Balancer([1]), LoadBalancer)
