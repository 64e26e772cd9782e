"""Micro-benchmark of ``piuptime.http1.client.Pool`` against nginx, beside a bare-minimum client.

Set-up (2 cores): nginx (one worker, ``return 200``) on ``--server-cpu``; this process, pinned
to ``--client-cpu``, runs ``--concurrency`` tasks each doing GET → read body → release in a loop.
The anchor is the least a Python client can do on the same loop and parser: one raw
asyncio Protocol per connection feeding ``httptools`` and waking one future per response, with
no pool, no timers, no header list, no flow control. Rounds alternate; the best of each counts.

    uv run python bench/client_micro.py                  # 50 concurrent, 5 s rounds
    uv run python bench/client_micro.py --port 8080      # against a server already running

Prints req/s and client CPU µs per request for both, and the pool/bare ratio. When nginx is
the bottleneck both req/s figures converge; the CPU-per-request column is the one to watch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Iterator

import httptools
import uvloop
from harness import NGINX_UPSTREAM, nginx

from piuptime.http1.client import Pool, PoolOptions

Round = Callable[[str, int, int, float], Awaitable[tuple[int, float, float]]]


async def pool_round(
    host: str, port: int, concurrency: int, seconds: float
) -> tuple[int, float, float]:
    """(requests, wall seconds, CPU seconds) with the real client."""
    pool = Pool("http", host, port, PoolOptions(max_connections=concurrency, max_idle=concurrency))
    headers = [(b"host", f"{host}:{port}".encode()), (b"user-agent", b"piuptime-bench")]
    loop = asyncio.get_running_loop()
    counts: list[int] = []

    async def worker(deadline: float) -> None:
        n = 0
        while loop.time() < deadline:
            resp = await pool.request(b"GET", b"/", headers)
            while await resp.read():
                pass
            resp.release()
            n += 1
        counts.append(n)

    await asyncio.gather(*(worker(loop.time() + 0.3) for _ in range(concurrency)))  # connect
    counts.clear()
    wall, cpu = time.perf_counter(), time.process_time()
    deadline = loop.time() + seconds
    await asyncio.gather(*(worker(deadline) for _ in range(concurrency)))
    result = sum(counts), time.perf_counter() - wall, time.process_time() - cpu
    await pool.aclose()
    return result


class _Bare(asyncio.Protocol):
    """The anchor: a keep-alive connection that only parses and wakes one future."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.done: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        pass

    def on_message_complete(self) -> None:
        if self.done is not None:
            self.done.set_result(None)


async def bare_round(
    host: str, port: int, concurrency: int, seconds: float
) -> tuple[int, float, float]:
    loop = asyncio.get_running_loop()
    request = b"GET / HTTP/1.1\r\nhost: %s:%d\r\nuser-agent: piuptime-bench\r\n\r\n" % (
        host.encode(),
        port,
    )
    conns = [await loop.create_connection(_Bare, host, port) for _ in range(concurrency)]
    counts: list[int] = []

    async def worker(proto: _Bare, deadline: float) -> None:
        n = 0
        assert proto.transport is not None
        while loop.time() < deadline:
            proto.done = loop.create_future()
            proto.transport.write(request)
            await proto.done
            n += 1
        counts.append(n)

    wall, cpu = time.perf_counter(), time.process_time()
    deadline = loop.time() + seconds
    await asyncio.gather(*(worker(proto, deadline) for _, proto in conns))
    result = sum(counts), time.perf_counter() - wall, time.process_time() - cpu
    for transport, _ in conns:
        transport.close()
    return result


@contextlib.contextmanager
def server(args: argparse.Namespace) -> Iterator[int]:
    if args.port:
        yield args.port
    else:
        with nginx(NGINX_UPSTREAM, args.server_cpu) as port:
            yield port


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--port", type=int, default=0, help="use a running server instead of nginx")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("-c", "--concurrency", type=int, default=50)
    ap.add_argument("-t", "--seconds", type=float, default=5.0, help="seconds per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--client-cpu", type=int, default=0)
    ap.add_argument("--server-cpu", default="1")
    args = ap.parse_args()
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {args.client_cpu})

    rounds: dict[str, Round] = {"bare httptools": bare_round, "piuptime Pool": pool_round}
    best: dict[str, tuple[float, float]] = {}
    with server(args) as port:
        for _ in range(args.rounds):
            for name, fn in rounds.items():
                n, wall, cpu = uvloop.run(fn(args.host, port, args.concurrency, args.seconds))
                rate, us = n / wall, cpu / n * 1e6
                print(f"  {name:16} {rate:>9,.0f} req/s  {us:5.1f} µs CPU/request")
                if name not in best or rate > best[name][0]:
                    best[name] = (rate, us)
    (bare_rate, bare_us), (pool_rate, pool_us) = best["bare httptools"], best["piuptime Pool"]
    print(
        f"best: pool {pool_rate:,.0f} req/s ({pool_us:.1f} µs/request), "
        f"bare {bare_rate:,.0f} req/s ({bare_us:.1f} µs/request); "
        f"pool/bare req/s {pool_rate / bare_rate:.2f}, CPU/request {pool_us / bare_us:.2f}x"
    )


if __name__ == "__main__":
    main()
