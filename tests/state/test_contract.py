"""The state contract: every test runs against memory, SQLite and Redis (the ``backend`` fixture).

Time: window and bucket tests move a fake clock (all three backends read it; Redis through a
test-only override of its ``TIME``). Expiry tests use ``backend.ttl`` and ``backend.pass_time``:
a fake clock in memory and SQLite, Redis's own real expiry (short TTLs, polled) in Redis.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable

import pytest

from piuptime.state import KV, BucketResult, Counters, Logs, WindowResult
from tests.state.conftest import Backend

# -- incr / get ------------------------------------------------------------------------------------


async def test_incr_adds_and_returns_the_new_value(backend: Backend) -> None:
    c = backend.counters
    assert await c.get("n") == 0
    assert await c.incr("n") == 1
    assert await c.incr("n", 5) == 6
    assert await c.incr("n", -2) == 4
    assert await c.get("n") == 4
    assert await c.get("other") == 0


async def test_incr_expiry_is_set_at_creation_and_not_extended(backend: Backend) -> None:
    c = backend.counters
    ttl = backend.ttl
    assert await c.incr("n", ttl=ttl) == 1
    await backend.pass_time(ttl * 0.6)
    assert await c.incr("n", ttl=ttl) == 2  # does not push the expiry back
    assert await c.get("n") == 2
    # now 1.2 ttl after creation: gone (an extended expiry would keep it until 1.6 ttl)
    await backend.pass_time(ttl * 0.6)
    await backend.eventually(lambda: _is(c.get("n"), 0), timeout=ttl * 0.3, what="expiry")
    # a new key is created afresh, with a fresh expiry
    assert await c.incr("n", 3, ttl=ttl) == 3


async def test_incr_without_ttl_does_not_expire(backend: Backend) -> None:
    c = backend.counters
    await c.incr("forever")
    await backend.pass_time(backend.ttl)
    assert await c.get("forever") == 1


async def test_concurrent_incr_loses_nothing(backend: Backend) -> None:
    c = backend.counters
    other = (await backend.second()).counters
    results = await asyncio.gather(*(d.incr("n") for d in [c, other] * 100))
    assert sorted(results) == list(range(1, 201))
    assert await c.get("n") == 200


# -- window_hit ------------------------------------------------------------------------------------


async def test_window_allows_exactly_the_limit(backend: Backend) -> None:
    c = backend.counters
    backend.clock.advance(15.0)  # 15 s into a 60 s window
    results = [await c.window_hit("w", 5, 60.0) for _ in range(8)]
    assert [r.allowed for r in results] == [True] * 5 + [False] * 3
    assert [r.remaining for r in results] == [4, 3, 2, 1, 0, 0, 0, 0]
    assert all(r.limit == 5 for r in results)
    assert all(r.reset == pytest.approx(45.0) for r in results)


async def test_window_weights_the_previous_window_by_the_overlap(backend: Backend) -> None:
    c = backend.counters
    for _ in range(10):
        assert (await c.window_hit("w", 10, 10.0)).allowed
    # 2.5 s into the next window: the previous 10 hits weigh 10 * 0.75 = 7.5 -> room for 2
    backend.clock.advance(12.5)
    hits = [await c.window_hit("w", 10, 10.0) for _ in range(4)]
    assert [h.allowed for h in hits] == [True, True, False, False]
    assert hits[0].remaining == 1  # floor(10 - 7.5 - 1)
    assert hits[-1].reset == pytest.approx(7.5)
    # 7.5 s in: 10 * 0.25 + 2 = 4.5 -> 5 more
    backend.clock.advance(5.0)
    allowed = [(await c.window_hit("w", 10, 10.0)).allowed for _ in range(7)]
    assert allowed == [True] * 5 + [False] * 2
    # two whole windows later nothing weighs any more
    backend.clock.advance(20.0)
    allowed = [(await c.window_hit("w", 10, 10.0)).allowed for _ in range(11)]
    assert allowed == [True] * 10 + [False]


async def test_window_refused_hits_are_not_counted(backend: Backend) -> None:
    c = backend.counters
    outcomes = [(await c.window_hit("w", 5, 60.0)).allowed for _ in range(50)]
    assert outcomes.count(True) == 5
    # half-way through the next window: the previous window counts 5 (not 50) * 0.5 = 2.5
    backend.clock.advance(90.0)
    allowed = [(await c.window_hit("w", 5, 60.0)).allowed for _ in range(5)]
    assert allowed == [True, True, False, False, False]


async def test_window_cost(backend: Backend) -> None:
    c = backend.counters
    r = [await c.window_hit("w", 10, 60.0, cost=3) for _ in range(4)]
    assert [x.allowed for x in r] == [True, True, True, False]
    assert r[-1].remaining == 1
    assert (await c.window_hit("w", 10, 60.0, cost=1)).allowed  # the refused 3 was not counted
    assert not (await c.window_hit("w", 10, 60.0, cost=1)).allowed
    assert not (await c.window_hit("other", 10, 60.0, cost=11)).allowed


async def test_window_keys_and_kinds_are_separate(backend: Backend) -> None:
    c = backend.counters
    assert (await c.window_hit("a", 1, 60.0)).allowed
    assert not (await c.window_hit("a", 1, 60.0)).allowed
    assert (await c.window_hit("b", 1, 60.0)).allowed
    # the same key name in another kind of counter is another counter
    assert await c.incr("a") == 1
    assert (await c.bucket_take("a", 1.0, 1)).allowed
    assert await c.acquire("a", 1, 60.0)


async def test_window_concurrent_hits_allow_exactly_the_limit(backend: Backend) -> None:
    c = backend.counters
    other = (await backend.second()).counters
    results = await asyncio.gather(*(d.window_hit("w", 50, 3600.0) for d in [c, other] * 100))
    assert sum(r.allowed for r in results) == 50
    assert not (await c.window_hit("w", 50, 3600.0)).allowed


# -- bucket_take -----------------------------------------------------------------------------------


async def test_bucket_starts_full_and_empties(backend: Backend) -> None:
    c = backend.counters
    r = [await c.bucket_take("b", 2.0, 5) for _ in range(6)]
    assert [x.allowed for x in r] == [True] * 5 + [False]
    assert [x.remaining for x in r] == [4, 3, 2, 1, 0, 0]
    assert all(x.limit == 5 for x in r)
    assert [x.reset for x in r[:4]] == [0.0] * 4
    assert r[4].reset == pytest.approx(0.5)  # allowed, but the next token is 0.5 s away
    assert r[5].reset == pytest.approx(0.5)


async def test_bucket_refills_at_the_rate_up_to_the_burst(backend: Backend) -> None:
    c = backend.counters
    for _ in range(5):
        assert (await c.bucket_take("b", 2.0, 5)).allowed
    backend.clock.advance(0.25)  # half a token
    refused = await c.bucket_take("b", 2.0, 5)
    assert not refused.allowed
    assert refused.reset == pytest.approx(0.25)
    backend.clock.advance(0.25)  # one whole token
    assert (await c.bucket_take("b", 2.0, 5)).allowed
    assert not (await c.bucket_take("b", 2.0, 5)).allowed
    backend.clock.advance(100.0)  # full again, never above the burst
    allowed = [(await c.bucket_take("b", 2.0, 5)).allowed for _ in range(7)]
    assert allowed == [True] * 5 + [False] * 2


async def test_bucket_cost(backend: Backend) -> None:
    c = backend.counters
    assert (await c.bucket_take("b", 1.0, 5, cost=3)).allowed
    r = await c.bucket_take("b", 1.0, 5, cost=3)  # 2 left: refused, nothing taken
    assert not r.allowed
    assert r.remaining == 2
    assert r.reset == pytest.approx(1.0)
    assert (await c.bucket_take("b", 1.0, 5, cost=2)).allowed
    never = await c.bucket_take("other", 1.0, 5, cost=6)
    assert not never.allowed
    assert math.isinf(never.reset)


async def test_bucket_concurrent_takes_allow_exactly_the_burst(backend: Backend) -> None:
    c = backend.counters
    other = (await backend.second()).counters
    results = await asyncio.gather(*(d.bucket_take("b", 0.001, 50) for d in [c, other] * 100))
    assert sum(r.allowed for r in results) == 50


# -- acquire / release -----------------------------------------------------------------------------


async def test_acquire_up_to_the_limit_and_release(backend: Backend) -> None:
    c = backend.counters
    assert await c.acquire("s", 2, 60.0)
    assert await c.acquire("s", 2, 60.0)
    assert not await c.acquire("s", 2, 60.0)
    await c.release("s")
    assert await c.acquire("s", 2, 60.0)
    assert not await c.acquire("s", 2, 60.0)
    for _ in range(5):  # more releases than holds: the count stops at 0
        await c.release("s")
    await c.release("never-held")
    assert await c.acquire("s", 2, 60.0)
    assert await c.acquire("s", 2, 60.0)
    assert not await c.acquire("s", 2, 60.0)
    assert not await c.acquire("zero", 0, 60.0)


async def test_acquire_leaked_slots_expire(backend: Backend) -> None:
    c = backend.counters
    assert await c.acquire("s", 1, backend.ttl)
    assert not await c.acquire("s", 1, backend.ttl)
    await backend.pass_time(backend.ttl)
    await backend.eventually(lambda: c.acquire("s", 1, 60.0), timeout=1.0, what="slot expiry")


async def test_acquire_concurrently_grants_exactly_the_limit(backend: Backend) -> None:
    c = backend.counters
    other = (await backend.second()).counters
    granted = await asyncio.gather(*(d.acquire("s", 50, 60.0) for d in [c, other] * 100))
    assert sum(granted) == 50
    await asyncio.gather(*(c.release("s") for _ in range(10)))
    granted = await asyncio.gather(*(d.acquire("s", 50, 60.0) for d in [c, other] * 10))
    assert sum(granted) == 10


# -- KV --------------------------------------------------------------------------------------------


async def test_kv_set_get_overwrite(backend: Backend) -> None:
    kv = backend.kv
    assert await kv.get("k") is None
    await kv.set("k", b"one")
    assert await kv.get("k") == b"one"
    await kv.set("k", b"two")
    assert await kv.get("k") == b"two"
    every_byte = bytes(range(256)) * 4
    await kv.set("bin", every_byte)
    assert await kv.get("bin") == every_byte
    await kv.set("empty", b"")
    assert await kv.get("empty") == b""
    await kv.set("clé ☃", b"unicode key")
    assert await kv.get("clé ☃") == b"unicode key"


async def test_kv_ttl(backend: Backend) -> None:
    kv = backend.kv
    ttl = backend.ttl
    await kv.set("k", b"v", ttl=ttl)
    await kv.set("kept", b"v", ttl=ttl)
    await kv.set("kept", b"w")  # a set without ttl replaces the expiry with none
    await kv.set("forever", b"v")
    assert await kv.get("k") == b"v"
    await backend.pass_time(ttl)
    await backend.eventually(lambda: _is(kv.get("k"), None), timeout=1.0, what="kv expiry")
    assert await kv.get("kept") == b"w"
    assert await kv.get("forever") == b"v"
    assert not await kv.delete("k")  # expired: nothing to delete


async def test_kv_set_if_absent(backend: Backend) -> None:
    kv = backend.kv
    assert await kv.set_if_absent("k", b"first")
    assert not await kv.set_if_absent("k", b"second")
    assert await kv.get("k") == b"first"
    assert await kv.delete("k")
    assert await kv.set_if_absent("k", b"third", ttl=backend.ttl)
    await backend.pass_time(backend.ttl)
    await backend.eventually(
        lambda: kv.set_if_absent("k", b"fourth"), timeout=1.0, what="set_if_absent after expiry"
    )
    assert await kv.get("k") == b"fourth"


async def test_kv_set_if_absent_concurrently_has_one_winner(backend: Backend) -> None:
    kv = backend.kv
    other = (await backend.second()).kv
    won = await asyncio.gather(
        *(d.set_if_absent("lock", str(i).encode()) for i, d in enumerate([kv, other] * 25))
    )
    assert sum(won) == 1
    assert await kv.get("lock") == str(won.index(True)).encode()


async def test_kv_delete(backend: Backend) -> None:
    kv = backend.kv
    await kv.set("k", b"v")
    assert await kv.delete("k")
    assert await kv.get("k") is None
    assert not await kv.delete("k")
    assert not await kv.delete("never")


async def test_kv_delete_prefix(backend: Backend) -> None:
    kv = backend.kv
    for key in ["a:1", "a:2", "a:x:3", "b:1", "a", "ab"]:
        await kv.set(key, b"v")
    assert await kv.delete_prefix("a:") == 3
    assert [await kv.get(k) for k in ["a:1", "a:2", "a:x:3"]] == [None] * 3
    assert [await kv.get(k) for k in ["b:1", "a", "ab"]] == [b"v"] * 3
    assert await kv.delete_prefix("nothing") == 0
    # glob and LIKE characters in a prefix are plain characters
    for key in ["p*1", "p*2", "px", "q?", "qa", "[r]1", "r1", "s%1", "sa1", "t_1", "ta1", "u\\1"]:
        await kv.set(key, b"v")
    assert await kv.delete_prefix("p*") == 2
    assert await kv.get("px") == b"v"
    assert await kv.delete_prefix("q?") == 1
    assert await kv.get("qa") == b"v"
    assert await kv.delete_prefix("[r]") == 1
    assert await kv.get("r1") == b"v"
    assert await kv.delete_prefix("s%") == 1
    assert await kv.delete_prefix("t_") == 1
    assert await kv.delete_prefix("u\\") == 1
    assert [await kv.get(k) for k in ["px", "qa", "r1", "sa1", "ta1"]] == [b"v"] * 5


async def test_kv_delete_prefix_skips_expired_in_its_count(backend: Backend) -> None:
    kv = backend.kv
    await kv.set("c:old", b"v", ttl=backend.ttl)
    await kv.set("c:new", b"v")
    await backend.pass_time(backend.ttl)
    await backend.eventually(lambda: _is(kv.get("c:old"), None), timeout=1.0, what="expiry")
    assert await kv.delete_prefix("c:") == 1
    assert await kv.get("c:new") is None


# -- Logs ------------------------------------------------------------------------------------------


def _lrange(items: list[bytes], start: int, stop: int) -> list[bytes]:
    """Redis LRANGE, written from its documentation."""
    n = len(items)
    if start < 0:
        start = max(n + start, 0)
    if stop < 0:
        stop = n + stop
    if start > stop or start >= n:
        return []
    return items[start : min(stop, n - 1) + 1]


async def test_logs_append_range_length(backend: Backend) -> None:
    logs = backend.logs
    assert await logs.length("l") == 0
    assert await logs.range("l") == []
    assert await logs.append("l", b"a") == 1
    assert await logs.append("l", b"b", b"c") == 3
    assert await logs.append("l") == 3  # nothing to add
    assert await logs.append("empty") == 0
    assert await logs.length("empty") == 0
    assert await logs.range("l") == [b"a", b"b", b"c"]
    assert await logs.length("l") == 3


async def test_logs_range_follows_lrange_for_every_index(backend: Backend) -> None:
    logs = backend.logs
    items = [b"0", b"1", b"2", b"3", b"4"]
    await logs.append("l", *items)
    got = await asyncio.gather(
        *(logs.range("l", start, stop) for start in range(-7, 8) for stop in range(-7, 8))
    )
    want = [_lrange(items, start, stop) for start in range(-7, 8) for stop in range(-7, 8)]
    assert got == want
    assert await logs.range("l", -2) == [b"3", b"4"]
    assert await logs.range("l", 0, 0) == [b"0"]
    assert await logs.range("missing", -3) == []


async def test_logs_max_len_keeps_the_newest(backend: Backend) -> None:
    logs = backend.logs
    for i in range(10):
        n = await logs.append("l", str(i).encode(), max_len=4)
        assert n == min(i + 1, 4)
    assert await logs.range("l") == [b"6", b"7", b"8", b"9"]
    assert await logs.append("l", b"a", b"b", b"c", b"d", b"e", b"f", max_len=3) == 3
    assert await logs.range("l") == [b"d", b"e", b"f"]
    assert await logs.range("l", -1) == [b"f"]
    big = [str(i).encode() for i in range(2500)]  # more than one RPUSH batch in the script
    assert await logs.append("big", *big) == 2500
    assert await logs.range("big", -2) == big[-2:]
    assert await logs.range("big", 1000, 1001) == big[1000:1002]


async def test_logs_ttl(backend: Backend) -> None:
    logs = backend.logs
    ttl = backend.ttl
    await logs.append("l", b"a", ttl=ttl)
    await logs.append("l", b"b")  # without ttl: the expiry stays
    await logs.append("kept", b"a", ttl=ttl)
    await backend.pass_time(ttl * 0.6)
    await logs.append("kept", b"b", ttl=ttl)  # with ttl: the expiry starts again
    await backend.pass_time(ttl * 0.6)
    await backend.eventually(lambda: _is(logs.length("l"), 0), timeout=ttl * 0.3, what="log expiry")
    assert await logs.range("l") == []
    assert await logs.range("kept") == [b"a", b"b"]
    assert await logs.append("l", b"new") == 1  # starts afresh
    assert await logs.range("l") == [b"new"]


async def test_logs_delete(backend: Backend) -> None:
    logs = backend.logs
    await logs.append("l", b"a", b"b")
    assert await logs.delete("l")
    assert await logs.length("l") == 0
    assert not await logs.delete("l")
    assert await logs.append("l", b"c") == 1
    assert await logs.range("l") == [b"c"]


async def test_logs_concurrent_appends_keep_everything_in_one_order(backend: Backend) -> None:
    logs = backend.logs
    other = (await backend.second()).logs
    items = [f"{i:03}".encode() for i in range(100)]
    await asyncio.gather(
        *(d.append("l", item) for d, item in zip([logs, other] * 50, items, strict=True))
    )
    stored = await logs.range("l")
    assert sorted(stored) == items
    assert await other.range("l") == stored


# -- arguments -------------------------------------------------------------------------------------


async def test_bad_arguments_raise_value_error(backend: Backend) -> None:
    c, kv, logs = backend.counters, backend.kv, backend.logs
    with pytest.raises(ValueError):
        await c.incr("n", ttl=0)
    with pytest.raises(ValueError):
        await c.window_hit("w", 10, 0.0)
    with pytest.raises(ValueError):
        await c.window_hit("w", -1, 1.0)
    with pytest.raises(ValueError):
        await c.bucket_take("b", 0.0, 5)
    with pytest.raises(ValueError):
        await c.bucket_take("b", 1.0, 0)
    with pytest.raises(ValueError):
        await c.acquire("s", 1, -1.0)
    with pytest.raises(ValueError):
        await kv.set("k", b"v", ttl=-5)
    with pytest.raises(ValueError):
        await kv.set_if_absent("k", b"v", ttl=0)
    with pytest.raises(ValueError):
        await logs.append("l", b"x", max_len=0)


async def test_the_objects_satisfy_the_interfaces(backend: Backend) -> None:
    assert isinstance(backend.counters, Counters)
    assert isinstance(backend.kv, KV)
    assert isinstance(backend.logs, Logs)
    assert backend.stores.kind == backend.kind
    assert backend.stores.available
    assert backend.stores.failures_total == 0
    assert isinstance(await backend.counters.window_hit("w", 1, 1.0), WindowResult)
    assert isinstance(await backend.counters.bucket_take("b", 1.0, 1), BucketResult)


async def _is(value: Awaitable[object], expected: object) -> bool:
    return await value == expected
