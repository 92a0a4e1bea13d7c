"""The bounded in-memory layer over a persistent store.

Three maps, each bounded (cachetools) and guarded by one lock:
- policies: LRU of Entry, loaded from the store at start so a restart protects at once;
- negative: "no usable TXT record" Results, for [cache] negative_ttl;
- backoff: (domain, policy id) pairs whose fetch failed, for [cache] failure_backoff, so a
  broken policy host is not hammered (RFC 8461 §3.3 leaves the retry policy to senders).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterator, Optional

from cachetools import LRUCache, TTLCache

from stsmilter import metrics
from stsmilter.policy import Result
from stsmilter.store import Entry, Store


class PolicyCache:
    def __init__(
        self,
        store: Store,
        max_entries: int,
        negative_ttl: float,
        failure_backoff: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._policies: LRUCache = LRUCache(maxsize=max_entries)
        # TTLCache rejects ttl=0 poorly; a tiny ttl makes "0" mean "not cached".
        self._negative: TTLCache = TTLCache(maxsize=max_entries, ttl=max(negative_ttl, 1e-9), timer=clock)
        self._backoff: TTLCache = TTLCache(maxsize=max_entries, ttl=max(failure_backoff, 1e-9), timer=clock)
        self._negative_enabled = negative_ttl > 0
        self._backoff_enabled = failure_backoff > 0
        # Counted at scrape time: always true, and no bookkeeping on every put.
        metrics.CACHE_ENTRIES.set_function(self._count_for_metrics)

    def _count_for_metrics(self) -> float:
        try:
            return float(self.store.count())
        except Exception:  # a closed store (shutdown) must not break /metrics
            return float("nan")

    def load(self) -> int:
        """Fill memory from the store (newest first up to the bound); returns entries held."""
        entries = sorted(self.store.entries(), key=lambda e: e.fetched_at)
        with self._lock:
            for entry in entries[-self._policies.maxsize :]:
                self._policies[entry.domain] = entry
            return len(self._policies)

    def peek(self, domain: str) -> Optional[Entry]:
        """Memory only: never touches the store (the socketmap's event loop calls this)."""
        with self._lock:
            return self._policies.get(domain)

    def get(self, domain: str) -> Optional[Entry]:
        entry = self.peek(domain)
        if entry is None:
            entry = self.store.get(domain)
            if entry is not None:
                with self._lock:
                    self._policies[domain] = entry
        return entry

    def put(self, entry: Entry) -> None:
        self.store.put(entry)
        with self._lock:
            self._policies[entry.domain] = entry
            self._negative.pop(entry.domain, None)

    def delete(self, domain: str) -> bool:
        with self._lock:
            in_memory = self._policies.pop(domain, None) is not None
            self._negative.pop(domain, None)
            for key in [k for k in self._backoff if k[0] == domain]:
                del self._backoff[key]
        return self.store.delete(domain) or in_memory

    @property
    def max_entries(self) -> int:
        return self._policies.maxsize

    def entries(self) -> Iterator[Entry]:
        return self.store.entries()

    def purge_expired(self, now: float) -> int:
        """Drop expired policies from the store and from memory."""
        removed = self.store.purge_expired(now)
        if removed:
            with self._lock:
                for domain in [d for d, e in self._policies.items() if e.expires <= now]:
                    del self._policies[domain]
        return removed

    def count(self) -> int:
        return self.store.count()

    # --- negative answers

    def negative(self, domain: str) -> Optional[Result]:
        with self._lock:
            return self._negative.get(domain)

    def put_negative(self, result: Result) -> None:
        if self._negative_enabled:
            with self._lock:
                self._negative[result.domain] = result

    # --- fetch failure backoff

    def backoff(self, domain: str, policy_id: str) -> Optional[str]:
        """The reason of a recent failed fetch of this domain/id, if still backing off."""
        with self._lock:
            return self._backoff.get((domain, policy_id))

    def set_backoff(self, domain: str, policy_id: str, reason: str) -> None:
        if self._backoff_enabled:
            with self._lock:
                self._backoff[(domain, policy_id)] = reason
