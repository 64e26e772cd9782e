"""The config document: YAML-shaped data as written (``${VAR}`` not expanded), its rendering
back to YAML and its validation (exactly the file's).

A document is what a YAML file holds, as plain data: mappings with string keys, lists, strings,
numbers, booleans and null. The *entity* sections (``upstreams``, ``consumers``, ``routes``,
``plugins``) are what a config store keeps; the other sections (``gateway``, ``admin``,
``store``, ``config_store``, ...) always come from the bootstrap file.

Reading uses the config loader's own YAML composer and node builder (YAML 1.2 scalars, merge
keys, the depth and size limits against alias bombs) with interpolation off, so what is stored is
what was written. Rendering quotes every string that a YAML 1.1 *or* 1.2 reader would take for
something else, so a rendered document reads back as the same data; validation renders the
document and runs :func:`piuptime.config.parse_config` on the text, so a stored document is
checked by exactly the code that checks a file, and errors carry a line and column in that
rendering beside the path (``routes[2].match.path``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import yaml
from yaml.nodes import ScalarNode

from piuptime.config import Config, ConfigError, ConfigIssue, parse_config
from piuptime.config.load import (  # the loader's own YAML reading, so documents read alike
    _STR,
    _Builder,
    _compose,
    _issues,
    _TooLarge,
    _yaml_issue,
    format_loc,
)

from .base import EntityDocument, InvalidChange, Issue

__all__ = [
    "ENTITY_SECTIONS",
    "REDACTED",
    "check_data",
    "contains_redacted",
    "entities_of",
    "invalid",
    "load_raw",
    "merge",
    "render",
    "validate",
]

#: The sections a config store holds, in the order they are written.
ENTITY_SECTIONS = ("upstreams", "consumers", "routes", "plugins")
#: What a redacted secret reads as (``piuptime.admin.redact``); never imported as a value.
REDACTED = "<redacted>"
#: How deep a document (or an API body) may nest.
MAX_DEPTH = 32


# --------------------------------------------------------------------------------------------
# reading YAML as written


class _RawBuilder(_Builder):
    """The loader's builder with ``${VAR}`` left as written."""

    def _scalar(self, node: ScalarNode, loc: tuple[str | int, ...]) -> Any:
        if node.tag == _STR:
            return node.value
        return super()._scalar(node, loc)


def load_raw(text: str, filename: str = "<document>") -> dict[str, Any]:
    """The data of YAML ``text`` as written. Raises :class:`ConfigError` (with positions) when
    it is not YAML the config loader would read, or not a mapping at the top."""
    try:
        root = _compose(text)
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_issue(filename, text, exc)]) from None
    except RecursionError:
        raise ConfigError([ConfigIssue(filename, 1, 1, "", "nested too deeply")]) from None
    if root is None:
        return {}
    builder = _RawBuilder({})
    try:
        data = builder.build(root, (), 0)
    except _TooLarge:
        raise ConfigError([ConfigIssue(filename, 1, 1, "", "too many values")]) from None
    if builder.problems:
        raise ConfigError(_issues(filename, builder, builder.problems))
    if data is None:
        return {}
    if not isinstance(data, dict):
        message = "the top level must be a mapping of sections (gateway, upstreams, routes, ...)"
        raise ConfigError([ConfigIssue(filename, 1, 1, "", message)])
    return data


# --------------------------------------------------------------------------------------------
# rendering


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes what a YAML 1.2 reader (the config loader) would not read
    as a string: ``0o17``, ``1e3``, ``.5``."""

    def ignore_aliases(self, data: Any) -> bool:
        return True  # a repeated value is written out, never as an anchor and alias


_Dumper.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"),
)
_Dumper.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)
_Dumper.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Dumper.add_implicit_resolver(
    "tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]
)
_Dumper.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"])


def render(document: Mapping[str, Any]) -> str:
    """``document`` as YAML text that reads back as the same data."""
    if not document:
        return "{}\n"
    text: str = yaml.dump(
        dict(document),
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=100,
    )
    return text


# --------------------------------------------------------------------------------------------
# checks


def check_data(value: Any, where: tuple[str | int, ...] = ()) -> None:
    """Raise :class:`InvalidChange` unless ``value`` is plain document data: mappings with
    string keys, lists, strings of valid Unicode (no NUL), whole numbers that fit 64 bits,
    finite numbers, booleans, null; at most :data:`MAX_DEPTH` levels deep. Checked before
    anything is validated or stored (JSON in the database must hold it)."""
    problems: list[Issue] = []
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, where)]
    while stack and len(problems) < 20:
        item, loc = stack.pop()
        if len(loc) - len(where) > MAX_DEPTH:
            problems.append(Issue(format_loc(loc), f"nested more than {MAX_DEPTH} levels deep"))
            continue
        if isinstance(item, dict):
            for key, sub in item.items():
                if not isinstance(key, str):
                    problems.append(Issue(format_loc(loc), f"key {key!r} is not a string"))
                    continue
                if not _valid_text(key):
                    problems.append(Issue(format_loc(loc), "a key is not valid Unicode text"))
                    continue
                stack.append((sub, (*loc, key)))
        elif isinstance(item, list):
            stack.extend((sub, (*loc, i)) for i, sub in enumerate(item))
        elif isinstance(item, str):
            if not _valid_text(item):
                problems.append(Issue(format_loc(loc), "not valid Unicode text"))
        elif isinstance(item, float):
            if not math.isfinite(item):
                problems.append(Issue(format_loc(loc), f"expected a finite number, got {item}"))
        elif isinstance(item, int) and not isinstance(item, bool):
            if not -(2**63) <= item < 2**64:
                problems.append(Issue(format_loc(loc), "the number is too large"))
        elif item is not None and not isinstance(item, bool):
            problems.append(Issue(format_loc(loc), f"unexpected value {type(item).__name__}"))
    if problems:
        raise InvalidChange(problems)


def _valid_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def entities_of(document: Mapping[str, Any]) -> EntityDocument:
    """The entity sections of a *validated* document, in their stored shape: upstreams,
    consumers and plugins as ``{name: value}``; routes as a list of mappings, each with its
    name (null sections read as empty)."""
    out: EntityDocument = {}
    for section in ENTITY_SECTIONS:
        value = document.get(section)
        if section == "routes":
            out[section] = list(value or [])
        else:
            out[section] = dict(value or {})
    return out


def merge(bootstrap: Mapping[str, Any], entities: Mapping[str, Any]) -> dict[str, Any]:
    """A whole document: the bootstrap sections in their written order, then the entities."""
    whole = {k: v for k, v in bootstrap.items() if k not in ENTITY_SECTIONS}
    for section in ENTITY_SECTIONS:
        value = entities.get(section)
        if value is not None:
            whole[section] = value
    return whole


def validate(
    document: Mapping[str, Any], filename: str, env: Mapping[str, str] | None = None
) -> Config:
    """Render ``document`` and validate the text exactly like a config file (``env`` for
    ``${VAR}``, default the process environment). Raises :class:`ConfigError` with every
    problem: its path, and its line and column in the rendering."""
    try:
        check_data(document)
    except InvalidChange as exc:
        raise ConfigError(
            [ConfigIssue(filename, 0, 0, i.path, i.message) for i in exc.issues]
        ) from None
    return parse_config(render(document), filename, env)


def invalid(exc: ConfigError) -> InvalidChange:
    """A :class:`ConfigError` as the rejection of a change."""
    return InvalidChange([Issue.of(issue) for issue in exc.errors])


# --------------------------------------------------------------------------------------------
# redacted exports


def contains_redacted(document: Any) -> str | None:
    """The path of the first ``<redacted>`` value in ``document``, or None."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(document, ())]
    while stack:
        value, loc = stack.pop()
        if isinstance(value, dict):
            stack.extend((v, (*loc, str(k))) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, (*loc, i)) for i, v in enumerate(value))
        elif isinstance(value, str) and REDACTED in value:
            return format_loc(loc)
    return None
