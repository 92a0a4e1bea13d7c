"""dane.py: the pure verdict (evaluate, usable_tlsa), the checker's cache and failure
rules with a scripted resolver, and DaneResolver against a real validating unbound."""

import asyncio
import threading
import time

import pytest
from prometheus_client import REGISTRY

from stsmilter.engine import dane
from stsmilter.engine.dane import DANE, DNS_ERROR, FAILED, FOUND, NO_DANE, NONE, PENDING, MxFacts, TlsaFacts
from world.sync import Sync

SHA256 = b"\x11" * 32
SHA512 = b"\x22" * 64
CERT_DER = bytes([0x30, 0x03, 0x02, 0x01, 0x05])  # SEQUENCE { INTEGER 5 }
EE = (3, 1, 1, SHA256)
PKIX_EE = (1, 1, 1, SHA256)


# --- usable_tlsa: RFC 7672 §3.1 as Postfix applies it ------------------------------------

@pytest.mark.parametrize("record, usable", [
    ((3, 1, 1, SHA256), True),  # DANE-EE SPKI SHA2-256: the common record
    ((3, 0, 1, SHA256), True),  # full certificate, SHA2-256
    ((2, 0, 1, SHA256), True),  # DANE-TA
    ((2, 1, 2, SHA512), True),
    ((3, 1, 0, CERT_DER), True),  # full SPKI
    ((2, 0, 0, CERT_DER), True),
    ((0, 0, 1, SHA256), False),  # PKIX-TA: not usable for SMTP (RFC 7672 §3.1.3)
    ((1, 1, 1, SHA256), False),  # PKIX-EE
    ((4, 1, 1, SHA256), False),  # unassigned usage
    ((255, 1, 1, SHA256), False),
    ((3, 2, 1, SHA256), False),  # unassigned selector
    ((3, 1, 3, SHA256), False),  # unassigned matching type
    ((3, 1, 1, SHA256[:31]), False),  # digest too short
    ((3, 1, 1, SHA256 + b"\x00"), False),  # too long
    ((3, 1, 1, SHA512), False),  # SHA2-512 length under SHA2-256
    ((3, 1, 2, SHA256), False),  # and the other way round
    ((3, 1, 1, b""), False),
    ((3, 1, 0, b""), False),
    ((3, 1, 0, b"\x30"), False),  # a SEQUENCE tag without a length
    ((3, 1, 0, SHA256), False),  # full data that is not DER
    ((3, 1, 0, CERT_DER + b"\x00"), False),  # trailing garbage
    ((3, 1, 0, CERT_DER[:-1]), False),  # truncated
])
def test_usable_tlsa(record, usable):
    assert dane.usable_tlsa(*record) is usable


@pytest.mark.parametrize("data, ok", [
    (bytes([0x30, 0x00]), True),
    (bytes([0x30, 0x7F]) + b"x" * 0x7F, True),  # longest short form
    (bytes([0x30, 0x7F]) + b"x" * 0x7E, False),
    (bytes([0x30, 0x81, 0x80]) + b"x" * 0x80, True),  # long form, one length byte
    (bytes([0x30, 0x82, 0x01, 0x00]) + b"x" * 0x100, True),  # two length bytes
    (bytes([0x30, 0x82, 0x01, 0x00]) + b"x" * 0xFF, False),
    (bytes([0x30, 0x84, 0, 0, 0, 3]) + b"abc", True),  # four length bytes: the most allowed
    (bytes([0x30, 0x85, 0, 0, 0, 0, 3]) + b"abc", False),  # five
    (bytes([0x30, 0x80]) + b"abc\x00\x00", False),  # indefinite length: not DER
    (bytes([0x30, 0x80]) + b"x" * 0x80, False),  # 0x80 is not a short-form length of 128 (X.690 §8.1.3)
    (bytes([0x30, 0x81]), False),  # the length byte it announces is missing
    (bytes([0x30, 0x82, 0x01]), False),  # length bytes cut off
    (bytes([0x31, 0x00]), False),  # a SET, not a SEQUENCE
    (b"", False),
])
def test_der_sequence_framing(data, ok):
    assert dane._der_sequence(data) is ok


# --- host_has_dane and evaluate ----------------------------------------------------------

def tlsa(host="mx1.example", status=FOUND, authenticated=True, records=(EE,), ttl=300.0):
    return TlsaFacts(host, status, authenticated, records, ttl)


SIGNED_MX = MxFacts(FOUND, True, ("mx1.example", "mx2.example"), 300.0)


@pytest.mark.parametrize("facts, has", [
    (tlsa(), True),
    (tlsa(records=(PKIX_EE, EE)), True),  # one usable record is enough
    (tlsa(records=(PKIX_EE,)), False),  # only unusable records
    (tlsa(records=()), False),
    (tlsa(authenticated=False), False),  # not validated: an attacker could have forged it
    (tlsa(status=NONE, records=()), False),
    (tlsa(status=FAILED, records=()), False),
    (tlsa(status=NONE), False),  # status decides, not leftover records
])
def test_host_has_dane(facts, has):
    assert dane.host_has_dane(facts) is has


@pytest.mark.parametrize("mx, hosts, verdict", [
    # The MX RRset decides whether DANE can apply at all.
    (MxFacts(FAILED), [], DNS_ERROR),
    (MxFacts(NONE, True), [], NO_DANE),  # no such domain
    (MxFacts(FOUND, False, ("mx1.example", "mx2.example")), [tlsa(), tlsa("mx2.example")], NO_DANE),  # unsigned MX
    (MxFacts(FOUND, True, ()), [], NO_DANE),  # null MX
    # Every host with DANE, or one: dane-only (Postfix skips the hosts it cannot authenticate).
    (SIGNED_MX, [tlsa(), tlsa("mx2.example")], DANE),
    (SIGNED_MX, [tlsa()], DANE),  # the checker stopped at the first DANE host
    (SIGNED_MX, [tlsa(status=NONE, records=()), tlsa("mx2.example")], DANE),
    (SIGNED_MX, [tlsa(status=FAILED, records=()), tlsa("mx2.example")], DANE),
    # No host with DANE: the MTA-STS answer stands, unless a host is unknown.
    (SIGNED_MX, [tlsa(status=NONE, records=()), tlsa("mx2.example", status=NONE, records=())], NO_DANE),
    (SIGNED_MX, [tlsa(records=(PKIX_EE,)), tlsa("mx2.example", authenticated=False)], NO_DANE),
    (SIGNED_MX, [tlsa(status=NONE, records=()), tlsa("mx2.example", status=FAILED, records=())], DNS_ERROR),
    (SIGNED_MX, [tlsa(status=NONE, records=())], DNS_ERROR),  # mx2 not reached by the deadline
    (SIGNED_MX, [], DNS_ERROR),
    (SIGNED_MX, [tlsa(status=NONE, records=()), tlsa("other.example", status=NONE, records=())], DNS_ERROR),
])
def test_evaluate(mx, hosts, verdict):
    assert dane.evaluate(mx, hosts) == verdict


# --- DaneChecker with a scripted resolver -------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class ScriptedResolver:
    """mx_facts/tlsa_facts from dicts; records every call; optional gate to hold a lookup."""

    def __init__(self, mx, tlsa_by_host, timeout=5.0, clock=None, tlsa_cost=0.0):
        self.mx, self.tlsa_by_host, self.timeout = mx, dict(tlsa_by_host), timeout
        self.clock, self.tlsa_cost = clock, tlsa_cost
        self.calls = []
        self.gate = None

    async def mx_facts(self, domain, lifetime=None):
        self.calls.append(("mx", domain))
        if self.gate is not None:
            await asyncio.to_thread(self.gate.wait, 10)
        if isinstance(self.mx, Exception):
            raise self.mx
        return self.mx

    async def tlsa_facts(self, host, lifetime=None):
        self.calls.append(("tlsa", host, lifetime))
        if self.clock is not None:
            self.clock.now += self.tlsa_cost
        return self.tlsa_by_host.get(host, TlsaFacts(host, NONE, True, (), 60.0))


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def make_checker(clock, engine):
    checkers = []

    def make(resolver, **settings):
        checker = dane.DaneChecker(resolver, dane.Settings(**settings), clock=clock, engine=engine)
        checkers.append(checker)
        return checker

    yield make
    for checker in checkers:
        checker.close()


def counted(verdict):
    return REGISTRY.get_sample_value("stsmilter_dane_checks_total", {"verdict": verdict}) or 0.0


def test_verdict_is_cached_for_the_smallest_ttl(make_checker, clock):
    resolver = ScriptedResolver(MxFacts(FOUND, True, ("mx1.example",), 200.0), {"mx1.example": tlsa(ttl=120.0)})
    checker = make_checker(resolver)
    before = counted(DANE)
    verdict = checker.check("example.com")
    assert verdict.kind == DANE and verdict.detail == "mx1.example"
    assert verdict.expires == clock.now + 120.0 and verdict.checked_at == clock.now
    assert counted(DANE) == before + 1
    clock.now += 119.9
    assert checker.peek("example.com") is verdict  # the same object: the socketmap reuses its reply
    assert checker.check("example.com") is verdict
    assert len(resolver.calls) == 2  # one MX and one TLSA lookup in all
    clock.now += 0.1
    assert checker.peek("example.com") is None
    assert checker.check("example.com") is not verdict
    assert len(resolver.calls) == 4


def test_mx_ttl_bounds_the_cache(make_checker, clock):
    resolver = ScriptedResolver(MxFacts(FOUND, True, ("mx1.example",), 3600.0), {"mx1.example": tlsa(ttl=3600.0)})
    verdict = make_checker(resolver, mx_ttl=42.0).check("example.com")
    assert verdict.expires == clock.now + 42.0


def test_mx_ttl_zero_caches_nothing(make_checker, clock):
    resolver = ScriptedResolver(MxFacts(FOUND, True, ("mx1.example",), 300.0), {"mx1.example": tlsa()})
    checker = make_checker(resolver, mx_ttl=0.0)
    assert checker.check("example.com").kind == DANE
    assert checker.peek("example.com") is None


def test_unsigned_mx_asks_for_no_tlsa(make_checker):
    resolver = ScriptedResolver(MxFacts(FOUND, False, ("mx1.example",), 300.0), {"mx1.example": tlsa()})
    assert make_checker(resolver).check("example.com").kind == NO_DANE
    assert resolver.calls == [("mx", "example.com")]


def test_the_first_dane_host_ends_the_lookups(make_checker):
    hosts = ("mx1.example", "mx2.example", "mx3.example")
    resolver = ScriptedResolver(MxFacts(FOUND, True, hosts, 300.0),
                                {"mx2.example": tlsa("mx2.example"), "mx3.example": tlsa("mx3.example")})
    verdict = make_checker(resolver).check("example.com")
    assert verdict.kind == DANE and verdict.detail == "mx2.example"
    assert [c[1] for c in resolver.calls] == ["example.com", "mx1.example", "mx2.example"]


def test_no_dane_ttl_includes_the_negative_answers(make_checker, clock):
    resolver = ScriptedResolver(MxFacts(FOUND, True, ("mx1.example", "mx2.example"), 300.0), {})  # NODATA, ttl 60
    verdict = make_checker(resolver).check("example.com")
    assert verdict.kind == NO_DANE and verdict.expires == clock.now + 60.0


def test_hosts_left_when_the_deadline_passes_make_a_dns_error(make_checker, clock):
    hosts = tuple(f"mx{n}.example" for n in range(10))
    resolver = ScriptedResolver(MxFacts(FOUND, True, hosts, 300.0), {}, timeout=5.0, clock=clock, tlsa_cost=2.0)
    verdict = make_checker(resolver).check("example.com")
    assert verdict.kind == DNS_ERROR and "not reached in time" in verdict.detail
    lifetimes = [c[2] for c in resolver.calls if c[0] == "tlsa"]
    assert lifetimes == [5.0, 3.0, 1.0]  # each lookup gets only the time left


def test_dns_error_is_retried_soon(make_checker, clock, caplog):
    resolver = ScriptedResolver(MxFacts(FAILED), {})
    checker = make_checker(resolver)
    before = counted(DNS_ERROR)
    verdict = checker.check("example.com")
    assert verdict.kind == DNS_ERROR and verdict.detail == "MX lookup failed"
    assert verdict.expires == clock.now + dane.RETRY_SECONDS
    assert counted(DNS_ERROR) == before + 1
    assert [r.message for r in caplog.records if "example.com" in r.message] == [
        "DANE check of example.com: MX lookup failed; the socketmap answers TEMP"]
    assert make_checker(resolver, mx_ttl=5.0).check("example.com").expires == clock.now + 5.0


def test_failure_lines_are_rate_limited(make_checker, clock, caplog):
    checker = make_checker(ScriptedResolver(MxFacts(FAILED), {}))
    for n in range(5):
        checker.check(f"d{n}.example")
    clock.now += dane.WARNING_INTERVAL
    checker.check("last.example")
    assert [r.getMessage() for r in caplog.records] == [
        "DANE check of d0.example: MX lookup failed; the socketmap answers TEMP",
        "DANE check of last.example: MX lookup failed; the socketmap answers TEMP"
        " (4 more DANE check failures not logged)",
    ]


def test_a_failure_keeps_the_last_good_verdict_for_a_while(make_checker, clock):
    good = MxFacts(FOUND, True, ("mx1.example",), 300.0)
    resolver = ScriptedResolver(good, {"mx1.example": tlsa()})
    checker = make_checker(resolver)
    first = checker.check("example.com")
    resolver.mx = MxFacts(FAILED)
    clock.now += 300.0
    kept = checker.check("example.com")
    assert kept.kind == DANE and kept.checked_at == first.checked_at
    assert kept.expires == clock.now + dane.RETRY_SECONDS
    clock.now = first.checked_at + dane.KEEP_ON_FAILURE - 1
    assert checker.check("example.com").kind == DANE
    clock.now += dane.RETRY_SECONDS  # the next re-check, now past KEEP_ON_FAILURE
    assert checker.check("example.com").kind == DNS_ERROR  # too old to trust any longer


def test_a_failed_tlsa_lookup_without_a_dane_host_is_a_dns_error(make_checker):
    resolver = ScriptedResolver(MxFacts(FOUND, True, ("mx1.example", "mx2.example"), 300.0),
                                {"mx2.example": tlsa("mx2.example", status=FAILED, records=())})
    verdict = make_checker(resolver).check("example.com")
    assert verdict.kind == DNS_ERROR and verdict.detail == "TLSA lookup failed for mx2.example"


def test_concurrent_checks_share_one_lookup(make_checker):
    resolver = ScriptedResolver(MxFacts(FOUND, True, ("mx1.example",), 300.0), {"mx1.example": tlsa()})
    resolver.gate = threading.Event()
    checker = make_checker(resolver)
    futures = [checker.submit("example.com") for _ in range(20)]
    assert len({id(f) for f in futures}) == 1
    resolver.gate.set()
    assert {f.result(5).kind for f in futures} == {DANE}
    assert resolver.calls.count(("mx", "example.com")) == 1


def test_check_gives_up_at_its_timeout_and_the_lookup_fills_the_cache(make_checker):
    resolver = ScriptedResolver(MxFacts(FOUND, True, ("mx1.example",), 300.0), {"mx1.example": tlsa()})
    resolver.gate = threading.Event()
    checker = make_checker(resolver)
    assert checker.check("example.com", timeout=0.05).kind == PENDING
    assert checker.peek("example.com") is None  # a PENDING verdict is never cached
    resolver.gate.set()
    checker.submit("example.com").result(5)
    assert checker.peek("example.com").kind == DANE


def test_an_unexpected_exception_is_a_dns_error(make_checker, caplog):
    checker = make_checker(ScriptedResolver(RuntimeError("boom"), {}))
    verdict = checker.check("example.com")
    assert verdict.kind == DNS_ERROR and verdict.detail == "internal error"
    assert "DANE check of example.com failed unexpectedly" in caplog.text
    assert checker.peek("example.com") is verdict  # asked again only after RETRY_SECONDS


def test_the_cache_is_bounded(make_checker):
    resolver = ScriptedResolver(MxFacts(FOUND, False, ("mx1.example",), 300.0), {})
    checker = make_checker(resolver, max_entries=3)
    for n in range(5):
        checker.check(f"d{n}.example")
    assert [d for d in (f"d{n}.example" for n in range(5)) if checker.peek(d)] == ["d2.example", "d3.example",
                                                                                    "d4.example"]


def test_reconfigure_uses_the_new_resolver(make_checker):
    checker = make_checker(ScriptedResolver(MxFacts(FOUND, False, ("mx1.example",), 300.0), {}))
    signed = ScriptedResolver(MxFacts(FOUND, True, ("mx1.example",), 300.0), {"mx1.example": tlsa()})
    checker.reconfigure(signed, dane.Settings(mx_ttl=10.0))
    assert checker.check("new.example").kind == DANE
    assert signed.calls



def test_a_closed_checker_answers_pending_not_an_exception(make_checker, caplog):
    """A reload that switches [socketmap] dane to no closes the checker while the
    socketmap and old milter connections still hold it: checks under way end with their
    verdict, and checks asked for afterwards are PENDING (the on_timeout answer), never a
    CancelledError or "cannot schedule new futures" traceback."""
    resolver = ScriptedResolver(MxFacts(FOUND, True, ("mx1.example",), 300.0), {"mx1.example": tlsa()})
    resolver.gate = threading.Event()
    checker = make_checker(resolver)
    running = [checker.submit("running.example"), checker.submit("other.example")]
    deadline = time.monotonic() + 5
    while len(resolver.calls) < 2:  # both are in their MX lookup
        assert time.monotonic() < deadline, resolver.calls
        time.sleep(0.005)
    checker.close()
    resolver.gate.set()
    assert [f.result(5).kind for f in running] == [DANE, DANE]  # lookups under way finish
    assert checker.check("later.example", timeout=5).kind == PENDING
    assert checker.submit("later.example").result(5).kind == PENDING
    assert ("mx", "later.example") not in resolver.calls
    assert checker.peek("later.example") is None
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.exc_info]


# --- against a real validating resolver (unbound) and a signed loopback zone -------------

@pytest.fixture
def validating(dane_world):
    """(DaneResolver through unbound, the DaneWorld) with the scenario domains published."""
    dane_world.publish_scenarios()
    resolver = dane_world.start_resolver()
    return dane.DaneResolver(nameservers=(resolver.address,), port=resolver.port, timeout=2.0), dane_world


@pytest.fixture
def facts(validating):
    """The validating fixture's DaneResolver with its lookups callable as functions."""
    return Sync(validating[0]), validating[1]


@pytest.mark.integration
def test_resolver_facts_from_unbound(facts):
    resolver, world = facts
    mx = resolver.mx_facts("dane.dnssec.test")
    assert mx == MxFacts(FOUND, True, ("mx.dane.dnssec.test",), 300.0)
    assert resolver.mx_facts("dane.insecure.test").authenticated is False
    assert resolver.mx_facts("nosuchdomain.dnssec.test") == MxFacts(NONE, ttl=300.0)
    implicit = resolver.mx_facts("mx.dane.dnssec.test")  # a name with an A record and no MX
    assert implicit.status == FOUND and implicit.authenticated and implicit.hosts == ("mx.dane.dnssec.test",)

    found = resolver.tlsa_facts("mx.dane.dnssec.test")
    assert found.status == FOUND and found.authenticated and found.ttl == 300.0
    assert [r[:3] for r in found.records] == [(3, 1, 1)] and dane.host_has_dane(found)
    insecure = resolver.tlsa_facts("mx.dane.insecure.test")
    assert insecure.status == FOUND and not insecure.authenticated and not dane.host_has_dane(insecure)
    assert resolver.tlsa_facts("mx.nodane.dnssec.test")[:3] == ("mx.nodane.dnssec.test", NONE, False)  # NXDOMAIN
    assert resolver.tlsa_facts("mx.broken.dnssec.test").status == FAILED
    pkix = resolver.tlsa_facts("mx.pkix.dnssec.test")
    assert pkix.authenticated and not dane.host_has_dane(pkix)


@pytest.mark.integration
def test_resolver_reports_a_validated_nodata_tlsa(facts):
    resolver, world = facts
    world.dns.add("_25._tcp.mx.nodata.dnssec.test", "TXT", "not a TLSA record")
    facts = resolver.tlsa_facts("mx.nodata.dnssec.test")
    assert facts == TlsaFacts("mx.nodata.dnssec.test", NONE, True, (), 60.0)  # SOA minimum


@pytest.mark.integration
def test_bogus_signatures_are_a_failure_not_an_answer(facts):
    resolver, world = facts
    # The server signs with a key the zone's DNSKEY RRset does not hold: every answer is bogus.
    world.dns._zone_keys[world.key.apex] = type(world.key)(world.key.apex)
    try:
        assert resolver.tlsa_facts("mx.nodane.dnssec.test").status == FAILED
        assert resolver.mx_facts("nodane.dnssec.test").status == FAILED
    finally:
        world.dns._zone_keys[world.key.apex] = world.key


@pytest.mark.integration
def test_checker_verdicts_for_the_scenarios(validating, engine):
    from world.fixtures_dane import SCENARIOS

    resolver, _world = validating
    checker = dane.DaneChecker(resolver, engine=engine)
    try:
        verdicts = {domain: checker.check(domain).kind for domain in SCENARIOS}
    finally:
        checker.close()
    assert verdicts == {
        "dane.dnssec.test": DANE, "nodane.dnssec.test": NO_DANE, "dane.insecure.test": NO_DANE,
        "mismatch.dnssec.test": DANE, "pkix.dnssec.test": NO_DANE, "broken.dnssec.test": DNS_ERROR,
    }
