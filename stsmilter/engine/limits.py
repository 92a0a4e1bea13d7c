"""Bounds on the engine's expensive work, with waiting callers first.

A discovery costs sockets, not threads: what bounds it is how many DNS queries and
HTTPS fetches may be in flight at once ([dns] max_concurrent, [fetch] max_concurrent).
When a bound is reached, work queues for a slot, and the order of that queue is what
keeps the engine fair: work that a front end's caller (a socketmap client, a milter
callback) is waiting for goes before background work (refreshes, id re-checks) and
before discoveries whose callers have already given up.

A Want says until when someone waits for a piece of work (time.monotonic()); the task
doing the work carries it in the context variable ``current_want``, so the DNS layer and
the fetcher need not know about jobs. Everything here but Want.extend() runs on the
engine's event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import time
from typing import Callable, Deque, List, Optional, Tuple

from stsmilter import metrics
from stsmilter.ratelog import RateLimitedLog

log = logging.getLogger("stsmilter.discovery")

# The line a full limiter logs (at most one a minute), by stage; README quotes them.
FULL_LINES = {
    "dns": "discovery: all %d dns slots are busy ([dns] max_concurrent); %d waiting, callers waiting for an answer first",
    "fetch": "discovery: all %d fetch slots are busy ([fetch] max_concurrent); %d waiting,"
             " callers waiting for an answer first",
    "probe": "MX TLS checks: all %d slots are busy ([probe] max_concurrent); %d waiting,"
             " callers waiting for an answer first",
}


class Want:
    """Urgent while clock() < until. extend() may be called from any thread."""

    __slots__ = ("until", "loop", "parked")

    def __init__(self, until: float = 0.0, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        self.until = until
        self.loop = loop
        # Queue places of this work in a limiter's background queue (loop thread only).
        self.parked: List[Tuple["PriorityLimiter", "_Ticket"]] = []

    def extend(self, until: float) -> None:
        """Someone (else) now waits until `until`: work parked in a background queue
        moves to the front queue. Parking sets `parked` before it reads `until`, and
        this sets `until` before it reads `parked`: one of them sees the other."""
        if until > self.until:
            self.until = until
            if self.parked and self.loop is not None:
                try:
                    self.loop.call_soon_threadsafe(self._promote)
                except RuntimeError:
                    pass  # the loop is closed: nothing waits in it any more

    def urgent(self, now: float) -> bool:
        return now < self.until

    def _promote(self) -> None:
        parked, self.parked = self.parked, []
        for limiter, ticket in parked:
            limiter._promote(ticket)


BACKGROUND = Want()  # nobody waits: refreshes, id re-checks started by a cached answer
current_want: contextvars.ContextVar[Want] = contextvars.ContextVar("stsmilter_want", default=BACKGROUND)


class _Ticket:
    __slots__ = ("future", "want")

    def __init__(self, future: asyncio.Future, want: Want) -> None:
        self.future, self.want = future, want


class PriorityLimiter:
    """At most `limit` holders at once (``async with limiter:``). Waiters whose Want is
    urgent are served first, in arrival order; the others after them, in the order
    they were found to be background work. A waiter that is cancelled (its deadline)
    leaves the queue; a slot granted to it is passed on."""

    def __init__(self, limit: int, stage: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.stage = stage  # "dns", "fetch" or "probe": its metric and log line; "": neither
        self.clock = clock
        self.active = 0
        self._urgent: Deque[_Ticket] = collections.deque()
        self._later: Deque[_Ticket] = collections.deque()
        self._queued = 0  # tickets in the queues whose future is not done
        self._log = RateLimitedLog(log, left_out=" (%d more times since the last such line)")
        if stage:
            metrics.DISCOVERY_WAITING.labels(stage=stage).set_function(lambda: self._queued)

    @property
    def waiting(self) -> int:
        """Work waiting for a slot now."""
        return self._queued

    async def acquire(self) -> None:
        if self.active < self.limit and not self._queued:
            self.active += 1
            return
        want = current_want.get()
        ticket = _Ticket(asyncio.get_running_loop().create_future(), want)
        self._queued += 1
        if self.stage:
            self._log.log("full", logging.WARNING, FULL_LINES[self.stage], self.limit, self._queued)
        if want.urgent(self.clock()):
            self._urgent.append(ticket)
        else:
            self._park(ticket)
        try:
            await ticket.future
        except asyncio.CancelledError:
            if ticket.future.done() and not ticket.future.cancelled():
                self.release()  # granted as it was cancelled: pass the slot on
            else:
                self._queued -= 1
            raise

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info) -> None:
        self.release()

    def release(self) -> None:
        self.active -= 1
        while self.active < self.limit:
            ticket = self._next()
            if ticket is None:
                return
            self._queued -= 1
            self.active += 1
            ticket.future.set_result(None)

    def _park(self, ticket: _Ticket) -> None:
        """Into the background queue; a caller that comes later promotes it."""
        ticket.want.parked.append((self, ticket))
        self._later.append(ticket)
        if ticket.want.urgent(self.clock()):  # extended between our two reads
            self._promote(ticket)

    def _promote(self, ticket: _Ticket) -> None:
        if not ticket.future.done():
            self._urgent.append(ticket)  # its stale place in _later is skipped: future done by then

    def _next(self) -> Optional[_Ticket]:
        now = self.clock()
        while self._urgent:
            ticket = self._urgent.popleft()
            if ticket.future.done():
                continue  # cancelled, or granted through its other place
            if ticket.want.urgent(now):
                return ticket
            self._park(ticket)  # its callers gave up: background work now
        while self._later:
            ticket = self._later.popleft()
            if not ticket.future.done():
                return ticket
        return None
