"""YAML text → Python data with positions → validation → a :class:`Config` or every problem.

The YAML is composed into a node tree (``yaml.compose``) rather than loaded, so every value keeps
the line and column it came from. The tree is turned into plain data by hand, which is where
duplicate keys are caught (PyYAML would keep the last one silently) and ``${VAR}`` references
expanded. Scalars are typed with YAML 1.2 rules: only ``true``/``false`` are booleans (``off``,
``no`` and ``on`` stay strings), no sexagesimal numbers, no timestamps; keys are always strings.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TextIO, TypeAlias, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from yaml.composer import Composer
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import BaseResolver
from yaml.scanner import Scanner

from .env import EnvError, expand
from .plugins.ratelimit import shared_store_problems
from .schema import Config, SchemaValueError, config_problems, route_problems

__all__ = ["ConfigError", "ConfigIssue", "load_config", "parse_config", "validate_main"]

Loc: TypeAlias = tuple[str | int, ...]

#: Nodes visited while turning the YAML tree into data (aliases count each time they are used):
#: a guard against "billion laughs" documents.
MAX_NODES = 200_000
#: How deep mappings and lists may nest.
MAX_DEPTH = 64


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file. ``line``/``column`` are 1-based; 0 when the problem has no
    position (the file could not be read)."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """The config is invalid; ``errors`` lists every problem found, sorted by position."""

    def __init__(self, errors: list[ConfigIssue]) -> None:
        super().__init__("\n".join(str(issue) for issue in errors))
        self.errors = errors


# --------------------------------------------------------------------------------------------
# YAML with 1.2-style scalars

_STR = "tag:yaml.org,2002:str"
_NULL = "tag:yaml.org,2002:null"
_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_MERGE = "tag:yaml.org,2002:merge"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"

_INT_RE = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
_FLOAT_RE = re.compile(
    r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
)


class _Resolver(BaseResolver):
    """YAML 1.2 core schema: true/false, null/~, decimal/0o/0x integers, floats; merge keys."""


_Resolver.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Resolver.add_implicit_resolver(_INT, re.compile(rf"^(?:{_INT_RE.pattern})$"), list("-+0123456789"))
_Resolver.add_implicit_resolver(
    _FLOAT, re.compile(rf"^(?:{_FLOAT_RE.pattern})$"), list("-+0123456789.")
)
_Resolver.add_implicit_resolver(_NULL, re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""])
_Resolver.add_implicit_resolver(_MERGE, re.compile(r"^(?:<<)$"), ["<"])


class _PyComposer(Reader, Scanner, Parser, Composer, _Resolver):
    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        _Resolver.__init__(self)


_Composer: Any = _PyComposer
try:  # libyaml's parser when PyYAML was built with it; resolution stays in Python (_Resolver).
    from yaml._yaml import CParser

    class _CComposer(CParser, _Resolver):
        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            _Resolver.__init__(self)

    _Composer = _CComposer
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    pass


def _compose(text: str) -> Node | None:
    loader = _Composer(text)
    try:
        node: Node | None = loader.get_single_node()
        return node
    finally:
        loader.dispose()


# --------------------------------------------------------------------------------------------
# Node tree → data + positions


@dataclass(slots=True)
class _Problem:
    loc: Loc
    message: str
    on_key: bool = False
    line: int = 0  # explicit position, 1-based (0: look it up from loc)
    column: int = 0
    unsupported: bool = False


class _TooLarge(Exception):
    pass


def _tag(tag: str) -> str:
    return "!!" + tag[len("tag:yaml.org,2002:") :] if tag.startswith("tag:yaml.org,2002:") else tag


def _mark(node: Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


class _Builder:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.values: dict[Loc, tuple[int, int]] = {}
        self.keys: dict[Loc, tuple[int, int]] = {}
        self.problems: list[_Problem] = []
        self.broken: set[Loc] = (
            set()
        )  # values replaced after an error: schema errors there are noise
        self.visited = 0
        self.active: set[int] = set()

    def _problem(self, node: Node, loc: Loc, message: str) -> None:
        line, column = _mark(node)
        self.problems.append(_Problem(loc, message, line=line, column=column))
        self.broken.add(loc)

    def build(self, node: Node, loc: Loc, depth: int) -> Any:
        self.visited += 1
        if self.visited > MAX_NODES:
            raise _TooLarge
        self.values[loc] = _mark(node)
        if depth > MAX_DEPTH:
            self._problem(node, loc, f"nested more than {MAX_DEPTH} levels deep")
            return None
        if id(node) in self.active:
            self._problem(node, loc, "an alias refers to a node that contains it (a loop)")
            return None
        if isinstance(node, ScalarNode):
            return self._scalar(node, loc)
        self.active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                if node.tag != _SEQ:
                    self._problem(node, loc, f"unsupported YAML tag {_tag(node.tag)}; remove it")
                return [self.build(item, (*loc, i), depth + 1) for i, item in enumerate(node.value)]
            assert isinstance(node, MappingNode)
            if node.tag != _MAP:
                self._problem(node, loc, f"unsupported YAML tag {_tag(node.tag)}; remove it")
            result: dict[str, Any] = {}
            self._mapping(node, loc, depth, result, explicit=True)
            return result
        finally:
            self.active.discard(id(node))

    def _mapping(
        self, node: MappingNode, loc: Loc, depth: int, result: dict[str, Any], *, explicit: bool
    ) -> None:
        merges: list[Node] = []
        first: dict[str, int] = {}
        entries: list[tuple[ScalarNode, Node]] = []
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode) and key_node.tag == _MERGE:
                merges.append(value_node)
                continue
            if not isinstance(key_node, ScalarNode):
                self._problem(key_node, loc, "a key must be a plain string, not a list or mapping")
                continue
            key = key_node.value
            if key in first:
                self.problems.append(
                    _Problem(
                        (*loc, key),
                        f"duplicate key {key!r} (first at line {first[key]}); "
                        "YAML would silently keep only the last one, so remove one of them",
                        line=_mark(key_node)[0],
                        column=_mark(key_node)[1],
                    )
                )
            first[key] = _mark(key_node)[0]
            entries.append((key_node, value_node))
        # Merged keys (<<: *anchor) come first so that keys written here override them; among
        # several merged mappings the first listed wins (YAML merge-key rules).
        for merge in merges:
            sources = merge.value if isinstance(merge, SequenceNode) else [merge]
            for source in reversed(sources):
                if not isinstance(source, MappingNode) or id(source) in self.active:
                    self._problem(source, loc, "<< (merge) needs a mapping or a list of mappings")
                    continue
                self.visited += 1
                self.active.add(id(source))
                try:
                    self._mapping(source, loc, depth, result, explicit=False)
                finally:
                    self.active.discard(id(source))
        for key_node, value_node in entries:
            key = key_node.value
            key_loc = (*loc, key)
            self.keys[key_loc] = _mark(key_node)
            result.pop(key, None)  # keep the written order for explicit keys
            result[key] = self.build(value_node, key_loc, depth + 1)

    def _scalar(self, node: ScalarNode, loc: Loc) -> Any:
        text: str = node.value
        tag = node.tag
        try:
            if tag == _STR:
                try:
                    return expand(text, self.env)
                except EnvError as exc:
                    for problem in exc.problems:
                        self._problem(node, loc, problem)
                    return text
            if tag == _NULL:
                if text not in ("", "~", "null", "Null", "NULL"):
                    raise ValueError
                return None
            if tag == _BOOL:
                if text.lower() not in ("true", "false"):
                    raise ValueError
                return text.lower() == "true"
            if tag == _INT:
                if not _INT_RE.fullmatch(text):
                    raise ValueError
                if text.startswith(("0o", "0x")):
                    return int(text[2:], 8 if text[1] == "o" else 16)
                return int(text)
            if tag == _FLOAT:
                if not _FLOAT_RE.fullmatch(text):
                    raise ValueError
                lowered = text.lower()
                if lowered.endswith((".inf", ".nan")):
                    return float(lowered.replace(".", ""))
                return float(text)
        except ValueError:
            short = tag.rpartition(":")[2]
            self._problem(node, loc, f"{text!r} is not a valid {short}")
            return text
        self._problem(node, loc, f"unsupported YAML tag {_tag(tag)}; remove it")
        return text


# --------------------------------------------------------------------------------------------
# Checks that need the whole file


_UNSUPPORTED = "not supported yet"


def _unsupported(data: dict[str, Any]) -> list[_Problem]:
    """Sections and options that parse but that the gateway does not run yet."""
    found: list[_Problem] = []

    def add(loc: Loc, message: str, *, on_key: bool = True) -> None:
        found.append(_Problem(loc, message, on_key=on_key, unsupported=True))

    return found


def _semantic(data: dict[str, Any]) -> list[_Problem]:
    routes, upstreams = data.get("routes"), data.get("upstreams")
    found = [
        _Problem(loc, msg)
        for loc, msg in config_problems(
            routes, {} if upstreams is None else upstreams, data.get("plugins")
        )
    ]
    for index, route in enumerate(routes if isinstance(routes, list) else ()):
        if not isinstance(route, dict):
            continue
        match = route.get("match")
        path = match.get("path") if isinstance(match, dict) else None
        for at, msg in route_problems(path, route.get("strip_prefix"), route.get("rewrite")):
            found.append(_Problem(("routes", index, *at), msg))
    found.extend(_Problem(loc, msg) for loc, msg in shared_store_problems(data))
    return found


# --------------------------------------------------------------------------------------------
# pydantic errors → problems


def _unwrap(tp: Any) -> list[Any]:
    """The concrete types behind Annotated / Optional / unions."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _unwrap(get_args(tp)[0])
    if origin is Union or origin is types.UnionType:
        return [t for arg in get_args(tp) for t in _unwrap(arg)]
    return [tp]


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The model class the data at ``loc`` is validated against, if any."""
    current: list[Any] = [Config]
    for part in loc:
        following: list[Any] = []
        for tp in (t for c in current for t in _unwrap(c)):
            origin = get_origin(tp)
            if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(part, str):
                field = tp.model_fields.get(part)
                if field is not None:
                    following.append(field.annotation)
            elif origin is list and isinstance(part, int):
                following.append(get_args(tp)[0])
            elif origin is dict and isinstance(part, str):
                following.append(get_args(tp)[1])
        current = following
    for tp in (t for c in current for t in _unwrap(c)):
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return tp
    return None


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_EXPECTED = {
    "model_type": "a mapping (key: value)",
    "model_attributes_type": "a mapping (key: value)",
    "dict_type": "a mapping (key: value)",
    "list_type": "a list",
    "string_type": "a string",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
}


def _message(error: Any, loc: Loc) -> str:
    kind: str = error["type"]
    ctx: dict[str, Any] = error.get("ctx") or {}
    given = error.get("input")
    if kind == "value_error" and isinstance(ctx.get("error"), Exception):
        return str(ctx["error"])
    if kind == "missing":
        return f"required key {loc[-1]!r} is missing; add it"
    if kind == "extra_forbidden":
        key = str(loc[-1])
        model = _model_at(loc[:-1])
        if model is None:
            return f"unknown key {key!r}"
        fields = list(model.model_fields)
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown key {key!r}{hint} (expected one of: {', '.join(fields)})"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {_describe(given)}"
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected', '?')}, got {_describe(given)}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        words = {
            "greater_than_equal": ("at least", "ge"),
            "greater_than": ("greater than", "gt"),
            "less_than_equal": ("at most", "le"),
            "less_than": ("less than", "lt"),
        }[kind]
        return f"must be {words[0]} {ctx.get(words[1])}, got {_describe(given)}"
    if kind == "too_short":
        count = ctx.get("min_length", 1)
        return f"needs at least {count} item{'s' if count != 1 else ''}"
    text = str(error.get("msg", "invalid value"))
    return text[:1].lower() + text[1:]


def _from_validation(exc: ValidationError) -> list[_Problem]:
    problems: list[_Problem] = []
    for error in exc.errors():
        loc: Loc = tuple(error["loc"])
        on_key = error["type"] == "extra_forbidden"
        ctx = error.get("ctx") or {}
        cause = ctx.get("error")
        if isinstance(cause, SchemaValueError):
            loc = (*loc, *cause.at)
            on_key = cause.on_key
        if "[key]" in loc:
            loc = loc[: loc.index("[key]")]
            on_key = True
        problems.append(_Problem(loc, _message(error, loc), on_key=on_key))
    return problems


# --------------------------------------------------------------------------------------------
# Positions, formatting


_SIMPLE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


def format_loc(loc: Iterable[str | int]) -> str:
    """``("routes", 0, "match", "path")`` → ``routes[0].match.path``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _SIMPLE_KEY.match(part):
            out += f".{part}" if out else part
        else:
            out += '["' + part.replace("\\", "\\\\").replace('"', '\\"') + '"]'
    return out


def _position(builder: _Builder, problem: _Problem) -> tuple[Loc, int, int]:
    """The location to print and its (line, column): the deepest part of ``loc`` the file has."""
    known: Loc = ()
    shown: list[str | int] = []
    for part in problem.loc:
        candidate = (*known, part)
        if candidate in builder.values:
            known = candidate
            shown.append(part)
        elif isinstance(part, str) and "[" in part:
            continue  # a pydantic union tag like "list[str]"
        else:
            shown.append(part)
    if problem.line:
        return tuple(shown), problem.line, problem.column
    if problem.on_key and known == problem.loc and known in builder.keys:
        line, column = builder.keys[known]
    else:
        line, column = builder.values.get(known, (1, 1))
    return tuple(shown), line, column


def _issues(filename: str, builder: _Builder, problems: list[_Problem]) -> list[ConfigIssue]:
    unsupported = [p.loc for p in problems if p.unsupported]
    result: dict[tuple[int, int, str, str], ConfigIssue] = {}
    for problem in problems:
        # Inside a section that is not supported yet, that one message is enough.
        if any(len(problem.loc) > len(u) and problem.loc[: len(u)] == u for u in unsupported):
            continue
        # A value that could not be built (a missing ${VAR}, a bad tag) already has its message;
        # what the schema says about it, or about what a validator made of it, is noise.
        if not (problem.line or problem.unsupported) and any(
            problem.loc[: len(b)] == b for b in builder.broken
        ):
            continue
        loc, line, column = _position(builder, problem)
        path = format_loc(loc)
        result.setdefault(
            (line, column, path, problem.message),
            ConfigIssue(filename, line, column, path, problem.message),
        )
    return [result[key] for key in sorted(result)]


# --------------------------------------------------------------------------------------------
# Entry points


def _yaml_issue(filename: str, text: str, exc: yaml.YAMLError) -> ConfigIssue:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        parts = [exc.context, exc.problem]
        message = ", ".join(p for p in parts if p) or "invalid YAML"
        return ConfigIssue(filename, mark.line + 1, mark.column + 1, "", f"invalid YAML: {message}")
    if isinstance(exc, yaml.reader.ReaderError):
        # libyaml reports a byte offset into the UTF-8 text, the pure-Python reader a character
        # offset; either way count lines up to there.
        before = text.encode("utf-8")[: exc.position].decode("utf-8", "replace")
        line = before.count("\n") + 1
        column = len(before) - (before.rfind("\n") + 1) + 1
        return ConfigIssue(filename, line, column, "", f"invalid YAML: {exc.reason}")
    return ConfigIssue(filename, 1, 1, "", f"invalid YAML: {exc}")


def parse_config(
    text: str, filename: str = "<config>", env: Mapping[str, str] | None = None
) -> Config:
    """Validate YAML ``text``; ``filename`` is only used in messages. ``env`` (default: the
    process environment) supplies ``${VAR}`` values. Raises :class:`ConfigError` with every
    problem found."""
    environment: Mapping[str, str] = os.environ if env is None else env
    try:
        root = _compose(text)
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_issue(filename, text, exc)]) from None
    except RecursionError:
        raise ConfigError(
            [ConfigIssue(filename, 1, 1, "", f"nested more than {MAX_DEPTH} levels deep")]
        ) from None

    builder = _Builder(environment)
    if root is None:
        data: Any = {}
    else:
        try:
            data = builder.build(root, (), 0)
        except _TooLarge:
            issue = ConfigIssue(
                filename, 1, 1, "", f"more than {MAX_NODES} values once aliases are expanded"
            )
            raise ConfigError([issue]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        line, column = builder.values.get((), (1, 1))
        message = "the top level must be a mapping of sections (gateway, upstreams, routes, ...)"
        raise ConfigError([ConfigIssue(filename, line, column, "", message)])

    problems = [*builder.problems, *_unsupported(data), *_semantic(data)]
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems.extend(_from_validation(exc))
    issues = _issues(filename, builder, problems)
    if issues or config is None:
        raise ConfigError(issues or [ConfigIssue(filename, 1, 1, "", "invalid configuration")])
    return config


def _read(path: str | Path) -> str:
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            [ConfigIssue(name, 0, 0, "", f"cannot read the file: {reason}")]
        ) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        before = raw[: exc.start]
        line = before.count(b"\n") + 1
        column = len(before) - (before.rfind(b"\n") + 1) + 1
        message = "the file is not UTF-8 text"
        raise ConfigError([ConfigIssue(name, line, column, "", message)]) from None


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the YAML file at ``path``; see :func:`parse_config`."""
    return parse_config(_read(path), str(path), env)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def validate_main(path: str, out: TextIO) -> int:
    """``piuptime validate -c FILE``: print every problem (one per line) and return 1, or print
    ``FILE: OK (N routes, M upstreams)`` and return 0."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        for issue in exc.errors:
            print(issue, file=out)
        return 1
    routes = _plural(len(config.routes), "route")
    upstreams = _plural(len(config.upstreams), "upstream")
    llm = ""
    if config.llm is not None:
        llm = f", {_plural(len(config.llm.models), 'model group')}"
    print(f"{path}: OK ({routes}, {upstreams}{llm})", file=out)
    return 0
