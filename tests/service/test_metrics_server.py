"""metrics_server.py: the bounded /metrics endpoint, on real sockets (issue 9, item 7)."""

import gzip
import importlib
import os
import socket
import time
import urllib.request

import pytest

from stsmilter.engine.loop import STORE_THREADS
from stsmilter.service import metrics_server
from world.daemon import poll_until, scrape

importlib.import_module("stsmilter.metrics")  # stsmilter's own metrics into the default registry


@pytest.fixture
def serve():
    servers = []

    def start(**kwargs):
        server = metrics_server.MetricsServer("127.0.0.1", 0, **kwargs)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def get(server, headers=None):
    host, port = server.address
    request = urllib.request.Request(f"http://{host}:{port}/metrics", headers=headers or {})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, dict(response.headers), response.read()


def idle_connection(server):
    sock = socket.create_connection(server.address, timeout=5)
    return sock


def closed_by_server(sock, within):
    """True once the server has closed sock (EOF or reset) within seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_scrape_is_prometheus_text(serve):
    status, headers, body = get(serve())
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"stsmilter_socketmap_lookups_total" in body and b"process_open_fds" in body


def test_gzip_and_openmetrics_when_asked(serve):
    server = serve()
    _, headers, body = get(server, {"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert b"stsmilter_cache_entries" in gzip.decompress(body)
    _, headers, body = get(server, {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_other_methods_are_refused(serve):
    server = serve()
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 405 ")


def test_a_silent_client_is_closed_after_the_request_timeout(serve):
    server = serve(request_timeout=0.5)
    started = time.monotonic()
    with idle_connection(server) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the blank line
        assert closed_by_server(sock, within=5)
    assert 0.4 < time.monotonic() - started < 3


def test_an_oversized_request_head_is_closed(serve):
    server = serve()
    with idle_connection(server) as sock:
        try:
            sock.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * (metrics_server.MAX_HEAD * 2))
        except OSError:
            pass
        assert closed_by_server(sock, within=5)


def test_at_the_limit_the_oldest_connection_makes_room(serve):
    server = serve(max_connections=5)
    idle = [idle_connection(server) for _ in range(5)]
    poll_until(lambda: len(server._open) == 5, 5, "five open connections")
    status, _, body = get(server)  # a sixth: the oldest idle one is closed for it
    assert status == 200 and b"stsmilter_cache_entries" in body
    assert closed_by_server(idle[0], within=5)
    assert not closed_by_server(idle[-1], within=0.2)
    assert server.evicted >= 1
    for sock in idle:
        sock.close()


@pytest.mark.integration
def test_daemon_holds_300_idle_connections_with_bounded_threads(start_daemon):
    daemon = start_daemon()
    scrape(daemon.metrics_port)
    threads_before = len(os.listdir(f"/proc/{daemon.pid}/task"))
    idle = [socket.create_connection(("127.0.0.1", daemon.metrics_port), timeout=5) for _ in range(300)]
    try:
        text = scrape(daemon.metrics_port)  # a normal scrape still succeeds
        assert "stsmilter_cache_entries" in text
        # No thread per connection (300 would show); the store's thread pool starts its
        # threads on demand, so it may have grown meanwhile, up to its size.
        assert len(os.listdir(f"/proc/{daemon.pid}/task")) <= threads_before + STORE_THREADS
        # The idle ones are closed: most at once to make room, the rest after the timeout.
        deadline = metrics_server.REQUEST_TIMEOUT + 5
        started = time.monotonic()
        for sock in idle:
            assert closed_by_server(sock, within=max(0.1, deadline - (time.monotonic() - started)))
    finally:
        for sock in idle:
            sock.close()
    assert "Traceback" not in daemon.log()
