"""Load balancers: choose which target of an upstream gets the next request.

A balancer only chooses an *index* into the upstream's target list; it knows nothing of
connections, health or URLs.  The caller passes the indexes it must not use right now — targets
that are down, ejected by passive health checks, or already tried by this request's retries —
and gets back another index, or ``None`` when nothing is left.

:class:`LoadBalancer` is the shape every strategy offers (``round_robin`` here; ``least_conn``,
``ewma`` and ``hash`` are siblings with the same ``pick``).  :class:`Balancer` is smooth weighted
round-robin, nginx's algorithm (``ngx_http_upstream_get_peer``).
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import time
from collections.abc import Callable, Container, Sequence
from typing import Protocol, runtime_checkable

__all__ = [
    "Balancer",
    "HashRing",
    "LeastConn",
    "LoadBalancer",
    "PeakEwma",
    "make_balancer",
]


@runtime_checkable
class LoadBalancer(Protocol):
    """What the proxy needs from any balancing strategy.

    ``pick`` chooses; ``started``/``finished`` report each attempt's life so stateful strategies
    (least connections, latency, bounded-load hashing) see the load they create; ``key`` is the
    hash key for ``hash`` and ignored by the others. ``set_factor`` scales one target's weight
    (0 < factor <= 1) for slow start after it recovers.
    """

    def pick(self, exclude: Container[int] = (), key: bytes | None = None) -> int | None:
        """Index of the target for the next attempt, skipping ``exclude``; None if none is left."""
        ...

    def started(self, index: int) -> None:
        """An attempt was sent to ``index``."""
        ...

    def finished(self, index: int, latency: float | None) -> None:
        """That attempt ended; ``latency`` in seconds to the response head, None if it failed."""
        ...

    def set_factor(self, index: int, factor: float) -> None:
        """Scale the weight of ``index`` (slow start); 1.0 is its full weight."""
        ...


class Balancer:
    """Smooth weighted round-robin (nginx): spreads picks evenly, in proportion to the weights.

    Every pick adds each eligible target's weight to its running ``current`` value, chooses the
    largest (the first on ties) and subtracts the eligible total from the chosen one.  Over any
    ``sum(weights)`` consecutive picks with the same exclusions each target is chosen exactly
    ``weight`` times, interleaved rather than in bursts: weights ``[5, 1, 1]`` give
    ``a a b a c a a``.

    Excluded targets are skipped without touching their ``current`` value, as nginx does for
    down or already-tried peers.  A weight of 0 means "only when every weighted target is
    excluded"; negative weights are rejected.  With no targets, ``pick`` returns None.
    """

    __slots__ = ("_current", "_effective", "_factors", "_indexes", "_total", "weights")

    def __init__(self, weights: Sequence[int]) -> None:
        ws = _check_weights(weights)
        self.weights: tuple[int, ...] = ws
        self._effective: list[float] | tuple[int, ...] = ws
        self._factors = [1.0] * len(ws)
        self._current: list[float] = [0.0] * len(ws)
        self._total: float = sum(ws)
        self._indexes = tuple(range(len(ws)))

    def __len__(self) -> int:
        return len(self.weights)

    def started(self, index: int) -> None:
        """Round-robin keeps no per-attempt state."""

    def finished(self, index: int, latency: float | None) -> None:
        """Round-robin keeps no per-attempt state."""

    def set_factor(self, index: int, factor: float) -> None:
        """Scale one target's weight (slow start); all factors 1.0 restores the plain weights."""
        self._factors[index] = _clamp_factor(factor)
        if all(f == 1.0 for f in self._factors):
            self._effective = self.weights
        else:
            self._effective = [w * f for w, f in zip(self.weights, self._factors, strict=True)]
        self._total = sum(self._effective)

    def pick(self, exclude: Container[int] = (), key: bytes | None = None) -> int | None:
        """Index of the next target, never one in ``exclude``; None when all are excluded."""
        current = self._current
        weights = self._effective
        best = -1
        best_cw = 0.0
        if not exclude:
            # Fast path: everyone is eligible, the total is known.
            for i in self._indexes:
                cw = current[i] + weights[i]
                current[i] = cw
                if best < 0 or cw > best_cw:
                    best = i
                    best_cw = cw
            if best >= 0:
                current[best] = best_cw - self._total
                return best
            return None
        total = 0.0
        for i in self._indexes:
            if i in exclude:
                continue
            w = weights[i]
            cw = current[i] + w
            current[i] = cw
            total += w
            if best < 0 or cw > best_cw:
                best = i
                best_cw = cw
        if best < 0:
            return None
        current[best] = best_cw - total
        return best


def _check_weights(weights: Sequence[int]) -> tuple[int, ...]:
    ws = tuple(int(w) for w in weights)
    for i, w in enumerate(ws):
        if w < 0:
            raise ValueError(f"target {i}: weight must be >= 0, got {w}")
    return ws


def _clamp_factor(factor: float) -> float:
    if not factor > 0:
        return 0.01
    return min(1.0, factor)


class _Stateful:
    """Shared state of the load-aware strategies: weights, slow-start factors, in-flight counts."""

    __slots__ = ("_factors", "_indexes", "in_flight", "weights")

    def __init__(self, weights: Sequence[int]) -> None:
        self.weights = _check_weights(weights)
        self._factors = [1.0] * len(self.weights)
        self._indexes = tuple(range(len(self.weights)))
        self.in_flight = [0] * len(self.weights)

    def __len__(self) -> int:
        return len(self.weights)

    def set_factor(self, index: int, factor: float) -> None:
        self._factors[index] = _clamp_factor(factor)

    def started(self, index: int) -> None:
        self.in_flight[index] += 1

    def finished(self, index: int, latency: float | None) -> None:
        if self.in_flight[index] > 0:
            self.in_flight[index] -= 1

    def _weight(self, index: int) -> float:
        """Effective weight; a weight-0 target counts as a tiny weight (used only as last)."""
        w = self.weights[index] * self._factors[index]
        return w if w > 0 else 1e-6


class LeastConn(_Stateful):
    """Weighted least connections, as nginx's ``least_conn``: the target with the fewest
    in-flight attempts per unit of weight; ties (for example when nothing is in flight) are
    broken by smooth weighted round-robin among the tied targets, so short requests still follow
    the weights."""

    __slots__ = ("_current",)

    def __init__(self, weights: Sequence[int]) -> None:
        super().__init__(weights)
        self._current = [0.0] * len(self.weights)

    def pick(self, exclude: Container[int] = (), key: bytes | None = None) -> int | None:
        in_flight = self.in_flight
        tied: list[int] = []
        best_cost = 0.0
        for i in self._indexes:
            if i in exclude:
                continue
            cost = in_flight[i] / self._weight(i)
            if not tied or cost < best_cost - 1e-12:
                tied = [i]
                best_cost = cost
            elif abs(cost - best_cost) <= 1e-12:
                tied.append(i)
        if not tied:
            return None
        if len(tied) == 1:
            return tied[0]
        current = self._current
        total = 0.0
        best = -1
        for i in tied:
            w = self._weight(i)
            current[i] += w
            total += w
            if best < 0 or current[i] > current[best]:
                best = i
        current[best] -= total
        return best


class PeakEwma(_Stateful):
    """Peak-EWMA latency with the power of two random choices (Finagle, Linkerd).

    Each target keeps a moving average of its response-head latency that jumps up at once on a
    slow answer (the *peak*) and decays towards new samples with time constant ``tau``; idle time
    decays it too, so a target that was slow gets tried again. A pick draws two distinct
    eligible targets at random and takes the one with the lower ``ewma * (in_flight + 1) /
    weight``. Targets with no sample yet cost ``default_latency``. A failed attempt counts as a
    sample of ``failure_penalty`` seconds.
    """

    __slots__ = ("_clock", "_ewma", "_rng", "_stamp", "default_latency", "failure_penalty", "tau")

    def __init__(
        self,
        weights: Sequence[int],
        *,
        tau: float = 10.0,
        default_latency: float = 0.001,
        failure_penalty: float = 1.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(weights)
        self.tau = tau
        self.default_latency = default_latency
        self.failure_penalty = failure_penalty
        self._ewma: list[float | None] = [None] * len(self.weights)
        self._stamp = [0.0] * len(self.weights)
        self._rng = rng or random.Random()
        self._clock = clock

    def latency(self, index: int) -> float:
        """The decayed average latency of ``index`` right now, in seconds."""
        value = self._ewma[index]
        if value is None:
            return self.default_latency
        idle = self._clock() - self._stamp[index]
        return value * math.exp(-idle / self.tau) if idle > 0 else value

    def finished(self, index: int, latency: float | None) -> None:
        super().finished(index, latency)
        sample = self.failure_penalty if latency is None else latency
        now = self._clock()
        prev = self._ewma[index]
        if prev is None or sample > prev:
            self._ewma[index] = sample  # the peak: react to a slow answer at once
        else:
            w = math.exp(-(now - self._stamp[index]) / self.tau)
            self._ewma[index] = prev * w + sample * (1 - w)
        self._stamp[index] = now

    def _cost(self, index: int) -> float:
        return self.latency(index) * (self.in_flight[index] + 1) / self._weight(index)

    def pick(self, exclude: Container[int] = (), key: bytes | None = None) -> int | None:
        eligible = [i for i in self._indexes if i not in exclude]
        if not eligible:
            return None
        if len(eligible) == 1:
            return eligible[0]
        a, b = self._rng.sample(eligible, 2)
        return a if self._cost(a) <= self._cost(b) else b


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing(_Stateful):
    """Consistent hashing with bounded load (Mirrokni, Thorup, Zadimoghaddam 2016).

    Every target owns ``vnodes * weight / mean weight`` points on a 64-bit ring; a key goes to
    the first target clockwise from its hash. Adding or removing a target moves only the keys
    of the arcs it gains or loses, about 1/N of them. To keep one hot key from melting one
    device, a target already holding more than ``balance_factor`` times its fair share of the
    in-flight attempts is skipped, and the walk continues clockwise to the next one.
    Requests without a key are spread round-robin over the ring's targets.
    """

    __slots__ = ("_hashes", "_owners", "_rr", "balance_factor")

    def __init__(
        self, weights: Sequence[int], *, vnodes: int = 160, balance_factor: float = 1.25
    ) -> None:
        super().__init__(weights)
        if balance_factor < 1.0:
            raise ValueError("balance_factor must be >= 1.0")
        self.balance_factor = balance_factor
        positive = [w for w in self.weights if w > 0]
        mean = sum(positive) / len(positive) if positive else 1.0
        points: list[tuple[int, int]] = []
        for i, w in enumerate(self.weights):
            count = max(1, round(vnodes * max(w, 1) / mean))
            for v in range(count):
                points.append((_hash64(b"%d-%d" % (i, v)), i))
        points.sort()
        self._hashes = [h for h, _ in points]
        self._owners = [o for _, o in points]
        self._rr = 0

    def owner(self, key: bytes) -> int | None:
        """The target ``key`` maps to when nothing is excluded or overloaded."""
        if not self._hashes:
            return None
        pos = bisect.bisect(self._hashes, _hash64(key)) % len(self._hashes)
        return self._owners[pos]

    def _capacity(self, index: int, eligible_weight: float) -> float:
        total = sum(self.in_flight) + 1
        return math.ceil(self.balance_factor * total * self._weight(index) / eligible_weight)

    def pick(self, exclude: Container[int] = (), key: bytes | None = None) -> int | None:
        n = len(self.weights)
        eligible_weight = sum(self._weight(i) for i in self._indexes if i not in exclude)
        if not self._hashes or eligible_weight == 0:
            return None
        if key is None:
            start = self._rr
            self._rr = (self._rr + 1) % len(self._hashes)
        else:
            start = bisect.bisect(self._hashes, _hash64(key))
        owners = self._owners
        size = len(owners)
        fallback = -1
        seen: set[int] = set()
        for k in range(size):
            i = owners[(start + k) % size]
            if i in seen or i in exclude:
                continue
            seen.add(i)
            if fallback < 0:
                fallback = i
            if self.in_flight[i] < self._capacity(i, eligible_weight):
                return i
            if len(seen) == n:
                break
        return fallback if fallback >= 0 else None


def make_balancer(strategy: str, weights: Sequence[int], **options: object) -> LoadBalancer:
    """A balancer by its config name: round_robin, least_conn, ewma or hash."""
    if strategy == "round_robin":
        return Balancer(weights)
    if strategy == "least_conn":
        return LeastConn(weights)
    if strategy == "ewma":
        return PeakEwma(weights, **options)  # type: ignore[arg-type]
    if strategy == "hash":
        return HashRing(weights, **options)  # type: ignore[arg-type]
    raise ValueError(f"unknown balance strategy {strategy!r}")
