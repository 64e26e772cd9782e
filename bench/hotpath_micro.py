"""The proxy's per-request Python cost, without sockets: a deterministic micro-benchmark.

Drives the real ``http1`` server connection, the proxy handler, the router, the balancer and the
``http1`` client connection in one process with in-memory transports: a wrk-like ``GET`` is fed
to the server side, the upstream answer (nginx's, byte for byte in shape) to the client side,
and the bytes the client would receive are checked. What is left out is exactly what the kernel
does (syscalls, the event loop's polling), so the figure is the gateway's own CPU per request.

    uv run python bench/hotpath_micro.py                 # 200,000 requests, best of 5
    uv run python bench/hotpath_micro.py --profile       # the same under cProfile, top 25
    uv run python bench/hotpath_micro.py --policies      # with key_auth and a memory rate_limit
    uv run python bench/hotpath_micro.py --analytics     # plus the analytics recorder
    uv run python bench/hotpath_micro.py --no-metrics    # without the /metrics request metrics

The handler gets the request metrics (counter + latency histograms, ``request_metrics``) the way
``piuptime.app.App`` attaches them, so the figure is what a running gateway pays;
``--no-metrics`` leaves them out to show what they cost.

Compare the figure with ``bench/cpu_per_request.py``'s user-time column.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import time

import uvloop

from piuptime.config.load import parse_config
from piuptime.gateway.proxy import ProxyHandler
from piuptime.gateway.runtime import compile_runtime
from piuptime.http1 import client as http1_client
from piuptime.http1.server import Server
from piuptime.observe.accesslog import AccessLog
from piuptime.observe.metrics import Metrics
from piuptime.observe.requestmetrics import RequestMetrics

CONFIG = """
gateway:
  listen: ["127.0.0.1:8080"]
  access_log: {path: off}
upstreams:
  backend:
    targets: [{url: "http://127.0.0.1:9000"}]
routes:
  - name: all
    match: {path: /}
    upstream: backend
"""

POLICIES = """
consumers:
  bench: {keys: ["bench-key-0123456789"], groups: [bench]}
plugins:
  key_auth: {}
  rate_limit: {limit: 100000000, window: 1m, per: consumer}
"""

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
REQUEST_WITH_KEY = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\napikey: bench-key-0123456789\r\n\r\n"
BODY = b"hello from the upstream\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 22 Nov 2026 10:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%b"
    % (len(BODY), BODY)
)


class MemoryTransport:
    """Just enough of a uvloop transport: writes are kept, the rest does nothing."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def writelines(self, parts: list[bytes]) -> None:
        self.out.append(b"".join(parts))

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


async def setup(
    policies: bool, metrics: bool = True
) -> tuple[object, object, MemoryTransport, MemoryTransport]:
    config = parse_config(CONFIG + (POLICIES if policies else ""), "bench.yaml")
    runtime = compile_runtime(config)
    handler = ProxyHandler(runtime, AccessLog("off"))
    if metrics:  # as App.start does
        handler.request_metrics = RequestMetrics(Metrics())
    from piuptime.app import server_limits

    server = Server(handler.handle, server_limits(config))
    down_t = MemoryTransport()
    down = server._protocol()
    down.connection_made(down_t)  # type: ignore[arg-type]
    pool = runtime.upstreams["backend"].targets[0].pool
    pool._loop = asyncio.get_running_loop()
    up = http1_client._Connection(pool, pool._loop)
    up_t = MemoryTransport()
    up.connection_made(up_t)  # type: ignore[arg-type]
    pool._open += 1
    up._state = http1_client._BUSY
    pool._checkin(up)
    return down, up, down_t, up_t


def run(
    n: int,
    down: object,
    up: object,
    down_t: MemoryTransport,
    up_t: MemoryTransport,
    request: bytes = REQUEST,
) -> float:
    feed_down = down.data_received  # type: ignore[attr-defined]
    feed_up = up.data_received  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    for _ in range(n):
        feed_down(request)
        feed_up(RESPONSE)
    elapsed = time.perf_counter() - t0
    assert len(up_t.out) >= n and len(down_t.out) >= n, (len(up_t.out), len(down_t.out))
    last = down_t.out[-1]
    assert last.startswith(b"HTTP/1.1 200 OK\r\n") and last.endswith(BODY), last
    up_t.out.clear()
    down_t.out.clear()
    return elapsed / n


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--policies", action="store_true", help="key_auth + memory rate_limit")
    ap.add_argument(
        "--analytics", action="store_true", help="with the analytics recorder (analytics:)"
    )
    ap.add_argument(
        "--no-metrics", action="store_true", help="without the request metrics (/metrics)"
    )
    ap.add_argument(
        "--access-log",
        action="store_true",
        help="with the access log (entries built and serialised; its writer thread not run)",
    )
    args = ap.parse_args()
    down, up, down_t, up_t = await setup(args.policies, not args.no_metrics)
    request = REQUEST_WITH_KEY if args.policies else REQUEST
    if args.analytics:  # attached as App.start does with an analytics: section
        from piuptime.observe.analytics import Analytics, SQLiteBackend

        handler = down._server.handler.__self__  # type: ignore[attr-defined]
        recorder = Analytics(lambda: SQLiteBackend(":memory:"))  # writer not started
        handler.observers = (*handler.observers, recorder.observe)
    if args.access_log:
        handler = down._server.handler.__self__  # type: ignore[attr-defined]
        handler.access_log = AccessLog(os.devnull, max_pending_bytes=1 << 62)
    run(2000, down, up, down_t, up_t, request)  # warm
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run(args.n, down, up, down_t, up_t, request)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    best = min(run(args.n, down, up, down_t, up_t, request) for _ in range(args.rounds))
    what = "proxy path with key_auth + rate_limit" if args.policies else "proxy path"
    what += ", analytics recorder" if args.analytics else ""
    what += ", no request metrics" if args.no_metrics else ""
    what += ", access log" if args.access_log else ""
    print(f"piuptime {what}: {best * 1e6:.2f} us per request (best of {args.rounds})")


if __name__ == "__main__":
    uvloop.run(main())
