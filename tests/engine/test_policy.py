"""Pure policy code: TXT record (RFC 8461 §3.1), policy file (§3.2), MX patterns (§4.1),
recipient domains."""

import logging

import pytest

from stsmilter.engine.policy import (
    MAX_AGE_LIMIT,
    Policy,
    PolicyError,
    TxtRecord,
    canonical_mx_pattern,
    is_normalized_domain,
    mx_matches,
    normalize_domain,
    parse_policy,
    parse_txt,
    recipient_domain,
    valid_mx_pattern,
)

ID32 = "A" * 16 + "0" * 16
ID33 = ID32 + "1"
NAME32 = "e" + "x" * 30 + "t"

# --- TXT record


@pytest.mark.parametrize(
    "records, expected",
    [
        (["v=STSv1; id=20160831085700Z;"], TxtRecord("20160831085700Z")),
        (["v=STSv1;id=abc"], TxtRecord("abc")),
        (["v=STSv1 ;\tid=abc ; \t"], TxtRecord("abc")),
        # §3.1 sts-field-delim = *WSP ";" *WSP, also as the optional final delimiter
        (["v=STSv1; id=abc \t;"], TxtRecord("abc")),
        (["v=STSv1; id=abc; \t"], TxtRecord("abc")),
        (["v=STSv1; id=abc \t; \t"], TxtRecord("abc")),
        ([["v=STSv1; id=2016", "0831085700Z;"]], TxtRecord("20160831085700Z")),
        ([("v=STSv1; ", b"id=abc")], TxtRecord("abc")),
        ([b"v=STSv1; id=abc"], TxtRecord("abc")),
        (["v=spf1 -all", "v=STSv1; id=abc"], TxtRecord("abc")),
        (["v=STSv10; id=old", "v=STSv1; id=abc"], TxtRecord("abc")),
        (["v=STSv1x; id=old", "v=STSv1; id=abc"], TxtRecord("abc")),
        ([b"v=spf1 \xff", "v=STSv1; id=abc"], TxtRecord("abc")),
        ([f"v=STSv1; id={ID32}"], TxtRecord(ID32)),
        (["v=STSv1; id=abc; ext_1.a-b=val!<>~:"], TxtRecord("abc", (("ext_1.a-b", "val!<>~:"),))),
        (["v=STSv1; a=1; id=abc; b=2;"], TxtRecord("abc", (("a", "1"), ("b", "2")))),
        ([f"v=STSv1; id=abc; {NAME32}=1"], TxtRecord("abc", ((NAME32, "1"),))),
        (["v=STSv1; ID=x; id=abc"], TxtRecord("abc", (("ID", "x"),))),
    ],
)
def test_parse_txt_finds_the_one_valid_record(records, expected):
    assert parse_txt(records) == expected


@pytest.mark.parametrize(
    "records",
    [
        pytest.param([], id="empty RRset"),
        pytest.param(["v=spf1 -all"], id="no STSv1 record"),
        pytest.param(["v=STSv10; id=abc"], id="STSv10"),
        pytest.param(["v=STSv1x; id=abc"], id="STSv1x"),
        pytest.param(["V=STSv1; id=abc"], id="version case"),
        pytest.param([" v=STSv1; id=abc"], id="leading space"),
        pytest.param(["v=STSv1; id=abc", "v=STSv1; id=def"], id="two records"),
        pytest.param(["v=STSv1; id=abc", b"v=STSv1; id=abc"], id="two identical records"),
        pytest.param(["v=STSv1; id=abc", "v=STSv1; id=a-b"], id="valid plus invalid STSv1"),
        pytest.param(["v=STSv1"], id="version only"),
        pytest.param(["v=STSv1;"], id="no field"),
        pytest.param(["v=STSv1; ID=abc"], id="ID upper-case"),
        pytest.param(["v=STSv1; ext=1"], id="no id"),
        pytest.param(["v=STSv1; id=abc; id=abc"], id="two ids"),
        pytest.param(["v=STSv1; id="], id="empty id"),
        pytest.param([f"v=STSv1; id={ID33}"], id="id of 33"),
        pytest.param(["v=STSv1; id=abc-1"], id="id with hyphen"),
        pytest.param(["v=STSv1; id=abc def"], id="id with space"),
        pytest.param(["v=STSv1; id=\u0661\u0662"], id="id with non-ASCII digits"),
        pytest.param(["v=STSv1;; id=abc"], id="empty field first"),
        pytest.param(["v=STSv1; id=abc;;"], id="empty field last"),
        pytest.param(["v=STSv1; id=abc; ext"], id="extension without ="),
        pytest.param(["v=STSv1; id=abc; ext="], id="extension empty value"),
        pytest.param(["v=STSv1; id=abc; _ext=1"], id="extension name starts with _"),
        pytest.param([f"v=STSv1; id=abc; {NAME32}x=1"], id="extension name of 33"),
        pytest.param(["v=STSv1; id=abc; ext=a=b"], id="extension value with ="),
        pytest.param(["v=STSv1; id=abc; ext=a b"], id="extension value with space"),
        pytest.param(["v=STSv1; id=abc; ext=\x7f"], id="extension value DEL"),
        pytest.param(["v=STSv1; id=abc; ext=caf\u00e9"], id="non-ASCII str"),
        pytest.param([b"v=STSv1; id=abc; ext=caf\xc3\xa9"], id="non-ASCII bytes"),
        pytest.param([b"v=STSv1; id=old; x=\xff", "v=STSv1; id=abc"], id="non-ASCII STSv1 record still counts"),
        pytest.param(["v=STSv1; id=abc\n"], id="trailing newline"),
    ],
)
def test_parse_txt_rejects(records):
    assert parse_txt(records) is None


@pytest.mark.parametrize("record", ["v=STSv1; id=policy1 ", "v=STSv1; id=policy1\t", "v=STSv1; id=1; ext=a  ",
                                    "v=STSv1;id=1 ; x=y \t"])
def test_parse_txt_rejects_whitespace_after_the_last_field_without_a_delimiter(record):
    """RFC 8461 §3.1: sts-text-record = sts-version 1*(sts-field-delim sts-field)
    [sts-field-delim], sts-field-delim = *WSP ";" *WSP. WSP after the last field belongs
    to no rule unless a ";" follows, and "if the resulting record is syntactically
    invalid, senders MUST assume the recipient domain does not have an available
    MTA-STS policy"."""
    assert parse_txt([record]) is None
    assert parse_txt([record.rstrip(" \t") + ";"]) is not None
    assert parse_txt([record + ";"]) is not None  # the same WSP before a final ";" is allowed


@pytest.mark.parametrize("records", ["v=STSv1; id=abc", b"v=STSv1; id=abc", [42]])
def test_parse_txt_type_errors(records):
    with pytest.raises(TypeError):
        parse_txt(records)


# --- policy file

RFC_EXAMPLE = ["version: STSv1", "mode: enforce", "mx: mail.example.com", "mx: *.example.net", "max_age: 604800"]


def text(*lines, eol="\n"):
    return eol.join(lines) + eol


def policy(mode="enforce", max_age=86400, *mx):
    return Policy(version="STSv1", mode=mode, max_age=max_age, mx=tuple(mx))


@pytest.mark.parametrize(
    "body, expected",
    [
        pytest.param(
            text(*RFC_EXAMPLE).encode(), policy("enforce", 604800, "mail.example.com", "*.example.net"), id="LF"
        ),
        pytest.param(
            text(*RFC_EXAMPLE, eol="\r\n").encode(),
            policy("enforce", 604800, "mail.example.com", "*.example.net"),
            id="CRLF",
        ),
        pytest.param(
            "\n".join(RFC_EXAMPLE), policy("enforce", 604800, "mail.example.com", "*.example.net"), id="str, no EOL"
        ),
        pytest.param(
            text("", "max_age: 1", " \t", "mx: mx.example.com", "", "mode: testing", "version: STSv1", "", ""),
            policy("testing", 1, "mx.example.com"),
            id="any order, blank lines",
        ),
        pytest.param(
            text("version:STSv1", "mode:\tnone \t", "max_age:   0"), policy("none", 0), id="WSP around values"
        ),
        pytest.param(
            text("version: STSv1", "version: STSv2", "mode: testing", "mode: bogus", "mx: a.example",
                 "max_age: 10", "max_age: x"),
            policy("testing", 10, "a.example"),
            id="first occurrence wins",
        ),
        pytest.param(
            text("Mode: bogus", "mode: none", "version: STSv1", "max_age: 5", "comment: see https://x.example/a:b",
                 "x-ext_1.a: caf\u00e9", "tab: a\tb", "empty:").encode(),
            policy("none", 5),
            id="unknown keys ignored",
        ),
        pytest.param(
            text("version: STSv1", "mode: enforce", "max_age: 5", "mx: b.example", "mx: mx.example.com",
                 "mx: MX.Example.COM", "mx: mx.example.com.", "mx: a.example"),
            policy("enforce", 5, "b.example", "mx.example.com", "a.example"),
            id="mx collected in order, deduplicated",
        ),
        pytest.param(
            text("version: STSv1", "mode: none", "max_age: 5", "mx: *.example.com"),
            policy("none", 5, "*.example.com"),
            id="none with mx",
        ),
        pytest.param(
            text("version: STSv1", "mode: none", f"max_age: {MAX_AGE_LIMIT}"), policy("none", MAX_AGE_LIMIT),
            id="max_age at the limit",
        ),
        pytest.param(
            text("version: STSv1", "mode: none", "max_age: 0000000007"), policy("none", 7), id="max_age 10 digits"
        ),
    ],
)
def test_parse_policy_valid(body, expected):
    assert parse_policy(body) == expected


@pytest.mark.parametrize("max_age", ["31557601", "9999999999"])
def test_parse_policy_caps_max_age_with_a_warning(caplog, max_age):
    with caplog.at_level(logging.WARNING, logger="stsmilter.policy"):
        result = parse_policy(text("version: STSv1", "mode: none", f"max_age: {max_age}"))
    assert result.max_age == MAX_AGE_LIMIT
    assert [(r.name, r.levelno) for r in caplog.records] == [("stsmilter.policy", logging.WARNING)]
    assert max_age in caplog.records[0].getMessage()


def test_parse_policy_does_not_warn_at_the_limit(caplog):
    with caplog.at_level(logging.DEBUG, logger="stsmilter.policy"):
        parse_policy(text("version: STSv1", "mode: none", f"max_age: {MAX_AGE_LIMIT}"))
    assert caplog.records == []


def with_lines(*replace, drop=()):
    """The RFC example with some keys dropped and some lines appended."""
    kept = [line for line in RFC_EXAMPLE if line.split(":")[0] not in drop]
    return text(*kept, *replace)


@pytest.mark.parametrize(
    "body, message",
    [
        (b"", "version: missing"),
        (with_lines(drop=("version",)), "version: missing"),
        (with_lines(drop=("mode",)), "mode: missing"),
        (with_lines(drop=("max_age",)), "max_age: missing"),
        (with_lines(drop=("mx",)), "mx: mode enforce needs at least one mx"),
        (text("version: STSv1", "mode: testing", "max_age: 1"), "mx: mode testing needs at least one mx"),
        (text("version: STSv2", "mode: none", "max_age: 1"), "version: must be STSv1"),
        (text("version: stsv1", "mode: none", "max_age: 1"), "version: must be STSv1"),
        (text("version: STSv1;", "mode: none", "max_age: 1"), "version: must be STSv1"),
        (text("version: STSv1", "mode: Enforce", "max_age: 1"), "mode: must be enforce, testing or none"),
        (text("version: STSv1", "mode: enforcing", "max_age: 1"), "mode: must be enforce, testing or none"),
        (text("version: STSv1", "mode:", "max_age: 1"), "mode: must be enforce, testing or none"),
        *[
            (text("version: STSv1", "mode: none", f"max_age: {value}"), "max_age: not a number")
            for value in ("-1", "+1", "1 0", "86400s", "", "12345678901", "0x10", "1.5", "\u0661")
        ],
        (with_lines("mx: *example.com"), "mx: invalid pattern '*example.com'"),
        (with_lines("mx: _mx.example.com"), "mx: invalid pattern"),
        (with_lines("mx: 192.0.2.1"), "mx: invalid pattern"),
        (with_lines("mx: mx.b\u00fccher.example").encode(), "mx: invalid pattern"),
        (with_lines("mx:"), "mx: invalid pattern ''"),
        (text("version: STSv1", "mode: none", "max_age: 1", "mx: a*.example"), "mx: invalid pattern"),
        (with_lines("version STSv1"), "line 6: no ':'"),
        (with_lines(": value"), "line 6: bad key ''"),
        (with_lines("version : STSv1"), "line 6: bad key 'version '"),
        (with_lines(" mode: enforce"), "line 6: bad key ' mode'"),
        (with_lines("_x: y"), "line 6: bad key"),
        (with_lines("k" * 33 + ": y"), "line 6: bad key"),
        ("\ufeff" + text(*RFC_EXAMPLE), "line 1: bad key '\\ufeffversion'"),
        ("version: STSv1\rmode: enforce\n" + text(*RFC_EXAMPLE[2:]), "line 1: carriage return without line feed"),
        (text(*RFC_EXAMPLE) + "x: y\r", "line 6: carriage return without line feed"),
        (with_lines("mode: enforce\x00"), "line 6: control character in the value of mode"),
        (with_lines("comment: a\x1bb"), "line 6: control character in the value of comment"),
        (with_lines("comment: a\x7f"), "control character"),
        (with_lines("comment: a\x85"), "control character"),
        (b"version: STSv1\nmode: none\nmax_age: 1\nx: \xff\n", "not valid UTF-8"),
    ],
)
def test_parse_policy_invalid(body, message):
    with pytest.raises(PolicyError) as caught:
        parse_policy(body)
    assert message in str(caught.value)
    assert caught.value.reason == "sts-policy-invalid"


def test_policy_error_is_a_value_error_with_a_reason():
    error = PolicyError("boom", reason="sts-other")
    assert isinstance(error, ValueError)
    assert (str(error), error.reason) == ("boom", "sts-other")
    assert PolicyError("boom").reason == "sts-policy-invalid"


@pytest.mark.parametrize(
    "bad_line",
    [
        "mode: " + "x" * 1000,
        "y" * 1000,
        "mode: enf\u202eorce",
    ],
)
def test_parse_policy_messages_are_short_and_escaped(bad_line):
    body = text(*[line for line in RFC_EXAMPLE if not line.startswith("mode")], bad_line)
    with pytest.raises(PolicyError) as caught:
        parse_policy(body)
    message = str(caught.value)
    assert len(message) < 100
    assert message.isprintable()


# --- MX patterns


@pytest.mark.parametrize(
    "pattern",
    [
        "mx.example.com",
        "MX.EXAMPLE.COM",
        "mx.example.com.",
        "*.example.com",
        "*.example.com.",
        "*.com",
        "xn--bcher-kva.example",
        "1mx.a-b.example",
        "localhost",
        "a" * 63 + ".example",
        ".".join(["a" * 63] * 3 + ["b" * 61]),  # 253 characters
    ],
)
def test_valid_mx_pattern(pattern):
    assert valid_mx_pattern(pattern) is True


@pytest.mark.parametrize(
    "pattern",
    [
        "",
        ".",
        "*",
        "*.",
        "**.example.com",
        "*example.com",
        "a*.example.com",
        "mx.*.example.com",
        "*.*.example.com",
        "_mx.example.com",
        "mx.b\u00fccher.example",
        "\u212aitchen.example",  # KELVIN SIGN lower-cases to ASCII "k"
        "192.0.2.1",
        "*.192.0.2.1",
        "[192.0.2.1]",
        "-mx.example.com",
        "mx-.example.com",
        "a" * 64 + ".example",
        ".".join(["a" * 63] * 3 + ["b" * 62]),  # 254 characters
        "mx..example.com",
        "mx.example.com..",
        ".mx.example.com",
        "mx example.com",
        "mx.example.com:25",
        "mx.example.com\n",
        b"mx.example.com",
        None,
    ],
)
def test_invalid_mx_pattern(pattern):
    assert valid_mx_pattern(pattern) is False
    assert canonical_mx_pattern(pattern) is None


@pytest.mark.parametrize(
    "pattern, canonical",
    [
        ("mx.example.com", "mx.example.com"),
        ("MX.Example.COM", "mx.example.com"),
        ("mx.example.com.", "mx.example.com"),  # §4.1 compares names: the root dot adds nothing
        ("*.Example.COM.", "*.example.com"),
        ("*.x", "*.x"),
        ("*." + ".".join(["a" * 63] * 3 + ["b" * 59]), "*." + ".".join(["a" * 63] * 3 + ["b" * 59])),  # 253
    ],
)
def test_canonical_mx_pattern(pattern, canonical):
    """Policies keep, and the socketmap hands Postfix, one spelling per name: lower-case
    (DNS names compare case-insensitively, RFC 4343) and without the trailing dot that
    neither certificate names nor Postfix's match= names carry."""
    assert canonical_mx_pattern(pattern) == canonical


def test_parse_policy_keeps_mx_patterns_in_canonical_form():
    body = text("version: STSv1", "mode: enforce", "max_age: 5", "mx: MX1.Example.COM.", "mx: *.Mail.Example.NET.",
                "mx: mx1.example.com")
    assert parse_policy(body).mx == ("mx1.example.com", "*.mail.example.net")


@pytest.mark.parametrize(
    "pattern, host, expected",
    [
        ("*.example.com", "mx.example.com", True),
        ("*.example.com", "MX.Example.COM.", True),
        ("*.Example.COM.", "mx.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", "xexample.com", False),
        ("*.example.com", ".example.com", False),
        ("*.example.com", "mx.example.com.evil", False),
        ("*example.com", "xexample.com", False),
        ("mx.example.com", "mx.example.com", True),
        ("mx.example.com", "MX.EXAMPLE.COM.", True),
        ("mx.example.com.", "mx.example.com", True),
        ("mx.example.com", "mx2.example.com", False),
        ("mx.example.com", "a.mx.example.com", False),
        ("mx.example.com", "mx.example.com..", False),
        ("mx.kitchen.example", "mx.\u212aitchen.example", False),
        ("", "", False),
    ],
)
def test_mx_matches(pattern, host, expected):
    assert mx_matches(pattern, host) is expected


@pytest.mark.parametrize(
    "host, expected",
    [("mail.example.com", True), ("a.example.net", True), ("example.net", False), ("mail.example.org", False)],
)
def test_policy_matches_any_pattern(host, expected):
    assert policy("enforce", 1, "mail.example.com", "*.example.net").matches(host) is expected
    assert policy("none", 1).matches(host) is False


# --- recipient domains


@pytest.mark.parametrize(
    "domain, expected",
    [
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),
        (" example.com \t", "example.com"),
        ("B\u00fccher.Example.", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("b\u00fccher\u3002example", "xn--bcher-kva.example"),  # ideographic full stop
        ("\u212aitchen.example", "kitchen.example"),  # UTS 46 mapping, not a blind lower()
        ("\u4f8b\u3048.\u30c6\u30b9\u30c8", "xn--r8jz45g.xn--zckzah"),
        ("r3---sn-abc.googlevideo.com", "r3---sn-abc.googlevideo.com"),
        ("localhost", "localhost"),
        ("[192.0.2.1]", None),
        ("[IPv6:2001:db8::1]", None),
    ],
)
def test_normalize_domain(domain, expected):
    assert normalize_domain(domain) == expected


@pytest.mark.parametrize(
    "domain",
    [
        "",
        " ",
        ".",
        "example..com",
        "example.com..",
        "exa mple.com",
        "a_b.example",
        "-a.example",
        "a" * 64 + ".example",
        ".".join(["a" * 63] * 4),
        "192.0.2.1",
        "[]",
        "[192.0.2.1",
        "user@example.com",
        "b\u00fc_cher.example",
    ],
)
def test_normalize_domain_rejects(domain):
    with pytest.raises(ValueError):
        normalize_domain(domain)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("example.com", True),
        ("xn--bcher-kva.example", True),
        ("Example.com", False),  # normalizes to another text
        ("example.com.", False),
        (" example.com", False),
        ("b\u00fccher.example", False),  # the U-label of an A-label domain
        ("[192.0.2.1]", False),  # an address literal: no domain at all
        ("example..com", False),  # not a domain: ValueError inside
        ("", False),
        (b"example.com", False),  # stored bytes, not text
        (None, False),
    ],
)
def test_is_normalized_domain(text, expected):
    assert is_normalized_domain(text) is expected


@pytest.mark.parametrize(
    "address, expected",
    [
        ("<user@Dom.Example.>", "dom.example"),
        ("user@dom.example", "dom.example"),
        (" <user@dom.example> ", "dom.example"),
        ('"a@b"@example.com', "example.com"),
        ('<"a\\"@b"@Example.COM>', "example.com"),
        ("<@relay.example:user@dom.example>", "dom.example"),
        ("user@B\u00fccher.Example", "xn--bcher-kva.example"),
        ("postmaster", None),
        ("<postmaster>", None),
        ("<>", None),
        ('"a@b"', None),
        ("user@[192.0.2.1]", None),
        ("<user@[IPv6:2001:db8::1]>", None),
    ],
)
def test_recipient_domain(address, expected):
    assert recipient_domain(address) == expected


@pytest.mark.parametrize(
    "address",
    ["user@", "<user@>", "user@exa mple.com", "user@192.0.2.1", "<user@dom.example", "user@dom.example>",
     "user@dom..example", "user@bad_domain.example"],
)
def test_recipient_domain_rejects(address):
    with pytest.raises(ValueError):
        recipient_domain(address)


# --- gaps found by mutation testing (tests/mutation/mutate.py)


def test_parse_txt_counts_only_the_exact_version_prefix():
    """RFC 8461 §3.1: records that do not begin with "v=STSv1;" are discarded, and the
    ABNF spells it %s"v=STSv1" (RFC 7405: case-sensitive). An upper-case look-alike is
    not a second STSv1 record, so the real one is still the only one."""
    assert parse_txt(["V=STSv1; id=a", "v=STSv1; id=b"]) == TxtRecord("b")
    assert parse_txt(["v=STSV1; id=a", "v=stsv1; id=c", "v=STSv1; id=b"]) == TxtRecord("b")


@pytest.mark.parametrize("record", ["v=STSv1;;id=1", "v=STSv1; id=1;;", "v=STSv1; ;id=1", "v=STSv1 ; ; id=1"])
def test_parse_txt_rejects_empty_fields(record):
    """RFC 8461 §3.1: sts-field-delim separates fields (1*(sts-field-delim sts-field));
    two delimiters in a row leave an empty field, which no rule allows."""
    assert parse_txt([record]) is None


def test_parse_txt_final_delimiter_adds_no_extension():
    # §3.1: [sts-field-delim] at the end is a delimiter, not an empty extension field.
    assert parse_txt(["v=STSv1; id=1; a=b;"]) == TxtRecord("1", (("a", "b"),))
    assert parse_txt(["v=STSv1; id=1 ; \t"]) == TxtRecord("1")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: parse_txt("v=STSv1; id=1"), "parse_txt takes a list of records, not a single record"),
        (lambda: parse_txt([1]), "TXT record must be str, bytes or a list of them, not int"),
        (lambda: parse_policy(7), "policy body must be bytes or str, not int"),
        (lambda: __import__("stsmilter.engine.policy").engine.policy.sts_record_texts(b"v=STSv1"),
         "takes a list of records, not a single record"),
    ],
)
def test_type_errors_name_the_mistake(call, message):
    with pytest.raises(TypeError) as caught:
        call()
    assert str(caught.value) == message


def test_policy_not_utf8_message():
    with pytest.raises(PolicyError) as caught:
        parse_policy(b"version: STSv1\nmode: none\nmax_age: 1\nx: \xff\n")
    assert str(caught.value) == "not valid UTF-8"


@pytest.mark.parametrize("length, shown", [(40, "'" + "m" * 40 + "'"), (41, "'" + "m" * 40 + "'...")])
def test_untrusted_values_in_messages_are_cut_at_40_characters(length, shown):
    with pytest.raises(PolicyError) as caught:
        parse_policy(text("version: STSv1", "max_age: 1", "mode: " + "m" * length))
    assert str(caught.value) == "mode: must be enforce, testing or none, not " + shown


def test_capped_max_age_warning_text(caplog):
    with caplog.at_level(logging.WARNING, logger="stsmilter.policy"):
        parse_policy(text("version: STSv1", "mode: none", "max_age: 31557601"))
    assert caplog.records[0].getMessage() == "policy max_age 31557601 above 31557600 seconds, capped"


@pytest.mark.parametrize("line", ["\x0b", "\x0c", "\u00a0", "\u2003"])
def test_a_line_of_other_white_space_is_not_blank(line):
    # §3.2: fields are separated by LF or CRLF, with WSP (SP, HTAB) around values; a line
    # holding only some other space character is neither a field nor a blank line.
    with pytest.raises(PolicyError):
        parse_policy(text(*RFC_EXAMPLE, line))


def test_policy_as_dict():
    sts = policy("enforce", 604800, "mail.example.com", "*.example.net")
    assert sts.as_dict() == {"version": "STSv1", "mode": "enforce", "max_age": 604800,
                             "mx": ["mail.example.com", "*.example.net"]}


LABEL63 = "a" * 63


@pytest.mark.parametrize(
    "pattern, valid",
    [
        # RFC 8461 §4.1: "*." is the whole leftmost label, matching one label
        ("*.x", True),
        ("*.-x.example", False),  # the label after the wildcard must be an LDH label (RFC 5321 Domain)
        ("*.x-.example", False),
        ("", False),
        ("*.", False),
        # RFC 1035 §2.3.4 / RFC 5321 §4.5.3.1.2: a name is at most 253 octets in text form
        ("*." + ".".join([LABEL63] * 3 + ["b" * 59]), True),  # 253 octets with the "*."
        ("*." + ".".join([LABEL63] * 3 + ["b" * 60]), False),  # 254
        (".".join([LABEL63] * 3 + ["b" * 61]), True),  # 253
        (".".join([LABEL63] * 3 + ["b" * 61]) + ".", True),  # 253 and the root dot
        (".".join([LABEL63] * 3 + ["b" * 62]), False),  # 254
    ],
)
def test_mx_pattern_boundaries(pattern, valid):
    assert valid_mx_pattern(pattern) is valid


@pytest.mark.parametrize(
    "pattern, host, expected",
    [
        ("*.x", "a.x", True),  # a one-character suffix is still a suffix (§4.1)
        ("*.x", "x", False),
        ("*.x", "a.b.x", False),
        ("", "mx.example.com", False),  # an empty pattern or host matches nothing
        ("mx.example.com", "", False),
        ("*.example.com", "", False),
        ("*..", "a..", False),  # "*." alone (after its root dot) has no suffix to match against
        ("*.", "a.", False),
    ],
)
def test_mx_matches_edges(pattern, host, expected):
    assert mx_matches(pattern, host) is expected


@pytest.mark.parametrize(
    "domain, expected",
    [
        (".".join([LABEL63] * 3 + ["b" * 61]), ".".join([LABEL63] * 3 + ["b" * 61])),  # 253: the longest name
        (".".join([LABEL63] * 3 + ["b" * 61]) + ".", ".".join([LABEL63] * 3 + ["b" * 61])),
    ],
)
def test_normalize_domain_longest_name(domain, expected):
    assert normalize_domain(domain) == expected


def test_normalize_domain_254_octets():
    with pytest.raises(ValueError):
        normalize_domain(".".join([LABEL63] * 3 + ["b" * 62]))


@pytest.mark.parametrize(
    "address, expected",
    [
        # RFC 5321 §4.1.2: Mailbox = Local-part "@" Domain; the domain follows the last
        # "@" outside a Quoted-string, whatever the local part looks like.
        ("<@example.com>", "example.com"),
        ("@example.com", "example.com"),
        ('<"a@b"@example.com>', "example.com"),
        ('"a@b"@example.com', "example.com"),
        ('<"@"@example.com>', "example.com"),
        ('<"a\\"@b"@example.com>', "example.com"),
        ("<a@b@example.com>", "example.com"),
    ],
)
def test_recipient_domain_with_empty_or_quoted_local_parts(address, expected):
    assert recipient_domain(address) == expected


@pytest.mark.parametrize("address", ["<u@example.com", "u@example.com>", "postmaster>", "<postmaster"])
def test_unbalanced_brackets_message(address):
    with pytest.raises(ValueError) as caught:
        recipient_domain(address)
    assert str(caught.value) == f"unbalanced angle brackets: {address!r}"
