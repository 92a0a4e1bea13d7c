"""The PID file ([daemon] pidfile), written by the service user after the privilege drop.

It is never opened through a symlink: it is read with O_NOFOLLOW, written to a fresh
temporary name (O_CREAT|O_EXCL|O_NOFOLLOW) in its own directory and renamed over the
final name (rename replaces a symlink, it does not follow it). A PID that is alive but
not a stsmilter process (a stale file whose PID was reused) does not count as running.
It is removed at exit only if it still holds our PID.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from stsmilter.service.preflight import StartupError

log = logging.getLogger("stsmilter")


def read_pid(path: str) -> Optional[int]:
    """The PID in path; None if absent, unreadable, a symlink or not a PID."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = os.read(fd, 64)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        pid = int(text.strip() or b"0")
    except ValueError:
        return None
    return pid if pid > 0 else None


def is_stsmilter(pid: int) -> bool:
    """Is pid a live stsmilter process? Run as a script (bin/stsmilter, comm stsmilter)
    or as `python -m stsmilter`, its first arguments name stsmilter."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")[:3]
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell (e.g. /proc mounted hidepid): assume it is
    return any(os.path.basename(arg) == b"stsmilter" for arg in args)


class Pidfile:
    def __init__(self, path: str) -> None:
        self.path = path

    def write(self) -> None:
        if not self.path:
            return
        old = read_pid(self.path)
        if old is not None and old != os.getpid():
            if is_stsmilter(old):
                raise StartupError(f"already running as pid {old} ({self.path})")
            log.info("%s: pid %d is gone or another program: replacing the stale file", self.path, old)
        directory, name = os.path.split(os.path.abspath(self.path))
        tmp = os.path.join(directory, f".{name}.{os.getpid()}")
        try:
            try:
                os.unlink(tmp)  # left over by a crashed daemon that had our pid
            except FileNotFoundError:
                pass
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StartupError(f"[daemon] pidfile = {self.path}: cannot write: {e.strerror}") from None

    def remove(self) -> None:
        """Unlink the file if it is still ours (a successor may have replaced it)."""
        if self.path and read_pid(self.path) == os.getpid():
            try:
                os.unlink(self.path)
            except OSError:
                pass
