"""Shared pieces for the benchmark scripts: nginx and piuptime processes, wrk runs, CPU pinning.

Benchmarks are scripts, not tests. Each runs our gateway and its anchor side by side in one run,
with the same upstream and the same load generator, and prints ratios.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def need(binary: str, hint: str) -> str:
    path = shutil.which(binary)
    if path is None:
        sys.exit(f"{binary} not found: {hint}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def taskset(cpu: str | None) -> list[str]:
    if cpu is None or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", cpu]


@contextlib.contextmanager
def started(args: list[str], port: int, **kw: object) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, **kw)  # type: ignore[call-overload]
    try:
        wait_port(port)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


NGINX_UPSTREAM = """
worker_processes 1;
daemon off;
pid {dir}/upstream.pid;
error_log {dir}/upstream-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ default_type text/plain; return 200 "hello from the upstream\\n"; }}
    }}
}}
"""

NGINX_PROXY = """
worker_processes 1;
daemon off;
pid {dir}/proxy.pid;
error_log {dir}/proxy-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    upstream backend {{ server 127.0.0.1:{upstream}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(template: str, cpu: str | None, **fmt: object) -> Iterator[int]:
    binary = need("nginx", "apt-get install nginx-light")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="piuptime-bench-") as d:
        conf = Path(d) / "nginx.conf"
        conf.write_text(template.format(dir=d, port=port, **fmt))
        args = [*taskset(cpu), binary, "-c", str(conf), "-e", f"{d}/error.log", "-p", d]
        with started(args, port, stderr=subprocess.DEVNULL):
            yield port


@contextlib.contextmanager
def piuptime(config: str, cpu: str | None) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="piuptime-bench-") as d:
        path = Path(d) / "piuptime.yaml"
        path.write_text(config.replace("{port}", str(port)).replace("{dir}", d))
        args = [
            *taskset(cpu),
            sys.executable,
            "-m",
            "piuptime",
            "run",
            "-c",
            str(path),
            "--watch-interval",
            "0",
            "--log-level",
            "warning",
        ]
        env = dict(os.environ, PYTHONPATH=os.environ.get("PIUPTIME_SRC", str(ROOT / "src")))
        with started(args, port, env=env) as proc:
            yield port, proc


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int

    def row(self, name: str) -> str:
        return (
            f"{name:<22} {self.rps:>11,.0f} {self.p50_ms:>9.3f} {self.p99_ms:>9.3f} "
            f"{self.errors:>8}"
        )


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(
    port: int,
    *,
    duration: float,
    connections: int,
    cpu: str | None,
    path: str = "/",
    headers: tuple[str, ...] = (),
) -> WrkResult:
    binary = need("wrk", "apt-get install wrk")
    args = [
        *taskset(cpu),
        binary,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--latency",
    ]
    for h in headers:
        args += ["-H", h]
    args.append(f"http://127.0.0.1:{port}{path}")
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    return WrkResult(rps, p50, p99, errors, total)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
