"""The admin API's response and request bodies (pydantic), which the served OpenAPI spec shows.

Status models accept keys they do not name (``extra="allow"``) and pass them through, so a
new field in the runtime's snapshot shows up without a change here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AnalyticsResult",
    "AuditEntryModel",
    "AuditList",
    "ConfigDocument",
    "ConfigIssueModel",
    "ErrorBody",
    "ErrorDetail",
    "Health",
    "PurgeRequest",
    "PurgeResult",
    "Readiness",
    "RecentRequests",
    "ReloadResult",
    "ReloadsInfo",
    "RouteInfo",
    "RouteMatchInfo",
    "StatusDocument",
    "TargetStatus",
    "UpstreamStatus",
    "ValidationReport",
]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(BaseModel):
    status: int
    code: str
    message: str
    errors: list[str] | None = None


class ErrorBody(BaseModel):
    """Every error of the admin API (and of the gateway): ``{"error": {...}}``."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, bool]
    reasons: list[str] = Field(default_factory=list)


class ReloadsInfo(_Open):
    succeeded: int
    failed: int
    last_error: str | None = None


class TargetStatus(_Open):
    url: str
    weight: int
    backup: bool
    healthy: bool
    active_check: Literal["passing", "failing"] | None
    last_check_error: str | None
    ejected: bool
    ejected_for_s: float | None
    ejections_total: int
    breaker: str
    breaker_retry_after_s: float
    in_flight: int
    ewma_ms: float | None
    requests_total: int
    failures_total: int


class RetryBudgetInfo(_Open):
    ratio: float
    denied_total: int


class UpstreamStatus(_Open):
    balance: str
    panic: bool
    retry_budget: RetryBudgetInfo
    ejections_total: int
    targets: list[TargetStatus]


class StatusDocument(_Open):
    """``GET /status``: what ``piuptime status`` prints."""

    version: str
    uptime_s: float
    config: str | None
    routes: int
    reloads: ReloadsInfo
    upstreams: dict[str, UpstreamStatus]
    # model group -> its deployments' live state (breaker, in flight, TTFT average); null
    # without an llm: section
    llm: dict[str, list[dict[str, Any]]] | None = None


class RouteMatchInfo(BaseModel):
    path: str
    methods: list[str] | None
    host: str | list[str] | None
    headers: dict[str, str]


class RouteInfo(BaseModel):
    name: str
    match: RouteMatchInfo
    priority: int | None
    upstream: str
    upstream_healthy_targets: int
    upstream_targets: int
    plugins: list[str] = Field(description="plugins the route runs, in run order (with global)")
    config: dict[str, Any] = Field(description="the route's config, secrets redacted")


class AnalyticsResult(BaseModel):
    by: Literal["route", "upstream", "consumer"]
    since: float = Field(description="unix seconds")
    until: float = Field(description="unix seconds")
    step: int = Field(description="seconds per bucket")
    name: str | None
    rows: list[dict[str, Any]]


class RecentRequests(BaseModel):
    requests: list[dict[str, Any]]


class ConfigDocument(BaseModel):
    source: str = Field(
        description="file (the YAML file), sqlite or postgres (a database config source), or "
        "memory (started without a file)"
    )
    path: str | None
    config: dict[str, Any] = Field(description="the running config, secrets redacted")


class ConfigIssueModel(BaseModel):
    file: str
    line: int
    column: int
    path: str
    message: str
    text: str = Field(description="file:line:column: path: message, as `piuptime validate`")


class ValidationReport(BaseModel):
    ok: bool
    summary: str | None = None
    errors: list[ConfigIssueModel] = Field(default_factory=list)


class ReloadResult(BaseModel):
    ok: bool
    message: str
    errors: list[str] = Field(default_factory=list)
    changes: dict[str, Any] = Field(default_factory=dict)
    reloads: ReloadsInfo


class PurgeRequest(BaseModel):
    """Which cached answers of a route to remove: one URL (``path``, optionally ``query`` and
    ``host``) or every URL under a ``prefix``."""

    model_config = ConfigDict(extra="forbid")

    route: str = Field(min_length=1)
    path: str | None = Field(default=None, pattern=r"^/", description="exact path, e.g. /a/b")
    prefix: str | None = Field(default=None, pattern=r"^/", description="path prefix, e.g. /a/")
    query: str | None = Field(default=None, description="the query (without ?) of that URL")
    host: str | None = Field(
        default=None, description="the Host clients send (default: any; required for Redis)"
    )


class PurgeResult(BaseModel):
    route: str
    store: Literal["memory", "redis"]
    purged: int


class AuditEntryModel(BaseModel):
    id: int
    time: float
    actor: str
    address: str
    action: str
    target: str
    detail: dict[str, Any]
    result: str
    gateway: str


class AuditList(BaseModel):
    entries: list[AuditEntryModel]
