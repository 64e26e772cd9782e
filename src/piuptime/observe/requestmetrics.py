"""Per-request metrics, recorded in the log phase of the proxy.

``ProxyHandler.request_metrics``: the proxy calls ``record`` once per finished request, in the
log phase (after the answer is on the wire), with plain values: route and consumer names, status,
total and upstream seconds, attempts. It is not a ``ProxyHandler.observers`` entry because those
get the whole access-log entry, whose building costs several times what the metrics do; calling
the object with such an entry (``observer(entry)``) works too. It counts the request by route,
status class and consumer and observes three latency histograms by route:

- ``piuptime_requests_total{route,status_class,consumer}``
- ``piuptime_request_duration_seconds{route}``: head received → answer written (every request)
- ``piuptime_upstream_duration_seconds{route}``: time waiting on targets (requests that reached
  one: ``attempts`` > 0; retries included)
- ``piuptime_gateway_overhead_seconds{route}``: the difference, the gateway's own time (every
  request; for answers made by the gateway, a 404, a 401, a cache hit, it is the whole time)

Label values: ``route=""`` when no route matched (and for requests the wire layer refused:
``refused``), ``consumer=""`` when no consumer was identified. Consumers come from the
configuration, so the series stay bounded by it; a consumer or route renamed by a reload keeps
its old series until restart.

Cost: the labelled children are bound on the first request of each (route, status // 100,
consumer) and kept in a dict keyed by that tuple; then a request is two dict look-ups, one
add and three bisects (``observe`` inlined).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from piuptime.observe.metrics import (
    LATENCY_BUCKETS,
    Histogram,
    Metrics,
    _Child,
    _HistogramChild,
)

__all__ = ["RequestMetrics", "status_class"]


def status_class(status: int) -> str:
    """``"2xx"`` for 200..299 and so on; ``"other"`` outside 100..599 (0: nothing was sent)."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


class RequestMetrics:
    """The log-phase observer that feeds the request counter and the latency histograms."""

    __slots__ = ("_counts", "_timers", "duration", "overhead", "requests", "upstream")

    def __init__(self, metrics: Metrics) -> None:
        self.requests = metrics.counter(
            "requests",
            "Requests answered by the gateway, by route, status class and consumer (route is "
            '"" when no route matched, consumer "" when none was identified)',
            ("route", "status_class", "consumer"),
        )
        self.duration: Histogram = metrics.histogram(
            "request_duration_seconds",
            "Time from the request head received to the answer written, by route",
            ("route",),
            LATENCY_BUCKETS,
        )
        self.upstream: Histogram = metrics.histogram(
            "upstream_duration_seconds",
            "Time spent waiting on upstream targets (all attempts of a request), by route; only "
            "requests that reached a target",
            ("route",),
            LATENCY_BUCKETS,
        )
        self.overhead: Histogram = metrics.histogram(
            "gateway_overhead_seconds",
            "The gateway's own time per request (total minus upstream time), by route",
            ("route",),
            LATENCY_BUCKETS,
        )
        self._counts: dict[tuple[str | None, int, str | None], _Child] = {}
        self._timers: dict[
            str | None, tuple[_HistogramChild, _HistogramChild, _HistogramChild]
        ] = {}

    def record(
        self,
        route: str | None,
        status: int,
        consumer: str | None,
        total: float,
        upstream: float,
        attempts: int,
    ) -> None:
        """One finished request (times in seconds); what the proxy calls in its log phase."""
        key = (route, status // 100, consumer)
        child = self._counts.get(key)
        if child is None:
            child = self._bind_count(key)
        child.value += 1
        timers = self._timers.get(route)
        if timers is None:
            timers = self._bind_timers(route)
        # _HistogramChild.observe, inlined (three method calls are a third of the cost)
        h, up, gw = timers
        h.counts[bisect_left(h.bounds, total)] += 1
        h.sum += total
        v = total - upstream
        gw.counts[bisect_left(gw.bounds, v)] += 1
        gw.sum += v
        if attempts:
            up.counts[bisect_left(up.bounds, upstream)] += 1
            up.sum += upstream

    def __call__(self, entry: dict[str, Any]) -> None:
        """The same from an access-log entry (the ``ProxyHandler.observers`` shape)."""
        self.record(
            entry["route"],
            entry["status"],
            entry["consumer"],
            entry["total_ms"] * 0.001,
            entry["upstream_ms"] * 0.001,
            entry["attempts"],
        )

    def refused(self, status: int) -> None:
        """A request the wire layer answered itself (400, 408, 413, 431, ...): counted with
        ``route=""``; no latency is known for it."""
        key = (None, status // 100, None)
        child = self._counts.get(key)
        if child is None:
            child = self._bind_count(key)
        child.value += 1

    def _bind_count(self, key: tuple[str | None, int, str | None]) -> _Child:
        route, hundreds, consumer = key
        child = self.requests.labels(route or "", status_class(hundreds * 100), consumer or "")
        self._counts[key] = child
        return child

    def _bind_timers(
        self, route: str | None
    ) -> tuple[_HistogramChild, _HistogramChild, _HistogramChild]:
        label = route or ""
        timers = (
            self.duration.labels(label),
            self.upstream.labels(label),
            self.overhead.labels(label),
        )
        self._timers[route] = timers
        return timers
