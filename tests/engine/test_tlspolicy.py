"""tlspolicy.py: the answer table, key normalization, DANE first; pure, no server."""

import dataclasses

import pytest

from stsmilter import config
from stsmilter.engine import dane, tlspolicy
from stsmilter.engine.policy import Policy, Result

ENFORCE = Policy("STSv1", "enforce", 86400, ("mx1.example.com", "*.example.net"))
TESTING = dataclasses.replace(ENFORCE, mode="testing")
SECURE = b"OK secure match=mx1.example.com:.example.net servername=hostname"


def valid(domain="example.com", sts=ENFORCE):
    return Result(domain, "valid", source="cache", policy_id="id1", policy=sts)


def make_settings(**changes):
    changes.setdefault("listen", config.Listen("inet", host="127.0.0.1", port=0))
    changes.setdefault("lookup_timeout", 0.3)
    return dataclasses.replace(config.defaults().socketmap, **changes)

NOW = 1000.0


def verdict(kind, expires=NOW + 300):
    return dane.Verdict(kind, expires, NOW)


DANE = verdict(dane.DANE)
NO_DANE = verdict(dane.NO_DANE)
DNS_ERROR = verdict(dane.DNS_ERROR)
PENDING = verdict(dane.PENDING)


@pytest.mark.parametrize(
    "result, changes, expected",
    [
        (valid(), {}, SECURE),
        (valid(sts=TESTING), {}, b"NOTFOUND "),
        (valid(sts=TESTING), {"strict_testing": True}, SECURE),
        (valid(sts=dataclasses.replace(ENFORCE, mode="none", mx=())), {}, b"NOTFOUND "),
        (valid(sts=dataclasses.replace(ENFORCE, mode="none", mx=())), {"strict_testing": True}, b"NOTFOUND "),
        (Result("example.com", "none"), {}, b"NOTFOUND "),
        (Result("example.com", "failed", reason="sts-policy-fetch-error"), {}, b"NOTFOUND "),
        (Result("example.com", "pending"), {}, b"TEMP MTA-STS policy lookup in progress"),
        (Result("example.com", "pending"), {"on_timeout": "notfound"}, b"NOTFOUND "),
        (valid(sts=dataclasses.replace(ENFORCE, mx=("*.a.example", "b.example"))), {},
         b"OK secure match=.a.example:b.example servername=hostname"),
        (valid(sts=dataclasses.replace(ENFORCE, mx=())), {}, b"TEMP MTA-STS policy lists no mx"),
    ],
)
def test_answer_table(result, changes, expected):
    assert tlspolicy.answer(result, make_settings(**changes)) == expected


def test_answer_tlsrpt_attributes():
    got = tlspolicy.answer(valid(), make_settings(tlsrpt=True))
    assert got == (
        SECURE + b" policy_type=sts policy_domain=example.com"
        b" mx_host_pattern=mx1.example.com mx_host_pattern=*.example.net"
        b" { policy_string = version: STSv1 } { policy_string = mode: enforce }"
        b" { policy_string = mx: mx1.example.com } { policy_string = mx: *.example.net }"
        b" { policy_string = max_age: 86400 }"
    )
    testing = tlspolicy.answer(valid(sts=TESTING), make_settings(tlsrpt=True, strict_testing=True))
    assert b"{ policy_string = mode: testing }" in testing
    assert tlspolicy.answer(valid(sts=TESTING), make_settings(tlsrpt=True)) == b"NOTFOUND "


def test_answer_too_long_for_postfix_drops_tlsrpt_attributes():
    many = tuple("mx%d.%s.example" % (i, "a" * 50) for i in range(600))
    got = tlspolicy.answer(valid(sts=dataclasses.replace(ENFORCE, mx=many)), make_settings(tlsrpt=True))
    assert got.startswith(b"OK secure match=mx0.") and b"policy_type" not in got
    assert len(got) <= tlspolicy.MAX_REPLY


@pytest.mark.parametrize(
    "key, expected",
    [
        (b"example.com", "example.com"),
        (b"Example.COM.", "example.com"),
        (b"mail-1.sub.example.com", "mail-1.sub.example.com"),
        (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("B\u00fccher.example".encode(), "xn--bcher-kva.example"),  # U-labels -> A-labels
        (b"localhost", "localhost"),
        (b"", None),
        (b".", None),
        (b".example.com", None),  # Postfix parent-domain lookup
        (b"example..com", None),
        (b"example.com..", None),
        (b"[mx.example.com]", None),
        (b"[mx.example.com]:25", None),
        (b"mx.example.com:25", None),
        (b"192.0.2.1", None),
        (b"[192.0.2.1]", None),
        (b"2001:db8::1", None),
        (b"[ipv6:2001:db8::1]", None),
        (b"exa_mple.com", None),
        (b"exa mple.com", None),
        (b"-example.com", None),
        (b"example-.com", None),
        (b"a" * 64 + b".com", None),
        (b".".join([b"a" * 60] * 5), None),  # longer than 253
        (b"\xff\xfe.example", None),  # not UTF-8
        ("\u2603.example".encode(), None),  # a symbol: not IDNA 2008
        ("ex\u200bample.com".encode(), "example.com"),  # UTS 46 ignores it, as Postfix does
        (b"user@example.com", None),
        ("b\u00fccher.example..".encode(), None),  # as the milter: one trailing dot only
        (b"b\xfccher.example", None),  # latin-1
        (b"\xed\xa0\x80.example", None),  # an encoded surrogate
    ],
)
def test_normalize_key(key, expected):
    assert tlspolicy.normalize_key(key) == expected


def test_answer_for_a_policy_cached_before_patterns_were_canonical():
    # A store written by an older version may hold "MX1.Example.COM." as it was published.
    old = dataclasses.replace(ENFORCE, mx=("MX1.Example.COM.", "*.Example.NET."))
    assert tlspolicy.answer(valid(sts=old), make_settings()) == SECURE
    tlsrpt = tlspolicy.answer(valid(sts=old), make_settings(tlsrpt=True))
    assert b"mx_host_pattern=mx1.example.com mx_host_pattern=*.example.net" in tlsrpt
    assert b"{ policy_string = mx: *.example.net }" in tlsrpt


@pytest.mark.parametrize("result, changes, the_verdict, expected", [
    (valid(), {}, DANE, b"OK dane-only"),
    (valid(), {}, NO_DANE, SECURE),
    (valid(), {}, None, SECURE),  # not checked ([socketmap] dane = no, or Sendmail's map)
    (valid(), {}, DNS_ERROR, b"TEMP DNSSEC lookup for DANE failed"),
    (valid(), {}, PENDING, b"TEMP MTA-STS policy lookup in progress"),
    (valid(), {"on_timeout": "notfound"}, PENDING, b"NOTFOUND "),
    (valid(sts=TESTING), {}, DANE, b"NOTFOUND "),  # nothing enforced: Postfix's own level applies
    (valid(sts=TESTING), {"strict_testing": True}, DANE, b"OK dane-only"),
    (valid(sts=dataclasses.replace(ENFORCE, mx=())), {}, DANE, b"OK dane-only"),  # DANE ignores the mx list
    (valid(sts=dataclasses.replace(ENFORCE, mx=())), {}, NO_DANE, b"TEMP MTA-STS policy lists no mx"),
    (valid(sts=dataclasses.replace(ENFORCE, mode="none")), {}, DANE, b"NOTFOUND "),
    (Result("example.com", "none"), {}, DANE, b"NOTFOUND "),
    (Result("example.com", "failed", reason="dns-error"), {}, DNS_ERROR, b"NOTFOUND "),
    (Result("example.com", "pending"), {}, DANE, b"TEMP MTA-STS policy lookup in progress"),
])
def test_answer_with_a_verdict(result, changes, the_verdict, expected):
    assert tlspolicy.answer(result, make_settings(**changes), the_verdict) == expected


@pytest.mark.parametrize("result, changes, expected", [
    (valid(), {}, True),
    (valid(sts=TESTING), {}, False),
    (valid(sts=TESTING), {"strict_testing": True}, True),
    (valid(sts=dataclasses.replace(ENFORCE, mode="none")), {"strict_testing": True}, False),
    (valid(sts=dataclasses.replace(ENFORCE, mx=())), {}, True),
    (Result("example.com", "none"), {}, False),
    (Result("example.com", "valid"), {}, False),  # valid without a policy: never enforced
    (dataclasses.replace(valid(), status="failed"), {}, False),
])
def test_enforced(result, changes, expected):
    assert tlspolicy.enforced(result, make_settings(**changes)) is expected


@pytest.mark.parametrize("name, expected", [(b"postfix", True), (b"x", True), (b"sts", False), (b"STS", True)])
def test_dane_first_for_every_map_but_sendmails(name, expected):
    # Sendmail 8.17's FEATURE(`sts') asks "sts DOMAIN" after its own DANE (README) and
    # understands only "secure ..." there; any other map name is Postfix's choice.
    assert tlspolicy.dane_first(name) is expected


@pytest.mark.parametrize("mx", [("mx.example.com servername=evil",), ("mx.example.com}",), ("*.*.example.com",)])
def test_answer_refuses_text_that_would_change_postfix_syntax(mx):
    with pytest.raises(ValueError):
        tlspolicy.answer(valid(sts=dataclasses.replace(ENFORCE, mx=mx)), make_settings(tlsrpt=True))


# --- gaps found by mutation testing (tests/mutation/mutate.py)


def test_answer_for_an_upper_case_mx_pattern_is_lower_case():
    # DNS names compare case-insensitively (RFC 4343); the match= list is canonical.
    sts = dataclasses.replace(ENFORCE, mx=("MX1.Example.COM", "*.EXAMPLE.net"))
    assert tlspolicy.answer(valid(sts=sts), make_settings()) == SECURE


def test_longest_legal_domain_key():
    # RFC 1035 §2.3.4 / RFC 5321 §4.5.3.1.2: 253 octets is the longest name in text form.
    longest = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert tlspolicy.normalize_key(longest.encode()) == longest
    assert tlspolicy.normalize_key(longest.encode() + b".") == longest
    assert tlspolicy.normalize_key(longest.encode() + b"b") is None
    assert tlspolicy.answer(valid(longest), make_settings()) == SECURE


@pytest.mark.parametrize("status", ["failed", "none", "bogus"])
def test_a_result_that_is_not_valid_never_enforces_even_with_a_policy(status):
    # A failed discovery may still carry the policy it failed to refresh: only "valid"
    # (RFC 8461 §5.1: a policy that applies) turns into "secure".
    assert tlspolicy.answer(Result("example.com", status, policy=ENFORCE), make_settings()) == b"NOTFOUND "


@pytest.mark.parametrize("result", [valid(sts=dataclasses.replace(ENFORCE, version="STSv2")), valid("bad domain")])
def test_answer_refuses_a_policy_it_cannot_vouch_for(result):
    # RFC 8461 §3.2: only version STSv1 is defined. An enforce policy the socketmap cannot
    # turn into Postfix syntax is TEMP (retry), never NOTFOUND (delivery in clear).
    with pytest.raises(ValueError) as caught:
        tlspolicy.answer(result, make_settings())
    assert str(caught.value) == "unsafe text in the policy of %r" % result.domain


def test_tlsrpt_attributes_up_to_exactly_the_postfix_reply_limit():
    # The longest reply the Postfix socketmap client takes is MAX_REPLY octets: a reply of
    # exactly that length keeps its TLSRPT attributes, a longer one drops them.
    def reply(length, max_age, count=None):
        base = tuple("mx%04d.%s.example" % (i, "a" * 50) for i in range(count or base_count))
        last = ".".join(["c" * 60] * (length // 61) + ["c" * max(1, length % 61)])
        sts = dataclasses.replace(ENFORCE, mx=base + (last,), max_age=max_age)
        return tlspolicy.answer(valid(sts=sts), make_settings(tlsrpt=True))

    per_pattern = len(reply(1, 1, 2)) - len(reply(1, 1, 1))
    base_count = (tlspolicy.MAX_REPLY - len(reply(1, 1, 1)) - 100) // per_pattern
    length = (tlspolicy.MAX_REPLY - len(reply(1, 1))) // 3  # each octet of the last name is there 3 times
    replies = [reply(n, max_age) for n in range(length - 2, length + 3) for max_age in (1, 10, 100)]
    with_attributes = {len(r) for r in replies if b"policy_type" in r}
    assert max(with_attributes) == tlspolicy.MAX_REPLY
    assert any(b"policy_type" not in r and r.endswith(b"servername=hostname") for r in replies)  # dropped
