"""Proactive refresh (RFC 8461 §10.2): cached policies are fetched again before they
expire, by a thread of the daemon's that starts a refresh job per due policy.

A mixin of Discovery (discovery.py), whose jobs it starts and whose TXT lookup and fetch
it uses: self.cache, self.fleet, self.engine, self.settings, self.clock, self._stopping,
self._start(), self._read_txt(), self._fetch(), self._cached(), self._discover().
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Optional

from stsmilter.engine.policy import Result
from stsmilter.engine.store import Entry
from stsmilter.threads import block_signals

log = logging.getLogger("stsmilter.discovery")


class ProactiveRefresh:
    def _shared_refresh(self, domain: str, entry: Entry) -> Optional[Result]:
        """For a refresh: the entry another daemon refetched since ours, if any."""
        stored = self.cache.reload(domain)
        return stored.result if stored is not None and stored.fetched_at > entry.fetched_at else None

    def refresh(self, domain: str) -> Result:
        """Refetch a cached policy now (the refresher's job; also `stsmilter cache`)."""
        return self._start(domain, "refresh", self._refresh).result()

    async def _refresh(self, domain: str, _force: bool) -> Result:
        entry = await self._cached(domain)
        if entry is None:
            return await self._discover(domain, False)
        # In a fleet one daemon refreshes it; the others skip it (and hear of the result).
        refreshed = await self.fleet.once(domain, lambda: self._shared_refresh(domain, entry),
                                          lambda: self._refresh_now(domain, entry), wait=False)
        return refreshed if refreshed is not None else entry.result

    async def _refresh_now(self, domain: str, entry: Entry) -> Result:
        now = self.clock()
        record, txt_ttl, _problem = await self._read_txt(domain)
        # A vanished TXT record does not end a cached policy; keep the id (and TTL) we know.
        if record is None:
            policy_id, txt_ttl = entry.policy_id, entry.txt_ttl
        else:
            policy_id = record.id
        if self.cache.backoff(domain, policy_id) is not None:
            return entry.result
        fetched = await self._fetch(domain, policy_id, now, txt_ttl)
        if isinstance(fetched, Entry):
            return fetched.result
        failing = dataclasses.replace(entry, refresh_failures=entry.refresh_failures + 1, last_error=fetched)
        await self.engine.blocking(self.cache.put, failing)
        return failing.result

    def refresh_due(self) -> int:
        """One refresher pass: drop expired policies, write what the store refused before,
        refresh due ones (a refresh_interval since their fetch, or past half their max_age),
        except those backing off or whose last lookup failed within dns_failure_ttl."""
        now = self.clock()
        self.cache.purge_expired(now)
        self.cache.flush()
        due = [
            e.domain
            for e in self.cache.due(now, self.settings.refresh_interval)
            if self.cache.backoff(e.domain, e.policy_id) is None and self.cache.failure(e.domain) is None
        ]
        for domain in due:
            if self._stopping.is_set():
                break
            self._start(domain, "refresh", self._refresh)
        return len(due)

    def start_refresher(self, period: float = 60.0) -> None:
        def loop() -> None:
            block_signals()
            while not self._stopping.wait(period):
                try:
                    self.refresh_due()
                except Exception:
                    log.exception("refresher pass failed")

        self._refresher = threading.Thread(target=loop, name="sts-refresher", daemon=True)
        self._refresher.start()
