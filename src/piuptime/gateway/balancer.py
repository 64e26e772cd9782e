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

from collections.abc import Container, Sequence
from typing import Protocol, runtime_checkable

__all__ = ["Balancer", "LoadBalancer"]


@runtime_checkable
class LoadBalancer(Protocol):
    """What the proxy needs from any balancing strategy."""

    def pick(self, exclude: Container[int] = ()) -> int | None:
        """Index of the target for the next attempt, skipping ``exclude``; None if none is left."""
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

    __slots__ = ("_current", "_indexes", "_total", "weights")

    def __init__(self, weights: Sequence[int]) -> None:
        ws = tuple(int(w) for w in weights)
        for i, w in enumerate(ws):
            if w < 0:
                raise ValueError(f"target {i}: weight must be >= 0, got {w}")
        self.weights: tuple[int, ...] = ws
        self._current = [0] * len(ws)
        self._total = sum(ws)
        self._indexes = tuple(range(len(ws)))

    def __len__(self) -> int:
        return len(self.weights)

    def pick(self, exclude: Container[int] = ()) -> int | None:
        """Index of the next target, never one in ``exclude``; None when all are excluded."""
        current = self._current
        weights = self.weights
        best = -1
        best_cw = 0
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
        total = 0
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
