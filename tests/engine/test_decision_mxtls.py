"""decision.py with the MX TLS check ([probe] enabled = yes): an enforce domain whose
policy-matching MX hosts all fail the check for good gets on_violation with reason
mx-tls and a reply naming a host and its failure; one good, unknown or unreachable host
means accept; testing accepts and says what it would have done; DANE comes first; a
reject refetches the policy first (RFC 8461 §5)."""

import json

import pytest

from stsmilter.engine import dane, dns
from stsmilter.engine.decision import Decision
from stsmilter.engine.mxtls import HostResult
from test_decision import PATTERNS, R, FakeDiscovery, make_decider, valid

MX = dns.MxSet(hosts=("mx.example.com", "backup.evil.example", "a.mail.example.com"), ttl=300)
MATCHING = ("mx.example.com", "a.mail.example.com")  # the policy's patterns: mx.example.com, *.mail.example.com


def result(kind, checked_at=900.0, detail=None):
    return HostResult(kind, detail or f"192.0.2.1: {kind}", checked_at, checked_at + 300.0)


OK = result("ok")
EXPIRED = result("certificate-expired")
MISNAMED = result("certificate-host-mismatch")
UNTRUSTED = result("certificate-not-trusted")
NO_STARTTLS = result("starttls-not-supported")
HANDSHAKE = result("validation-failure")
GONE = result("unreachable")

TEXT = "MTA-STS: no MX host of example.com offers valid TLS: mx.example.com: certificate has expired"
TEMPFAIL_TLS = ("451", "4.7.5", TEXT)


class FakeChecker:
    """MxTlsChecker.check() from a dict host -> HostResult (absent: None, unknown); a check
    may take `delay` seconds of the Decider's clock, never more than its timeout."""

    def __init__(self, results, clock, delay=0.0):
        self.results, self.clock, self.delay = dict(results), clock, delay
        self.calls = []

    def check(self, hosts, timeout=None, enforce=True):
        self.calls.append((tuple(hosts), timeout, enforce))
        self.clock.advance(min(self.delay, timeout))
        return tuple(self.results.get(host) for host in hosts)


class FakeDane:
    def __init__(self, kind):
        self.kind, self.calls = kind, []

    def check(self, domain, timeout=None):
        self.calls.append(domain)
        return dane.Verdict(self.kind, 0.0, 0.0)


def decide(results, fake=None, dane_kind=None, delay=0.0, recipient=R, **milter):
    discovery = FakeDiscovery(**({"mx": MX} | (fake or {})))
    discovery.mxtls = FakeChecker(results, discovery.clock, delay)
    if dane_kind is not None:
        discovery.dane = FakeDane(dane_kind)
    return make_decider(discovery, **milter).decide(recipient), discovery


def both(kind_one, kind_two):
    return {MATCHING[0]: kind_one, MATCHING[1]: kind_two}


FAILING = both(EXPIRED, MISNAMED)
REJECT = dict(on_violation="reject")
FRESH = valid(source="fetched", policy_id="20250202")

CASES = [
    # (id, host results, FakeDiscovery kwargs, [milter] settings, expected Decision fields)
    ("all-ok", both(OK, OK), {}, {}, dict(action="accept", would="accept", reason="mx-match", reply=None)),
    ("one-ok", both(EXPIRED, OK), {}, {}, dict(action="accept", would="accept", reason="mx-match")),
    ("first-ok", both(OK, EXPIRED), {}, {}, dict(action="accept", reason="mx-match")),
    ("one-unknown", {MATCHING[0]: EXPIRED}, {}, {}, dict(action="accept", reason="mx-match")),
    ("all-unknown", {}, {}, {}, dict(action="accept", reason="mx-match")),
    ("one-unreachable", both(EXPIRED, GONE), {}, {}, dict(action="accept", reason="mx-match")),
    ("all-unreachable", both(GONE, GONE), {}, {}, dict(action="accept", reason="mx-match")),
    ("all-fail", FAILING, {}, {},
     dict(action="tempfail", would="tempfail", reason="mx-tls", mode="enforce", policy_id="20240101",
          mx=MX.hosts, patterns=PATTERNS, reply=TEMPFAIL_TLS)),
    ("all-fail-hold", FAILING, {}, dict(on_violation="hold"),
     dict(action="hold", would="hold", reason="mx-tls", reply=None)),
    ("all-fail-dry-run", FAILING, {}, dict(dry_run=True),
     dict(action="accept", would="tempfail", reason="mx-tls", reply=None)),
    ("all-fail-testing", FAILING, {"result": valid("testing")}, {},
     dict(action="accept", would="tempfail", reason="mx-tls", mode="testing", reply=None)),
    ("all-fail-testing-reject-mode", FAILING, {"result": valid("testing")}, REJECT,
     dict(action="accept", would="reject", reason="mx-tls", reply=None)),
    ("no-starttls", both(NO_STARTTLS, UNTRUSTED), {}, {},
     dict(reason="mx-tls", reply=("451", "4.7.5", "MTA-STS: no MX host of example.com offers valid TLS:"
                                                  " mx.example.com: STARTTLS is not offered"))),
    ("untrusted", both(UNTRUSTED, HANDSHAKE), {}, {},
     dict(reply=("451", "4.7.5", "MTA-STS: no MX host of example.com offers valid TLS: mx.example.com:"
                                 " certificate is not trusted"))),
    ("misnamed", both(MISNAMED, EXPIRED), {}, {},
     dict(reply=("451", "4.7.5", "MTA-STS: no MX host of example.com offers valid TLS: mx.example.com:"
                                 " certificate is not valid for the host name"))),
    ("handshake", both(HANDSHAKE, HANDSHAKE), {}, {},
     dict(reply=("451", "4.7.5", "MTA-STS: no MX host of example.com offers valid TLS: mx.example.com:"
                                 " TLS handshake or certificate check failed"))),
    # reject: RFC 8461 §5, only on a policy fetched just now
    ("reject-fresh", FAILING, {"forced": FRESH}, REJECT,
     dict(action="reject", would="reject", reason="mx-tls", policy_id="20250202",
          reply=("550", "5.7.5", TEXT))),
    ("reject-not-refetched", FAILING, {"forced": valid()}, REJECT,
     dict(action="tempfail", would="tempfail", reason="mx-tls", policy_id="20240101",
          reply=("451", "4.7.5", "MTA-STS: no MX host of example.com offers valid TLS (policy could not be"
                                 " re-checked): mx.example.com: certificate has expired"))),
    ("reject-fresh-none", FAILING, {"forced": valid("none", source="fetched", policy_id="3")}, REJECT,
     dict(action="accept", would="accept", reason="mode-none", mode="none", reply=None)),
    ("reject-fresh-testing", FAILING, {"forced": valid("testing", source="fetched", policy_id="4")}, REJECT,
     dict(action="accept", would="reject", reason="mx-tls", mode="testing", policy_id="4", reply=None)),
    # the fresh policy matches another host, whose check is ok
    ("reject-fresh-other-host-ok", {**FAILING, "backup.evil.example": OK},
     {"forced": valid(patterns=("*.evil.example",), source="fetched", policy_id="5")}, REJECT,
     dict(action="accept", would="accept", reason="mx-match", patterns=("*.evil.example",), reply=None)),
    # ... or no host at all any more: the mismatch, rejected
    ("reject-fresh-mismatch", FAILING,
     {"forced": valid(patterns=("mx.elsewhere.example",), source="fetched", policy_id="6")}, REJECT,
     dict(action="reject", would="reject", reason="mx-mismatch", tls=(),
          reply=("550", "5.7.5", "MTA-STS policy of example.com (id 6) allows no MX host of the domain:"
                                 " mx.example.com, backup.evil.example, a.mail.example.com do not match"
                                 " mx.elsewhere.example"))),
]


@pytest.mark.parametrize("results, fake, milter, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rules(results, fake, milter, expected):
    decision, _discovery = decide(results, fake, **milter)
    for field, value in expected.items():
        assert getattr(decision, field) == value, field


def test_only_the_policy_matching_hosts_are_checked_and_recorded():
    decision, discovery = decide(FAILING)
    assert discovery.mxtls.calls == [(MATCHING, pytest.approx(5.0), True)]
    assert decision.tls == ((MATCHING[0], EXPIRED), (MATCHING[1], MISNAMED))
    assert decision.mx == MX.hosts


def test_a_testing_policy_is_checked_as_testing():
    _decision, discovery = decide(FAILING, {"result": valid("testing")})
    assert [enforce for _hosts, _timeout, enforce in discovery.mxtls.calls] == [False]


def test_the_first_matching_host_is_named():
    decision, _ = decide(both(MISNAMED, EXPIRED))
    assert decision.reply[2] == ("MTA-STS: no MX host of example.com offers valid TLS: mx.example.com:"
                                 " certificate is not valid for the host name")
    order = dns.MxSet(hosts=("a.mail.example.com", "mx.example.com"), ttl=300)
    decision, _ = decide(both(MISNAMED, EXPIRED), {"mx": order})
    assert decision.reply[2].endswith(": a.mail.example.com: certificate has expired")


def test_no_matching_host_is_the_mismatch_and_nothing_is_checked():
    decision, discovery = decide({}, {"mx": dns.MxSet(("mx1.evil.example",), 300)})
    assert decision.reason == "mx-mismatch" and decision.tls == ()
    assert discovery.mxtls.calls == []


@pytest.mark.parametrize("fake", [{"result": valid("none")}, {"mx": dns.MxSet((), 300, null_mx=True)},
                                  {"mx": dns.NoRecord("nxdomain")}, {"result": Decision}],
                         ids=["mode-none", "null-mx", "no-mx", "no-policy"])
def test_nothing_is_checked_without_an_mx_host_to_deliver_to(fake):
    if fake.get("result") is Decision:
        from stsmilter.engine.policy import Result

        fake = {"result": Result("example.com", "none")}
    _decision, discovery = decide(FAILING, fake)
    assert discovery.mxtls.calls == []


def test_the_check_gets_only_the_time_left():
    decision, discovery = decide(FAILING, {"lookup_delay": 0.15}, delay=5.0, lookup_timeout=0.2)
    assert discovery.mxtls.calls == [(MATCHING, pytest.approx(0.05), True)]
    assert discovery.clock() == pytest.approx(1000.2)  # answered at the deadline


def test_a_reject_judges_the_fresh_policys_hosts_with_the_time_left():
    decision, discovery = decide(FAILING, {"forced": FRESH}, **REJECT)
    assert decision.action == "reject"
    assert [timeout for _hosts, timeout, _enforce in discovery.mxtls.calls] == [pytest.approx(5.0)] * 2
    assert decision.tls == ((MATCHING[0], EXPIRED), (MATCHING[1], MISNAMED))


def test_a_reject_of_a_mismatch_checks_the_hosts_the_fresh_policy_matches():
    """The cached policy matched no MX host; the refetched one matches hosts whose TLS
    fails: the reject names the TLS failure."""
    mx = dns.MxSet(("mx1.evil.example",), 300)
    fresh = valid(patterns=("*.evil.example",), source="fetched", policy_id="7")
    decision, discovery = decide({"mx1.evil.example": NO_STARTTLS}, {"mx": mx, "forced": fresh}, **REJECT)
    assert (decision.action, decision.reason) == ("reject", "mx-tls")
    assert decision.reply == ("550", "5.7.5", "MTA-STS: no MX host of example.com offers valid TLS:"
                                              " mx1.evil.example: STARTTLS is not offered")
    assert discovery.mxtls.calls == [(("mx1.evil.example",), pytest.approx(5.0), True)]


def test_a_refetched_testing_policy_checks_as_testing():
    fresh = valid("testing", source="fetched", policy_id="4")
    _decision, discovery = decide(FAILING, {"forced": fresh}, **REJECT)
    assert [enforce for _hosts, _timeout, enforce in discovery.mxtls.calls] == [True, False]


def test_a_reject_without_the_check_is_todays():
    mx = dns.MxSet(("mx1.evil.example",), 300)
    fresh = valid(patterns=("*.evil.example",), source="fetched", policy_id="7")
    discovery = FakeDiscovery(mx=mx, forced=fresh)
    decision = make_decider(discovery, **REJECT).decide(R)
    assert (decision.action, decision.reason, decision.tls) == ("accept", "mx-match", ())


@pytest.mark.parametrize("kind, expected", [
    (dane.DANE, dict(action="accept", would="accept", reason="dane", reply=None)),
    (dane.NO_DANE, dict(action="tempfail", reason="mx-tls", reply=TEMPFAIL_TLS)),
    (dane.DNS_ERROR, dict(action="tempfail", reason="mx-dns-error",
                          reply=("451", "4.7.5", "MTA-STS policy of example.com: DNSSEC lookup for DANE failed,"
                                                 " try again later"))),
    (dane.PENDING, dict(action="tempfail", reason="mx-dns-error",
                        reply=("451", "4.7.5", "MTA-STS policy of example.com: DANE check not finished,"
                                               " try again later"))),
])
def test_dane_comes_first(kind, expected):
    """RFC 8461 §2: delivery to a DANE domain checks TLSA records, not the CA chain the
    check failed, so the failure does not decide; a DANE lookup that fails tempfails."""
    decision, discovery = decide(FAILING, dane_kind=kind)
    for field, value in expected.items():
        assert getattr(decision, field) == value, field
    assert discovery.dane.calls == ["example.com"]
    if kind == dane.DANE:
        assert decision.tls == ((MATCHING[0], EXPIRED), (MATCHING[1], MISNAMED))


def test_dane_is_not_asked_when_the_check_passes():
    _decision, discovery = decide(both(OK, EXPIRED), dane_kind=dane.DANE)
    assert discovery.dane.calls == []


def test_a_hostile_host_name_is_made_safe_in_the_reply():
    mx = dns.MxSet(("mx\r\n250 ok.example.com",), 300)
    fresh = valid(patterns=("*.example.com",))
    decision, _ = decide({"mx\r\n250 ok.example.com": EXPIRED}, {"mx": mx, "result": fresh})
    assert decision.reply[2] == ("MTA-STS: no MX host of example.com offers valid TLS: mx??250?ok.example.com:"
                                 " certificate has expired")


def test_every_field_of_an_mx_tls_refusal():
    decision, _ = decide(FAILING)
    assert decision == Decision(R, "example.com", "tempfail", "tempfail", "mx-tls", "enforce", "20240101",
                                mx=MX.hosts, patterns=PATTERNS, reply=TEMPFAIL_TLS,
                                tls=((MATCHING[0], EXPIRED), (MATCHING[1], MISNAMED)))


def test_as_dict_shows_each_host_its_result_detail_and_age():
    decision, _ = decide({MATCHING[0]: result("certificate-expired", 880.0, "192.0.2.7: TLS handshake: x")})
    data = json.loads(json.dumps(decision.as_dict(now=1000.04)))
    assert data["mx_tls"] == [
        {"host": "mx.example.com", "result": "certificate-expired", "detail": "192.0.2.7: TLS handshake: x",
         "age": 120.0},
        {"host": "a.mail.example.com", "result": None, "detail": None, "age": None},
    ]
    assert decision.as_dict()["mx_tls"][0]["age"] is None  # no clock given: no ages
    assert decision.as_dict(now=870.0)["mx_tls"][0]["age"] == 0.0  # never negative
    assert decision.as_dict(now=880.26)["mx_tls"][0]["age"] == 0.3
    assert list(data)[-1] == "mx_tls"
