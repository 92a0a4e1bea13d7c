"""Postfix socketmap_table(5) TLS-policy server; also what Sendmail 8.17 FEATURE(`sts') asks.

Requests are netstrings "NAME KEY" (NAME is the map name; any word is accepted); replies are
netstrings "OK data", "NOTFOUND ", "TEMP reason" or "PERM reason". Postfix keeps connections
open and may pipeline, so replies leave in request order.

The event loop runs in its own thread (libmilter owns the main thread and the signals). A
request that discovery.peek() (and, for an enforced policy, dane.peek()) can answer is
answered inside data_received (no task, no await); any other waits for discovery.submit()
and the DANE check at most lookup_timeout.

No local client can lock the others out: at the connection limit a new connection
closes the longest-idle one (Postfix reconnects on its next lookup), and a request
that has begun must be complete within request_timeout or its connection is closed.

DANE first (RFC 8461 §2, [socketmap] dane = auto): for a domain whose MTA-STS policy the
MTA must enforce, the DANE verdict (dane.py) decides between "dane-only" (DANE governs),
the MTA-STS answer (DANE does not apply) and TEMP (a DNSSEC lookup failed). The map name
"sts" is Sendmail's FEATURE(`sts'): Sendmail 8.17 understands only "secure ..." there and
runs its own DANE in the binary before these checks (README), so it gets the MTA-STS
answer without a DANE check.
"""

import asyncio
import collections
import errno
import logging
import os
import re
import signal
import socket
import stat
import threading
import time
from typing import Optional

from . import dane, metrics, policy
from .preflight import chmod_socket

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 300.0  # Postfix reconnects when we close an idle connection
EVICTION_SCAN = 64  # at the limit, look this far into the longest-idle for one without a request
MAX_REQUEST = 1024  # keys are domain names
MAX_LENGTH_DIGITS = 5
MAX_PIPELINED = 64  # unanswered requests per connection before we stop reading more
MAX_REPLY = 100000  # the Postfix socketmap client refuses longer replies
CACHE_LIMIT = 10000  # request keys remembered by the fast path
BLOCKED_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}

NOTFOUND = b"NOTFOUND "
IN_PROGRESS = b"TEMP MTA-STS policy lookup in progress"
INTERNAL_ERROR = b"TEMP internal error"
MALFORMED = b"PERM malformed request"
NO_MX = b"TEMP MTA-STS policy lists no mx"
DANE_ONLY = b"OK dane-only"  # Postfix: DANE or nothing; never "dane" (falls back to "may")
DANE_DNS_ERROR = b"TEMP DNSSEC lookup for DANE failed"
SENDMAIL_MAP = b"sts"  # FEATURE(`sts') asks "sts DOMAIN"

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(r"(?:%s\.)*%s" % (_LABEL, _LABEL))


class _Count:
    """One answer counted twice: by result (ok/notfound/temp/perm) and by kind."""

    __slots__ = ("result", "kind")

    def __init__(self, result: str, kind: str):
        # Children bound once: .labels() per request costs a lock.
        self.result = metrics.SOCKETMAP_LOOKUPS.labels(result=result)
        self.kind = metrics.SOCKETMAP_ANSWERS.labels(kind=kind)

    def inc(self) -> None:
        self.result.inc()
        self.kind.inc()


# Keyed by the reply's first byte; "OK dane-only" is the one OK that is not "secure".
_COUNTERS = {ord(r[0].upper()): _Count(r, k) for r, k in
             (("ok", "secure"), ("notfound", "notfound"), ("temp", "temp"), ("perm", "perm"))}
_DANE_COUNT = _Count("ok", "dane")


def _count(payload: bytes) -> _Count:
    return _DANE_COUNT if payload == DANE_ONLY else _COUNTERS[payload[0]]

_monotonic = time.monotonic
_perf_counter = time.perf_counter


def netstring(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


NOTFOUND_REPLY = netstring(NOTFOUND)
MALFORMED_REPLY = netstring(MALFORMED)
INTERNAL_ERROR_REPLY = netstring(INTERNAL_ERROR)


def normalize_key(key: bytes) -> Optional[str]:
    """The domain a request key names (lower-case A-labels, no trailing dot), or None for
    anything else: [host]:port, host:port, IP literals, ".parent" lookups, junk, bytes
    that are not UTF-8. The milter's normalization (U-labels through UTS 46, as Postfix
    does), so that both front ends look up the same domain."""
    try:
        return policy.normalize_domain(key.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included
        return None


def on_timeout_answer(settings) -> bytes:
    return NOTFOUND if settings.on_timeout == "notfound" else IN_PROGRESS


def enforced(result: policy.Result, settings) -> bool:
    """The MTA must enforce this result's policy (mode enforce, or testing with
    strict_testing): the answers where DANE comes first."""
    sts = result.policy
    if result.status != policy.VALID or sts is None:
        return False
    return sts.mode == "enforce" or (sts.mode == "testing" and settings.strict_testing)


def answer(result: policy.Result, settings, verdict: Optional[dane.Verdict] = None) -> bytes:
    """The reply payload (without netstring framing) for a discovery result and, for an
    enforced policy, the DANE verdict (None: no DANE check, the MTA-STS answer)."""
    if result.status == policy.PENDING:
        return on_timeout_answer(settings)
    if not enforced(result, settings):
        return NOTFOUND
    if verdict is not None and verdict.kind != dane.NO_DANE:
        if verdict.kind == dane.DANE:
            return DANE_ONLY
        if verdict.kind == dane.DNS_ERROR:
            return DANE_DNS_ERROR  # "secure" might override DANE; "dane-only" might block
        return on_timeout_answer(settings)  # PENDING
    sts = result.policy
    if not sts.mx:
        return NO_MX  # enforced, yet no MX can satisfy it: defer rather than downgrade
    # The parser gives canonical patterns; a policy cached by an older version may not be.
    # Checked here too because they become Postfix syntax.
    patterns = [policy.canonical_mx_pattern(p) for p in sts.mx]
    if sts.version != "STSv1" or not _DOMAIN.fullmatch(result.domain) or None in patterns:
        raise ValueError("unsafe text in the policy of %r" % result.domain)  # -> TEMP internal error
    # Postfix's ".example.com" also matches deeper names, RFC 8461's "*." one label only:
    # a documented, accepted weakening (the certificate must still name the MX host).
    secure = "OK secure match=%s servername=hostname" % ":".join(p[1:] if p[:2] == "*." else p for p in patterns)
    if settings.tlsrpt:
        # Postfix 3.10 TLSRPT attributes (TLSRPT_README); "{ name = value }" protects spaces.
        lines = ["version: " + sts.version, "mode: " + sts.mode] + ["mx: " + p for p in patterns]
        lines.append("max_age: %d" % sts.max_age)
        attributes = ["policy_type=sts", "policy_domain=" + result.domain] + ["mx_host_pattern=" + p for p in patterns]
        reported = " ".join([secure] + attributes + ["{ policy_string = %s }" % line for line in lines])
        if len(reported) <= MAX_REPLY:
            return reported.encode("ascii")
    return secure.encode("ascii")


class _Entry:
    """Fast-path memory for one request: the reply last built and what it was built from."""

    __slots__ = ("domain", "dane_map", "result", "settings", "verdict", "needs_dane", "reply", "counter")

    def __init__(self, domain: Optional[str], dane_map: bool):
        self.domain, self.dane_map, self.result, self.settings, self.verdict = domain, dane_map, None, None, None
        self.needs_dane = False  # result, settings and map call for a DANE verdict
        self.reply, self.counter = NOTFOUND_REPLY, _COUNTERS[ord("N")]


class _Connection(asyncio.Protocol):
    __slots__ = ("server", "transport", "buffer", "queue", "tasks", "last_request", "idle_timer",
                 "closing", "throttled", "write_paused", "request_started")

    def __init__(self, server: "SocketmapServer"):
        self.server = server
        self.transport = self.idle_timer = None
        self.buffer = b""
        self.queue = collections.deque()  # [reply or None] slots, oldest request first
        self.tasks = set()
        self.last_request = _monotonic()
        self.request_started = None  # when the first byte of an incomplete request arrived
        self.closing = self.throttled = self.write_paused = False

    def connection_made(self, transport):
        server = self.server
        if len(server.connections) >= server.connection_limit:
            server.evict_idlest()
        self.transport = transport
        server.connections[self] = None  # newest last: the order is least recently active first
        self.idle_timer = server.loop.call_later(server.idle_timeout, self._check_idle)

    def connection_lost(self, exc):
        self.server.connections.pop(self, None)
        self.server.begun.discard(self)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        for task in self.tasks:
            task.cancel()
        self.queue.clear()

    def pause_writing(self):  # the client does not read its replies: stop reading its requests
        self.write_paused = True
        self.transport.pause_reading()

    def resume_writing(self):
        self.write_paused = False
        if not self.throttled and not self.closing:
            self.transport.resume_reading()

    def _check_idle(self):
        # One self-re-arming timer per connection: cheaper than one timer per request.
        left = self.server.idle_timeout - (_monotonic() - self.last_request)
        if left <= 0 and not self.queue:
            self.transport.close()
        else:
            self.idle_timer = self.server.loop.call_later(max(left, 0.1), self._check_idle)

    def data_received(self, data):
        if self.closing:
            return
        if self.buffer:
            data, self.buffer = self.buffer + data, b""
        self.last_request = now = _monotonic()
        if data:
            self.server.connections.move_to_end(self)
        pos, end = 0, len(data)
        while pos < end:
            colon = data.find(b":", pos, pos + MAX_LENGTH_DIGITS + 1)
            if colon < 0:
                if end - pos > MAX_LENGTH_DIGITS or not data[pos:end].isdigit():
                    return self._reject()
                break  # the length is still arriving
            digits = data[pos:colon]
            length = int(digits) if digits.isdigit() else MAX_REQUEST + 1  # int() takes " 1_0"
            if length > MAX_REQUEST:
                return self._reject()
            comma = colon + 1 + length
            if comma >= end:
                break  # so at most MAX_REQUEST + 7 bytes stay buffered
            if data[comma] != 44:  # ","
                return self._reject()
            self._lookup(data[colon + 1:comma])
            pos = comma + 1
            if len(self.queue) >= MAX_PIPELINED:
                self.throttled = True
                self.transport.pause_reading()
                break
        if pos < end:
            self.buffer = data[pos:]
        if pos < end and not self.throttled:  # an incomplete request: its clock runs
            if self.request_started is None or pos > 0:
                self.request_started = now
                self.server.begun.add(self)
        elif self.request_started is not None:
            self.request_started = None
            self.server.begun.discard(self)

    def _lookup(self, request: bytes):
        started = _perf_counter()
        server = self.server
        discovery, settings, checker = server.state
        entry = server.cache.get(request)  # keyed by map name and key: "sts" differs
        try:
            if entry is None:
                if len(server.cache) >= CACHE_LIMIT:
                    server.cache.clear()
                name, _, key = request.partition(b" ")
                entry = server.cache[request] = _Entry(normalize_key(key), name != SENDMAIL_MAP)
            if entry.domain is None:
                return self._send(NOTFOUND_REPLY, entry.counter, started)
            result = discovery.peek(entry.domain)
            if result is None or result.status == policy.PENDING:
                return self._later(entry, discovery, settings, checker, started)
            if result is not entry.result or settings is not entry.settings:
                entry.needs_dane = checker is not None and entry.dane_map and enforced(result, settings)
                entry.verdict = None
            verdict = None
            if entry.needs_dane:
                verdict = checker.peek(entry.domain)
                if verdict is None:
                    return self._later(entry, discovery, settings, checker, started, result)
            if result is not entry.result or settings is not entry.settings or verdict is not entry.verdict:
                payload = answer(result, settings, verdict)
                entry.reply, entry.counter = netstring(payload), _count(payload)
                entry.result, entry.settings, entry.verdict = result, settings, verdict
            self._send(entry.reply, entry.counter, started)
        except Exception:
            log.exception("socketmap: lookup of %r failed", request)
            self._send(INTERNAL_ERROR_REPLY, _COUNTERS[ord("T")], started)

    def _later(self, entry, discovery, settings, checker, started, result=None):
        """Answer from a task: discovery and/or the DANE check must run first."""
        slot = [None]  # holds our place in the reply order
        self.queue.append(slot)
        checker = checker if entry.dane_map else None
        task = self.server.loop.create_task(
            self._discover(slot, entry.domain, discovery, settings, checker, started, result))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _send(self, reply: bytes, counter, started: float):
        counter.inc()
        metrics.SOCKETMAP_LOOKUP_SECONDS.observe(_perf_counter() - started)
        if self.queue:
            self.queue.append([reply])  # an earlier request is still being looked up
        else:
            self.transport.write(reply)

    async def _discover(self, slot, domain, discovery, settings, checker, started, result=None):
        loop = self.server.loop
        try:
            deadline = loop.time() + settings.lookup_timeout
            if result is None:
                result = await asyncio.wait_for(_follow(loop, discovery.submit(domain)), settings.lookup_timeout)
            verdict = None
            if checker is not None and enforced(result, settings):
                verdict = checker.peek(domain)
                if verdict is None:
                    waiter = _follow(loop, checker.submit(domain))
                    verdict = await asyncio.wait_for(waiter, max(0.0, deadline - loop.time()))
            payload = answer(result, settings, verdict)
        except asyncio.TimeoutError:
            payload = on_timeout_answer(settings)
        except Exception:
            log.exception("socketmap: discovery for %s failed", domain)
            payload = INTERNAL_ERROR
        log.debug("socketmap: %s -> %s", domain, payload)
        _count(payload).inc()
        metrics.SOCKETMAP_LOOKUP_SECONDS.observe(_perf_counter() - started)
        slot[0] = netstring(payload)
        self._flush()

    def _flush(self):
        queue, transport = self.queue, self.transport
        while queue and queue[0][0] is not None:
            transport.write(queue.popleft()[0])
        if self.closing:
            if not queue:
                transport.close()
        elif self.throttled and len(queue) < MAX_PIPELINED:
            self.throttled = False
            if not self.write_paused:
                transport.resume_reading()
            self.data_received(b"")  # the requests left in the buffer when we stopped

    def _reject(self):
        """Broken framing cannot be resynchronized: PERM (after earlier replies), then close."""
        self.closing = True
        self.buffer = b""
        self.request_started = None
        self.server.begun.discard(self)
        self.transport.pause_reading()
        _COUNTERS[ord("P")].inc()
        self.queue.append([MALFORMED_REPLY])
        self._flush()


class SocketmapServer:
    """start() binds and serves from a thread of its own; stop() ends both."""

    def __init__(self, discovery, settings, idle_timeout: float = IDLE_TIMEOUT):
        # One tuple, so update() swaps all at once; the third is the engine's DANE checker
        # (None with [socketmap] dane = no).
        self.state = (discovery, settings, getattr(discovery, "dane", None))
        self.listen = settings.listen
        self.idle_timeout = idle_timeout
        # At most this many connections; the daemon may set it below max_connections
        # to keep file descriptors for the milter (daemon.open_files_budget).
        self.connection_limit = settings.max_connections
        self.connections = collections.OrderedDict()  # _Connection -> None, least recently active first
        self.begun = set()  # connections holding an incomplete request
        self.cache = {}  # request key -> _Entry; used by the loop thread only
        self.evicted_connections = collections.Counter()  # reason -> count
        self.loop = None
        self._listener = self._thread = self._startup_error = None

    def evict_idlest(self) -> None:
        """Close the connection idle the longest, preferring one with no request under
        way, to admit a new one: one client holding every connection locks no one out."""
        victim = None
        for scanned, connection in enumerate(self.connections):
            if victim is None:
                victim = connection
            if not connection.queue and not connection.buffer:
                victim = connection
                break
            if scanned >= EVICTION_SCAN:
                break
        if victim is not None:
            self._evict(victim, "max_connections")

    def _expire_requests(self) -> None:
        """Close connections whose incomplete request is older than request_timeout."""
        timeout = self.state[1].request_timeout
        now = _monotonic()
        for connection in [c for c in self.begun if now - c.request_started >= timeout]:
            self._evict(connection, "request_timeout")
        self.loop.call_later(min(1.0, timeout / 4), self._expire_requests)

    def _evict(self, connection, reason: str) -> None:
        self.connections.pop(connection, None)
        self.begun.discard(connection)
        connection.closing = True
        connection.transport.abort()  # connection_lost cancels its lookups
        self.evicted_connections[reason] += 1
        metrics.SOCKETMAP_EVICTED_CONNECTIONS.labels(reason=reason).inc()
        count = self.evicted_connections[reason]
        if count & (count - 1) == 0:  # 1, 2, 4, 8...: a flood logs a handful of lines
            if reason == "max_connections":
                log.warning("socketmap: %d connections open; closed the longest-idle to admit a new one"
                            " (%d so far)", self.connection_limit, count)
            else:
                log.warning("socketmap: a request was not complete within [socketmap] request_timeout;"
                            " connection closed (%d so far)", count)

    def update(self, discovery, settings) -> None:
        """Engine and settings for the next request; a new listen needs a new server."""
        self.state = (discovery, settings, getattr(discovery, "dane", None))

    @property
    def address(self):
        """The bound (host, port), or the unix socket path."""
        if self.listen.family == "unix":
            return self.listen.path
        return self._listener.sockets[0].getsockname()[:2]

    def start(self) -> None:
        """Bind and serve; returns once listening. OSError if the listen address is unusable."""
        if self._thread is not None:
            raise RuntimeError("socketmap server already started")
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="stsmilter-socketmap", daemon=True)
        self._thread.start()
        ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            self._thread, error, self._startup_error = None, self._startup_error, None
            raise error

    def stop(self, timeout: float = 2.0) -> None:
        """Close the listener and every connection, and join the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("socketmap: the server thread did not stop within %.1f s", timeout)

    def _run(self, ready: threading.Event) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED_SIGNALS)  # libmilter's to handle
        self.loop = loop = asyncio.new_event_loop()
        try:
            try:
                self._listener = loop.run_until_complete(self._bind())
            except Exception as e:
                if isinstance(e, OSError):
                    e = OSError(e.errno, "socketmap: cannot listen on %s: %s" % (self.listen, e.strerror or e))
                self._startup_error = e
                return
            finally:
                ready.set()
            loop.call_soon(self._expire_requests)
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
        finally:
            loop.close()

    async def _bind(self):
        loop, factory = asyncio.get_running_loop(), lambda: _Connection(self)
        if self.listen.family == "unix":
            _remove_stale_socket(self.listen.path)
            listener = await loop.create_unix_server(factory, self.listen.path, backlog=1024, start_serving=False)
            chmod_socket(self.listen.path, self.state[1].socket_mode)  # before the first accept
        else:
            listener = await loop.create_server(factory, self.listen.host, self.listen.port, backlog=1024,
                                                start_serving=False)
        await listener.start_serving()
        log.info("socketmap: listening on %s", self.listen)
        return listener

    async def _shutdown(self):
        self._listener.close()
        if self.listen.family == "unix":  # at once, so that no successor can have bound it yet
            try:
                os.unlink(self.listen.path)
            except FileNotFoundError:
                pass
        for _ in range(3):
            await asyncio.sleep(0)  # accepts already under way become connections
        for connection in list(self.connections):
            connection.transport.abort()  # connection_lost cancels its lookups
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        if tasks:
            await asyncio.wait(tasks, timeout=0.5)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _follow(loop, engine_future) -> asyncio.Future:
    """An asyncio future with engine_future's outcome. Unlike wrap_future(), cancelling it
    (our timeout) never cancels the fetch, which goes on and fills the cache for the retry;
    an engine-side cancel becomes an error, and an outcome after the loop closed is dropped."""
    waiter = loop.create_future()

    def copy(done):
        if waiter.done():
            return
        if done.cancelled():
            waiter.set_exception(RuntimeError("discovery future cancelled"))
        elif done.exception() is not None:
            waiter.set_exception(done.exception())
        else:
            waiter.set_result(done.result())

    def on_done(done):
        try:
            loop.call_soon_threadsafe(copy, done)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    engine_future.add_done_callback(on_done)
    return waiter


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file that nobody listens on; refuse to touch anything else."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, "%s exists and is not a socket" % path)
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: left behind by a server that died
            return
    raise OSError(errno.EADDRINUSE, "another server is listening on %s" % path)
