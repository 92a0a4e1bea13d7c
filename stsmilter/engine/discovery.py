"""MTA-STS policy discovery (RFC 8461 §3.3, §5.1): cache, TXT id, fetch.

The front-end API is thread-safe and synchronous: lookup() may wait up to a deadline,
peek() never waits. The work runs as coroutines on the engine's event loop
(engine/loop.py), so a destination whose DNS or policy host does not answer holds a
socket, not a thread: a burst of dead destinations grows the number of coroutines, and
a good domain looked up meanwhile costs only its own time. What is bounded is the DNS
queries and the HTTPS fetches in flight ([dns] and [fetch] max_concurrent), and at those
bounds work that a caller is waiting for goes first (limits.py). Concurrent requests for
one domain share one job (single flight); a caller that stops waiting gets "pending"
while its job goes on and fills the cache.

Rules, in the order the job applies them:
- A failed lookup remembered for [cache] dns_failure_ttl (its TXT lookup failed, or its
  policy host hung): answered as that failure was, without a new query: the cached
  policy if there is one, else "failed".
- TXT record absent/invalid: an unexpired cached policy still applies (an attacker can
  hide the record); with nothing cached the answer is "none", cached negative_ttl.
- TXT lookup failed (timeout, SERVFAIL): cached policy if any, else "failed"/dns-error:
  never "none", so a DNS outage cannot switch enforcement off. Remembered (above).
- TXT id equal to the cached policy's id: the cached policy, no fetch. The id is checked
  again once the record's DNS TTL has passed (RFC 8461 §3.3, §5.1: a new id is noticed
  within the TTL), but not sooner than id_check_min_interval (a TTL of 0 must not mean a
  DNS query per lookup) and never later than id_check_interval.
- New id, or nothing cached: fetch; a failed fetch keeps the cached policy until it
  expires and is not retried for this domain/id for failure_backoff. A fetch that ran
  out of time (a policy host that hangs or drips) is also remembered as a failed lookup.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Callable, Dict, NamedTuple, Optional, Tuple

from cachetools import LRUCache

from stsmilter.engine import dns, policy
from stsmilter import metrics
from stsmilter.engine.cache import PolicyCache
from stsmilter.engine.loop import EngineLoop
from stsmilter.engine.fetch import FetchError, Fetcher
from stsmilter.engine.fleet import Fleet
from stsmilter.engine.limits import PriorityLimiter, Want
from stsmilter.engine.policy import FAILED, NONE, PENDING, Result
from stsmilter.engine.refresh import ProactiveRefresh
from stsmilter.ratelog import RateLimitedLog
from stsmilter.engine.store import Entry, make_entry

log = logging.getLogger("stsmilter.discovery")

# A forced re-check (before a permanent reject) accepts a policy fetched this recently.
FORCE_FRESH_SECONDS = 60.0
# Jobs in flight beyond this many are refused ("pending"): bounds memory under a flood of
# new domains.
MAX_QUEUED_JOBS = 10000
# An MX lookup for the milter is given up this long after its own DNS lifetime.
MX_GRACE_SECONDS = 0.5

_HIT = metrics.CACHE_LOOKUPS.labels(result="hit")
_NEGATIVE = metrics.CACHE_LOOKUPS.labels(result="negative")
_MISS = metrics.CACHE_LOOKUPS.labels(result="miss")
_STALE = metrics.CACHE_LOOKUPS.labels(result="stale")
_FAILURE = metrics.CACHE_LOOKUPS.labels(result="failure")


@dataclasses.dataclass(frozen=True)
class Settings:
    id_check_interval: float = 300.0  # the longest a TXT id goes unchecked
    id_check_min_interval: float = 60.0  # the floor under a short TXT TTL
    refresh_interval: float = 86400.0
    mx_ttl: float = 300.0
    max_concurrent: int = 1024  # HTTPS fetches in flight at once
    # The daemon answers from an unexpired cached policy at once and re-checks its TXT
    # id in the background; a one-shot command (query, check) waits for the re-check.
    recheck_in_background: bool = True

    @classmethod
    def from_config(cls, config) -> "Settings":
        return cls(
            id_check_interval=config.cache.id_check_interval,
            id_check_min_interval=config.cache.id_check_min_interval,
            refresh_interval=config.cache.refresh_interval,
            mx_ttl=config.cache.mx_ttl,
            max_concurrent=config.fetch.max_concurrent,
        )


class _Job(NamedTuple):
    future: concurrent.futures.Future
    want: Want  # until when a caller waits for it


class Discovery(ProactiveRefresh):
    def __init__(
        self,
        resolver: dns.Resolver,
        fetcher: Fetcher,
        cache: PolicyCache,
        settings: Settings = Settings(),
        clock: Callable[[], float] = time.time,
        fleet: Optional[Fleet] = None,
        engine: Optional[EngineLoop] = None,
    ) -> None:
        self.resolver = resolver
        self.fetcher = fetcher
        self.cache = cache
        self.settings = settings
        self.clock = clock
        # The loop every job runs on; closed with the Discovery (the DANE checker shares it).
        self.engine = engine if engine is not None else EngineLoop()
        # Other daemons sharing the store (fleet.SharedFleet), or nobody (Fleet).
        self.fleet = fleet if fleet is not None else Fleet()
        self.fleet.bind(self.engine)
        self.fetch_slots = PriorityLimiter(settings.max_concurrent, "fetch")
        self._lock = threading.Lock()
        # A resolver outage fails every new domain's TXT lookup: one line a minute says so,
        # stsmilter_dns_failures_total counts each one.
        self._txt_failures = RateLimitedLog(log, clock=clock, left_out=" (%d more TXT lookup failures since the last such line)")
        self._jobs: Dict[Tuple[str, str], _Job] = {}
        self._mx_cache: LRUCache = LRUCache(maxsize=max(1000, cache.max_entries))
        self._refresher: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        # The DANE checker (dane.DaneChecker) when [socketmap] dane = auto; set by
        # engine/__init__.py. The front ends read it so that DANE-governed domains are not judged
        # by their MTA-STS policy alone (RFC 8461 §2).
        self.dane = None
        # The MX TLS checker (mxtls_checker.MxTlsChecker) when [probe] enabled = yes; set by
        # engine/__init__.py. The Decider reads it: the milter refuses what delivery would.
        self.mxtls = None

    def reconfigure(self, resolver: dns.Resolver, fetcher: Fetcher, settings: Settings) -> None:
        """Config reload: new DNS/fetch settings for jobs started from now on; the cache,
        the jobs under way and the bounds stay (they are read at start only)."""
        self.resolver, self.fetcher, self.settings = resolver, fetcher, settings

    def id_check_interval(self, entry: Entry) -> float:
        """Seconds after entry.checked_at until its TXT id is checked again: the record's
        TTL (RFC 8461 §3.3, §5.1), at least id_check_min_interval, at most
        id_check_interval (which alone applies when the TTL is not known)."""
        settings = self.settings
        if entry.txt_ttl is None:
            return settings.id_check_interval
        return min(settings.id_check_interval, max(entry.txt_ttl, settings.id_check_min_interval))

    # --- front-end API

    def _cached_answer(self, domain: str, entry: Optional[Entry], now: float, background: bool) -> Optional[Result]:
        """An unexpired cached policy's answer: a hit, or (background) a stale one whose
        TXT id re-check is started without waiting (unless the domain's last lookup
        failed recently). None: nothing usable, or a due re-check the caller waits for."""
        if entry is None or entry.expires <= now:
            return None
        if now - entry.checked_at < self.id_check_interval(entry):
            _HIT.inc()
            return entry.result
        if not background:
            return None
        _STALE.inc()
        if self.cache.failure(domain) is None:
            self.submit(domain)
        return entry.result

    def _remembered_failure(self, domain: str, entry: Optional[Entry], now: float) -> Optional[Result]:
        """The answer to a domain whose lookup failed within dns_failure_ttl, if so."""
        failure = self.cache.failure(domain)
        if failure is None:
            return None
        _FAILURE.inc()
        return entry.result if entry is not None and entry.expires > now else failure

    def peek(self, domain: str) -> Optional[Result]:
        """A usable answer from memory, or None. Never blocks; when the cached policy's TXT
        id is due for a re-check it still answers and starts the check in the background."""
        entry, now = self.cache.peek(domain), self.clock()
        cached = self._cached_answer(domain, entry, now, background=True)
        if cached is not None:
            return cached
        negative = self.cache.negative(domain)
        if negative is not None:
            _NEGATIVE.inc()
            return negative
        failure = self._remembered_failure(domain, None, now)
        if failure is None:
            _MISS.inc()
        return failure

    def lookup(self, domain: str, timeout: Optional[float] = None, force: bool = False) -> Result:
        """The policy that applies to domain (normalized A-label). With force, the TXT id is
        re-checked and the policy refetched unless fetched within FORCE_FRESH_SECONDS;
        such a result has source "fetched". Status "pending" if not done within timeout."""
        entry = None
        if not force:
            entry, now = self.cache.get(domain), self.clock()
            cached = self._cached_answer(domain, entry, now, self.settings.recheck_in_background)
            if cached is not None:
                return cached
            if entry is None or entry.expires <= now:  # an expired policy no longer applies (RFC 8461 §5.1)
                negative = self.cache.negative(domain)
                if negative is not None:
                    _NEGATIVE.inc()
                    return negative
            failure = self._remembered_failure(domain, entry, now)
            if failure is not None:
                return failure
            (_STALE if entry is not None else _MISS).inc()
        future = self.submit(domain, force=force, wait=timeout)
        try:
            return future.result(timeout)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            if entry is not None and entry.expires > self.clock():
                return entry.result  # the re-check is late; the cached policy still holds
            return Result(domain, PENDING, reason="lookup-timeout")

    def submit(self, domain: str, force: bool = False, wait: Optional[float] = None) -> concurrent.futures.Future:
        """Start (or join) the discovery job for domain. wait: the caller waits that many
        seconds for it (until then its DNS queries and fetch go first); None: background."""
        return self._start(domain, "force" if force else "lookup", self._discover, wait)

    def mx(self, domain: str, timeout: Optional[float] = None) -> dns.MxSet:
        """The domain's MX set (implicit MX applied), cached up to min(DNS TTL, mx_ttl).
        Raises dns.TempDnsError / dns.NoRecord."""
        now = self.clock()
        with self._lock:
            cached = self._mx_cache.get(domain)
        if cached is not None and cached[1] > now:
            return cached[0]
        lifetime = self.resolver.timeout if timeout is None else timeout
        want = Want(time.monotonic() + lifetime)  # no loop: nobody joins an MX query to extend() it
        future = self.engine.submit(self.resolver.mx(domain, lifetime=lifetime), want)
        try:
            mx_set = future.result(lifetime + MX_GRACE_SECONDS)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            future.cancel()
            raise dns.TempDnsError("timeout") from None
        ttl = min(float(mx_set.ttl), self.settings.mx_ttl)
        if ttl > 0:
            with self._lock:
                self._mx_cache[domain] = (mx_set, now + ttl)
        return mx_set

    # --- jobs

    def _start(self, domain: str, kind: str, work: Callable, wait: Optional[float] = None) -> concurrent.futures.Future:
        until = time.monotonic() + wait if wait else 0.0
        key = (domain, kind)
        with self._lock:
            job = self._jobs.get(key)
            if job is None:
                if len(self._jobs) >= MAX_QUEUED_JOBS:
                    refused: concurrent.futures.Future = concurrent.futures.Future()
                    refused.set_result(Result(domain, PENDING, reason="overloaded"))
                    return refused
                want = Want(until, self.engine.loop)
                job = self._jobs[key] = _Job(self.engine.submit(self._run(key, work, domain, kind == "force"), want), want)
        job.want.extend(until)
        return job.future

    async def _run(self, key, work, domain: str, force: bool) -> Result:
        try:
            return await work(domain, force)
        except Exception:
            log.exception("discovery of %s failed unexpectedly", domain)
            return Result(domain, FAILED, reason="internal-error")
        finally:
            with self._lock:
                self._jobs.pop(key, None)

    async def _read_txt(self, domain: str) -> Tuple[Optional[policy.TxtRecord], Optional[int], Optional[str]]:
        """(record, its TTL, None) or (None, None, reason): no-txt-record,
        invalid-txt-record, dns-error (remembered for dns_failure_ttl)."""
        started = self.clock()
        try:
            txt = await self.resolver.txt("_mta-sts." + domain)
        except dns.NoRecord:
            return None, None, "no-txt-record"
        except dns.TempDnsError as e:
            self._txt_failures.log("txt", logging.INFO, "TXT lookup for _mta-sts.%s failed: %s", domain, e)
            self.cache.put_failure(domain, "dns-error", started=started)
            return None, None, "dns-error"
        record = policy.parse_txt(txt.records)
        if record is not None:
            return record, txt.ttl, None
        return None, None, "invalid-txt-record" if policy.sts_record_texts(txt.records) else "no-txt-record"

    async def _cached(self, domain: str) -> Optional[Entry]:
        """cache.get(domain): from memory alone if it holds everything the store does,
        else on a store thread."""
        if self.cache.complete:
            return self.cache.peek(domain)
        return await self.engine.blocking(self.cache.get, domain)

    async def _remember(self, method: Callable, *args) -> None:
        """A cache call that writes the store only when it is shared (put_negative,
        set_backoff): on a store thread then, else at once."""
        if self.cache.store.shared:
            await self.engine.blocking(method, *args)
        else:
            method(*args)

    async def _discover(self, domain: str, force: bool) -> Result:
        now = self.clock()
        entry = await self._cached(domain)
        usable = entry if entry is not None and entry.expires > now else None
        if force and usable is not None and now - usable.fetched_at < FORCE_FRESH_SECONDS:
            return dataclasses.replace(usable.result, source="fetched")
        failure = self.cache.failure(domain)
        if failure is not None:  # no new query, forced or not: the caller gets what a failure gets
            return usable.result if usable is not None else failure
        if not force:
            # A caller that missed the cache just before another job filled it lands here.
            if usable is not None and now - usable.checked_at < self.id_check_interval(usable):
                return usable.result
            negative = self.cache.negative(domain) if usable is None else None
            if negative is not None:
                return negative
            if usable is None:  # a first lookup: in a fleet, one daemon discovers it for all
                return await self.fleet.once(domain, lambda: self._shared_answer(domain),
                                             lambda: self._discover_now(domain, False, None))
        return await self._discover_now(domain, force, usable)

    async def _discover_now(self, domain: str, force: bool, usable: Optional[Entry]) -> Result:
        now = self.clock()
        record, txt_ttl, problem = await self._read_txt(domain)
        if record is None:
            if usable is not None:
                if problem != "dns-error":  # the record is gone: check again as its TTL said
                    await self.engine.blocking(self.cache.put, usable.confirmed(now, None))
                return usable.result
            result = Result(domain, FAILED if problem == "dns-error" else NONE, reason=problem)
            if problem != "dns-error":
                await self._remember(self.cache.put_negative, result, True, now)  # keeps domain and reason
            return result
        if usable is not None and usable.policy_id == record.id and not force:
            await self.engine.blocking(self.cache.put, usable.confirmed(now, txt_ttl))
            return usable.result
        failed = self.cache.backoff(domain, record.id)
        if failed is not None:
            if usable is not None:
                return usable.result
            return Result(domain, FAILED, reason=failed, source="cache", policy_id=record.id)
        if usable is None:
            fetched = await self._fetch(domain, record.id, now, txt_ttl)
        else:  # a new id, or a forced re-check: in a fleet, one daemon fetches it for all
            newer_than = now - FORCE_FRESH_SECONDS if force else usable.fetched_at
            fetched = await self.fleet.once(domain, lambda: self._shared_fetch(domain, record.id, newer_than),
                                            lambda: self._fetch(domain, record.id, now, txt_ttl))
        if isinstance(fetched, Entry):
            return dataclasses.replace(fetched.result, source="fetched")
        if usable is not None:
            return usable.result
        return Result(domain, FAILED, reason=fetched, policy_id=record.id)

    async def _fetch(self, domain: str, policy_id: str, now: float, txt_ttl: Optional[int]):
        """Fetch (within one of the fetch slots), parse and cache; the new Entry, or the
        failure reason (backoff set). txt_ttl: the TTL of the TXT record that named policy_id."""
        async with self.fetch_slots:
            started = time.monotonic()  # the fetch's own time, not its wait for a slot
            try:
                body = await self.fetcher.fetch(domain)
                new_policy = policy.parse_policy(body)
            except (FetchError, policy.PolicyError) as e:
                failure = e
            else:
                failure = None
        metrics.POLICY_FETCH_SECONDS.observe(time.monotonic() - started)
        if failure is not None:
            metrics.POLICY_FETCHES.labels(result=failure.reason).inc()
            log.warning("policy fetch for %s (id %s) failed: %s: %s", domain, policy_id, failure.reason, failure)
            if getattr(failure, "timed_out", False):  # a host that hangs: not asked again for a while
                self.cache.put_failure(domain, failure.reason, started=now)
            await self._remember(self.cache.set_backoff, domain, policy_id, failure.reason, True, now)
            return failure.reason
        metrics.POLICY_FETCHES.labels(result="ok").inc()
        entry = make_entry(domain, policy_id, new_policy, fetched_at=now, txt_ttl=txt_ttl)
        await self.engine.blocking(self.cache.put, entry)
        return entry

    # --- answers another daemon of the fleet put in the shared store (run on store threads)

    def _shared_answer(self, domain: str) -> Optional[Result]:
        """For a first lookup: a policy, or an answer without one, from the store."""
        entry = self.cache.reload(domain)
        if entry is not None and entry.expires > self.clock():
            return entry.result
        answer = self.cache.stored_answer(domain)
        if answer is not None:
            if answer.status == FAILED:
                self.cache.set_backoff(domain, answer.policy_id, answer.reason, share=False)
            else:
                self.cache.put_negative(answer, share=False)
        return answer

    def _shared_fetch(self, domain: str, policy_id: str, newer_than: float):
        """For a fetch of policy_id: the Entry another daemon fetched after newer_than, or
        the reason its fetch failed; None if neither is in the store."""
        entry = self.cache.reload(domain)
        if entry is not None and entry.policy_id == policy_id and entry.fetched_at > newer_than:
            return entry
        answer = self.cache.stored_answer(domain)
        if answer is not None and answer.status == FAILED and answer.policy_id == policy_id:
            self.cache.set_backoff(domain, policy_id, answer.reason, share=False)
            return answer.reason
        return None

    def close(self) -> None:
        if self.dane is not None:
            self.dane.close()
        if self.mxtls is not None:
            self.mxtls.close()
        self.fleet.close()
        self._stopping.set()
        if self._refresher is not None:
            self._refresher.join(timeout=5)
        self.engine.close()
