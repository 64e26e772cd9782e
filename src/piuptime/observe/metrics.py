"""In-process metrics: counters, gauges and fixed-bucket histograms kept as plain numbers,
rendered at scrape time in the Prometheus text format (``piuptime_`` names).

Hot paths bind a labelled child once (``counter.labels("route-a")``) and call ``inc()`` or
``observe()``: an attribute add (and, for a histogram, one ``bisect``), no look-up, no lock (the
gateway is one event loop). Families are created once per process and survive reloads. A family
may instead, or as well, take a ``read`` callback that yields ``(label values, value)`` at
scrape time, for values kept elsewhere (a store's failure count, a target's state).

See docs/metrics.md for every metric the gateway publishes.
"""

from __future__ import annotations

import itertools
import math
import re
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

Reader = Callable[[], Iterable[tuple[tuple[str, ...], float]]]

#: Latency buckets (seconds) for a gateway, 1-2-5 steps from 0.5 ms (the proxy's own cost on a
#: Pi) to 30 s (a slow upstream, a long LLM answer): 15 bounds plus +Inf.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
)

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


class _Child:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class Counter:
    """A monotonically increasing family of values, one per label combination."""

    kind = "counter"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: tuple[str, ...] = (),
        read: Reader | None = None,
    ) -> None:
        self.name = name
        self.help = help
        self.labelnames = labelnames
        self.children: dict[tuple[str, ...], _Child] = {}
        # values kept elsewhere (a store's failure count), read at scrape time
        self.read = read

    def labels(self, *values: str) -> _Child:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = _Child()
        return child

    def inc(self, *values: str, amount: float = 1.0) -> None:
        self.labels(*values).value += amount

    def value(self, *values: str) -> float:
        child = self.children.get(values)
        return child.value if child is not None else 0.0

    def samples(self) -> Iterable[tuple[str, tuple[str, ...], float]]:
        """``(sample name, label values, value)``; label names from ``sample_labelnames``."""
        name = self.name + ("_total" if self.kind == "counter" else "")
        if self.read is not None:
            for values, v in self.read():
                yield name, values, v
        for values, child in list(self.children.items()):
            yield name, values, child.value

    def sample_labelnames(self, sample: str) -> tuple[str, ...]:
        return self.labelnames


class Gauge(Counter):
    """A value that goes up and down, or one read from a callback at scrape time."""

    kind = "gauge"

    def set(self, *values: str, value: float) -> None:
        self.labels(*values).value = value


class _HistogramChild:
    """One label combination of a histogram: per-bucket counts (not cumulative; the last slot
    is +Inf) and the sum. ``observe`` is one bisect and two adds."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # le is inclusive: a value equal to a bound belongs to that bucket
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)


class Histogram(Counter):
    """Observations counted into fixed buckets: ``_bucket{le}`` (cumulative), ``_sum``,
    ``_count``. No ``read`` callback: the numbers live here."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: tuple[str, ...] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, help, labelnames)
        self.buckets = _check_buckets(name, buckets)
        self._le = (*tuple(_number(b) for b in self.buckets), "+Inf")
        self.hchildren: dict[tuple[str, ...], _HistogramChild] = {}
        self._bucket_labels = (*labelnames, "le")

    def labels(self, *values: str) -> _HistogramChild:  # type: ignore[override]
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        child = self.hchildren.get(values)
        if child is None:
            child = self.hchildren[values] = _HistogramChild(self.buckets)
        return child

    def observe(self, *values: str, value: float) -> None:
        self.labels(*values).observe(value)

    def inc(self, *values: str, amount: float = 1.0) -> None:
        raise TypeError(f"{self.name} is a histogram: observe(), not inc()")

    def value(self, *values: str) -> float:
        """The number of observations (``_count``)."""
        child = self.hchildren.get(values)
        return float(child.count) if child is not None else 0.0

    def samples(self) -> Iterable[tuple[str, tuple[str, ...], float]]:
        bucket, total, count = self.name + "_bucket", self.name + "_sum", self.name + "_count"
        le = self._le
        for values, child in list(self.hchildren.items()):
            counts = list(child.counts)  # a stable copy: render never interleaves a request
            running = 0
            for i, n in enumerate(counts):
                running += n
                yield bucket, (*values, le[i]), float(running)
            yield total, values, child.sum
            yield count, values, float(running)

    def sample_labelnames(self, sample: str) -> tuple[str, ...]:
        return self._bucket_labels if sample.endswith("_bucket") else self.labelnames


class Metrics:
    """The process's metric families, by name."""

    def __init__(self) -> None:
        self.families: dict[str, Counter] = {}

    def counter(
        self,
        name: str,
        help: str,
        labelnames: tuple[str, ...] = (),
        read: Reader | None = None,
    ) -> Counter:
        if name.endswith("_total"):
            raise ValueError(f"counter {name}: leave out _total, the exposition adds it")
        family = self._family(Counter, name, help, labelnames)
        if read is not None:
            family.read = read
        return family

    def gauge(
        self,
        name: str,
        help: str,
        labelnames: tuple[str, ...] = (),
        read: Reader | None = None,
    ) -> Gauge:
        family = self._family(Gauge, name, help, labelnames)
        assert isinstance(family, Gauge)
        if read is not None:
            family.read = read
        return family

    def histogram(
        self,
        name: str,
        help: str,
        labelnames: tuple[str, ...] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        if "le" in labelnames:
            raise ValueError(f"histogram {name}: 'le' is the bucket label, not one to give")
        bounds = _check_buckets(name, buckets)
        family = self._family(Histogram, name, help, labelnames, bounds)
        assert isinstance(family, Histogram)
        if family.buckets != bounds:
            raise ValueError(f"metric {family.name} already exists with other buckets")
        return family

    def _family(
        self,
        cls: type[Counter],
        name: str,
        help: str,
        labelnames: tuple[str, ...],
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> Counter:
        full = name if name.startswith("piuptime_") else f"piuptime_{name}"
        family = self.families.get(full)
        if family is None:
            if not _METRIC_NAME.match(full):
                raise ValueError(f"invalid metric name {full!r}")
            for label in labelnames:
                if not _LABEL_NAME.match(label) or label.startswith("__"):
                    raise ValueError(f"metric {full}: invalid label name {label!r}")
            if len(set(labelnames)) != len(labelnames):
                raise ValueError(f"metric {full}: repeated label name in {labelnames}")
            if cls is Histogram:
                family = Histogram(full, help, labelnames, buckets)
            else:
                family = cls(full, help, labelnames)
            self.families[full] = family
        elif type(family) is not cls or family.labelnames != labelnames:
            raise ValueError(f"metric {full} already exists with another type or labels")
        return family

    def snapshot(self) -> dict[str, dict[str, float]]:
        """``{sample name: {"label=value,...": value}}`` for JSON status pages and tests."""
        out: dict[str, dict[str, float]] = {}
        for family in list(self.families.values()):
            for name, values, v in family.samples():
                names = family.sample_labelnames(name)
                key = ",".join(f"{k}={x}" for k, x in zip(names, values, strict=True))
                out.setdefault(name, {})[key] = v
        return out

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        for family in list(self.families.values()):
            lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            for name, values, v in family.samples():
                if values:
                    names = family.sample_labelnames(name)
                    labels = ",".join(
                        f'{k}="{_escape_label(x)}"' for k, x in zip(names, values, strict=True)
                    )
                    lines.append(f"{name}{{{labels}}} {_number(v)}")
                else:
                    lines.append(f"{name} {_number(v)}")
        return "\n".join(lines) + "\n"


def _check_buckets(name: str, buckets: Sequence[float]) -> tuple[float, ...]:
    bounds = tuple(float(b) for b in buckets)
    if bounds and bounds[-1] == math.inf:
        bounds = bounds[:-1]  # +Inf is always there
    if not bounds:
        raise ValueError(f"histogram {name}: at least one finite bucket bound is needed")
    if any(math.isnan(b) or math.isinf(b) for b in bounds):
        raise ValueError(f"histogram {name}: bucket bounds must be finite numbers")
    if any(a >= b for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"histogram {name}: bucket bounds must increase strictly: {bounds}")
    return bounds


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    if v != v:
        return "NaN"
    if v in (math.inf, -math.inf):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if v == int(v) and abs(v) < 2**53 else repr(v)
