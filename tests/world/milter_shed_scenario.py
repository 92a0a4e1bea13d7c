"""Run by tests/milter/test_milter_shed.py in a process of its own, because it exhausts the
process's file descriptors: a stand-in for libmilter's listener (the same loop as
mi_listener: poll, accept, straight back to poll when accept fails) beside
stsmilter.milter_shed's guard, on 127.0.0.1. Prints one JSON object.

    python milter_shed_scenario.py private|parked|none

"none" runs no guard: the control that shows the stand-in spinning as libmilter did.
"""

import json
import os
import resource
import select
import socket
import sys
import threading
import time

from stsmilter.milter import shed as milter_shed

CLIENTS = 20


def wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def closed_by_peer(sock):
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False  # still open, nothing sent
    except OSError:
        return True  # reset


def _peer(sock):
    try:
        return sock.getpeername()
    except OSError:
        return None


def main(mode):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    accepted, failed, stop = [], [0], threading.Event()

    def libmilter():
        poller = select.poll()
        poller.register(listener.fileno(), select.POLLIN)  # by number, as libmilter does
        while not stop.is_set():
            if not poller.poll(5000):
                continue
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                failed[0] += 1

    guard = milter_shed.MilterGuard(f"inet:{port}@127.0.0.1", find_for=5, private=mode == "private")
    if mode != "none":
        guard.start()
        wait_for(lambda: guard.shedder is not None or guard.stopped.is_set(), 5)
    result = {"mode": getattr(guard.shedder, "mode", None)}
    threading.Thread(target=libmilter, daemon=True).start()

    # Descriptors free: libmilter accepts, the guard sheds nothing.
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        result["accepted_while_free"] = wait_for(lambda: len(accepted) == 1, 2)
    result["shed_while_free"] = guard.shed

    # Out of descriptors, connections waiting.
    clients = [socket.socket() for _ in range(CLIENTS)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 32, hard))
    held = []
    try:
        while True:
            held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    cpu_before, started = time.process_time(), time.monotonic()
    for client in clients:
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port))
    # The CPU share covers everything from the first connection on. The failed accepts
    # are counted from the moment the guard sheds (how long it took is shed_after): the
    # stand-in, a Python thread, spins at a rate that says more of the machine's load
    # than of the guard until then.
    if mode != "none":
        wait_for(lambda: guard.shed > 0, 5)
    result["shed_after"] = time.monotonic() - started
    failed_before, shedding = failed[0], time.monotonic()
    time.sleep(1.0)
    result["cpu_share"] = (time.process_time() - cpu_before) / (time.monotonic() - started)
    result["failed_accepts_per_second"] = (failed[0] - failed_before) / (time.monotonic() - shedding)
    if mode != "none":  # a busy machine may not have shed them all within that second yet
        wait_for(lambda: guard.shed >= CLIENTS and all(closed_by_peer(client) for client in clients), 5)
    result["shed"] = guard.shed
    result["clients_closed"] = sum(closed_by_peer(client) for client in clients)
    if mode == "none":
        print(json.dumps(result))
        os._exit(0)  # the stand-in still spins

    # Descriptors free again: the next connection is libmilter's.
    for fd in held:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for client in clients:
        client.close()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=2) as client:
        mine = client.getsockname()  # not the guard's wake-up connection: this one
        result["served_again"] = wait_for(lambda: any(_peer(sock) == mine for sock in list(accepted)), 3)
    result["served_again_after"] = time.monotonic() - started
    result["guard_running"] = not guard.stopped.is_set()

    # libmilter closes its listener (it is stopping): the guard lets go of it and of its
    # own references to it (the stand-in's poll() keeps one until its 5 s are up).
    stop.set()
    listener.close()
    result["guard_stopped_with_listener"] = guard.stopped.wait(3)
    shedder = guard.shedder
    if isinstance(shedder, milter_shed.PrivateShedder):
        result["references_dropped"] = wait_for(lambda: not shedder.thread.is_alive(), 2)
    else:
        result["references_dropped"] = shedder.real.fileno() == -1
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
