"""Out of file descriptors, the listeners other than the milter (issue 19, item 5): no
traceback, one counted and rate-limited line (descriptors.out_of_descriptors), serving
again once descriptors are free. The milter's guard: test_milter_shed.py; the whole
daemon: test_fd_exhaustion.py."""

import errno
import importlib
import logging
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from stsmilter.service import control
from stsmilter import descriptors
from stsmilter.milter import stop as milter_stop
from stsmilter.service.metrics_server import MetricsServer
from stsmilter.ratelog import RateLimitedLog
from stsmilter.socketmap.server import SocketmapServer
from stsmilter.threads import ACCEPT_OUT_OF_RESOURCES

metrics = importlib.import_module("stsmilter.metrics")

LINE = "out of file descriptors (open files limit"


def count(listener):
    return metrics.OUT_OF_DESCRIPTORS.labels(listener=listener)._value.get()


@pytest.fixture
def fresh_log(monkeypatch):
    """descriptors' rate limit starts afresh (another test may have used it within the minute)."""
    now = [1000.0]
    monkeypatch.setattr(descriptors, "_said", RateLimitedLog(descriptors.log, clock=lambda: now[0]))
    return now


def test_every_listener_has_its_series_from_the_start():
    text = "\n".join(f"{s.name}{s.labels}" for m in metrics.OUT_OF_DESCRIPTORS.collect() for s in m.samples)
    for listener in ("milter", "socketmap", "metrics", "control"):
        assert f"'listener': '{listener}'" in text
    assert MetricsServer.what == "metrics" and SocketmapServer.what == "socketmap"  # their labels


def test_a_report_counts_every_event_and_logs_once_a_minute_per_listener(fresh_log, caplog):
    caplog.set_level(logging.WARNING, logger="stsmilter")
    before = count("milter"), count("metrics")
    descriptors.out_of_descriptors("milter", 5)
    descriptors.out_of_descriptors("milter", 3)
    descriptors.out_of_descriptors("metrics")
    assert (count("milter"), count("metrics")) == (before[0] + 8, before[1] + 1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith(f"milter: {LINE} ")
    assert lines[0].endswith("): new connections are refused until some close")
    fresh_log[0] += 61
    descriptors.out_of_descriptors("milter")
    assert caplog.records[-1].getMessage().endswith("until some close (1 more since the last such line)")


def test_an_accept_without_descriptors_is_one_counted_line_and_anything_else_goes_to_asyncio(fresh_log, caplog):
    """What CPython's selector loop hands the exception handler when accept() fails:
    3.11 reports it for each of up to `backlog` attempts in one pass, then pauses 1 s."""
    caplog.set_level(logging.WARNING)
    server = MetricsServer("127.0.0.1", 0)
    server.start()
    try:
        before = count("metrics")
        emfile = {"message": ACCEPT_OUT_OF_RESOURCES, "exception": OSError(errno.EMFILE, "Too many open files"),
                  "socket": server._listener.sockets[0]}
        done = threading.Event()

        def one_pass():
            for _ in range(128):
                server.loop.call_exception_handler(emfile)
            server.loop.call_exception_handler({"message": "something else", "exception": ValueError("x")})
            done.set()

        server.loop.call_soon_threadsafe(one_pass)
        assert done.wait(5)
        assert count("metrics") == before + 1
        ours = [r for r in caplog.records if LINE in r.getMessage()]
        assert len(ours) == 1 and ours[0].getMessage().startswith("metrics: ") and ours[0].exc_info is None
        others = [r for r in caplog.records if r.name == "asyncio"]
        assert [r.getMessage() for r in others] == ["something else"] and others[0].exc_info  # asyncio's own
    finally:
        server.stop()


SCRAPE_AFTER_EMFILE = textwrap.dedent("""
    import logging, os, resource, socket, sys, time, urllib.request
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from stsmilter import metrics
    from stsmilter.service.metrics_server import MetricsServer
    server = MetricsServer("127.0.0.1", 0)
    server.start()
    host, port = server.address
    clients = [socket.socket() for _ in range(20)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
    held = []
    try:
        while True:
            held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    for client in clients:
        client.setblocking(False)
        client.connect_ex((host, port))
    cpu, started = time.process_time(), time.monotonic()
    time.sleep(2.5)
    print("cpu", (time.process_time() - cpu) / (time.monotonic() - started))
    print("pauses", metrics.OUT_OF_DESCRIPTORS.labels(listener="metrics")._value.get())
    for fd in held:
        os.close(fd)
    for client in clients:
        client.close()
    started = time.monotonic()
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        assert b"stsmilter_out_of_descriptors_total" in response.read()
    print("served_again_after", time.monotonic() - started)
    server.stop()
""")


@pytest.mark.integration
def test_the_metrics_listener_out_of_descriptors_pauses_quietly_and_serves_again():
    done = subprocess.run([sys.executable, "-c", SCRAPE_AFTER_EMFILE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and ACCEPT_OUT_OF_RESOURCES not in done.stderr, done.stderr
    assert done.stderr.count(f"metrics: {LINE}") == 1, done.stderr
    figures = dict(line.split() for line in done.stdout.splitlines())
    assert float(figures["cpu"]) < 0.3
    assert 1 <= float(figures["pauses"]) <= 4  # one per second, not one per attempt
    assert float(figures["served_again_after"]) < 2.0


class _NoDescriptors:
    """A control listener whose accept() fails with EMFILE `times` times, then stops the server."""

    def __init__(self, server, times):
        self.server, self.times, self.calls = server, times, 0

    def accept(self):
        self.calls += 1
        if self.calls > self.times:
            self.server._stopping.set()
            raise socket.timeout()
        raise OSError(errno.EMFILE, "Too many open files")


def test_the_control_socket_counts_an_accept_without_descriptors(tmp_path, fresh_log, caplog):
    caplog.set_level(logging.WARNING)
    server = control.ControlServer(str(tmp_path / "s.ctl"), cache=None)
    server._listener = _NoDescriptors(server, 2)
    before = count("control")
    server._serve()  # returns once stopped
    assert count("control") == before + 2
    assert [r.getMessage()[:40] for r in caplog.records] == [f"control: {LINE}"[:40]]


@pytest.mark.parametrize("error, expected", [
    (OSError(errno.EMFILE, "Too many open files"), None),  # cannot tell: not a reason to wake libmilter
    (OSError(errno.ENFILE, "Too many open files in system"), None),
    (FileNotFoundError(errno.ENOENT, "gone"), False),  # the thread has ended: libmilter is stopping
])
def test_the_stop_watcher_does_not_take_a_full_descriptor_table_for_a_stop(monkeypatch, error, expected):
    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(milter_stop, "open", refuse, raising=False)
    assert milter_stop._sleeping_in_sigwait("1") is expected


def test_the_stop_watcher_finds_no_thread_rather_than_raising_without_descriptors(monkeypatch):
    def refuse(path):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(milter_stop.os, "listdir", refuse)
    assert milter_stop.find_signal_thread(ours=()) is None
