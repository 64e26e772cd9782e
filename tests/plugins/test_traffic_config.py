"""Config errors of traffic_split and mirror, with file:line:column, and the upstream
cross-reference check (routes' plugins and the global section)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydantic import ValidationError

from piuptime.config import Config, ConfigError, parse_config
from piuptime.config.load import validate_main

HEAD = """\
upstreams:
  v1: {targets: ["http://127.0.0.1:9001"]}
  v2: {targets: ["http://127.0.0.1:9002"]}
"""


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(HEAD + text, "t.yaml")
    return [str(e) for e in caught.value.errors]


def test_unknown_upstreams_in_rules_mirror_and_the_global_section() -> None:
    text = """\
plugins:
  mirror: {upstream: v9}
routes:
  - name: r
    match: {path: /}
    upstream: v1
    plugins:
      traffic_split:
        rules:
          - when: {header: {X-Canary: "1"}}
            upstream: v2
          - upstream: v3
          - weighted:
              - {upstream: vv2, weight: 10}
              - {weight: 90}
      mirror: {upstream: shadow}
"""
    assert errors(text) == [
        "t.yaml:5:22: plugins.mirror.upstream: unknown upstream 'v9' "
        "(defined under upstreams: v1, v2)",
        "t.yaml:15:23: routes[0].plugins.traffic_split.rules[1].upstream: unknown upstream "
        "'v3' (defined under upstreams: v1, v2)",
        "t.yaml:17:28: routes[0].plugins.traffic_split.rules[2].weighted[0].upstream: "
        "unknown upstream 'vv2'; did you mean 'v2'? (defined under upstreams: v1, v2)",
        "t.yaml:19:26: routes[0].plugins.mirror.upstream: unknown upstream 'shadow' "
        "(defined under upstreams: v1, v2)",
    ]


def test_global_traffic_split_names_are_checked() -> None:
    text = """\
plugins:
  traffic_split:
    rules: [{upstream: canary}]
routes: []
"""
    (only,) = errors(text)
    assert only.startswith("t.yaml:6:24: plugins.traffic_split.rules[0].upstream: ")
    assert "unknown upstream 'canary'" in only


def test_model_validate_runs_the_same_cross_check() -> None:
    data = {
        "upstreams": {"v1": {"targets": ["http://127.0.0.1:9001"]}},
        "routes": [
            {
                "name": "r",
                "match": {"path": "/"},
                "upstream": "v1",
                "plugins": {"traffic_split": {"rules": [{"upstream": "v1"}, {"upstream": "v3"}]}},
            }
        ],
    }
    with pytest.raises(ValidationError) as caught:
        Config.model_validate(data)
    text = str(caught.value)
    assert "unknown upstream 'v3'" in text
    data["routes"][0]["plugins"] = {"traffic_split": False}  # type: ignore[index]
    Config.model_validate(data)  # switched off: nothing to check


def test_weights_all_zero_and_percent_over_100() -> None:
    text = """\
routes:
  - name: r
    match: {path: /}
    upstream: v1
    plugins:
      traffic_split:
        rules:
          - weighted: [{upstream: v2, weight: 0}, {weight: 0}]
      mirror: {upstream: v2, percent: 150%}
"""
    assert errors(text) == [
        "t.yaml:11:23: routes[0].plugins.traffic_split.rules[0].weighted: the weights are all "
        "0, so no request could be sent; give at least one a weight above 0",
        "t.yaml:12:39: routes[0].plugins.mirror.percent: a percentage is at most 100%, got '150%'",
    ]


def test_rule_shape_errors() -> None:
    text = """\
routes:
  - name: r
    match: {path: /}
    upstream: v1
    plugins:
      traffic_split:
        sticky: cookie
        rules:
          - when: {header: {X-Canary: {regex: "a", equals: "x"}}}
            upstream: v2
          - when: {}
            upstream: v2
          - weighted: [{upstream: v2, weight: 1}]
            upstream: v1
          - {when: {header: {X-A: {regex: "("}}}, upstream: v2}
          - {upstream: v2, sticky: ip}
          - {weighted: [{upstream: v2, weight: -1}]}
      mirror: {upstream: v2, max_in_flight: 0, max_body_bytes: lots}
"""
    got = errors(text)
    expected = [
        "t.yaml:10:17: routes[0].plugins.traffic_split.sticky: sticky is ip, header:<name> "
        "or cookie:<name>, got 'cookie'",
        "t.yaml:12:39: routes[0].plugins.traffic_split.rules[0].when.header.X-Canary: write a "
        'value to compare ("1"), or exactly one of {equals: ...}, {regex: ...}, '
        "{present: true|false}; got equals and regex",
        "t.yaml:14:19: routes[0].plugins.traffic_split.rules[1].when: when needs at least one "
        "of header, cookie, query, path_prefix (leave when out for a rule that takes every "
        "request)",
        "t.yaml:16:13: routes[0].plugins.traffic_split.rules[2]: a rule sends its requests to "
        "one place: write either upstream: NAME or weighted: [{upstream: NAME, weight: N}, "
        "{weight: M}]",
        "t.yaml:18:43: routes[0].plugins.traffic_split.rules[3].when.header.X-A.regex: not a "
        "valid regular expression: missing ), unterminated subpattern at position 0",
        "t.yaml:19:36: routes[0].plugins.traffic_split.rules[4].sticky: sticky only applies to "
        "a weighted rule (this one always picks one upstream)",
        "t.yaml:20:48: routes[0].plugins.traffic_split.rules[5].weighted[0].weight: must be "
        "at least 0, got -1",
    ]
    assert got[: len(expected)] == expected
    assert any("mirror.max_in_flight: must be at least 1, got 0" in e for e in got)
    assert any("mirror.max_body_bytes: expected a size" in e for e in got)


def test_piuptime_validate_prints_the_positions(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        HEAD
        + """\
routes:
  - name: r
    match: {path: /}
    upstream: v1
    plugins: {mirror: {upstream: v3}}
"""
    )
    out = io.StringIO()
    assert validate_main(str(path), out) == 1
    assert out.getvalue() == (
        f"{path}:8:34: routes[0].plugins.mirror.upstream: unknown upstream 'v3' "
        "(defined under upstreams: v1, v2)\n"
    )
    path.write_text(path.read_text().replace("v3", "v2"))
    out = io.StringIO()
    assert validate_main(str(path), out) == 0


def test_a_valid_split_and_mirror_parse() -> None:
    config = parse_config(
        HEAD
        + """\
routes:
  - name: r
    match: {path: /}
    upstream: v1
    plugins:
      traffic_split:
        sticky: header:X-User
        rules:
          - when:
              header: {X-Canary: 1, User-Agent: {regex: "^curl/"}, X-Skip: {present: false}}
              cookie: {beta: "yes"}
              query: {v: 2}
              path_prefix: /api/
            upstream: v2
          - weighted: [{upstream: v2, weight: 5}, {weight: 95}]
      mirror: {upstream: v2, percent: 10%, max_body_bytes: 1MiB, max_in_flight: 20}
""",
        "ok.yaml",
    )
    split = config.routes[0].plugins.traffic_split
    assert split is not None
    when = split.rules[0].when
    assert when is not None and when.header["X-Canary"].equals == "1"
    assert when.query["v"].equals == "2" and when.path_prefix == ["/api/"]
    mirror = config.routes[0].plugins.mirror
    assert mirror is not None
    assert (mirror.percent, mirror.max_body_bytes, mirror.max_in_flight) == (0.1, 1 << 20, 20)
