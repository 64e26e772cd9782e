"""``${VAR}`` interpolation in config strings.

- ``${VAR}`` is replaced by the variable's value; a variable that is not set is an error.
- ``${VAR:-default}`` uses ``default`` when the variable is unset or empty (as in the shell).
- ``$${`` is a literal ``${``. Any other ``$`` is left alone.

Variable names are ``[A-Za-z_][A-Za-z0-9_]*``. The default is taken literally up to the first
``}``; it is not interpolated again, and neither is a variable's value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["EnvError", "expand"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class EnvError(ValueError):
    """One or more ``${...}`` references in a string could not be expanded."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def expand(text: str, env: Mapping[str, str]) -> str:
    """``text`` with every ``${...}`` replaced from ``env``; raises :class:`EnvError` listing
    every problem in the string (unset variables, malformed references)."""
    if "$" not in text:
        return text
    out: list[str] = []
    problems: list[str] = []
    pos = 0
    while True:
        start = text.find("$", pos)
        if start < 0:
            out.append(text[pos:])
            break
        out.append(text[pos:start])
        if text.startswith("$${", start):
            out.append("${")
            pos = start + 3
            continue
        if not text.startswith("${", start):
            out.append("$")
            pos = start + 1
            continue
        end = text.find("}", start + 2)
        if end < 0:
            problems.append(
                f"unclosed ${{ in {text[start:]!r}: write ${{NAME}}, or $${{ for a literal ${{"
            )
            out.append(text[start:])
            break
        body = text[start + 2 : end]
        name, sep, default = body.partition(":-")
        if not _NAME.match(name):
            problems.append(
                f"invalid environment variable reference ${{{body}}}: a name is letters, digits "
                "and _ (not starting with a digit), optionally followed by :-default"
            )
        else:
            value = env.get(name)
            if value is None or (sep and value == ""):
                if sep:
                    value = default
                else:
                    problems.append(
                        f"environment variable {name} is not set; set it, or write "
                        f"${{{name}:-default}} to give a default"
                    )
                    value = ""
            out.append(value)
        pos = end + 1
    if problems:
        raise EnvError(problems)
    return "".join(out)
