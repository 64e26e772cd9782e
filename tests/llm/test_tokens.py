"""Local token counting: exact o200k_base counts, OpenAI's chat convention, offline and lazy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from piuptime.llm import tokens
from piuptime.llm.tokens import (
    IMAGE_TOKENS_HIGH,
    IMAGE_TOKENS_LOW,
    REPLY_PRIMING_TOKENS,
    TOKENS_PER_MESSAGE,
    count_chat_prompt,
    count_completion,
    count_embedding_input,
    count_text,
)

ROOT = Path(__file__).resolve().parents[2]


def test_count_text_matches_o200k_base() -> None:
    assert count_text("hello world") == 2
    assert count_text("") == 0
    # tiktoken's o200k_base ids for this sentence, as published: 9 tokens
    assert count_text("this is a test example, tutorialexample.com") == 9
    # special-token text in user content is ordinary text, never one special token
    assert count_text("<|endoftext|>") > 1
    assert tokens.loaded()


def test_count_completion_text_and_tool_calls() -> None:
    assert count_completion("hello world") == 2
    assert count_completion("") == 0
    calls = [
        {
            "id": "c1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        }
    ]
    assert count_completion("", calls) == count_text("get_weather") + count_text('{"city":"Paris"}')
    assert count_completion("ok", calls) == 1 + count_completion("", calls)


def test_chat_prompt_follows_openai_convention() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hello world"}]}
    assert count_chat_prompt(body) == TOKENS_PER_MESSAGE + 1 + 2 + REPLY_PRIMING_TOKENS
    assert count_chat_prompt({"messages": []}) == REPLY_PRIMING_TOKENS


def test_chat_prompt_cookbook_example() -> None:
    # OpenAI's cookbook ("How to count tokens with tiktoken") reports 124 prompt tokens for
    # these messages on gpt-4o, both counted locally and by the API.
    messages = [
        {
            "role": "system",
            "content": "You are a helpful, pattern-following assistant that translates corporate"
            " jargon into plain English.",
        },
        {
            "role": "system",
            "name": "example_user",
            "content": "New synergies will help drive top-line growth.",
        },
        {
            "role": "system",
            "name": "example_assistant",
            "content": "Things working well together will increase revenue.",
        },
        {
            "role": "system",
            "name": "example_user",
            "content": "Let's circle back when we have more bandwidth to touch base on"
            " opportunities for increased leverage.",
        },
        {
            "role": "system",
            "name": "example_assistant",
            "content": "Let's talk later when we're less busy about how to do better.",
        },
        {
            "role": "user",
            "content": "This late pivot means we don't have time to boil the ocean for the client"
            " deliverable.",
        },
    ]
    assert count_chat_prompt({"messages": messages}) == 124


def test_chat_prompt_parts_images_tools() -> None:
    base = count_chat_prompt({"messages": [{"role": "user", "content": "hello world"}]})
    parts = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hello world"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + "A" * 5000},
                    },
                    {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
                    {"type": "input_audio", "input_audio": {"data": "B" * 5000, "format": "wav"}},
                ],
            }
        ]
    }
    assert count_chat_prompt(parts) == base + IMAGE_TOKENS_HIGH + IMAGE_TOKENS_LOW

    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    with_tools = {"messages": [{"role": "user", "content": "hello world"}], "tools": tools}
    compact = json.dumps(tools, separators=(",", ":"))
    assert count_chat_prompt(with_tools) == base + count_text(compact)

    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
    }
    turn = {
        "messages": [
            {"role": "user", "content": "hello world"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]
    }
    expected = (
        base
        + TOKENS_PER_MESSAGE
        + count_text("assistant")
        + count_completion("", [call])
        + TOKENS_PER_MESSAGE
        + count_text("tool")
        + count_text("sunny")
    )
    assert count_chat_prompt(turn) == expected

    schema = {"name": "out", "schema": {"type": "object"}, "strict": True}
    with_schema = {
        "messages": [{"role": "user", "content": "hello world"}],
        "response_format": {"type": "json_schema", "json_schema": schema},
    }
    assert count_chat_prompt(with_schema) == base + count_text(
        json.dumps(schema, separators=(",", ":"))
    )


def test_chat_prompt_tolerates_odd_shapes() -> None:
    odd = {
        "messages": ["x", {"role": 3, "content": {"a": 1}}, {"content": [1, None, "hi"]}],
        "tools": "no",
    }
    assert count_chat_prompt(odd) == REPLY_PRIMING_TOKENS + 2 * TOKENS_PER_MESSAGE + count_text(
        "hi"
    )
    assert count_chat_prompt({}) == REPLY_PRIMING_TOKENS


def test_embedding_input() -> None:
    assert count_embedding_input("hello world") == 2
    assert count_embedding_input(["hello world", "hello world", ""]) == 4
    assert count_embedding_input([1, 2, 3]) == 3
    assert count_embedding_input([[1, 2], [3]]) == 3
    assert count_embedding_input([]) == 0
    assert count_embedding_input(None) == 0


def _run(code: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


_NO_NETWORK = """
import socket
def _refuse(*a, **k):
    raise OSError("network access blocked by the test")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
"""


def test_counts_offline_with_empty_caches_and_no_network(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "HOME": str(tmp_path),
        "XDG_CACHE_HOME": str(cache),
        "TIKTOKEN_CACHE_DIR": str(cache),
        "DATA_GYM_CACHE_DIR": str(cache),
        "HF_HOME": str(cache),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
    }
    code = _NO_NETWORK + (
        "from piuptime.llm.tokens import count_text, count_chat_prompt\n"
        "print(count_text('hello world'),"
        " count_chat_prompt({'messages': [{'role': 'user', 'content': 'hello world'}]}))\n"
    )
    assert _run(code, env) == "2 9"
    assert list(cache.iterdir()) == []  # nothing downloaded, nothing cached


def test_import_is_lazy() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    code = (
        "import sys\n"
        "import piuptime.llm.tokens as t\n"
        "print('toktok' in sys.modules, t.loaded())\n"
        "t.count_text('x')\n"
        "print('toktok' in sys.modules, t.loaded())\n"
    )
    assert _run(code, env).split("\n") == ["False False", "True True"]


@pytest.mark.parametrize("size", [1024, 64 * 1024])
def test_counting_is_cheap(size: int) -> None:
    # generous bound (measured ~2-3 µs per KB): catches a pathological slowdown, not jitter
    import time

    text = ("The quick brown fox, 123 jumps; über den faulen Hund. " * (size // 50 + 1))[:size]
    count_text(text)
    start = time.perf_counter()
    for _ in range(20):
        count_text(text)
    per_call = (time.perf_counter() - start) / 20
    assert per_call < 0.002 * (size / 1024) + 0.002
