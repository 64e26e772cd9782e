"""Per-target circuit breaker: closed, open, half-open, on the failure ratio over a sliding window.

- **closed**: attempts flow. Outcomes are counted in a time-bucketed sliding window; once the
  window holds at least ``min_requests`` outcomes and the failure ratio reaches
  ``failure_ratio``, the breaker opens.
- **open**: ``allow()`` answers False at once (the proxy moves to another target or answers 503
  with ``Retry-After: retry_after()``). After ``open_for`` it becomes half-open. Each time it
  re-opens without having closed in between, ``open_for`` doubles, up to ``max_open_for``.
- **half-open**: at most ``half_open_probes`` attempts may be in flight. ``half_open_probes``
  consecutive successes close it (with a fresh window); any failure opens it again.

Every ``allow()`` that returned True must be followed by exactly one ``record(ok)`` or
``release()`` (an attempt abandoned without an outcome), so half-open probe slots are never lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    __slots__ = (
        "_bucket_len",
        "_bucket_start",
        "_buckets_fail",
        "_buckets_total",
        "_clock",
        "_current_open_for",
        "_half_open_ok",
        "_opened_at",
        "_probes",
        "failure_ratio",
        "half_open_probes",
        "max_open_for",
        "min_requests",
        "open_for",
        "opened_total",
        "state",
    )

    def __init__(
        self,
        *,
        window: float = 10.0,
        buckets: int = 10,
        min_requests: int = 20,
        failure_ratio: float = 0.5,
        open_for: float = 5.0,
        max_open_for: float = 60.0,
        half_open_probes: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < failure_ratio <= 1:
            raise ValueError("failure_ratio must be in (0, 1]")
        if buckets < 1 or window <= 0 or min_requests < 1 or half_open_probes < 1:
            raise ValueError("window, buckets, min_requests and half_open_probes must be >= 1")
        self.min_requests = min_requests
        self.failure_ratio = failure_ratio
        self.open_for = open_for
        self.max_open_for = max(max_open_for, open_for)
        self.half_open_probes = half_open_probes
        self.state: State = "closed"
        self.opened_total = 0
        self._clock = clock
        self._bucket_len = window / buckets
        self._buckets_total = [0] * buckets
        self._buckets_fail = [0] * buckets
        self._bucket_start = 0.0  # start time of the newest bucket
        self._opened_at = 0.0
        self._current_open_for = open_for
        self._probes = 0
        self._half_open_ok = 0

    # -- queries ---------------------------------------------------------------------------------

    def allow(self) -> bool:
        """May an attempt go to this target now? True reserves a probe slot when half-open."""
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            if self._clock() - self._opened_at < self._current_open_for:
                return False
            self.state = "half_open"
            self._probes = 0
            self._half_open_ok = 0
        if self._probes >= self.half_open_probes:
            return False
        self._probes += 1
        return True

    def retry_after(self) -> float:
        """Seconds until the breaker will admit a probe again (0 when it admits now)."""
        if self.state != "open":
            return 0.0
        return max(0.0, self._opened_at + self._current_open_for - self._clock())

    def window_counts(self) -> tuple[int, int]:
        """(outcomes, failures) currently in the sliding window."""
        self._roll(self._clock())
        return sum(self._buckets_total), sum(self._buckets_fail)

    # -- outcomes --------------------------------------------------------------------------------

    def record(self, ok: bool) -> None:
        """The outcome of an attempt that ``allow()`` let through."""
        if self.state == "half_open":
            self._probes = max(0, self._probes - 1)
            if not ok:
                self._open(escalate=True)
                return
            self._half_open_ok += 1
            if self._half_open_ok >= self.half_open_probes:
                self._close()
            return
        if self.state == "open":
            return  # a straggler from before it opened
        now = self._clock()
        self._roll(now)
        self._buckets_total[-1] += 1
        if not ok:
            self._buckets_fail[-1] += 1
            total = sum(self._buckets_total)
            if total >= self.min_requests and sum(self._buckets_fail) >= self.failure_ratio * total:
                self._open(escalate=False)

    def release(self) -> None:
        """An allowed attempt ended without an outcome (cancelled): free its probe slot."""
        if self.state == "half_open" and self._probes > 0:
            self._probes -= 1

    # -- transitions -----------------------------------------------------------------------------

    def _open(self, *, escalate: bool) -> None:
        if escalate:
            self._current_open_for = min(self._current_open_for * 2, self.max_open_for)
        else:
            self._current_open_for = self.open_for
        self.state = "open"
        self._opened_at = self._clock()
        self.opened_total += 1
        self._probes = 0

    def _close(self) -> None:
        self.state = "closed"
        self._current_open_for = self.open_for
        n = len(self._buckets_total)
        self._buckets_total = [0] * n
        self._buckets_fail = [0] * n
        self._bucket_start = self._clock()

    def _roll(self, now: float) -> None:
        """Advance the window so its newest bucket covers ``now``; drop expired buckets."""
        elapsed = now - self._bucket_start
        if elapsed < self._bucket_len:
            return
        steps = int(elapsed // self._bucket_len)
        n = len(self._buckets_total)
        if steps >= n:
            self._buckets_total = [0] * n
            self._buckets_fail = [0] * n
        else:
            self._buckets_total = self._buckets_total[steps:] + [0] * steps
            self._buckets_fail = self._buckets_fail[steps:] + [0] * steps
        self._bucket_start += steps * self._bucket_len
