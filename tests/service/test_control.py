"""control.py: the daemon's cache control socket is a hostile-input surface. A real
ControlServer on a real unix socket over a real PolicyCache; the daemon and the CLI
using it are in test_fleet_daemons.py."""

import json
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time

import pytest

from stsmilter.service import control
from stsmilter.engine.cache import PolicyCache
from stsmilter.service.control import BadRequest, ControlServer, control_path, parse_request, request
from stsmilter.engine.policy import Policy, Result
from stsmilter.engine.store import MemoryStore, make_entry


def test_the_control_socket_sits_beside_the_pid_file():
    assert control_path("/run/stsmilter/stsmilter.pid") == "/run/stsmilter/stsmilter.ctl"
    assert control_path("/run/s") == "/run/s.ctl" and control_path("") == ""


@pytest.mark.parametrize("line, expected", [
    (b"list", ("list", [])),
    (b"purge-all", ("purge-all", [])),
    (b"purge a.example xn--bcher-kva.example", ("purge", ["a.example", "xn--bcher-kva.example"])),
])
def test_good_requests(line, expected):
    assert parse_request(line) == expected


@pytest.mark.parametrize("line, reason", [
    (b"", "empty"), (b"   ", "empty"), (b"\xff\xfe", "ASCII"), (b"LIST", "unknown"), (b"drop a.example", "unknown"),
    (b"list a.example", "no argument"), (b"purge-all a.example", "no argument"), (b"purge", "needs a domain"),
    (b"purge A.example", "normalized"), (b"purge a.example.", "normalized"), (b"purge [192.0.2.1]", "normalized"),
    (b"purge a..b", "normalized"), (b"purge " + b"x" * 300, "normalized"),
])
def test_bad_requests_say_why(line, reason):
    with pytest.raises(BadRequest, match=reason):
        parse_request(line)


@pytest.fixture
def cache():
    c = PolicyCache(MemoryStore(), 100000, negative_ttl=60, failure_backoff=60)
    for domain in ("a.example", "b.example"):
        c.put(make_entry(domain, "id1", Policy("STSv1", "enforce", 86400, (f"mx.{domain}",)), time.time()))
    return c


@pytest.fixture
def server(tmp_path, cache):
    s = ControlServer(str(tmp_path / "s.ctl"), cache)
    s.start()
    yield s
    s.stop()


def ask(server, line):
    return list(request(server.path, line))


def test_list_and_purges(server, cache):
    lines = ask(server, "list")
    assert [json.loads(line)["domain"] for line in lines[:-1]] == ["a.example", "b.example"]
    assert json.loads(lines[0])["mx"] == ["mx.a.example"] and lines[-1] == "end 2"
    assert ask(server, "purge a.example c.example") == ["purged 1"]
    assert [e.domain for e in cache.snapshot()] == ["b.example"]
    cache.put_negative(Result("n.example", "none"))
    assert ask(server, "purge-all") == ["purged 1"]
    assert cache.snapshot() == [] and cache.negative("n.example") is None
    assert ask(server, "list") == ["end 0"]


def test_the_socket_is_the_owners_only_and_only_ours_is_removed(tmp_path, cache):
    path = str(tmp_path / "s.ctl")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # left behind by a daemon that died
    stale.close()
    s = ControlServer(path, cache)
    s.start()
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600 and stat.S_ISSOCK(os.lstat(path).st_mode)
    os.unlink(path)
    successor = socket.socket(socket.AF_UNIX)
    successor.bind(path)  # another daemon's, bound meanwhile
    s.stop()
    assert os.path.exists(path)
    successor.close()


@pytest.mark.parametrize("payload, answer", [
    (b"bogus\n", "error unknown request 'bogus'"),
    (b"purge A.EXAMPLE\n", "error not a normalized domain: 'A.EXAMPLE'"),
    (b"x" * (control.MAX_REQUEST + 10), f"error request longer than {control.MAX_REQUEST} bytes"),
])
def test_a_bad_request_gets_one_error_line_and_one_log_line(server, payload, answer, caplog):
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(5)
        conn.connect(server.path)
        conn.sendall(payload)
        assert conn.makefile("rb").read() == answer.encode() + b"\n"
    assert ask(server, "list")[-1] == "end 2"  # and the next client is served
    # One thread serves the socket, one client after the other: the bad request's log
    # line was written before the next request was answered.
    lines = [r.getMessage() for r in caplog.records if r.name == "stsmilter.control"]
    assert len(lines) == 1 and "BadRequest" in lines[0] and "Traceback" not in caplog.text


def test_a_client_that_sends_nothing_or_reads_nothing_is_dropped_in_time(server, monkeypatch, cache):
    monkeypatch.setattr(control, "REQUEST_SECONDS", 0.3)
    monkeypatch.setattr(control, "ANSWER_SECONDS", 0.3)
    for n in range(20000):  # an answer larger than the socket buffers
        cache.put(make_entry(f"d{n:05d}.example", "id1", Policy("STSv1", "testing", 86400, ("mx.example",)),
                             time.time()))
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(server.path)
    reader = socket.socket(socket.AF_UNIX)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.connect(server.path)
    reader.sendall(b"list\n")
    started = time.monotonic()
    assert ask(server, "purge a.example") == ["purged 1"]  # served after both gave up
    assert time.monotonic() - started < 3
    assert silent.recv(100) == b""  # closed without an answer
    silent.close()
    reader.close()


@pytest.fixture
def open_directory():
    """A directory anyone may enter (pytest's tmp_path is closed to other users)."""
    path = tempfile.mkdtemp(prefix="stsmilter-control-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="connecting as another user needs root")
def test_another_user_is_not_served_even_through_a_permissive_socket(open_directory, cache):
    server = ControlServer(os.path.join(open_directory, "s.ctl"), cache)
    server.start()
    os.chmod(server.path, 0o777)
    nobody = pwd.getpwnam("nobody")
    script = ("import socket,sys\ns=socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])\n"
              "try:\n s.sendall(b'purge-all\\n'); print(repr(s.recv(100)))\n"
              "except (BrokenPipeError, ConnectionResetError): print(repr(b''))")
    proc = subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                           "/usr/bin/python3", "-c", script, server.path], capture_output=True, text=True, timeout=30)
    try:
        assert proc.stdout.strip() == "b''", proc.stderr
        assert ask(server, "list")[-1] == "end 2"  # nothing was purged
    finally:
        server.stop()


def test_no_daemon_is_told_apart_from_a_failure(tmp_path):
    with pytest.raises(control.NoDaemon):
        list(request(str(tmp_path / "absent.ctl"), "list"))
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "stale.ctl"))
    stale.close()
    with pytest.raises(control.NoDaemon):
        list(request(str(tmp_path / "stale.ctl"), "list"))


def test_the_log_line_of_a_repeated_fault_is_rate_limited(server, caplog):
    caplog.set_level(logging.INFO, "stsmilter.control")
    for _ in range(5):
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(server.path)
            conn.sendall(b"bogus\n")
            conn.recv(100)
    assert ask(server, "list")[-1] == "end 2"  # answered after the five were handled and logged
    assert len([r for r in caplog.records if "request failed" in r.getMessage()]) == 1
