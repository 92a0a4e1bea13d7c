"""The milter guard's fallback where unshare(CLONE_FILES) is refused (Docker's default
seccomp profile refuses it without CAP_SYS_ADMIN): ParkedShedder sheds in the shared
descriptor table, libmilter's descriptor parked on a quiet socket meanwhile (shed.py's
docstring says how and why)."""

from __future__ import annotations

import os
import socket
from typing import Optional

from stsmilter.milter.listener import connect_once, dup_or_none, identity, shed_batch


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
        self._spare = dup_or_none(self.real.fileno())

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
        return shed_batch(self.real, (self._free_spare, self._take_spare))

    def _free_spare(self) -> bool:
        if self._spare is None:
            self._spare = dup_or_none(self.real.fileno())
        if self._spare is None:
            return False
        os.close(self._spare)
        self._spare = None
        return True

    def _take_spare(self) -> None:
        self._spare = dup_or_none(self.real.fileno())

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
