"""The engine's DNS layer: TXT, MX (with implicit MX) and address lookups over dnspython.

Every dnspython failure becomes one of two typed errors: ``NoRecord`` (the name or the
record type does not exist) or ``TempDnsError`` (no usable answer now: timeout,
SERVFAIL, REFUSED, network error). Nothing from dnspython escapes.

The lookups are coroutines on the engine's event loop (engine/loop.py): a query that
waits costs a socket, not a thread. Queries in flight at once are bounded by the
PriorityLimiter given as ``limiter`` ([dns] max_concurrent; each is a UDP socket, so a
file descriptor), waiting callers first (limits.py). dnspython's ``Resolver.resolve``
keeps all per-query state in a private ``_Resolution`` object and only reads the
resolver's settings, which nothing changes after ``__init__``; and no dnspython cache
is configured (the engine caches on its own).
"""

import asyncio
import contextlib
import dataclasses
import re
from typing import Optional, Tuple

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.rdatatype
import dns.resolver

from stsmilter import metrics
from stsmilter.engine.limits import PriorityLimiter

EDNS_PAYLOAD = 1232  # DNS flag day 2020: avoids both fragmentation and most TCP fallbacks
MIN_TRY_SECONDS = 0.5  # never give one server less than this for one try (unless the lifetime is shorter)
DEFAULT_NEGATIVE_TTL = 300  # implicit MX TTL when the NODATA answer carries no SOA

# Hostile-DNS caps. An _mta-sts name legitimately holds one TXT record; an RRset past these
# limits is broken or hostile. We refuse it as a whole (NoRecord) rather than return a
# prefix: which records came first is up to the server, so a prefix would make the result
# flap and could hide a second STSv1 record that makes the set invalid (RFC 8461 §3.1).
MAX_TXT_RECORDS = 50
MAX_TXT_BYTES = 8192
MAX_MX_HOSTS = 64
MAX_ADDRESSES = 16
MAX_TTL = 2**31 - 1  # RFC 2181 §8

_HOSTNAME = re.compile(r"[a-z0-9._-]+")


class DnsError(Exception):
    pass


class NoRecord(DnsError):
    """NXDOMAIN or NODATA: the answer is authoritative and empty."""


class TempDnsError(DnsError):
    """No answer now (timeout, SERVFAIL, REFUSED, network): retry later."""


@dataclasses.dataclass(frozen=True)
class MxSet:
    hosts: Tuple[str, ...]  # by preference then name; () for null MX or if every name was unusable
    ttl: int  # the MX RRset TTL (lowered by any CNAME on the way); implicit MX: the negative TTL
    null_mx: bool = False  # RFC 7505: the domain accepts no mail
    # The resolver set AD: it validated the answer with DNSSEC. Meaningful only from a
    # validating resolver asked with the DO bit (dane.DaneResolver); False otherwise.
    authenticated: bool = False


@dataclasses.dataclass(frozen=True)
class TxtSet:
    records: Tuple[str, ...]  # one str per TXT record, its character-strings joined
    # The TXT RRset TTL, lowered by any CNAME on the way: how long the answer may be
    # reused (RFC 8461 §3.3 / §5.1: a changed id is noticed once it has passed).
    ttl: int


class Resolver:
    def __init__(self, nameservers=(), port=53, timeout=5.0, limiter: Optional[PriorityLimiter] = None):
        self.timeout = timeout
        self.limiter = limiter  # None: unbounded (one-shot commands, tests)
        try:
            if nameservers:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.port = port
                resolver.nameservers = list(nameservers)
            else:
                resolver = dns.asyncresolver.Resolver()  # /etc/resolv.conf
        except (dns.exception.DNSException, OSError, ValueError) as e:
            raise DnsError(f"no usable resolver configuration: {e}") from None
        # Loaded now, not on the first query: the daemon may run as a user that cannot
        # read the Python installation once privileges are dropped.
        self._backend = dns.asyncbackend.get_backend("asyncio")
        resolver.cache = None
        resolver.use_search_by_default = False
        resolver.retry_servfail = False  # a SERVFAIL is an answer; the engine decides when to ask again
        resolver.use_edns(0, 0, EDNS_PAYLOAD)
        resolver.lifetime = timeout
        # Per-try timeout: every server gets two tries within the lifetime. dnspython sleeps
        # (0.1 s, then 0.2 s, ...) between rounds over the server list, so two rounds bound
        # the overrun of a lifetime to about 0.2 s.
        servers = max(1, len(resolver.nameservers))
        resolver.timeout = max(timeout / (2 * servers), min(timeout, MIN_TRY_SECONDS))
        self._resolver = resolver

    # -- public API -------------------------------------------------------------------

    async def txt(self, name, lifetime=None):
        """The TXT RRset as a TxtSet: one str per record, its character-strings joined
        without separator, and the answer's TTL.

        Decoded as latin-1 so that every byte maps to one character: non-ASCII bytes stay
        visibly non-ASCII for the policy parser, which rejects them. An RRset past the
        hostile-DNS caps raises NoRecord (see MAX_TXT_RECORDS).
        """
        answer = await self._query(name, dns.rdatatype.TXT, lifetime)
        rrset = answer.rrset
        if rrset is None:
            raise NoRecord("NODATA")
        records = [b"".join(rdata.strings) for rdata in rrset]
        if len(records) > MAX_TXT_RECORDS or sum(map(len, records)) > MAX_TXT_BYTES:
            raise NoRecord("oversized TXT RRset")
        ttl = answer.chaining_result.minimum_ttl  # CNAME TTLs included
        if ttl > MAX_TTL:  # RFC 2181 §8: a TTL with the top bit set counts as zero
            ttl = 0
        return TxtSet(tuple(record.decode("latin-1") for record in records), ttl)

    async def mx(self, domain, lifetime=None):
        """The domain's MX hosts; implicit MX (RFC 5321 §5.1) if it has none; null MX (RFC 7505)."""
        domain = domain.lower().rstrip(".")
        answer = await self._query(domain, dns.rdatatype.MX, lifetime)
        rrset = answer.rrset
        authenticated = bool(answer.response.flags & dns.flags.AD)
        if rrset is None:
            return MxSet(hosts=(domain,), ttl=_negative_ttl(answer.response), authenticated=authenticated)
        ttl = answer.chaining_result.minimum_ttl  # CNAME TTLs included
        if all(rdata.exchange == dns.name.root for rdata in rrset):
            return MxSet(hosts=(), ttl=ttl, null_mx=True, authenticated=authenticated)
        hosts = {}  # dict as an ordered set: a host listed twice keeps its best preference
        for _preference, host in sorted((rdata.preference, _host_text(rdata.exchange)) for rdata in rrset):
            # A "." mixed with real MX records is invalid (RFC 7505 §3) and unusable: skip it.
            if host and _HOSTNAME.fullmatch(host):
                hosts.setdefault(host)
                if len(hosts) == MAX_MX_HOSTS:
                    break
        return MxSet(hosts=tuple(hosts), ttl=ttl, authenticated=authenticated)

    async def addresses(self, host, lifetime=None):
        """A and AAAA addresses of host (A first), both asked at once within lifetime.
        One family failing is fine if the other answers."""
        lifetime = self.timeout if lifetime is None else lifetime
        outcomes = await asyncio.gather(
            self._query(host, dns.rdatatype.A, lifetime),
            self._query(host, dns.rdatatype.AAAA, lifetime),
            return_exceptions=True,
        )
        found, temp_error = [], None
        for outcome in outcomes:
            if isinstance(outcome, TempDnsError):
                temp_error = temp_error or outcome
            elif isinstance(outcome, BaseException):
                if not isinstance(outcome, NoRecord):
                    raise outcome  # cancelled (the caller's deadline), or a bug
            else:
                found.extend(rdata.address for rdata in outcome.rrset or ())
        if found:
            return found[:MAX_ADDRESSES]
        raise temp_error or NoRecord("no address")

    # -- dnspython boundary -----------------------------------------------------------

    async def _query(self, name, rdtype, lifetime):
        """dnspython's Answer (.rrset None for NODATA); NXDOMAIN -> NoRecord, failures -> TempDnsError.
        The lifetime counts from the call: time spent waiting for a slot is part of it."""
        try:
            qname = dns.name.from_text(name)  # absolute: a trailing dot is optional
        except (dns.exception.DNSException, ValueError) as e:
            # Too long, empty label, ...: such a name cannot exist in the DNS.
            raise NoRecord(f"invalid name: {e}") from None
        lifetime = self.timeout if lifetime is None else lifetime
        loop = asyncio.get_running_loop()
        end = loop.time() + lifetime
        try:
            async with self._slot(lifetime):
                answer = await self._resolver.resolve(
                    qname,
                    rdtype,
                    raise_on_no_answer=False,
                    lifetime=max(0.001, end - loop.time()),
                    search=False,
                    backend=self._backend,
                )
        except dns.resolver.NXDOMAIN:
            raise NoRecord("NXDOMAIN") from None
        except dns.resolver.NoAnswer:  # only if raise_on_no_answer were set; kept for safety
            raise NoRecord("NODATA") from None
        except (dns.exception.Timeout, TimeoutError):  # LifetimeTimeout is a subclass; ours: no slot in time
            raise _temp_failure(rdtype, "timeout", "timeout") from None
        except dns.resolver.NoNameservers as e:
            reason, error = _nameserver_failure(e)
            raise _temp_failure(rdtype, reason, error) from None
        except dns.exception.DNSException as e:
            raise _temp_failure(rdtype, type(e).__name__, "other") from None
        except (OSError, EOFError) as e:
            raise _temp_failure(rdtype, type(e).__name__, "network") from None
        return answer

    @contextlib.asynccontextmanager
    async def _slot(self, lifetime):
        """One of the limiter's slots, waited for at most lifetime (TimeoutError)."""
        if self.limiter is None:
            yield
            return
        async with asyncio.timeout(lifetime):
            await self.limiter.acquire()
        try:
            yield
        finally:
            self.limiter.release()


def _temp_failure(rdtype, reason, error):
    """TempDnsError(reason), counted in stsmilter_dns_failures_total{type,error}."""
    metrics.DNS_FAILURES.labels(type=dns.rdatatype.to_text(rdtype).lower(), error=error).inc()
    return TempDnsError(reason)


def _host_text(name):
    """Lower-case, no trailing dot; '' for the root. Odd bytes come out \\-escaped and so fail _HOSTNAME."""
    return name.to_text(omit_final_dot=True).lower() if name != dns.name.root else ""


def _negative_ttl(response):
    """RFC 2308 §5: the TTL of a NODATA answer is min(SOA TTL, SOA MINIMUM)."""
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return min(rrset.ttl, rrset[0].minimum)
    return DEFAULT_NEGATIVE_TTL


def _nameserver_failure(error):
    """(reason, metric error label) from dnspython's per-server error list: ("SERVFAIL",
    "servfail"), ("REFUSED", "refused"), ("ConnectionRefusedError", "network"), ..."""
    for _server, _tcp, _port, reason, _response in error.kwargs.get("errors") or ():
        if isinstance(reason, str):
            return reason, reason.lower() if reason in ("SERVFAIL", "REFUSED") else "other"
        return type(reason).__name__, "network" if isinstance(reason, (OSError, EOFError)) else "other"
    return "no nameservers", "other"
