"""Fixtures for the AI gateway tests: one fake provider per test, started on the test's loop.

No key is required unless the test sets ``fake.keys = [...]``. Each fake is stopped after the
test, which closes every connection it still holds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.llm.fakes import FakeAnthropic, FakeGemini, FakeOllama, FakeOpenAI


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def fake_anthropic() -> AsyncIterator[FakeAnthropic]:
    fake = FakeAnthropic()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def fake_gemini() -> AsyncIterator[FakeGemini]:
    fake = FakeGemini()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def fake_ollama() -> AsyncIterator[FakeOllama]:
    fake = FakeOllama()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()
