"""The ``piuptime`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from piuptime import __version__

DEFAULT_CONFIG = "piuptime.yaml"

DESCRIPTION = """\
piuptime keeps a fleet of small devices' services up: one process that is an API gateway
(routing, load balancing, health, limits), an AI gateway (one OpenAI- and Anthropic-compatible
endpoint in front of local and cloud models, with failover) and a fleet watch.

commands:
  run        serve with a config file (default ./piuptime.yaml)
  demo       start three demo devices on loopback and the gateway in front of them (with the
             AI gateway on /v1/)
  validate   check a config file and print every error as file:line:column
  status     show upstreams, targets and their health from a running gateway
  hash-password  hash a password for a consumer's basic auth credentials
  config     export or import the configuration (database config store)
  version    print the version
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="piuptime",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"piuptime {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="serve with a config file",
        description="Run the gateway. Reloads the config on file change or SIGHUP; SIGTERM or "
        "Ctrl-C drains in-flight requests (gateway.drain_timeout) and stops. Under systemd it "
        "reports READY/RELOADING/STOPPING and feeds the watchdog.",
    )
    run.add_argument(
        "-c",
        "--config",
        default=os.environ.get("PIUPTIME_CONFIG", DEFAULT_CONFIG),
        help="config file (default: $PIUPTIME_CONFIG or ./piuptime.yaml)",
    )
    run.add_argument(
        "--watch-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how often to check the config file for changes; 0 turns it off (default 1)",
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    demo = sub.add_parser(
        "demo",
        help="run the gateway in front of three demo devices",
        description="Start three demo device services on 127.0.0.1 and the gateway in front of "
        "them with a ready config, and print what to curl. Ctrl-C stops everything.",
    )
    demo.add_argument("--port", type=int, default=8080, help="gateway port (default 8080)")
    demo.add_argument(
        "--device-port",
        type=int,
        default=9001,
        help="first demo device port; the devices use it and the next two (default 9001)",
    )
    demo.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    val = sub.add_parser(
        "validate",
        help="check a config file",
        description="Validate a config file. Prints every problem as file:line:column: "
        "path: message and exits 1, or prints OK and exits 0.",
    )
    val.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="config file to check")
    val.add_argument("file", nargs="?", help="config file (same as -c)")

    status = sub.add_parser(
        "status",
        help="show what a running gateway sees: upstreams, targets, health",
        description="Ask a running gateway's admin listener (GET /status) for its live state and "
        "print one table per upstream: each target's backup flag, health (and active check), "
        "ejection, circuit breaker, requests in flight, latency average (EWMA) and request/"
        "failure counts. The gateway must run with an admin: section; its address and token "
        "come from the config unless --admin / --token are given.",
        epilog="The token is, in order: --token, admin.token from the config (after ${VAR} "
        "expansion), $PIUPTIME_ADMIN_TOKEN. Exit status: 0 on success, 1 when the admin "
        "listener cannot be reached, refuses the token (401) or the config has no admin: "
        "section.",
    )
    status.add_argument(
        "-c",
        "--config",
        default=os.environ.get("PIUPTIME_CONFIG", DEFAULT_CONFIG),
        help="config file the gateway runs with, for admin.listen and admin.token "
        "(default: $PIUPTIME_CONFIG or ./piuptime.yaml)",
    )
    status.add_argument(
        "--admin",
        metavar="URL",
        help="admin listener to ask, e.g. http://127.0.0.1:9180 or 127.0.0.1:9180 "
        "(default: admin.listen from the config)",
    )
    status.add_argument(
        "--token",
        help="bearer token for the admin listener (default: admin.token, then "
        "$PIUPTIME_ADMIN_TOKEN, which other users cannot see in ps)",
    )
    status.add_argument("--json", action="store_true", help="print the raw /status JSON")

    hp = sub.add_parser(
        "hash-password",
        help="hash a password for a consumer's basic.password_hash",
        description="Read a password (asked twice on a terminal, or one line from standard "
        "input with --stdin) and print a self-describing hash to paste into a consumer's "
        "basic: {username: ..., password_hash: ...}. The password itself is never stored.",
    )
    hp.add_argument(
        "--stdin", action="store_true", help="read the password from the first line of stdin"
    )
    hp.add_argument(
        "--scheme",
        choices=["scrypt", "pbkdf2"],
        default="scrypt",
        help="scrypt (default; N=2^14, r=8, p=1) or pbkdf2 (PBKDF2-HMAC-SHA256, 600k rounds)",
    )
    cfg = sub.add_parser(
        "config",
        help="export or import the configuration of a database config store",
        description="Export the configuration document (the bootstrap file's sections and the "
        "routes, upstreams, consumers and plugins of its config_store) as YAML, or import a YAML "
        "document into the database (validated like a file; one new version; a running gateway "
        "follows it). See docs/config-store.md.",
    )
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION")
    for name, text in (
        ("export", "print the configuration document as YAML"),
        ("import", "replace the stored routes, upstreams, consumers and plugins"),
    ):
        action = cfg_sub.add_parser(name, help=text, description=text)
        action.add_argument(
            "-c",
            "--config",
            default=os.environ.get("PIUPTIME_CONFIG", DEFAULT_CONFIG),
            help="the bootstrap config file (default: $PIUPTIME_CONFIG or ./piuptime.yaml)",
        )
        if name == "export":
            action.add_argument(
                "--secrets",
                choices=["redact", "keep"],
                default="redact",
                help="redact (default) or keep credentials (${VAR} references always stay)",
            )
            action.add_argument("-o", "--output", help="write to this file (default: stdout)")
        else:
            action.add_argument("file", help="the YAML document to import (- for stdin)")
            action.add_argument(
                "--expected-version",
                type=int,
                metavar="N",
                help="refuse unless the stored version is N (as the admin API's If-Match)",
            )
    sub.add_parser("version", help="print the version")
    return p


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"piuptime {__version__}")
        return 0
    if args.command == "validate":
        from piuptime.config.load import validate_main

        return validate_main(args.file or args.config, sys.stdout)
    if args.command == "status":
        from piuptime.admin.client import status_main

        return status_main(args.config, args.admin, args.token, args.json, sys.stdout, sys.stderr)
    if args.command == "demo":
        _setup_logging(args.log_level)
        from piuptime.demo.run import main as demo_main

        return demo_main(port=args.port, device_port=args.device_port)
    if args.command == "config":
        from piuptime.configstore.cli import config_main

        return config_main(args, sys.stdout, sys.stderr)
    if args.command == "hash-password":
        return _hash_password(args.stdin, args.scheme)
    if args.command == "run":
        _setup_logging(args.log_level)
        return _run(Path(args.config), args.watch_interval)
    _parser().print_help()
    return 2


def _hash_password(from_stdin: bool, scheme: str) -> int:
    from piuptime.config.plugins.auth import hash_password

    if from_stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        import getpass

        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("piuptime: the passwords differ", file=sys.stderr)
            return 1
    if not password:
        print("piuptime: an empty password cannot be hashed", file=sys.stderr)
        return 1
    print(hash_password(password, scheme))
    return 0


def _run(path: Path, watch_interval: float) -> int:
    if not path.exists():
        print(
            f"piuptime: config file {path} not found. Pass one with -c FILE, start from "
            "examples/piuptime.yaml, or try `piuptime demo`.",
            file=sys.stderr,
        )
        return 2
    import uvloop

    from piuptime.app import run
    from piuptime.config import ConfigError
    from piuptime.configstore import ConfigStoreError

    try:
        uvloop.run(run(path, watch_interval=watch_interval))
    except ConfigError as exc:
        print(f"piuptime: the config is invalid, nothing started:\n{exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"piuptime: could not start: {exc}", file=sys.stderr)
        return 1
    except ConfigStoreError as exc:
        print(f"piuptime: could not start: config store: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
