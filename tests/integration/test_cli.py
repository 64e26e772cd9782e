"""The command line: help, validate, version."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support import ROOT, piuptime_cmd


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(piuptime_cmd(*args), capture_output=True, text=True, timeout=30)


def test_help_explains_itself() -> None:
    out = run("--help").stdout
    for word in ("run", "demo", "validate", "API gateway"):
        assert word in out
    assert "SIGHUP" in run("run", "--help").stdout


def test_validate_ok_and_errors(tmp_path: Path) -> None:
    ok = run("validate", "-c", str(ROOT / "examples" / "piuptime.yaml"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "gateway:\n  limits: {header_timeout: soon}\nroutes:\n"
        "  - name: a\n    match: {path: /a}\n    upstream: ghost\n"
    )
    res = run("validate", str(bad))
    assert res.returncode == 1
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2, res.stdout
    assert lines[0].startswith(f"{bad}:2:") and "duration" in lines[0]
    assert lines[1].startswith(f"{bad}:6:") and "ghost" in lines[1]


def test_design_example_is_reported_precisely() -> None:
    res = run("validate", str(ROOT / "examples" / "design-example.yaml"))
    # Every problem (here: unset environment variables) with a position.
    assert "OPENAI_API_KEY is not set" in res.stdout
    for line in res.stdout.strip().splitlines():
        assert line.startswith(str(ROOT / "examples" / "design-example.yaml") + ":"), line


def test_version() -> None:
    assert run("version").stdout.startswith("piuptime ")
