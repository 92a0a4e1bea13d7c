"""pytest plugin: a private redis-server on loopback (tests/world/redis_server.py)."""

import os

import pytest

from world.redis_server import REDIS_SERVER, RedisServer


@pytest.fixture
def redis_server():
    """A started RedisServer, removed at teardown; skips where redis-server is missing."""
    if not os.path.exists(REDIS_SERVER):
        pytest.skip("redis-server is not installed (contrib/bootstrap.sh test installs it)")
    server = RedisServer()
    try:
        yield server.start()
    finally:
        server.close()
