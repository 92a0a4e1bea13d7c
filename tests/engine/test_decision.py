import json

import pytest

from stsmilter import config
from stsmilter.engine import decision, dns
from stsmilter.engine.decision import Decider, Decision
from stsmilter.engine.policy import Policy, Result

DOMAIN = "example.com"
PATTERNS = ("mx.example.com", "*.mail.example.com")
GOOD_MX = dns.MxSet(hosts=("mx.example.com",), ttl=300)
OTHER_MX = dns.MxSet(hosts=("mx1.evil.example", "mx2.evil.example"), ttl=300)
MISMATCH = (
    "MTA-STS policy of example.com (id 20240101) allows no MX host of the domain:"
    " mx1.evil.example, mx2.evil.example do not match mx.example.com, *.mail.example.com"
)


def valid(mode="enforce", patterns=PATTERNS, policy_id="20240101", source="cache", domain=DOMAIN):
    return Result(domain, "valid", source=source, policy_id=policy_id, policy=Policy("STSv1", mode, 86400, patterns))


PENDING = Result(DOMAIN, "pending", reason="lookup-timeout")


class Clock:
    """The Decider's clock (time.monotonic in the daemon), moved only by the fake engine:
    a "slow" engine call advances it by what the call took, so deadlines are checked
    exactly and without sleeping."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class FakeDiscovery:
    """Programmable engine: lookup()/mx() answers per domain, optional delays that honour
    the timeout like the real engine (spent on self.clock, the Decider's clock), and a
    record of every call."""

    def __init__(self, result=None, mx=GOOD_MX, forced=None, lookup_delay=0.0, mx_delay=0.0, clock=None):
        self.result = result if result is not None else valid()
        self.forced = forced  # answer to lookup(force=True)
        self.mx_answer = mx  # an MxSet or an exception instance
        self.lookup_delay, self.mx_delay = lookup_delay, mx_delay
        self.clock = clock if clock is not None else Clock()
        self.calls = []

    def lookup(self, domain, timeout=None, force=False):
        self.calls.append(("lookup", domain, timeout, force))
        if self.lookup_delay > (timeout if timeout is not None else 60):
            self.clock.advance(timeout)
            return Result(domain, "pending", reason="lookup-timeout")
        self.clock.advance(self.lookup_delay)
        return self.forced if force else self.result

    def mx(self, domain, timeout):
        self.calls.append(("mx", domain, timeout, False))
        if self.mx_delay > timeout:
            self.clock.advance(timeout)
            raise dns.TempDnsError("timeout")
        self.clock.advance(self.mx_delay)
        if isinstance(self.mx_answer, Exception):
            raise self.mx_answer
        return self.mx_answer

    @property
    def forced_calls(self):
        return [c for c in self.calls if c[0] == "lookup" and c[3]]


def make_decider(discovery, **milter):
    scope = {"local_domains": ("local.example", "bücher.example")}
    cfg = config.defaults().replace(milter=milter, scope=scope)
    return Decider(discovery, cfg.milter, cfg.scope, clock=discovery.clock)


def decide(recipient="<user@example.com>", discovery=None, **milter):
    discovery = discovery or FakeDiscovery()
    return make_decider(discovery, **milter).decide(recipient)


R = "<u@example.com>"
REJECT = dict(on_violation="reject")
TEMPFAIL_PENDING = ("451", "4.7.5", "MTA-STS policy lookup for example.com in progress, try again later")
TEMPFAIL_MX_DNS = ("451", "4.7.5", "MTA-STS policy of example.com: MX lookup failed, try again later")
TEMPFAIL_MISMATCH = ("451", "4.7.5", MISMATCH)
FRESH_TESTING = valid("testing", policy_id="2", source="fetched")
FRESH_MATCH = valid(patterns=("*.evil.example",), policy_id="20250202", source="fetched")

# (id, recipient, FakeDiscovery kwargs, [milter] settings, expected Decision fields)
CASES = [
    ("no-domain", "<postmaster>", {}, {}, dict(action="accept", reason="no-domain", domain=None)),
    ("address-literal", "<u@[192.0.2.1]>", {}, {}, dict(action="accept", reason="address-literal", domain=None)),
    ("bad-domain", "<u@exa mple..com>", {}, {}, dict(action="accept", reason="bad-domain", domain=None)),
    ("local-domain", "<u@Local.Example.>", {}, {}, dict(action="accept", reason="local-domain")),
    ("local-domain-idn", "<u@xn--bcher-kva.example>", {}, {}, dict(action="accept", reason="local-domain")),
    ("pending-accept", R, dict(result=PENDING), {}, dict(action="accept", reason="pending")),
    ("pending-tempfail", R, dict(result=PENDING), dict(on_pending="tempfail"),
     dict(action="tempfail", would="tempfail", reason="pending", reply=TEMPFAIL_PENDING)),
    ("no-policy", R, dict(result=Result(DOMAIN, "none")), {}, dict(action="accept", reason="no-policy")),
    ("discovery-failed", R, dict(result=Result(DOMAIN, "failed", reason="sts-policy-fetch-error")), {},
     dict(action="accept", reason="discovery-failed", mode=None)),
    ("mode-none", R, dict(result=valid("none")), {}, dict(action="accept", reason="mode-none", mode="none")),
    ("mx-match", "<U@Example.COM>", {}, {},
     dict(action="accept", would="accept", reason="mx-match", mode="enforce", mx=GOOD_MX.hosts, patterns=PATTERNS)),
    ("mx-match-wildcard", R, dict(mx=dns.MxSet(("mx9.evil.example", "a.mail.example.com"), 300)), {},
     dict(action="accept", reason="mx-match")),
    ("no-mx", R, dict(mx=dns.NoRecord("NXDOMAIN")), {}, dict(action="accept", reason="no-mx")),
    ("null-mx", R, dict(mx=dns.MxSet((), 300, null_mx=True)), {}, dict(action="accept", reason="null-mx")),
    ("mx-dns-error-enforce", R, dict(mx=dns.TempDnsError("SERVFAIL")), {},
     dict(action="tempfail", reason="mx-dns-error", reply=TEMPFAIL_MX_DNS)),
    ("mx-dns-error-testing", R, dict(result=valid("testing"), mx=dns.TempDnsError("SERVFAIL")), {},
     dict(action="accept", would="tempfail", reason="mx-dns-error", mode="testing", reply=None)),
    ("mismatch-testing", R, dict(result=valid("testing"), mx=OTHER_MX), REJECT,
     dict(action="accept", would="reject", reason="mx-mismatch", mode="testing", reply=None)),
    ("mismatch-tempfail", R, dict(mx=OTHER_MX), {},
     dict(action="tempfail", would="tempfail", reason="mx-mismatch", mx=OTHER_MX.hosts, reply=TEMPFAIL_MISMATCH)),
    ("mismatch-hold", R, dict(mx=OTHER_MX), dict(on_violation="hold"),
     dict(action="hold", would="hold", reason="mx-mismatch", reply=None)),
    ("reject-confirmed-by-fresh-fetch", R, dict(mx=OTHER_MX, forced=valid(source="fetched")), REJECT,
     dict(action="reject", would="reject", reason="mx-mismatch", reply=("550", "5.7.5", MISMATCH))),
    ("reject-recheck-pending", R, dict(mx=OTHER_MX, forced=PENDING), REJECT,
     dict(action="tempfail", would="tempfail", reason="mx-mismatch", mode="enforce", policy_id="20240101")),
    ("reject-recheck-from-cache", R, dict(mx=OTHER_MX, forced=valid(source="cache")), REJECT,
     dict(action="tempfail", reason="mx-mismatch")),
    ("reject-recheck-failed", R, dict(mx=OTHER_MX, forced=Result(DOMAIN, "failed")), REJECT,
     dict(action="tempfail", reason="mx-mismatch")),
    ("reject-fresh-policy-matches", R, dict(mx=OTHER_MX, forced=FRESH_MATCH), REJECT,
     dict(action="accept", would="accept", reason="mx-match", policy_id="20250202", patterns=("*.evil.example",))),
    ("reject-fresh-policy-testing", R, dict(mx=OTHER_MX, forced=FRESH_TESTING), REJECT,
     dict(action="accept", would="reject", reason="mx-mismatch", mode="testing", policy_id="2")),
    ("reject-fresh-policy-none", R, dict(mx=OTHER_MX, forced=valid("none", source="fetched")), REJECT,
     dict(action="accept", would="accept", reason="mode-none", mode="none")),
    ("dry-run-tempfail", R, dict(mx=OTHER_MX), dict(dry_run=True),
     dict(action="accept", would="tempfail", reason="mx-mismatch", reply=None)),
    ("dry-run-reject", R, dict(mx=OTHER_MX, forced=valid(source="fetched")), dict(dry_run=True, **REJECT),
     dict(action="accept", would="reject", reason="mx-mismatch", reply=None)),
    ("dry-run-hold", R, dict(mx=OTHER_MX), dict(dry_run=True, on_violation="hold"),
     dict(action="accept", would="hold", reason="mx-mismatch")),
    ("dry-run-pending", R, dict(result=PENDING), dict(dry_run=True, on_pending="tempfail"),
     dict(action="accept", would="tempfail", reason="pending")),
    ("dry-run-mx-dns-error", R, dict(mx=dns.TempDnsError("timeout")), dict(dry_run=True),
     dict(action="accept", would="tempfail", reason="mx-dns-error")),
]


@pytest.mark.parametrize("recipient, fake, milter, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rules(recipient, fake, milter, expected):
    d = decide(recipient, FakeDiscovery(**fake), **milter)
    for field, value in expected.items():
        assert getattr(d, field) == value, field
    assert d.recipient == recipient
    assert d.reason in decision.REASONS
    # A reply exactly when the front end must send one, its first digit matching.
    assert (d.reply is not None) == (d.action in ("tempfail", "reject"))
    if d.reply:
        assert d.reply[0][0] == d.reply[1][0] == ("4" if d.action == "tempfail" else "5")


def test_recheck_text_says_policy_could_not_be_rechecked():
    d = decide(discovery=FakeDiscovery(mx=OTHER_MX, forced=PENDING), on_violation="reject")
    assert d.reply == (
        "451",
        "4.7.5",
        "MTA-STS policy of example.com (id 20240101) allows no MX host of the domain (policy could not be"
        " re-checked): mx1.evil.example, mx2.evil.example do not match mx.example.com, *.mail.example.com",
    )


def test_force_is_used_only_before_a_reject():
    for on_violation in ("tempfail", "hold"):
        fake = FakeDiscovery(mx=OTHER_MX)
        decide(discovery=fake, on_violation=on_violation)
        assert fake.forced_calls == []
    fake = FakeDiscovery(result=valid("testing"), mx=OTHER_MX)
    decide(discovery=fake, on_violation="reject")
    assert fake.forced_calls == []  # testing never rejects: no refetch
    fake = FakeDiscovery(mx=OTHER_MX, forced=valid(source="fetched"))
    decide(discovery=fake, on_violation="reject")
    assert [c[1] for c in fake.forced_calls] == ["example.com"]


def test_no_lookup_for_skipped_recipients():
    for recipient in ("<postmaster>", "<u@[192.0.2.1]>", "<u@local.example>", "<u@bad..domain>"):
        fake = FakeDiscovery()
        decide(recipient, fake)
        assert fake.calls == []


def test_local_domains_match_exactly():
    fake = FakeDiscovery()
    d = decide("<u@sub.local.example>", fake)
    assert d.reason == "mx-match"
    assert fake.calls[0][:2] == ("lookup", "sub.local.example")


def test_lookup_and_mx_share_one_deadline():
    # Discovery answers after 0.15 s of a 0.25 s budget; the MX lookup would need 1 s.
    fake = FakeDiscovery(lookup_delay=0.15, mx_delay=1.0)
    decider = make_decider(fake, lookup_timeout=0.25)
    start = fake.clock()
    d = decider.decide("<u@example.com>")
    assert d.action == "tempfail" and d.reason == "mx-dns-error"
    (_, _, lookup_timeout, _), (_, _, mx_timeout, _) = fake.calls
    assert lookup_timeout == pytest.approx(0.25) and mx_timeout == pytest.approx(0.25 - 0.15)
    assert fake.clock() - start == pytest.approx(0.25)  # answered at the deadline, not after the MX lookup


def test_slow_discovery_is_pending_by_the_deadline():
    fake = FakeDiscovery(lookup_delay=2.0)
    start = fake.clock()
    d = make_decider(fake, lookup_timeout=0.2, on_pending="tempfail").decide("<u@example.com>")
    assert fake.calls == [("lookup", "example.com", pytest.approx(0.2), False)]
    assert fake.clock() - start == pytest.approx(0.2)
    assert (d.action, d.reason) == ("tempfail", "pending")


def test_explicit_deadline_in_the_past_still_answers():
    fake = FakeDiscovery(mx=OTHER_MX, forced=valid(source="fetched"))
    d = make_decider(fake, on_violation="reject").decide("<u@example.com>", deadline=fake.clock() - 1)
    assert all(c[2] == 0.0 for c in fake.calls)  # every engine call told it has no time left
    assert d.action == "reject"  # the fake answers anyway; a real engine would say pending


def test_an_explicit_deadline_replaces_lookup_timeout():
    fake = FakeDiscovery(mx=OTHER_MX, forced=valid(source="fetched"), lookup_delay=0.1)
    d = make_decider(fake, lookup_timeout=30, on_violation="reject").decide("<u@example.com>",
                                                                            deadline=fake.clock() + 0.5)
    assert [round(c[2], 6) for c in fake.calls] == [0.5, 0.4, 0.4]  # lookup, mx, forced re-check
    assert d.action == "reject"


def test_recheck_gets_only_the_time_left():
    fake = FakeDiscovery(mx=OTHER_MX, forced=valid(source="fetched"), lookup_delay=0.1)
    start = fake.clock()
    d = make_decider(fake, lookup_timeout=0.15, on_violation="reject").decide("<u@example.com>")
    assert [c[0] for c in fake.calls] == ["lookup", "mx", "lookup"]
    assert fake.forced_calls == [("lookup", "example.com", pytest.approx(0.05), True)]
    assert fake.clock() - start == pytest.approx(0.15)
    assert (d.action, d.reason) == ("tempfail", "mx-mismatch")  # the re-check ran out of time


HOSTILE = ("mx%s.evil.example", "evil\r\n250 OK.example", "bücher.example", "a b\x00c\x7f", "x" * 300)


def test_reply_text_is_sanitized():
    fake = FakeDiscovery(
        result=valid(patterns=("mx.%d.example", "*.ok.example\r\nX"), policy_id="id%;\r\n1"),
        mx=dns.MxSet(HOSTILE, 300),
    )
    d = decide(discovery=fake)
    code, xcode, text = d.reply
    assert (code, xcode) == ("451", "4.7.5")
    assert len(text) <= decision.MAX_TEXT
    assert "%" not in text and "\r" not in text and "\n" not in text
    assert text.isascii() and text.isprintable()
    assert "mx?s.evil.example, evil??250?OK.example, b?cher.example, a?b?c?, xxx" in text
    assert "(id id????1)" in text
    # The Decision itself keeps the raw data for the caller; only texts are filtered.
    assert d.mx == HOSTILE


def test_name_lists_are_capped():
    hosts = tuple(f"mx{i}.evil.example" for i in range(8))
    d = decide(discovery=FakeDiscovery(mx=dns.MxSet(hosts, 300)))
    assert "mx0.evil.example, mx1.evil.example, mx2.evil.example, mx3.evil.example, mx4.evil.example, ..." in d.reply[2]
    assert "mx5" not in d.reply[2]


def test_empty_usable_mx_set_is_a_mismatch():
    d = decide(discovery=FakeDiscovery(mx=dns.MxSet((), 300)))
    assert (d.action, d.reason) == ("tempfail", "mx-mismatch")
    assert "domain: (none) do not match" in d.reply[2]


def test_as_dict_json_shape():
    d = decide(discovery=FakeDiscovery(mx=OTHER_MX))
    data = json.loads(json.dumps(d.as_dict()))
    assert data == {
        "recipient": "<user@example.com>",
        "domain": "example.com",
        "action": "tempfail",
        "reply": "451 4.7.5 " + MISMATCH,
        "reason": "mx-mismatch",
        "mode": "enforce",
        "policy_id": "20240101",
        "mx": ["mx1.evil.example", "mx2.evil.example"],
        "patterns": ["mx.example.com", "*.mail.example.com"],
        "would": "tempfail",
        "mx_tls": [],
    }
    accepted = Decision("<postmaster>", None, "accept", "accept", "no-domain").as_dict()
    assert accepted["reply"] is None and accepted["mx"] == [] and accepted["mode"] is None


# --- gaps found by mutation testing (tests/mutation/mutate.py)

NO_MX = dns.NoRecord("NXDOMAIN")


@pytest.mark.parametrize(
    "recipient, fake, expected",
    [
        ("<u@exa mple..com>", {}, Decision("<u@exa mple..com>", None, "accept", "accept", "bad-domain")),
        ("<u@Local.Example.>", {}, Decision("<u@Local.Example.>", "local.example", "accept", "accept",
                                           "local-domain")),
        (R, dict(result=PENDING), Decision(R, DOMAIN, "accept", "accept", "pending")),
        (R, dict(result=PENDING, on_pending="tempfail"),
         Decision(R, DOMAIN, "tempfail", "tempfail", "pending", reply=TEMPFAIL_PENDING)),
        (R, dict(result=Result(DOMAIN, "none")), Decision(R, DOMAIN, "accept", "accept", "no-policy")),
        (R, dict(result=Result(DOMAIN, "failed")), Decision(R, DOMAIN, "accept", "accept", "discovery-failed")),
        (R, dict(result=valid("none")),
         Decision(R, DOMAIN, "accept", "accept", "mode-none", "none", "20240101", patterns=PATTERNS)),
        (R, dict(mx=NO_MX), Decision(R, DOMAIN, "accept", "accept", "no-mx", "enforce", "20240101",
                                     patterns=PATTERNS)),
        (R, dict(result=valid("testing"), mx=dns.TempDnsError("SERVFAIL")),
         Decision(R, DOMAIN, "accept", "tempfail", "mx-dns-error", "testing", "20240101", patterns=PATTERNS)),
        (R, dict(mx=dns.TempDnsError("SERVFAIL")),
         Decision(R, DOMAIN, "tempfail", "tempfail", "mx-dns-error", "enforce", "20240101", patterns=PATTERNS,
                  reply=TEMPFAIL_MX_DNS)),
        ("<postmaster>", {}, Decision("<postmaster>", None, "accept", "accept", "no-domain")),
    ],
)
def test_every_field_of_each_decision(recipient, fake, expected):
    # The milter logs and counts these fields and `stsmilter check` prints them.
    fake = dict(fake)
    settings = {key: fake.pop(key) for key in list(fake) if key == "on_pending"}
    assert decide(recipient, FakeDiscovery(**fake), **settings) == expected


@pytest.mark.parametrize(
    "recipient",
    # RFC 5321 §4.1.2: the domain follows the last "@" outside a Quoted-string; an
    # empty or quoted local part does not exempt a recipient from its domain's policy.
    ["<@example.com>", '<"a@b"@example.com>', '<"@"@example.com>', "@example.com"],
)
def test_empty_and_quoted_local_parts_are_checked(recipient):
    fake = FakeDiscovery(mx=OTHER_MX)
    d = decide(recipient, fake)
    assert (d.domain, d.action, d.reason) == ("example.com", "tempfail", "mx-mismatch")
    assert [c[:2] for c in fake.calls] == [("lookup", "example.com"), ("mx", "example.com")]


def test_address_literal_after_a_quoted_at():
    assert decide('<"a@b"@[192.0.2.1]>').reason == "address-literal"
    assert decide('<"a@[b]"@example.com>').reason == "mx-match"


class PerDomainDiscovery(FakeDiscovery):
    """Every domain has a policy; only good.example's MX hosts match it."""

    def lookup(self, domain, timeout=None, force=False):
        self.calls.append(("lookup", domain, timeout, force))
        return valid(domain=domain, patterns=("*.good.example",))

    def mx(self, domain, timeout):
        self.calls.append(("mx", domain, timeout, False))
        hosts = ("mx.good.example",) if domain == "good.example" else ("mx.evil.example",)
        return dns.MxSet(hosts, 300)


def test_the_mx_set_checked_is_the_recipient_domains():
    # RFC 8461 §4.1: the MX hosts of the recipient domain are checked against its policy.
    fake = PerDomainDiscovery()
    decider = make_decider(fake)
    assert decider.decide("<u@good.example>").reason == "mx-match"
    assert decider.decide("<u@bad.example>").reason == "mx-mismatch"
    assert [c[:2] for c in fake.calls if c[0] == "mx"] == [("mx", "good.example"), ("mx", "bad.example")]


@pytest.mark.parametrize("status", ["failed", "none", "pending"])
@pytest.mark.parametrize("on_violation", ["tempfail", "reject", "hold"])
def test_a_result_that_is_not_valid_never_enforces(status, on_violation):
    # RFC 8461 §5: only a policy that applies is enforced; a failed discovery that still
    # carries a (stale) policy object must not turn into a refusal.
    stale = Result(DOMAIN, status, source="cache", policy_id="1", policy=Policy("STSv1", "enforce", 86400, PATTERNS))
    fake = FakeDiscovery(result=stale, mx=OTHER_MX, forced=valid(source="fetched"))
    d = decide(R, fake, on_violation=on_violation)
    assert (d.action, d.would, d.mode) == ("accept", "accept", None)
    assert [c[0] for c in fake.calls] == ["lookup"]  # no MX lookup, no refetch


def test_a_valid_result_without_a_policy_is_not_enforced():
    d = decide(R, FakeDiscovery(result=Result(DOMAIN, "valid", source="cache"), mx=OTHER_MX))
    assert (d.action, d.reason) == ("accept", "discovery-failed")


def test_reply_line_fits_rfc_5321():
    # RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets including the code and
    # CRLF. The longest text (every name at its longest) still fits.
    name = ".".join(["a" * 63] * 3 + ["b" * 61])
    host = ".".join(["c" * 63] * 3 + ["d" * 61])
    fake = FakeDiscovery(result=valid(patterns=(name,) * 10, policy_id="i" * 32), mx=dns.MxSet((host,) * 10, 300))
    for settings in ({}, REJECT):
        fake.forced = valid(patterns=(name,) * 10, policy_id="i" * 32, source="fetched")
        code, xcode, text = decide("<u@%s>" % name, fake, **settings).reply
        assert len(f"{code} {xcode} {text}\r\n".encode()) <= 512
        assert text.endswith("...")


@pytest.mark.parametrize("length", [decision.MAX_TEXT - 1, decision.MAX_TEXT, decision.MAX_TEXT + 1, 1000])
def test_cap_text_keeps_what_fits_and_marks_the_cut(length):
    text = "x" * length
    capped = decision.cap_text(text)
    if length <= decision.MAX_TEXT:
        assert capped == text
    else:
        assert capped == "x" * (decision.MAX_TEXT - 3) + "..."


def test_safe_names_limit_and_safe_id_of_nothing():
    five = [f"mx{i}.example" for i in range(5)]
    assert decision.safe_names(five) == ", ".join(five)  # exactly the limit: no "..."
    assert decision.safe_names(five + ["mx5.example"]) == ", ".join(five) + ", ..."
    assert decision.safe_id(None) == "" and decision.safe_id("") == ""
