"""pytest plugin: a started loopback HTTPS server for MTA-STS policy hosts."""

import pytest

from world.https_server import HttpsServer


@pytest.fixture
def https_server():
    """A started HttpsServer (127.0.0.1, free port, per-run CA at .ca_file); stopped at teardown."""
    with HttpsServer() as server:
        yield server
