"""``${VAR}`` interpolation on its own."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from piuptime.config.env import EnvError, expand

ENV = {"TOKEN": "s3cret", "EMPTY": "", "PORT": "8080"}


@pytest.mark.parametrize(
    ("text", "result"),
    [
        ("plain", "plain"),
        ("${TOKEN}", "s3cret"),
        ("Bearer ${TOKEN}!", "Bearer s3cret!"),
        ("0.0.0.0:${PORT}", "0.0.0.0:8080"),
        ("${TOKEN}${PORT}", "s3cret8080"),
        ("${MISSING:-fallback}", "fallback"),
        ("${MISSING:-}", ""),
        ("${EMPTY:-used when empty}", "used when empty"),
        ("${EMPTY}", ""),
        ("${TOKEN:-unused}", "s3cret"),
        ("${MISSING:-a:b/c}", "a:b/c"),
        ("$${TOKEN}", "${TOKEN}"),
        ("cost: $5", "cost: $5"),
        ("$$", "$$"),
        ("$", "$"),
        ("$$${TOKEN}", "$${TOKEN}"),  # "$" then the escape "$${"
    ],
)
def test_expand(text: str, result: str) -> None:
    assert expand(text, ENV) == result


def test_missing_variable_names_it() -> None:
    with pytest.raises(EnvError) as caught:
        expand("${KITCHEN_KEY}", ENV)
    assert caught.value.problems == [
        "environment variable KITCHEN_KEY is not set; set it, or write "
        "${KITCHEN_KEY:-default} to give a default"
    ]


def test_every_problem_in_a_string_is_reported() -> None:
    with pytest.raises(EnvError) as caught:
        expand("${A}-${B}-${1X}", ENV)
    assert len(caught.value.problems) == 3
    assert "A is not set" in caught.value.problems[0]
    assert "B is not set" in caught.value.problems[1]
    assert "invalid environment variable reference ${1X}" in caught.value.problems[2]


def test_unclosed_reference() -> None:
    with pytest.raises(EnvError, match=r"unclosed \$\{"):
        expand("abc ${TOKEN", ENV)


def test_values_are_not_expanded_again() -> None:
    assert expand("${NESTED}", {"NESTED": "${TOKEN}"}) == "${TOKEN}"


@given(st.text())
def test_only_env_error(text: str) -> None:
    try:
        expand(text, ENV)
    except EnvError as exc:
        assert exc.problems


@given(st.text().filter(lambda t: "$" not in t))
def test_text_without_dollar_is_untouched(text: str) -> None:
    assert expand(text, {}) == text
