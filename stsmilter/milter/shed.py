"""Keep libmilter's listener from spinning when the process is out of file descriptors.

libmilter's listener is the main thread, in C (sendmail 8.17 libmilter/listener.c,
mi_listener): it polls its listening socket (5 s timeout), then calls accept(). When
accept() fails with EMFILE or ENFILE (or EAGAIN, ECONNABORTED, EINTR, ENOBUFS, ENOMEM)
it goes straight back to poll(), which returns at once because the connection is still
waiting in the backlog. At the open-files limit, with MTA connections waiting, that
burned a whole core (4.3 s of CPU in 5 s) for as long as the descriptors stayed taken;
libmilter itself bounds nothing it accepts.

A guard thread finds libmilter's listening descriptor once runmilter has opened it (the
socket in /proc/self/fd that listens on [milter] socket), makes it non-blocking (harmless
to libmilter: EAGAIN is one of its retry cases, and on Linux an accepted socket does not
inherit O_NONBLOCK) and polls it too. While the process has a descriptor free it leaves
every connection to libmilter and looks again only SETTLE seconds later (no spin of its
own). When a probe dup() fails with EMFILE or ENFILE, it sheds the waiting connections:
each is accepted and closed at once (the MTA sees the connection closed, as when the
milter is down, and applies its milter default action), the backlog empties and
libmilter's poll() blocks again; it accepts again as soon as a descriptor is free.

Shedding needs a descriptor, and libmilter, accepting in a tight loop, takes any slot the
moment it is freed: a spare descriptor closed just before accept() is lost to it almost
every time (measured: the spin went on). So the shedding is done from a descriptor table
libmilter does not use:

* PrivateShedder: a thread that unshare(CLONE_FILES)s and keeps only the listener and two
  pipes in its own table; its accept() never competes with libmilter's.
* ParkedShedder, where unshare is refused (Docker's default seccomp profile refuses it
  without CAP_SYS_ADMIN): while the process is out of descriptors libmilter's descriptor
  is pointed (dup2) at a quiet listening socket of ours, so its poll() blocks instead of
  spinning, and the guard sheds from its own duplicate of the real listener through a
  spare descriptor (only the other threads can take that slot now). When descriptors are
  free again the real listener goes back (dup2) and libmilter's poll() is woken: Linux's
  poll() registers on wait queues only in its first pass over the descriptors, so a
  poll() begun on the real listener, whose wake-up was used up while it was parked, and
  one begun on the quiet socket, each need their own socket to fire: one empty connection
  to the real listener (as milter/wake.py makes twice a second), then one to the quiet
  socket; poll() then re-reads the descriptor, finds the real listener readable and
  returns. While it is parked, a stop signal is noticed within libmilter's own 5 s
  instead of at once.

Each shed connection counts in stsmilter_out_of_descriptors_total{listener="milter"}, and
one line a minute says that connections are refused (descriptors.out_of_descriptors).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from typing import Optional

from stsmilter import descriptors
from stsmilter.milter.listener import descriptors_left, find_listener, identity, shed_batch
from stsmilter.milter.park import ParkedShedder

log = logging.getLogger("stsmilter")

SETTLE = 0.02  # seconds a waiting connection is left to libmilter before the guard looks again
FIND_FOR = 30.0  # seconds to look for libmilter's listening socket after the start
FIND_EVERY = 0.01
CLONE_FILES = 0x400  # <sched.h>


def unshare_files() -> None:
    """Give the calling thread a descriptor table of its own (a copy); OSError if refused."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_FILES) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class PrivateShedder:
    """Sheds from a thread with a descriptor table of its own: one byte on a pipe asks for
    a batch, one byte answers how many. OSError from the constructor if unshare is refused."""

    mode = "a descriptor table of its own"

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._identity = identity(fd)
        self._refused: Optional[OSError] = None
        request_r, self._request_w = os.pipe()
        self._answer_r, answer_w = os.pipe()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(request_r, answer_w, ready), name="sts-milter-shed-x",
                                       daemon=True)
        self.thread.start()
        ready.wait()
        if self._refused is not None:
            self.thread.join()
            for end in (request_r, self._request_w, self._answer_r, answer_w):
                os.close(end)
            raise self._refused
        os.close(request_r)  # the thread has its own copies: EOF reaches either side when
        os.close(answer_w)   # the other closes

    @property
    def watched(self) -> int:
        return self.fd

    def listener_closed(self) -> bool:
        return identity(self.fd) != self._identity

    def relax(self) -> None:
        """Descriptors are free again: nothing to undo."""

    def shed(self) -> Optional[int]:
        """Connections shed; None once the thread is gone."""
        try:
            os.write(self._request_w, b"s")
            answer = os.read(self._answer_r, 1)
        except OSError:
            return None
        return answer[0] if answer else None

    def close(self) -> None:
        for fd in (self._request_w, self._answer_r):
            try:
                os.close(fd)  # the thread reads EOF and ends, closing its copy of the listener
            except OSError:
                pass

    def _run(self, request_r: int, answer_w: int, ready: threading.Event) -> None:
        try:
            unshare_files()
            # Drop the copies of everything else (closing needs no descriptor): this
            # thread must not keep sockets or files alive that the process closes.
            # Never an empty range: os.closerange(0, 0) is close_range(0, -1), which closes all.
            low = 0
            for fd in sorted({0, 1, 2, self.fd, request_r, answer_w}):
                if low < fd:
                    os.closerange(low, fd)
                low = fd + 1
            os.closerange(low, max(1 << 20, os.sysconf("SC_OPEN_MAX")))  # finite: without close_range
            # Python closes them one by one
        except (OSError, AttributeError) as e:  # AttributeError: no unshare in this libc
            self._refused = e if isinstance(e, OSError) else OSError(errno.ENOSYS, str(e))
            return
        finally:
            ready.set()
        listener = socket.socket(fileno=self.fd)  # this table's copy: closed below
        try:
            while os.read(request_r, 1) == b"s":
                os.write(answer_w, bytes([shed_batch(listener)]))
        except Exception:
            pass  # the guard sees the pipe close and stops; never a traceback from here
        finally:
            listener.close()
            os.close(request_r)
            os.close(answer_w)


class MilterGuard:
    """start() a thread that finds libmilter's listener for socket_spec and sheds what waits
    there while the process is out of file descriptors."""

    def __init__(self, socket_spec: str, settle: float = SETTLE, find_for: float = FIND_FOR,
                 private: bool = True) -> None:
        self.socket_spec = socket_spec
        self.settle = settle
        self.find_for = find_for
        self.private = private  # False: park even where unshare works (tests)
        self.shed = 0  # connections shed so far
        self.listener: Optional[int] = None  # libmilter's descriptor, once found
        self.shedder = None
        self.thread: Optional[threading.Thread] = None
        self.stopped = threading.Event()

    def start(self) -> threading.Thread:
        self.thread = threading.Thread(target=self._run, name="sts-milter-shed", daemon=True)
        self.thread.start()
        return self.thread

    def _run(self) -> None:
        try:
            self._guard()
        except Exception as e:  # a bug: one line, the milter still runs (unguarded)
            log.warning("milter: the file descriptor guard stopped: %s: %s", type(e).__name__, e)
        finally:
            self.stopped.set()

    def _find(self) -> Optional[int]:
        deadline = time.monotonic() + self.find_for
        while time.monotonic() < deadline:
            try:
                fd = find_listener(self.socket_spec)
            except OSError:
                fd = None  # out of descriptors already: look again
            if fd is not None:
                return fd
            time.sleep(FIND_EVERY)
        return None

    def _shedder(self, fd: int):
        if self.private:
            try:
                return PrivateShedder(fd)
            except OSError as e:
                log.info("milter: unshare(CLONE_FILES) refused (%s): out of file descriptors, libmilter's"
                         " listener will be parked while waiting connections are shed", e.strerror or e)
        return ParkedShedder(fd)

    def _guard(self) -> None:
        fd = self._find()
        if fd is None:
            log.warning("milter: libmilter's listening socket for %s not found: milter connections are not"
                        " shed when the process runs out of file descriptors", self.socket_spec)
            return
        os.set_blocking(fd, False)
        self.listener = fd
        self.shedder = shedder = self._shedder(fd)
        poller = select.poll()
        poller.register(shedder.watched, select.POLLIN)
        try:
            while True:
                ready = poller.poll(1000)
                if shedder.listener_closed():
                    return  # libmilter closed its listener: it is stopping
                if descriptors_left(shedder.watched):
                    shedder.relax()
                    if ready:
                        time.sleep(self.settle)  # libmilter accepts it
                    continue
                if not ready:
                    continue
                shed = shedder.shed()
                if shed is None:
                    log.warning("milter: the file descriptor guard stopped: its shedding thread ended")
                    return
                if shed:
                    self.shed += shed
                    descriptors.out_of_descriptors("milter", shed)
                else:
                    time.sleep(self.settle)
        finally:
            shedder.close()


def start_guard(socket_spec: str) -> MilterGuard:
    guard = MilterGuard(socket_spec)
    guard.start()
    return guard
