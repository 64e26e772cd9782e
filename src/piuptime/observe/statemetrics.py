"""Scrape-time metrics of the gateway's state: config reloads and every upstream target.

Nothing here runs per request: each family has a ``read`` callback that walks the *current*
runtime (``get_runtime()``, swapped on reload) when ``/metrics`` is scraped. The numbers are the
plain attributes the proxy already keeps on ``UpstreamRuntime`` and ``Target``. An upstream whose
config changes on reload is rebuilt, so its counters start again from 0 (Prometheus' ``rate()``
treats that as a counter reset); unchanged upstreams carry their counters over.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from piuptime.observe.metrics import Metrics

if TYPE_CHECKING:
    from piuptime.gateway.runtime import Runtime, Target, UpstreamRuntime

__all__ = ["BREAKER_STATES", "register_reload_metrics", "register_upstream_metrics"]

BREAKER_STATES = ("closed", "open", "half_open")

Samples = list[tuple[tuple[str, ...], float]]


class ReloadCounts(Protocol):
    """What ``piuptime.app.ReloadStats`` offers."""

    @property
    def succeeded(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def last_success(self) -> float | None: ...
    @property
    def last_error_time(self) -> float | None: ...


def register_reload_metrics(metrics: Metrics, reloads: ReloadCounts, loaded_at: float) -> None:
    """Reload counters and times; ``loaded_at`` is when the configuration was first loaded
    (the start), which counts as the last success until a reload succeeds."""

    def counts() -> Samples:
        return [(("success",), float(reloads.succeeded)), (("failure",), float(reloads.failed))]

    def last_success() -> Samples:
        t = reloads.last_success
        return [((), t if t is not None else loaded_at)]

    def last_ok() -> Samples:
        ok, failed = reloads.last_success, reloads.last_error_time
        return [((), 0.0 if failed is not None and (ok is None or failed > ok) else 1.0)]

    metrics.counter(
        "config_reloads",
        "Configuration reloads (file change, SIGHUP, admin) by result: success or failure "
        "(an invalid config changes nothing)",
        ("result",),
        read=counts,
    )
    metrics.gauge(
        "config_last_reload_success_timestamp_seconds",
        "Unix time the running configuration was loaded (the last successful reload, or the start)",
        read=last_success,
    )
    metrics.gauge(
        "config_last_reload_successful",
        "1 when the last reload attempt succeeded (or none was made), 0 when it was rejected",
        read=last_ok,
    )


def register_upstream_metrics(metrics: Metrics, get_runtime: Callable[[], Runtime | None]) -> None:
    """Per-target and per-upstream families, read from ``get_runtime()`` at scrape time."""

    def targets() -> Iterator[tuple[UpstreamRuntime, Target]]:
        runtime = get_runtime()
        if runtime is None:
            return
        for upstream in list(runtime.upstreams.values()):
            for t in upstream.targets:
                yield upstream, t

    def upstreams() -> Iterator[UpstreamRuntime]:
        runtime = get_runtime()
        if runtime is not None:
            yield from list(runtime.upstreams.values())

    def ejected(u: UpstreamRuntime, t: Target) -> bool:
        return u.outlier is not None and u.outlier.is_ejected(t.index)

    def healthy() -> Samples:
        return [
            ((u.name, t.label), 1.0 if t.healthy and not ejected(u, t) else 0.0)
            for u, t in targets()
        ]

    def ejected_now() -> Samples:
        return [((u.name, t.label), 1.0 if ejected(u, t) else 0.0) for u, t in targets()]

    def breaker_state() -> Samples:
        out: Samples = []
        for u, t in targets():
            b = t.breaker
            if b is None:
                state = "closed"
            elif b.state == "open" and b.retry_after() == 0:
                state = "half_open"  # it admits probes now (as /status says)
            else:
                state = b.state
            for s in BREAKER_STATES:
                out.append(((u.name, t.label, s), 1.0 if s == state else 0.0))
        return out

    def per_target(attr: str) -> Callable[[], Samples]:
        def read() -> Samples:
            return [((u.name, t.label), float(getattr(t, attr))) for u, t in targets()]

        return read

    def breaker_opened() -> Samples:
        return [
            ((u.name, t.label), float(t.breaker.opened_total if t.breaker else 0))
            for u, t in targets()
        ]

    def ewma() -> Samples:
        return [((u.name, t.label), t.ewma) for u, t in targets() if t.ewma is not None]

    def retries() -> Samples:
        return [((u.name,), float(u.retries_total)) for u in upstreams()]

    def denied() -> Samples:
        return [((u.name,), float(u.budget.denied_total)) for u in upstreams()]

    def panic() -> Samples:
        return [((u.name,), 1.0 if u.panic else 0.0) for u in upstreams()]

    m = metrics
    target = ("upstream", "target")
    m.gauge(
        "target_healthy",
        "1 when the target is in service: its active health check passes (or it has none) and "
        "passive outlier detection has not ejected it",
        target,
        read=healthy,
    )
    m.gauge(
        "target_ejected",
        "1 while passive outlier detection keeps the target out (consecutive failures)",
        target,
        read=ejected_now,
    )
    m.gauge(
        "target_breaker_state",
        "Circuit breaker state of the target: 1 for the current state (closed, open, "
        "half_open), 0 for the others; closed when the breaker is disabled",
        (*target, "state"),
        read=breaker_state,
    )
    m.gauge(
        "target_in_flight",
        "Attempts sent to the target and not answered yet",
        target,
        read=per_target("in_flight"),
    )
    m.counter(
        "target_requests",
        "Attempts that reached an outcome at the target (retries count once each)",
        target,
        read=per_target("requests_total"),
    )
    m.counter(
        "target_failures",
        "Attempts that failed at the target (connect error, reset, timeout, 5xx)",
        target,
        read=per_target("failures_total"),
    )
    m.counter(
        "target_ejections",
        "Times passive outlier detection ejected the target",
        target,
        read=per_target("ejections_total"),
    )
    m.counter(
        "target_breaker_opened",
        "Times the target's circuit breaker opened",
        target,
        read=breaker_opened,
    )
    m.gauge(
        "target_latency_ewma_seconds",
        "Moving average of the time to the target's response head (once it answered)",
        target,
        read=ewma,
    )
    m.counter(
        "upstream_retries",
        "Retries made: further attempts of a request after a failed or retryable one",
        ("upstream",),
        read=retries,
    )
    m.counter(
        "upstream_retry_budget_denied",
        "Retries refused because the upstream's retry budget was spent",
        ("upstream",),
        read=denied,
    )
    m.gauge(
        "upstream_panic",
        "1 while too few targets are usable and the upstream spreads load over all of them "
        "(panic threshold)",
        ("upstream",),
        read=panic,
    )
