"""The pipeline itself: order, short-circuit, waiting hooks, the log phase exactly once, and
the plugin table in docs/plugins.md against the registered handlers."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from piuptime.config import ConfigError, parse_config
from piuptime.gateway.plugins import REGISTRY, Ctx, Pipeline, Plugin, Reply, _load_handlers

ROOT = Path(__file__).resolve().parents[2]


class Recorder(Plugin):
    calls: ClassVar[list[str]] = []

    def __init__(self, name: str, priority: int, answer: Any = None) -> None:
        self.name = name  # type: ignore[misc]
        self.priority = priority  # type: ignore[misc]
        self.answer = answer

    def on_request(self, ctx: Ctx) -> Any:
        self.calls.append(f"req:{self.name}")
        return self.answer() if callable(self.answer) else self.answer

    def on_response(self, ctx: Ctx, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.calls.append(f"resp:{self.name}")
        headers.append((b"x-by", self.name.encode()))

    def on_log(self, ctx: Ctx) -> None:
        self.calls.append(f"log:{self.name}")


def make_ctx() -> Ctx:
    route = SimpleNamespace(upstream=None)
    return Ctx(SimpleNamespace(headers=[]), None, route, None, None)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def clear() -> None:
    Recorder.calls = []


def test_hooks_run_by_priority_and_log_in_reverse() -> None:
    pipe = Pipeline([Recorder("low", 1), Recorder("high", 100), Recorder("mid", 50)])
    ctx = make_ctx()
    assert pipe.access(ctx) is None
    headers: list[tuple[bytes, bytes]] = []
    ctx.response_headers.append((b"x-queued", b"1"))
    pipe.on_response(ctx, 200, headers)
    pipe.finish(ctx)
    pipe.finish(ctx)  # a second call does nothing
    assert Recorder.calls == [
        "req:high",
        "req:mid",
        "req:low",
        "resp:high",
        "resp:mid",
        "resp:low",
        "log:low",
        "log:mid",
        "log:high",
    ]
    assert headers == [
        (b"x-by", b"high"),
        (b"x-by", b"mid"),
        (b"x-by", b"low"),
        (b"x-queued", b"1"),
    ]


def test_a_reply_ends_the_access_phase() -> None:
    no = Reply.error(401, "no", "no")
    pipe = Pipeline([Recorder("a", 3), Recorder("b", 2, no), Recorder("c", 1)])
    assert pipe.access(make_ctx()) is no
    assert Recorder.calls == ["req:a", "req:b"]


async def test_a_waiting_hook_continues_the_rest_in_a_coroutine() -> None:
    async def later() -> None:
        await asyncio.sleep(0)

    pipe = Pipeline(
        [Recorder("first", 3, later), Recorder("second", 2, later), Recorder("third", 1)]
    )
    pending = pipe.access(make_ctx())
    assert asyncio.iscoroutine(pending)
    assert Recorder.calls == ["req:first"]
    assert await pending is None
    assert Recorder.calls == ["req:first", "req:second", "req:third"]

    async def refuse() -> Reply:
        return Reply(429)

    Recorder.calls = []
    pipe = Pipeline([Recorder("a", 2, refuse), Recorder("b", 1)])
    reply = await pipe.access(make_ctx())  # type: ignore[misc]
    assert reply.status == 429 and Recorder.calls == ["req:a"]


def test_deferred_calls_run_once_even_when_a_log_hook_fails() -> None:
    class Broken(Plugin):
        name = "broken"
        priority = 5

        def __init__(self) -> None:
            pass

        def on_log(self, ctx: Ctx) -> None:
            raise RuntimeError("boom")

    pipe = Pipeline([Broken(), Recorder("r", 1)])
    ctx = make_ctx()
    released: list[int] = []
    ctx.defer(lambda: released.append(1))
    ctx.defer(lambda: 1 / 0)  # type: ignore[func-returns-value]
    ctx.defer(lambda: released.append(2))
    pipe.finish(ctx)
    pipe.finish(ctx)
    assert released == [1, 2]
    assert Recorder.calls == ["log:r"]


def test_unknown_plugin_names_are_errors_with_a_suggestion() -> None:
    text = (
        "upstreams:\n  app: {targets: [{url: 'http://127.0.0.1:9'}]}\n"
        "routes:\n  - {name: r, match: {path: /}, upstream: app, plugins: {request_ids: {}}}\n"
        "plugins:\n  corz: false\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "t.yaml")
    msg = str(caught.value)
    assert re.search(r"t\.yaml:4:\d+: routes\[0\]\.plugins\.request_ids: unknown key", msg)
    assert "did you mean 'request_id'" in msg
    assert re.search(r"t\.yaml:6:\d+: plugins\.corz: unknown key", msg)


def test_every_schema_has_a_handler_and_the_docs_table_matches() -> None:
    from piuptime.config.plugins import PLUGIN_NAMES

    _load_handlers()
    assert set(PLUGIN_NAMES) == set(REGISTRY), "a plugin schema without a handler, or the reverse"
    table = (ROOT / "docs" / "plugins.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (\d+) \|", table, re.M))
    for name, cls in REGISTRY.items():
        assert name in rows, f"docs/plugins.md does not list {name}"
        assert int(rows[name]) == cls.priority, (
            f"{name}: docs say {rows[name]}, code {cls.priority}"
        )
