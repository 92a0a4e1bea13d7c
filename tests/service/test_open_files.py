"""The open-files budget: socketmap clients cannot starve the milter of descriptors
(issue 9, item 5), with the real daemon under a real RLIMIT_NOFILE."""

import os
import resource
import socket

import pytest

from stsmilter import config
from stsmilter.service import open_files
from world import milter_client
from world.daemon import poll_until
from world import paths

pytestmark = pytest.mark.integration


def limit_open_files(soft, hard):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_files_limit(pid):
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3]), int(line.split()[4])
    raise AssertionError("no Max open files line")


# The defaults: [dns] max_concurrent 2048 UDP sockets, [fetch] max_concurrent 1024 HTTPS
# sockets, [socketmap] max_connections 1000, 32 /metrics connections.
DEFAULT_NEED = open_files.RESERVE + 2048 + 1024 + 1000 + 32


def test_needed_counts_the_socketmap_the_metrics_and_a_reserve():
    cfg = config.defaults()
    assert open_files.needed(cfg) == DEFAULT_NEED
    assert open_files.needed(cfg.replace(socketmap={"listen": None}, metrics={"listen": None})) == (
        open_files.RESERVE + 2048 + 1024)
    assert open_files.needed(cfg.replace(dns={"max_concurrent": 10}, fetch={"max_concurrent": 5})) == (
        open_files.RESERVE + 10 + 5 + 1000 + 32)
    # a Redis connection per store thread (4), plus the refresher's, the events reader's, spares
    assert open_files.needed(cfg.replace(cache={"redis": "redis://127.0.0.1:6379/0"})) == DEFAULT_NEED + 8
    # a socket per MX TLS check in flight, when the check is on
    assert open_files.needed(cfg.replace(probe={"enabled": True})) == DEFAULT_NEED + 64
    assert open_files.needed(cfg.replace(probe={"max_concurrent": 500})) == DEFAULT_NEED


def test_the_daemon_raises_its_soft_limit_as_far_as_it_needs(start_daemon):
    daemon = start_daemon(preexec_fn=limit_open_files(256, 8192))
    assert open_files_limit(daemon.pid) == (DEFAULT_NEED, 8192)
    daemon.wait_log(f"open files limit raised from 256 to {DEFAULT_NEED}")


def test_a_low_hard_limit_serves_fewer_socketmap_connections_and_the_milter_still_answers(start_daemon):
    allowed = 348
    hard = DEFAULT_NEED - (1000 - allowed)
    daemon = start_daemon(preexec_fn=limit_open_files(hard, hard))
    daemon.wait_log(f"serving at most {allowed} socketmap connections")
    assert "open files limit raised" not in daemon.log()  # soft == hard: nothing was raised
    before = len(os.listdir(f"/proc/{daemon.pid}/fd"))
    held = []
    try:
        for _ in range(1000):  # one local client tries to take every descriptor
            held.append(socket.create_connection(("127.0.0.1", daemon.socketmap_port), timeout=5))
        poll_until(lambda: len(os.listdir(f"/proc/{daemon.pid}/fd")) <= before + allowed + 8, 10,
                   "the daemon to close the connections over its budget")
        with socket.create_connection(("127.0.0.1", daemon.socketmap_port), timeout=5) as sock:
            sock.sendall(b"19:postfix example.test,")
            assert sock.recv(100).endswith(b",")
        for _ in range(5):
            assert milter_client.negotiation_seconds(daemon.milter_socket, timeout=5) < 5
    finally:
        for sock in held:
            sock.close()
    assert daemon.proc.poll() is None


def test_the_unit_and_the_init_script_allow_what_the_defaults_need():
    root = str(paths.ROOT / "contrib")
    with open(os.path.join(root, "systemd", "stsmilter.service")) as f:
        unit = [int(line.split("=", 1)[1]) for line in f if line.startswith("LimitNOFILE=")]
    with open(os.path.join(root, "init.d", "stsmilter")) as f:
        text = f.read()
    init = [int(line.split("=", 1)[1].split()[0]) for line in text.splitlines() if line.startswith("OPEN_FILES=")]
    assert 'ulimit -n "$OPEN_FILES"' in text
    assert unit == init and unit[0] >= open_files.needed(config.defaults())
