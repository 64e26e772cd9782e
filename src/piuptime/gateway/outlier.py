"""Passive health (outlier detection) and the retry budget of one upstream.

``OutlierDetector`` watches each target's real traffic. ``consecutive_failures`` failed attempts
in a row (connect error, reset, timeout, 5xx) eject the target for ``eject_for`` times its
recent ejection count (capped at ``max_eject_multiplier``), as Envoy does. Never more than
``max_ejected`` of the upstream's targets are out at once (but one target always may be), so a
partial outage cannot become a total one by ejection. An ejection ends by itself when its time is
up, or earlier when an active health check passes. The multiplier falls back by one for every
``eject_for`` a target spends in service.

``RetryBudget`` caps retries at ``ratio`` of the requests seen in a sliding window, with a floor
of ``min_per_second`` so a quiet upstream can still retry; retries can then never multiply load
on an upstream that is already failing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class OutlierDetector:
    __slots__ = (
        "_clock",
        "_consecutive",
        "_multiplier",
        "_served_since",
        "_until",
        "consecutive_failures",
        "eject_for",
        "ejections_total",
        "max_eject_multiplier",
        "max_ejected",
    )

    def __init__(
        self,
        targets: int,
        *,
        consecutive_failures: int = 5,
        eject_for: float = 30.0,
        max_eject_multiplier: int = 10,
        max_ejected: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consecutive_failures = consecutive_failures
        self.eject_for = eject_for
        self.max_eject_multiplier = max_eject_multiplier
        self.max_ejected = max_ejected
        self.ejections_total = 0
        self._clock = clock
        self._consecutive = [0] * targets
        self._multiplier = [0] * targets
        self._until = [0.0] * targets  # 0.0: not ejected
        self._served_since = [clock()] * targets

    def __len__(self) -> int:
        return len(self._until)

    def record(self, index: int, ok: bool) -> bool:
        """One attempt's outcome; True when this failure ejected the target."""
        if ok:
            self._consecutive[index] = 0
            return False
        self._consecutive[index] += 1
        if self._consecutive[index] < self.consecutive_failures or self.is_ejected(index):
            return False
        if not self._may_eject():
            return False
        self._eject(index)
        return True

    def is_ejected(self, index: int) -> bool:
        until = self._until[index]
        if until == 0.0:
            return False
        if self._clock() < until:
            return True
        self._return(index)
        return False

    def ejected(self) -> set[int]:
        """Indexes ejected right now."""
        return {i for i in range(len(self._until)) if self._until[i] and self.is_ejected(i)}

    def ejected_until(self, index: int) -> float | None:
        return self._until[index] if self.is_ejected(index) else None

    def multiplier(self, index: int) -> int:
        """The target's recent ejection count, after decay for time spent in service."""
        self._decay(index)
        return self._multiplier[index]

    def active_check_passed(self, index: int) -> None:
        """An active health check succeeded: end a passive ejection early."""
        if self._until[index]:
            self._return(index)

    def _may_eject(self) -> bool:
        n = len(self._until)
        out = len(self.ejected())
        return out == 0 or out + 1 <= math.floor(self.max_ejected * n)

    def _eject(self, index: int) -> None:
        self._decay(index)
        mult = min(self._multiplier[index] + 1, self.max_eject_multiplier)
        self._multiplier[index] = mult
        self._until[index] = self._clock() + self.eject_for * mult
        self._consecutive[index] = 0
        self.ejections_total += 1

    def _return(self, index: int) -> None:
        self._until[index] = 0.0
        self._consecutive[index] = 0
        self._served_since[index] = self._clock()

    def _decay(self, index: int) -> None:
        if self._until[index] or not self._multiplier[index] or self.eject_for <= 0:
            return
        served = self._clock() - self._served_since[index]
        steps = int(served // self.eject_for)
        if steps:
            self._multiplier[index] = max(0, self._multiplier[index] - steps)
            self._served_since[index] += steps * self.eject_for


class RetryBudget:
    __slots__ = (
        "_bucket_len",
        "_clock",
        "_requests",
        "_retries",
        "_start",
        "denied_total",
        "min_per_second",
        "ratio",
        "window",
    )

    def __init__(
        self,
        ratio: float = 0.2,
        *,
        min_per_second: float = 3.0,
        window: float = 10.0,
        buckets: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self.denied_total = 0
        self._clock = clock
        self._bucket_len = window / buckets
        self._requests = [0] * buckets
        self._retries = [0] * buckets
        self._start = clock()

    def request(self) -> None:
        """A request's first attempt."""
        self._roll()
        self._requests[-1] += 1

    def try_retry(self) -> bool:
        """Take one retry from the budget; False (and counted) when it is spent."""
        self._roll()
        allowed = max(self.min_per_second * self.window, self.ratio * sum(self._requests))
        if sum(self._retries) + 1 > allowed:
            self.denied_total += 1
            return False
        self._retries[-1] += 1
        return True

    def _roll(self) -> None:
        elapsed = self._clock() - self._start
        if elapsed < self._bucket_len:
            return
        steps = int(elapsed // self._bucket_len)
        n = len(self._requests)
        if steps >= n:
            self._requests = [0] * n
            self._retries = [0] * n
        else:
            self._requests = self._requests[steps:] + [0] * steps
            self._retries = self._retries[steps:] + [0] * steps
        self._start += steps * self._bucket_len
