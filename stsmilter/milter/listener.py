"""libmilter's listening socket, seen from Python: found in /proc/self/fd, probed for
descriptors left, and drained (accept and close) by the milter guard (shed.py)."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
from typing import Optional, Tuple

BATCH = 64  # connections shed before the guard checks the descriptors again (< 256: one byte)
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


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


def dup_or_none(fd: int) -> Optional[int]:
    try:
        return os.dup(fd)
    except OSError:
        return None


def shed_batch(listener: socket.socket, spare=None) -> int:
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
