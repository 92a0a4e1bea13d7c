"""Fixtures of the engine's unit tests."""

import pytest

from stsmilter.engine.loop import EngineLoop


@pytest.fixture
def engine():
    """A private engine loop (the daemon has one); closed, its work cancelled, after the test."""
    loop = EngineLoop()
    yield loop
    loop.close()
