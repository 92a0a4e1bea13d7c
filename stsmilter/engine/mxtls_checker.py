"""MxTlsChecker: the MX TLS check's results per MX host, for the milter's Decider and
`stsmilter check` (mxtls.py's docstring: what is checked, the results, for how long
each is kept)."""

from __future__ import annotations

import concurrent.futures
import logging
import ssl
import threading
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

from stsmilter import metrics
from stsmilter.engine import dns as sts_dns
from stsmilter.engine.limits import PriorityLimiter, Want
from stsmilter.engine.loop import EngineLoop
from stsmilter.engine.mxtls import (
    FAILURES, OK, RESULTS, UNREACHABLE, WARNING_INTERVAL, HostResult, Settings, lifetime, one_line_detail,
)
from stsmilter.engine.mxtls_probe import probe
from stsmilter.ratelog import RateLimitedLog

log = logging.getLogger("stsmilter.mxtls")

MAX_QUEUED_CHECKS = 10000  # distinct hosts being checked at once; more are refused (no result)

_CHECKS = {kind: metrics.MX_CHECKS.labels(result=kind) for kind in RESULTS}


class MxTlsChecker:
    """Thread-safe. peek() and a check() whose hosts are all known never block or lock;
    check() waits at most its timeout; a check that outlives its caller goes on and fills
    the cache."""

    def __init__(self, resolver: sts_dns.Resolver, settings: Settings, context: ssl.SSLContext,
                 clock: Callable[[], float] = time.monotonic, *, engine: EngineLoop,
                 limiter: Optional[PriorityLimiter] = None, prober: Callable = probe) -> None:
        self.resolver, self.settings, self.context, self.clock = resolver, settings, context, clock
        self.prober = prober  # probe(); tests give a scripted one
        self.engine = engine  # the discovery's loop: closed with it
        self.limiter = limiter if limiter is not None else PriorityLimiter(64)
        # A plain dict read without the lock on the milter's path; writers hold the lock
        # and evict the oldest insertion at max_entries.
        self._results: Dict[str, HostResult] = {}
        # MX hosts asked about for an enforce domain whose result is a failure: the gauge.
        self._enforced: Dict[str, None] = {}
        self._lock = threading.Lock()
        self._jobs: Dict[str, Tuple[concurrent.futures.Future, Want]] = {}
        self._closed = False
        self._failures = RateLimitedLog(log, WARNING_INTERVAL, clock, " (%d more MX TLS check lines not logged)")
        metrics.MX_TLS_FAILING.set_function(self.failing_enforced)

    def reconfigure(self, resolver: sts_dns.Resolver, settings: Settings, context: ssl.SSLContext) -> None:
        """Config reload: for checks started from now on; the results stay."""
        self.resolver, self.settings, self.context = resolver, settings, context

    def peek(self, host: str) -> Optional[HostResult]:
        result = self._results.get(host)
        if result is not None and result.expires > self.clock():
            return result
        return None

    def check(self, hosts: Sequence[str], timeout: Optional[float] = None,
              enforce: bool = True) -> Tuple[Optional[HostResult], ...]:
        """The result of each host (None: unknown by the timeout). Hosts not known are
        checked (each once, whoever else asks); the wait ends as soon as one host is ok
        (the others' checks go on), all are known, or timeout passes. enforce: the
        hosts serve an enforce domain (stsmilter_mx_tls_failing_hosts)."""
        now = self.clock()
        results = [self._results.get(host) for host in hosts]
        missing = []
        for index, result in enumerate(results):
            if result is None or result.expires <= now:
                results[index] = None
                missing.append(index)
            elif enforce and result.kind in FAILURES and hosts[index] not in self._enforced:
                with self._lock:
                    self._enforced[hosts[index]] = None
        if not missing:
            return tuple(results)
        futures = {index: self.submit(hosts[index], wait=timeout, enforce=enforce) for index in missing}
        if not any(result is not None and result.kind == OK for result in results):
            self._wait(set(futures.values()), timeout)
        for index, future in futures.items():
            if future.done() and not future.cancelled() and future.exception() is None:
                results[index] = future.result()
        return tuple(results)

    @staticmethod
    def _wait(pending, timeout: Optional[float]) -> None:
        """Until every future is done, one of them is "ok", or timeout (seconds) passes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = concurrent.futures.wait(pending, left, concurrent.futures.FIRST_COMPLETED)
            if not done:
                return
            for future in done:
                if not future.cancelled() and future.exception() is None:
                    result = future.result()
                    if result is not None and result.kind == OK:
                        return

    def submit(self, host: str, wait: Optional[float] = None, enforce: bool = False) -> concurrent.futures.Future:
        """Start (or join) the check of host: a Future of its HostResult (None: refused,
        the checker is closed or too many checks wait). wait: the caller waits that many
        seconds; until then the check goes before background work (limits.py)."""
        until = time.monotonic() + (wait if wait is not None else 0.0)
        with self._lock:
            job = self._jobs.get(host)
            if job is None:
                # A check that ended since the caller looked: its result (stored before
                # the job goes), not a second check.
                known = self._results.get(host)
                if known is not None and known.expires > self.clock():
                    answer = known
                elif self._closed or len(self._jobs) >= MAX_QUEUED_CHECKS:
                    answer = None
                else:
                    want = Want(until, self.engine.loop)
                    job = self._jobs[host] = (self.engine.submit(self._run(host), want), want)
                if job is None:
                    done: concurrent.futures.Future = concurrent.futures.Future()
                    done.set_result(answer)
                    if enforce and answer is not None and answer.kind in FAILURES:
                        self._enforced[host] = None
                    return done
            if enforce:  # kept while the host has a job or a result (both bounded)
                self._enforced[host] = None
        job[1].extend(until)
        return job[0]

    def failing_enforced(self) -> int:
        """MX hosts of enforce domains whose current result is a definitive failure."""
        now = self.clock()
        results = self._results
        count = 0
        for host in list(self._enforced):
            result = results.get(host)
            if result is not None and result.kind in FAILURES and result.expires > now:
                count += 1
        return count

    def close(self) -> None:
        """A reload that sets [probe] enabled = no, or shutdown: checks under way end as
        they would; later checks are refused (unknown: the verdict without the check)."""
        with self._lock:
            self._closed = True
        metrics.MX_TLS_FAILING.set_function(lambda: 0)

    async def _run(self, host: str) -> Optional[HostResult]:
        try:
            if self._closed:
                return None
            settings = self.settings
            async with self.limiter:
                kind, detail = await self.prober(self.resolver, host, settings, self.context)
            return self._store(host, kind, one_line_detail(detail), settings)
        except Exception:
            log.exception("MX TLS check of %s failed unexpectedly", host)
            # Stored, so that a bug is not re-run (and logged) for every recipient.
            return self._store(host, UNREACHABLE, "internal error", self.settings)
        finally:
            with self._lock:
                self._jobs.pop(host, None)

    def _store(self, host: str, kind: str, detail: str, settings: Settings) -> HostResult:
        _CHECKS[kind].inc()
        now = self.clock()
        result = HostResult(kind, detail, now, now + lifetime(kind, settings))
        with self._lock:
            self._results.pop(host, None)
            if len(self._results) >= settings.max_entries:
                oldest = next(iter(self._results))
                del self._results[oldest]
                self._enforced.pop(oldest, None)
            self._results[host] = result
            if kind not in FAILURES:
                self._enforced.pop(host, None)
        if kind in FAILURES:
            self._failures.log("failure", logging.WARNING, "MX TLS check of %s: %s: %s", host, kind, detail)
        elif kind == UNREACHABLE:
            self._failures.log("unreachable", logging.INFO, "MX TLS check of %s: unreachable: %s", host, detail)
        else:
            log.debug("MX TLS check of %s: ok: %s", host, detail)
        return result
