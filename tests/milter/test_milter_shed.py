"""milter/shed.py: libmilter's listener must not spin when the process is out of file
descriptors (issue 19, item 5).

The scenarios run in a process of their own (tests/world/milter_shed_scenario.py): they
exhaust its descriptors. A stand-in runs libmilter's listener loop (mi_listener: poll,
accept, straight back to poll when accept fails) on a real loopback listener.
"""

import json
import os
import select
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from stsmilter.milter import listener as milter_listener
from stsmilter.milter import park
from stsmilter.milter import shed as milter_shed
from world import paths

SCENARIO = str(paths.WORLD / "milter_shed_scenario.py")


def run_scenario(mode):
    done = subprocess.run([sys.executable, SCENARIO, mode], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return json.loads(done.stdout), done.stderr


def test_listening_address_reads_every_milter_socket_form():
    assert milter_listener.listening_address("inet:8894@127.0.0.1") == (socket.AF_INET, ("127.0.0.1", 8894))
    assert milter_listener.listening_address("inet:8894") == (socket.AF_INET, (None, 8894))
    assert milter_listener.listening_address("inet6:8894@::1") == (socket.AF_INET6, ("::1", 8894))
    assert milter_listener.listening_address("unix:/run/x.sock") == (socket.AF_UNIX, "/run/x.sock")
    assert milter_listener.listening_address("local:/run/x.sock") == (socket.AF_UNIX, "/run/x.sock")


def test_find_listener_finds_the_one_listening_socket_on_the_milter_address(tmp_path):
    with socket.socket() as other, socket.socket() as milter, socket.socket(socket.AF_UNIX) as unix, \
            socket.socket() as connected_only:
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        milter.bind(("127.0.0.1", 0))
        port = milter.getsockname()[1]
        assert milter_listener.find_listener(f"inet:{port}@127.0.0.1") is None  # bound, not listening
        milter.listen(1)
        assert milter_listener.find_listener(f"inet:{port}@127.0.0.1") == milter.fileno()
        assert milter_listener.find_listener(f"inet:{port}") == milter.fileno()
        assert milter_listener.find_listener(f"inet:{port}@localhost") == milter.fileno()  # a name: the port
        assert milter_listener.find_listener(f"inet:{port}@127.0.0.2") is None
        assert milter_listener.find_listener(f"inet6:{port}@::1") is None
        connected_only.connect(("127.0.0.1", port))  # a connection to it is not it
        path = str(tmp_path / "milter.sock")
        unix.bind(path)
        unix.listen(1)
        assert milter_listener.find_listener(f"unix:{path}") == unix.fileno()
        assert milter_listener.find_listener(f"local:{path}") == unix.fileno()
        assert milter_listener.find_listener(f"unix:{path}.other") is None
        for sock in (other, milter, unix, connected_only):  # it closes nothing it looks at
            assert stat.S_ISSOCK(os.fstat(sock.fileno()).st_mode)


def test_a_quiet_listener_is_never_readable_and_never_blocks():
    with park.quiet_listener() as quiet:
        assert quiet.getblocking() is False
        with pytest.raises(BlockingIOError):
            quiet.accept()
        assert quiet.getsockname().startswith(b"\0")  # abstract: no file, nobody finds it


@pytest.mark.integration
def test_without_a_guard_the_stand_in_spins_as_libmilter_did():
    """The control: what the other scenarios are measured against."""
    result, _ = run_scenario("none")
    assert result["cpu_share"] > 0.5
    assert result["failed_accepts_per_second"] > 10000
    assert result["clients_closed"] == 0  # they just wait


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["private", "parked"])
def test_out_of_descriptors_the_guard_sheds_waiting_connections_and_gives_the_next_to_libmilter(mode):
    result, stderr = run_scenario(mode)
    assert result["mode"] == (milter_shed.PrivateShedder.mode if mode == "private" else milter_shed.ParkedShedder.mode)
    # Descriptors free: every connection is libmilter's.
    assert result["accepted_while_free"] and result["shed_while_free"] == 0
    # Out of descriptors: no spin, every waiting connection closed (the MTA applies its
    # milter default action at once instead of waiting), counted, one log line.
    assert result["shed_after"] < 1.0, result
    assert result["cpu_share"] < 0.3, result
    assert result["failed_accepts_per_second"] < 10000, result
    assert result["shed"] == result["clients_closed"] == 20
    assert stderr.count("milter: out of file descriptors (open files limit") == 1, stderr
    # Descriptors free again: the next connection is libmilter's, at once (parked: its
    # poll() is woken, not left to its 5 s timeout).
    assert result["served_again"] and result["served_again_after"] < 1.0, result
    assert result["guard_running"]
    # libmilter closes its listener: the guard lets go of it too.
    assert result["guard_stopped_with_listener"] and result["references_dropped"]


def _polling(fd, timeout=3.0):
    """A thread in poll() on fd, as libmilter's listener; .result: (seconds, events) once it returns."""
    thread = threading.Thread(target=lambda: None, daemon=True)
    started = time.monotonic()

    def run():
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        events = poller.poll(timeout * 1000)
        thread.result = (time.monotonic() - started, events)

    thread.run = run
    thread.result = None
    thread.start()
    time.sleep(0.1)  # its first pass (where poll() registers on wait queues) is done
    return thread


@pytest.mark.parametrize("begun, connected", [
    ("on the real listener", "while parked"),  # its wake-up is used up while parked
    ("while parked", "after unparking"),  # registered on the quiet socket only
])
def test_unparking_wakes_libmilters_poll_whichever_socket_it_began_on(begun, connected):
    """Linux's poll() registers on wait queues only in its first pass over the descriptors.
    Either way it must return as soon as the real listener is back (and a connection
    waits), not after libmilter's own 5 s."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        address = listener.getsockname()  # the descriptor is the quiet socket's while parked
        shedder = milter_shed.ParkedShedder(listener.fileno())
        clients = []
        try:
            poll = _polling(listener.fileno()) if begun == "on the real listener" else None
            assert shedder.shed() == 0 and shedder.parked is not None  # parked; nothing to shed
            if poll is None:
                poll = _polling(listener.fileno())
            if connected == "while parked":
                clients.append(socket.create_connection(address, timeout=2))
                time.sleep(0.1)
                assert poll.result is None  # parked: libmilter does not see it
            shedder.relax()
            assert milter_listener.identity(listener.fileno()) == milter_listener.identity(shedder.real.fileno())
            if connected == "after unparking":
                time.sleep(0.1)
                clients.append(socket.create_connection(address, timeout=2))
            poll.join(1.0)
            assert poll.result is not None, "poll() not woken"
            seconds, events = poll.result
            assert seconds < 1.0 and events == [(listener.fileno(), select.POLLIN)]
        finally:
            for client in clients:
                client.close()
            shedder.close()
