"""Where the daemon's log lines go: syslog when it works, else stderr, and the first
line says why (a missing or dead /dev/log must never swallow the log)."""

import logging
import os
import socket

import pytest

from stsmilter import config
from stsmilter.service import daemon


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def daemon_settings(**keys):
    return config.defaults().replace(daemon=keys).daemon


def test_no_syslog_socket_logs_to_stderr_and_says_so(tmp_path, monkeypatch, capsys, restore_logging):
    path = str(tmp_path / "log")
    monkeypatch.setattr(daemon, "SYSLOG_SOCKET", path)
    daemon.setup_logging(daemon_settings(log="syslog"))
    logging.getLogger("stsmilter").info("queue_id=NOQUEUE client=192.0.2.1 domain=example.com")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(f"WARNING log = syslog, but no {path}: logging to standard error")
    assert lines[1].endswith("INFO queue_id=NOQUEUE client=192.0.2.1 domain=example.com")


def test_dead_syslog_socket_logs_to_stderr_and_says_so(tmp_path, monkeypatch, capsys, restore_logging):
    path = str(tmp_path / "log")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: syslogd died or was never started
    assert os.path.exists(path)
    monkeypatch.setattr(daemon, "SYSLOG_SOCKET", path)
    daemon.setup_logging(daemon_settings(log="syslog"))
    logging.getLogger("stsmilter").warning("after")
    lines = capsys.readouterr().err.splitlines()
    assert f"log = syslog, but {path}: Connection refused: logging to standard error" in lines[0]
    assert lines[1].endswith("WARNING after")


def test_working_syslog_gets_the_lines_with_facility_mail(tmp_path, monkeypatch, capsys, restore_logging):
    path = str(tmp_path / "log")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(5)
    try:
        monkeypatch.setattr(daemon, "SYSLOG_SOCKET", path)
        daemon.setup_logging(daemon_settings(log="syslog"))
        logging.getLogger("stsmilter").warning("hello")
        datagram = listener.recv(4096)
    finally:
        listener.close()
    # <PRI> = facility mail (2) * 8 + severity warning (4)
    assert datagram == f"<20>stsmilter[{os.getpid()}]: hello\x00".encode()
    assert capsys.readouterr().err == ""


def test_log_stderr_never_touches_syslog(tmp_path, monkeypatch, capsys, restore_logging):
    monkeypatch.setattr(daemon, "SYSLOG_SOCKET", str(tmp_path / "absent"))
    daemon.setup_logging(daemon_settings(log="stderr", log_level="warning"))
    logging.getLogger("stsmilter").info("not shown")
    logging.getLogger("stsmilter").warning("shown")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].endswith("WARNING shown")


def test_syslog_going_away_later_sends_lines_to_stderr(tmp_path, monkeypatch, capsys, restore_logging):
    path = str(tmp_path / "log")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    monkeypatch.setattr(daemon, "SYSLOG_SOCKET", path)
    daemon.setup_logging(daemon_settings(log="syslog"))
    listener.close()  # syslogd stops; its socket file may stay behind
    logging.getLogger("stsmilter").warning("queue_id=NOQUEUE action=tempfail")
    err = capsys.readouterr().err
    assert err == f"syslog unreachable: stsmilter[{os.getpid()}]: queue_id=NOQUEUE action=tempfail\n"
