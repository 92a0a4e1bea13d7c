"""Postfix socketmap_table(5) TLS-policy protocol; also what Sendmail 8.17 FEATURE(`sts') asks.

One Connection per client: netstring framing, pipelining, the fast path. The listener and
the limits across connections are socketmap/server.py's, the answers tlspolicy.py's.

Requests are netstrings "NAME KEY" (NAME is the map name; any word is accepted); replies are
netstrings "OK data", "NOTFOUND ", "TEMP reason" or "PERM reason" (the payloads come from
tlspolicy.answer()). Postfix keeps connections open and may pipeline, so replies leave in
request order.

Each request is answered with the settings of its map name (maps.py: [socketmap NAME],
else [socketmap]). A request that discovery.peek() (and, for an enforced policy, dane.peek())
can answer is answered inside data_received (no task, no await); any other waits for discovery.submit()
and the DANE check at most lookup_timeout. A request that has begun starts a clock
(request_started; the server closes the connection after request_timeout), and a client
that does not read its replies is not read from either.

What a Connection uses of its server: state (discovery, MapTable, DANE checker), cache
(request -> _Entry), loop, inbox (Inbox: the engine's answers, in batches), connections (least recently active first), begun (the
connections with an incomplete request), idle_timeout, connection_limit, evict_idlest().
"""

import asyncio
import collections
import logging
import threading
import time
from typing import Optional

from stsmilter import metrics
from stsmilter.engine import policy
from stsmilter.engine.tlspolicy import DANE_ONLY, NOTFOUND, answer, enforced, normalize_key, on_timeout_answer
from stsmilter.socketmap.maps import DEFAULT_LABEL

log = logging.getLogger("stsmilter.socketmap")

MAX_REQUEST = 1024  # keys are domain names
MAX_LENGTH_DIGITS = 5
MAX_PIPELINED = 64  # unanswered requests per connection before we stop reading more
CACHE_LIMIT = 10000  # request keys remembered by the fast path

INTERNAL_ERROR = b"TEMP internal error"
MALFORMED = b"PERM malformed request"

_monotonic = time.monotonic
_perf_counter = time.perf_counter


def netstring(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


NOTFOUND_REPLY = netstring(NOTFOUND)
MALFORMED_REPLY = netstring(MALFORMED)
INTERNAL_ERROR_REPLY = netstring(INTERNAL_ERROR)


class _Count:
    """One answer counted twice: by result (ok/notfound/temp/perm) and by kind and map."""

    __slots__ = ("result", "kind")

    def __init__(self, result: str, kind: str, label: str):
        # Children bound once: .labels() per request costs a lock.
        self.result = metrics.SOCKETMAP_LOOKUPS.labels(result=result)
        self.kind = metrics.SOCKETMAP_ANSWERS.labels(kind=kind, map=label)

    def inc(self) -> None:
        self.result.inc()
        self.kind.inc()


_DANE = 0  # the key of "OK dane-only", the one OK that is not "secure"; the others: the reply's first byte
_COUNTS = {}  # map label -> {_DANE or first byte: _Count}; labels come from the configuration only


def counts(label: str) -> dict:
    """The counters of one map label, made (and their series exported, at 0) on first use."""
    table = _COUNTS.get(label)
    if table is None:
        table = {ord(r[0].upper()): _Count(r, k, label) for r, k in
                 (("ok", "secure"), ("notfound", "notfound"), ("temp", "temp"), ("perm", "perm"))}
        table[_DANE] = _Count("ok", "dane", label)
        _COUNTS[label] = table
    return table


counts(DEFAULT_LABEL)


def _count(payload: bytes, label: str = DEFAULT_LABEL) -> _Count:
    return counts(label)[_DANE if payload == DANE_ONLY else payload[0]]


class _Entry:
    """Fast-path memory for one request: the reply last built and what it was built from."""

    __slots__ = ("domain", "map", "result", "settings", "verdict", "needs_dane", "reply", "counter")

    def __init__(self, domain: Optional[str], map_name: bytes):
        self.domain, self.map, self.result, self.settings, self.verdict = domain, map_name, None, None, None
        self.needs_dane = False  # result and the map's settings call for a DANE verdict
        self.reply, self.counter = NOTFOUND_REPLY, _count(NOTFOUND)


class Connection(asyncio.Protocol):
    """One client: its requests in, its replies out in request order."""

    __slots__ = ("server", "transport", "buffer", "queue", "tasks", "last_request", "idle_timer",
                 "closing", "throttled", "write_paused", "request_started")

    def __init__(self, server):
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
        discovery, table, checker = server.state
        entry = server.cache.get(request)  # keyed by map name and key: maps differ
        try:
            if entry is None:
                if len(server.cache) >= CACHE_LIMIT:
                    server.cache.clear()
                name, _, key = request.partition(b" ")
                entry = server.cache[request] = _Entry(normalize_key(key), name)
            # The map's settings (a reload makes new ones: the reply below is rebuilt).
            settings, label = table.by_name.get(entry.map, table.default)
            if entry.domain is None:
                return self._send(NOTFOUND_REPLY, _count(NOTFOUND, label), started)
            result = discovery.peek(entry.domain)
            if result is None or result.status == policy.PENDING:
                return self._later(entry, discovery, settings, label, checker, started)
            if result is not entry.result or settings is not entry.settings:
                entry.needs_dane = checker is not None and settings.dane == "auto" and enforced(result, settings)
                entry.verdict = None
            verdict = None
            if entry.needs_dane:
                verdict = checker.peek(entry.domain)
                if verdict is None:
                    return self._later(entry, discovery, settings, label, checker, started, result)
            if result is not entry.result or settings is not entry.settings or verdict is not entry.verdict:
                payload = answer(result, settings, verdict)
                entry.reply, entry.counter = netstring(payload), _count(payload, label)
                entry.result, entry.settings, entry.verdict = result, settings, verdict
            self._send(entry.reply, entry.counter, started)
        except Exception:
            log.exception("socketmap: lookup of %r failed", request)
            self._send(INTERNAL_ERROR_REPLY, _count(INTERNAL_ERROR), started)

    def _later(self, entry, discovery, settings, label, checker, started, result=None):
        """Answer from a task: discovery and/or the DANE check must run first."""
        slot = [None]  # holds our place in the reply order
        self.queue.append(slot)
        checker = checker if settings.dane == "auto" else None
        # Started through the inbox, 32 per turn of the loop: a burst of new domains on a
        # thousand connections must not hold up the cached answers of the others.
        self.server.inbox.put(self._start, (slot, entry.domain, discovery, settings, label, checker, started, result))

    def _start(self, arguments):
        if self.transport is None or self.transport.is_closing():
            return  # the client went away while its lookup waited to start
        task = self.server.loop.create_task(self._discover(*arguments))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _send(self, reply: bytes, counter, started: float):
        counter.inc()
        metrics.SOCKETMAP_LOOKUP_SECONDS.observe(_perf_counter() - started)
        if self.queue:
            self.queue.append([reply])  # an earlier request is still being looked up
        else:
            self.transport.write(reply)

    async def _discover(self, slot, domain, discovery, settings, label, checker, started, result=None):
        loop = self.server.loop
        try:
            deadline = loop.time() + settings.lookup_timeout
            if result is None:
                waiter = _follow(self.server.inbox, discovery.submit(domain, wait=settings.lookup_timeout))
                result = await asyncio.wait_for(waiter, settings.lookup_timeout)
            verdict = None
            if checker is not None and enforced(result, settings):
                verdict = checker.peek(domain)
                if verdict is None:
                    left = max(0.0, deadline - loop.time())
                    verdict = await asyncio.wait_for(_follow(self.server.inbox, checker.submit(domain, wait=left)), left)
            payload = answer(result, settings, verdict)
        except asyncio.TimeoutError:
            payload = on_timeout_answer(settings)
        except Exception:
            log.exception("socketmap: discovery for %s failed", domain)
            payload = INTERNAL_ERROR
        log.debug("socketmap: %s -> %s", domain, payload)
        _count(payload, label).inc()
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
        _count(MALFORMED).inc()
        self.queue.append([MALFORMED_REPLY])
        self._flush()


class Inbox:
    """Work for the socketmap's loop, done BATCH items at a time: the engine's answers,
    and the starts of lookups that must wait for the engine.

    A burst of new domains arrives together, and a burst of lookups for dead
    destinations times out together: a thousand callbacks run at once would hold up
    every cached answer behind them (those are answered inside data_received, when the
    loop next reads its sockets). Here they queue, and the loop takes BATCH of them,
    then looks at its sockets again, and so on; one wake-up of the loop per batch."""

    BATCH = 32

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, callback, argument) -> None:
        """callback(argument) on the loop, soon (any thread)."""
        with self._lock:
            self._items.append((callback, argument))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    def _drain(self) -> None:
        for _ in range(self.BATCH):
            with self._lock:
                if not self._items:
                    self._scheduled = False
                    return
                callback, argument = self._items.popleft()
            callback(argument)
        self.loop.call_soon(self._drain)  # the rest once the loop has read its sockets


def _follow(inbox: Inbox, engine_future) -> asyncio.Future:
    """An asyncio future with engine_future's outcome. Unlike wrap_future(), cancelling it
    (our timeout) never cancels the fetch, which goes on and fills the cache for the retry;
    an engine-side cancel becomes an error, and an outcome after the loop closed is dropped."""
    waiter = inbox.loop.create_future()

    def copy(done):
        if waiter.done():
            return
        if done.cancelled():
            waiter.set_exception(RuntimeError("discovery future cancelled"))
        elif done.exception() is not None:
            waiter.set_exception(done.exception())
        else:
            waiter.set_result(done.result())

    engine_future.add_done_callback(lambda done: inbox.put(copy, done))
    return waiter
