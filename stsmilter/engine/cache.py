"""The bounded in-memory layer over a persistent store; memory decides, the store remembers.

Three maps, each bounded and guarded by one lock:
- policies: LRU of Entry (cachetools), loaded from the store at start so a restart
  protects at once;
- negative: domains with no usable TXT record, for [cache] negative_ttl (negative_cache.py:
  compact, since most domains publish no policy);
- backoff: (domain, policy id) pairs whose fetch failed, for [cache] failure_backoff, so a
  broken policy host is not hammered (RFC 8461 §3.3 leaves the retry policy to senders);
- failures: domains whose TXT lookup failed (timeout, SERVFAIL) or whose policy host hung,
  for [cache] dns_failure_ttl, so a dead destination is not asked again for every message
  (negative_cache.py again: the same shape, another TTL).

Every store call goes through a StoreGuard (store/guard.py): a store that fails (full
disk, read-only file system, I/O error, lock) costs persistence, never a policy. A new
entry is offered to the store before memory publishes it, so whatever a front end has
answered is on disk if the disk took it (a kill -9 loses nothing answered); if the store
refuses, memory takes it anyway and the refresher writes it later (flush()).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Dict, List, Optional, Set

from cachetools import LRUCache, TTLCache

from stsmilter import metrics
from stsmilter.engine.negative_cache import NegativeCache
from stsmilter.engine.policy import FAILED, NONE, Result
from stsmilter.engine.store import Entry, Store, is_due
from stsmilter.engine.store.guard import StoreGuard

# Purges remembered (per domain; a purge of everything is one time) so that a lookup
# already under way when `stsmilter cache purge` ran cannot put the purged policy back:
# at least as long as any lookup can take, and long enough for a write-back to the store
# that raced the purge to be overwritten by the next fetch.
PURGE_MEMORY_SECONDS = 86400.0

# negative() and failure() hand out one Result object per recently asked domain (_remembered).
RECENT_NEGATIVE_RESULTS = 1024


def _remembered(table: NegativeCache, results: Dict[str, Result], domain: str, status: str) -> Optional[Result]:
    """The Result for domain's unexpired entry in table (source "cache"), one object per
    recently asked domain, so that a front end that reuses its reply while it gets the same
    object (the socketmap) keeps doing so. Lock held."""
    reason = table.get(domain)
    if reason is None:
        return None
    result = results.get(domain)
    if result is None or result.reason != (reason or None):
        if len(results) >= RECENT_NEGATIVE_RESULTS:
            results.clear()
        result = Result(domain, status, reason=reason or None, source="cache")
        results[domain] = result
    return result


def _newer(entry: Entry, than: Optional[Entry]) -> bool:
    """entry was fetched, or its id confirmed, after than (another daemon's, say)."""
    return than is None or (entry.fetched_at, entry.checked_at) > (than.fetched_at, than.checked_at)


class PolicyCache:
    def __init__(
        self,
        store: Store,
        max_entries: int,
        negative_ttl: float,
        failure_backoff: float,
        clock: Callable[[], float] = time.time,
        retry_after: Optional[float] = None,
        failure_ttl: float = 0.0,
    ) -> None:
        self.store = store
        self.clock = clock
        self._guard = StoreGuard(store, retry_after)
        self._lock = threading.Lock()
        self._policies: LRUCache = LRUCache(maxsize=max_entries)
        self._negative = NegativeCache(max_entries, negative_ttl, clock)  # ttl 0: nothing kept
        self._negative_results: Dict[str, Result] = {}  # domain -> Result, recently asked
        self._failures = NegativeCache(max_entries, failure_ttl, clock)  # ttl 0: nothing kept
        self._failure_results: Dict[str, Result] = {}
        # TTLCache rejects ttl=0 poorly; a tiny ttl makes "0" mean "not cached".
        self._backoff: TTLCache = TTLCache(maxsize=max_entries, ttl=max(failure_backoff, 1e-9), timer=clock)
        self._backoff_enabled = failure_backoff > 0
        self._unsaved: Set[str] = set()  # domains whose newest entry the store refused
        # Failing enforce/testing entries (also those evicted from memory): the gauge
        # follows every refresh at once instead of waiting for a refresher pass.
        self._failing: Dict[str, Entry] = {}
        self._purged: TTLCache = TTLCache(maxsize=max_entries, ttl=PURGE_MEMORY_SECONDS, timer=clock)
        self._purged_all = float("-inf")
        self._closed = False
        # Memory holds every policy the store holds (a lone daemon whose store fit in memory
        # and that never had to evict one): get() need not ask the store what memory lacks.
        self._complete = False
        # Counted at scrape time: always true, and no bookkeeping on every put.
        metrics.CACHE_ENTRIES.set_function(self.count)
        metrics.REFRESH_FAILING.set_function(self.count_failing)
        metrics.REMEMBERED_FAILURES.set_function(self.count_remembered_failures)

    def load(self) -> int:
        """Fill memory from the store (newest first up to the bound); returns entries held."""
        ok, stored = self._guard.call("read", lambda: list(self.store.entries()))
        if not ok:
            return 0
        stored.sort(key=lambda e: e.fetched_at)
        with self._lock:
            self._complete = not self.store.shared and len(stored) <= self._policies.maxsize
            for entry in stored[-self._policies.maxsize :]:
                self._policies[entry.domain] = entry
            self._failing.update((e.domain, e) for e in stored if e.failing)
            return len(self._policies)

    def peek(self, domain: str) -> Optional[Entry]:
        """Memory only: never touches the store (the socketmap's event loop calls this)."""
        with self._lock:
            return self._policies.get(domain)

    @property
    def complete(self) -> bool:
        """Memory holds everything the store does: get() is peek(), without I/O."""
        return self._complete

    def get(self, domain: str) -> Optional[Entry]:
        entry = self.peek(domain)
        if entry is None and not self._complete:
            _ok, entry = self._guard.call("read", self.store.get, domain)
            if entry is not None:
                with self._lock:
                    if self._purged_since(entry):
                        return None
                    entry = self._policies.setdefault(domain, entry)  # a newer put wins
        return entry

    def _purged_since(self, entry: Entry) -> bool:
        """entry was fetched before a purge of its domain: it must not come back (a lookup
        under way during the purge, or its write-back to the store). Lock held."""
        return self._purged_after(entry.domain, entry.fetched_at)

    def _purged_after(self, domain: str, started: Optional[float]) -> bool:
        """domain was purged after a lookup that started at `started` (None: unknown). Lock held."""
        return started is not None and started < max(self._purged_all, self._purged.get(domain, float("-inf")))

    def put(self, entry: Entry) -> None:
        with self._lock:
            if self._purged_since(entry):
                return  # the lookup's own caller still gets its answer; the cache forgets it
        saved, _ = self._guard.call("write", self.store.put, entry)
        domain = entry.domain
        with self._lock:
            if self._purged_since(entry):  # purged while the store wrote it (forget() left _unsaved)
                return
            if domain not in self._policies and len(self._policies) >= self._policies.maxsize:
                self._complete = False  # the least recently used policy leaves memory, not the store
            self._policies[domain] = entry
            self._negative.pop(domain, None)
            self._failures.pop(domain, None)
            (self._unsaved.discard if saved else self._unsaved.add)(domain)
            self._track_failing(entry)

    def _track_failing(self, entry: Entry) -> None:
        if entry.failing:
            self._failing[entry.domain] = entry
        else:
            self._failing.pop(entry.domain, None)

    def delete(self, domain: str) -> bool:
        in_memory = self.forget(domain)
        _ok, in_store = self._guard.call("delete", self.store.delete, domain)
        return bool(in_store) or in_memory

    def forget(self, domain: str) -> bool:
        """Drop everything memory knows about domain (a purge); True if a policy was held."""
        with self._lock:
            self._purged[domain] = self.clock()
            in_memory = self._policies.pop(domain, None) is not None
            self._negative.pop(domain, None)
            self._failures.pop(domain, None)
            self._failing.pop(domain, None)
            self._unsaved.discard(domain)
            for key in [k for k in self._backoff if k[0] == domain]:
                del self._backoff[key]
        return in_memory

    def forget_all(self) -> int:
        """Drop every policy and answer memory holds (a purge --all); returns the policies."""
        with self._lock:
            self._purged_all = self.clock()
            held = len(self._policies)
            for part in (self._policies, self._negative_results, self._failure_results, self._backoff,
                         self._failing, self._unsaved):
                part.clear()
            self._negative = NegativeCache(self._negative.maxsize, self._negative.ttl, self.clock)
            self._failures = NegativeCache(self._failures.maxsize, self._failures.ttl, self.clock)
        return held

    def snapshot(self) -> List[Entry]:
        """The policies memory serves, by domain."""
        with self._lock:
            entries = list(self._policies.values())
        return sorted(entries, key=lambda e: e.domain)

    # --- a store shared with other daemons (fleet.py)

    @property
    def guard(self) -> StoreGuard:
        return self._guard

    def reload(self, domain: str) -> Optional[Entry]:
        """The store's entry for domain, bypassing memory (another daemon may have written
        it); memory takes it if it is newer than what memory holds."""
        _ok, stored = self._guard.call("read", self.store.get, domain)
        if stored is not None:
            with self._lock:
                if self._purged_since(stored):
                    return None
                if _newer(stored, self._policies.get(domain)):
                    self._policies[domain] = stored
                    self._negative.pop(domain, None)
                    self._failures.pop(domain, None)
                    self._unsaved.discard(domain)
                    self._track_failing(stored)
        return stored

    def stored_answer(self, domain: str) -> Optional[Result]:
        """A "none" or "failed" answer another daemon shared (never memory's own)."""
        _ok, answer = self._guard.call("read", self.store.get_answer, domain)
        return answer

    def resync(self) -> Optional[int]:
        """After missing the fleet's events (Redis was away): take what the store holds
        that memory lacks or holds older, and offer the store again what it lacks (a Redis
        restarted empty), which flush() writes. Returns how many entries wait to be
        written; None if the store cannot be read (now)."""
        ok, stored = self._guard.call("read", lambda: {e.domain: e for e in self.store.entries()})
        if not ok:
            return None
        with self._lock:
            for domain, held in list(self._policies.items()):
                if domain not in stored:
                    self._unsaved.add(domain)
            for domain, newer in stored.items():
                held = self._policies.get(domain)
                if held is None and len(self._policies) >= self._policies.maxsize:
                    continue  # memory is full: the store answers for it (get())
                if _newer(newer, held) and not self._purged_since(newer):
                    self._policies[domain] = newer
                    self._track_failing(newer)
            return len(self._unsaved)

    @property
    def max_entries(self) -> int:
        return self._policies.maxsize

    def purge_expired(self, now: float) -> int:
        """Drop expired policies from the store and from memory; returns how many."""
        ok, removed = self._guard.call("delete", self.store.purge_expired, now)
        with self._lock:
            for domain in [d for d, e in self._failing.items() if e.expires <= now]:
                del self._failing[domain]
            if ok and not removed and not self.store.shared:
                return 0  # nothing expired in the store: nothing in memory either (in a fleet,
                #           another daemon may have purged what memory still holds)
            expired = [d for d, e in self._policies.items() if e.expires <= now]
            for domain in expired:
                del self._policies[domain]
            self._unsaved.difference_update(expired)
        return removed if ok else len(expired)

    def due(self, now: float, interval: float) -> List[Entry]:
        """Entries due for a refresh (store.Store.due's rule). The store answers for what it
        holds; memory for what the store refused, and for everything if it cannot answer."""
        ok, stored = self._guard.call("read", self.store.due, now, interval)
        with self._lock:
            if not ok:
                return [e for e in self._policies.values() if is_due(e, now, interval)]
            newer = [self._policies.get(d) for d in self._unsaved]
        due = {e.domain: e for e in stored}
        for entry in newer:
            if entry is not None:
                if is_due(entry, now, interval):
                    due[entry.domain] = entry
                else:
                    due.pop(entry.domain, None)
        return list(due.values())

    def flush(self) -> int:
        """Write the entries the store refused (the refresher calls this); returns how many
        were written. Stops at the first failure: the store rests, the rest wait."""
        with self._lock:
            pending = [(d, self._policies.get(d)) for d in self._unsaved]
        written = 0
        for domain, entry in pending:
            if entry is not None:
                saved, _ = self._guard.call("write", self.store.put, entry)
                if not saved:
                    break
                written += 1
            with self._lock:
                if self._policies.get(domain) is entry:
                    self._unsaved.discard(domain)
        return written

    @property
    def unsaved(self) -> int:
        """Entries held in memory only because the store refused them."""
        return len(self._unsaved)

    def count(self) -> int:
        """Policies held: the store's count, or memory's if larger or the store cannot say."""
        with self._lock:
            held = len(self._policies)
        if self._closed:  # a scrape during shutdown
            return held
        ok, stored = self._guard.call("read", self.store.count)
        return max(stored, held) if ok else held

    def count_failing(self) -> int:
        """Unexpired enforce/testing policies whose last refresh failed."""
        now = self.clock()
        with self._lock:
            return sum(1 for e in self._failing.values() if e.expires > now)

    def close(self) -> None:
        self._closed = True
        try:
            self.store.close()
        except Exception:  # nothing left to lose: memory goes with the process
            pass

    # --- negative answers

    def negative(self, domain: str) -> Optional[Result]:
        """The remembered "none" answer for domain (source "cache"), if unexpired."""
        with self._lock:
            return _remembered(self._negative, self._negative_results, domain, NONE)

    def put_negative(self, result: Result, share: bool = True, started: Optional[float] = None) -> None:
        """Remember a "none" answer (only its domain and reason are kept). share: offer it
        to a shared store too (not when it came from there). started: when the lookup
        began; not kept if the domain was purged since."""
        with self._lock:
            if self._purged_after(result.domain, started):
                return
            self._negative.put(result.domain, result.reason or "")
            self._failures.pop(result.domain, None)
        if share and self.store.shared and self._negative.ttl > 0:
            self._guard.call("write", self.store.put_answer, result, self._negative.ttl)

    # --- failed lookups ([cache] dns_failure_ttl)

    def failure(self, domain: str) -> Optional[Result]:
        """The remembered failure of domain's last lookup ("failed", source "cache"): its
        TXT lookup failed, or its policy host hung. None if none is remembered."""
        with self._lock:
            return _remembered(self._failures, self._failure_results, domain, FAILED)

    def put_failure(self, domain: str, reason: str, started: Optional[float] = None) -> None:
        """Remember that a lookup of domain failed with reason, for [cache] dns_failure_ttl
        (memory only). started: when the lookup began; not kept if the domain was purged
        since (a purge is how an administrator asks for a retry at once)."""
        with self._lock:
            if not self._purged_after(domain, started):
                self._failures.put(domain, reason)

    def count_remembered_failures(self) -> int:
        with self._lock:
            return self._failures.count()

    # --- fetch failure backoff

    def backoff(self, domain: str, policy_id: str) -> Optional[str]:
        """The reason of a recent failed fetch of this domain/id, if still backing off."""
        with self._lock:
            return self._backoff.get((domain, policy_id))

    def set_backoff(self, domain: str, policy_id: str, reason: str, share: bool = True,
                    started: Optional[float] = None) -> None:
        """started: when the failed fetch began; not kept if the domain was purged since
        (a purge is how an administrator asks for a retry at once)."""
        if self._backoff_enabled:
            with self._lock:
                if self._purged_after(domain, started):
                    return
                self._backoff[(domain, policy_id)] = reason
            if share and self.store.shared:  # the fleet does not hammer a broken host either
                failed = Result(domain, FAILED, reason=reason, source="cache", policy_id=policy_id)
                self._guard.call("write", self.store.put_answer, failed, self._backoff.ttl)
