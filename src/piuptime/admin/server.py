"""The admin listener: the FastAPI admin API (:mod:`piuptime.admin.api`) served by uvicorn on the
gateway's own event loop, on its own address (``admin.listen``), only when the config has an
``admin:`` section.

Why uvicorn in-process: it is the well-kept ASGI server FastAPI is made for, and it runs as a
few protocol objects and one ticking task on the loop the gateway already has (no thread, no
second process). Three things are done here so it fits the gateway's life rather than its own:

- the socket is bound here, before uvicorn sees it, so a taken port is an ``OSError`` at
  ``App.start`` (uvicorn would ``sys.exit``), and ``:0`` gives its real port at once;
- uvicorn's signal capture is switched off (``capture_signals``): SIGTERM, SIGINT and SIGHUP
  stay the gateway's (drain, reload);
- its ``startup``/``main_loop``/``shutdown`` are driven from :meth:`AdminServer.start` and
  :meth:`AdminServer.aclose`: stop accepting, close idle connections, let requests in flight
  finish up to the timeout, then cancel what is left.

Reload: a changed token set applies to the next request; a changed ``admin.listen`` (or an
``admin:`` section added or removed) needs a restart, and until then the listener keeps its
address *and* its previous tokens, so a reload can never leave an exposed listener open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import APIRouter

from piuptime.config.schema import AdminConfig, _is_loopback_host

from .api import AdminContext, AdminSource, TokenSet, create_app, status_document
from .audit import AuditLog, SQLiteAuditLog

__all__ = ["AdminServer", "status_document"]

log = logging.getLogger("piuptime.admin")


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the gateway owns the process's signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for ``host:port`` (``""``: every interface, IPv4 and IPv6)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[Any] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class AdminServer:
    """The admin listener of one :class:`piuptime.app.App`."""

    def __init__(
        self,
        source: AdminSource,
        settings: AdminConfig,
        *,
        audit_log: AuditLog | None = None,
        routers: Sequence[APIRouter] = (),
        drain_timeout: float = 5.0,
    ) -> None:
        self.source = source
        self.settings = settings
        self.tokens = TokenSet(settings)
        self.audit_log: AuditLog = audit_log or SQLiteAuditLog(Path(source.config.store.sqlite))
        self.app = create_app(source, tokens=self.tokens, audit_log=self.audit_log, routers=routers)
        self.context: AdminContext = self.app.state.admin
        self.drain_timeout = drain_timeout
        self.sockets: list[socket.socket] = []
        self._server: _EmbeddedServer | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if not self.tokens.required and not _is_loopback_host(self.settings.host):
            # the config refuses this already; a settings object built by other means must not
            # slip through either
            raise ValueError(
                f"refusing to start the admin listener on {self.settings.listen} without a "
                "token: set admin.token or listen on loopback"
            )
        self._note_file_later()
        audit = self.audit_log
        self.source.metrics.counter(
            "admin_audit_failures",
            "Admin changes whose audit entry could not be stored (written to the log instead).",
            read=lambda: [((), float(audit.failures_total))],
        )
        try:
            sockets = _bind(self.settings.host, self.settings.port)
        except OSError as exc:
            raise OSError(
                exc.errno, f"admin listener on {self.settings.listen}: {exc.strerror or exc}"
            ) from None
        config = uvicorn.Config(
            self.app,
            loop="none",
            lifespan="off",
            http="httptools",
            ws="none",
            interface="asgi3",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_keep_alive=30,
            timeout_graceful_shutdown=int(self.drain_timeout) or 1,
            backlog=128,
        )
        config.load()
        quiet = logging.getLogger("uvicorn.error")  # its "Shutting down" is ours to say
        if quiet.level == logging.NOTSET:
            quiet.setLevel(logging.WARNING)
        server = _EmbeddedServer(config)
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup(sockets=sockets)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        self.sockets = sockets
        self._server = server
        self._ticker = asyncio.get_running_loop().create_task(server.main_loop())
        who = ", ".join(self.settings.named_tokens()) or "no token"
        log.info("admin listener on %s (tokens: %s)", self.address, who)

    @property
    def server(self) -> AdminServer:
        """Itself: callers of the former listener reach ``app.admin.server.sockets``."""
        return self

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        """``http://host:port`` of the bound listener (the real port when ``:0`` was asked)."""
        host, port = self.sockets[0].getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def reconfigure(self, new: AdminConfig | None) -> None:
        """Apply a reloaded ``admin:`` section: new tokens now, a new address at restart. (Called
        after every successful reload: the file's ``${ENV}`` references are noted for redaction.)
        """
        self._note_file_later()
        if new is None:
            log.warning(
                "the admin section was removed; restart the process to stop the admin listener "
                "(it keeps its previous settings until then)"
            )
        elif (new.host, new.port) != (self.settings.host, self.settings.port):
            log.warning(
                "admin.listen changed; restart the process to apply it (the admin listener "
                "keeps its previous address and tokens until then)"
            )
        else:
            self.settings = new
            self.tokens.update(new)

    def _note_file_later(self) -> None:
        path = self.source.config_path
        if path is None:
            return

        async def note() -> None:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                text = await asyncio.to_thread(path.read_text, encoding="utf-8-sig")
                self.context.note_config_text(text)

        task = asyncio.get_running_loop().create_task(note())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def note_config_text(self, text: str) -> None:
        """The text of a config just loaded: its ``${ENV}`` values are redacted from then on."""
        self.context.note_config_text(text)

    async def aclose(self, timeout: float | None = None) -> None:
        """Stop accepting, let requests in flight finish (up to ``timeout``), close."""
        server = self._server
        if server is not None:
            self._server = None
            if timeout is not None:
                server.config.timeout_graceful_shutdown = max(1, int(timeout))
            server.should_exit = True
            if self._ticker is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await self._ticker
            await server.shutdown(sockets=self.sockets)
            log.info("admin listener stopped")
        await self.audit_log.aclose()
