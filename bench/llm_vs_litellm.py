"""The AI gateway: piuptime side by side with the LiteLLM proxy, in one run.

Set-up (2 cores): the gateway under test (piuptime, then LiteLLM's proxy; one process, one
worker each) is pinned to CPU 0; a fake OpenAI-compatible upstream that answers at once
(bench/fake_openai_upstream.py: uvloop + httptools, a fixed tiny completion, streamed or not)
shares CPU 1 with the load generators. Both gateways serve one model group, ``bench-model``,
with one deployment on that upstream, no authentication, no access log and no database.

LiteLLM is installed on first run into its own virtualenv (``--litellm-venv``, default
/tmp/piuptime-bench/litellm-venv) with ``uv venv`` + ``uv pip install
'litellm[proxy]==VERSION'`` (PyPI must be reachable that once), and started as
``litellm --config cfg.yaml --port P --num_workers 1`` with LITELLM_LOCAL_MODEL_COST_MAP=True
(no fetch of its price map), LITELLM_LOG=ERROR, uvicorn's access log off and
``dangerously_permit_weak_or_unset_master_key`` (recent releases refuse to start without a
master key; piuptime's side has no auth either).

    uv run python bench/llm_vs_litellm.py                      # 10 s per measurement
    uv run python bench/llm_vs_litellm.py --duration 30 --rounds 2
    uv run python bench/llm_vs_litellm.py --only litellm       # one side (debugging)

Measured for the upstream alone ("direct") and for each gateway, in turn (each gateway is
started, left idle, measured, stopped):

- idle RSS: the gateway's processes (summed over children) a few seconds after start-up,
  before any request;
- req/s: non-streaming chat completions, wrk with a Lua POST script at ``--connections``;
- overhead p50: wrk with one connection, p50 latency through the gateway minus straight to
  the upstream;
- streaming TTFT overhead: a sequential Python client (one keep-alive connection) timing the
  first SSE event with content, p50 through the gateway minus straight to the upstream;
- the gateways' own per-request time when they report it: piuptime's
  ``x-piuptime-overhead-ms``, LiteLLM's ``x-litellm-overhead-duration-ms``.

Targets (issue 6): piuptime >= 50x LiteLLM's req/s, overhead p50 < 1 ms, streaming TTFT
overhead < 2 ms, idle RSS <= 1/5 of LiteLLM's. Exit status 0 when all are met.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httptools
import orjson
import uvloop
from harness import ROOT, WrkResult, _ms, free_port, need, piuptime, taskset, wait_port

LITELLM_VERSION = "1.108.7"
DEFAULT_VENV = Path("/tmp/piuptime-bench/litellm-venv")
MODEL = "bench-model"
PATH = "/v1/chat/completions"
BODY = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}]})
STREAM_BODY = orjson.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "stream": True}
)

PIUPTIME_CONFIG = """\
gateway:
  listen: ["127.0.0.1:{port}"]
  access_log: {path: off}
llm:
  providers:
    fake: {kind: openai, base_url: "http://127.0.0.1:UPSTREAM/v1", keys: ["sk-bench"]}
  models:
    bench-model:
      deployments: [{provider: fake, model: gpt-4o-mini}]
  routes: [{path: /v1/}]
"""

LITELLM_CONFIG = """\
model_list:
  - model_name: bench-model
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: http://127.0.0.1:UPSTREAM/v1
      api_key: sk-bench
litellm_settings:
  set_verbose: false
general_settings:
  dangerously_permit_weak_or_unset_master_key: true
"""

# uvicorn's access log off (piuptime's is off too), warnings and errors kept
LITELLM_LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"err": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}},
    "loggers": {
        "uvicorn": {"handlers": ["err"], "level": "WARNING", "propagate": False},
        "uvicorn.error": {"level": "WARNING"},
        "uvicorn.access": {"handlers": [], "level": "CRITICAL", "propagate": False},
    },
}

LUA_POST = """\
wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
"""


# -- processes -----------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the ppid is the 2nd field after the parenthesised command name
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(entry))
    return out


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
        todo.extend(_children(p))
    return total / 1024


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_http(port: int, path: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Until ``GET path`` answers 200 (a port that accepts is not yet a ready app)."""
    deadline = time.monotonic() + timeout
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before it was ready")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(request)
            if s.recv(64).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.1)
    raise RuntimeError(f"not ready on port {port} after {timeout:.0f}s")


@contextlib.contextmanager
def fake_upstream(cpu: str | None) -> Iterator[int]:
    port = free_port()
    args = [
        *taskset(cpu),
        sys.executable,
        str(ROOT / "bench" / "fake_openai_upstream.py"),
        str(port),
    ]
    proc = subprocess.Popen(args)
    try:
        wait_port(port)
        yield port
    finally:
        _stop(proc)


def ensure_litellm(venv: Path, version: str) -> Path:
    """The ``litellm`` command of a virtualenv holding ``litellm[proxy]==version``, made on
    first use."""
    python = venv / "bin" / "python"
    binary = venv / "bin" / "litellm"
    if python.exists() and binary.exists():
        got = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if got == version:
            return binary
    uv = need("uv", "https://docs.astral.sh/uv/ (it runs this project)")
    print(f"installing litellm[proxy]=={version} into {venv} ...", file=sys.stderr, flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [uv, "venv", "-q", "--allow-existing", "-p", sys.executable, str(venv)], check=True
    )
    subprocess.run(
        [uv, "pip", "install", "-q", "-p", str(python), f"litellm[proxy]=={version}"],
        check=True,
    )
    return binary


@contextlib.contextmanager
def litellm(
    binary: Path, upstream: int, cpu: str | None
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="piuptime-bench-litellm-") as d:
        cfg = Path(d) / "litellm.yaml"
        cfg.write_text(LITELLM_CONFIG.replace("UPSTREAM", str(upstream)))
        log_cfg = Path(d) / "logging.json"
        log_cfg.write_bytes(orjson.dumps(LITELLM_LOG_CONFIG))
        log = Path(d) / "litellm.log"
        env = dict(
            os.environ,
            LITELLM_LOCAL_MODEL_COST_MAP="True",
            LITELLM_LOG="ERROR",
            LITELLM_MODE="PRODUCTION",
            PYTHONUNBUFFERED="1",
        )
        for var in ("DATABASE_URL", "LITELLM_MASTER_KEY", "REDIS_HOST", "REDIS_URL"):
            env.pop(var, None)
        args = [
            *taskset(cpu),
            str(binary),
            "--config",
            str(cfg),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
            "--log_config",
            str(log_cfg),
        ]
        with log.open("wb") as out:
            proc = subprocess.Popen(args, cwd=d, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            try:
                wait_http(port, "/health/liveliness", proc, timeout=180)
            except RuntimeError as e:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"litellm: {e}\n--- its log ---\n{tail}") from None
            yield port, proc
        finally:
            _stop(proc)


@contextlib.contextmanager
def piuptime_gateway(
    upstream: int, cpu: str | None
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    with piuptime(PIUPTIME_CONFIG.replace("UPSTREAM", str(upstream)), cpu) as (port, proc):
        wait_http(port, "/v1/models", proc, timeout=30)
        yield port, proc


# -- load ------------------------------------------------------------------------------------


def wrk_post(
    port: int, *, duration: float, connections: int, cpu: str | None, script: Path
) -> WrkResult:
    binary = need("wrk", "apt-get install wrk")
    args = [
        *taskset(cpu),
        binary,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}{PATH}",
    ]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout

    def grab(pattern: str) -> str:
        m = re.search(pattern, out)
        if m is None:
            raise RuntimeError(f"unexpected wrk output:\n{out}")
        return m.group(1)

    rps = float(grab(r"Requests/sec:\s+([\d.]+)"))
    p50 = _ms(grab(r"\s50%\s+(\S+)"))
    p99 = _ms(grab(r"\s99%\s+(\S+)"))
    total = int(grab(r"(\d+) requests in"))
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    return WrkResult(rps, p50, p99, errors, total)


class _Client(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; times the head, the first content event, the end."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.done: asyncio.Future[None] | None = None
        self.headers: dict[bytes, bytes] = {}
        self.buf = b""
        self.t_first = 0.0
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("connection closed mid-response"))

    def data_received(self, data: bytes) -> None:
        assert self.parser is not None
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.t_first:
            return
        self.buf += body
        while b"\n\n" in self.buf:
            event, self.buf = self.buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    continue
                try:
                    chunk = orjson.loads(data)
                except orjson.JSONDecodeError:
                    continue
                for choice in chunk.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        self.t_first = time.perf_counter()
                        return

    def on_message_complete(self) -> None:
        assert self.done is not None
        if not self.done.done():
            self.done.set_result(None)

    async def request(self, raw: bytes) -> tuple[float, float, dict[bytes, bytes]]:
        """(time to the first content event or 0, time to the end, headers)."""
        assert self.transport is not None
        self.parser = httptools.HttpResponseParser(self)
        self.done = asyncio.get_running_loop().create_future()
        self.headers = {}
        self.buf = b""
        self.t_first = 0.0
        start = time.perf_counter()
        self.transport.write(raw)
        await self.done
        end = time.perf_counter()
        if self.status != 200:
            raise RuntimeError(f"status {self.status}")
        return (self.t_first - start if self.t_first else 0.0), end - start, self.headers


@dataclass
class Sequential:
    ttft_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    reported_ms: list[float] = field(default_factory=list)  # the gateway's own overhead header

    def p50(self, values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")


OVERHEAD_HEADERS = (b"x-piuptime-overhead-ms", b"x-litellm-overhead-duration-ms")


async def _sequential(port: int, body: bytes, n: int, warmup: int) -> Sequential:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(_Client, "127.0.0.1", port)
    raw = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    result = Sequential()
    stream = body == STREAM_BODY
    try:
        for i in range(warmup + n):
            ttft, total, headers = await client.request(raw)
            if i == 0:  # the answer is the upstream's, not an error or an empty stream
                if stream and not ttft:
                    raise RuntimeError(f"port {port}: a stream without any content event")
                if not stream and b"Hello there!" not in client.buf:
                    raise RuntimeError(f"port {port}: unexpected answer {client.buf[:300]!r}")
            if i < warmup:
                continue
            result.ttft_ms.append(ttft * 1000)
            result.total_ms.append(total * 1000)
            for h in OVERHEAD_HEADERS:
                if h in headers:
                    with contextlib.suppress(ValueError):
                        result.reported_ms.append(float(headers[h]))
    finally:
        assert client.transport is not None
        client.transport.close()
    return result


def sequential(port: int, body: bytes, n: int, warmup: int = 20) -> Sequential:
    return uvloop.run(_sequential(port, body, n, warmup))


# -- one target ------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    rss_mb: float = float("nan")
    rss_after_mb: float = float("nan")
    rps: WrkResult | None = None
    one: WrkResult | None = None  # one connection
    plain: Sequential | None = None
    stream: Sequential | None = None


def measure(name: str, port: int, args: argparse.Namespace, script: Path) -> Target:
    t = Target(name)
    wrk_post(
        port, duration=args.warmup, connections=args.connections, cpu=args.load_cpu, script=script
    )
    best: WrkResult | None = None
    for _ in range(args.rounds):
        r = wrk_post(
            port,
            duration=args.duration,
            connections=args.connections,
            cpu=args.load_cpu,
            script=script,
        )
        print(r.row(f"  {name} req/s round"), file=sys.stderr, flush=True)
        if best is None or r.rps > best.rps:
            best = r
    t.rps = best
    t.one = wrk_post(port, duration=args.duration, connections=1, cpu=args.load_cpu, script=script)
    print(t.one.row(f"  {name} 1 connection"), file=sys.stderr, flush=True)
    t.plain = sequential(port, BODY, args.requests)
    t.stream = sequential(port, STREAM_BODY, args.requests)
    print(
        f"  {name} sequential: total p50 {t.plain.p50(t.plain.total_ms):.3f} ms, "
        f"stream TTFT p50 {t.stream.p50(t.stream.ttft_ms):.3f} ms",
        file=sys.stderr,
        flush=True,
    )
    return t


def settle_rss(pid: int, seconds: float) -> float:
    time.sleep(seconds)  # a benchmark, not a test: let start-up work finish
    return tree_rss_mb(pid)


# -- report ----------------------------------------------------------------------------------


def _fmt(value: float, spec: str = ".3f") -> str:
    return "-" if value != value else format(value, spec)  # NaN → "-"


def report(direct: Target, targets: dict[str, Target], args: argparse.Namespace) -> bool:
    print(
        f"\nAI gateway benchmark: non-streaming req/s at {args.connections} connections "
        f"({args.duration:.0f}s x {args.rounds}, best), latency at 1 connection, "
        f"{args.requests} sequential requests for TTFT; gateway on CPU {args.proxy_cpu}, "
        f"upstream + load on CPU {args.load_cpu}"
    )
    head = (
        f"{'':<22} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'1-conn p50':>11} "
        f"{'overhead':>9} {'TTFT p50':>9} {'TTFT ovh':>9} {'own hdr':>8} {'idle RSS':>9} "
        f"{'RSS after':>10}"
    )
    print(head)
    d_one = direct.one.p50_ms if direct.one else float("nan")
    d_ttft = direct.stream.p50(direct.stream.ttft_ms) if direct.stream else float("nan")
    rows = [("upstream (direct)", direct), *((n, t) for n, t in targets.items())]
    derived: dict[str, tuple[float, float]] = {}
    for name, t in rows:
        assert (
            t.rps is not None and t.one is not None and t.plain is not None and t.stream is not None
        )
        one = t.one.p50_ms
        ttft = t.stream.p50(t.stream.ttft_ms)
        ovh = one - d_one if t is not direct else float("nan")
        ttft_ovh = ttft - d_ttft if t is not direct else float("nan")
        derived[name] = (ovh, ttft_ovh)
        own = t.plain.p50(t.plain.reported_ms)
        print(
            f"{name:<22} {t.rps.rps:>10,.0f} {t.rps.p50_ms:>8.3f} {t.rps.p99_ms:>8.3f} "
            f"{t.rps.errors:>7} {one:>11.3f} {_fmt(ovh):>9} {ttft:>9.3f} {_fmt(ttft_ovh):>9} "
            f"{_fmt(own):>8} {_fmt(t.rss_mb, '.1f'):>6} MB {_fmt(t.rss_after_mb, '.1f'):>7} MB"
        )
    print(
        "  overhead = 1-connection p50 minus the upstream's; TTFT ovh = streaming time to first "
        "content minus the upstream's; own hdr = p50 of the gateway's own overhead header "
        "(x-piuptime-overhead-ms / x-litellm-overhead-duration-ms); RSS after = at the end of "
        "the measurements"
    )
    pi, ll = targets.get("piuptime"), targets.get("litellm")
    ok = True
    if pi is not None:
        ovh, ttft_ovh = derived["piuptime"]
        print(f"\npiuptime overhead p50          = {ovh:.3f} ms   (target < 1 ms)")
        print(f"piuptime streaming TTFT ovh p50 = {ttft_ovh:.3f} ms   (target < 2 ms)")
        ok = ok and ovh < 1.0 and ttft_ovh < 2.0
        assert pi.rps is not None
        ok = ok and pi.rps.errors == 0
    if pi is not None and ll is not None:
        assert pi.rps is not None and ll.rps is not None
        rps_ratio = pi.rps.rps / ll.rps.rps
        rss_ratio = pi.rss_mb / ll.rss_mb
        print(f"ratio req/s    piuptime/litellm = {rps_ratio:.1f}x   (target >= 50x)")
        print(f"ratio idle RSS piuptime/litellm = {rss_ratio:.3f}    (target <= 0.200)")
        ok = ok and rps_ratio >= 50 and rss_ratio <= 0.2
    else:
        ok = False  # the ratios need both sides
    print("PASS" if ok else "BELOW TARGET (or incomplete)")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk measurement")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of wrk warm-up per target")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections for req/s")
    ap.add_argument("--rounds", type=int, default=1, help="req/s rounds per target (best kept)")
    ap.add_argument(
        "--requests",
        type=int,
        default=1000,
        help="sequential requests for latency and TTFT (each kind)",
    )
    ap.add_argument(
        "--idle", type=float, default=3.0, help="seconds idle after start-up before the RSS"
    )
    ap.add_argument("--proxy-cpu", default="0", help="CPU of the gateway under test")
    ap.add_argument("--load-cpu", default="1", help="CPU of the upstream, wrk and the TTFT client")
    ap.add_argument("--litellm-venv", type=Path, default=DEFAULT_VENV, help="made on first run")
    ap.add_argument("--litellm-version", default=LITELLM_VERSION)
    ap.add_argument("--only", choices=["piuptime", "litellm"], help="measure one gateway only")
    args = ap.parse_args()

    need("wrk", "apt-get install wrk")
    binary = (
        ensure_litellm(args.litellm_venv, args.litellm_version) if args.only != "piuptime" else None
    )
    if args.load_cpu is not None and hasattr(os, "sched_setaffinity") and shutil.which("taskset"):
        # the TTFT client runs in this process, beside the upstream and wrk
        os.sched_setaffinity(0, {int(c) for c in args.load_cpu.split(",")})

    targets: dict[str, Target] = {}
    with (
        tempfile.TemporaryDirectory(prefix="piuptime-bench-") as d,
        fake_upstream(args.load_cpu) as up,
    ):
        script = Path(d) / "post.lua"
        script.write_text(LUA_POST.format(body=BODY.decode()))
        direct = measure("upstream (direct)", up, args, script)
        if args.only != "litellm":
            with piuptime_gateway(up, args.proxy_cpu) as (port, proc):
                rss = settle_rss(proc.pid, args.idle)
                t = measure("piuptime", port, args, script)
                t.rss_mb, t.rss_after_mb = rss, tree_rss_mb(proc.pid)
            targets["piuptime"] = t
        if args.only != "piuptime":
            assert binary is not None
            with litellm(binary, up, args.proxy_cpu) as (port, proc):
                rss = settle_rss(proc.pid, args.idle)
                t = measure("litellm", port, args, script)
                t.rss_mb, t.rss_after_mb = rss, tree_rss_mb(proc.pid)
            targets["litellm"] = t
    if args.only is None:
        print(f"\nlitellm[proxy]=={args.litellm_version} from {args.litellm_venv}")
    return 0 if report(direct, targets, args) else 1


if __name__ == "__main__":
    sys.exit(main())
