"""The state interfaces, their result types, and the arithmetic every backend shares.

Three small interfaces, each implemented in memory, in SQLite and in Redis (see ``docs/state.md``):

- :class:`Counters`: atomic counters with expiry, a sliding-window counter, a token bucket and
  concurrency slots (rate limits, budgets, connection limits);
- :class:`KV`: bytes by key with expiry (response cache, idempotency records);
- :class:`Logs`: ordered lists of bytes (conversation history, telemetry buffers).

The four kinds of counter (``incr``, ``window_hit``, ``bucket_take``, ``acquire``) each have their
own key space: ``incr("a")`` and ``window_hit("a", ...)`` do not touch each other. ``KV`` and
``Logs`` are key spaces of their own too.

The window and bucket arithmetic lives here, once, as pure functions; the memory and SQLite
backends call them and the Redis Lua scripts (``state/redis.py``) are a line-by-line transcription.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "KV",
    "BucketResult",
    "Counters",
    "Logs",
    "StateUnavailable",
    "Stores",
    "WindowResult",
    "bucket_step",
    "check_bucket",
    "check_limit",
    "check_max_len",
    "check_ttl",
    "check_window",
    "lrange_bounds",
    "window_step",
]


class StateUnavailable(Exception):
    """The backend cannot be reached now (Redis down, database locked past its timeout, disk full).

    Callers decide whether to fail open (serve anyway) or closed (refuse); the operation may or may
    not have been applied when the error came from a lost connection mid-call.
    """


# Not frozen: a frozen dataclass sets each field through object.__setattr__, several times the
# cost of a plain slots class, and one of these is made per rate-limited request.
@dataclass(slots=True)
class WindowResult:
    allowed: bool
    limit: int
    remaining: int  # hits still allowed now (after this one, when it was counted)
    reset: float  # seconds until the current window ends


@dataclass(slots=True)
class BucketResult:
    allowed: bool
    limit: int  # the bucket's capacity (burst)
    remaining: int  # whole tokens left
    reset: float  # seconds until ``cost`` tokens are available again (0: now; inf: never)


@runtime_checkable
class Counters(Protocol):
    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Atomic add; ``ttl`` is applied when the key is created (later calls keep the expiry).
        Returns the new value."""
        ...

    async def get(self, key: str) -> int:
        """The value of an ``incr`` counter; 0 when absent or expired."""
        ...

    async def window_hit(self, key: str, limit: int, window: float, cost: int = 1) -> WindowResult:
        """Sliding-window counter: two fixed windows, the previous one weighted by the overlap.
        ``estimate = prev * (1 - elapsed / window) + current``; when ``estimate + cost <= limit``
        the hit is counted and allowed, otherwise it is refused and not counted. Atomic."""
        ...

    async def bucket_take(self, key: str, rate: float, burst: int, cost: int = 1) -> BucketResult:
        """Token bucket of capacity ``burst`` refilled at ``rate`` tokens/s (full when new); takes
        ``cost`` tokens when there are that many. Atomic."""
        ...

    async def acquire(self, key: str, limit: int, ttl: float) -> bool:
        """Concurrency slot: when fewer than ``limit`` are held, hold one more and answer True.
        ``ttl`` bounds how long a slot leaked by a crashed holder can count (refreshed by each
        successful acquire)."""
        ...

    async def release(self, key: str) -> None:
        """Give a slot back (never below 0)."""
        ...


@runtime_checkable
class KV(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None: ...

    async def set_if_absent(self, key: str, value: bytes, ttl: float | None = None) -> bool: ...

    async def delete(self, key: str) -> bool: ...

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with ``prefix``; answers how many (live) keys went."""
        ...


@runtime_checkable
class Logs(Protocol):
    async def append(
        self, key: str, *items: bytes, max_len: int | None = None, ttl: float | None = None
    ) -> int:
        """Append at the end; drop the oldest beyond ``max_len``; ``ttl`` (re)sets the whole log's
        expiry. Returns the length after trimming."""
        ...

    async def range(self, key: str, start: int = 0, stop: int = -1) -> list[bytes]:
        """Items ``start..stop`` inclusive, Redis ``LRANGE`` semantics (negatives from the end)."""
        ...

    async def length(self, key: str) -> int: ...

    async def delete(self, key: str) -> bool: ...


class Stores(Protocol):
    """What :func:`piuptime.state.open_stores` returns."""

    @property
    def kind(self) -> str:
        """``"memory"``, ``"sqlite"`` or ``"redis"``."""
        ...

    @property
    def counters(self) -> Counters: ...

    @property
    def kv(self) -> KV: ...

    @property
    def logs(self) -> Logs: ...

    @property
    def available(self) -> bool:
        """False while the backend is known to be unreachable (Redis in back-off)."""
        ...

    @property
    def failures_total(self) -> int:
        """Calls that raised :class:`StateUnavailable` since the stores were opened."""
        ...

    async def aclose(self) -> None: ...


# -- argument checks (the same in every backend) ---------------------------------------------------


def check_ttl(ttl: float | None) -> None:
    if ttl is not None and not ttl > 0:
        raise ValueError(f"ttl must be > 0 seconds or None, got {ttl!r}")


def check_window(limit: int, window: float, cost: int) -> None:
    if limit < 0 or cost < 0:
        raise ValueError("limit and cost must be >= 0")
    if not window > 0:
        raise ValueError(f"window must be > 0 seconds, got {window!r}")


def check_bucket(rate: float, burst: int, cost: int) -> None:
    if not rate > 0 or math.isinf(rate):
        raise ValueError(f"rate must be a finite number > 0 tokens/s, got {rate!r}")
    if burst < 1 or cost < 0:
        raise ValueError("burst must be >= 1 and cost >= 0")


def check_limit(limit: int, ttl: float) -> None:
    if limit < 0:
        raise ValueError("limit must be >= 0")
    check_ttl(ttl)


def check_max_len(max_len: int | None) -> None:
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be >= 1 or None, got {max_len!r}")


# -- the shared arithmetic -------------------------------------------------------------------------


def window_step(
    now: float,
    limit: int,
    window: float,
    cost: int,
    idx: int | None,
    cur: int,
    prev: int,
) -> tuple[bool, int, float, int, int, int, float]:
    """One sliding-window hit on the stored state ``(idx, cur, prev)`` (``idx`` None: no state).

    Windows are aligned on multiples of ``window`` of the backend's clock, so every process reading
    the same clock agrees on them. Returns ``(allowed, remaining, reset, idx, cur, prev,
    expires_at)``: the new state to store, and when it stops mattering (the end of the window
    after the current one).
    """
    new_idx = math.floor(now / window)
    if idx is None or idx < new_idx - 1 or idx > new_idx:
        cur = prev = 0
    elif idx == new_idx - 1:
        prev, cur = cur, 0
    elapsed = min(max(now - new_idx * window, 0.0), window)
    estimate = prev * (1.0 - elapsed / window) + cur
    allowed = estimate + cost <= limit
    if allowed:
        cur += cost
        estimate += cost
    remaining = max(0, math.floor(limit - estimate))
    return allowed, remaining, window - elapsed, new_idx, cur, prev, (new_idx + 2) * window


def bucket_step(
    now: float,
    rate: float,
    burst: int,
    cost: int,
    tokens: float | None,
    ts: float,
) -> tuple[bool, int, float, float, float]:
    """One token-bucket take on the stored state ``(tokens, ts)`` (``tokens`` None: a new, full
    bucket). Returns ``(allowed, remaining, reset, tokens, expires_at)``; ``expires_at`` is when the
    bucket is full again, after which it is the same as absent."""
    if tokens is None:
        level = float(burst)
    else:
        level = min(float(burst), tokens + max(0.0, now - ts) * rate)
    allowed = cost <= level
    if allowed:
        level -= cost
    if level >= cost:
        reset = 0.0
    elif cost > burst:
        reset = math.inf
    else:
        reset = (cost - level) / rate
    return allowed, math.floor(level), reset, level, now + (burst - level) / rate


def lrange_bounds(length: int, start: int, stop: int) -> tuple[int, int] | None:
    """Redis ``LRANGE`` index rules: the inclusive ``(first, last)`` positions, or None if empty."""
    if start < 0:
        start = max(0, length + start)
    if stop < 0:
        stop = length + stop
    stop = min(stop, length - 1)
    if start > stop:
        return None
    return start, stop
