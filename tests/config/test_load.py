"""Loading YAML: every problem reported at once, each at file:line:column with a dotted path."""

from __future__ import annotations

import io
import re
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from piuptime.config import Config, ConfigError, ConfigIssue, load_config, parse_config
from piuptime.config.load import validate_main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
DESIGN = Path("/work/shared/DESIGN.md")

UPSTREAM = """
upstreams:
  app:
    targets: ["http://127.0.0.1:9001"]
"""


def parse(text: str, env: dict[str, str] | None = None) -> Config:
    return parse_config(textwrap.dedent(text), "t.yaml", env or {})


def issues(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(text, env)
    return [str(issue) for issue in caught.value.errors]


def one_issue(text: str, env: dict[str, str] | None = None) -> str:
    found = issues(text, env)
    assert len(found) == 1, found
    return found[0]


# --------------------------------------------------------------------------------------------
# Good configs


def test_empty_file_is_all_defaults() -> None:
    config = parse("")
    assert config == Config()
    assert [str(listener) for listener in config.gateway.listen] == ["127.0.0.1:8080"]
    assert config.routes == [] and config.upstreams == {}


def test_comment_only_file_and_null_sections() -> None:
    assert parse("# nothing yet\n") == Config()
    config = parse("gateway:\nstore:\nupstreams:\nroutes:\nconsumers:\n")
    assert config == Config()


def test_runnable_example_loads() -> None:
    config = load_config(EXAMPLES / "piuptime.yaml", env={})
    assert [str(listener) for listener in config.gateway.listen] == ["127.0.0.1:8080"]
    limits = config.gateway.limits
    assert limits.max_header_bytes == 16 * 1024
    assert limits.max_body_bytes == 10 * 1024 * 1024
    assert (limits.header_timeout, limits.idle_timeout, limits.body_timeout) == (10, 75, 30)
    assert config.gateway.access_log.to_stdout
    sensors = config.upstreams["sensors"]
    assert [(t.scheme, t.host, t.port, t.weight) for t in sensors.targets] == [
        ("http", "127.0.0.1", 9001, 2),
        ("http", "127.0.0.1", 9002, 1),
    ]
    assert config.upstreams["cameras"].timeouts.connect == 0.5
    assert config.upstreams["cameras"].timeouts.read == 120.0
    snapshot = config.route("camera-snapshot")
    assert snapshot.match.captures == ("id",)
    assert snapshot.rewrite == "/snapshot/{id}"
    upload = config.route("camera-upload")
    assert upload.match.hosts == ("cameras.local", "*.cameras.local")
    assert upload.match.headers == {"x-device-class": "camera"}
    assert upload.max_body_bytes == 50 * 1024 * 1024
    assert upload.priority == 10


def test_full_route_values() -> None:
    config = parse(
        UPSTREAM
        + textwrap.dedent(
            """
        routes:
          - name: r
            match:
              path: /dev/{id}/
              methods: [get, Post, GET]
              host: API.Example.com
            upstream: app
            rewrite: /devices/{id}/
            host_header: backend.internal:8443
            max_body_bytes: 1KB
            priority: -3
        """
        )
    )
    route = config.routes[0]
    assert route.match.methods == ["GET", "POST"]
    assert route.match.host == "api.example.com"
    assert route.match.is_prefix
    assert route.max_body_bytes == 1000
    assert route.host_header == "backend.internal:8443"
    assert route.priority == -3


def test_yaml_12_scalars() -> None:
    config = parse(
        """
        gateway:
          access_log: {path: off}
          via: yes
          drain_timeout: 0
        """
    )
    assert config.gateway.access_log.path == "off"
    assert not config.gateway.access_log.enabled
    assert config.gateway.via == "yes"
    assert config.gateway.drain_timeout == 0.0


def test_anchors_and_merge_keys() -> None:
    config = parse(
        """
        upstreams:
          a: &base
            targets: ["http://h:1"]
            timeouts: {connect: 1s, read: 5s}
          b:
            <<: *base
            targets: ["http://h:2"]
        """
    )
    b = config.upstreams["b"]
    assert b.timeouts.connect == 1.0 and b.timeouts.read == 5.0
    assert b.targets[0].port == 2


def test_merged_values_report_their_own_position() -> None:
    found = issues(
        """
        upstreams:
          a: &base
            targets: ["http://h:1"]
            pool: {max_idle: -1}
          b:
            <<: *base
            targets: ["http://h:2"]
        """
    )
    assert found == [
        "t.yaml:5:22: upstreams.a.pool.max_idle: must be at least 0, got -1",
        "t.yaml:5:22: upstreams.b.pool.max_idle: must be at least 0, got -1",
    ]


# --------------------------------------------------------------------------------------------
# The DESIGN.md example

# every section is built now: only unset ${VARS} are errors
DESIGN_KEY_UNSET = (
    "26:24: consumers.kitchen-app.keys[0]: environment variable KITCHEN_KEY is not set; set it, "
    "or write ${KITCHEN_KEY:-default} to give a default"
)
DESIGN_LLM_KEYS_UNSET = [
    "41:74: llm.providers.openai.keys[0]: environment variable OPENAI_API_KEY is not set; set "
    "it, or write ${OPENAI_API_KEY:-default} to give a default",
    "42:38: llm.providers.claude.keys[0]: environment variable ANTHROPIC_API_KEY is not set; "
    "set it, or write ${ANTHROPIC_API_KEY:-default} to give a default",
]
# admin.token is ${PIUPTIME_ADMIN_TOKEN}: an unset variable is an error (fail closed).
DESIGN_TOKEN_UNSET = (
    "7:10: admin.token: environment variable PIUPTIME_ADMIN_TOKEN is not set; set it, or write "
    "${PIUPTIME_ADMIN_TOKEN:-default} to give a default"
)

DESIGN_ENV = {
    "PIUPTIME_ADMIN_TOKEN": "t",
    "KITCHEN_KEY": "k",
    "OPENAI_API_KEY": "o",
    "ANTHROPIC_API_KEY": "a",
}


def test_design_example_reports_exactly_the_unset_variables() -> None:
    path = EXAMPLES / "design-example.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    expected = [DESIGN_TOKEN_UNSET, DESIGN_KEY_UNSET, *DESIGN_LLM_KEYS_UNSET]
    assert [str(issue) for issue in caught.value.errors] == [f"{path}:{line}" for line in expected]
    assert all(issue.file == str(path) for issue in caught.value.errors)


def test_design_example_loads_whole_with_its_variables_set() -> None:
    config = load_config(EXAMPLES / "design-example.yaml", env=DESIGN_ENV)
    assert config.llm is not None
    assert config.llm.models["chat"].strategy == "priority"
    assert [d.provider for d in config.llm.models["chat"].deployments] == ["local", "openai"]
    assert config.llm.providers["claude"].keys == ["a"]


def test_design_example_shapes_fit_the_schema() -> None:
    """Every section of the example, the unsupported ones included, is valid schema-wise."""
    data = yaml.safe_load((EXAMPLES / "design-example.yaml").read_text())
    config = Config.model_validate(data)
    sensors = config.upstreams["sensors"]
    assert sensors.retries is not None and sensors.retries.budget == 0.2
    assert sensors.health is not None and sensors.health.active is not None
    assert sensors.health.active.interval == 5.0
    assert sensors.health.passive is not None and sensors.health.passive.eject_for == 30.0
    assert config.admin is not None and config.admin.listen == "127.0.0.1:9180"
    assert config.consumers["kitchen-app"].groups == ["apps"]
    assert set(config.routes[0].plugins.enabled()) == {
        "key_auth",
        "rate_limit",
        "cache",
    }
    assert config.llm is not None and "local" in config.llm.providers


@pytest.mark.skipif(not DESIGN.exists(), reason="the workspace DESIGN.md is not here")
def test_design_example_file_is_verbatim() -> None:
    section = DESIGN.read_text().split("## Configuration contract", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None
    assert (EXAMPLES / "design-example.yaml").read_text() == block.group(1)


# --------------------------------------------------------------------------------------------
# Each kind of problem, at the right place

CASES = [
    ("unknown top-level key", "gatway: {}\n",
     "t.yaml:1:1: gatway: unknown key 'gatway'; did you mean 'gateway'? (expected one of: "
     + ", ".join(Config.model_fields) + ")"),
    ("unknown nested key", "gateway:\n  limts: {}\n",
     "t.yaml:2:3: gateway.limts: unknown key 'limts'; did you mean 'limits'? (expected one of: "
     "listen, limits, access_log, drain_timeout, fast_lane, via, trusted_proxies)"),
    ("unknown key in a flow mapping", "gateway: {limits: {max_body: 1KiB}}\n",
     "t.yaml:1:20: gateway.limits.max_body: unknown key 'max_body'; did you mean "
     "'max_body_bytes'? (expected one of: max_header_bytes, max_header_count, max_body_bytes, "
     "header_timeout, idle_timeout, body_timeout)"),
    ("bad duration", "gateway:\n  limits:\n    idle_timeout: 5 minutes\n",
     "t.yaml:3:19: gateway.limits.idle_timeout: expected a duration like 250ms, 30s, 5m or "
     "1h30m (a bare number means seconds), got '5 minutes'"),
    ("zero timeout", "gateway: {limits: {header_timeout: 0s}}\n",
     "t.yaml:1:36: gateway.limits.header_timeout: must be longer than 0s, got '0s'"),
    ("bad size", "gateway:\n  limits: {max_body_bytes: 10M}\n",
     "t.yaml:2:28: gateway.limits.max_body_bytes: ambiguous size unit in '10M': write MiB "
     "(binary, 1024) or MB (decimal, 1000)"),
    ("wrong type", "gateway:\n  limits:\n    max_header_count: many\n",
     "t.yaml:3:23: gateway.limits.max_header_count: expected a whole number, got 'many'"),
    ("mapping expected", "gateway: [1]\n",
     "t.yaml:1:10: gateway: expected a mapping (key: value), got a list"),
    ("bad listener", 'gateway: {listen: ["0.0.0.0"]}\n',
     't.yaml:1:20: gateway.listen[0]: expected "host:port" like 127.0.0.1:8080, [::1]:8080 or '
     ":8080 (all interfaces), got '0.0.0.0' (the port is missing)"),
    ("bare IPv6 listener", 'gateway: {listen: "::1:80"}\n',
     "t.yaml:1:19: gateway.listen[0]: put an IPv6 address in brackets, like [::1]:8080, "
     "got '::1:80'"),
    ("listener address", "gateway:\n  listen:\n    - {address: 'x:99999'}\n",
     "t.yaml:3:17: gateway.listen[0].address: the port must be a number from 0 to 65535, "
     "got 'x:99999'"),
    ("listener unknown key", "gateway:\n  listen:\n    - {adress: 'x:1'}\n",
     "t.yaml:3:8: gateway.listen[0].adress: unknown key 'adress'; did you mean 'address'? "
     "(a listener has address and tls)"),
    ("missing key", "upstreams:\n  app: {targets: ['http://h']}\nroutes:\n  - name: r\n"
     "    match: {path: /}\n",
     "t.yaml:4:5: routes[0].upstream: required key 'upstream' is missing; add it"),
    ("no targets", "upstreams:\n  app:\n    targets: []\n",
     "t.yaml:3:14: upstreams.app.targets: needs at least 1 item"),
    ("target with a path", "upstreams:\n  app:\n    targets:\n      - url: http://h:1/api\n",
     "t.yaml:4:14: upstreams.app.targets[0].url: a target URL has no path, got "
     "'http://h:1/api': write http://h:1 and use the route's rewrite to change the path"),
    ("target scheme", "upstreams:\n  app:\n    targets: [ftp://h]\n",
     "t.yaml:3:15: upstreams.app.targets[0].url: expected a target URL like "
     '"http://10.0.0.5:8000" (http or https, host, port), got \'ftp://h\''),
    ("duplicate target", "upstreams:\n  app:\n    targets: ['http://h', 'http://h:80/']\n",
     "t.yaml:3:27: upstreams.app.targets[1].url: http://h:80/ is the same server as "
     "targets[0]; list it once and raise its weight instead"),
    ("weight", "upstreams:\n  app:\n    targets: [{url: 'http://h', weight: 0}]\n",
     "t.yaml:3:41: upstreams.app.targets[0].weight: must be at least 1, got 0"),
    ("balance literal", "upstreams:\n  app:\n    balance: random\n    targets: ['http://h']\n",
     "t.yaml:3:14: upstreams.app.balance: expected one of 'round_robin', 'least_conn', 'ewma' "
     "or 'hash', got 'random'"),
    ("CA file", "upstreams:\n  app:\n    targets: ['https://h']\n    tls: {ca: missing.pem}\n",
     None),
    ("unknown upstream", UPSTREAM + "routes:\n  - {name: r, match: {path: /}, upstream: ap}\n",
     "t.yaml:6:43: routes[0].upstream: unknown upstream 'ap'; did you mean 'app'? "
     "(defined under upstreams: app)"),
    ("duplicate route name", UPSTREAM + "routes:\n"
     "  - {name: r, match: {path: /a}, upstream: app}\n"
     "  - {name: r, match: {path: /b}, upstream: app}\n",
     "t.yaml:7:12: routes[1].name: duplicate route name 'r' (routes[0] has it too); route "
     "names must be unique"),
    ("strip_prefix on an exact path", UPSTREAM + "routes:\n"
     "  - name: r\n    match: {path: /a}\n    upstream: app\n    strip_prefix: true\n",
     "t.yaml:9:19: routes[0].strip_prefix: strip_prefix needs a prefix path (ending in /), "
     "but match.path '/a' matches exactly; end it with / or remove strip_prefix"),
    ("rewrite placeholder", UPSTREAM + "routes:\n"
     "  - name: r\n    match: {path: '/d/{id}'}\n    upstream: app\n    rewrite: /x/{name}\n",
     "t.yaml:9:14: routes[0].rewrite: {name} is not captured by match.path '/d/{id}' "
     "(captures: {id})"),
    ("strip_prefix with rewrite", UPSTREAM + "routes:\n"
     "  - name: r\n    match: {path: /a/}\n    upstream: app\n    strip_prefix: true\n"
     "    rewrite: /b/\n",
     "t.yaml:9:19: routes[0].strip_prefix: strip_prefix and rewrite together: rewrite already "
     "replaces the matched part of the path; keep only one of them"),
    ("path must start with /", UPSTREAM + "routes:\n"
     "  - {name: r, match: {path: api/}, upstream: app}\n",
     "t.yaml:6:29: routes[0].match.path: match.path starts with /, got 'api/'"),
    ("capture not a segment", UPSTREAM + "routes:\n"
     "  - {name: r, match: {path: '/d/x{id}'}, upstream: app}\n",
     "t.yaml:6:29: routes[0].match.path: a capture is a whole path segment, like "
     "/devices/{id}/status; got 'x{id}' in '/d/x{id}'"),
    ("capture name", UPSTREAM + "routes:\n"
     "  - {name: r, match: {path: '/d/{1x}'}, upstream: app}\n",
     "t.yaml:6:29: routes[0].match.path: {1x} in match.path '/d/{1x}': a capture name is "
     "letters, digits and _, not starting with a digit"),
    ("duplicate capture", UPSTREAM + "routes:\n"
     "  - {name: r, match: {path: '/{a}/{a}'}, upstream: app}\n",
     "t.yaml:6:29: routes[0].match.path: capture {a} appears twice in '/{a}/{a}'"),
    ("bad method", UPSTREAM + "routes:\n"
     "  - {name: r, match: {path: /, methods: ['GE T']}, upstream: app}\n",
     "t.yaml:6:41: routes[0].match.methods: not an HTTP method: 'GE T'"),
    ("bad host", UPSTREAM + "routes:\n"
     "  - {name: r, match: {path: /, host: 'a.com:80'}, upstream: app}\n",
     "t.yaml:6:38: routes[0].match.host: match.host is a host name without a port, got "
     "'a.com:80'"),
    ("bad header name", UPSTREAM + "routes:\n"
     "  - {name: r, match: {path: /, headers: {'x y': v}}, upstream: app}\n",
     "t.yaml:6:42: routes[0].match.headers[\"x y\"]: not an HTTP header name: 'x y'"),
    ("plugin", UPSTREAM + "routes:\n"
     "  - {name: r, match: {path: /}, upstream: app, plugins: {key_aut: }}\n",
     "t.yaml:6:58: routes[0].plugins.key_aut: unknown key 'key_aut'; did you mean 'key_auth'? "
     "(expected one of: ...)"),
    ("redis", "store:\n  redis: http://localhost:6379/0\n",
     "t.yaml:2:10: store.redis: expected a Redis URL like redis://127.0.0.1:6379/0 (or rediss:// "
     "for TLS, unix:///run/redis.sock), got 'http://localhost:6379/0'"),
    ("admin off loopback without a token", "admin:\n  listen: 0.0.0.0:9180\n",
     "t.yaml:2:11: admin.listen: the admin listener on 0.0.0.0:9180 would be reachable from "
     "other machines without a token; set admin.token (e.g. token: ${PIUPTIME_ADMIN_TOKEN}) or "
     "listen on a loopback address such as 127.0.0.1:9180"),
    ("duplicate key", "gateway:\n  via: a\n  via: b\n",
     "t.yaml:3:3: gateway.via: duplicate key 'via' (first at line 2); YAML would silently "
     "keep only the last one, so remove one of them"),
    ("duplicate top-level section", "routes: []\nroutes: []\n",
     "t.yaml:2:1: routes: duplicate key 'routes' (first at line 1); YAML would silently keep "
     "only the last one, so remove one of them"),
    ("YAML syntax", "gateway:\n  via: [a\n",
     "t.yaml:3:1: invalid YAML: while parsing a flow sequence, did not find expected ',' "
     "or ']'"),
    ("YAML indentation", "gateway:\n  via: a\n   drain_timeout: 1s\n",
     "t.yaml:3:17: invalid YAML: mapping values are not allowed in this context"),
    ("YAML tag", "gateway: !!python/object:os.system {}\n",
     "t.yaml:1:10: gateway: unsupported YAML tag !!python/object:os.system; remove it"),
    ("top level not a mapping", "- a\n- b\n",
     "t.yaml:1:1: the top level must be a mapping of sections (gateway, upstreams, routes, ...)"),
    ("env var missing", "gateway:\n  via: ${VIA_NAME}\n",
     "t.yaml:2:8: gateway.via: environment variable VIA_NAME is not set; set it, or write "
     "${VIA_NAME:-default} to give a default"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_problem_position(text: str, expected: str | None) -> None:
    found = issues(text)
    assert len(found) == 1, found
    if expected is not None and expected.endswith("(expected one of: ...)"):
        # the list of choices grows with the plugins; the position and the hint are what count
        assert found[0].startswith(expected.removesuffix("(expected one of: ...)")), found[0]
    elif expected is not None:
        assert found[0] == expected


def test_missing_tls_files(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not checked here\n")
    found = issues(
        f"""
        gateway:
          listen:
            - address: ":8443"
              tls: {{cert: {cert}, key: missing-key.pem}}
        """
    )
    assert len(found) == 1
    assert found[0].startswith("t.yaml:5:")
    assert (
        "gateway.listen[0].tls.key: key file not found: missing-key.pem (relative to " in (found[0])
    )


def test_missing_ca_file() -> None:
    issue = one_issue("upstreams:\n  app:\n    targets: ['https://h']\n    tls: {ca: no.pem}\n")
    assert issue.startswith("t.yaml:4:15: upstreams.app.tls.ca: CA file not found: no.pem")


@pytest.mark.parametrize(
    ("text", "path", "position"),
    [
        ("store: {sqllite: x}\n", "store.sqllite", "1:9"),
        ("gateway: {access_log: {file: x}}\n", "gateway.access_log.file", "1:24"),
        ("upstreams: {a: {targets: [{url: 'http://h', wieght: 2}]}}\n",
         "upstreams.a.targets[0].wieght", "1:45"),
        ("upstreams: {a: {targets: ['http://h'], pool: {max: 1}}}\n", "upstreams.a.pool.max",
         "1:47"),
        ("upstreams: {a: {targets: ['http://h'], timeout: {read: 1s}}}\n",
         "upstreams.a.timeout", "1:40"),
        ("routes:\n  - {name: r, upstream: a, match: {path: /, method: [GET]}}\n",
         "routes[0].match.method", "2:45"),
        ("routes:\n  - {name: r, upstream: a, match: {path: /}, strip: true}\n",
         "routes[0].strip", "2:46"),
    ],
)  # fmt: skip
def test_unknown_keys_anywhere(text: str, path: str, position: str) -> None:
    found = [i for i in issues(text) if "unknown key" in i]
    assert len(found) == 1, found
    assert found[0].startswith(f"t.yaml:{position}: {path}: unknown key")


def test_many_problems_together_sorted_by_position() -> None:
    found = issues(
        """
        gateway:
          limts: {}
          drain_timeout: soon
        upstreams:
          app:
            targets: ["http://h:1/x"]
        routes:
          - name: a
            match: {path: /a}
            upstream: nope
            strip_prefix: true
          - name: a
            match: {path: /b/}
            upstream: app
            rewrite: /{id}
        llm: {providers: {p: {kind: openai}}, models: {m: {deployments: [{provider: q}]}}}
        """
    )
    assert [issue.split(": ")[1] for issue in found] == [
        "gateway.limts",
        "gateway.drain_timeout",
        "upstreams.app.targets[0].url",
        "routes[0].upstream",
        "routes[0].strip_prefix",
        "routes[1].name",
        "routes[1].rewrite",
        "llm.models.m.deployments[0].model",
    ]
    lines = [int(issue.split(":")[1]) for issue in found]
    assert lines == sorted(lines) == [3, 4, 7, 11, 12, 13, 16, 17]


def test_issue_objects() -> None:
    with pytest.raises(ConfigError) as caught:
        parse("gateway:\n  via: [x]\n")
    (issue,) = caught.value.errors
    assert issue == ConfigIssue("t.yaml", 2, 8, "gateway.via", "expected a string, got a list")
    assert str(caught.value) == "t.yaml:2:8: gateway.via: expected a string, got a list"


def test_broken_route_still_gets_cross_checks() -> None:
    """A schema error elsewhere in a route does not hide the unknown upstream."""
    found = issues(
        UPSTREAM
        + textwrap.dedent(
            """
        routes:
          - name: r
            match: {path: /a}
            upstream: missing
            priority: high
        """
        )
    )
    assert [f.split(": ")[1] for f in found] == ["routes[0].upstream", "routes[0].priority"]


# --------------------------------------------------------------------------------------------
# ${ENV}


def test_env_values_are_interpolated() -> None:
    config = parse(
        """
        gateway:
          listen: ["${HOST:-127.0.0.1}:${PORT}"]
          via: ${VIA}
          limits: {max_body_bytes: "${BODY:-1MiB}", idle_timeout: "${IDLE}"}
        upstreams:
          app:
            targets: [{url: "http://${BACKEND}", weight: "${W}"}]
            tls: {verify: "${VERIFY}"}
        """,
        env={"PORT": "0", "VIA": "edge-1", "IDLE": "2m", "BACKEND": "10.0.0.7:81", "W": "3",
             "VERIFY": "false"},
    )  # fmt: skip
    assert str(config.gateway.listen[0]) == "127.0.0.1:0"
    assert config.gateway.via == "edge-1"
    assert config.gateway.limits.max_body_bytes == 1024 * 1024
    assert config.gateway.limits.idle_timeout == 120.0
    target = config.upstreams["app"].targets[0]
    assert (target.host, target.port, target.weight) == ("10.0.0.7", 81, 3)
    assert config.upstreams["app"].tls.verify is False


def test_env_escape() -> None:
    config = parse(
        UPSTREAM
        + textwrap.dedent(
            """
        routes:
          - {name: "$${literal}", match: {path: /}, upstream: app}
        """
        )
    )
    assert config.routes[0].name == "${literal}"


def test_missing_env_var_is_reported_alone_at_its_value() -> None:
    found = issues(
        """
        gateway:
          limits: {idle_timeout: "${IDLE}"}
          listen: ["0.0.0.0:${PORT}", "${OTHER}:1"]
        """,
        env={},
    )
    assert found == [
        "t.yaml:3:26: gateway.limits.idle_timeout: environment variable IDLE is not set; set it, "
        "or write ${IDLE:-default} to give a default",
        "t.yaml:4:12: gateway.listen[0]: environment variable PORT is not set; set it, or write "
        "${PORT:-default} to give a default",
        "t.yaml:4:31: gateway.listen[1]: environment variable OTHER is not set; set it, or "
        "write ${OTHER:-default} to give a default",
    ]


def test_missing_env_var_in_a_shorthand_target() -> None:
    assert issues('upstreams:\n  m:\n    targets: ["http://${OLLAMA_HOST}:11434"]\n') == [
        "t.yaml:3:15: upstreams.m.targets[0]: environment variable OLLAMA_HOST is not set; set "
        "it, or write ${OLLAMA_HOST:-default} to give a default"
    ]


def test_env_defaults_to_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIUPTIME_TEST_VIA", "from-env")
    config = parse_config("gateway: {via: '${PIUPTIME_TEST_VIA}'}\n")
    assert config.gateway.via == "from-env"


def test_env_is_not_applied_to_keys() -> None:
    config = parse("upstreams:\n  ${NAME}: {targets: ['http://h']}\n")
    assert list(config.upstreams) == ["${NAME}"]


# --------------------------------------------------------------------------------------------
# Hostile YAML


def test_alias_loop() -> None:
    assert issues("gateway: &b {via: *b}\n") == [
        "t.yaml:1:10: gateway.via: an alias refers to a node that contains it (a loop)"
    ]


def test_billion_laughs_is_refused_quickly() -> None:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 10) + "]")
    found = issues("\n".join(lines) + "\n")
    assert found == ["t.yaml:1:1: more than 200000 values once aliases are expanded"]


def test_deep_nesting() -> None:
    text = "gateway: " + "{a: " * 100 + "1" + "}" * 100 + "\n"
    found = issues(text)
    assert any("nested more than 64 levels deep" in f for f in found)


def test_control_characters() -> None:
    assert one_issue("gateway:\n  via: a\x00b\n") == (
        "t.yaml:2:9: invalid YAML: control characters are not allowed"
    )


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_arbitrary_text_only_raises_config_error(text: str) -> None:
    try:
        parse_config(text, "t.yaml", {})
    except ConfigError as exc:
        assert exc.errors
        for issue in exc.errors:
            assert issue.message and issue.line >= 1 and issue.column >= 1


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["10s", "16KiB", "http://h:1", "/a/", "/{id}", "round_robin", "20%", ":0"]),
)
_KEYS = st.sampled_from(
    ["gateway", "listen", "limits", "routes", "upstreams", "targets", "url", "match", "path",
     "name", "upstream", "strip_prefix", "rewrite", "tls", "cert", "via", "plugins", "x"]
)  # fmt: skip
_DATA = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_KEYS | st.sampled_from(["store", "admin", "llm"]), _DATA, max_size=5))
def test_arbitrary_structures_only_raise_config_error(data: dict[str, object]) -> None:
    text = yaml.safe_dump(data)
    try:
        parse_config(text, "t.yaml", {})
    except ConfigError as exc:
        assert exc.errors
        for issue in exc.errors:
            assert issue.line >= 1 and issue.column >= 1 and issue.message


_DESIGN_TEXT = (EXAMPLES / "design-example.yaml").read_text()


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, len(_DESIGN_TEXT)),
    st.integers(0, 5),
    st.text(alphabet=" :-[]{}\n\"'&*!%${}#|>0a", max_size=3),
)
def test_mangled_design_example_only_raises_config_error(at: int, cut: int, insert: str) -> None:
    text = _DESIGN_TEXT[:at] + insert + _DESIGN_TEXT[at + cut :]
    try:
        parse_config(text, "t.yaml", {})
    except ConfigError as exc:
        assert exc.errors


# --------------------------------------------------------------------------------------------
# Files and the validate command


def test_load_config_reports_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.yaml")
    (issue,) = caught.value.errors
    assert (issue.line, issue.column) == (0, 0)
    assert (
        str(issue) == f"{tmp_path / 'absent.yaml'}: cannot read the file: No such file or directory"
    )

    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"gateway:\n  via: \xff\xfe\n")
    with pytest.raises(ConfigError) as caught:
        load_config(binary)
    assert str(caught.value) == f"{binary}:2:8: the file is not UTF-8 text"


def test_load_config_accepts_a_bom(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes("\ufeffgateway: {via: bom}\n".encode())
    assert load_config(path).gateway.via == "bom"


def test_validate_main_ok() -> None:
    out = io.StringIO()
    path = str(EXAMPLES / "piuptime.yaml")
    assert validate_main(path, out) == 0
    assert out.getvalue() == f"{path}: OK (3 routes, 2 upstreams, 2 model groups)\n"


def test_validate_main_singular(tmp_path: Path) -> None:
    path = tmp_path / "one.yaml"
    path.write_text(UPSTREAM + "routes:\n  - {name: r, match: {path: /}, upstream: app}\n")
    out = io.StringIO()
    assert validate_main(str(path), out) == 0
    assert out.getvalue() == f"{path}: OK (1 route, 1 upstream)\n"


def test_validate_main_prints_every_issue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIUPTIME_ADMIN_TOKEN", raising=False)
    out = io.StringIO()
    path = str(EXAMPLES / "design-example.yaml")
    assert validate_main(path, out) == 1
    lines = out.getvalue().splitlines()
    # the unset PIUPTIME_ADMIN_TOKEN, KITCHEN_KEY, OPENAI_API_KEY and ANTHROPIC_API_KEY
    assert len(lines) == 2 + len(DESIGN_LLM_KEYS_UNSET)
    assert all(line.startswith(f"{path}:") for line in lines)


def test_pure_python_yaml_gives_the_same_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without libyaml the pure-Python parser is used; positions and messages stay the same."""
    from piuptime.config import load

    path = EXAMPLES / "design-example.yaml"
    with pytest.raises(ConfigError) as with_c:
        load_config(path, env={})
    monkeypatch.setattr(load, "_Composer", load._PyComposer)
    with pytest.raises(ConfigError) as with_python:
        load_config(path, env={})
    assert with_python.value.errors == with_c.value.errors
    assert one_issue("gateway:\n  via: a\x00b\n").startswith("t.yaml:2:9: invalid YAML:")
    assert one_issue("gateway:\n  via: [a\n").startswith("t.yaml:3:1: invalid YAML:")
