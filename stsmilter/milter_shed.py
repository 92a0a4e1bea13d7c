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
  to the real listener (as milter_wake.py makes twice a second), then one to the quiet
  socket; poll() then re-reads the descriptor, finds the real listener readable and
  returns. While it is parked, a stop signal is noticed within libmilter's own 5 s
  instead of at once.

Each shed connection counts in stsmilter_out_of_descriptors_total{listener="milter"}, and
one line a minute says that connections are refused (descriptors.out_of_descriptors).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import select
import socket
import stat
import threading
import time
from typing import Optional, Tuple

from stsmilter import descriptors

log = logging.getLogger("stsmilter")

SETTLE = 0.02  # seconds a waiting connection is left to libmilter before the guard looks again
BATCH = 64  # connections shed before the guard checks the descriptors again (< 256: one byte)
FIND_FOR = 30.0  # seconds to look for libmilter's listening socket after the start
FIND_EVERY = 0.01
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)
CLONE_FILES = 0x400  # <sched.h>


def listening_address(socket_spec: str):
    """(family, address) that libmilter's listener for socket_spec reports: a path for
    unix:/local:, (host or None, port) for inet:/inet6: (host None: any)."""
    kind, _, rest = socket_spec.partition(":")
    if kind in ("unix", "local"):
        return socket.AF_UNIX, rest
    port, _, host = rest.partition("@")
    return (socket.AF_INET6 if kind == "inet6" else socket.AF_INET), (host or None, int(port))


def _matches(sock: socket.socket, family: int, where) -> bool:
    if sock.family != family or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return False
    name = sock.getsockname()
    if family == socket.AF_UNIX:
        return name == where
    host, port = where
    if name[1] != port:
        return False
    try:
        return host is None or ipaddress.ip_address(name[0]) == ipaddress.ip_address(host)
    except ValueError:
        return True  # a host name: the port decides


def find_listener(socket_spec: str) -> Optional[int]:
    """The descriptor of the one socket of this process listening on socket_spec, else None."""
    family, where = listening_address(socket_spec)
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=fd)  # no new descriptor; detached below, never closed
        except (OSError, ValueError):
            continue
        try:
            if _matches(sock, family, where):
                found.append(fd)
        except OSError:
            pass
        finally:
            sock.detach()
    return found[0] if len(found) == 1 else None


def identity(fd: int) -> Optional[Tuple[int, int]]:
    """What fd refers to (device, inode), None if it is closed."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def descriptors_left(fd: int) -> bool:
    """False if the process cannot open one more descriptor (fd: any open one, to dup)."""
    try:
        os.close(os.dup(fd))
    except OSError as e:
        return e.errno not in OUT_OF_DESCRIPTORS
    return True


def unshare_files() -> None:
    """Give the calling thread a descriptor table of its own (a copy); OSError if refused."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_FILES) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _dup(fd: int) -> Optional[int]:
    try:
        return os.dup(fd)
    except OSError:
        return None


def _shed_batch(listener: socket.socket, spare=None) -> int:
    """Accept and close up to BATCH waiting connections. spare: (free, take) to release a
    spare descriptor before each accept() (False: none to release) and take it back after;
    None where the table has room."""
    shed = 0
    while shed < BATCH:
        if spare is not None and not spare[0]():
            break  # nothing to shed with until a descriptor is free
        try:
            conn, _ = listener.accept()
        except ConnectionAbortedError:
            conn = None  # gone before we got to it: next
        except OSError:
            conn = False  # BlockingIOError: none left waiting (or libmilter took it)
        if conn:
            conn.close()
            shed += 1
        if spare is not None:
            spare[1]()
        if conn is False:
            break
    return shed


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
                os.write(answer_w, bytes([_shed_batch(listener)]))
        except Exception:
            pass  # the guard sees the pipe close and stops; never a traceback from here
        finally:
            listener.close()
            os.close(request_r)
            os.close(answer_w)


def connect_once(sock: socket.socket) -> bool:
    """Open and close one connection to the listening socket sock (its wildcard address
    as loopback); False if that failed."""
    address = sock.getsockname()
    if sock.family == socket.AF_INET and address[0] == "0.0.0.0":
        address = ("127.0.0.1", address[1])
    elif sock.family == socket.AF_INET6 and address[0] == "::":
        address = ("::1",) + tuple(address[1:])
    try:
        with socket.socket(sock.family, socket.SOCK_STREAM) as client:
            client.settimeout(0.2)
            client.connect(address)
    except OSError:
        return False
    return True


def quiet_listener() -> socket.socket:
    """A listening unix socket (abstract, autobound) nobody connects to."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("")  # Linux autobinds an abstract address
        sock.listen(1)
        sock.setblocking(False)  # libmilter may call accept() on it after a poll() on the real one
    except OSError:
        sock.close()
        raise
    return sock


class ParkedShedder:
    """Sheds in the shared table: parks libmilter's descriptor on a quiet socket first."""

    mode = "libmilter's listener parked on a quiet socket"

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._identity = identity(fd)
        self.real = socket.socket(fileno=os.dup(fd))  # our own reference to the real listener
        self.quiet: Optional[socket.socket] = quiet_listener()
        self.parked: Optional[socket.socket] = None  # the quiet socket libmilter polls now
        self.waking: Optional[socket.socket] = None  # a former one libmilter may still be polling
        self._poke_real = False  # libmilter's poll() needs a wake-up from the real listener
        self._spare = _dup(self.real.fileno())

    @property
    def watched(self) -> int:
        return self.real.fileno()

    def listener_closed(self) -> bool:
        now = identity(self.fd)
        if self.parked is not None:
            return now != identity(self.parked.fileno())
        return now != self._identity

    def shed(self) -> Optional[int]:
        if self.parked is None:
            if self.quiet is None:
                return 0
            # Between the caller's listener_closed() and this dup2 libmilter could have closed
            # its descriptor (stopping) and another thread reused the number: a window of
            # microseconds, at shutdown, out of descriptors.
            os.dup2(self.quiet.fileno(), self.fd, inheritable=False)
            self.parked, self.quiet = self.quiet, None
        return _shed_batch(self.real, (self._free_spare, self._take_spare))

    def _free_spare(self) -> bool:
        if self._spare is None:
            self._spare = _dup(self.real.fileno())
        if self._spare is None:
            return False
        os.close(self._spare)
        self._spare = None
        return True

    def _take_spare(self) -> None:
        self._spare = _dup(self.real.fileno())

    def relax(self) -> None:
        """Descriptors are free: give libmilter the real listener back and wake its poll()."""
        if self.parked is not None:
            os.dup2(self.real.fileno(), self.fd, inheritable=False)
            if self.waking is not None:
                self.waking.close()
            self.waking, self.parked = self.parked, None
            self._poke_real = True
        # Real listener first: a poll() registered on either socket then finds it readable.
        # Failing that, again next time; libmilter looks by itself within 5 s anyway.
        if self._poke_real:
            if not connect_once(self.real):
                return
            self._poke_real = False  # libmilter accepts it, reads EOF, closes it
        if self.waking is not None:
            if not connect_once(self.waking):
                return
            self.waking.close()  # its queue goes with it once libmilter's poll() lets go
            self.waking = None
        if self.quiet is None:
            try:
                self.quiet = quiet_listener()
            except OSError:
                pass
        if self._spare is None:
            self._take_spare()

    def close(self) -> None:
        if self.parked is not None and not self.listener_closed():
            self.relax()
        for sock in (self.real, self.quiet, self.parked, self.waking):
            if sock is not None:
                sock.close()
        if self._spare is not None:
            os.close(self._spare)


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
