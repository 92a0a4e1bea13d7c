"""Domains without a usable _mta-sts TXT record, each remembered for [cache] negative_ttl.

Most domains a sender mails publish no MTA-STS policy, so these entries outnumber the
cached policies by far; each costs only its domain string, one dict slot and one deque
slot (about 120 bytes at a million entries with ~17-character names; README "Sizing").

- ``_entries``: dict domain -> stamp. A stamp is a tuple (expires, reason) shared by
  every domain put in the same clock second with the same reason, so the time costs
  nothing per entry. Expiry is rounded up to the whole second: an entry lives for the
  TTL and less than one second more.
- ``_order``: deque of the domains in put order, each new stamp pushed before the first
  domain that uses it. Every entry lives equally long, so put order is expiry order:
  expired entries leave from the left, and when the cache is full the entry closest to
  its expiry is the one forgotten (it would have been asked again soonest anyway).

A domain can appear in ``_order`` more than once (put again while remembered: a forced
re-check), or after it was removed. Such a place is stale: ``_entries`` no longer maps
the domain to the stamp that place was put with, and it is skipped when it reaches the
left end. Puts prune from the left, so ``_order`` holds at most what was put within the
last TTL plus the live entries; compact() bounds it in any case.

Not thread-safe: PolicyCache calls it under its lock.
"""

from __future__ import annotations

import collections
import math
from typing import Callable, Deque, Dict, Optional, Tuple, Union

Stamp = Tuple[float, str]  # (expires, reason)


class NegativeCache:
    def __init__(self, maxsize: int, ttl: float, clock: Callable[[], float]) -> None:
        self.maxsize = maxsize
        self.ttl = ttl
        self.clock = clock
        self._entries: Dict[str, Stamp] = {}
        self._order: Deque[Union[str, Stamp]] = collections.deque()
        self._newest: Optional[Stamp] = None  # the stamp last pushed onto _order
        self._front: Optional[Stamp] = None  # the stamp of the domains now at the left end

    def __len__(self) -> int:
        return len(self._entries)

    def count(self) -> int:
        """Entries not expired by now (the expired ones are dropped first)."""
        self._expire(self.clock())
        return len(self._entries)

    def get(self, domain: str) -> Optional[str]:
        """The reason remembered for domain, or None (unknown or expired)."""
        stamp = self._entries.get(domain)
        if stamp is None or stamp[0] <= self.clock():
            return None
        return stamp[1]

    def put(self, domain: str, reason: str) -> None:
        if self.ttl <= 0:
            return
        now = self.clock()
        self._expire(now)
        expires = float(math.ceil(now + self.ttl))
        stamp = self._newest
        if stamp is None or stamp[0] != expires or stamp[1] != reason:
            stamp = self._newest = (expires, reason)
            self._order.append(stamp)
        self._entries[domain] = stamp
        self._order.append(domain)
        while len(self._entries) > self.maxsize and self._pop_left(None):
            pass
        if len(self._order) > 2 * self.maxsize + 64:
            self.compact()

    def pop(self, domain: str, default: Optional[str] = None) -> Optional[str]:
        """Forget domain (its place in _order turns stale); its reason, or default."""
        stamp = self._entries.pop(domain, None)
        return default if stamp is None else stamp[1]

    def _expire(self, now: float) -> None:
        while self._order and self._pop_left(now):
            pass

    def _pop_left(self, now: Optional[float]) -> bool:
        """Drop the leftmost live entry if it expired by now (None: whatever its expiry),
        with the stale places and stamps before it; False when nothing is left to drop."""
        order, entries = self._order, self._entries
        while order:
            item = order[0]
            if item.__class__ is tuple:  # a stamp: the domains after it carry it
                if now is not None and item[0] > now:
                    return False
                self._front = order.popleft()
                continue
            if entries.get(item) is self._front:  # type: ignore[arg-type]
                if now is not None and self._front[0] > now:  # type: ignore[index]
                    return False  # the front stamp's domains live on (an eviction reached past it)
                del entries[item]  # type: ignore[arg-type]
                order.popleft()
                return True
            order.popleft()  # stale
        return False

    def compact(self) -> None:
        """Rebuild _order without stale places (only reached if a caller keeps putting
        domains that are still remembered)."""
        kept: Deque[Union[str, Stamp]] = collections.deque()
        seen = set()
        stamp, pushed = self._front, None
        for item in self._order:
            if item.__class__ is tuple:
                stamp = item
            elif item not in seen and self._entries.get(item) is stamp:  # type: ignore[arg-type]
                seen.add(item)
                if pushed is not stamp:
                    kept.append(stamp)  # type: ignore[arg-type]
                    pushed = stamp
                kept.append(item)
        self._order = kept  # (it starts with a stamp: _front is set before it is next read)
        self._newest = pushed  # a put with another stamp pushes it
