"""The admin listener: ``GET /status`` (live state as JSON), ``GET /metrics`` (Prometheus text)
and ``GET /healthz``.

It runs on piuptime's own HTTP/1.1 server, on its own address (``admin.listen``), only when the
config has an ``admin:`` section. With ``admin.token`` set, every request but ``/healthz`` must
carry ``Authorization: Bearer <token>``; the config refuses a listener off loopback without one.

Reload: a changed ``admin.token`` applies to the next request; a changed ``admin.listen`` (or an
``admin:`` section added or removed) needs a restart, and until then the listener keeps its
address *and* its previous token, so a reload can never leave an exposed listener open.
"""

from __future__ import annotations

import hmac
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from piuptime import __version__
from piuptime.config.schema import AdminConfig, Config
from piuptime.http1.errors import error_body
from piuptime.http1.server import Request, Responder, Server, ServerLimits

if TYPE_CHECKING:
    from piuptime.gateway.runtime import Runtime
    from piuptime.observe.metrics import Metrics

__all__ = ["ADMIN_LIMITS", "AdminServer", "StatusSource", "status_document"]

log = logging.getLogger("piuptime.admin")

#: The admin endpoints take no request body; keep what a client may send small.
ADMIN_LIMITS = ServerLimits(
    max_header_bytes=16 * 1024,
    max_header_count=100,
    max_body_bytes=64 * 1024,
    header_timeout=10.0,
    idle_timeout=75.0,
    body_timeout=10.0,
)


class ReloadView(Protocol):
    @property
    def succeeded(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def last_error(self) -> str | None: ...


class StatusSource(Protocol):
    """What ``/status`` reads: the running app (``piuptime.app.App``) fits."""

    @property
    def config(self) -> Config: ...
    @property
    def config_path(self) -> Path | None: ...
    @property
    def runtime(self) -> Runtime | None: ...
    @property
    def reloads(self) -> ReloadView: ...
    @property
    def metrics(self) -> Metrics: ...


def status_document(source: StatusSource, uptime_s: float) -> dict[str, Any]:
    """The ``/status`` body (see docs/operations.md)."""
    runtime = source.runtime
    path = source.config_path
    reloads = source.reloads
    return {
        "version": __version__,
        "uptime_s": round(uptime_s, 3),
        "config": str(path) if path is not None else None,
        "routes": len(source.config.routes),
        "reloads": {
            "succeeded": reloads.succeeded,
            "failed": reloads.failed,
            "last_error": reloads.last_error,
        },
        "upstreams": runtime.snapshot()["upstreams"] if runtime is not None else {},
    }


_JSON = b"application/json"
_NO_STORE = (b"cache-control", b"no-store")
_ALLOW = b"GET, HEAD"
_READ_METHODS = frozenset({b"GET", b"HEAD"})
_STATUS = b"/status"
_HEALTHZ = b"/healthz"
_METRICS = b"/metrics"
_PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"
_HEALTHZ_BODY = orjson.dumps({"status": "ok"})
_CHALLENGE = b'Bearer realm="piuptime"'
_CHALLENGE_INVALID = b'Bearer realm="piuptime", error="invalid_token"'


class AdminServer:
    """The admin listener of one :class:`piuptime.app.App`."""

    def __init__(self, source: StatusSource, settings: AdminConfig) -> None:
        self.source = source
        self.settings = settings
        self.started = time.monotonic()
        self.server = Server(self.handle, ADMIN_LIMITS)

    async def start(self) -> None:
        await self.server.listen(self.settings.host, self.settings.port)
        auth = "bearer token required" if self.settings.token is not None else "no token"
        log.info("admin listener on %s (%s)", self.address, auth)

    @property
    def address(self) -> str:
        """``http://host:port`` of the bound listener (the real port when ``:0`` was asked)."""
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def reconfigure(self, new: AdminConfig | None) -> None:
        """Apply a reloaded ``admin:`` section: a new token now, a new address at restart."""
        if new is None:
            log.warning(
                "the admin section was removed; restart the process to stop the admin listener "
                "(it keeps its previous settings until then)"
            )
        elif (new.host, new.port) != (self.settings.host, self.settings.port):
            log.warning(
                "admin.listen changed; restart the process to apply it (the admin listener "
                "keeps its previous address and token until then)"
            )
        else:
            self.settings = new

    async def aclose(self, timeout: float = 1.0) -> None:
        self.server.close_listeners()
        await self.server.drain(timeout)
        self.server.abort_all()

    # -- requests ------------------------------------------------------------------------------

    async def handle(self, req: Request, resp: Responder) -> None:
        path = req.path
        if path == _HEALTHZ:
            if self._method_allowed(req, resp):
                resp.send(200, _HEALTHZ_BODY, [_NO_STORE])
            return
        if not self._authorized(req, resp):
            return
        if path == _METRICS:
            if self._method_allowed(req, resp):
                text = self.source.metrics.render().encode()
                resp.send(200, text, [_NO_STORE], content_type=_PROMETHEUS)
            return
        if path != _STATUS:
            method = req.method.decode("latin-1")
            target = path.decode("latin-1")
            _error(
                resp,
                404,
                "not_found",
                f"no admin endpoint {method} {target}; try GET /status or GET /metrics",
            )
            return
        if self._method_allowed(req, resp):
            document = status_document(self.source, time.monotonic() - self.started)
            resp.send(200, orjson.dumps(document), [_NO_STORE])

    def _method_allowed(self, req: Request, resp: Responder) -> bool:
        if req.method in _READ_METHODS:
            return True
        path = req.path.decode("latin-1")
        _error(
            resp,
            405,
            "method_not_allowed",
            f"{path} answers GET and HEAD, not {req.method.decode('latin-1')}",
            [(b"allow", _ALLOW)],
        )
        return False

    def _authorized(self, req: Request, resp: Responder) -> bool:
        token = self.settings.token
        if token is None:
            return True
        given = _bearer(req.headers)
        if given is None:
            _error(
                resp,
                401,
                "unauthorized",
                "this admin listener needs Authorization: Bearer <admin.token>",
                [(b"www-authenticate", _CHALLENGE)],
            )
            return False
        if not hmac.compare_digest(given, token.encode("utf-8")):
            _error(
                resp,
                401,
                "invalid_token",
                "the bearer token does not match admin.token",
                [(b"www-authenticate", _CHALLENGE_INVALID)],
            )
            return False
        return True


def _bearer(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The credentials of the first ``Authorization: Bearer ...`` header, or None."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credentials = value.partition(b" ")
            if scheme.lower() != b"bearer" or not credentials.strip():
                return None
            return credentials.strip()
    return None


def _error(
    resp: Responder,
    status: int,
    code: str,
    message: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    resp.send(status, error_body(status, code, message), [_NO_STORE, *(headers or ())], _JSON)
