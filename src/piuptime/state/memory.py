"""In-process state: dicts behind the state interfaces, for one gateway process.

Every operation is synchronous underneath and runs without yielding to the event loop, so each is
atomic with respect to the other tasks of the process. The counter operations and the KV
``get``/``set`` are also offered as plain methods (``*_sync``) for the gateway's hot path, which
calls them without awaiting; the async methods wrap them.

Expiry uses a monotonic clock (injectable: ``clock=``). An expired entry is dropped when it is next
touched, and a bounded periodic sweep walks every table so that keys nobody touches again cannot
pile up: a pass starts every ``sweep_interval`` seconds and checks at most ``sweep_batch`` keys per
step, one step at most every 10 ms, driven by the operations themselves (no background task).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any, Generic, Protocol, TypeVar

from .base import (
    BucketResult,
    WindowResult,
    bucket_step,
    check_bucket,
    check_limit,
    check_max_len,
    check_ttl,
    check_window,
    lrange_bounds,
    window_step,
)

__all__ = ["MemoryCounters", "MemoryKV", "MemoryLogs", "MemoryStores"]

Clock = Callable[[], float]

_STEP_GAP = 0.01  # seconds between two sweep steps while a pass is under way


class _Expiring(Protocol):
    deadline: float | None


E = TypeVar("E", bound=_Expiring)


class _Sweeper(Generic[E]):
    """Walks a table in bounded steps, removing expired entries."""

    __slots__ = ("_batch", "_interval", "_keys", "_next", "_remove", "_table")

    def __init__(
        self,
        table: dict[str, E],
        interval: float,
        batch: int,
        remove: Callable[[str], None] | None = None,
    ) -> None:
        self._table = table
        self._interval = interval
        self._batch = batch
        self._remove = remove
        self._keys: Iterator[str] | None = None
        self._next = 0.0

    def maybe(self, now: float) -> None:
        if now >= self._next:
            self.step(now)

    def step(self, now: float) -> None:
        if self._keys is None:
            self._keys = iter(list(self._table))
        table = self._table
        remove = self._remove
        keys = self._keys
        for _ in range(self._batch):
            key = next(keys, None)
            if key is None:
                self._keys = None
                self._next = now + self._interval
                return
            entry = table.get(key)
            if entry is not None and entry.deadline is not None and entry.deadline <= now:
                if remove is None:
                    del table[key]
                else:
                    remove(key)
        self._next = now + _STEP_GAP


# -- counters --------------------------------------------------------------------------------------


class _Count:
    __slots__ = ("deadline", "value")

    def __init__(self, value: int, deadline: float | None) -> None:
        self.value = value
        self.deadline = deadline


class _Window:
    __slots__ = ("cur", "deadline", "idx", "prev")

    def __init__(self, idx: int, cur: int, prev: int, deadline: float) -> None:
        self.idx = idx
        self.cur = cur
        self.prev = prev
        self.deadline: float | None = deadline


class _Bucket:
    __slots__ = ("deadline", "tokens", "ts")

    def __init__(self, tokens: float, ts: float, deadline: float) -> None:
        self.tokens = tokens
        self.ts = ts
        self.deadline: float | None = deadline


class MemoryCounters:
    """:class:`~piuptime.state.Counters` in memory, with synchronous twins of every operation."""

    def __init__(
        self,
        *,
        clock: Clock = time.monotonic,
        sweep_interval: float = 5.0,
        sweep_batch: int = 1000,
    ) -> None:
        self._clock = clock
        self._counts: dict[str, _Count] = {}
        self._windows: dict[str, _Window] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._slots: dict[str, _Count] = {}
        self._sweepers: tuple[_Sweeper[Any], ...] = (
            _Sweeper(self._counts, sweep_interval, sweep_batch),
            _Sweeper(self._windows, sweep_interval, sweep_batch),
            _Sweeper(self._buckets, sweep_interval, sweep_batch),
            _Sweeper(self._slots, sweep_interval, sweep_batch),
        )

    def __len__(self) -> int:
        """Entries held, expired ones not yet swept included."""
        return len(self._counts) + len(self._windows) + len(self._buckets) + len(self._slots)

    def sweep(self) -> None:
        """Run one sweep step on every table now (tests, or an idle timer)."""
        now = self._clock()
        for s in self._sweepers:
            s.step(now)

    # -- synchronous -----------------------------------------------------------------------------

    def incr_sync(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        check_ttl(ttl)
        now = self._clock()
        self._sweepers[0].maybe(now)
        entry = self._counts.get(key)
        if entry is None or (entry.deadline is not None and entry.deadline <= now):
            self._counts[key] = _Count(amount, None if ttl is None else now + ttl)
            return amount
        entry.value += amount
        return entry.value

    def get_sync(self, key: str) -> int:
        entry = self._counts.get(key)
        if entry is None:
            return 0
        if entry.deadline is not None and entry.deadline <= self._clock():
            del self._counts[key]
            return 0
        return entry.value

    def window_hit_sync(self, key: str, limit: int, window: float, cost: int = 1) -> WindowResult:
        # ``window_step`` inlined for an existing entry: one of these runs for every
        # rate-limited request on the gateway's hot path (the arithmetic is the same; the
        # contract tests hold it to the other backends)
        if limit < 0 or cost < 0 or not window > 0:
            check_window(limit, window, cost)
        now = self._clock()
        sweeper = self._sweepers[1]
        if now >= sweeper._next:
            sweeper.step(now)
        entry = self._windows.get(key)
        if entry is None:
            allowed, remaining, reset, idx, cur, prev, expires = window_step(
                now, limit, window, cost, None, 0, 0
            )
            self._windows[key] = _Window(idx, cur, prev, expires)
            return WindowResult(allowed, limit, remaining, reset)
        new_idx = math.floor(now / window)
        idx = entry.idx
        if idx == new_idx:
            cur, prev = entry.cur, entry.prev
        elif idx == new_idx - 1:
            prev, cur = entry.cur, 0
        else:
            cur = prev = 0
        elapsed = min(max(now - new_idx * window, 0.0), window)
        estimate = prev * (1.0 - elapsed / window) + cur
        allowed = estimate + cost <= limit
        if allowed:
            cur += cost
            estimate += cost
        entry.idx = new_idx
        entry.cur = cur
        entry.prev = prev
        entry.deadline = (new_idx + 2) * window
        return WindowResult(allowed, limit, max(0, math.floor(limit - estimate)), window - elapsed)

    def bucket_take_sync(self, key: str, rate: float, burst: int, cost: int = 1) -> BucketResult:
        check_bucket(rate, burst, cost)
        now = self._clock()
        self._sweepers[2].maybe(now)
        entry = self._buckets.get(key)
        if entry is None:
            allowed, remaining, reset, tokens, expires = bucket_step(
                now, rate, burst, cost, None, now
            )
            self._buckets[key] = _Bucket(tokens, now, expires)
        else:
            allowed, remaining, reset, tokens, expires = bucket_step(
                now, rate, burst, cost, entry.tokens, entry.ts
            )
            entry.tokens, entry.ts, entry.deadline = tokens, now, expires
        return BucketResult(allowed, burst, remaining, reset)

    def acquire_sync(self, key: str, limit: int, ttl: float) -> bool:
        check_limit(limit, ttl)
        now = self._clock()
        self._sweepers[3].maybe(now)
        entry = self._slots.get(key)
        if entry is None or (entry.deadline is not None and entry.deadline <= now):
            if limit < 1:
                return False
            self._slots[key] = _Count(1, now + ttl)
            return True
        if entry.value >= limit:
            return False
        entry.value += 1
        entry.deadline = now + ttl
        return True

    def release_sync(self, key: str) -> None:
        entry = self._slots.get(key)
        if entry is None:
            return
        if entry.value <= 1 or (entry.deadline is not None and entry.deadline <= self._clock()):
            del self._slots[key]
        else:
            entry.value -= 1

    def in_flight_sync(self, key: str) -> int:
        """Slots held under ``key`` now (for status pages and tests)."""
        entry = self._slots.get(key)
        if entry is None or (entry.deadline is not None and entry.deadline <= self._clock()):
            return 0
        return entry.value

    # -- the interface ---------------------------------------------------------------------------

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        return self.incr_sync(key, amount, ttl)

    async def get(self, key: str) -> int:
        return self.get_sync(key)

    async def window_hit(self, key: str, limit: int, window: float, cost: int = 1) -> WindowResult:
        return self.window_hit_sync(key, limit, window, cost)

    async def bucket_take(self, key: str, rate: float, burst: int, cost: int = 1) -> BucketResult:
        return self.bucket_take_sync(key, rate, burst, cost)

    async def acquire(self, key: str, limit: int, ttl: float) -> bool:
        return self.acquire_sync(key, limit, ttl)

    async def release(self, key: str) -> None:
        self.release_sync(key)


# -- key-value -------------------------------------------------------------------------------------


class _Item:
    __slots__ = ("deadline", "size", "value")

    def __init__(self, value: bytes, deadline: float | None, size: int) -> None:
        self.value = value
        self.deadline = deadline
        self.size = size


class MemoryKV:
    """:class:`~piuptime.state.KV` in memory: an LRU bounded by ``max_bytes`` of keys (UTF-8) plus
    values. Storing evicts the least recently used entries until the total fits; a single entry
    larger than ``max_bytes`` is not stored at all (and any older value under its key goes)."""

    def __init__(
        self,
        max_bytes: int = 64 * 1024 * 1024,
        *,
        clock: Clock = time.monotonic,
        sweep_interval: float = 5.0,
        sweep_batch: int = 1000,
    ) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self.max_bytes = max_bytes
        self.bytes = 0  # keys + values held now
        self.evictions_total = 0
        self._clock = clock
        self._items: OrderedDict[str, _Item] = OrderedDict()
        self._sweeper = _Sweeper(self._items, sweep_interval, sweep_batch, self._drop)

    def __len__(self) -> int:
        return len(self._items)

    def sweep(self) -> None:
        self._sweeper.step(self._clock())

    def _drop(self, key: str) -> None:
        item = self._items.pop(key)
        self.bytes -= item.size

    def _live(self, key: str, now: float) -> _Item | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item.deadline is not None and item.deadline <= now:
            self._drop(key)
            return None
        return item

    def get_sync(self, key: str) -> bytes | None:
        item = self._live(key, self._clock())
        if item is None:
            return None
        self._items.move_to_end(key)
        return item.value

    def set_sync(self, key: str, value: bytes, ttl: float | None = None) -> None:
        check_ttl(ttl)
        now = self._clock()
        self._sweeper.maybe(now)
        self._store(key, value, ttl, now)

    def set_if_absent_sync(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        check_ttl(ttl)
        now = self._clock()
        self._sweeper.maybe(now)
        if self._live(key, now) is not None:
            return False
        return self._store(key, value, ttl, now)

    def _store(self, key: str, value: bytes, ttl: float | None, now: float) -> bool:
        items = self._items
        old = items.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        size = len(key.encode()) + len(value)
        if size > self.max_bytes:
            return False
        while self.bytes + size > self.max_bytes:
            _, evicted = items.popitem(last=False)
            self.bytes -= evicted.size
            self.evictions_total += 1
        items[key] = _Item(bytes(value), None if ttl is None else now + ttl, size)
        self.bytes += size
        return True

    def delete_sync(self, key: str) -> bool:
        if self._live(key, self._clock()) is None:
            return False
        self._drop(key)
        return True

    def delete_prefix_sync(self, prefix: str) -> int:
        now = self._clock()
        gone = 0
        for key in [k for k in self._items if k.startswith(prefix)]:
            item = self._items[key]
            if item.deadline is None or item.deadline > now:
                gone += 1
            self._drop(key)
        return gone

    async def get(self, key: str) -> bytes | None:
        return self.get_sync(key)

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        self.set_sync(key, value, ttl)

    async def set_if_absent(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        return self.set_if_absent_sync(key, value, ttl)

    async def delete(self, key: str) -> bool:
        return self.delete_sync(key)

    async def delete_prefix(self, prefix: str) -> int:
        return self.delete_prefix_sync(prefix)


# -- logs ------------------------------------------------------------------------------------------


class _Log:
    __slots__ = ("deadline", "items")

    def __init__(self) -> None:
        self.items: deque[bytes] = deque()
        self.deadline: float | None = None


class MemoryLogs:
    """:class:`~piuptime.state.Logs` in memory (a deque per key)."""

    def __init__(
        self,
        *,
        clock: Clock = time.monotonic,
        sweep_interval: float = 5.0,
        sweep_batch: int = 1000,
    ) -> None:
        self._clock = clock
        self._logs: dict[str, _Log] = {}
        self._sweeper = _Sweeper(self._logs, sweep_interval, sweep_batch)

    def __len__(self) -> int:
        return len(self._logs)

    def sweep(self) -> None:
        self._sweeper.step(self._clock())

    def _live(self, key: str, now: float) -> _Log | None:
        log = self._logs.get(key)
        if log is None:
            return None
        if log.deadline is not None and log.deadline <= now:
            del self._logs[key]
            return None
        return log

    async def append(
        self, key: str, *items: bytes, max_len: int | None = None, ttl: float | None = None
    ) -> int:
        check_ttl(ttl)
        check_max_len(max_len)
        now = self._clock()
        self._sweeper.maybe(now)
        log = self._live(key, now)
        if log is None:
            if not items:
                return 0
            log = self._logs[key] = _Log()
        log.items.extend(bytes(i) for i in items)
        if max_len is not None:
            while len(log.items) > max_len:
                log.items.popleft()
        if ttl is not None:
            log.deadline = now + ttl
        return len(log.items)

    async def range(self, key: str, start: int = 0, stop: int = -1) -> list[bytes]:
        log = self._live(key, self._clock())
        if log is None:
            return []
        bounds = lrange_bounds(len(log.items), start, stop)
        if bounds is None:
            return []
        first, last = bounds
        if first == 0 and last == len(log.items) - 1:
            return list(log.items)
        return list(islice(log.items, first, last + 1))

    async def length(self, key: str) -> int:
        log = self._live(key, self._clock())
        return 0 if log is None else len(log.items)

    async def delete(self, key: str) -> bool:
        return self._live(key, self._clock()) is not None and self._logs.pop(key) is not None


# -- all three -------------------------------------------------------------------------------------


class MemoryStores:
    """The three memory stores together (what ``open_stores("memory")`` returns)."""

    kind = "memory"

    def __init__(
        self,
        *,
        kv_max_bytes: int = 64 * 1024 * 1024,
        clock: Clock = time.monotonic,
    ) -> None:
        self.counters = MemoryCounters(clock=clock)
        self.kv = MemoryKV(kv_max_bytes, clock=clock)
        self.logs = MemoryLogs(clock=clock)

    @property
    def available(self) -> bool:
        return True

    @property
    def failures_total(self) -> int:
        return 0

    async def aclose(self) -> None:
        return None
