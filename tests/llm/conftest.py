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
    async with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
async def fake_anthropic() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
async def fake_gemini() -> AsyncIterator[FakeGemini]:
    async with FakeGemini() as fake:
        yield fake


@pytest.fixture
async def fake_ollama() -> AsyncIterator[FakeOllama]:
    async with FakeOllama() as fake:
        yield fake
