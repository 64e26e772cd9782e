"""Helpers for the config store tests: a bootstrap file, an admin API client over raw sockets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from tests.support import Reply, fetch

API = "/api/v1/config"


def bootstrap(
    tmp_path: Path,
    kind: str,
    ports: dict[str, int],
    routes: str = "",
    *,
    dsn: str | None = None,
    admin: str = '{listen: "127.0.0.1:0"}',
    extra: str = "",
    name: str = "piuptime.yaml",
) -> Path:
    """Write a bootstrap file with ``config_store.kind`` and some entities (the seed)."""
    store = {"kind": kind, "poll_interval": "200ms"}
    if dsn is not None:
        store["dsn"] = dsn
    lines = [
        "gateway:",
        '  listen: ["127.0.0.1:0"]',
        "  access_log: {path: off}",
        f"admin: {admin}",
        f"store: {{sqlite: {tmp_path / 'state.sqlite'}}}",
        "config_store: " + orjson.dumps(store).decode(),
        "upstreams:",
    ]
    for upstream, port in ports.items():
        lines.append(f'  {upstream}: {{targets: ["http://127.0.0.1:{port}"]}}')
    if routes:
        lines.append("routes:")
        lines.append(routes.rstrip())
    if extra:
        lines.append(extra.rstrip())
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


class Admin:
    """The admin API of one running app."""

    def __init__(self, app: Any, token: str | None = None) -> None:
        self.app = app
        self.port: int = app.admin.port
        self.token = token

    def _headers(self, version: int | str | None, content_type: str | None) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if version is not None:
            headers["If-Match"] = f'"{version}"' if isinstance(version, int) else version
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def get(self, path: str) -> Reply:
        return await fetch(self.port, API + path, headers=self._headers(None, None))

    async def send(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        version: int | str | None = None,
        raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> Reply:
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        headers = self._headers(version, content_type if data is not None else None)
        return await fetch(self.port, API + path, method=method, headers=headers, body=data)

    async def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return await self.send("POST", path, body, **kw)

    async def put(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return await self.send("PUT", path, body, **kw)

    async def delete(self, path: str, **kw: Any) -> Reply:
        return await self.send("DELETE", path, **kw)


def body(reply: Reply) -> Any:
    return orjson.loads(reply.body)


def etag(reply: Reply) -> int:
    value = reply.header(b"etag")
    assert value is not None, reply
    return int(value.strip(b'"'))


def route(path: str, upstream: str, **more: Any) -> dict[str, Any]:
    return {"match": {"path": path}, "upstream": upstream, **more}
