"""CPU cost per proxied request: nginx, a bare callback-only Python proxy (the floor for Python
on uvloop + httptools) and piuptime, side by side against the same nginx upstream.

    uv run python bench/cpu_per_request.py

The proxy under test runs on CPU 0; wrk and the upstream share CPU 1. Prints req/s, p99, and the
proxy process's CPU microseconds per request (from /proc), which is steadier than req/s on a
shared machine. Use it to see where the gateway stands against the floor.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from harness import NGINX_PROXY, NGINX_UPSTREAM, free_port, nginx, piuptime, started, taskset, wrk
from proxy_vs_nginx import piuptime_config

TCK = os.sysconf("SC_CLK_TCK")
HERE = Path(__file__).resolve().parent


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TCK


def measure(name: str, port: int, pid: int | None, seconds: int = 6) -> None:
    wrk(port, duration=2, connections=50, cpu="1")
    c0 = cpu_seconds(pid) if pid else 0.0
    r = wrk(port, duration=seconds, connections=50, cpu="1")
    c1 = cpu_seconds(pid) if pid else 0.0
    per = (
        f"{(c1 - c0) / r.requests * 1e6:6.1f} us/req  util {(c1 - c0) / seconds:.2f}" if pid else ""
    )
    print(f"{name:10} {r.rps:9,.0f} req/s  p99 {r.p99_ms:6.2f} ms  {per}", flush=True)


def main() -> None:
    with nginx(NGINX_UPSTREAM, "1") as up:
        with nginx(NGINX_PROXY, "0", upstream=up) as port:
            measure("nginx", port, None)
        port = free_port()
        args = [*taskset("0"), sys.executable, str(HERE / "bare_proxy.py"), str(up), str(port)]
        with started(args, port) as proc:
            measure("bare", port, proc.pid)
        with piuptime(piuptime_config(up, 1, False), "0") as (port, proc):
            measure("piuptime", port, proc.pid)


if __name__ == "__main__":
    main()
