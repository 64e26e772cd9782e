"""The metric registry and its exposition, checked with prometheus_client's own parser; the
request observer fed entries directly; process metrics; the Grafana dashboard against
docs/metrics.md."""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from piuptime.observe.metrics import LATENCY_BUCKETS, Metrics
from piuptime.observe.process import register_process_metrics
from piuptime.observe.requestmetrics import RequestMetrics, status_class

ROOT = Path(__file__).resolve().parents[2]

Key = tuple[str, frozenset[tuple[str, str]]]


class Scrape:
    """One parsed exposition: every sample by (name, labels), and each family's type."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: dict[Key, float] = {}
        self.order: list[tuple[str, dict[str, str], float]] = []
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for s in family.samples:
                key = (s.name, frozenset(s.labels.items()))
                assert key not in self.samples, f"duplicate sample {key}"
                self.samples[key] = s.value
                self.order.append((s.name, dict(s.labels), s.value))

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(labels, v) for n, labels, v in self.order if n == name]

    def total(self, name: str, **match: str) -> float:
        return sum(
            v
            for labels, v in self.series(name)
            if all(labels.get(k) == x for k, x in match.items())
        )

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        """``[(le, cumulative count)]`` in exposition order."""
        out = []
        for got, v in self.series(name + "_bucket"):
            rest = {k: x for k, x in got.items() if k != "le"}
            if rest == labels:
                out.append((float(got["le"]), v))
        return out


def check_histogram(scrape: Scrape, name: str, **labels: str) -> float:
    """Buckets cumulative and ending in +Inf == _count; returns the count."""
    assert scrape.types[name] == "histogram"
    buckets = scrape.buckets(name, **labels)
    assert [le for le, _ in buckets] == [*LATENCY_BUCKETS, math.inf]
    counts = [c for _, c in buckets]
    assert counts == sorted(counts), f"{name}{labels} buckets not cumulative: {counts}"
    count = scrape.value(name + "_count", **labels)
    assert count is not None and counts[-1] == count
    assert (scrape.value(name + "_sum", **labels) or 0.0) >= 0.0
    return count


# -- the registry ---------------------------------------------------------------------------


def test_histogram_buckets_are_inclusive_cumulative_and_parse() -> None:
    m = Metrics()
    h = m.histogram("test_seconds", "A test histogram.", ("route",), buckets=(0.1, 1.0, 10.0))
    child = h.labels("a")
    for v in (0.05, 0.1, 0.5, 1.0, 3.0, 10.0, 11.0, 1e9):
        child.observe(v)
    h.observe("b", value=0.0)
    s = Scrape(m.render())
    assert s.types["piuptime_test_seconds"] == "histogram"
    assert s.buckets("piuptime_test_seconds", route="a") == [
        (0.1, 2.0),  # 0.05 and 0.1 itself: le is inclusive
        (1.0, 4.0),
        (10.0, 6.0),
        (math.inf, 8.0),
    ]
    assert s.value("piuptime_test_seconds_count", route="a") == 8
    assert s.value("piuptime_test_seconds_sum", route="a") == pytest.approx(
        0.05 + 0.1 + 0.5 + 1.0 + 3.0 + 10.0 + 11.0 + 1e9
    )
    assert s.buckets("piuptime_test_seconds", route="b") == [
        (0.1, 1.0),
        (1.0, 1.0),
        (10.0, 1.0),
        (math.inf, 1.0),
    ]
    assert h.value("a") == 8.0 and h.value("nobody") == 0.0
    snap = m.snapshot()
    assert snap["piuptime_test_seconds_bucket"]["route=a,le=+Inf"] == 8
    assert snap["piuptime_test_seconds_count"] == {"route=a": 8, "route=b": 1}
    # the same family again is the same object; other buckets are refused
    assert m.histogram("test_seconds", "x", ("route",), buckets=(0.1, 1.0, 10.0)) is h
    with pytest.raises(ValueError, match="other buckets"):
        m.histogram("test_seconds", "x", ("route",), buckets=(0.1, 1.0))


def test_default_buckets_span_half_a_millisecond_to_thirty_seconds() -> None:
    assert LATENCY_BUCKETS[0] == 0.0005 and LATENCY_BUCKETS[-1] == 30.0
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))
    h = Metrics().histogram("t", "t")
    assert h.buckets == LATENCY_BUCKETS


@pytest.mark.parametrize(
    ("buckets", "message"),
    [
        ((), "at least one finite bucket"),
        ((math.inf,), "at least one finite bucket"),
        ((1.0, 1.0), "increase strictly"),
        ((2.0, 1.0), "increase strictly"),
        ((1.0, math.nan), "finite"),
    ],
)
def test_bad_buckets_are_refused(buckets: tuple[float, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Metrics().histogram("t", "t", buckets=buckets)


def test_bad_names_and_misuse_are_refused() -> None:
    m = Metrics()
    with pytest.raises(ValueError, match="invalid metric name"):
        m.counter("bad-name", "x")
    with pytest.raises(ValueError, match="invalid label name"):
        m.counter("things", "x", ("route-name",))
    with pytest.raises(ValueError, match="invalid label name"):
        m.gauge("things", "x", ("__reserved",))
    with pytest.raises(ValueError, match="repeated label"):
        m.gauge("things", "x", ("a", "a"))
    with pytest.raises(ValueError, match="leave out _total"):
        m.counter("things_total", "x")
    with pytest.raises(ValueError, match="'le' is the bucket label"):
        m.histogram("things_seconds", "x", ("le",))
    m.counter("things", "x", ("route",))
    with pytest.raises(ValueError, match="another type or labels"):
        m.gauge("things", "x", ("route",))
    with pytest.raises(ValueError, match="another type or labels"):
        m.counter("things", "x", ("other",))
    h = m.histogram("things_seconds", "x", ("route",))
    with pytest.raises(ValueError, match="takes labels"):
        h.labels()
    with pytest.raises(TypeError, match="observe"):
        h.inc("a")


def test_label_values_and_help_are_escaped() -> None:
    m = Metrics()
    weird = ['quote " in', "back\\slash", "new\nline", 'all \\" \n', "", "ünïcode ✓"]
    family = m.counter("escaped", 'Help with \\ and\na newline and "quotes".', ("v",))
    for i, value in enumerate(weird):
        family.labels(value).inc(i + 1)
    m.histogram("escaped_seconds", "h", ("v",)).labels(weird[0]).observe(0.001)
    m.gauge("escaped_level", "g", ("v",), read=lambda: [((weird[2],), 2.5)])
    text = m.render()
    s = Scrape(text)
    for i, value in enumerate(weird):
        assert s.value("piuptime_escaped_total", v=value) == i + 1
    assert s.value("piuptime_escaped_seconds_count", v=weird[0]) == 1
    assert s.value("piuptime_escaped_level", v=weird[2]) == 2.5
    help_line = next(x for x in text.splitlines() if x.startswith("# HELP piuptime_escaped "))
    assert help_line == '# HELP piuptime_escaped Help with \\\\ and\\na newline and "quotes".'


def test_numbers_render_like_prometheus() -> None:
    m = Metrics()
    g = m.gauge("numbers", "n", ("k",))
    values = {"int": 3.0, "frac": 0.25, "big": 2.0**60, "inf": math.inf, "ninf": -math.inf}
    for k, v in values.items():
        g.set(k, value=v)
    g.set("nan", value=math.nan)
    s = Scrape(m.render())
    for k, v in values.items():
        assert s.value("piuptime_numbers", k=k) == v
    assert math.isnan(s.value("piuptime_numbers", k="nan") or 0.0)
    assert 'piuptime_numbers{k="int"} 3\n' in s.text
    assert 'piuptime_numbers{k="inf"} +Inf\n' in s.text


def test_existing_counter_and_gauge_api_still_works() -> None:
    m = Metrics()
    c = m.counter("hits", "Hits.", ("route",))
    child = c.labels("r")
    child.inc()
    child.inc(2)
    c.inc("s")
    store = {"failures": 7}
    m.counter("fails", "F.", read=lambda: [((), float(store["failures"]))])
    m.gauge("up", "Up.").set(value=1)
    s = Scrape(m.render())
    assert s.types["piuptime_hits"] == "counter"
    assert s.value("piuptime_hits_total", route="r") == 3
    assert s.value("piuptime_hits_total", route="s") == 1
    assert s.value("piuptime_fails_total") == 7
    assert s.value("piuptime_up") == 1
    assert c.value("r") == 3


# -- the request observer, fed entries directly ----------------------------------------------


def entry(route: str | None, status: int, consumer: str | None = None, **kw: float) -> dict:
    base = {"total_ms": 2.0, "upstream_ms": 1.5, "gateway_ms": 0.5, "attempts": 1}
    return {"route": route, "status": status, "consumer": consumer, **base, **kw}


def test_status_classes() -> None:
    assert [status_class(s) for s in (101, 200, 204, 301, 404, 499, 500, 599)] == [
        "1xx",
        "2xx",
        "2xx",
        "3xx",
        "4xx",
        "4xx",
        "5xx",
        "5xx",
    ]
    assert status_class(0) == "other" and status_class(600) == "other"


def test_request_observer_counts_and_times() -> None:
    m = Metrics()
    observe = RequestMetrics(m)
    observe(entry("api", 200, "alice", total_ms=0.4, gateway_ms=0.1, upstream_ms=0.3))
    observe(entry("api", 201, "alice", total_ms=3.0, gateway_ms=1.0, upstream_ms=2.0))
    observe(entry("api", 503, None, total_ms=40.0, gateway_ms=40.0, upstream_ms=0.0, attempts=0))
    observe(entry(None, 404, None, total_ms=0.2, gateway_ms=0.2, upstream_ms=0.0, attempts=0))
    observe(entry("api", 0, None))  # nothing sent (the client went away)
    observe.refused(400)
    observe.refused(431)
    s = Scrape(m.render())
    req = "piuptime_requests_total"
    assert s.value(req, route="api", status_class="2xx", consumer="alice") == 2
    assert s.value(req, route="api", status_class="5xx", consumer="") == 1
    assert s.value(req, route="api", status_class="other", consumer="") == 1
    assert s.value(req, route="", status_class="4xx", consumer="") == 3  # 404 + two refused
    assert len(s.series(req)) == 4
    assert check_histogram(s, "piuptime_request_duration_seconds", route="api") == 4
    assert check_histogram(s, "piuptime_gateway_overhead_seconds", route="api") == 4
    # only requests that reached a target have an upstream time
    assert check_histogram(s, "piuptime_upstream_duration_seconds", route="api") == 3
    assert check_histogram(s, "piuptime_request_duration_seconds", route="") == 1
    assert check_histogram(s, "piuptime_upstream_duration_seconds", route="") == 0
    assert s.value("piuptime_request_duration_seconds_sum", route="api") == pytest.approx(0.0454)
    assert s.value("piuptime_upstream_duration_seconds_sum", route="api") == pytest.approx(0.0038)
    assert s.buckets("piuptime_request_duration_seconds", route="api")[:3] == [
        (0.0005, 1.0),  # 0.4 ms
        (0.001, 1.0),
        (0.002, 2.0),  # 2 ms (the entry(..., 0) default) is le 0.002
    ]
    # children are bound once and reused
    assert len(observe._counts) == 4 and len(observe._timers) == 2


def test_record_takes_seconds_and_derives_the_overhead() -> None:
    m = Metrics()
    metrics = RequestMetrics(m)
    metrics.record("api", 204, "bob", 0.010, 0.0075, 2)
    metrics.record("api", 429, "bob", 0.0004, 0.0, 0)
    s = Scrape(m.render())
    assert s.value("piuptime_requests_total", route="api", status_class="2xx", consumer="bob") == 1
    assert s.value("piuptime_requests_total", route="api", status_class="4xx", consumer="bob") == 1
    assert s.value("piuptime_gateway_overhead_seconds_sum", route="api") == pytest.approx(0.0029)
    assert s.value("piuptime_upstream_duration_seconds_sum", route="api") == pytest.approx(0.0075)
    assert s.value("piuptime_upstream_duration_seconds_count", route="api") == 1
    assert s.buckets("piuptime_gateway_overhead_seconds", route="api")[:3] == [
        (0.0005, 1.0),
        (0.001, 1.0),
        (0.002, 1.0),
    ]


# -- process metrics --------------------------------------------------------------------------


def test_process_metrics_are_present_and_sane() -> None:
    m = Metrics()
    register_process_metrics(m, "9.9.9")
    register_process_metrics(m, "9.9.9")  # idempotent
    sum(range(200_000))  # some CPU
    s = Scrape(m.render())
    now = time.time()
    cpu = s.value("piuptime_process_cpu_seconds_total")
    assert cpu is not None and 0 < cpu < time.process_time() + 1
    rss = s.value("piuptime_process_resident_memory_bytes")
    vms = s.value("piuptime_process_virtual_memory_bytes")
    assert rss is not None and vms is not None and 5 * 2**20 < rss <= vms
    fds = s.value("piuptime_process_open_fds")
    assert (
        fds is not None
        and fds >= 3
        and fds == pytest.approx(len(os.listdir("/proc/self/fd")), abs=2)
    )
    max_fds = s.value("piuptime_process_max_fds")
    assert max_fds is not None and max_fds >= fds
    start = s.value("piuptime_process_start_time_seconds")
    assert start is not None and now - 3600 < start <= now
    assert (s.value("piuptime_process_threads") or 0) >= 1
    gens = s.series("piuptime_python_gc_collections_total")
    assert [labels["generation"] for labels, _ in gens] == ["0", "1", "2"]
    assert gens[0][1] >= 0
    assert len(s.series("piuptime_python_gc_objects_collected_total")) == 3
    ((labels, value),) = s.series("piuptime_build_info")
    assert labels["version"] == "9.9.9" and labels["python"].count(".") == 2 and value == 1


# -- the Grafana dashboard against the docs ---------------------------------------------------


def documented_metrics() -> set[str]:
    """Metric names in docs/metrics.md's tables (first column, in backticks)."""
    text = (ROOT / "docs" / "metrics.md").read_text()
    names = set(re.findall(r"^\|\s*`(piuptime_[a-z0-9_]+)`", text, re.MULTILINE))
    assert len(names) > 30, names
    return names


def dashboard_exprs() -> list[str]:
    """Every PromQL expression: each panel's targets and each query variable."""
    board = json.loads((ROOT / "deploy" / "grafana" / "piuptime.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
            assert var["query"]["query"] == var["definition"]
    return exprs


def base_name(sample: str, documented: set[str]) -> str:
    if sample in documented:
        return sample
    for suffix in ("_bucket", "_sum", "_count"):
        if sample.endswith(suffix) and sample[: -len(suffix)] in documented:
            return sample[: -len(suffix)]
    return sample


def test_grafana_dashboard_loads_and_uses_only_documented_metrics() -> None:
    board = json.loads((ROOT / "deploy" / "grafana" / "piuptime.json").read_text())
    assert board["title"] and board["uid"] and board["panels"]
    assert board["templating"]["list"], "a datasource variable at least"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    documented = documented_metrics()
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    used = set()
    for expr in exprs:
        names = re.findall(r"\bpiuptime_[a-z0-9_]+", expr)
        assert names, f"no piuptime metric in {expr!r}"
        for name in names:
            base = base_name(name, documented)
            assert base in documented, f"{name} (in {expr!r}) is not in docs/metrics.md"
            used.add(base)
        assert expr.count("(") == expr.count(")"), expr
        assert expr.count("{") == expr.count("}"), expr
    # the panels the issue asks for
    for wanted in (
        "piuptime_requests_total",
        "piuptime_request_duration_seconds",
        "piuptime_upstream_duration_seconds",
        "piuptime_gateway_overhead_seconds",
        "piuptime_target_healthy",
        "piuptime_target_breaker_state",
        "piuptime_target_in_flight",
        "piuptime_ratelimit_rejections_total",
        "piuptime_auth_rejections_total",
        "piuptime_cache_requests_total",
        "piuptime_config_reloads_total",
        "piuptime_redis_up",
        "piuptime_process_resident_memory_bytes",
        "piuptime_process_cpu_seconds_total",
    ):
        assert wanted in used, wanted
