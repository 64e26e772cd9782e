"""The YAML file as the config source (the default): the document reads through the API, every
change is refused with 409, and the version counts the configurations loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from piuptime.app import App
from piuptime.config import load_config
from tests.configstore.support import Admin, body, etag, route
from tests.support import Upstream, fetch

pytestmark = pytest.mark.timeout(90, method="thread")

TEXT = """\
gateway: {{listen: ["127.0.0.1:0"], access_log: {{path: off}}}}
admin: {{listen: "127.0.0.1:0"}}
store: {{sqlite: {state}}}
upstreams:
  a: {{targets: ["http://127.0.0.1:{port}"]}}
consumers:
  kitchen: {{keys: ["${{KITCHEN_KEY}}"]}}
routes:
  - {{name: {name}, match: {{path: /{name}}}, upstream: a}}
"""


async def test_file_source_reads_and_refuses_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KITCHEN_KEY", "kitchen-key-0123")
    upstream = await Upstream(name="a").start()
    path = tmp_path / "piuptime.yaml"
    fields = {"state": tmp_path / "s.sqlite", "port": upstream.port}
    path.write_text(TEXT.format(name="one", **fields))
    app = App(load_config(path), path, watch_interval=0)
    await app.start()
    admin = Admin(app)
    try:
        assert app.config_source == "file" and app.config_version == 1
        listed = await admin.get("/routes")
        assert listed.status == 200 and etag(listed) == 1
        assert body(listed)["items"] == [{"name": "one", "config": route("/one", "a")}]
        kitchen = body(await admin.get("/consumers/kitchen"))
        assert kitchen["config"] == {"keys": ["${KITCHEN_KEY}"]}  # as written, not expanded

        for reply in (
            await admin.post("/routes", {"name": "x", "config": route("/x", "a")}),
            await admin.put("/routes/one", route("/one", "a")),
            await admin.delete("/routes/one"),
            await admin.put("/plugins/request_id", {}),
            await admin.put("/routes/one/plugins/request_id", {}),
            await admin.post("/import", raw=b"routes: []\n"),
        ):
            assert reply.status == 409, reply.body
            error = body(reply)["error"]
            assert error["code"] == "config_is_file"
            assert error["message"].startswith(
                f"the config source is the YAML file ({path}); edit it and reload"
            )
        exported = (await admin.get("/export?secrets=keep")).body.decode()
        assert "version 1 of file" in exported and "${KITCHEN_KEY}" in exported
        assert body(await admin.get("/history"))["entries"] == []

        path.write_text(TEXT.format(name="two", **fields))
        assert await app.reload("test")
        assert app.config_version == 2
        assert [i["name"] for i in body(await admin.get("/routes"))["items"]] == ["two"]
        assert (await fetch(app.servers[0].sockets[0].getsockname()[1], "/two")).body == b"a"
        path.write_text("routes: [\n")
        assert not await app.reload("test")  # an invalid file changes nothing, version included
        assert app.config_version == 2 and etag(await admin.get("/routes")) == 2
    finally:
        await app.stop()
        await upstream.stop()
