"""decision.py with DANE first: the milter mirrors what delivery will do. An MTA-STS MX
mismatch on a domain whose delivery DANE governs is not refused; a DANE check that fails
or is late tempfails (never rejects); a domain without DANE is judged as before."""

import pytest

from stsmilter.engine import dane, dns
from stsmilter.engine.decision import Decision
from test_decision import GOOD_MX, OTHER_MX, PATTERNS, R, TEMPFAIL_MISMATCH, FakeDiscovery, make_decider, valid

TEMPFAIL_DANE = ("451", "4.7.5", "MTA-STS policy of example.com: DNSSEC lookup for DANE failed, try again later")
TEMPFAIL_LATE = ("451", "4.7.5", "MTA-STS policy of example.com: DANE check not finished, try again later")


class FakeChecker:
    """A DANE check taking `delay` seconds of the Decider's clock (test_decision.Clock)."""

    def __init__(self, kind, delay=0.0, clock=None):
        self.kind, self.delay, self.clock = kind, delay, clock
        self.calls = []

    def check(self, domain, timeout=None):
        self.calls.append((domain, timeout))
        if self.delay > timeout:
            self.clock.advance(timeout)
            return dane.Verdict(dane.PENDING, 0.0, 0.0)
        if self.clock is not None:
            self.clock.advance(self.delay)
        return dane.Verdict(self.kind, 0.0, 0.0)


def decide(kind, delay=0.0, fake=None, **milter):
    discovery = FakeDiscovery(**(fake or {"mx": OTHER_MX}))
    discovery.dane = FakeChecker(kind, delay, discovery.clock)
    return make_decider(discovery, **milter).decide(R), discovery.dane


CASES = [
    # (id, verdict, FakeDiscovery kwargs, [milter] settings, expected Decision fields)
    ("dane-governs", dane.DANE, {}, {},
     dict(action="accept", would="accept", reason="dane", mode="enforce", mx=OTHER_MX.hosts, patterns=PATTERNS,
          reply=None)),
    ("dane-governs-reject-mode", dane.DANE, {}, dict(on_violation="reject"), dict(action="accept", reason="dane")),
    ("dane-governs-hold-mode", dane.DANE, {}, dict(on_violation="hold"), dict(action="accept", reason="dane")),
    ("dane-governs-testing", dane.DANE, dict(result=valid("testing"), mx=OTHER_MX), {},
     dict(action="accept", would="accept", reason="dane", mode="testing")),
    ("no-dane-mismatch", dane.NO_DANE, {}, {},
     dict(action="tempfail", would="tempfail", reason="mx-mismatch", reply=TEMPFAIL_MISMATCH)),
    ("no-dane-hold", dane.NO_DANE, {}, dict(on_violation="hold"), dict(action="hold", reason="mx-mismatch")),
    ("dns-error", dane.DNS_ERROR, {}, {},
     dict(action="tempfail", would="tempfail", reason="mx-dns-error", mx=OTHER_MX.hosts, reply=TEMPFAIL_DANE)),
    ("dns-error-never-rejects", dane.DNS_ERROR, {}, dict(on_violation="reject"),
     dict(action="tempfail", reason="mx-dns-error", reply=TEMPFAIL_DANE)),
    ("dns-error-hold-mode", dane.DNS_ERROR, {}, dict(on_violation="hold"),
     dict(action="tempfail", reason="mx-dns-error")),
    ("dns-error-testing", dane.DNS_ERROR, dict(result=valid("testing"), mx=OTHER_MX), {},
     dict(action="accept", would="tempfail", reason="mx-dns-error", reply=None)),
    ("dns-error-dry-run", dane.DNS_ERROR, {}, dict(dry_run=True),
     dict(action="accept", would="tempfail", reason="mx-dns-error", reply=None)),
    ("late", dane.PENDING, {}, {}, dict(action="tempfail", reason="mx-dns-error", reply=TEMPFAIL_LATE)),
]


@pytest.mark.parametrize("kind, fake, milter, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rules(kind, fake, milter, expected):
    decision, _checker = decide(kind, fake=fake or None, **milter)
    for field, value in expected.items():
        assert getattr(decision, field) == value, field


def test_dane_is_asked_only_about_a_mismatch():
    decision, checker = decide(dane.DANE, fake={"mx": GOOD_MX})
    assert decision.reason == "mx-match" and checker.calls == []
    for fake in ({"result": valid("none"), "mx": OTHER_MX}, {"mx": dns.MxSet((), 300, null_mx=True)}):
        decision, checker = decide(dane.DANE, fake=fake)
        assert decision.reason in ("mode-none", "null-mx") and checker.calls == []


def test_the_check_gets_only_the_time_left():
    fake = {"mx": OTHER_MX, "lookup_delay": 0.15}  # the policy lookup takes 0.15 s of 0.2
    decision, checker = decide(dane.DANE, delay=5.0, fake=fake, lookup_timeout=0.2)
    assert decision.reason == "mx-dns-error" and decision.reply == TEMPFAIL_LATE
    assert checker.calls == [("example.com", pytest.approx(0.05))]
    assert checker.clock() == pytest.approx(1000.2)  # answered at the deadline


def test_no_checker_keeps_todays_decisions():
    discovery = FakeDiscovery(mx=OTHER_MX)
    assert not hasattr(discovery, "dane")
    assert make_decider(discovery).decide(R).reason == "mx-mismatch"


def test_dane_is_asked_about_the_recipient_domain():
    # RFC 8461 §2 / RFC 7672 §2.2: the DANE question is about the recipient domain's MX hosts.
    discovery = FakeDiscovery(result=valid(domain="dane.example"), mx=OTHER_MX)
    discovery.dane = FakeChecker(dane.DANE)
    assert make_decider(discovery).decide("<u@dane.example>").reason == "dane"
    assert [domain for domain, _ in discovery.dane.calls] == ["dane.example"]


def test_every_field_of_a_dane_failure():
    decision, _checker = decide(dane.DNS_ERROR)
    assert decision == Decision(R, "example.com", "tempfail", "tempfail", "mx-dns-error", "enforce", "20240101",
                                mx=OTHER_MX.hosts, patterns=PATTERNS, reply=TEMPFAIL_DANE)
