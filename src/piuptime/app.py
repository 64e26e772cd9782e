"""Assemble the gateway from a config and own its life: start, reload, drain, stop.

Reload (file change or SIGHUP): the file is read and validated on a worker thread, compiled beside
the running configuration, then swapped in with one assignment. Requests in flight finish on the
old runtime; upstreams whose config did not change keep their pools. An invalid file changes
nothing: the error is logged, counted and kept in ``last_reload_error``.

Stop (SIGTERM/SIGINT): tell systemd, stop accepting, let in-flight requests finish up to
``gateway.drain_timeout``, then close what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from piuptime import __version__
from piuptime.config import Config, ConfigError, load_config
from piuptime.config.schema import Listener
from piuptime.configstore import ConfigService, ConfigStoreError, InvalidChange, Issue, Loaded
from piuptime.gateway.consumers import Consumers
from piuptime.gateway.lane import FastLane
from piuptime.gateway.lane import attach as attach_lane
from piuptime.gateway.lane import available as lane_available
from piuptime.gateway.plugins import PluginEnv
from piuptime.gateway.proxy import ProxyHandler
from piuptime.gateway.runtime import Runtime, compile_runtime, retired_upstreams
from piuptime.http1.server import Request, Server, ServerLimits
from piuptime.observe.accesslog import AccessLog, now_iso
from piuptime.observe.metrics import Metrics
from piuptime.observe.process import register_process_metrics
from piuptime.observe.requestmetrics import RequestMetrics
from piuptime.observe.statemetrics import register_reload_metrics, register_upstream_metrics
from piuptime.observe.tracing import Tracer
from piuptime.state import open_stores
from piuptime.state.memory import MemoryStores
from piuptime.systemd import Notifier

if TYPE_CHECKING:
    from fastapi import APIRouter

    from piuptime.admin.server import AdminServer
    from piuptime.llm.runtime import LlmRuntime
    from piuptime.observe.analytics import Analytics

log = logging.getLogger("piuptime")


@dataclass
class ReloadStats:
    """What an operator (and, later, /metrics) wants to know about reloads."""

    succeeded: int = 0
    failed: int = 0
    last_success: float | None = None
    last_error: str | None = None
    last_error_time: float | None = None
    history: list[str] = field(default_factory=list)


def server_limits(config: Config) -> ServerLimits:
    lim = config.gateway.limits
    return ServerLimits(
        max_header_bytes=lim.max_header_bytes,
        max_header_count=lim.max_header_count,
        max_body_bytes=lim.max_body_bytes,
        header_timeout=lim.header_timeout,
        idle_timeout=lim.idle_timeout,
        body_timeout=lim.body_timeout,
    )


def tls_context(listener: Listener) -> ssl.SSLContext | None:
    if listener.tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(listener.tls.cert, listener.tls.key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class App:
    """The gateway process: listeners, the proxy handler, reload and shutdown."""

    def __init__(
        self,
        config: Config,
        config_path: Path | None = None,
        *,
        notifier: Notifier | None = None,
        watch_interval: float = 1.0,
    ) -> None:
        self.config = config
        self.config_path = config_path
        # where routes, upstreams, consumers and plugins come from: the file or a database
        self.config_service = ConfigService.for_config(config, config_path)
        self.config_version = 0  # of the running configuration (docs/config-store.md)
        self.notifier = notifier or Notifier()
        self.watch_interval = watch_interval
        self.servers: list[Server] = []
        self.lanes: list[FastLane] = []  # the C fast lane of each plain-TCP listener
        self._fast_lane = config.gateway.fast_lane
        self.admin: AdminServer | None = None  # the admin listener, when config.admin is set
        self.reloads = ReloadStats()
        self.runtime: Runtime | None = None
        self.handler: ProxyHandler | None = None
        self.access_log = AccessLog(config.gateway.access_log.path)
        # per-minute aggregates and the recent-requests ring (None without analytics:)
        self.analytics: Analytics | None = None
        self._analytics_section = config.analytics
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._watch_task: asyncio.Task[None] | None = None
        self._file_sig = _file_signature(config_path)
        self._tls: list[ssl.SSLContext | None] = []
        self.metrics = Metrics()
        # per request (a log-phase observer); the rest is read when /metrics is scraped
        self.request_metrics = RequestMetrics(self.metrics)
        register_process_metrics(self.metrics, __version__)
        register_reload_metrics(self.metrics, self.reloads, time.time())
        register_upstream_metrics(self.metrics, lambda: self.runtime)
        self.plugin_env: PluginEnv | None = None
        self._background: set[asyncio.Future[Any]] = set()

    # -- start -------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        loaded = await self.config_service.start(self.config)  # database: the stored config
        self.config, self.config_version = loaded.config, loaded.version
        self.plugin_env = await self._make_env(self.config)
        self.runtime = self._compile(self.config)
        for upstream in self.runtime.upstreams.values():
            upstream.start()  # active health checks
        self.access_log.start(loop)
        self.handler = ProxyHandler(self.runtime, self.access_log)
        self.handler.request_metrics = self.request_metrics
        self.handler.tracer = Tracer.from_config(self.config.tracing, self.metrics)
        if self.config.analytics.enabled:
            from piuptime.observe.analytics import Analytics  # sqlite3 only when used

            self.analytics = Analytics.from_config(self.config, self.metrics)
            self.analytics.start(loop)  # the writer: a timer and one thread
            self.handler.observers = (*self.handler.observers, self.analytics.observe)
        limits = server_limits(self.config)
        for listener in self.config.gateway.listen:
            ctx = tls_context(listener)
            server = Server(self.handler.handle, limits, ssl=ctx, on_error=self._on_error)
            if ctx is None and self.config.gateway.fast_lane:
                lane = attach_lane(server, self.handler, limits)
                if lane is not None:
                    self.lanes.append(lane)
            await server.listen(listener.host, listener.port)
            self.servers.append(server)
            self._tls.append(ctx)
        self._lane_metrics()
        if self.config.admin is not None:
            from piuptime.admin.server import AdminServer  # FastAPI loads only here

            self.admin = AdminServer(
                self, self.config.admin, audit_log=self.config_service.audit_log()
            )
            await self.admin.start()
        self.notifier.ready(f"serving on {', '.join(self.addresses())}")
        self.notifier.start_watchdog(loop)
        if self.config_path is not None and self.watch_interval > 0:
            self._watch_task = loop.create_task(self._watch())
        self.config_service.register_metrics(self.metrics)
        self.config_service.start_watch(self)  # database: follow changes made elsewhere
        log.info("piuptime ready on %s (%s)", ", ".join(self.addresses()), _summary(self.config))

    def _lane_metrics(self) -> None:
        if self.config.gateway.fast_lane and not lane_available():
            log.warning(
                "the fast lane is not built (no C compiler when piuptime was installed): every "
                "request takes the Python path (docs/internals.md, 'The fast lane')"
            )
        lanes = self.lanes
        self.metrics.counter(
            "lane_requests",
            "Requests the C fast lane forwarded itself (docs/internals.md)",
            read=lambda: [((), float(sum(lane.requests for lane in lanes)))],
        )
        self.metrics.counter(
            "lane_handovers",
            "Client connections the fast lane gave to the Python path: a request it does not "
            "take, or an attempt that failed before its answer started",
            read=lambda: [((), float(sum(lane.handovers for lane in lanes)))],
        )

    async def _make_env(self, config: Config) -> PluginEnv:
        """What plugins share for the life of the process: in-memory state, the Redis stores
        when ``store.redis`` is set, metrics and a place to run background work."""
        shared = None
        if config.store.redis is not None:
            shared = await open_stores("redis", redis_url=config.store.redis)
            redis = shared
            self.metrics.gauge(
                "redis_up",
                "1 while the shared Redis answers, 0 while calls to it fail (then each use "
                "fails open or closed as configured).",
                read=lambda: [((), 1.0 if redis.available else 0.0)],
            )
            self.metrics.counter(
                "redis_failures",
                "Calls to the shared Redis that failed since start (connection, timeout).",
                read=lambda: [((), float(redis.failures_total))],
            )
        return PluginEnv(
            stores=MemoryStores(),
            shared=shared,
            metrics=self.metrics,
            consumers=Consumers.from_config(config),
            upstreams={},
            spawn=self.spawn,
        )

    def spawn(self, work: Awaitable[Any]) -> None:
        """Run background work for a plugin; kept referenced, cancelled at stop."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def addresses(self) -> list[str]:
        out = []
        for server, listener in zip(self.servers, self.config.gateway.listen, strict=False):
            scheme = "https" if listener.tls is not None else "http"
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                host = f"[{host}]" if ":" in host else host
                out.append(f"{scheme}://{host}:{port}")
        return out

    def _on_error(self, req: Request | None, status: int, reason: str) -> None:
        """Requests refused by the wire layer (400, 408, 413, 431, ...) still get a log line."""
        self.request_metrics.refused(status)
        if not self.access_log.enabled:
            return
        self.access_log.record(
            {
                "time": now_iso(),
                "request_id": None,
                "route": None,
                "consumer": None,
                "method": req.method.decode("latin-1") if req is not None else None,
                "path": req.path.decode("latin-1") if req is not None else None,
                "status": status,
                "bytes": 0,
                "upstream": None,
                "target": None,
                "attempts": 0,
                "cache": None,
                "total_ms": None,
                "upstream_ms": None,
                "gateway_ms": None,
                "error": reason,
            }
        )

    # -- reload ------------------------------------------------------------------------------

    async def reload(self, reason: str = "signal") -> bool:
        """Validate and swap in the config file; False (and nothing changed) if it is invalid."""
        if self.config_path is None:
            return False
        async with self._reload_lock:
            self.notifier.reloading()
            try:
                ok = await self._reload_locked(reason)
            finally:
                self.notifier.ready("serving")
            return ok

    async def _reload_locked(self, reason: str) -> bool:
        assert self.config_path is not None and self.handler is not None
        assert self.runtime is not None
        self._file_sig = _file_signature(self.config_path)
        try:
            loaded = await self.config_service.load()  # the file (database: + the entities)
            config = loaded.config
            new_runtime = self._compile(config)
        except ConfigError as exc:
            self._reload_failed(reason, str(exc))
            return False
        except (OSError, ValueError) as exc:
            self._reload_failed(reason, f"{self.config_path}: {exc}")
            return False
        except ConfigStoreError as exc:
            self._reload_failed(reason, f"config store: {exc}")
            return False
        same_listeners = [str(x) for x in config.gateway.listen] == [
            str(x) for x in self.config.gateway.listen
        ]
        if not same_listeners:
            log.warning("gateway.listen changed; restart the process to apply new listeners")
        else:
            try:
                self._rotate_certificates(config.gateway.listen)
            except (OSError, ssl.SSLError) as exc:
                self._reload_failed(reason, f"{self.config_path}: TLS certificate: {exc}")
                return False
        self._swap(config, new_runtime, reason)
        self.config_service.adopt(loaded)
        self.config_version = loaded.version
        return True

    def _swap(self, config: Config, new_runtime: Runtime, reason: str) -> None:
        """Put a compiled configuration in place (the one assignment) and what follows."""
        assert self.handler is not None and self.runtime is not None
        old = self.runtime
        for upstream in new_runtime.upstreams.values():
            upstream.start()  # new or changed upstreams; carried-over ones already run
        self.handler.runtime = new_runtime  # the swap: one assignment
        self.runtime = new_runtime
        self.config = config
        limits = server_limits(config)
        for server in self.servers:
            server.limits = limits
        if config.gateway.access_log.path != self.access_log.path:
            log.warning("gateway.access_log changed; restart the process to apply it")
        if config.analytics != self._analytics_section:
            log.warning("analytics changed; restart the process to apply it")
        self.handler.tracer.reconfigure(config.tracing)
        for lane in self.lanes:
            lane.configure(new_runtime, limits)
        if config.gateway.fast_lane != self._fast_lane:
            log.warning("gateway.fast_lane changed; restart the process to apply it")
        if self.admin is not None:
            self.admin.reconfigure(config.admin)  # a new token applies; a new address warns
        elif config.admin is not None:
            log.warning("admin section added; restart the process to start the admin listener")
        for upstream in retired_upstreams(old, new_runtime):
            asyncio.get_running_loop().create_task(upstream.aclose())
        old_llm = old.attached.get("llm")
        if old_llm is not None:
            from piuptime.llm.runtime import retired_providers

            for provider in retired_providers(old_llm, new_runtime.attached.get("llm")):
                self.spawn(provider.aclose())
        self.reloads.succeeded += 1
        self.reloads.last_success = time.time()
        log.info("configuration reloaded (%s): %s", reason, _summary(config))

    def _compile(self, config: Config) -> Runtime:
        """Compile ``config`` beside the running runtime. Compiling points the plugin
        environment at the new upstreams and consumers; when it fails, that is undone."""
        saved = dict(vars(self.plugin_env)) if self.plugin_env is not None else {}
        try:
            llm = None
            if config.llm is not None:
                from piuptime.llm.runtime import build_llm  # the AI gateway loads only here

                llm = build_llm(config, self.llm, self.metrics)
            runtime = compile_runtime(
                config, self.runtime, self.plugin_env, llm.routes if llm is not None else ()
            )
            runtime.attached["llm"] = llm
            return runtime
        except BaseException:
            self._restore_env(saved)
            raise

    @property
    def llm(self) -> LlmRuntime | None:
        """The running AI gateway (``llm:``), None without one."""
        runtime = self.runtime
        return runtime.attached.get("llm") if runtime is not None else None

    def _restore_env(self, saved: dict[str, Any]) -> None:
        if self.plugin_env is not None:
            vars(self.plugin_env).update(saved)

    # -- the database config source (piuptime.configstore) -----------------------------------

    @property
    def config_source(self) -> str:
        """``file``, ``sqlite`` or ``postgres``: ``config_store.kind``."""
        return self.config_service.kind

    def admin_routers(self) -> list[APIRouter]:
        """Routers the admin API serves beside its own: the config store's."""
        from piuptime.admin.config_routes import config_router

        return [config_router()]

    async def apply_change(
        self, loaded: Loaded, commit: Callable[[], Awaitable[int]], reason: str
    ) -> int:
        """A change made through the admin API (database mode), already validated: compile it,
        ``commit()`` it to the store, swap it in; returns the stored version. When compiling or
        the write fails nothing changes (the runtime, the plugin environment, the store)."""
        async with self._reload_lock:
            assert self.runtime is not None
            saved = dict(vars(self.plugin_env)) if self.plugin_env is not None else {}
            try:
                new_runtime = self._compile(loaded.config)
            except ValueError as exc:
                raise InvalidChange([Issue("", str(exc))]) from None
            try:
                version = await commit()
            except BaseException:
                self._restore_env(saved)
                for upstream in retired_upstreams(new_runtime, self.runtime):
                    self.spawn(upstream.aclose())  # made for the change, never started
                raise
            loaded = replace(loaded, version=version)
            self._swap(loaded.config, new_runtime, reason)
            self.config_service.adopt(loaded)
            self.config_version = version
            return version

    async def sync_config(self, version: int) -> bool:
        """Load the stored configuration if ``version`` is newer than the running one (a
        change made elsewhere was announced); False if it could not be applied."""
        async with self._reload_lock:
            if version <= self.config_version:
                return True
            self.notifier.reloading()
            try:
                return await self._reload_locked(f"config store version {version}")
            finally:
                self.notifier.ready("serving")

    def _rotate_certificates(self, listeners: list[Listener]) -> None:
        """Re-read each TLS listener's cert and key (renewed certificates apply without a
        restart). Each pair is loaded into a throwaway context first, so a bad file fails the
        reload before the live context is touched; new handshakes then use the new pair."""
        pairs = []
        for ctx, listener in zip(self._tls, listeners, strict=False):
            if ctx is None or listener.tls is None:
                continue
            check = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            check.load_cert_chain(listener.tls.cert, listener.tls.key)
            pairs.append((ctx, listener.tls.cert, listener.tls.key))
        for ctx, cert, key in pairs:
            ctx.load_cert_chain(cert, key)

    def _reload_failed(self, reason: str, message: str) -> None:
        self.reloads.failed += 1
        self.reloads.last_error = message
        self.reloads.last_error_time = time.time()
        log.error(
            "configuration reload (%s) rejected; still serving the previous one:\n%s",
            reason,
            message,
        )

    async def _watch(self) -> None:
        """Poll the config file's identity (mtime, size, inode); reload when it changes."""
        assert self.config_path is not None
        while not self._stop.is_set():
            await asyncio.sleep(self.watch_interval)
            sig = _file_signature(self.config_path)
            if sig is not None and sig != self._file_sig:
                await self.reload("file changed")

    # -- stop --------------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        """True once stopping began (the admin /readyz answers 503 from then on)."""
        return self._stop.is_set()

    def request_stop(self) -> None:
        self._stop.set()

    async def stop(self) -> None:
        """Stop accepting, drain in-flight requests up to the drain timeout, close everything."""
        self.notifier.stopping()
        self._stop.set()
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        await self.config_service.stop_watch()
        for lane in self.lanes:
            lane.drain()
        for server in self.servers:
            server.close_listeners()
        timeout = self.config.gateway.drain_timeout
        results = await asyncio.gather(*(s.drain(timeout) for s in self.servers))
        if not all(results):
            log.warning("drain timeout (%.1fs) reached; closing remaining connections", timeout)
        for server in self.servers:
            server.abort_all()
        for lane in self.lanes:
            lane.close()
        if self.admin is not None:
            await self.admin.aclose()
        await self.config_service.aclose()
        if self.runtime is not None:
            for upstream in self.runtime.upstreams.values():
                await upstream.aclose()
            llm = self.llm
            if llm is not None:
                for provider in llm.providers.values():
                    await provider.aclose()
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.plugin_env is not None:
            await self.plugin_env.stores.aclose()
            if self.plugin_env.shared is not None:
                await self.plugin_env.shared.aclose()
        if self.handler is not None:
            await self.handler.tracer.aclose()  # sends the last spans
        if self.analytics is not None:
            await self.analytics.aclose()  # writes what the last requests left
        await self.access_log.aclose()
        self.notifier.close()
        log.info("piuptime stopped")

    async def run_until_stopped(self) -> None:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads; SIGUSR1 reopens the access log file."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload("SIGHUP")))
        loop.add_signal_handler(signal.SIGUSR1, self.access_log.reopen)
        try:
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
            await self.stop()


def _summary(config: Config) -> str:
    def n(count: int, word: str) -> str:
        return f"{count} {word}{'' if count == 1 else 's'}"

    text = f"{n(len(config.routes), 'route')}, {n(len(config.upstreams), 'upstream')}"
    if config.llm is not None:
        text += f", {n(len(config.llm.models), 'model group')}"
    return text


def _file_signature(path: Path | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


async def run(config_path: Path, *, watch_interval: float = 1.0) -> None:
    """Load, start and serve until stopped (``piuptime run``)."""
    config = load_config(config_path)
    app = App(config, config_path, watch_interval=watch_interval)
    await app.start()
    await app.run_until_stopped()
