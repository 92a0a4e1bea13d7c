"""DANE first (RFC 8461 §2): does DANE (RFC 7672) govern delivery to a domain?

RFC 8461 §2: a sender "MUST NOT allow MTA-STS Policy validation to override a failing
DANE validation". Postfix's TLS policy table replaces smtp_tls_security_level for the
destination, so a socketmap answer of "secure" would make Postfix check WebPKI instead
of the domain's TLSA records. Before the socketmap answers "secure", it asks this module.

Three parts:
- facts: DNSSEC-aware lookups (DO bit) through the configured resolver, trusting its AD
  bit as Postfix does, so the resolver must be a local validating one (unbound);
- evaluate(): a pure function from facts to a verdict (no I/O; mutation-tested);
- DaneChecker: verdict cache (record TTLs, at most [cache] mx_ttl), single flight, checks
  as coroutines on the engine's event loop (their DNS queries share the engine's bound,
  waiting callers first: limits.py), and peek() for the socketmap's synchronous fast path.

The verdict (the precedence rule, README "DANE and MTA-STS"):
  dane       the MX RRset is validated and at least one MX host has a validated TLSA
             RRset with a usable record: the socketmap answers "dane-only", so Postfix
             authenticates with DANE and skips MX hosts it cannot (never weaker than
             MTA-STS: no plaintext, no unauthenticated TLS);
  no-dane    DANE does not apply (unsigned MX RRset, no domain, null MX, no usable TLSA
             anywhere): the MTA-STS answer stands;
  dns-error  a lookup failed where the answer matters (the MX RRset, or a TLSA RRset
             while no other host is known to have DANE): the last good verdict if it is
             recent (KEEP_ON_FAILURE), otherwise TEMP: "secure" could override a DANE
             validation we could not see, "dane-only" could block a domain without DANE.

Not modelled, both as Postfix's defaults make them rare: TLSA at the target of an MX host
that is a CNAME (RFC 2181 §10.3 forbids MX aliases; we ask at the MX name), and MX hosts
whose address records are unsigned while their TLSA records are signed (RFC 7672 §2.2.2;
Postfix skips such a host under dane-only).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import dns.flags
import dns.rdatatype
# Imported now, not lazily on the first DNSSEC answer: the daemon may run as a user that
# cannot read the Python installation (FIELD-NOTES, "Dropping privileges").
import dns.rdtypes.ANY.CNAME  # noqa: F401
import dns.rdtypes.ANY.DNAME  # noqa: F401
import dns.rdtypes.ANY.DNSKEY  # noqa: F401
import dns.rdtypes.ANY.DS  # noqa: F401
import dns.rdtypes.ANY.NS  # noqa: F401
import dns.rdtypes.ANY.NSEC  # noqa: F401
import dns.rdtypes.ANY.NSEC3  # noqa: F401
import dns.rdtypes.ANY.RRSIG  # noqa: F401
import dns.rdtypes.ANY.SOA  # noqa: F401
import dns.rdtypes.ANY.TLSA  # noqa: F401

from stsmilter.engine import dns as sts_dns
from stsmilter import metrics
from stsmilter.engine.loop import EngineLoop
from stsmilter.engine.limits import Want
from stsmilter.ratelog import RateLimitedLog

log = logging.getLogger("stsmilter.dane")

# Verdicts
DANE = "dane"
NO_DANE = "no-dane"
DNS_ERROR = "dns-error"
PENDING = "pending"  # check() only: not done within the caller's timeout; never cached

# Lookup outcomes (facts)
FOUND = "found"  # records (for MX also: NODATA, i.e. implicit MX)
NONE = "none"  # NXDOMAIN, or NODATA for TLSA
FAILED = "failed"  # timeout, SERVFAIL (a validating resolver's answer to bogus data), ...

SMTP_PORT = 25  # RFC 7672 §2.2.2: the TLSA base for MX delivery is _25._tcp.<mx host>
DIGEST_LENGTHS = {1: 32, 2: 64}  # matching type -> digest length: SHA2-256, SHA2-512
RETRY_SECONDS = 30.0  # a dns-error verdict is asked again after this long
WARNING_INTERVAL = 1.0  # at most one failure line per second; the others are counted in it
KEEP_ON_FAILURE = 3600.0  # a good verdict survives lookup failures this long after its check
MAX_QUEUED_CHECKS = 10000


class MxFacts(NamedTuple):
    status: str  # FOUND | NONE | FAILED
    authenticated: bool = False  # AD bit: the validating resolver proved the answer
    hosts: Tuple[str, ...] = ()  # () for a null MX
    ttl: float = 0.0


class TlsaFacts(NamedTuple):
    host: str
    status: str  # FOUND | NONE | FAILED
    authenticated: bool = False
    records: Tuple[Tuple[int, int, int, bytes], ...] = ()  # (usage, selector, mtype, data)
    ttl: float = 0.0


# --- the pure part ------------------------------------------------------------------


def _der_sequence(data: bytes) -> bool:
    """data is one DER SEQUENCE of exactly its own length (a certificate or SPKI)."""
    if len(data) < 2 or data[0] != 0x30:
        return False
    if data[1] < 0x80:
        return 2 + data[1] == len(data)
    count = data[1] & 0x7F  # a length cut short reads smaller, so it cannot add up below
    if not 1 <= count <= 4:
        return False
    return 2 + count + int.from_bytes(data[2:2 + count], "big") == len(data)


def usable_tlsa(usage: int, selector: int, mtype: int, data: bytes) -> bool:
    """RFC 7672 §3.1 as Postfix applies it: DANE-TA(2) or DANE-EE(3) (PKIX-TA/EE are not
    usable for SMTP), selector Cert(0) or SPKI(1), matching type Full(0) holding one
    DER SEQUENCE, SHA2-256(1) of 32 bytes or SHA2-512(2) of 64 bytes."""
    if usage not in (2, 3) or selector not in (0, 1):
        return False
    if mtype == 0:
        return _der_sequence(data)
    return DIGEST_LENGTHS.get(mtype) == len(data)


def host_has_dane(tlsa: TlsaFacts) -> bool:
    """A validated TLSA RRset with at least one usable record: Postfix will use DANE."""
    return tlsa.status == FOUND and tlsa.authenticated and any(usable_tlsa(*r) for r in tlsa.records)


def evaluate(mx: MxFacts, tlsa: Sequence[TlsaFacts]) -> str:
    """DANE, NO_DANE or DNS_ERROR from the facts gathered (see the module docstring).
    tlsa may cover only some MX hosts (the checker stops at the first with DANE, or at
    its deadline); an unchecked host counts as unknown."""
    if mx.status == FAILED:
        return DNS_ERROR
    if mx.status != FOUND or not mx.authenticated or not mx.hosts:
        return NO_DANE
    if any(host_has_dane(t) for t in tlsa):
        return DANE
    checked = {t.host for t in tlsa if t.status != FAILED}
    if not checked.issuperset(mx.hosts):
        return DNS_ERROR
    return NO_DANE


# --- the DNS part -------------------------------------------------------------------


class DaneResolver(sts_dns.Resolver):
    """The engine's Resolver (same servers, timeouts and error mapping) asking with the
    DO bit, so that a validating resolver reports validation in the AD bit."""

    def __init__(self, nameservers=(), port=53, timeout=5.0, limiter=None):
        super().__init__(nameservers, port, timeout, limiter)
        self._resolver.use_edns(0, dns.flags.DO, sts_dns.EDNS_PAYLOAD)

    async def mx_facts(self, domain: str, lifetime: Optional[float] = None) -> MxFacts:
        try:
            mx_set = await self.mx(domain, lifetime)
        except sts_dns.NoRecord:
            return MxFacts(NONE, ttl=sts_dns.DEFAULT_NEGATIVE_TTL)
        except sts_dns.TempDnsError as e:
            log.debug("DANE: MX lookup for %s failed: %s", domain, e)
            return MxFacts(FAILED)
        return MxFacts(FOUND, mx_set.authenticated, mx_set.hosts, float(mx_set.ttl))

    async def tlsa_facts(self, host: str, lifetime: Optional[float] = None) -> TlsaFacts:
        try:
            answer = await self._query(f"_{SMTP_PORT}._tcp.{host}", dns.rdatatype.TLSA, lifetime)
        except sts_dns.NoRecord:
            return TlsaFacts(host, NONE, ttl=sts_dns.DEFAULT_NEGATIVE_TTL)
        except sts_dns.TempDnsError as e:
            log.debug("DANE: TLSA lookup for %s failed: %s", host, e)
            return TlsaFacts(host, FAILED)
        authenticated = bool(answer.response.flags & dns.flags.AD)
        if answer.rrset is None:
            # NODATA: the RFC 2308 negative TTL, as dns.py computes it for an implicit MX.
            return TlsaFacts(host, NONE, authenticated, ttl=sts_dns._negative_ttl(answer.response))
        # No cap on the record count: a 64 KiB message bounds it, and only the verdict is kept.
        records = tuple((r.usage, r.selector, r.mtype, r.cert) for r in answer.rrset)
        return TlsaFacts(host, FOUND, authenticated, records, float(answer.chaining_result.minimum_ttl))


# --- the checker --------------------------------------------------------------------


class Verdict(NamedTuple):
    """Immutable; the socketmap compares verdicts by identity to reuse a built reply."""

    kind: str  # DANE | NO_DANE | DNS_ERROR | PENDING
    expires: float  # clock() time after which the verdict is checked again
    checked_at: float  # clock() time of the lookups that produced kind
    detail: str = ""  # for logs: which host, which failure


class Settings(NamedTuple):
    mx_ttl: float = 300.0  # [cache] mx_ttl: upper bound of a verdict's lifetime
    max_entries: int = 200000  # [cache] max_entries


_CHECKS = {kind: metrics.DANE_CHECKS.labels(verdict=kind) for kind in (DANE, NO_DANE, DNS_ERROR)}


class DaneChecker:
    """Thread-safe. peek() never blocks; check() waits at most its timeout; a check that
    outlives its caller goes on and fills the cache."""

    def __init__(self, resolver: DaneResolver, settings: Settings = Settings(),
                 clock: Callable[[], float] = time.monotonic, *, engine: EngineLoop) -> None:
        self.resolver, self.settings, self.clock = resolver, settings, clock
        # A plain dict, read without the lock (one atomic get under the GIL) on the
        # socketmap's hot path; writers hold the lock and evict the oldest entry.
        self._verdicts: Dict[str, Verdict] = {}
        self._lock = threading.Lock()
        self._jobs: Dict[str, Tuple[concurrent.futures.Future, Want]] = {}
        self._closed = False
        self.engine = engine  # the discovery's loop: closed with it, not with the checker
        # One line per failure, but at most one per WARNING_INTERVAL: a resolver outage
        # fails every domain at once (stsmilter_dane_checks_total counts them all).
        self._failures = RateLimitedLog(log, WARNING_INTERVAL, clock, " (%d more DANE check failures not logged)")

    def reconfigure(self, resolver: DaneResolver, settings: Settings) -> None:
        """Config reload: new resolver and bounds for checks started from now on."""
        self.resolver, self.settings = resolver, settings

    def peek(self, domain: str) -> Optional[Verdict]:
        verdict = self._verdicts.get(domain)
        if verdict is not None and verdict.expires > self.clock():
            return verdict
        return None

    def check(self, domain: str, timeout: Optional[float] = None) -> Verdict:
        verdict = self.peek(domain)
        if verdict is not None:
            return verdict
        try:
            return self.submit(domain, wait=timeout).result(timeout)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            return self._pending("DANE check not done in time")

    def submit(self, domain: str, wait: Optional[float] = None) -> concurrent.futures.Future:
        """Start (or join) the check of domain. wait: the caller waits that many seconds
        for it; until then its DNS queries go before background work (limits.py)."""
        until = time.monotonic() + (wait if wait is not None else 0.0)
        with self._lock:
            job = self._jobs.get(domain)
            if job is None:
                if self._closed or len(self._jobs) >= MAX_QUEUED_CHECKS:
                    refused: concurrent.futures.Future = concurrent.futures.Future()
                    refused.set_result(self._pending("DANE checker closed" if self._closed
                                                     else "too many DANE checks queued"))
                    return refused
                want = Want(until, self.engine.loop)
                job = self._jobs[domain] = (self.engine.submit(self._run(domain), want), want)
        job[1].extend(until)
        return job[0]

    def close(self) -> None:
        """A reload that sets [socketmap] dane = no, or shutdown. The socketmap (until its
        update) and open milter connections may still ask: they get PENDING (the on_timeout
        answer), as do checks submitted from now on; checks under way end as they would
        (a cancelled future is an exception in every waiter)."""
        with self._lock:
            self._closed = True

    def _pending(self, detail: str) -> Verdict:
        now = self.clock()
        return Verdict(PENDING, now, now, detail)

    async def _run(self, domain: str) -> Verdict:
        try:
            if self._closed:
                return self._pending("DANE checker closed")
            verdict = await self._check(domain)
        except Exception:
            log.exception("DANE check of %s failed unexpectedly", domain)
            now = self.clock()  # stored, so that a bug is not re-run (and logged) per request
            verdict = self._store(domain, Verdict(DNS_ERROR, now + RETRY_SECONDS, now, "internal error"))
        finally:
            with self._lock:
                self._jobs.pop(domain, None)
        return verdict

    async def _check(self, domain: str) -> Verdict:
        resolver, settings = self.resolver, self.settings
        started = self.clock()
        deadline = started + resolver.timeout
        mx = await resolver.mx_facts(domain)
        facts = []
        if mx.status == FOUND and mx.authenticated:
            for host in mx.hosts:
                left = deadline - self.clock()
                if left <= 0:
                    break
                facts.append(await resolver.tlsa_facts(host, left))
                if host_has_dane(facts[-1]):
                    break  # one DANE host decides (evaluate); the others cannot change it
        kind = evaluate(mx, facts)
        _CHECKS[kind].inc()
        now = self.clock()
        if kind == DNS_ERROR:
            failed = [t.host for t in facts if t.status == FAILED]
            detail = "MX lookup failed" if mx.status == FAILED else "TLSA lookup failed for " + (
                ", ".join(failed[:3]) if failed else "hosts not reached in time")
            previous = self._verdicts.get(domain)
            if previous is not None and previous.kind in (DANE, NO_DANE) and now - previous.checked_at < KEEP_ON_FAILURE:
                self._warn("DANE check of %s: %s; keeping the verdict of %.0f s ago (%s)",
                           domain, detail, now - previous.checked_at, previous.kind)
                return self._store(domain, previous._replace(expires=now + min(RETRY_SECONDS, settings.mx_ttl)))
            self._warn("DANE check of %s: %s; the socketmap answers TEMP", domain, detail)
            return self._store(domain, Verdict(DNS_ERROR, now + min(RETRY_SECONDS, settings.mx_ttl), now, detail))
        ttls = [mx.ttl] + [t.ttl for t in facts]
        detail = next((t.host for t in facts if host_has_dane(t)), "") if kind == DANE else ""
        return self._store(domain, Verdict(kind, now + max(0.0, min(ttls + [settings.mx_ttl])), now, detail))

    def _warn(self, message: str, *args) -> None:
        self._failures.log("failure", logging.WARNING, message, *args)

    def _store(self, domain: str, verdict: Verdict) -> Verdict:
        with self._lock:
            self._verdicts.pop(domain, None)
            if len(self._verdicts) >= self.settings.max_entries:
                del self._verdicts[next(iter(self._verdicts))]  # the oldest insertion
            self._verdicts[domain] = verdict
        return verdict
