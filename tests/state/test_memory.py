"""What only the memory backend offers: the synchronous hot-path API, the bounded sweep, the LRU.

Property tests (Hypothesis) check that the token bucket and the sliding window never allow more
than their limits over any sequence of (time step, cost), and that MemoryKV never holds more than
``max_bytes``.
"""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from piuptime.state.memory import MemoryCounters, MemoryKV, MemoryLogs, MemoryStores
from tests.state.conftest import FakeClock

# -- the synchronous API ---------------------------------------------------------------------------


def test_sync_counters_work_without_a_loop() -> None:
    clock = FakeClock()
    c = MemoryCounters(clock=clock)
    assert c.incr_sync("n", 2, ttl=5.0) == 2
    assert c.get_sync("n") == 2
    assert [c.window_hit_sync("w", 2, 60.0).allowed for _ in range(3)] == [True, True, False]
    assert [c.bucket_take_sync("b", 1.0, 2).allowed for _ in range(3)] == [True, True, False]
    assert c.acquire_sync("s", 1, 10.0)
    assert not c.acquire_sync("s", 1, 10.0)
    assert c.in_flight_sync("s") == 1
    c.release_sync("s")
    assert c.in_flight_sync("s") == 0
    clock.advance(5.0)
    assert c.get_sync("n") == 0


async def test_async_methods_share_state_with_the_sync_ones() -> None:
    c = MemoryCounters(clock=FakeClock())
    c.incr_sync("n")
    assert await c.incr("n") == 2
    c.window_hit_sync("w", 2, 60.0)
    assert (await c.window_hit("w", 2, 60.0)).remaining == 0
    kv = MemoryKV(1000)
    kv.set_sync("k", b"v")
    assert await kv.get("k") == b"v"
    await kv.set("k2", b"w")
    assert kv.get_sync("k2") == b"w"


# -- the sweep -------------------------------------------------------------------------------------


def test_expired_keys_nobody_touches_are_swept_in_bounded_steps() -> None:
    clock = FakeClock()
    c = MemoryCounters(clock=clock, sweep_interval=5.0, sweep_batch=100)
    c.incr_sync("first")  # starts the sweep timer
    for i in range(1000):
        c.incr_sync(f"n{i}", ttl=1.0)
        c.window_hit_sync(f"w{i}", 5, 1.0)
        c.bucket_take_sync(f"b{i}", 10.0, 5)  # full again (same as absent) after 0.1 s
        c.acquire_sync(f"s{i}", 5, 1.0)
    assert len(c) == 4001
    clock.advance(10.0)
    sizes = [len(c)]
    for _ in range(30):  # later traffic on other keys drives the sweep
        c.incr_sync("hot")
        c.window_hit_sync("hot", 1000, 60.0)
        c.bucket_take_sync("hot", 0.001, 1000)
        c.acquire_sync("hot", 1000, 60.0)
        sizes.append(len(c))
        clock.advance(0.02)
    # each step removes at most sweep_batch keys per table, and in the end all expired are gone
    assert all(a - b <= 4 * 100 for a, b in pairwise(sizes))
    assert len(c) == 5  # "first" (no ttl) and the four "hot" keys
    assert c.get_sync("first") == 1


async def test_kv_and_logs_are_swept_too() -> None:
    clock = FakeClock()
    kv = MemoryKV(1_000_000, clock=clock, sweep_interval=1.0, sweep_batch=50)
    logs = MemoryLogs(clock=clock, sweep_interval=1.0, sweep_batch=50)
    for i in range(200):
        kv.set_sync(f"k{i}", b"v" * 10, ttl=1.0)
    assert kv.bytes > 0
    clock.advance(5.0)
    for _ in range(10):
        kv.sweep()
    assert len(kv) == 0
    assert kv.bytes == 0

    for i in range(200):
        await logs.append(f"l{i}", b"x", ttl=1.0)
    clock.advance(5.0)
    for _ in range(10):
        logs.sweep()
    assert len(logs) == 0


# -- the LRU ---------------------------------------------------------------------------------------


def test_kv_evicts_the_least_recently_used_within_max_bytes() -> None:
    kv = MemoryKV(max_bytes=30)
    kv.set_sync("a", b"x" * 9)  # 10 bytes with its key
    kv.set_sync("b", b"x" * 9)
    kv.set_sync("c", b"x" * 9)
    assert kv.bytes == 30
    assert kv.get_sync("a") is not None  # a is now the most recent
    kv.set_sync("d", b"x" * 9)  # evicts b, the least recently used
    assert kv.get_sync("b") is None
    assert [kv.get_sync(k) is not None for k in "acd"] == [True, True, True]
    assert kv.evictions_total == 1
    kv.set_sync("big", b"x" * 25)  # 28 bytes: everything else must go
    assert len(kv) == 1
    assert kv.bytes == 28


def test_kv_does_not_store_an_entry_larger_than_max_bytes() -> None:
    kv = MemoryKV(max_bytes=10)
    kv.set_sync("k", b"small")
    kv.set_sync("k", b"x" * 100)  # too big: not stored, and the old value is gone too
    assert kv.get_sync("k") is None
    assert kv.bytes == 0
    assert not kv.set_if_absent_sync("k", b"x" * 100)
    assert kv.get_sync("k") is None


def test_kv_counts_keys_in_utf8_bytes() -> None:
    kv = MemoryKV(max_bytes=100)
    kv.set_sync("☃", b"12")  # 3 bytes of key
    assert kv.bytes == 5


async def test_memory_stores_factory_options() -> None:
    stores = MemoryStores(kv_max_bytes=123)
    assert stores.kv.max_bytes == 123
    assert stores.available
    assert stores.failures_total == 0
    await stores.aclose()
    with pytest.raises(ValueError):
        MemoryKV(0)


# -- properties ------------------------------------------------------------------------------------

steps = st.lists(
    st.tuples(st.floats(min_value=0.0, max_value=3.0), st.integers(min_value=0, max_value=8)),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(
    rate=st.floats(min_value=0.05, max_value=20.0),
    burst=st.integers(min_value=1, max_value=20),
    steps=steps,
)
def test_bucket_never_allows_more_than_burst_plus_refill(
    rate: float, burst: int, steps: list[tuple[float, int]]
) -> None:
    clock = FakeClock(0.0)
    c = MemoryCounters(clock=clock)
    taken: list[tuple[float, int]] = []
    for advance, cost in steps:
        clock.advance(advance)
        r = c.bucket_take_sync("b", rate, burst, cost)
        assert 0 <= r.remaining <= burst
        assert r.reset >= 0
        if r.allowed:
            taken.append((clock.t, cost))
        elif cost > burst:
            assert math.isinf(r.reset)
    # over every interval [t_i, t_j], what was taken fits in a full bucket plus the refill
    for i, (t_i, _) in enumerate(taken):
        total = 0
        for t_j, cost in taken[i:]:
            total += cost
            assert total <= burst + rate * (t_j - t_i) + 1e-6


@settings(max_examples=150, deadline=None)
@given(
    limit=st.integers(min_value=0, max_value=20),
    window=st.sampled_from([0.5, 1.0, 2.0, 10.0]),
    steps=steps,
)
def test_window_never_allows_more_than_the_limit(
    limit: int, window: float, steps: list[tuple[float, int]]
) -> None:
    clock = FakeClock(0.0)
    c = MemoryCounters(clock=clock)
    counted: dict[int, int] = {}  # fixed window index -> cost counted in it
    for advance, cost in steps:
        clock.advance(advance)
        now = clock.t
        idx = math.floor(now / window)
        elapsed = now - idx * window
        estimate = counted.get(idx - 1, 0) * (1 - elapsed / window) + counted.get(idx, 0)
        r = c.window_hit_sync("w", limit, window, cost)
        # the documented rule (either answer within float rounding of the boundary), and the
        # reset is the end of the current window
        if estimate + cost <= limit - 1e-9:
            assert r.allowed
        elif estimate + cost > limit + 1e-9:
            assert not r.allowed
        assert r.reset == pytest.approx(window - elapsed, abs=1e-9)
        if r.allowed:
            counted[idx] = counted.get(idx, 0) + cost
        assert counted.get(idx, 0) <= limit  # never more than the limit in a window
        after = counted.get(idx - 1, 0) * (1 - elapsed / window) + counted.get(idx, 0)
        assert after <= limit + 1e-9
        assert r.remaining in {max(0, math.floor(limit - after + d)) for d in (-1e-9, 0, 1e-9)}


@settings(max_examples=100, deadline=None)
@given(
    max_bytes=st.integers(min_value=1, max_value=300),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["set", "set_if_absent", "get", "delete"]),
            st.text(min_size=0, max_size=6),
            st.binary(max_size=80),
        ),
        max_size=80,
    ),
)
def test_kv_never_holds_more_than_max_bytes(
    max_bytes: int, ops: list[tuple[str, str, bytes]]
) -> None:
    kv = MemoryKV(max_bytes)
    last: dict[str, bytes] = {}
    for op, key, value in ops:
        if op == "set":
            kv.set_sync(key, value)
            last[key] = value
        elif op == "set_if_absent":
            if kv.set_if_absent_sync(key, value):
                last[key] = value
        elif op == "get":
            got = kv.get_sync(key)
            assert got is None or got == last.get(key)  # evicted, or the value last stored
        else:
            kv.delete_sync(key)
            last.pop(key, None)
        held = sum(len(k.encode()) + len(item.value) for k, item in kv._items.items())
        assert kv.bytes == held
        assert kv.bytes <= max_bytes
