"""Broken destinations at scale (issue 19): the world and the clients shared by
bench/slow_destinations.py and tests/service/test_fairness.py, so that the two cannot drift.

The world runs in a forked child process (SlowWorld): the loopback DNS server, the HTTPS
policy server and a "TLS black hole" (HangListener: accepts TCP, reads the ClientHello,
never answers). In the test's or the bench's own process their per-query Python work
would share a GIL with the clients that measure latency.

* dead domains: every query for ``<d>``, ``_mta-sts.<d>`` and ``mta-sts.<d>`` is dropped
  (the resolver times out);
* hanging domains: TXT ``v=STSv1; id=...`` and ``mta-sts.<d>`` A -> the black hole's
  address (127.0.0.2, on the policy server's port): the TCP connection is accepted and
  the TLS handshake never completes;
* dripping domains: a valid policy served one byte every ``interval`` seconds;
* good domains: enforce policy, MX host matching, working DNS and HTTPS.

Clients, each in a forked process of its own and each connection with one request in
flight, as Postfix's socketmap client: BurstClient (many connections, one request each
per round), CachedLoop (a few connections asking pre-warmed domains at a steady pace,
latency of each answer). ask_at() asks one domain at a given instant from the calling
process; ProcSampler reads a daemon's threads and RSS from /proc.

Fork before starting threads: every forked process here is created while the caller
runs no thread of its own (ProcSampler's thread lives only inside run_burst(), after
the forks).
"""

from __future__ import annotations

import array
import collections
import contextlib
import dataclasses
import errno
import multiprocessing
import os
import selectors
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import dns.name
import dns.rdatatype

from world.dns_server import DnsServer

LOOPBACK = "127.0.0.1"
BLACK_HOLE = "127.0.0.2"  # the hanging policy hosts' address: one listener holds them all
ZONE = "slow.test"
UDP_RCVBUF = 8 << 20  # a burst of a thousand queries must not overflow the DNS server's socket
SOCKETMAP_NAME = b"postfix"


def domains(kind: str, count: int, start: int = 0) -> List[str]:
    """count distinct names of one kind (dead, hang, drip, warm, fresh...): kind00042.slow.test."""
    return [f"{kind}{i:05d}.{ZONE}" for i in range(start, start + count)]


def interleave(*groups: Sequence[str]) -> List[str]:
    """The names of every group, each group spread evenly over the result (1000 dead and
    150 hanging: a hanging one about every 7.7), so that a burst starts them together
    rather than one kind after the other (a FIFO pool would see only the first kind)."""
    keyed = [(i / len(group), k, name) for k, group in enumerate(groups) for i, name in enumerate(group)]
    return [name for _, _, name in sorted(keyed)]


def request(domain: str) -> bytes:
    payload = SOCKETMAP_NAME + b" " + domain.encode()
    return b"%d:%s," % (len(payload), payload)


def _take_replies(buffer: bytearray) -> List[bytes]:
    """The complete netstring payloads at the start of buffer (removed from it)."""
    replies = []
    while True:
        colon = buffer.find(b":")
        if colon <= 0:
            return replies
        end = colon + 1 + int(buffer[:colon])
        if len(buffer) <= end:
            return replies
        if buffer[end] != 44:  # ","
            raise ValueError(f"bad netstring from the socketmap: {bytes(buffer[:80])!r}")
        replies.append(bytes(buffer[colon + 1:end]))
        del buffer[:end + 1]


def raise_open_files(wanted: int) -> int:
    """Raise this process's RLIMIT_NOFILE (soft, and hard if need be and allowed) to at
    least wanted; the soft limit in force afterwards."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    new_hard = hard if hard == resource.RLIM_INFINITY or hard >= wanted else wanted
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, new_hard))
        return wanted
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def die_with_parent() -> None:
    """SIGTERM this process when the one that started it dies (even by SIGKILL): nothing
    started here outlives a killed test run or benchmark."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def open_files_limit(count: int):
    """A preexec_fn for a daemon: RLIMIT_NOFILE = count, soft and hard (as systemd's
    LimitNOFILE=count; the shipped unit says 8192), and die_with_parent()."""

    def preexec():
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))
        die_with_parent()

    return preexec


# --------------------------------------------------------------------------- the servers


class _TimedLog(list):
    """DnsServer's query log, also noting when each name was first asked
    (time.monotonic(): one clock for every process on the machine)."""

    def __init__(self, first_seen: Dict[str, float]):
        super().__init__()
        self.first_seen = first_seen

    def append(self, query):
        super().append(query)
        self.first_seen.setdefault(query[0], time.monotonic())


class IndexedDnsServer(DnsServer):
    """DnsServer fit for bursts of thousands of queries, so that the world is not what
    delays a good domain's answers:

    * "does this name exist" is a set lookup: the base class scans the whole zone (under
      its lock) for every NODATA/NXDOMAIN answer, ~6 ms with a few thousand names, which
      a thousand AAAA queries would turn into seconds of delay for every other query;
    * UDP queries are answered in the receiving thread unless some name is delayed: a
      thread per query (the base class, so that a delayed name holds up no other) drains
      only ~6000 queries/s, and a burst of 2000 kept a good query waiting 0.3-0.45 s;
    * a query for a name dropped whatever its type (drop(name)) is logged and dropped
      from its raw bytes, without parsing it: a thousand dead domains' queries and their
      retries would otherwise cost the server more CPU than the good domain's answers;
    * a large UDP receive buffer;
    * first_seen: name -> when it was first asked."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._existing = set()  # every owner name and all its ancestors
        self._dropped_wire: Dict[bytes, str] = {}  # lower-case wire-format name -> its log name
        self.first_seen: Dict[str, float] = {}
        self.queries = _TimedLog(self.first_seen)

    def drop(self, name, rtype=None):
        super().drop(name, rtype)
        if rtype is None:
            qname = name if isinstance(name, dns.name.Name) else dns.name.from_text(name)
            with self._lock:
                self._dropped_wire[qname.to_wire().lower()] = qname.to_text(omit_final_dot=True).lower()

    def _drop_quietly(self, wire: bytes) -> bool:
        """True (and the query logged) if wire asks for a name dropped whatever its type."""
        end = wire.find(b"\0", 12)  # the question's name: labels up to the root's zero byte
        if end < 0 or len(wire) < end + 5:
            return False
        name = self._dropped_wire.get(wire[12:end + 1].lower())
        if name is None:
            return False
        rdtype = int.from_bytes(wire[end + 1:end + 3], "big")
        with self._lock:
            self.queries.append((name, dns.rdatatype.to_text(rdtype), "udp"))
        return True

    def add(self, name, rtype, value, ttl=300):
        super().add(name, rtype, value, ttl)
        owner = name if isinstance(name, dns.name.Name) else dns.name.from_text(name)
        with self._lock:
            while owner not in self._existing:
                self._existing.add(owner)
                if owner == dns.name.root:
                    break
                owner = owner.parent()

    def remove(self, name, rtype=None):
        super().remove(name, rtype)
        self._reindex()

    def clear(self):
        super().clear()
        self._reindex()

    def _reindex(self):
        with self._lock:
            self._existing = set()
            for owner, _ in self._records:
                while owner not in self._existing:
                    self._existing.add(owner)
                    if owner == dns.name.root:
                        break
                    owner = owner.parent()

    def _exists(self, name):
        return name in self._existing

    def start(self):
        super().start()
        for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
            if option is not None:
                with contextlib.suppress(OSError):
                    self._udp.setsockopt(socket.SOL_SOCKET, option, UDP_RCVBUF)
                    break
        return self

    def _serve_udp(self):
        while not self._stopping.is_set():
            try:
                wire, peer = self._udp.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            if self._dropped_wire and self._drop_quietly(wire):
                continue
            if self._delays:  # a slowed name must not hold up the others: a thread per query
                self._spawn(self._answer_udp, wire, peer)
            else:
                self._answer_udp(wire, peer)

    def query_count(self, wanted: Sequence[str]) -> int:
        """Queries logged for these domains, their _mta-sts. and mta-sts. names (and any
        other name one label below them)."""
        wanted = set(wanted)
        with self._lock:
            names = [q[0] for q in self.queries]
        counts = collections.Counter(names)
        return sum(n for name, n in counts.items() if name in wanted or name.partition(".")[2] in wanted)


def _timed_https_server():
    from world.https_server import HttpsServer

    class TimedHttpsServer(HttpsServer):
        """HttpsServer noting when each host's first policy request was read."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.first_request: Dict[str, float] = {}

        def _read_request(self, sock):
            request = super()._read_request(sock)
            if request is not None:
                with self._lock:
                    self.first_request.setdefault(self._sni.host, time.monotonic())
            return request

    return TimedHttpsServer


class HangListener:
    """A TLS black hole: accepts TCP connections on (address, port), reads what the
    client sends (a ClientHello) and never answers. One thread and a selector hold
    thousands of connections. Counts accepted connections and those still open."""

    def __init__(self, address: str = BLACK_HOLE, port: int = 0):
        self.address, self.port = address, port
        self.accepted = 0
        self._open: Dict[int, socket.socket] = {}
        self._lock = threading.Lock()
        self._listener = self._thread = None
        self._wake_r = self._wake_w = None

    def start(self) -> "HangListener":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.address, self.port))
            listener.listen(4096)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener, self.port = listener, listener.getsockname()[1]
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name="hang-listener", daemon=True)
        self._thread.start()
        return self

    def stats(self) -> Tuple[int, int]:
        """(connections accepted so far, connections open now)."""
        with self._lock:
            return self.accepted, len(self._open)

    def stop(self) -> None:
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:
            for conn in self._open.values():
                conn.close()
            self._open.clear()
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                os.close(fd)
        self._wake_r = self._wake_w = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ, "accept")
            selector.register(self._wake_r, selectors.EVENT_READ, "stop")
            while True:
                for key, _ in selector.select():
                    if key.data == "stop":
                        return
                    if key.data == "accept":
                        self._accept(selector)
                    else:
                        self._read(selector, key.fileobj)

    def _accept(self, selector) -> None:
        for _ in range(1024):
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of descriptors: leave it in the backlog
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return
                raise
            conn.setblocking(False)
            with self._lock:
                self.accepted += 1
                self._open[conn.fileno()] = conn
            selector.register(conn, selectors.EVENT_READ, "conn")

    def _read(self, selector, conn) -> None:
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            return  # the ClientHello (or anything else): never answered
        selector.unregister(conn)
        with self._lock:
            self._open.pop(conn.fileno(), None)
        conn.close()


class _WorldImpl:
    """Lives in the world process."""

    def __init__(self, root: str, https_port: int, black_hole: str):
        from world.fixtures_sts import StsWorld

        self.dns = IndexedDnsServer()
        self.https = None
        self.hang = None
        try:
            self.dns.start()
            self.https, self.hang = self._policy_servers(https_port, black_hole)
        except BaseException:
            self.stop()
            raise
        self.sts = StsWorld(self.dns, self.https, Path(root))

    @staticmethod
    def _policy_servers(https_port, black_hole):
        """The HTTPS server on 127.0.0.1:P and the black hole on black_hole:P (one port:
        the daemon fetches every policy from [fetch] port)."""
        HttpsServer = _timed_https_server()
        for _ in range(20):
            hang = HangListener(black_hole, https_port).start()
            https = HttpsServer(port=hang.port)
            try:
                https.start()
            except BaseException as e:
                https.stop()
                hang.stop()
                if https_port or not isinstance(e, OSError):
                    raise
                continue  # the black hole's port is taken on 127.0.0.1: another one
            return https, hang
        raise OSError("no port free on both 127.0.0.1 and %s" % black_hole)

    def info(self) -> dict:
        return {"dns_port": self.dns.port, "https_port": self.https.port, "ca_file": self.https.ca_file,
                "black_hole": self.hang.address}

    def publish_good(self, names: Sequence[str], mode: str = "enforce") -> None:
        for index, domain in enumerate(names):
            self.sts.publish(domain, policy_id=f"good{index}", mode=mode)

    def publish_dead(self, names: Sequence[str]) -> None:
        for domain in names:
            for name in (domain, f"_mta-sts.{domain}", f"mta-sts.{domain}"):
                self.dns.drop(name)

    def publish_hang(self, names: Sequence[str]) -> None:
        for index, domain in enumerate(names):
            self.dns.add(f"_mta-sts.{domain}", "TXT", f"v=STSv1; id=hang{index}")
            self.dns.add(f"mta-sts.{domain}", "A", self.hang.address)
            self.dns.add(domain, "MX", f"10 mx.{domain}.")
            self.dns.add(f"mx.{domain}", "A", LOOPBACK)

    def publish_drip(self, names: Sequence[str], interval: float) -> None:
        for index, domain in enumerate(names):
            self.sts.publish(domain, policy_id=f"drip{index}", drip=interval)

    def config_text(self, cache_path: str, sections: dict) -> str:
        return self.sts.config_text(cache_path=cache_path, **sections)

    def dns_queries(self, names: Sequence[str]) -> int:
        return self.dns.query_count(names)

    def dns_errors(self) -> List[str]:
        return [repr(e) for e in self.dns.errors]

    def hang_stats(self) -> Tuple[int, int]:
        return self.hang.stats()

    def https_requests(self, names: Sequence[str]) -> int:
        return sum(self.https.count(f"mta-sts.{d}") for d in names)

    def https_connections(self) -> int:
        return self.https.connections

    def timeline(self, domain: str) -> Dict[str, Optional[float]]:
        """When the daemon's lookup of a good domain reached the servers (monotonic): its
        TXT query, the policy host's A query, the policy request, the MX query (DANE)."""
        seen = self.dns.first_seen
        with self.https._lock:
            request = self.https.first_request.get(f"mta-sts.{domain}")
        return {"TXT": seen.get(f"_mta-sts.{domain}"), "A": seen.get(f"mta-sts.{domain}"), "policy": request,
                "MX": seen.get(domain)}

    def stop(self) -> None:
        for server in (self.hang, self.https, self.dns):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()


def _world_main(conn, root: str, https_port: int, black_hole: str) -> None:
    import tempfile

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us

    def on_term(signum, frame):
        raise SystemExit(1)

    signal.signal(signal.SIGTERM, on_term)
    die_with_parent()
    tempfile.tempdir = root  # the HTTPS server's CA directory lives in the caller's temp dir
    world = None
    try:
        try:
            world = _WorldImpl(root, https_port, black_hole)
        except Exception as e:  # noqa: BLE001 - reported to the parent
            conn.send(("error", f"{type(e).__name__}: {e}"))
            return
        conn.send(("ok", world.info()))
        while True:
            method, args = conn.recv()
            if method == "stop":
                conn.send(("ok", None))
                return
            try:
                conn.send(("ok", getattr(world, method)(*args)))
            except Exception as e:  # noqa: BLE001 - reported to the parent
                conn.send(("error", f"{type(e).__name__}: {e}"))
    except (EOFError, OSError, KeyboardInterrupt):
        pass
    finally:
        if world is not None:
            world.stop()


def receive(conn, timeout: float, who: str, waiting_for: str = "answer"):
    """The value a child process sent as ("ok", value); its error, death or silence raised."""
    if not conn.poll(timeout):
        raise TimeoutError(f"the {who} did not {waiting_for}")
    try:
        status, value = conn.recv()
    except EOFError:
        raise RuntimeError(f"the {who} died") from None
    if status != "ok":
        raise RuntimeError(f"{who}: {value}")
    return value


class SlowWorld:
    """The world in a forked child; every method is a call into it. start() before the
    caller starts threads; stop() always (it kills the child if it does not stop)."""

    def __init__(self, root, https_port: int = 0, black_hole: str = BLACK_HOLE):
        self.root = str(root)
        self.https_port_wanted = https_port
        self.black_hole = black_hole
        self.proc = self.conn = None
        self.dns_port = self.https_port = self.ca_file = None

    def start(self, timeout: float = 30.0) -> "SlowWorld":
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_world_main, args=(child, self.root, self.https_port_wanted, self.black_hole),
                                daemon=True, name="slow-world")
        self.proc.start()
        child.close()
        info = self._reply(timeout)
        self.dns_port, self.https_port, self.ca_file = info["dns_port"], info["https_port"], info["ca_file"]
        return self

    def _reply(self, timeout: float):
        return receive(self.conn, timeout, "world process")

    def call(self, method: str, *args, timeout: float = 60.0):
        self.conn.send((method, args))
        return self._reply(timeout)

    def publish_good(self, names, mode="enforce"):
        return self.call("publish_good", list(names), mode)

    def publish_dead(self, names):
        return self.call("publish_dead", list(names))

    def publish_hang(self, names):
        return self.call("publish_hang", list(names))

    def publish_drip(self, names, interval):
        return self.call("publish_drip", list(names), interval)

    def config_text(self, cache_path, **sections):
        return self.call("config_text", str(cache_path), sections)

    def dns_queries(self, names) -> int:
        return self.call("dns_queries", list(names))

    def dns_errors(self) -> List[str]:
        return self.call("dns_errors")

    def hang_stats(self) -> Tuple[int, int]:
        return tuple(self.call("hang_stats"))

    def https_requests(self, names) -> int:
        return self.call("https_requests", list(names))

    def timeline(self, domain) -> Dict[str, Optional[float]]:
        return self.call("timeline", domain)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.is_alive():
                with contextlib.suppress(Exception):
                    self.call("stop", timeout=10)
            self.proc.join(timeout=15)
        finally:
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(timeout=5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(timeout=5)
            self.conn.close()
            self.proc = None


# --------------------------------------------------------------------------- clients


def _child_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent cleans up
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent()


def _connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _ask_all(socks: List[socket.socket], names: Sequence[str], start_at: float, timeout: float):
    """One request per connection, sent at start_at, replies read until timeout.
    [(reply or None, seconds or None)] in the order of names; a connection whose reply
    did not come (or that was closed) is replaced by the caller."""
    now = time.monotonic()
    if start_at > now:
        time.sleep(start_at - now)
    results: List[Tuple[Optional[bytes], Optional[float]]] = [(None, None)] * len(names)
    sent = [0.0] * len(names)
    perf = time.perf_counter
    for i, name in enumerate(names):
        sent[i] = perf()
        socks[i].sendall(request(name))
    deadline = perf() + timeout
    buffers = {i: bytearray() for i in range(len(names))}
    with selectors.DefaultSelector() as selector:
        for i in range(len(names)):
            socks[i].setblocking(False)
            selector.register(socks[i], selectors.EVENT_READ, i)
        try:
            while buffers:
                left = deadline - perf()
                if left <= 0:
                    break
                for key, _ in selector.select(min(left, 1.0)):
                    i = key.data
                    try:
                        chunk = key.fileobj.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        chunk = b""
                    now = perf()
                    if not chunk:
                        results[i] = (b"<closed>", now - sent[i])
                        selector.unregister(key.fileobj)
                        del buffers[i]
                        continue
                    buffers[i] += chunk
                    replies = _take_replies(buffers[i])
                    if replies:
                        results[i] = (replies[0], now - sent[i])
                        selector.unregister(key.fileobj)
                        del buffers[i]
        finally:
            for i in range(len(names)):
                socks[i].setblocking(True)
    return results


def _burst_main(conn, port: int, count: int) -> None:
    _child_signals()
    socks: List[socket.socket] = []
    try:
        try:
            for _ in range(count):
                socks.append(_connect(port))
        except OSError as e:
            conn.send(("error", f"connected {len(socks)} of {count}: {e}"))
            return
        conn.send(("ok", None))
        while True:
            cmd, args = conn.recv()
            if cmd == "stop":
                return
            names, start_at, timeout = args
            results = _ask_all(socks, names, start_at, timeout)
            for i, (reply, _) in enumerate(results):
                if reply is None or reply == b"<closed>":  # a late reply must not answer the next round
                    socks[i].close()
                    socks[i] = _connect(port)
            conn.send(("ok", [(names[i], reply, seconds) for i, (reply, seconds) in enumerate(results)]))
    except (EOFError, OSError, KeyboardInterrupt) as e:
        with contextlib.suppress(Exception):
            conn.send(("error", repr(e)))
    finally:
        for sock in socks:
            sock.close()


class BurstClient:
    """`connections` socketmap connections in a forked process, opened at start(); each
    round asks one domain per connection, all sent at one instant."""

    def __init__(self, port: int, connections: int):
        self.port, self.connections = port, connections
        self.proc = self.conn = None
        self._asked_at = None

    def start(self, timeout: float = 60.0) -> "BurstClient":
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_burst_main, args=(child, self.port, self.connections), daemon=True,
                                name="burst-client")
        self.proc.start()
        child.close()
        self._result(timeout)
        return self

    def ask(self, names: Sequence[str], start_at: float, timeout: float) -> None:
        """Start a round (returns at once; result() collects it)."""
        if len(names) > self.connections:
            raise ValueError(f"{len(names)} domains for {self.connections} connections")
        self._asked_at = (start_at, timeout)
        self.conn.send(("ask", (list(names), start_at, timeout)))

    def result(self, timeout: Optional[float] = None) -> List[Tuple[str, Optional[bytes], Optional[float]]]:
        """[(domain, reply payload or None, seconds or None)] of the round."""
        if timeout is None:
            start_at, ask_timeout = self._asked_at
            timeout = max(0.0, start_at - time.monotonic()) + ask_timeout + 60.0
        return self._result(timeout)

    def _result(self, timeout: float):
        return receive(self.conn, timeout, "burst client", "report")

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            self.conn.send(("stop", None))
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.conn.close()
        self.proc = None


def _cached_main(conn, port: int, names: Sequence[str], connections: int, interval: float, start_at: float,
                 end_at: float) -> None:
    """Each connection asks the next of names every `interval` seconds (at once if its
    last answer came later than that), from start_at until told to stop or end_at."""
    _child_signals()
    socks = []
    try:
        for _ in range(connections):
            socks.append(_connect(port))
        conn.send(("ok", None))
        lat = array.array("d")
        kinds = collections.Counter()
        perf, mono = time.perf_counter, time.monotonic
        now = mono()
        if start_at > now:
            time.sleep(start_at - now)
        with selectors.DefaultSelector() as selector:
            selector.register(conn.fileno(), selectors.EVENT_READ, None)
            state = []  # [socket, next send (perf), sent at or None, buffer, index]
            base = perf()
            for i, sock in enumerate(socks):
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ, i)
                state.append([sock, base + interval * i / connections, None, bytearray(), i])
            stop = False
            while not stop and mono() < end_at:
                now = perf()
                for entry in state:
                    if entry[2] is None and entry[1] <= now:
                        entry[2] = perf()
                        entry[0].send(request(names[entry[4] % len(names)]))
                        entry[4] += connections
                waits = [entry[1] - now for entry in state if entry[2] is None]
                for key, _ in selector.select(max(0.0, min(waits, default=0.05))):
                    if key.data is None:
                        stop = True
                        continue
                    entry = state[key.data]
                    chunk = entry[0].recv(65536)
                    if not chunk:
                        raise ConnectionError("the socketmap closed a cached-lookup connection")
                    entry[3] += chunk
                    replies = _take_replies(entry[3])
                    if replies:
                        done = perf()
                        lat.append(done - entry[2])
                        kinds[replies[0].split(b" ", 1)[0].decode(errors="replace")] += 1
                        entry[1] = max(done, entry[2] + interval)
                        entry[2] = None
        if not stop:
            conn.recv()  # wait for the parent's stop, whatever ended the loop
        conn.send(("ok", (lat.tolist(), dict(kinds))))
    except (EOFError, OSError, KeyboardInterrupt) as e:
        with contextlib.suppress(Exception):
            conn.send(("error", repr(e)))
    finally:
        for sock in socks:
            sock.close()


class CachedLoop:
    """Pre-warmed domains asked at a steady pace on their own connections (forked process)."""

    def __init__(self, port: int, names: Sequence[str], connections: int = 4, interval: float = 0.01):
        self.args = (port, list(names), connections, interval)
        self.proc = self.conn = None

    def start(self, start_at: float, end_at: float, timeout: float = 30.0) -> "CachedLoop":
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_cached_main, args=(child, *self.args, start_at, end_at), daemon=True,
                                name="cached-loop")
        self.proc.start()
        child.close()
        receive(self.conn, timeout, "cached-lookup client", "connect")
        return self

    def stop(self, timeout: float = 30.0) -> Tuple[List[float], Dict[str, int]]:
        """(latencies in seconds, {answer kind: count}); kills the process if need be."""
        try:
            self.conn.send(("stop", None))
            return receive(self.conn, timeout, "cached-lookup client", "report")
        finally:
            self.close()

    def close(self) -> None:
        if self.proc is None:
            return
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.conn.close()
        self.proc = None


def ask_at(sock: socket.socket, domain: str, at: float, timeout: float) -> Tuple[Optional[bytes], float]:
    """Ask domain on an open connection at monotonic time `at`; (reply or None, seconds)."""
    now = time.monotonic()
    if at > now:
        time.sleep(at - now)
    started = time.perf_counter()
    sock.settimeout(timeout)
    sock.sendall(request(domain))
    buffer = bytearray()
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"<closed>", time.perf_counter() - started
            buffer += chunk
            replies = _take_replies(buffer)
            if replies:
                return replies[0], time.perf_counter() - started
    except socket.timeout:
        return None, time.perf_counter() - started


def warm(port: int, names: Sequence[str], timeout: float = 60.0) -> Dict[str, bytes]:
    """Ask each domain (one connection) until it is answered with something other than
    TEMP (a lookup or DANE check under way); domain -> that answer."""
    deadline = time.monotonic() + timeout
    answers = {}
    with contextlib.closing(_connect(port)) as sock:
        for name in names:
            while True:
                reply, _ = ask_at(sock, name, 0.0, timeout=max(0.1, deadline - time.monotonic()))
                if reply is None or reply == b"<closed>":
                    raise RuntimeError(f"no answer for {name} while warming the cache: {reply!r}")
                if not reply.startswith(b"TEMP"):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the socketmap kept answering {reply!r} for {name}")
                time.sleep(0.05)
            answers[name] = reply
    return answers


def proc_status(pid: int) -> Tuple[int, int]:
    """(threads, RSS in KiB) of a process, from /proc/PID/status."""
    threads = rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return threads, rss


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process (all its threads) from /proc; 0.0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ProcSampler:
    """A thread sampling a process's threads and RSS every `period` seconds; peaks kept."""

    def __init__(self, pid: int, period: float = 0.05):
        self.pid, self.period = pid, period
        self.peak_threads = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proc-sampler", daemon=True)

    def sample(self) -> Tuple[int, int]:
        try:
            threads, rss = proc_status(self.pid)
        except OSError:
            return 0, 0
        self.peak_threads, self.peak_rss = max(self.peak_threads, threads), max(self.peak_rss, rss)
        return threads, rss

    def _run(self):
        while not self._stop.wait(self.period):
            self.sample()

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()


# --------------------------------------------------------------------------- the scenario


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(p / 100.0 * (len(ordered) - 1)))))]


def kind_of(reply: Optional[bytes]) -> str:
    """"OK secure", "NOTFOUND", "TEMP", ... or "none" (no reply) for a reply payload."""
    if reply is None:
        return "none"
    words = reply.split(b" ")
    if words[0] == b"OK" and len(words) > 1:
        return "OK " + words[1].decode(errors="replace")
    return words[0].decode(errors="replace")


@dataclasses.dataclass
class BurstReport:
    fresh_domain: str
    fresh_reply: Optional[bytes]
    fresh_seconds: float
    answered_before_fresh: int  # burst requests answered by the time the fresh domain was asked
    burst: List[Tuple[str, Optional[bytes], Optional[float]]]
    cached_latencies: List[float]
    cached_kinds: Dict[str, int]
    threads_at_fresh: int
    rss_kib_at_fresh: int
    peak_threads: int
    peak_rss_kib: int
    elapsed: float  # from the burst's start until every burst request was answered (or gave up)
    started: float  # the burst's start, time.monotonic()
    # when the fresh domain's lookup reached the servers, seconds after it was asked
    # (None: never, or no world given); TXT, A, policy, MX (see SlowWorld.timeline)
    fresh_timeline: Dict[str, Optional[float]] = dataclasses.field(default_factory=dict)
    daemon_cpu: float = 0.0  # CPU seconds the daemon used from the burst's start to its end
    world_cpu: float = 0.0  # the same for the world process (the test servers)
    load: float = 0.0  # the machine's 1-minute load average at the start

    def timeline_text(self) -> str:
        steps = [f"{name} +{t:.3f} s" for name, t in self.fresh_timeline.items() if t is not None]
        missing = [name for name, t in self.fresh_timeline.items() if t is None]
        text = ", ".join(steps + [f"answer +{self.fresh_seconds:.3f} s"])
        return text + (f" (no {', '.join(missing)})" if missing else "")

    @property
    def cached_p99(self) -> float:
        return percentile(self.cached_latencies, 99)

    def burst_kinds(self) -> Dict[str, int]:
        return dict(collections.Counter(kind_of(reply) for _, reply, _ in self.burst))

    def burst_seconds(self) -> List[float]:
        return [s for _, reply, s in self.burst if reply is not None]


def run_burst(port: int, pid: int, client: BurstClient, broken: Sequence[str], fresh: str,
              cached: Sequence[str], fresh_delay: float = 0.5, burst_timeout: float = 30.0,
              cached_connections: int = 4, cached_interval: float = 0.01, min_window: float = 2.5,
              world: Optional[SlowWorld] = None) -> BurstReport:
    """Ask every broken domain at once (one per connection of client), ask the never-seen
    fresh domain fresh_delay seconds later on a connection of its own, and the cached
    domains at a steady pace on others, until every broken domain is answered (or
    burst_timeout) and at least min_window seconds from the start (a daemon that answers
    the whole burst at once still gets its cached lookups measured while it works on
    what follows). pid: the daemon, whose threads, RSS and CPU are sampled; world: for
    the fresh domain's timeline and the test servers' CPU."""
    fresh_sock = _connect(port)
    loop = None
    try:
        start_at = time.monotonic() + 0.5 + len(broken) * 2e-5
        loop = CachedLoop(port, cached, cached_connections, cached_interval)
        loop.start(start_at, start_at + burst_timeout + 10.0)
        load = os.getloadavg()[0]
        with ProcSampler(pid) as sampler:
            client.ask(broken, start_at, burst_timeout)
            cpu = (cpu_seconds(pid), cpu_seconds(world.pid) if world is not None else 0.0)
            time.sleep(max(0.0, start_at + fresh_delay - time.monotonic()))
            asked = time.monotonic()
            fresh_reply, fresh_seconds = ask_at(fresh_sock, fresh, 0.0, timeout=burst_timeout)
            threads_at_fresh, rss_at_fresh = sampler.sample()
            burst = client.result()
            elapsed = time.monotonic() - start_at
            cpu = (cpu_seconds(pid) - cpu[0], cpu_seconds(world.pid) - cpu[1] if world is not None else 0.0)
            time.sleep(max(0.0, start_at + min_window - time.monotonic()))
        latencies, kinds = loop.stop()
        loop = None
    finally:
        fresh_sock.close()
        if loop is not None:
            loop.close()
    timeline = {}
    if world is not None:
        timeline = {step: (t - asked if t is not None else None) for step, t in world.timeline(fresh).items()}
    answered_early = sum(1 for _, reply, s in burst if reply is not None and s is not None and s < fresh_delay)
    return BurstReport(fresh, fresh_reply, fresh_seconds, answered_early, burst, latencies, kinds, threads_at_fresh,
                       rss_at_fresh, sampler.peak_threads, sampler.peak_rss, elapsed, start_at, timeline, cpu[0],
                       cpu[1], load)


@dataclasses.dataclass
class ReaskGroup:
    answers: List[Tuple[str, Optional[bytes], Optional[float]]]
    dns_queries: int  # new queries for these domains' names seen by the DNS server
    within: float

    @property
    def answered_within(self) -> int:
        return sum(1 for _, reply, s in self.answers if reply is not None and s is not None and s < self.within)

    def kinds(self) -> Dict[str, int]:
        return dict(collections.Counter(kind_of(reply) for _, reply, _ in self.answers))

    def slowest(self) -> float:
        return max((s if s is not None else float("inf") for _, _, s in self.answers), default=0.0)


@dataclasses.dataclass
class ReaskReport:
    groups: Dict[str, ReaskGroup]
    tls_connections: int  # new connections to the black hole


def run_reask(world: SlowWorld, client: BurstClient, groups: Dict[str, Sequence[str]], at: Optional[float] = None,
              timeout: float = 30.0, within: float = 1.0, settle: float = 0.5) -> ReaskReport:
    """Ask every domain of every group again, all at once at monotonic time `at` (now if
    None), one per connection of client; per group, the DNS queries for them from just
    before until settle seconds after the last answer, and the connections to the black
    hole in that time."""
    if at is not None and at - time.monotonic() > 0.2:
        time.sleep(at - time.monotonic() - 0.2)
    names = [name for group in groups.values() for name in group]
    before = {label: world.dns_queries(group) for label, group in groups.items()}
    tls_before = world.hang_stats()[0]
    client.ask(names, max(at or 0.0, time.monotonic() + 0.05), timeout)
    answers = dict((name, (name, reply, s)) for name, reply, s in client.result())
    time.sleep(settle)
    report = {label: ReaskGroup([answers[name] for name in group], world.dns_queries(group) - before[label], within)
              for label, group in groups.items()}
    return ReaskReport(report, world.hang_stats()[0] - tls_before)
