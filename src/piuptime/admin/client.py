"""``piuptime status``: fetch the admin listener's ``/status`` and print it.

Standard library only (``urllib``): it runs wherever piuptime is installed, as any user that can
read the config (or none, with ``--admin``).
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from piuptime.config import ConfigError, load_config
from piuptime.config.env import EnvError, expand
from piuptime.config.schema import AdminConfig, parse_address

__all__ = ["StatusError", "fetch_status", "render_status", "status_main"]

TOKEN_ENV = "PIUPTIME_ADMIN_TOKEN"
HINT = "is piuptime running with an admin: section?"


class StatusError(Exception):
    """Something ``piuptime status`` tells the user before exiting 1."""


class _BlankEnv(Mapping[str, str]):
    """The environment, with unset variables reading as empty strings: ``piuptime status`` only
    needs the admin section, and a secret the service has may be missing from this shell."""

    def __getitem__(self, key: str) -> str:
        return os.environ.get(key, "")

    def __iter__(self) -> Iterator[str]:
        return iter(os.environ)

    def __len__(self) -> int:
        return len(os.environ)


@dataclass(frozen=True, slots=True)
class AdminTarget:
    url: str  # http://host:port, no trailing slash
    token: str | None


def admin_url(address: str) -> str:
    """``127.0.0.1:9180``, ``:9180``, ``0.0.0.0:9180`` or ``http://host:port`` → a URL to
    connect to (a wildcard host is reached on loopback)."""
    text = address.strip().rstrip("/")
    if "://" in text:
        scheme, _, rest = text.partition("://")
        if scheme not in ("http", "https"):
            raise StatusError(f"--admin takes http://host:port or host:port, got {address!r}")
        text = rest
    else:
        scheme = "http"
    try:
        host, port = parse_address(text)
    except ValueError as exc:
        raise StatusError(f"bad admin address {address!r}: {exc}") from None
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


def _admin_section(path: Path, warn: TextIO) -> tuple[str, str | None] | None:
    """(listen, token) from the config's ``admin:`` section, or None when it has none.

    The file is loaded as ``piuptime run`` would; if it does not validate (it may have been
    edited since the gateway started), the admin section is read as written, with a note."""
    try:
        config = load_config(path, env=_BlankEnv())
    except ConfigError as exc:
        if any(issue.line == 0 for issue in exc.errors):  # the file could not be read at all
            raise StatusError(str(exc)) from None
        print(
            f"piuptime status: note: {path} does not validate (see `piuptime validate -c "
            f"{path}`); using its admin section as written",
            file=warn,
        )
        return _raw_admin_section(path)
    if config.admin is None:
        return None
    return config.admin.listen, config.admin.token


def _raw_admin_section(path: Path) -> tuple[str, str | None] | None:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise StatusError(f"cannot read the admin section of {path}: {exc}") from None
    admin = data.get("admin") if isinstance(data, dict) else None
    if admin is None:
        return None
    if not isinstance(admin, dict):
        raise StatusError(f"{path}: admin: expected a mapping like {{listen: 127.0.0.1:9180}}")
    listen = admin.get("listen", AdminConfig.model_fields["listen"].default)
    token = admin.get("token")
    try:
        listen = expand(str(listen), _BlankEnv())
        token = expand(str(token), _BlankEnv()) if token is not None else None
    except EnvError as exc:
        raise StatusError(f"{path}: admin: {exc}") from None
    return listen, token or None


def resolve_target(config: str, admin: str | None, token: str | None, warn: TextIO) -> AdminTarget:
    """Where to ask and with which token: --admin / --token first, then the config's admin
    section, then $PIUPTIME_ADMIN_TOKEN."""
    config_token: str | None = None
    if admin is None:
        path = Path(config)
        if not path.exists():
            raise StatusError(
                f"config file {path} not found; pass -c FILE, or --admin HOST:PORT to ask an "
                "admin listener directly"
            )
        section = _admin_section(path, warn)
        if section is None:
            raise StatusError(
                f"{path} has no admin: section, so piuptime runs no admin listener; add "
                "`admin: {listen: 127.0.0.1:9180}` and restart piuptime, or pass --admin HOST:PORT"
            )
        admin, config_token = section
    chosen = token or config_token or os.environ.get(TOKEN_ENV) or None
    return AdminTarget(admin_url(admin), chosen)


def fetch_status(target: AdminTarget, timeout: float = 5.0) -> bytes:
    """GET /status; raises :class:`StatusError` with a message for the user."""
    url = target.url + "/status"
    headers = {"Accept": "application/json", "User-Agent": "piuptime-status"}
    if target.token:
        headers["Authorization"] = f"Bearer {target.token}"
    request = urllib.request.Request(url, headers=headers)
    # No proxies: the admin listener is (nearly always) on this machine.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            body: bytes = response.read()
            return body
    except urllib.error.HTTPError as exc:
        with exc:
            message = _error_message(exc.read())
        if exc.code == 401:
            if target.token is None:
                raise StatusError(
                    f"the admin listener at {target.url} needs a token (401): pass --token, set "
                    f"${TOKEN_ENV}, or check admin.token in the config"
                ) from None
            raise StatusError(
                f"the admin listener at {target.url} refused the token (401): check --token, "
                f"${TOKEN_ENV} or admin.token"
            ) from None
        detail = f": {message}" if message else ""
        raise StatusError(f"{url} answered {exc.code}{detail}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise StatusError(
            f"cannot reach the admin listener at {target.url} ({reason or type(exc).__name__}); "
            f"{HINT}"
        ) from None


def _error_message(body: bytes) -> str:
    try:
        doc = json.loads(body)
        return str(doc["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace").strip()


# -- the table -----------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{s:02d}s"


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def _target_row(t: dict[str, Any]) -> list[str]:
    health = "up" if t.get("healthy", True) else "down"
    check = t.get("active_check")
    if check is not None:
        health += f" (check {check})"
    ejected = "no"
    if t.get("ejected"):
        left = t.get("ejected_for_s")
        ejected = f"yes, {left:.1f}s left" if isinstance(left, int | float) else "yes"
    breaker = str(t.get("breaker", "closed"))
    retry = t.get("breaker_retry_after_s") or 0
    if breaker == "open" and retry:
        breaker += f" ({retry:.1f}s)"
    ewma = t.get("ewma_ms")
    return [
        str(t.get("url", "?")),
        _yes(t.get("backup")),
        health,
        ejected,
        breaker,
        str(t.get("in_flight", 0)),
        f"{ewma:.1f}" if isinstance(ewma, int | float) else "-",
        f"{t.get('requests_total', 0)}/{t.get('failures_total', 0)}",
    ]


_COLUMNS = ["TARGET", "BACKUP", "HEALTH", "EJECTED", "BREAKER", "IN-FLIGHT", "EWMA MS", "REQ/FAIL"]


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def render_status(doc: dict[str, Any]) -> str:
    """``/status`` as text: a header line, then one table per upstream."""
    config = doc.get("config") or "(no file)"
    routes = doc.get("routes", 0)
    lines = [
        f"piuptime {doc.get('version', '?')}, up {_duration(float(doc.get('uptime_s', 0)))}, "
        f"config {config}, {routes} route{'' if routes == 1 else 's'}"
    ]
    reloads = doc.get("reloads")
    if isinstance(reloads, dict) and reloads.get("last_error"):
        lines.append(f"last reload failed ({reloads.get('failed', 0)} failed in total):")
        lines += [f"  {line}" for line in str(reloads["last_error"]).splitlines()]
    upstreams = doc.get("upstreams") or {}
    if not upstreams:
        lines.append("no upstreams")
    for name, up in upstreams.items():
        budget = up.get("retry_budget") or {}
        ratio = budget.get("ratio")
        parts = [f"balance {up.get('balance', '?')}"]
        if isinstance(ratio, int | float):
            parts.append(f"retry budget {ratio:.0%}, {budget.get('denied_total', 0)} denied")
        lines.append("")
        lines.append(f"upstream {name} ({', '.join(parts)})")
        if up.get("panic"):
            lines.append("  PANIC: too few healthy targets, spreading over all of them")
        targets = up.get("targets") or []
        lines += _table([_COLUMNS, *(_target_row(t) for t in targets)])
        for t in targets:
            if t.get("last_check_error"):
                lines.append(f"  ! {t.get('url')}: last check: {t['last_check_error']}")
    return "\n".join(lines)


def status_main(
    config: str,
    admin: str | None,
    token: str | None,
    as_json: bool,
    out: TextIO,
    err: TextIO,
) -> int:
    """``piuptime status``: 0 and the status on ``out``, or 1 and a message on ``err``."""
    try:
        target = resolve_target(config, admin, token, err)
        body = fetch_status(target)
        try:
            doc = json.loads(body)
        except ValueError:
            raise StatusError(f"{target.url}/status did not answer JSON; {HINT}") from None
        if not isinstance(doc, dict):
            raise StatusError(f"{target.url}/status answered an unexpected document")
    except StatusError as exc:
        print(f"piuptime status: {exc}", file=err)
        return 1
    if as_json:
        print(body.decode("utf-8"), file=out)
    else:
        print(render_status(doc), file=out)
    return 0
