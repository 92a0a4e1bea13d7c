"""clients: blocking client sockets to an in-process socketmap server (test_socketmap*.py)."""

import socket

import pytest


@pytest.fixture
def clients():
    """connect(server) -> a blocking client socket; all are closed at teardown."""
    sockets = []

    def connect(server):
        family = socket.AF_UNIX if isinstance(server.address, str) else socket.AF_INET
        if family == socket.AF_INET and ":" in server.address[0]:
            family = socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_STREAM)
        sockets.append(sock)
        sock.settimeout(5)
        sock.connect(server.address)
        return sock

    yield connect
    for sock in sockets:
        sock.close()
