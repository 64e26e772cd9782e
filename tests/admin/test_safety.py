"""Admin safety: loopback by default, no exposed listener without a token, named tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from piuptime.admin.api import TokenSet
from piuptime.admin.server import AdminServer
from piuptime.config import ConfigError, parse_config
from piuptime.config.schema import AdminConfig
from tests.support import Upstream, fetch, gateway_yaml, start_app

ROUTES = "  - {name: r, match: {path: /r/}, upstream: a}\n"


def test_loopback_by_default() -> None:
    admin = parse_config("admin: {}\n", "t.yaml", {}).admin
    assert admin is not None and admin.listen == "127.0.0.1:9180"
    assert admin.named_tokens() == {}


def test_a_named_token_is_enough_off_loopback() -> None:
    admin = parse_config(
        "admin:\n  listen: 0.0.0.0:9180\n  tokens: {ci: '${CI_T}', alice: a1}\n",
        "t.yaml",
        {"CI_T": "c"},
    ).admin
    assert admin is not None and admin.named_tokens() == {"ci": "c", "alice": "a1"}
    both = parse_config("admin: {token: t, tokens: {ci: c}}\n", "t.yaml", {}).admin
    assert both is not None and both.named_tokens() == {"admin": "t", "ci": "c"}


def test_empty_named_tokens_do_not_count() -> None:
    text = "admin:\n  listen: 0.0.0.0:9180\n  tokens: {ci: '${CI_T:-}'}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "t.yaml", {})
    (issue,) = caught.value.errors
    assert issue.path == "admin.listen" and "without a token" in issue.message


@pytest.mark.parametrize(
    ("tokens", "path", "message"),
    [
        ('{"bad name": x}', 'admin.tokens["bad name"]', "1-64 letters"),
        ("{admin: x}", "admin.tokens.admin", "'admin' is the name of admin.token"),
        ("{-x: y}", "admin.tokens.-x", "1-64 letters"),
    ],
)
def test_token_names_are_checked(tokens: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f"admin:\n  tokens: {tokens}\n", "t.yaml", {})
    (issue,) = caught.value.errors
    assert (issue.line, issue.path) == (2, path) and message in issue.message


def test_two_names_for_one_token_are_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("admin:\n  token: same\n  tokens: {ci: same}\n", "t.yaml", {})
    (issue,) = caught.value.errors
    assert issue.path == "admin.tokens.ci" and "'admin' and 'ci' are the same" in issue.message


def test_token_set_names_the_token_presented() -> None:
    tokens = TokenSet(AdminConfig(token="t-admin", tokens={"ci": "t-ci"}))
    assert tokens.required
    assert tokens.identify(b"t-admin") == "admin" and tokens.identify(b"t-ci") == "ci"
    assert tokens.identify(b"t-ci ") is None and tokens.identify(b"") is None
    assert not TokenSet(AdminConfig()).required


async def test_the_server_refuses_an_exposed_listener_built_without_validation(
    tmp_path: Path,
) -> None:
    up = await Upstream().start()
    try:
        text = gateway_yaml({"a": [up.port]}, ROUTES)
        app, _ = await start_app(text)
        try:
            exposed = AdminConfig.model_construct(listen="0.0.0.0:0", token=None, tokens={})
            server = AdminServer(app, exposed)
            with pytest.raises(ValueError, match="without a token"):
                await server.start()
            assert server.sockets == []
        finally:
            await app.stop()
    finally:
        await up.stop()


async def test_a_reload_changes_named_tokens(tmp_path: Path) -> None:
    up = await Upstream().start()
    try:

        def text(tokens: str) -> str:
            extra = f'admin: {{listen: "127.0.0.1:0", tokens: {tokens}}}\n'
            return gateway_yaml({"a": [up.port]}, ROUTES, extra=extra)

        app, _ = await start_app(text("{ci: c1, ops: o1}"), tmp_path, watch_interval=0)
        port = app.admin.port
        try:

            async def status(token: str) -> int:
                reply = await fetch(port, "/status", headers={"Authorization": f"Bearer {token}"})
                return reply.status

            assert (await status("c1"), await status("o1")) == (200, 200)
            (tmp_path / "piuptime.yaml").write_text(text("{ops: o2}"))
            assert await app.reload("test")
            assert (await status("c1"), await status("o1"), await status("o2")) == (401, 401, 200)
        finally:
            await app.stop()
    finally:
        await up.stop()
