"""No local client can lock the socketmap out (issue 9, item 5): the real daemon, a
real client holding every connection, and Postfix's own socketmap client."""

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from world.daemon import poll_until, sample, scrape
from world.socketmap_client import ask

pytestmark = pytest.mark.integration


def postmap_lookup(port, key="example.test"):
    postmap = shutil.which("postmap") or shutil.which("postmap", path="/usr/sbin:/usr/local/sbin")
    if postmap is None:
        pytest.skip("Postfix postmap(1) not installed")
    config_dir = tempfile.mkdtemp(prefix="stsmilter-postfix-")
    try:
        open(os.path.join(config_dir, "main.cf"), "w").close()
        return subprocess.run([postmap, "-q", key, f"socketmap:inet:127.0.0.1:{port}:postfix"],
                              env=dict(os.environ, MAIL_CONFIG=config_dir), capture_output=True, text=True,
                              timeout=30)
    finally:
        shutil.rmtree(config_dir)


def test_a_client_holding_every_connection_locks_no_one_out(start_daemon):
    daemon = start_daemon(socketmap={"max_connections": "1000"})
    port = daemon.socketmap_port
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(1000)]
    try:
        for _ in range(20):  # another client, one connection per lookup: each finds room
            assert ask(port, "example.test") == "NOTFOUND "
        run = postmap_lookup(port)
        assert run.returncode == 1 and run.stderr == "", run.stderr  # NOTFOUND, no error
        text = scrape(daemon.metrics_port)
        assert sample(text, "stsmilter_socketmap_evicted_connections_total", reason="max_connections") >= 1
    finally:
        for sock in held:
            sock.close()
    daemon.wait_log("closed the longest-idle to admit a new one")
    assert "Traceback" not in daemon.log()


def test_a_trickling_client_is_closed_after_request_timeout(start_daemon):
    daemon = start_daemon(socketmap={"request_timeout": "1"})
    with socket.create_connection(("127.0.0.1", daemon.socketmap_port), timeout=5) as sock:
        started = time.monotonic()
        closed = None
        for byte in b"20:postfix example.test,":
            try:
                sock.sendall(bytes([byte]))
                sock.settimeout(0.3)
                if sock.recv(1) == b"":
                    closed = time.monotonic() - started
                    break
            except socket.timeout:
                continue
            except OSError:
                closed = time.monotonic() - started
                break
        assert closed is not None and 1 <= closed < 3, closed
    poll_until(lambda: sample(scrape(daemon.metrics_port), "stsmilter_socketmap_evicted_connections_total",
                              reason="request_timeout") == 1, 5, "the eviction to be counted")
