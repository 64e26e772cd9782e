"""Helpers for the AI gateway tests: a gateway in-process with an ``llm:`` section."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from tests.support import start_app


def llm_yaml(providers: dict[str, str], models: str, extra: str = "", routes: str = "") -> str:
    """A config: port-0 listener, ``providers`` (name → flow-style provider mapping) and the
    ``models`` block (already indented by four spaces)."""
    lines = [
        "gateway:",
        '  listen: ["127.0.0.1:0"]',
        "  access_log: {path: off}",
        "llm:",
        "  providers:",
    ]
    for name, spec in providers.items():
        lines.append(f"    {name}: {spec}")
    lines.append("  models:")
    lines.append(models.rstrip("\n"))
    if routes:
        lines.append(routes.rstrip("\n"))
    if extra:
        lines.append(extra.rstrip("\n"))
    return "\n".join(lines) + "\n"


@contextlib.asynccontextmanager
async def gateway(text: str, **kw: Any) -> AsyncIterator[tuple[Any, int]]:
    app, port = await start_app(text, **kw)
    try:
        yield app, port
    finally:
        await app.stop()


def metric(app: Any, name: str, **labels: str) -> float:
    """The value of one sample in the app's metrics (0 when absent)."""
    family = app.metrics.families.get(f"piuptime_{name}")
    if family is None:
        return 0.0
    total = 0.0
    for sample, values, value in family.samples():
        names = family.sample_labelnames(sample)
        got = dict(zip(names, values, strict=False))
        if all(got.get(k) == v for k, v in labels.items()):
            total += value
    return total
