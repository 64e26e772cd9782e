"""Active health checks: probe each target on a timer, with thresholds and jitter.

A target becomes unhealthy after ``unhealthy_after`` failed probes in a row and healthy again
after ``healthy_after`` passing ones. Targets start healthy (traffic is not held back waiting
for the first probe; passive detection covers the gap). Each target's probes are spread with
±``jitter`` of the interval, and the first probe of each target is placed at a random point of
the first interval, so a fleet of gateways does not probe a device in lock-step.

Probe kinds:

- ``http``: a request (``method``, ``path``, optional ``Host``) on a dedicated connection pool;
  it passes when the status is in ``expected_statuses`` and, if set, the body contains
  ``body_contains``. Bodies beyond 64 KiB are not read.
- ``tcp``: the connection opens within the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from piuptime.http1.client import Pool, PoolOptions, UpstreamError

log = logging.getLogger("piuptime.health")

_MAX_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    scheme: str
    host: str
    port: int
    label: str = ""


@dataclass(slots=True)
class CheckSettings:
    kind: str = "http"  # http | tcp
    path: str = "/healthz"
    method: str = "GET"
    host: str | None = None
    expected_statuses: Collection[int] = field(default_factory=lambda: range(200, 400))
    body_contains: bytes | None = None
    interval: float = 5.0
    timeout: float = 1.0
    healthy_after: int = 2
    unhealthy_after: int = 3
    jitter: float = 0.1
    tls_verify: bool = True
    ca_file: str | None = None


class ActiveChecker:
    """Probes every target of one upstream; ``on_change(index, healthy)`` on each transition."""

    def __init__(
        self,
        targets: Sequence[ProbeTarget],
        settings: CheckSettings,
        on_change: Callable[[int, bool], None] | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.targets = list(targets)
        self.settings = settings
        self.on_change = on_change
        self.healthy = [True] * len(targets)
        self.last_error: list[str | None] = [None] * len(targets)
        self.probes_total = 0
        self._passes = [0] * len(targets)
        self._fails = [0] * len(targets)
        self._rng = rng or random.Random()
        self._tasks: list[asyncio.Task[None]] = []
        self._pools: list[Pool | None] = [None] * len(targets)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for i in range(len(self.targets)):
            self._tasks.append(loop.create_task(self._run(i)))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        for pool in self._pools:
            if pool is not None:
                await pool.aclose()

    async def _run(self, index: int) -> None:
        s = self.settings
        await asyncio.sleep(self._rng.uniform(0, s.interval))
        while True:
            await self.probe_once(index)
            spread = s.interval * s.jitter
            await asyncio.sleep(max(0.0, s.interval + self._rng.uniform(-spread, spread)))

    async def probe_once(self, index: int) -> bool:
        """Run one probe of ``index``, apply the thresholds, return whether it passed."""
        self.probes_total += 1
        try:
            error = await asyncio.wait_for(self._probe(index), self.settings.timeout)
        except TimeoutError:
            error = f"no answer within {self.settings.timeout}s"
        except (OSError, UpstreamError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        self.last_error[index] = error
        self._apply(index, error is None)
        return error is None

    def _apply(self, index: int, ok: bool) -> None:
        s = self.settings
        if ok:
            self._fails[index] = 0
            self._passes[index] += 1
            if not self.healthy[index] and self._passes[index] >= s.healthy_after:
                self._set(index, True)
        else:
            self._passes[index] = 0
            self._fails[index] += 1
            if self.healthy[index] and self._fails[index] >= s.unhealthy_after:
                self._set(index, False)

    def _set(self, index: int, healthy: bool) -> None:
        self.healthy[index] = healthy
        t = self.targets[index]
        log.warning(
            "target %s is %s (active check%s)",
            t.label or f"{t.host}:{t.port}",
            "healthy again" if healthy else "unhealthy",
            "" if healthy else f": {self.last_error[index]}",
        )
        if self.on_change is not None:
            self.on_change(index, healthy)

    async def _probe(self, index: int) -> str | None:
        t = self.targets[index]
        s = self.settings
        if s.kind == "tcp":
            _, writer = await asyncio.open_connection(t.host, t.port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return None
        pool = self._pools[index]
        if pool is None:
            pool = Pool(
                t.scheme,
                t.host,
                t.port,
                PoolOptions(
                    max_connections=1,
                    max_idle=1,
                    connect_timeout=s.timeout,
                    read_timeout=s.timeout,
                    tls_verify=s.tls_verify,
                    ca_file=s.ca_file,
                ),
            )
            self._pools[index] = pool
        host = s.host or (f"{t.host}:{t.port}" if ":" not in t.host else f"[{t.host}]:{t.port}")
        headers = [(b"host", host.encode()), (b"user-agent", b"piuptime-health-check")]
        resp = await pool.request(s.method.encode(), s.path.encode(), headers)
        try:
            body = b""
            if s.body_contains is not None:
                while len(body) < _MAX_BODY:
                    chunk = await resp.read()
                    if not chunk:
                        break
                    body += chunk
            else:
                while await resp.read():
                    pass
        finally:
            resp.release()
        if resp.status not in s.expected_statuses:
            return f"status {resp.status}"
        if s.body_contains is not None and s.body_contains not in body:
            return f"body does not contain {s.body_contains!r}"
        return None
