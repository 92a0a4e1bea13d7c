"""Cache control of the running daemon, through a unix socket beside its PID file
(``/run/stsmilter/stsmilter.ctl`` for ``/run/stsmilter/stsmilter.pid``).

`stsmilter cache list` asks the daemon what it serves, and `stsmilter cache purge` tells
it what to forget after removing it from the store (with [cache] redis, every daemon
sharing Redis also hears the purge from Redis: fleet.py).

Protocol: one request per connection, one line of ASCII; the answer ends the connection.
    list              -> one JSON object per policy served, then "end N"
    purge DOMAIN...   -> "purged N" (policies memory held), or "error TEXT"
    purge-all         -> "purged N"

The socket is input like any other: mode 0600 (the service user; root may connect too,
and no other peer is served: SO_PEERCRED), one connection served at a time, a request
of at most 64 KiB read within 5 s, an answer written within 30 s, then closed. A bad
request gets one "error" line and a log line at most once a minute; never a traceback.
Out of file descriptors, accept() is retried every 0.5 s and each failure counted, with
one line a minute, as for the other listeners (descriptors.out_of_descriptors).
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from typing import Iterator, List, Optional

from stsmilter.engine.policy import is_normalized_domain
from stsmilter.unixsocket import chmod_socket
from stsmilter.ratelog import RateLimitedLog

log = logging.getLogger("stsmilter.control")

MAX_REQUEST = 64 * 1024
REQUEST_SECONDS = 5.0
ANSWER_SECONDS = 30.0
SOCKET_MODE = 0o600
CHUNK = 64 * 1024


def control_path(pidfile: str) -> str:
    """The control socket beside the PID file ("" without one)."""
    if not pidfile:
        return ""
    return (pidfile[:-4] if pidfile.endswith(".pid") else pidfile) + ".ctl"


def iso_time(epoch: Optional[float]) -> Optional[str]:
    """A time as the CLI's JSON shows it (UTC, seconds), None as None."""
    if epoch is None:
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat(timespec="seconds")


def entry_row(entry) -> dict:
    """A policy as `stsmilter cache list --json` shows it."""
    return {
        "domain": entry.domain,
        "id": entry.policy_id,
        "mode": entry.policy.mode,
        "mx": list(entry.policy.mx),
        "fetched": iso_time(entry.fetched_at),
        "expires": iso_time(entry.expires),
        "refresh_failures": entry.refresh_failures,
        "last_error": entry.last_error,
    }


class BadRequest(Exception):
    """str() is the text of the "error" answer."""


def parse_request(line: bytes):
    """(op, domains) from one request line; BadRequest says what is wrong."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("not ASCII") from None
    words = text.split()
    if not words:
        raise BadRequest("empty request")
    op, args = words[0], words[1:]
    if op in ("list", "purge-all"):
        if args:
            raise BadRequest(f"{op} takes no argument")
        return op, []
    if op != "purge":
        raise BadRequest(f"unknown request {op[:20]!r}")
    if not args:
        raise BadRequest("purge needs a domain")
    for domain in args:
        if not is_normalized_domain(domain):
            raise BadRequest(f"not a normalized domain: {domain[:80]!r}")
    return op, args


class ControlServer:
    def __init__(self, path: str, cache) -> None:
        self.path = path
        self.cache = cache
        self._listener: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._log = RateLimitedLog(log)
        self._inode = None  # (st_dev, st_ino) of the socket we bound: only that one is removed
        from stsmilter import descriptors  # the daemon's side only (metrics); the CLI needs request()

        self._descriptors = descriptors

    def start(self) -> None:
        """Bind (replacing a stale socket file; preflight refused anything else there),
        0600 before listen(), then serve on a thread. OSError if it cannot."""
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)  # we hold the PID file: no other daemon of ours is using it
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
            chmod_socket(self.path, SOCKET_MODE)  # no connection is accepted before listen()
            st = os.lstat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            listener.listen(8)
            listener.settimeout(0.5)  # how soon the loop notices stop()
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, name="sts-control", daemon=True)
        self._thread.start()
        log.info("cache control on %s", self.path)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
            except OSError:
                pass

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    self._descriptors.out_of_descriptors("control")
                else:
                    self._log.log("accept", logging.WARNING, "cache control %s: accept failed: %s", self.path, e)
                self._stopping.wait(0.5)
                continue
            with conn:
                try:
                    self._handle(conn)
                except Exception as e:  # a client that goes away, a timeout, a bug: one line
                    self._log.log(("request", type(e).__name__), logging.WARNING,
                                  "cache control %s: request failed: %s: %s", self.path, type(e).__name__, e)

    def _handle(self, conn: socket.socket) -> None:
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
        if uid not in (0, os.geteuid()):
            raise PermissionError(f"uid {uid} may not control the cache")
        try:
            op, domains = parse_request(self._read_line(conn, time.monotonic() + REQUEST_SECONDS))
        except BadRequest as e:
            self._send(conn, [f"error {e}\n"], time.monotonic() + REQUEST_SECONDS)
            self._drain(conn)
            raise
        self._send(conn, self._answer(op, domains), time.monotonic() + ANSWER_SECONDS)

    @staticmethod
    def _drain(conn: socket.socket) -> None:
        """Read (a bounded amount of) what the client still sends, so that closing does
        not reset the connection before it has read our error line."""
        conn.shutdown(socket.SHUT_WR)
        deadline, left = time.monotonic() + 0.5, MAX_REQUEST
        try:
            while left > 0 and time.monotonic() < deadline:
                conn.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = conn.recv(min(left, CHUNK))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    @staticmethod
    def _read_line(conn: socket.socket, deadline: float) -> bytes:
        data = b""
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no complete request in time")
            conn.settimeout(remaining)
            chunk = conn.recv(MAX_REQUEST + 1 - len(data))
            if not chunk:
                raise ConnectionError("closed before a complete request")
            data += chunk
            if len(data) > MAX_REQUEST:
                raise BadRequest(f"request longer than {MAX_REQUEST} bytes")
        return data.partition(b"\n")[0]

    def _answer(self, op: str, domains: List[str]) -> Iterator[str]:
        if op == "list":
            entries = self.cache.snapshot()
            for entry in entries:
                yield json.dumps(entry_row(entry), separators=(",", ":")) + "\n"
            yield f"end {len(entries)}\n"
            return
        if op == "purge-all":
            dropped = self.cache.forget_all()
            log.info("cache: all %d policies purged (stsmilter cache purge --all)", dropped)
        else:
            dropped = sum(1 for domain in domains if self.cache.forget(domain))
            log.info("cache: purged %s (stsmilter cache purge)", " ".join(domains[:10]) + (" ..." if len(domains) > 10 else ""))
        yield f"purged {dropped}\n"

    @staticmethod
    def _send(conn: socket.socket, lines, deadline: float) -> None:
        buffer: List[str] = []
        size = 0

        def flush() -> None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the client does not read its answer")
            conn.settimeout(remaining)
            conn.sendall("".join(buffer).encode("ascii", "replace"))

        for line in lines:
            buffer.append(line)
            size += len(line)
            if size >= CHUNK:
                flush()
                buffer, size = [], 0
        if buffer:
            flush()


class NoDaemon(Exception):
    """Nothing listens on the control socket: no daemon runs with this PID file."""


def request(path: str, line: str, timeout: float = 30.0) -> Iterator[str]:
    """Send one request to the daemon's control socket; yield the answer's lines.
    NoDaemon if nothing listens there; OSError for other failures."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NoDaemon(path) from None
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise NoDaemon(path) from None
            raise
        sock.sendall(line.encode("ascii") + b"\n")
        buffered = b""
        while True:
            chunk = sock.recv(CHUNK)
            if not chunk:
                break
            buffered += chunk
            *lines, buffered = buffered.split(b"\n")
            for raw in lines:
                yield raw.decode("ascii", "replace")
        if buffered:
            yield buffered.decode("ascii", "replace")
    finally:
        sock.close()
