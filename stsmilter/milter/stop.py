"""Make libmilter stop promptly on TERM/HUP/INT.

libmilter's signal thread takes TERM, HUP and INT (sigwait) and sets a stop flag, but
its listener only looks at that flag when poll() returns: on a new connection or every
5 s (MI_CHK_TIME). So `stsmilter run` used to take up to 5 s to stop. A watcher thread
finds libmilter's signal thread (the one thread, other than our USR1 thread, sleeping
in sigtimedwait), waits until it leaves sigtimedwait (it has taken a signal and is
stopping libmilter; it then blocks on libmilter's mutex rather than exit), and opens
and closes one connection to the milter socket to wake the listener.
A stop signal sent before that thread exists is seen pending (ShdPnd) instead.
Best effort: if neither can be seen, libmilter still stops within 5 s. A /proc file that
cannot be opened because the process is out of file descriptors says nothing either way.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from typing import Collection, Optional

TASKS = "/proc/self/task"

log = logging.getLogger("stsmilter")


def _sleeping_in_sigwait(tid: str) -> Optional[bool]:
    """None if it cannot be told (out of file descriptors)."""
    try:
        with open(f"{TASKS}/{tid}/wchan") as f:
            return "sigtimedwait" in f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False  # the thread is gone
    except OSError:
        return None


def find_signal_thread(ours: Collection[int]) -> Optional[str]:
    try:
        tids = os.listdir(TASKS)
    except OSError:
        return None
    for tid in tids:
        if int(tid) not in ours and _sleeping_in_sigwait(tid):
            return tid
    return None


_STOP_SIGNALS = (1 << (signal.SIGHUP - 1)) | (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))


def stop_signal_pending() -> bool:
    """A stop signal sent before libmilter's signal thread waits for it stays pending
    for the whole process (ShdPnd)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("ShdPnd:"):
                    return bool(int(line.split()[1], 16) & _STOP_SIGNALS)
    except (OSError, ValueError):
        pass
    return False


def poke(socket_spec: str) -> None:
    """One connection to the milter socket, closed at once."""
    kind, _, rest = socket_spec.partition(":")
    try:
        if kind in ("unix", "local"):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(rest)
        else:
            port, _, host = rest.partition("@")
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1):
                pass
    except OSError:
        pass  # already closed: libmilter is on its way out anyway


def start_watcher(socket_spec: str, ours: Collection[int]) -> threading.Thread:
    def watch() -> None:
        # Look for libmilter's signal thread every 5 ms at first: a signal it takes
        # before we have seen it waiting would go unnoticed (libmilter's 5 s then apply).
        tid, searched_until = None, time.monotonic() + 2
        while True:
            if tid is None and time.monotonic() < searched_until:
                tid = find_signal_thread(ours)
            if stop_signal_pending() or (tid is not None and _sleeping_in_sigwait(tid) is False):
                log.debug("libmilter is stopping: waking its listener")
                poke(socket_spec)
                time.sleep(0.5)  # and again, until the process is gone, in case of a race
            else:
                time.sleep(0.1 if tid is not None or time.monotonic() >= searched_until else 0.005)

    thread = threading.Thread(target=watch, name="sts-milter-stop", daemon=True)
    thread.start()
    return thread
