"""``piuptime demo``: three demo devices on loopback and the gateway in front of them."""

from __future__ import annotations

import contextlib
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from piuptime.app import App
from piuptime.config import load_config

DEVICES = ("pi-1", "pi-2", "pi-3")
ADMIN_PORT = 9180  # the admin listener's usual port; another free one when it is taken

CONFIG = """\
# Written by `piuptime demo`. Edit and save: the gateway reloads it without a restart.
gateway:
  listen: ["127.0.0.1:{port}"]
  access_log: {{path: stdout}}
  drain_timeout: 5s

admin:
  listen: 127.0.0.1:{admin_port}      # `piuptime status -c <this file>` asks it

upstreams:
  devices:
    balance: round_robin
    targets:
      - {{url: "http://127.0.0.1:{p1}", weight: 2}}
      - {{url: "http://127.0.0.1:{p2}"}}
      - {{url: "http://127.0.0.1:{p3}"}}
    timeouts: {{connect: 1s, ttfb: 2s, read: 10s}}
    retries: {{attempts: 1}}            # a failed GET is tried once more, on another device
    health:
      active: {{path: /healthz, interval: 2s, timeout: 1s, healthy_after: 2, unhealthy_after: 2}}
      passive: {{consecutive_failures: 3, eject_for: 10s}}

routes:
  - name: sensors
    match: {{path: /sensors/, methods: [GET, HEAD]}}
    upstream: devices
  - name: echo
    match: {{path: /echo, methods: [POST]}}
    upstream: devices
  - name: stream
    match: {{path: /stream}}
    upstream: devices
  - name: device
    match: {{path: /device/}}
    upstream: devices
    strip_prefix: true
  - name: api                          # the same devices behind traffic policies
    match: {{path: /api/, methods: [GET, HEAD]}}
    upstream: devices
    strip_prefix: true
    plugins:
      key_auth: {{}}                     # apikey header, Authorization: Bearer or ?apikey=
      rate_limit: {{limit: 5, window: 10s, per: consumer}}
      cache: {{ttl: 5s, stale_if_error: 5m}}   # stale copies while every device is down

consumers:
  kitchen-app: {{keys: ["{key}"], groups: [apps]}}

plugins:                               # every route
  request_id: {{}}                     # X-Request-ID made or kept, echoed and logged
llm:                                   # the AI gateway: POST /v1/chat/completions, /v1/messages
  providers:                           # each demo device also speaks OpenAI's chat protocol
    pi-1: {{kind: openai, base_url: "http://127.0.0.1:{p1}/v1"}}
    pi-2: {{kind: openai, base_url: "http://127.0.0.1:{p2}/v1"}}
  models:
    demo-chat:                         # the "model" clients ask for
      strategy: priority               # pi-1 answers; pi-2 when pi-1 fails or is too slow
      deployments:
        - {{provider: pi-1, model: tiny}}
        - {{provider: pi-2, model: tiny}}
  timeouts: {{connect: 1s, first_token: 2s, idle: 2s, total: 10s}}
  routes:
    - {{path: /v1/}}
"""

DEMO_KEY = "demo-kitchen-key"


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _any_free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _self_command() -> str:
    """How to run this piuptime from another terminal: ``piuptime`` when that is what a shell
    finds, else the script's absolute path (a virtualenv another shell has not activated), else
    ``python -m piuptime``."""
    found = shutil.which("piuptime")
    if found is None:
        return f"{shlex.quote(sys.executable)} -m piuptime"
    in_venv = sys.prefix != sys.base_prefix
    if in_venv and Path(found).resolve().is_relative_to(Path(sys.prefix).resolve()):
        return shlex.quote(found)
    return "piuptime"


def _wait_listening(port: int, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"demo device on port {port} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"demo device on port {port} did not start listening in time")


def main(port: int = 8080, device_port: int = 9001) -> int:
    ports = [device_port + i for i in range(len(DEVICES))]
    busy = [p for p in [port, *ports] if not _port_free("127.0.0.1", p)]
    if busy:
        print(
            f"piuptime demo: port(s) {', '.join(map(str, busy))} on 127.0.0.1 are in use; "
            "choose others with --port and --device-port",
            file=sys.stderr,
        )
        return 2
    procs: list[subprocess.Popen[bytes]] = []
    workdir = Path(tempfile.mkdtemp(prefix="piuptime-demo-"))
    try:
        for name, p in zip(DEVICES, ports, strict=True):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "piuptime.demo.device",
                        "--name",
                        name,
                        "--port",
                        str(p),
                    ],
                    stdout=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + 10
        for p, proc in zip(ports, procs, strict=True):
            _wait_listening(p, proc, deadline)
        admin_port = ADMIN_PORT if _port_free("127.0.0.1", ADMIN_PORT) else _any_free_port()
        config_path = workdir / "piuptime.yaml"
        config_path.write_text(
            CONFIG.format(
                port=port,
                admin_port=admin_port,
                p1=ports[0],
                p2=ports[1],
                p3=ports[2],
                key=DEMO_KEY,
            )
        )
        config = load_config(config_path)
        _print_banner(port, ports, procs, config_path)
        import uvloop

        uvloop.run(_serve(config, config_path))
    except KeyboardInterrupt:
        pass
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
    print("piuptime demo stopped.", file=sys.stderr)
    return 0


async def _serve(config: object, config_path: Path) -> None:
    from piuptime.config import Config

    assert isinstance(config, Config)
    app = App(config, config_path)
    await app.start()
    await app.run_until_stopped()


def _print_banner(
    port: int, ports: list[int], procs: list[subprocess.Popen[bytes]], config_path: Path
) -> None:
    gw = f"http://127.0.0.1:{port}"
    devices = "\n".join(
        f"    {name}  http://127.0.0.1:{p}  (pid {proc.pid})"
        for name, p, proc in zip(DEVICES, ports, procs, strict=True)
    )
    piuptime = _self_command()
    victim, victim_port, victim_pid = DEVICES[1], ports[1], procs[1].pid
    restart = (
        f"{shlex.quote(sys.executable)} -m piuptime.demo.device --name {victim} "
        f"--port {victim_port}"
    )
    print(
        f"""
piuptime demo is running.

  gateway   {gw}
  devices
{devices}

Try (in another terminal):
  curl -s {gw}/sensors/temperature        # spread over pi-1, pi-2, pi-3 by weight 2:1:1
  for i in 1 2 3 4; do curl -s {gw}/sensors/t; echo; done
  curl -s -X POST --data 'hello' {gw}/echo
  curl -sN {gw}/stream                    # a streamed (chunked) answer
  curl -s {gw}/device/healthz             # strip_prefix: the device sees /healthz
  curl -s {gw}/nope                       # no route: 404 with a JSON body

Traffic policies on /api/ (key_auth, 5 requests per 10 s per consumer, a 5 s cache):
  curl -si {gw}/api/temperature           # 401: no key
  curl -si -H 'apikey: {DEMO_KEY}' {gw}/api/temperature
                                          # X-Cache: MISS then HIT, RateLimit-* headers
  for i in 1 2 3 4 5 6 7; do curl -s -o /dev/null -w '%{{http_code}} ' \
      -H 'apikey: {DEMO_KEY}' {gw}/api/t; done; echo     # 429 once the 5 are used

The AI gateway on /v1/ (OpenAI's protocol; pi-1 and pi-2 stand in for two local models):
  curl -s {gw}/v1/chat/completions -H 'content-type: application/json' \\
      -d '{{"model": "demo-chat", "messages": [{{"role": "user", "content": "hello"}}]}}'
  curl -sN {gw}/v1/chat/completions -H 'content-type: application/json' \\
      -d '{{"model": "demo-chat", "stream": true,
           "messages": [{{"role": "user", "content": "hi"}}]}}'
                                          # kill pi-1 and ask again: pi-2 answers
  (or any OpenAI SDK: base_url="{gw}/v1", model="demo-chat")

Failover: kill a device and watch its traffic move to the others, without a failed request.
  # terminal 2: one line per request (the answering device, then the status)
  while sleep 0.3; do curl -s -w ' %{{http_code}}\\n' {gw}/sensors/t; done
  # terminal 3: {victim} dies; then ask the gateway what it sees (ejected, unhealthy, counts)
  kill -9 {victim_pid}
  {piuptime} status -c {config_path}
  # bring {victim} back on its port: health checks return it, ramping up over 10 s
  {restart}
  # or make a device hang instead: its answers time out (ttfb 2s) and it is ejected
  kill -STOP <pid>; kill -CONT <pid>

The config is {config_path}
Edit and save it (or `kill -HUP <gateway pid>`): the gateway reloads without dropping a request.
One JSON access-log line per request follows below. Ctrl-C stops everything.
""",
        file=sys.stderr,
        flush=True,
    )
