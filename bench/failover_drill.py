"""Failover drill: three demo devices behind piuptime under steady load; one device is killed,
then one is stalled, then one flaps. A script, not a test: it prints what a user would see.

    uv run python bench/failover_drill.py                    # all three drills (about 90 s)
    uv run python bench/failover_drill.py --drills kill      # one drill
    uv run python bench/failover_drill.py --load asyncio     # without wrk

Set-up: three ``python -m piuptime.demo.device`` processes and ``python -m piuptime run -c
<tmp config>`` (round robin, ttfb 500ms, one retry under the default 20% budget, active checks
on /healthz every 1 s, passive ejection after 5 failures for 5 s, a breaker per target, an admin
listener, the access log to a file). Load: ``wrk -t1 -c20`` (or, without wrk, 20 asyncio
keep-alive loops) on GET /sensors/..., one load run per drill.

Drills (each starts with every device healthy and serving):

- **kill**: SIGKILL one device (restarted after the drill).
- **stall**: SIGSTOP one device (the kernel still accepts connections, nothing is answered);
  SIGCONT after the drill.
- **flap**: one device down (SIGKILL) ``--flap`` seconds, back up ``--flap`` seconds, twice.

For each drill it prints:

- **detected**: from the fault to the first ``/status`` poll (every 10 ms) showing the target out
  of service (ejected, failing its active check, or its breaker open);
- **traffic stopped**: from the fault to the last attempt the gateway sent to the target before
  its attempt count stayed flat for a second (``requests_total`` in ``/status``);
- **back**: for flaps, from the restart to the target serving again (in ``/status``: in service,
  breaker closed, attempts growing);
- **failed** / **requests**: responses other than 2xx/3xx plus socket errors, out of all the
  requests of the drill's load run, as the load generator saw them;
- **retried**: requests that needed more than one attempt (from the access log);
- **p99** / **max**: per-request latency over the whole run, faults included, from the access
  log (``total_ms``: request head parsed to response written);
- **client p99**: the load generator's own figure. wrk's latency percentiles are built from
  time-based samples, not from every request, so a half-second stall of a few requests shows up
  as hundreds of milliseconds there; the access-log p99 is the per-request one.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import http.client
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness import ROOT, free_port, started, wait_port, wrk

CONFIG = """\
gateway:
  listen: ["127.0.0.1:{port}"]
  access_log: {{path: {log}}}
admin: {{listen: "127.0.0.1:{admin}"}}
upstreams:
  devices:
    balance: round_robin
    targets:
{targets}
    timeouts: {{connect: 1s, ttfb: 500ms, read: 10s, total: 15s}}
    retries: {{attempts: 1, budget: 20%}}
    health:
      active: {{path: /healthz, interval: 1s, timeout: 500ms, healthy_after: 2, unhealthy_after: 2}}
      passive: {{consecutive_failures: 5, eject_for: 5s}}
    breaker: {{window: 10s, min_requests: 20, failure_ratio: 50%, open_for: 5s}}
routes:
  - name: sensors
    match: {{path: /sensors/}}
    upstream: devices
"""


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.environ.get("PIUPTIME_SRC", str(ROOT / "src")))


# -- devices --------------------------------------------------------------------------------


class Device:
    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "piuptime.demo.device"),
                *("--name", self.name, "--port", str(self.port)),
            ],
            env=env(),
            stdout=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


# -- /status, polled in a thread ------------------------------------------------------------


@dataclass(slots=True)
class Seen:
    t: float  # time.monotonic()
    out: bool  # ejected, failing its check, or breaker not closed
    breaker: str
    requests: int  # attempts the gateway made to it (requests_total)


class Watch:
    """Polls ``GET /status`` every 10 ms; keeps a timeline per target url."""

    def __init__(self, admin_port: int) -> None:
        self.port = admin_port
        self.timeline: dict[str, list[Seen]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        while not self._stop.is_set():
            try:
                conn.request("GET", "/status")
                doc = json.loads(conn.getresponse().read())
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                time.sleep(0.01)
                continue
            now = time.monotonic()
            for up in doc["upstreams"].values():
                for t in up["targets"]:
                    out = bool(t["ejected"]) or not t["healthy"] or t["breaker"] != "closed"
                    self.timeline.setdefault(t["url"], []).append(
                        Seen(now, out, t["breaker"], t["requests_total"])
                    )
            time.sleep(0.01)

    def latest(self, url: str) -> Seen | None:
        line = self.timeline.get(url)
        return line[-1] if line else None

    def first_out(self, url: str, since: float) -> float | None:
        for s in self.timeline.get(url, []):
            if s.t >= since and s.out:
                return s.t - since
        return None

    def traffic_stopped(self, url: str, since: float, flat: float = 1.0) -> float | None:
        """Seconds from ``since`` to the last attempt before the count stayed flat ``flat`` s."""
        line = [s for s in self.timeline.get(url, []) if s.t >= since]
        times = [s.t for s in line]
        for i, s in enumerate(line):
            j = bisect.bisect_left(times, s.t + flat)
            if j == len(line):
                return None
            if line[j].requests == s.requests:  # the count only grows: flat all along
                return max(0.0, (line[i - 1].t if i else s.t) - since)
        return None

    def back(self, url: str, since: float) -> float | None:
        """Seconds from ``since`` to the target in service with attempts growing again."""
        line = [s for s in self.timeline.get(url, []) if s.t >= since]
        for a, b in itertools.pairwise(line):
            if not a.out and not b.out and b.requests > a.requests:
                return a.t - since
        return None

    def wait(self, pred: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.02)


# -- load -----------------------------------------------------------------------------------


@dataclass
class LoadResult:
    requests: int = 0
    failed: int = 0
    p99_ms: float = math.nan
    rps: float = 0.0


def wrk_load(port: int, seconds: float, connections: int) -> LoadResult:
    r = wrk(port, duration=seconds, connections=connections, cpu=None, path="/sensors/drill")
    return LoadResult(r.requests, r.errors, r.p99_ms, r.rps)


def asyncio_load(port: int, seconds: float, connections: int) -> LoadResult:
    import httptools
    import uvloop

    latencies: list[float] = []
    failed = 0
    request = b"GET /sensors/drill HTTP/1.1\r\nHost: drill\r\n\r\n"

    class Parse:
        done = False

        def on_message_complete(self) -> None:
            self.done = True

    async def one(deadline: float) -> None:
        nonlocal failed
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                failed += 1
                continue
            try:
                while time.monotonic() < deadline:
                    t0 = time.monotonic()
                    writer.write(request)
                    p = Parse()
                    parser = httptools.HttpResponseParser(p)
                    while not p.done:
                        data = await asyncio.wait_for(reader.read(65536), 5)
                        if not data:
                            raise ConnectionError("closed")
                        parser.feed_data(data)
                    latencies.append(time.monotonic() - t0)
                    if not 200 <= parser.get_status_code() < 400:
                        failed += 1
                    if not parser.should_keep_alive():
                        break
            except (OSError, TimeoutError, httptools.HttpParserError):
                failed += 1
            finally:
                writer.close()

    async def main() -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(one(deadline) for _ in range(connections)))

    uvloop.run(main())
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)] if ordered else 0
    return LoadResult(len(latencies), failed, p99 * 1000, len(latencies) / seconds)


@dataclass
class Served:
    """Per request, from the gateway's access log (head parsed -> logged)."""

    requests: int = 0
    errors: int = 0  # status >= 500
    retried: int = 0  # more than one attempt
    p99_ms: float = math.nan
    max_ms: float = math.nan


def served(log: Path, offset: int) -> Served:
    """The access-log lines written since ``offset`` (waits for the batched writer)."""
    size = -1
    while log.stat().st_size != size:  # flushed every 0.2 s: wait until it stops growing
        size = log.stat().st_size
        time.sleep(0.5)
    with log.open("rb") as f:
        f.seek(offset)
        lines = [json.loads(line) for line in f if line.strip()]
    lines = [x for x in lines if x.get("route") == "sensors"]
    ms = sorted(x["total_ms"] for x in lines)
    p99 = ms[min(len(ms) - 1, math.ceil(0.99 * len(ms)) - 1)] if ms else math.nan
    return Served(
        len(lines),
        sum(1 for x in lines if x["status"] >= 500),
        sum(1 for x in lines if x["attempts"] > 1),
        p99,
        ms[-1] if ms else math.nan,
    )


class Background:
    """One load run in a thread."""

    def __init__(self, fn: Callable[[], LoadResult]) -> None:
        self.result: LoadResult | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], LoadResult]) -> None:
        self.result = fn()

    def join(self) -> LoadResult:
        self._thread.join()
        assert self.result is not None
        return self.result


# -- drills ---------------------------------------------------------------------------------


@dataclass
class Report:
    drill: str
    load: LoadResult
    detected: list[float | None] = field(default_factory=list)
    stopped: list[float | None] = field(default_factory=list)
    back: list[float | None] = field(default_factory=list)
    served: Served = field(default_factory=Served)

    def row(self) -> str:
        def ms(values: list[float | None]) -> str:
            if not values:
                return "-"
            return " / ".join("never" if v is None else f"{v * 1000:.0f}" for v in values)

        s = self.served
        return (
            f"{self.drill:<6} {ms(self.detected):>12} {ms(self.stopped):>12} {ms(self.back):>12} "
            f"{self.load.failed:>7} {self.load.requests:>9} {s.retried:>8} "
            f"{s.p99_ms:>8.1f} {s.max_ms:>8.1f} {self.load.p99_ms:>10.1f}"
        )


HEADER = (
    f"{'drill':<6} {'detected ms':>12} {'stopped ms':>12} {'back ms':>12} {'failed':>7} "
    f"{'requests':>9} {'retried':>8} {'p99 ms':>8} {'max ms':>8} {'client p99':>10}"
)


def all_in_service(watch: Watch, devs: list[Device]) -> bool:
    for d in devs:
        s = watch.latest(d.url)
        if s is None or s.out:
            return False
    return True


@contextlib.contextmanager
def fleet(count: int) -> Iterator[list[Device]]:
    devs = [Device(f"pi-{i + 1}") for i in range(count)]
    try:
        for d in devs:
            d.start()
        yield devs
    finally:
        for d in devs:
            d.stop()


def run(args: argparse.Namespace) -> list[Report]:
    load_fn = {"wrk": wrk_load, "asyncio": asyncio_load}[args.load]
    reports = []
    with fleet(3) as devs, tempfile.TemporaryDirectory(prefix="piuptime-drill-") as d:
        port, admin = free_port(), free_port()
        cfg = Path(d) / "piuptime.yaml"
        targets = "\n".join(f'      - {{url: "{x.url}"}}' for x in devs)
        log = Path(d) / "access.log"
        cfg.write_text(CONFIG.format(port=port, admin=admin, targets=targets, log=log))
        cmd = [sys.executable, "-m", "piuptime", "run", "-c", str(cfg)]
        cmd += ["--watch-interval", "0", "--log-level", "warning"]
        with started(cmd, port, env=env()), Watch(admin) as watch:
            wait_port(admin)
            load_fn(port, 2, args.connections)  # warm-up: pools, every target seen serving
            for drill in args.drills:
                watch.wait(lambda: all_in_service(watch, devs), 30, "every device in service")
                offset = log.stat().st_size if log.exists() else 0
                if drill == "kill":
                    report = kill(devs[0], watch, port, args, load_fn)
                elif drill == "stall":
                    report = stall(devs[1], watch, port, args, load_fn)
                else:
                    report = flap(devs[2], watch, port, args, load_fn)
                report.served = served(log, offset)
                reports.append(report)
    return reports


LoadFn = Callable[[int, float, int], LoadResult]


def _loaded(port: int, seconds: float, args: argparse.Namespace, fn: LoadFn) -> Background:
    return Background(lambda: fn(port, seconds, args.connections))


def kill(dev: Device, watch: Watch, port: int, args: argparse.Namespace, fn: LoadFn) -> Report:
    load = _loaded(port, args.before + args.after, args, fn)
    time.sleep(args.before)
    t = time.monotonic()
    dev.signal(signal.SIGKILL)
    result = load.join()
    report = Report(
        "kill", result, [watch.first_out(dev.url, t)], [watch.traffic_stopped(dev.url, t)]
    )
    dev.start()
    return report


def stall(dev: Device, watch: Watch, port: int, args: argparse.Namespace, fn: LoadFn) -> Report:
    load = _loaded(port, args.before + args.after, args, fn)
    time.sleep(args.before)
    t = time.monotonic()
    dev.signal(signal.SIGSTOP)
    result = load.join()
    dev.signal(signal.SIGCONT)
    return Report(
        "stall", result, [watch.first_out(dev.url, t)], [watch.traffic_stopped(dev.url, t)]
    )


def flap(dev: Device, watch: Watch, port: int, args: argparse.Namespace, fn: LoadFn) -> Report:
    cycles = 2
    load = _loaded(port, args.before + cycles * 2 * args.flap + 1, args, fn)
    time.sleep(args.before)
    downs, ups = [], []
    for _ in range(cycles):
        downs.append(time.monotonic())
        dev.signal(signal.SIGKILL)
        time.sleep(args.flap)
        dev.start()
        ups.append(time.monotonic())
        time.sleep(max(0.0, ups[-1] + args.flap - time.monotonic()))
    result = load.join()
    return Report(
        "flap",
        result,
        [watch.first_out(dev.url, t) for t in downs],
        [watch.traffic_stopped(dev.url, t) for t in downs],
        [watch.back(dev.url, t) for t in ups],
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--drills",
        default="kill,stall,flap",
        help="comma-separated, in order: kill, stall, flap (default all three)",
    )
    ap.add_argument(
        "--load",
        choices=["wrk", "asyncio"],
        default="wrk" if shutil.which("wrk") else "asyncio",
        help="load generator (default wrk when installed)",
    )
    ap.add_argument("--connections", type=int, default=20, help="concurrent connections")
    ap.add_argument("--before", type=float, default=2.0, help="seconds of load before a fault")
    ap.add_argument("--after", type=float, default=8.0, help="seconds of load after a fault")
    ap.add_argument("--flap", type=float, default=10.0, help="seconds down, then up, per flap")
    args = ap.parse_args()
    args.drills = [x.strip() for x in args.drills.split(",") if x.strip()]
    unknown = set(args.drills) - {"kill", "stall", "flap"}
    if unknown:
        ap.error(f"unknown drill(s): {', '.join(sorted(unknown))}")
    print(
        f"load: {args.load}, {args.connections} connections; fault after {args.before:g} s, "
        f"kill/stall runs {args.after:g} s more; flap {args.flap:g} s down / {args.flap:g} s up x2",
        flush=True,
    )
    reports = run(args)
    print(HEADER)
    for r in reports:
        print(r.row())
    print(
        "flap: one figure per cycle; back = restart -> serving again. failed and requests: as "
        "the load generator saw them;\nretried, p99 and max: per request from the gateway's "
        "access log; client p99: the load generator's"
        + (" (wrk's is time-sampled, not per request)" if args.load == "wrk" else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
