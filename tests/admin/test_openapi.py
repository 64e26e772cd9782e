"""Schemathesis against the served OpenAPI spec, on the live admin listener of a real app.

The spec is fetched from ``/openapi.json`` over HTTP; for every operation Hypothesis generates
requests (valid ones, then invalid ones) that are sent to the running listener, and every
answer is checked: no 5xx, a documented status code, the documented content type, a body that
matches the documented schema. The examples per operation are bounded so the run stays short.
The gateway serves on this test's event loop; the schemathesis calls (synchronous, ``requests``)
run on a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
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

from tests.support import Upstream, fetch, gateway_yaml, start_app

TOKEN = "schemathesis-admin-token"
EXAMPLES = 10  # per operation and generation mode

ROUTES = """\
  - name: sensors
    match: {path: /sensors/}
    upstream: sensors
    plugins:
      cache: {ttl: 60s}
  - name: plain
    match: {path: /plain/}
    upstream: sensors
"""


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = await Upstream(name="u").start()
    yield up
    await up.stop()


def _run(base: str, operations: list[Any], mode: schemathesis.GenerationMode) -> list[str]:
    """Fuzz each operation; returns the failures (operation, the error)."""
    failures: list[str] = []
    headers = {"Authorization": f"Bearer {TOKEN}"}
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
            case.call_and_validate(base_url=base, headers=headers, checks=checks, timeout=10)

        try:
            fuzz()
        except Unsatisfiable:
            continue  # nothing to make invalid (no parameters, no body)
        except (
            Exception,
            BaseExceptionGroup,
        ) as exc:  # each operation's failures, reported together
            failures.append(f"{operation.label} ({mode.name}): {exc}")
    return failures


async def test_the_served_spec_holds_for_generated_requests(
    upstream: Upstream, tmp_path: Path
) -> None:
    extra = (
        f'admin: {{listen: "127.0.0.1:0", token: {TOKEN}}}\n'
        f"store: {{sqlite: {tmp_path / 'store.sqlite'}}}\n"
        "analytics: {flush_interval: 10m, recent: 100}\n"
    )
    text = gateway_yaml({"sensors": [upstream.port]}, ROUTES, extra=extra)
    app, port = await start_app(text, tmp_path, watch_interval=0)
    try:
        for path in ("/sensors/a", "/plain/b", "/nowhere"):
            await fetch(port, path)
        base = app.admin.address
        schema = await asyncio.to_thread(
            schemathesis.openapi.from_url,
            f"{base}/openapi.json",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        operations = [result.ok() for result in schema.get_all_operations()]
        labels = {op.label for op in operations}
        assert {
            "GET /healthz",
            "GET /readyz",
            "GET /status",
            "GET /metrics",
            "GET /api/v1/routes/{name}",
            "GET /api/v1/analytics",
            "POST /api/v1/config/validate",
            "POST /api/v1/config/reload",
            "POST /api/v1/cache/purge",
            "GET /api/v1/audit",
        } <= labels, labels
        failures = []
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            failures += await asyncio.to_thread(_run, base, operations, mode)
        assert not failures, "\n\n".join(failures)
        # the gateway is still fine after all that
        assert (await fetch(port, "/sensors/a")).status == 200
    finally:
        await app.stop()
