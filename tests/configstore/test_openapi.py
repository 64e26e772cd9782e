"""Schemathesis over the config store's endpoints on a gateway whose config source is SQLite, so
that generated changes really reach the store, the validation and the swap: no 5xx, documented
status codes, content types and bodies. (The run over the whole admin API, with the file as the
source, is tests/admin/test_openapi.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from piuptime.app import App
from piuptime.config import load_config
from tests.configstore.support import bootstrap
from tests.support import Upstream, fetch

pytestmark = pytest.mark.timeout(300, method="thread")

TOKEN = "schemathesis-config-token"
EXAMPLES = 8
ROUTES = """\
  - name: one
    match: {path: /one}
    upstream: a
"""


def _fuzz(base: str, operations: list[Any], mode: schemathesis.GenerationMode) -> list[str]:
    failures: list[str] = []
    checks = [
        schemathesis.checks.not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    if mode is schemathesis.GenerationMode.NEGATIVE:
        checks.append(negative_data_rejection)
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: schemathesis.Case) -> None:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            case.call_and_validate(base_url=base, headers=headers, checks=checks, timeout=10)

        try:
            fuzz()
        except Unsatisfiable:
            continue
        except (Exception, BaseExceptionGroup) as exc:
            failures.append(f"{operation.label} ({mode.name}): {exc}")
    return failures


async def test_generated_requests_to_the_config_endpoints(tmp_path: Path) -> None:
    upstream = await Upstream(name="a").start()
    admin = f'{{listen: "127.0.0.1:0", token: {TOKEN}}}'
    path = bootstrap(tmp_path, "sqlite", {"a": upstream.port}, ROUTES, admin=admin)
    app = App(load_config(path), path, watch_interval=0)
    await app.start()
    try:
        base = app.admin.address  # type: ignore[union-attr]
        schema = await asyncio.to_thread(
            schemathesis.openapi.from_url,
            f"{base}/openapi.json",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        operations = [
            op
            for op in (result.ok() for result in schema.get_all_operations())
            if op.path.startswith("/api/v1/config/") and op.path != "/api/v1/config/reload"
        ]
        labels = {op.label for op in operations}
        assert {
            "POST /api/v1/config/routes",
            "PUT /api/v1/config/upstreams/{name}",
            "DELETE /api/v1/config/consumers/{name}",
            "PUT /api/v1/config/routes/{name}/plugins/{plugin}",
            "GET /api/v1/config/export",
            "POST /api/v1/config/import",
            "GET /api/v1/config/history",
        } <= labels, labels
        failures = []
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            failures += await asyncio.to_thread(_fuzz, base, operations, mode)
        assert not failures, "\n\n".join(failures)
        # whatever was accepted, the gateway still serves and its store is consistent
        assert app.reloads.failed == 0
        stored = await app.config_service.store.version()
        assert stored == app.config_version
        port = app.servers[0].sockets[0].getsockname()[1]
        assert (await fetch(port, "/nowhere")).status in (404, 200)
    finally:
        await app.stop()
        await upstream.stop()
