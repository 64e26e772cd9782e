"""``piuptime config export`` and ``import`` as processes, against a SQLite config store that no
gateway runs on, and ``piuptime run`` on a database it cannot open."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.configstore.support import bootstrap
from tests.support import piuptime_cmd, python_env

ROUTES = """\
  - name: one
    match: {path: /one}
    upstream: a
"""


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        piuptime_cmd(*args),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=python_env(),
        check=False,
    )


def test_export_and_import(tmp_path: Path) -> None:
    path = bootstrap(
        tmp_path,
        "sqlite",
        {"a": 9},
        ROUTES,
        extra="consumers:\n  kitchen: {keys: [plain-secret-key-1]}\n",
    )
    # nothing stored yet: the export shows the empty database, not the file's entities
    empty = run("config", "export", "-c", str(path))
    assert empty.returncode == 0, empty.stderr
    assert "version 0 of sqlite" in empty.stdout and "routes: []" in empty.stdout

    doc = tmp_path / "doc.yaml"
    doc.write_text(path.read_text())  # a whole file: its bootstrap sections are ignored
    imported = run("config", "import", "-c", str(path), str(doc))
    assert imported.returncode == 0, imported.stderr
    assert "version 1" in imported.stdout
    assert "added: upstreams: a; consumers: kitchen; routes: one" in imported.stdout
    assert "ignored (they come from" in imported.stdout

    redacted = run("config", "export", "-c", str(path))
    assert "plain-secret-key-1" not in redacted.stdout and "<redacted>" in redacted.stdout
    out = tmp_path / "out.yaml"
    kept = run("config", "export", "-c", str(path), "--secrets", "keep", "-o", str(out))
    assert kept.returncode == 0 and "plain-secret-key-1" in out.read_text()

    invalid = run("config", "import", "-c", str(path), "-", stdin="routes: [{name: x}]\n")
    assert invalid.returncode == 1
    assert "<stdin> was not imported; nothing changed" in invalid.stderr
    assert "routes[0].match: required key 'match' is missing" in invalid.stderr
    stale = run("config", "import", "-c", str(path), str(out), "--expected-version", "0")
    assert stale.returncode == 1 and "at version 1, not 0" in stale.stderr
    assert run("config", "import", "-c", str(path), str(out)).returncode == 0
    history = run("config", "export", "-c", str(path))
    assert "version 2 of sqlite" in history.stdout


def test_run_refuses_to_start_without_its_database(tmp_path: Path) -> None:
    path = bootstrap(
        tmp_path, "postgres", {"a": 9}, ROUTES, dsn="postgresql://nobody@127.0.0.1:1/none"
    )
    started = run("run", "-c", str(path))
    assert started.returncode == 1
    assert "could not start: config store: postgresql://nobody@127.0.0.1:1/none" in (started.stderr)
