"""Several daemons, one shared store ([cache] redis): who fetches a policy, and how the
others hear of it. The seam discovery.py talks to:

- once(domain, shared, work): "may I fetch this domain now?" One daemon of the fleet
  takes the domain's lock in the store and runs work(); the others wait (up to the
  lock's lifetime) until shared() finds its answer in the store. So concurrent first
  lookups of one domain across the fleet cost one TXT lookup and one HTTPS fetch, and
  a policy is refreshed by one daemon, not by every one (wait=False: a refresher skips
  a domain another daemon is refreshing).
- events: the daemon that ran work() announces "changed"; `stsmilter cache purge`
  announces "purge". Every daemon reads them (a thread here) and reloads or forgets
  the domain in memory, so the fleet serves one view of every policy within moments.

once() is a coroutine on the engine's event loop (work() is one too): a daemon waiting
for another daemon's answer holds no thread, and its store calls run on the engine's
store threads (EngineLoop.blocking). A lone daemon (a store that is not shared: sqlite,
memory) has nobody to ask: once() is work(). When Redis is unreachable every daemon works on its own (the cache's guard
counts and logs that) and the events thread retries; once Redis answers again, the
daemon reads the events it missed, then takes from Redis what it holds newer and gives
back what it lacks, a Redis restarted empty included (cache.resync(), cache.flush()).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Awaitable, Callable, Dict, Optional, Tuple, TypeVar

from stsmilter import metrics
from stsmilter.ratelog import RateLimitedLog
from stsmilter.engine.store import StoreError

log = logging.getLogger("stsmilter.fleet")

T = TypeVar("T")
POLL_SECONDS = 1.0  # a waiter looks at the store this often even without an event
EVENT_WAIT = 2.0  # the events thread's blocking read
RETRY_SECONDS = 1.0  # after a failed read of the events


class Fleet:
    """A lone daemon: every discovery is its own and there is nobody to tell."""

    def bind(self, engine) -> None:
        """The engine loop once() runs on (discovery.py calls this)."""

    async def once(self, domain: str, shared: Callable[[], Optional[T]], work: Callable[[], Awaitable[T]],
                   wait: bool = True):
        return await work()

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass


class SharedFleet(Fleet):
    def __init__(self, cache, lock_seconds: float, poll: float = POLL_SECONDS) -> None:
        self.cache = cache
        self.store = cache.store
        self.lock_seconds = lock_seconds  # longer than a TXT lookup plus a fetch
        self.poll = poll
        self.engine = None  # EngineLoop, from bind()
        self._waiting: Dict[str, Tuple[asyncio.Event, int]] = {}  # domain -> (event, waiters); loop thread only
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._log = RateLimitedLog(log)

    def bind(self, engine) -> None:
        self.engine = engine

    # --- "may I fetch this domain now?"

    async def once(self, domain: str, shared: Callable[[], Optional[T]], work: Callable[[], Awaitable[T]],
                   wait: bool = True):
        """work()'s answer, or shared()'s once another daemon's work put it in the store;
        None only with wait=False while another daemon holds the domain. shared() and the
        store calls run on a store thread; work() on the loop."""
        blocking, guard = self.engine.blocking, self.cache.guard
        answer = await blocking(shared)  # the usual case in a fleet: another daemon knows it already
        if answer is not None:
            return answer
        give_up = time.monotonic() + self.lock_seconds + self.poll
        while True:
            ok, lock = await blocking(guard.call, "write", self.store.claim, domain, self.lock_seconds)
            if not ok:  # the store cannot coordinate us now: on our own
                return await work()
            if lock is not None:
                try:
                    answer = await blocking(shared)  # a daemon may have finished just before we took it
                    if answer is None:
                        answer = await work()
                        await blocking(guard.call, "write", self.store.announce, "changed", domain)
                    return answer
                finally:
                    await blocking(guard.call, "write", self.store.release, lock)
            answer = await blocking(shared)
            if answer is not None or not wait:
                return answer
            remaining = give_up - time.monotonic()
            if remaining <= 0:
                log.info("%s: another daemon's discovery takes too long; discovering it here", domain)
                return await work()
            await self._wait_for(domain, min(remaining, self.poll))

    async def _wait_for(self, domain: str, timeout: float) -> None:
        event, waiters = self._waiting.get(domain, (None, 0))
        event = event or asyncio.Event()
        self._waiting[domain] = (event, waiters + 1)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            current = self._waiting.get(domain)
            if current is not None and current[0] is event:
                if current[1] <= 1:
                    del self._waiting[domain]
                else:
                    self._waiting[domain] = (event, current[1] - 1)

    def _wake(self, domain: str) -> None:
        """From the events thread: wake the coroutines waiting for domain."""
        if self.engine is not None:
            try:
                self.engine.loop.call_soon_threadsafe(self._wake_now, domain)
            except RuntimeError:
                pass  # the loop is closed: nobody waits

    def _wake_now(self, domain: str) -> None:
        current = self._waiting.pop(domain, None)
        if current is not None:
            current[0].set()

    # --- the fleet's events

    def start(self) -> None:
        self._thread = threading.Thread(target=self._listen, name="sts-fleet", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop hearing events; the thread ends within its blocking read (or at once when
        the store is closed under it), and is not waited for."""
        self._stopping.set()

    def _listen(self) -> None:
        position: Optional[bytes] = None  # id of the last event seen
        interrupted = False
        out_of_sync = False  # memory and the store are to be compared in full
        while not self._stopping.is_set():
            try:
                if position is None:
                    position = self.store.last_event()
                # Right after an outage: do not wait for an event, synchronise soon.
                position, events = self.store.read_events(position, 0.05 if out_of_sync else EVENT_WAIT)
            except StoreError as e:
                if self._stopping.is_set():
                    return  # the store was closed under the read: shutting down
                interrupted = out_of_sync = True
                metrics.STORE_ERRORS.labels(op="read").inc()
                self._log.log(("events", e.kind), logging.WARNING,
                              "cache %s: reading the fleet's events failed: %s; policies stay in memory",
                              self.store.name, e)
                self._stopping.wait(RETRY_SECONDS)
                continue
            except Exception as e:  # a bug must not end the thread (nor print a traceback each time)
                if self._stopping.is_set():
                    return
                self._log.log("events-bug", logging.ERROR, "cache %s: reading the fleet's events failed: %s: %s",
                              self.store.name, type(e).__name__, e)
                self._stopping.wait(RETRY_SECONDS)
                continue
            for op, domain, sender in events:
                self._apply(op, domain, sender)
            if interrupted:
                log.info("cache %s: reading the fleet's events again", self.store.name)
                interrupted = False
            if out_of_sync and len(events) < self.store.events_per_read:  # caught up with the events
                out_of_sync = not self._synchronise()

    def _synchronise(self) -> bool:
        """After an outage (events may be lost, Redis may have restarted empty): memory
        takes what the store holds newer, and the store gets back at once what it lacks.
        False if the store cannot be read yet."""
        unsaved = self.cache.resync()
        if unsaved is None:
            return False
        written = self.cache.flush() if unsaved else 0
        # Said every time: from this line on the daemon uses the store again (a test, or an
        # administrator watching a Redis restart, waits for it).
        log.info("cache %s: in step with the store again (wrote back %d of %d policies it lacked)",
                 self.store.name, written, unsaved)
        return True

    def _apply(self, op: str, domain: str, sender: str) -> None:
        if op == "changed":
            if sender != self.store.sender:  # (our own announcement: memory has it)
                self.cache.reload(domain)
            self._wake(domain)
        elif op == "purge":
            self.cache.forget(domain)
            log.info("cache: %s purged (stsmilter cache purge)", domain)
        elif op == "purge-all":
            dropped = self.cache.forget_all()
            log.info("cache: all %d policies purged (stsmilter cache purge --all)", dropped)
