"""Secrets out of a config before it leaves through the admin API.

:func:`redact` walks plain data (``Config.model_dump(mode="json")``, or any section of it) and
replaces secrets with ``"<redacted>"``. Four rules, each one on its own enough to hide a value:

1. **Known secret fields** of our schema, by path (:data:`SECRET_PATHS`): ``admin.token``,
   ``admin.tokens.*``, consumers' ``keys``, ``basic.password_hash`` and ``jwt.key``, every
   ``jwt_auth.keys[*].key`` (global or per route), LLM providers' ``keys``.
2. **Secret-looking names** anywhere, including free-form sections (:data:`SECRET_NAMES`: token,
   secret, password, api_key, private_key, ...): a string under such a key, or in a list or
   mapping under it (``tokens: {ci: ...}``).
3. **Passwords inside URLs and DSNs** anywhere: ``redis://:pw@host`` →
   ``redis://:<redacted>@host``, ``postgresql://u:pw@h/db`` → ``postgresql://u:<redacted>@h/db``,
   ``password=pw`` in a key/value DSN → ``password=<redacted>``.
4. **Values that came from the environment**: every variable the config refers to as
   ``${NAME}`` is looked up, and any occurrence of its value in any string is replaced (a value
   shorter than 4 characters only when it is the whole string). Secrets are meant to come from
   ``${ENV}``, so this catches the ones no rule above knows (a header added by
   ``request_transformer``, a future plugin's credential).

The structure is kept (lists keep their length, keys stay), so an operator still sees *that* a
consumer has two keys or that Redis needs a password.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["REDACTED", "SECRET_NAMES", "SECRET_PATHS", "env_references", "redact", "redact_text"]

REDACTED = "<redacted>"

#: Paths of secret values in our schema; ``*`` is one key or list index, ``**`` any number.
SECRET_PATHS: tuple[tuple[str, ...], ...] = (
    ("admin", "token"),
    ("admin", "tokens", "*"),
    ("consumers", "*", "keys", "*"),
    ("consumers", "*", "basic", "password_hash"),
    ("consumers", "*", "jwt", "key"),
    ("**", "jwt_auth", "keys", "*", "key"),
    ("llm", "providers", "*", "keys", "*"),
    ("tracing", "headers", "*"),  # a collector's credentials (Authorization, api keys)
    ("llm", "providers", "*", "key"),
)

#: Keys whose values (every string below them) are secret wherever they appear.
SECRET_NAMES = frozenset(
    {
        "token",
        "tokens",
        "secret",
        "secrets",
        "password",
        "passwords",
        "passwd",
        "password_hash",
        "api_key",
        "api_keys",
        "apikey",
        "private_key",
        "client_secret",
        "access_key",
        "secret_key",
        "credentials",
    }
)

_ENV_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}")
_DSN_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_MIN_SUBSTRING = 4


def env_references(text: str) -> set[str]:
    """Names of the environment variables ``text`` refers to as ``${NAME}`` (or
    ``${NAME:-default}``); ``$${`` is a literal and not a reference."""
    return {m.group(1) for m in _ENV_REF.finditer(text)}


def _matches(pattern: tuple[str, ...], path: tuple[str, ...]) -> bool:
    if not pattern:
        return not path
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_matches(rest, path[i:]) for i in range(len(path) + 1))
    if not path:
        return False
    return (head == "*" or head == path[0]) and _matches(rest, path[1:])


def _is_secret_path(path: tuple[str, ...]) -> bool:
    # the value's own key, or the key of the list/mapping holding it (``tokens: {ci: ...}``);
    # not further up, where user-chosen names (an upstream called "secret") would match
    if any(part.lower() in SECRET_NAMES for part in path[-2:]):
        return True
    return any(_matches(pattern, path) for pattern in SECRET_PATHS)


def _redact_url(text: str) -> str:
    if "://" in text and "@" in text:
        try:
            parts = urlsplit(text)
            password = parts.password
        except ValueError:
            password = None
            parts = None
        if parts is not None and password:
            userinfo, _, hostport = parts.netloc.rpartition("@")
            user = userinfo.partition(":")[0]
            netloc = f"{user}:{REDACTED}@{hostport}"
            text = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    if "=" in text and "password" in text.lower():
        text = _DSN_PASSWORD.sub(lambda m: m.group(1) + REDACTED, text)
    return text


class _EnvValues:
    def __init__(self, names: Iterable[str], environ: Mapping[str, str]) -> None:
        values = {environ[n] for n in names if environ.get(n)}
        self.whole = values
        # longest first, so a value containing another is replaced whole
        self.parts = sorted((v for v in values if len(v) >= _MIN_SUBSTRING), key=len, reverse=True)

    def apply(self, text: str) -> str:
        if text in self.whole:
            return REDACTED
        for value in self.parts:
            if value in text:
                text = text.replace(value, REDACTED)
        return text


def redact_text(
    text: str, env_names: Iterable[str] = (), environ: Mapping[str, str] | None = None
) -> str:
    """``text`` (an error message, a log line) with URL passwords and the values of the named
    environment variables replaced."""
    values = _EnvValues(env_names, os.environ if environ is None else environ)
    return values.apply(_redact_url(text))


def redact(
    data: Any,
    env_names: Iterable[str] = (),
    *,
    environ: Mapping[str, str] | None = None,
    path: tuple[str, ...] = (),
) -> Any:
    """A copy of ``data`` (dicts, lists, scalars) with secrets replaced by ``"<redacted>"``.

    ``env_names``: the variables the config refers to (:func:`env_references` of its text);
    their values (from ``environ``, default ``os.environ``) are hidden wherever they appear.
    ``path``: where ``data`` sits in the whole config, when it is only a section of it (e.g.
    ``("routes", "0")`` for one route) so that the path rules still apply."""
    values = _EnvValues(env_names, os.environ if environ is None else environ)
    return _walk(data, path, values)


def _walk(data: Any, path: tuple[str, ...], values: _EnvValues) -> Any:
    if isinstance(data, Mapping):
        return {k: _walk(v, (*path, str(k)), values) for k, v in data.items()}
    if isinstance(data, list | tuple | set | frozenset):
        return [_walk(v, (*path, str(i)), values) for i, v in enumerate(data)]
    if isinstance(data, str):
        if data and _is_secret_path(path):
            return REDACTED
        return values.apply(_redact_url(data))
    return data
