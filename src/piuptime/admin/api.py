"""The admin API: a FastAPI app served on the admin listener (see docs/admin-api.md).

Endpoints: ``/healthz`` and ``/readyz`` (no token), ``/status`` and ``/metrics``, and the JSON API
under ``/api/v1`` (routes, upstreams, analytics, recent requests, the redacted config, validate,
reload, cache purge, the audit log). ``/openapi.json`` is the spec.

For other parts that add endpoints (the database config source's CRUD):

- **Routers.** :func:`create_app` includes every router it is given or that the source offers
  (``source.admin_routers()``, when the source has that method) under ``/api/v1``, behind
  :func:`require_token`, with the shared error responses in the spec. See the marked block in
  :func:`create_app`.
- **Auth.** :func:`require_token` is a FastAPI dependency returning the :class:`Actor` (token name
  and client address) of the request. Every path but ``/healthz`` and ``/readyz`` is already
  checked by the gate middleware before routing (so an unauthenticated client cannot even tell
  which paths exist); the dependency reads the gate's result, verifies by itself where the gate
  did not run, and puts the bearer scheme into the OpenAPI spec.
- **Audit.** ``await audit(request, action, target, detail, result="ok")`` records a change in
  the audit log as the request's actor (:mod:`piuptime.admin.audit`); call it once per change,
  after it was applied (or refused: ``result="invalid"``, ...). ``context(request)`` gives the
  :class:`AdminContext` (the source, the audit log, the token set).
- **Errors.** Raise :class:`AdminError` (or FastAPI's ``HTTPException``): every error body is
  ``{"error": {"status", "code", "message", "errors"?}}`` (``models.ErrorBody``).

The gate also answers HEAD like GET (without the body), refuses request bodies over
``MAX_BODY_BYTES`` (413) and marks every answer ``Cache-Control: no-store``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import orjson
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from piuptime import __version__
from piuptime.config import ConfigError, parse_config
from piuptime.config.schema import AdminConfig, Config
from piuptime.config.units import parse_duration

from . import models as m
from .audit import Actor, AuditEntry, AuditLog
from .purge import PurgeError, purge_cache
from .redact import env_references, redact, redact_text

if TYPE_CHECKING:
    from piuptime.gateway.runtime import Runtime
    from piuptime.observe.metrics import Metrics

__all__ = [
    "API",
    "MAX_BODY_BYTES",
    "PUBLIC_PATHS",
    "AdminContext",
    "AdminError",
    "AdminSource",
    "TokenSet",
    "audit",
    "config_changes",
    "context",
    "create_app",
    "require_token",
    "status_document",
    "strict_query",
]

log = logging.getLogger("piuptime.admin")

API = "/api/v1"
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
MAX_BODY_BYTES = 1024 * 1024
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"

# -- what the API reads: the running app --------------------------------------------------------


class ReloadView(Protocol):
    @property
    def succeeded(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def last_error(self) -> str | None: ...


class AdminSource(Protocol):
    """What the admin API reads and drives: ``piuptime.app.App`` fits. Optional, read with
    ``getattr``: ``analytics`` (``query``/``recent``), ``servers`` and ``draining`` (readiness),
    ``config_source`` (``"file"`` unless a database config source is in use),
    ``admin_routers()`` (extra routers)."""

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

    async def reload(self, reason: str = ...) -> bool: ...


def status_document(source: AdminSource, uptime_s: float) -> dict[str, Any]:
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
        "llm": _llm_snapshot(runtime),
    }


def _llm_snapshot(runtime: Any) -> dict[str, Any] | None:
    """Model groups and their deployments' live state, when an ``llm:`` section runs."""
    llm = runtime.attached.get("llm") if runtime is not None else None
    return llm.snapshot() if llm is not None else None


# -- tokens, context ---------------------------------------------------------------------------


class TokenSet:
    """The admin tokens by name; ``identify`` compares a presented token with every one in
    constant time (``hmac.compare_digest``), without stopping at the first match."""

    def __init__(self, settings: AdminConfig) -> None:
        self._tokens: tuple[tuple[str, bytes], ...] = ()
        self.update(settings)

    def update(self, settings: AdminConfig) -> None:
        self._tokens = tuple((n, t.encode()) for n, t in settings.named_tokens().items())

    @property
    def required(self) -> bool:
        return bool(self._tokens)

    def identify(self, presented: bytes) -> str | None:
        found = None
        for name, token in self._tokens:
            if hmac.compare_digest(presented, token):
                found = name
        return found


@dataclass
class AdminContext:
    """What every endpoint shares: ``app.state.admin``."""

    source: AdminSource
    tokens: TokenSet
    audit_log: AuditLog
    started: float = field(default_factory=time.monotonic)
    #: names of the environment variables the running config refers to (for redaction); only
    #: ever grows, so a value that was once a secret stays hidden
    env_names: set[str] = field(default_factory=set)

    def note_config_text(self, text: str) -> None:
        self.env_names |= env_references(text)


class AdminError(Exception):
    """An error answer: ``{"error": {"status", "code", "message", "errors"?}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        errors: list[str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.errors = errors
        self.headers = dict(headers or {})


def error_json(status: int, code: str, message: str, errors: list[str] | None = None) -> bytes:
    detail: dict[str, Any] = {"status": status, "code": code, "message": message}
    if errors is not None:
        detail["errors"] = errors
    return orjson.dumps({"error": detail})


def _error_response(exc: AdminError) -> Response:
    return Response(
        error_json(exc.status, exc.code, exc.message, exc.errors),
        exc.status,
        headers={"cache-control": "no-store", **exc.headers},
        media_type="application/json",
    )


def context(request: Request) -> AdminContext:
    ctx: AdminContext = request.app.state.admin
    return ctx


_CHALLENGE = 'Bearer realm="piuptime"'
_CHALLENGE_INVALID = 'Bearer realm="piuptime", error="invalid_token"'


def _bearer(value: bytes | None) -> bytes | None:
    if value is None:
        return None
    scheme, _, credentials = value.partition(b" ")
    credentials = credentials.strip()
    if scheme.lower() != b"bearer" or not credentials:
        return None
    return credentials


def _authenticate(ctx: AdminContext, authorization: bytes | None, address: str) -> Actor:
    """The actor of a request, or :class:`AdminError` 401."""
    if not ctx.tokens.required:
        return Actor("anonymous", address)
    presented = _bearer(authorization)
    if presented is None:
        raise AdminError(
            401,
            "unauthorized",
            "this admin listener needs Authorization: Bearer <admin.token>",
            headers={"www-authenticate": _CHALLENGE},
        )
    name = ctx.tokens.identify(presented)
    if name is None:
        raise AdminError(
            401,
            "invalid_token",
            "the bearer token does not match admin.token (or any of admin.tokens)",
            headers={"www-authenticate": _CHALLENGE_INVALID},
        )
    return Actor(name, address)


_bearer_scheme = HTTPBearer(
    auto_error=False,
    description="admin.token, or one of admin.tokens (not needed when the listener has none)",
)


def require_token(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)],
) -> Actor:
    """FastAPI dependency: the request's :class:`Actor`; 401 without a valid token."""
    actor = getattr(request.state, "actor", None)
    if isinstance(actor, Actor):
        return actor
    header = request.headers.get("authorization")
    address = request.client.host if request.client is not None else "-"
    actor = _authenticate(
        context(request), header.encode("latin-1") if header is not None else None, address
    )
    request.state.actor = actor
    return actor


def _query_names(dependant: Any) -> dict[str, bool]:
    """The query parameters an endpoint takes → whether each may repeat (a list)."""
    names: dict[str, bool] = {}
    for p in dependant.query_params:
        annotation = getattr(getattr(p, "field_info", None), "annotation", None)
        repeats = "list" in str(annotation).lower() or "sequence" in str(annotation).lower()
        names[str(getattr(p, "alias", None) or p.name)] = repeats
    for sub in dependant.dependencies:
        names.update(_query_names(sub))
    return names


def strict_query(request: Request) -> None:
    """FastAPI dependency: 422 for a query parameter the endpoint does not take (a typo such as
    ``?limt=5`` would otherwise be ignored without a word), and for one given twice that takes
    a single value (``?limit=1&limit=500`` would otherwise quietly mean 500)."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None or not request.query_params:
        return
    allowed = _query_names(dependant)
    unknown = sorted({k for k in request.query_params if k not in allowed})
    if unknown:
        takes = ", ".join(sorted(allowed)) or "none"
        raise AdminError(
            422,
            "invalid_request",
            f"unknown query parameter {', '.join(map(repr, unknown))} (this endpoint takes: "
            f"{takes})",
        )
    repeated = sorted({k for k in request.query_params if len(request.query_params.getlist(k)) > 1})
    single = [k for k in repeated if not allowed.get(k, False)]
    if single:
        raise AdminError(
            422,
            "invalid_request",
            f"query parameter {', '.join(map(repr, single))} given more than once; it takes "
            "one value",
        )


async def audit(
    request: Request,
    action: str,
    target: str,
    detail: Mapping[str, Any],
    result: str = "ok",
) -> AuditEntry | None:
    """Record a change made by this request (see :mod:`piuptime.admin.audit`)."""
    actor = require_token(request, None)
    return await context(request).audit_log.record(actor, action, target, detail, result)


# -- the gate: auth before routing, HEAD, body size --------------------------------------------


class _Gate:
    """Pure ASGI middleware in front of the routes."""

    def __init__(self, app: ASGIApp, ctx: AdminContext, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.ctx = ctx
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "HEAD":
            scope = dict(scope, method="GET")  # the server drops the body of a HEAD answer
        authorization = None
        length = None
        for name, value in scope["headers"]:
            if name == b"authorization" and authorization is None:
                authorization = value
            elif name == b"content-length":
                length = value
        if scope["path"] not in PUBLIC_PATHS:
            client = scope.get("client")
            address = client[0] if client else "-"
            try:
                actor = _authenticate(self.ctx, authorization, address)
            except AdminError as exc:
                await _error_response(exc)(scope, receive, send)
                return
            scope.setdefault("state", {})["actor"] = actor
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            too_big = AdminError(
                413, "body_too_large", f"the request body is over {self.max_body} bytes"
            )
            await _error_response(too_big)(scope, receive, send)
            return
        seen = 0
        limit = self.max_body

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise AdminError(
                        413, "body_too_large", f"the request body is over {limit} bytes"
                    )
            return message

        async def no_store(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(name.lower() == b"cache-control" for name, _ in headers):
                    headers.append((b"cache-control", b"no-store"))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, limited, no_store)


# -- helpers -----------------------------------------------------------------------------------


def _redacted_config(ctx: AdminContext, config: Config) -> dict[str, Any]:
    data: dict[str, Any] = redact(config.model_dump(mode="json"), ctx.env_names)
    return data


def _config_source(source: AdminSource) -> str:
    """``file`` (the YAML file), or the database kind (``sqlite``, ``postgres``)."""
    kind = getattr(source, "config_source", None)
    if kind is None:
        store = getattr(source.config, "config_store", None)
        kind = getattr(store, "kind", None)
    return str(kind or "file")


def _named(items: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    return {name: item.model_dump(mode="json") for name, item in items}


def config_changes(old: Config, new: Config) -> dict[str, Any]:
    """What a new config changes, by name: routes, upstreams and consumers added, removed and
    changed, and the other top-level sections that changed (names only: no values, so no
    secrets)."""
    out: dict[str, Any] = {}
    pairs = {
        "routes": (
            _named((r.name, r) for r in old.routes),
            _named((r.name, r) for r in new.routes),
        ),
        "upstreams": (_named(old.upstreams.items()), _named(new.upstreams.items())),
        "consumers": (_named(old.consumers.items()), _named(new.consumers.items())),
    }
    for section, (before, after) in pairs.items():
        added = sorted(set(after) - set(before))
        removed = sorted(set(before) - set(after))
        changed = sorted(n for n in set(before) & set(after) if before[n] != after[n])
        if added or removed or changed:
            out[section] = {"added": added, "removed": removed, "changed": changed}
    others = [
        name
        for name in type(new).model_fields
        if name not in pairs and getattr(old, name) != getattr(new, name)
    ]
    if others:
        out["sections"] = sorted(others)
    return out


def _issue_model(issue: Any) -> m.ConfigIssueModel:
    return m.ConfigIssueModel(
        file=issue.file,
        line=issue.line,
        column=issue.column,
        path=issue.path,
        message=issue.message,
        text=str(issue),
    )


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _summary(config: Config) -> str:
    return f"{_plural(len(config.routes), 'route')}, {_plural(len(config.upstreams), 'upstream')}"


def parse_time(text: str | None, default: float, now: float, name: str = "time") -> float:
    """Unix seconds (``1735689600``), ISO 8601 (``2025-01-01T00:00:00Z``) or a duration ago
    (``15m``, ``-15m``, ``2h``)."""
    if text is None or not text.strip():
        return default
    raw = text.strip()
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        return now - parse_duration(raw.removeprefix("-"))
    except ValueError:
        pass
    try:
        stamp = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise AdminError(
            422,
            "invalid_time",
            f"{name}: expected unix seconds, an ISO 8601 time or a duration ago like 15m, "
            f"got {text!r}",
        ) from None
    if stamp.tzinfo is None:
        raise AdminError(
            422,
            "invalid_time",
            f"{name}: an ISO 8601 time needs a zone (Z or +01:00), got {text!r}",
        )
    return stamp.timestamp()


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


def _analytics(source: AdminSource) -> Any:
    analytics = getattr(source, "analytics", None)
    if analytics is None:
        raise AdminError(
            503,
            "analytics_unavailable",
            "analytics are not running on this gateway (enable the analytics: section)",
        )
    return analytics


@contextlib.asynccontextmanager
async def _analytics_errors() -> AsyncIterator[None]:
    """The analytics store's refusals as answers: bad arguments 422, a store that cannot be
    read (database down, locked) 503."""
    from piuptime.observe.analytics import AnalyticsUnavailable  # sqlite3 only when used

    try:
        yield
    except AnalyticsUnavailable as exc:
        raise AdminError(
            503, "analytics_unavailable", f"the analytics store cannot be read: {exc}"
        ) from None
    except ValueError as exc:
        raise AdminError(422, "invalid_request", str(exc)) from None


# -- the app -------------------------------------------------------------------------------------

Responses = dict[int | str, dict[str, Any]]
_ERR: dict[str, Any] = {"model": m.ErrorBody}
#: responses every protected endpoint may give
COMMON_RESPONSES: Responses = {
    400: {**_ERR, "description": "a request body that cannot be read (not UTF-8)"},
    401: {**_ERR, "description": "no token, or a wrong one"},
    413: {**_ERR, "description": "request body too large"},
    422: {**_ERR, "description": "invalid parameters or body"},
}

Ctx = Annotated[AdminContext, Depends(context)]
#: the body of /config/validate as a document (a mapping of sections, or nothing)
_DOCUMENT: dict[str, Any] = {"anyOf": [{"type": "object"}, {"type": "null"}]}
Who = Annotated[Actor, Depends(require_token)]


def _public_router() -> APIRouter:
    router = APIRouter(tags=["probes"])

    @router.get("/healthz", response_model=m.Health, summary="Liveness: the process answers")
    async def healthz() -> m.Health:
        return m.Health()

    @router.get(
        "/readyz",
        response_model=m.Readiness,
        summary="Readiness: listeners up, config loaded, not draining",
        responses={503: {"model": m.Readiness, "description": "not ready"}},
    )
    async def readyz(ctx: Ctx) -> Response:
        source = ctx.source
        servers = getattr(source, "servers", None) or []
        checks = {
            "listeners": bool(servers) and all(getattr(s, "sockets", None) for s in servers),
            "config": source.runtime is not None,
            "not_draining": not getattr(source, "draining", False),
        }
        reasons = {
            "listeners": "the data-plane listeners are not serving",
            "config": "no configuration is loaded",
            "not_draining": "the gateway is draining (stopping)",
        }
        failed = [reasons[k] for k, ok in checks.items() if not ok]
        body = m.Readiness(status="not_ready" if failed else "ready", checks=checks, reasons=failed)
        return Response(
            body.model_dump_json(),
            503 if failed else 200,
            headers={"cache-control": "no-store"},
            media_type="application/json",
        )

    return router


def _ops_router() -> APIRouter:
    router = APIRouter(tags=["status"])

    @router.get("/status", response_model=m.StatusDocument, summary="Live state (piuptime status)")
    async def status(ctx: Ctx) -> dict[str, Any]:
        return status_document(ctx.source, time.monotonic() - ctx.started)

    @router.get(
        "/metrics",
        response_class=Response,
        summary="Prometheus metrics",
        responses={200: {"content": {PROMETHEUS: {"schema": {"type": "string"}}}}},
    )
    async def metrics(ctx: Ctx) -> Response:
        text = ctx.source.metrics.render()
        return Response(text, headers={"cache-control": "no-store"}, media_type=PROMETHEUS)

    return router


def _api_router() -> APIRouter:
    router = APIRouter()
    not_found: Responses = {404: {**_ERR, "description": "no such name"}}

    # -- routes and upstreams --------------------------------------------------------------

    def route_info(ctx: AdminContext, index: int) -> m.RouteInfo:
        source = ctx.source
        route = source.config.routes[index]
        runtime = source.runtime
        plugins: list[str] = []
        healthy = total = 0
        if runtime is not None:
            for compiled in runtime.routes:
                if compiled.name == route.name and compiled.handler is None:
                    if compiled.pipeline is not None:
                        plugins = compiled.pipeline.names
                    targets = compiled.upstream.snapshot()["targets"]
                    total = len(targets)
                    healthy = sum(1 for t in targets if t["healthy"])
                    break
        data = redact(route.model_dump(mode="json"), ctx.env_names, path=("routes", str(index)))
        match = route.match
        return m.RouteInfo(
            name=route.name,
            match=m.RouteMatchInfo(
                path=match.path, methods=match.methods, host=match.host, headers=match.headers
            ),
            priority=route.priority,
            upstream=route.upstream,
            upstream_healthy_targets=healthy,
            upstream_targets=total,
            plugins=plugins,
            config=data,
        )

    @router.get("/routes", response_model=list[m.RouteInfo], tags=["routes"], summary="Routes")
    async def routes(ctx: Ctx) -> list[m.RouteInfo]:
        return [route_info(ctx, i) for i in range(len(ctx.source.config.routes))]

    @router.get(
        "/routes/{name}",
        response_model=m.RouteInfo,
        tags=["routes"],
        summary="One route",
        responses=not_found,
    )
    async def route(ctx: Ctx, name: str) -> m.RouteInfo:
        for i, r in enumerate(ctx.source.config.routes):
            if r.name == name:
                return route_info(ctx, i)
        raise AdminError(404, "route_not_found", f"no route named {name!r}")

    def snapshot(ctx: AdminContext) -> dict[str, Any]:
        runtime = ctx.source.runtime
        found: dict[str, Any] = runtime.snapshot()["upstreams"] if runtime is not None else {}
        return found

    @router.get(
        "/upstreams",
        response_model=dict[str, m.UpstreamStatus],
        tags=["upstreams"],
        summary="Upstreams and their targets: health, ejection, breaker, in flight",
    )
    async def upstreams(ctx: Ctx) -> dict[str, Any]:
        return snapshot(ctx)

    @router.get(
        "/upstreams/{name}",
        response_model=m.UpstreamStatus,
        tags=["upstreams"],
        summary="One upstream",
        responses=not_found,
    )
    async def upstream(ctx: Ctx, name: str) -> dict[str, Any]:
        runtime = ctx.source.runtime
        found = runtime.upstreams.get(name) if runtime is not None else None
        if found is None:
            raise AdminError(404, "upstream_not_found", f"no upstream named {name!r}")
        data: dict[str, Any] = found.snapshot()
        return data

    # -- analytics ---------------------------------------------------------------------------

    unavailable: Responses = {503: {**_ERR, "description": "analytics are not running"}}

    @router.get(
        "/analytics",
        response_model=m.AnalyticsResult,
        tags=["analytics"],
        summary="Per-minute aggregates by route, upstream or consumer",
        responses=unavailable,
    )
    async def analytics(
        ctx: Ctx,
        by: Literal["route", "upstream", "consumer"] = "route",
        since: Annotated[
            str | None, Query(description="unix seconds, ISO 8601, or a duration ago (1h)")
        ] = None,
        until: Annotated[str | None, Query(description="as since; default now")] = None,
        name: Annotated[str | None, Query(description="only this route/upstream/consumer")] = None,
        step: Annotated[
            int, Query(ge=60, le=86400, multiple_of=60, description="seconds per bucket")
        ] = 60,
    ) -> m.AnalyticsResult:
        now = time.time()
        start = parse_time(since, now - 3600, now, "since")
        end = parse_time(until, now, now, "until")
        if end <= start:
            raise AdminError(422, "invalid_time", "until must be after since")
        source = _analytics(ctx.source)
        async with _analytics_errors():
            rows = await _maybe_await(
                source.query(by=by, since=start, until=end, name=name, step=step)
            )
        return m.AnalyticsResult(by=by, since=start, until=end, step=step, name=name, rows=rows)

    @router.get(
        "/requests/recent",
        response_model=m.RecentRequests,
        tags=["analytics"],
        summary="The newest requests (a bounded ring)",
        responses=unavailable,
    )
    async def recent(
        ctx: Ctx,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        route: str | None = None,
        status: Annotated[
            str | None,
            Query(pattern=r"^[1-5]([0-9][0-9]|xx)$", description="a code (404) or a class (5xx)"),
        ] = None,
    ) -> m.RecentRequests:
        source = _analytics(ctx.source)
        async with _analytics_errors():
            rows = await _maybe_await(source.recent(limit=limit, route=route, status=status))
        return m.RecentRequests(requests=list(rows))

    # -- config ------------------------------------------------------------------------------

    @router.get(
        "/config",
        response_model=m.ConfigDocument,
        tags=["config"],
        summary="The running config, secrets redacted",
    )
    async def config(ctx: Ctx) -> m.ConfigDocument:
        source = ctx.source
        kind = _config_source(source)
        path = source.config_path
        if kind == "file" and path is None:
            kind = "memory"
        return m.ConfigDocument(
            source=kind,
            path=str(path) if path is not None else None,
            config=_redacted_config(ctx, source.config),
        )

    @router.post(
        "/config/validate",
        response_model=m.ValidationReport,
        tags=["config"],
        summary="Check a config (YAML or JSON) as `piuptime validate` does; changes nothing",
        responses={
            422: {
                "model": m.ValidationReport | m.ErrorBody,
                "description": "the config is invalid (a report), or the request is (an error)",
            }
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "a config document, as YAML or JSON (an empty one is an "
                "empty config)",
                "content": {
                    "application/yaml": {"schema": _DOCUMENT},
                    "application/json": {"schema": _DOCUMENT},
                    "text/plain": {"schema": {"type": "string", "description": "YAML text"}},
                },
            }
        },
    )
    async def validate(
        ctx: Ctx,
        request: Request,
        filename: Annotated[str, Query(description="the name errors give")] = "<request>",
    ) -> Response:
        filename = filename[:200]  # (no 422 of another shape for a long one)
        raw = await request.body()
        names = set(ctx.env_names)
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            before = raw[: exc.start]
            line = before.count(b"\n") + 1
            column = len(before) - (before.rfind(b"\n") + 1) + 1
            issue = m.ConfigIssueModel(
                file=filename,
                line=line,
                column=column,
                path="",
                message="the body is not UTF-8 text",
                text=f"{filename}:{line}:{column}: the body is not UTF-8 text",
            )
            report = m.ValidationReport(ok=False, errors=[issue])
            return _json(report, 422)
        names |= env_references(text)
        try:
            parsed = parse_config(text, filename)
        except ConfigError as exc:
            issues = []
            for problem in exc.errors:
                model = _issue_model(problem)
                model.message = redact_text(model.message, names)
                model.text = redact_text(model.text, names)
                issues.append(model)
            return _json(m.ValidationReport(ok=False, errors=issues), 422)
        return _json(m.ValidationReport(ok=True, summary=f"{filename}: OK ({_summary(parsed)})"))

    @router.post(
        "/config/reload",
        response_model=m.ReloadResult,
        tags=["config"],
        summary="Reload the config file (as SIGHUP does)",
        responses={
            409: {**_ERR, "description": "no config file to reload (database or in-memory)"},
            422: {
                "model": m.ReloadResult | m.ErrorBody,
                "description": "the file is invalid, nothing changed (a result); or the request "
                "is (an error)",
            },
        },
    )
    async def reload(ctx: Ctx, who: Who, request: Request) -> Response:
        source = ctx.source
        kind = _config_source(source)
        path = source.config_path
        if kind != "file":
            raise AdminError(
                409,
                "not_file_config",
                f"the config comes from the {kind}; change it through its endpoints",
            )
        if path is None:
            raise AdminError(409, "no_config_file", "this gateway was not started from a file")
        before = source.config
        ok = await source.reload(f"admin API, {who}")
        reloads = source.reloads
        info = m.ReloadsInfo(
            succeeded=reloads.succeeded, failed=reloads.failed, last_error=reloads.last_error
        )
        if ok:
            changes = config_changes(before, source.config)
            await _note_file(ctx, path)
            await audit(request, "config.reload", str(path), {"changes": changes})
            result = m.ReloadResult(
                ok=True,
                message=f"reloaded {path}: {_summary(source.config)}",
                changes=changes,
                reloads=info,
            )
            return _json(result)
        errors = [
            redact_text(line, ctx.env_names)
            for line in (reloads.last_error or "the reload failed").splitlines()
        ]
        await audit(request, "config.reload", str(path), {"errors": errors}, result="invalid")
        result = m.ReloadResult(
            ok=False,
            message=f"{path} was not applied; still serving the previous config",
            errors=errors,
            reloads=info,
        )
        return _json(result, 422)

    # -- cache ---------------------------------------------------------------------------------

    @router.post(
        "/cache/purge",
        response_model=m.PurgeResult,
        tags=["cache"],
        summary="Remove cached answers of a route: one URL or a path prefix",
        responses={
            404: {**_ERR, "description": "no such route, or it has no cache"},
            503: {**_ERR, "description": "the cache store (Redis) cannot be reached"},
        },
    )
    async def purge(ctx: Ctx, body: m.PurgeRequest, request: Request) -> m.PurgeResult:
        runtime = ctx.source.runtime
        if runtime is None:
            raise AdminError(503, "not_ready", "no configuration is loaded")
        detail = body.model_dump(exclude_none=True)
        try:
            outcome = await purge_cache(
                runtime,
                body.route,
                path=body.path,
                prefix=body.prefix,
                query=body.query,
                host=body.host,
            )
        except PurgeError as exc:
            if exc.status != 404:  # a refused purge of an existing cache is worth a line
                await audit(request, "cache.purge", body.route, detail, result=exc.code)
            raise AdminError(exc.status, exc.code, exc.message) from None
        await audit(request, "cache.purge", body.route, {**detail, "purged": outcome.purged})
        return m.PurgeResult(route=body.route, store=outcome.store, purged=outcome.purged)  # type: ignore[arg-type]

    # -- audit -----------------------------------------------------------------------------------

    @router.get(
        "/audit",
        response_model=m.AuditList,
        tags=["audit"],
        summary="Changes made through the admin API, newest first",
        responses={503: {**_ERR, "description": "the audit log cannot be read"}},
    )
    async def audit_list(
        ctx: Ctx,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        before: Annotated[int | None, Query(ge=1, description="entries older than this id")] = None,
        action: Annotated[str | None, Query(max_length=100)] = None,
    ) -> m.AuditList:
        try:
            entries = await ctx.audit_log.list(limit, before=before, action=action)
        except Exception as exc:  # the store's own errors (sqlite3, OSError, psycopg, ...)
            log.warning("audit log cannot be read: %s", exc)
            raise AdminError(
                503, "audit_unavailable", f"the audit log cannot be read: {exc}"
            ) from None
        return m.AuditList(entries=[m.AuditEntryModel(**e.as_dict()) for e in entries])

    return router


def _json(model: Any, status: int = 200) -> Response:
    return Response(
        model.model_dump_json(),
        status,
        headers={"cache-control": "no-store"},
        media_type="application/json",
    )


async def _note_file(ctx: AdminContext, path: Path) -> None:
    """Remember the env references of the file just loaded (read on a thread)."""
    try:
        text = await asyncio.to_thread(path.read_text, encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return
    ctx.note_config_text(text)


# -- errors --------------------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    async def admin_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, AdminError)
        return _error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        headers = dict(exc.headers or {})
        method = request.method
        path = request.url.path
        if status == 404:
            error = AdminError(
                404, "not_found", f"no admin endpoint {method} {path}; see /openapi.json"
            )
        elif status == 405:
            allow = [a.strip() for a in headers.get("Allow", "").split(",") if a.strip()]
            if "GET" in allow and "HEAD" not in allow:
                allow.append("HEAD")
            headers["Allow"] = ", ".join(allow)
            error = AdminError(
                405,
                "method_not_allowed",
                f"{path} answers {' and '.join(allow) or 'no method'}, not {method}",
            )
        else:
            code = {400: "bad_request", 401: "unauthorized", 413: "body_too_large"}.get(
                status, "error"
            )
            error = AdminError(status, code, str(exc.detail))
        error.headers.update(headers)
        return _error_response(error)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()))
            errors.append(f"{where}: {e.get('msg', 'invalid')}")
        return _error_response(
            AdminError(
                422, "invalid_request", "; ".join(errors) or "invalid request", errors=errors
            )
        )

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("admin API: %s %s failed", request.method, request.url.path)
        return _error_response(
            AdminError(500, "internal_error", f"{type(exc).__name__}; see the gateway's log")
        )

    app.add_exception_handler(AdminError, admin_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, server_error)


# -- the factory ---------------------------------------------------------------------------------


def create_app(
    source: AdminSource,
    *,
    tokens: TokenSet,
    audit_log: AuditLog,
    routers: Sequence[APIRouter] = (),
    max_body: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The admin API app for ``source`` (the running App)."""
    app = FastAPI(
        title="piuptime admin API",
        version=__version__,
        description="Operate a running piuptime gateway: status, metrics, analytics, config, "
        "cache and the audit log. Every endpoint but /healthz and /readyz needs "
        "`Authorization: Bearer <admin token>` when the listener has a token.",
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
        openapi_url="/openapi.json",
    )
    ctx = AdminContext(source, tokens, audit_log)
    app.state.admin = ctx
    _install_error_handlers(app)
    protected: list[Any] = [Depends(require_token)]
    strict: list[Any] = [Depends(strict_query)]
    app.include_router(
        _public_router(),
        dependencies=strict,
        responses={422: {**_ERR, "description": "unknown query parameters"}},
    )
    app.include_router(
        _ops_router(), dependencies=[*protected, *strict], responses=COMMON_RESPONSES
    )
    app.include_router(
        _api_router(),
        prefix=API,
        dependencies=[*protected, *strict],
        responses=COMMON_RESPONSES,
    )

    # -- routers of other parts --------------------------------------------------------------
    # The database config source (piuptime.configstore) plugs its CRUD in here: either pass
    # `routers=[...]`, or give the source an `admin_routers() -> list[APIRouter]` method. They
    # are served under /api/v1, behind require_token, with the common error responses.
    offered: Callable[[], Iterable[APIRouter]] | None = getattr(source, "admin_routers", None)
    for router in (*routers, *(offered() if offered is not None else ())):
        app.include_router(
            router, prefix=API, dependencies=[*protected, *strict], responses=COMMON_RESPONSES
        )

    app.add_middleware(_Gate, ctx=ctx, max_body=max_body)
    return app
