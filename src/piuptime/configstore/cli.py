"""``piuptime config export`` and ``piuptime config import``: the configuration document of the
store named by the bootstrap file's ``config_store:`` section, straight from and to the database
(Kong's ``kong config db_export`` / ``db_import``). A running gateway follows an import at once
on PostgreSQL (NOTIFY) and within ``config_store.poll_interval`` on SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import socket
import sys
from pathlib import Path
from typing import TextIO

from piuptime.config import ConfigError

from .apply import ConfigService, _bootstrap_of, export_text, read_config_file
from .base import ConfigStoreError, InvalidChange
from .document import merge

__all__ = ["config_main"]


def config_main(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run ``piuptime config ACTION``; the exit status (0 ok, 1 refused or failed, 2 usage)."""
    path = Path(args.config)
    try:
        if args.config_command == "export":
            text = asyncio.run(_export(path, args.secrets, err))
            if text is None:
                return 1
            if args.output is None or args.output == "-":
                out.write(text)
            else:
                Path(args.output).write_text(text, encoding="utf-8")
                print(f"exported {path}'s configuration to {args.output}", file=err)
            return 0
        if args.config_command == "import":
            if args.file == "-":
                text, name = sys.stdin.read(), "<stdin>"
            else:
                text, name = Path(args.file).read_bytes().decode("utf-8-sig"), args.file
            return asyncio.run(_import(path, text, name, args.expected_version, out, err))
    except ConfigError as exc:
        print(f"piuptime: {path} is invalid:\n{exc}", file=err)
        return 1
    except (OSError, UnicodeDecodeError) as exc:
        print(f"piuptime: {exc}", file=err)
        return 1
    print("piuptime config: expected export or import", file=err)
    return 2


async def _service(path: Path) -> ConfigService:
    config, raw = await asyncio.to_thread(read_config_file, path)
    service = ConfigService.for_config(config, path)
    service.bootstrap = _bootstrap_of(raw)
    if not service.database:
        await service.start(config)
    else:
        await service.store.open()
    return service


async def _export(path: Path, secrets: str, err: TextIO) -> str | None:
    service = await _service(path)
    try:
        snapshot = await service.snapshot()
        document = merge(service.bootstrap, snapshot.document)
        if secrets == "redact":
            from piuptime.admin.redact import env_references, redact

            text = await asyncio.to_thread(path.read_text, encoding="utf-8-sig")
            document = redact(document, env_references(text))
        return export_text(snapshot.version, document, service.store.describe())
    except ConfigStoreError as exc:
        print(f"piuptime: config store: {exc}", file=err)
        return None
    finally:
        await service.aclose()


async def _import(
    path: Path, text: str, name: str, expected: int | None, out: TextIO, err: TextIO
) -> int:
    service = await _service(path)
    actor = f"cli:{getpass.getuser()}@{socket.gethostname()}"
    try:
        result = await service.import_document(
            text, actor=actor, expected_version=expected, filename=name
        )
    except InvalidChange as exc:
        print(f"piuptime: {name} was not imported; nothing changed:", file=err)
        for issue in exc.issues:
            print(f"  {issue}", file=err)
        return 1
    except ConfigStoreError as exc:
        print(f"piuptime: {name} was not imported: {exc}", file=err)
        return 1
    finally:
        await service.aclose()

    def names(found: dict[str, list[str]]) -> str:
        return "; ".join(f"{s}: {', '.join(n)}" for s, n in found.items()) or "none"

    print(f"imported {name} into {service.store.describe()}: version {result.version}", file=out)
    print(f"  added: {names(result.added)}", file=out)
    print(f"  removed: {names(result.removed)}", file=out)
    print(f"  changed: {names(result.changed)}", file=out)
    if result.ignored_sections:
        print(f"  ignored (they come from {path}): {', '.join(result.ignored_sections)}", file=out)
    return 0
