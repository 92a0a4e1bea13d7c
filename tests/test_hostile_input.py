"""Property-based: nothing from the network raises out of a front end, and the milter
and the socketmap agree (issue 9 item 4).

* every policy text the parser accepts yields a socketmap answer and a milter decision
  without an exception, and both front ends enforce the same MX names;
* every byte string as a socketmap key, through the real asyncio server on loopback,
  gets one well-formed netstring reply;
* every byte string as an envelope recipient, as pymilter 1.0.5 hands it over
  (envrcpt_bytes: UTF-8 with surrogateescape), and non-UTF-8 macro values, get a
  milter return code whose SMTP reply agrees with it, and log lines syslog can encode;
* every byte stream an MX host sends the MX TLS check is one bounded reply or a
  ProtocolError.

Runs are bounded and deterministic: derandomize, no example database.
"""

import collections
import dataclasses
import logging
import socket
import string

import Milter
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from Milter import testctx  # never Milter.test: importing it changes Milter.NOREPLY

from stsmilter import config
from stsmilter.engine import dns, policy, tlspolicy
from stsmilter.milter import session as milter
from stsmilter.socketmap import connection as socketmap, server as socketmap_server
from stsmilter.engine.decision import Decider
from stsmilter.engine.policy import Policy, PolicyError, Result
from test_socketmap import FakeDiscovery as SocketmapDiscovery
from test_tlspolicy import make_settings
from world.socketmap_client import read_replies, request

BOUNDED = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# --- strategies

LDH = string.ascii_lowercase + string.digits + "-"
labels = st.text(alphabet=LDH + "ABZ", min_size=1, max_size=10)
hostnames = st.lists(labels, min_size=1, max_size=4).map(".".join)
mx_values = st.one_of(
    hostnames,
    hostnames.map(lambda h: "*." + h),
    hostnames.map(lambda h: h + "."),  # the trailing dot of issue 9
    hostnames.map(lambda h: "*." + h + "."),
    st.text(max_size=20),  # anything at all
)
other_lines = st.one_of(
    st.sampled_from(["mode: enforce", "mode: testing", "mode: none", "mode: x", "version: STSv2", "max_age: -1"]),
    st.integers(0, 10 ** 11).map(lambda n: f"max_age: {n}"),
    st.text(max_size=30),
)


@st.composite
def policy_texts(draw):
    lines = [
        "version: STSv1",
        "mode: " + draw(st.sampled_from(policy.MODES)),
        "max_age: %d" % draw(st.integers(0, 2 * policy.MAX_AGE_LIMIT)),
    ]
    lines += ["mx:" + draw(st.sampled_from(["", " ", "\t "])) + value
              for value in draw(st.lists(mx_values, max_size=6))]
    lines += draw(st.lists(other_lines, max_size=3))
    lines = draw(st.permutations(lines))
    return draw(st.sampled_from(["\n", "\r\n"])).join(lines)


def mx_hosts_for(patterns):
    """MX host names as dns.py returns them (lower-case, no trailing dot): names the
    patterns allow, names one label too deep, and unrelated names."""
    hosts = st.sampled_from(["mx.elsewhere.example", "a.b"])
    if patterns:
        bases = st.sampled_from(patterns).map(lambda p: p.lower().rstrip("."))
        hosts = st.one_of(
            hosts,
            st.tuples(labels, bases).map(lambda t: t[1].replace("*", t[0].lower(), 1)),
            st.tuples(labels, bases).map(lambda t: t[0].lower() + "." + t[1].replace("*", "x", 1)),
        )
    return st.lists(hosts, min_size=1, max_size=4).map(tuple)


def postfix_allows(match_names, host):
    """Postfix's secure-level match= semantics: a name matches itself; ".suffix" matches
    any name below suffix (RFC 8461's "*." allows one label only: the documented weakening)."""
    return any(host == name or (name.startswith(".") and host.endswith(name)) for name in match_names)


def rfc_allows(match_names, host):
    """RFC 8461 §4.1 read into the same names: ".suffix" stands for "*.suffix", one label."""
    return any(host == name or (name.startswith(".") and host.endswith(name) and host[: -len(name)]
                                and "." not in host[: -len(name)]) for name in match_names)


class OneDomainDiscovery:
    """The engine for one recipient domain: a fixed Result and MX set."""

    def __init__(self, result, mx):
        self.result, self.mx_set = result, mx

    def lookup(self, domain, timeout=None, force=False):
        assert domain == self.result.domain
        return dataclasses.replace(self.result, source="fetched") if force else self.result

    def mx(self, domain, timeout):
        assert domain == self.result.domain
        return self.mx_set


def decider_for(discovery, on_violation="tempfail"):
    cfg = config.defaults().replace(milter={"on_violation": on_violation})
    return Decider(discovery, cfg.milter, cfg.scope)


# --- policy texts -> both front ends


def test_every_accepted_policy_is_answered_by_both_front_ends():
    checked = collections.Counter()  # examples that got through every check, by mode

    @BOUNDED
    @given(text=policy_texts(), data=st.data())
    def check(text, data):
        try:
            sts = policy.parse_policy(text)
        except PolicyError:
            sts = None
        assume(sts is not None)  # a rejected text is no example: Hypothesis draws another
        result = Result("policy.example", "valid", source="fetched", policy_id="id1", policy=sts)
        for strict, tlsrpt in ((False, False), (True, True)):
            payload = tlspolicy.answer(result, make_settings(strict_testing=strict, tlsrpt=tlsrpt))
            assert isinstance(payload, bytes) and payload.split(b" ", 1)[0] in (b"OK", b"NOTFOUND", b"TEMP")
            assert b"\n" not in payload and b"," not in payload[:payload.find(b" ") + 1]
        secure = tlspolicy.answer(result, make_settings())
        hosts = data.draw(mx_hosts_for(sts.mx))
        for on_violation in ("tempfail", "reject", "hold"):
            verdict = decider_for(OneDomainDiscovery(result, dns.MxSet(hosts, 300)), on_violation).decide(
                "<u@policy.example>")
            assert verdict.action in ("accept", "tempfail", "reject", "hold")
            assert (verdict.reply is not None) == (verdict.action in ("tempfail", "reject"))
        if sts.mode != "enforce":
            assert secure == b"NOTFOUND " and verdict.action == "accept"
            checked[sts.mode] += 1
            return
        assert secure.startswith(b"OK secure match=") and secure.endswith(b" servername=hostname")
        names = secure[len(b"OK secure match="):-len(b" servername=hostname")].decode("ascii").split(":")
        assert all(name == name.lower() and not name.endswith(".") for name in names)
        # The two front ends agree: the milter accepts an MX host exactly when the
        # socketmap's match list allows it under RFC 8461 §4.1, and Postfix allows at least that.
        for host in hosts:
            one = decider_for(OneDomainDiscovery(result, dns.MxSet((host,), 300))).decide("<u@policy.example>")
            assert one.reason in ("mx-match", "mx-mismatch")
            assert (one.reason == "mx-match") == rfc_allows(names, host), (names, host)
            assert postfix_allows(names, host) or one.reason == "mx-mismatch"
        checked[sts.mode] += 1

    check()
    # Every example Hypothesis counted went through the checks above (assume() drops the
    # texts the parser refuses), and each mode had its share.
    print(f"checked policies by mode: {dict(checked)}")
    assert sum(checked.values()) >= BOUNDED.max_examples
    assert min(checked[mode] for mode in policy.MODES) >= BOUNDED.max_examples // 10


def test_trailing_dot_policy_enforced_alike_by_socketmap_and_milter():
    """RFC 8461 §4.1: "mx1.example.com." names the same host as "mx1.example.com"; the
    socketmap used to answer "TEMP internal error" for it while the milter accepted."""
    sts = policy.parse_policy("version: STSv1\nmode: enforce\nmax_age: 86400\nmx: MX1.Example.com.\nmx: *.Example.NET.\n")
    assert sts.mx == ("mx1.example.com", "*.example.net")
    result = Result("example.com", "valid", source="fetched", policy_id="id1", policy=sts)
    assert tlspolicy.answer(result, make_settings()) == b"OK secure match=mx1.example.com:.example.net servername=hostname"
    for host, reason in (("mx1.example.com", "mx-match"), ("a.example.net", "mx-match"), ("mx2.example.com", "mx-mismatch")):
        assert decider_for(OneDomainDiscovery(result, dns.MxSet((host,), 300))).decide("u@example.com").reason == reason


# --- socketmap keys: any bytes, through the real server


def test_every_key_gets_one_well_formed_reply():
    discovery = SocketmapDiscovery()
    enforce = Policy("STSv1", "enforce", 86400, ("mx.example.com",))
    for domain in ("example.com", "xn--bcher-kva.example"):
        discovery.cached[domain] = Result(domain, "valid", source="cache", policy_id="1", policy=enforce)
    discovery.fetched["slow.example"] = Result("slow.example", "valid", policy_id="1", policy=enforce)
    server = socketmap_server.SocketmapServer(discovery, make_settings(lookup_timeout=2))
    server.start()
    connection = {}

    def ask(payload):
        sock = connection.get("sock")
        if sock is None:
            sock = connection["sock"] = socket.create_connection(server.address, timeout=5)
        sock.sendall(payload)
        reply = read_replies(sock, 1)[0]
        if reply.startswith(b"PERM"):
            sock.close()
            connection.clear()
        return reply

    keys = st.one_of(
        st.binary(max_size=300),
        st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.sampled_from(["example.com", "EXAMPLE.com.", "bücher.example", "BÜCHER.example.", "slow.example",
                         "[192.0.2.1]", ".example.com", "bücher.example..", "\u2603.example"]).map(str.encode),
        st.tuples(st.sampled_from([b"example.com", "bücher.example".encode()]), st.binary(max_size=3)).map(
            lambda t: t[0] + t[1]),
    )

    @BOUNDED
    @given(key=keys, name=st.sampled_from([b"postfix", b"sts", b""]))
    def check(key, name):
        reply = ask(request(key, name=name))
        kind = reply.split(b" ", 1)[0]
        domain = tlspolicy.normalize_key(key)
        if len(name) + 1 + len(key) > socketmap.MAX_REQUEST:
            assert reply == b"PERM malformed request"
            return
        assert kind in (b"OK", b"NOTFOUND", b"TEMP"), reply
        assert reply != b"TEMP internal error"
        if kind == b"OK":
            assert domain in ("example.com", "xn--bcher-kva.example", "slow.example")
        # The milter finds the same domain in the recipient u@KEY (pymilter decoding).
        text = key.decode("utf-8", "surrogateescape")
        if not set(text) & set('@<>"') and text.strip() == text:
            try:
                milter_domain = policy.recipient_domain("<u@" + text + ">")
            except ValueError:
                milter_domain = None
            assert milter_domain == domain, (key, milter_domain, domain)

    try:
        check()
    finally:
        if connection.get("sock"):
            connection["sock"].close()
        server.stop()
        discovery.close()


# --- milter recipients and macros: any bytes, through TestCtx and pymilter's decoding


class BytesCtx(testctx.TestCtx):
    """TestCtx as libmilter + pymilter 1.0.5 drive a milter: macro values arrive as
    bytes and getsymval decodes them as strict UTF-8 (Py_BuildValue "s"), recipients go
    through envrcpt_bytes (StsMilter's own, which hands envrcpt() what Milter.Base's
    would: test_envrcpt_gets_the_recipient_as_milter_base_decodes_it)."""

    def getsymval(self, name):
        value = super().getsymval(name)
        return value.decode("utf-8") if isinstance(value, bytes) else value

    def setsymlist(self, stage, macros):
        return super().setsymlist(stage, macros)

    def quarantine(self, reason):
        self.quarantined = reason

    def rcpt_bytes(self, raw):
        self._stage = Milter.M_ENVRCPT
        try:
            return self._priv.envrcpt_bytes(raw)
        finally:
            self._stage = None


class WorldDiscovery:
    """Several domains: an enforce policy with a matching MX, one with a violating MX, a
    testing one; everything else has no policy."""

    ENFORCE = Policy("STSv1", "enforce", 86400, ("mx.good.example", "*.mail.good.example"))

    def lookup(self, domain, timeout=None, force=False):
        if domain in ("good.example", "bad.example", "xn--bcher-kva.example"):
            return Result(domain, "valid", source="fetched" if force else "cache", policy_id="1", policy=self.ENFORCE)
        if domain == "testing.example":
            return Result(domain, "valid", source="cache", policy_id="1",
                          policy=Policy("STSv1", "testing", 86400, ("mx.good.example",)))
        return Result(domain, "none")

    def mx(self, domain, timeout):
        if domain == "good.example":
            return dns.MxSet(("mx.good.example",), 300)
        return dns.MxSet(("mx.evil.example",), 300)


recipient_parts = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"u", b"", b'"a@b"', b'"a\\"@b"', b"\xff", b"\xed\xa0\x80", b"@", b"<", b">", b" "]),
    st.sampled_from(["good.example", "bad.example", "BÜCHER.example.", "testing.example", "[192.0.2.1]",
                     "b\xfccher.example"]).map(lambda d: d.encode("utf-8") if "\xfc" not in d else d.encode("latin-1")),
)
recipients = st.one_of(
    st.binary(max_size=80),
    st.lists(recipient_parts, max_size=6).map(b"".join),
    st.tuples(st.sampled_from([b"", b"<"]), recipient_parts, st.sampled_from([b"@", b""]), recipient_parts,
              st.sampled_from([b"", b">"])).map(b"".join),
)
macro_values = st.one_of(st.none(), st.binary(max_size=12), st.sampled_from([b"smtp", b"local", b"ORIGINATING"]))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))


@pytest.mark.parametrize("on_violation", ["tempfail", "reject", "hold"])
def test_every_recipient_gets_a_reply_that_agrees_with_the_return_code(on_violation, monkeypatch):
    cfg = config.defaults().replace(milter={"on_violation": on_violation}, scope={"daemon_names": ("ORIGINATING",)})
    monkeypatch.setattr(Milter, "factory", milter.make_milter_class(Decider(WorldDiscovery(), cfg.milter, cfg.scope),
                                                                    cfg))
    monkeypatch.setattr(testctx.TestCtx, "default_opts", [Milter.CURR_ACTS, 0x1FFFFF, 0, 0])
    records = _Records()
    stsmilter_log = logging.getLogger("stsmilter")
    stsmilter_log.addHandler(records)
    level = stsmilter_log.level
    stsmilter_log.setLevel(logging.DEBUG)

    @BOUNDED
    @given(raw=recipients, auth=macro_values, mailer=macro_values, daemon=macro_values, queue_id=macro_values,
           ip=st.sampled_from(["127.0.0.1", "198.51.100.7"]))
    def check(raw, auth, mailer, daemon, queue_id, ip):
        ctx = BytesCtx()
        for name, value in (("{auth_authen}", auth), ("{rcpt_mailer}", mailer), ("{daemon_name}", daemon),
                            ("i", queue_id)):
            if value is not None:
                ctx._macros[name] = value
        assert ctx._negotiate() == Milter.CONTINUE
        ctx._stage = Milter.M_CONNECT
        Milter.connect_callback(ctx, "client.example", socket.AF_INET, (ip, 40000))
        ctx._stage = Milter.M_ENVFROM
        ctx._priv.envfrom_bytes(b"<s@here.example>")
        del records.lines[:]
        ctx._reply = None
        rc = ctx.rcpt_bytes(raw)
        assert rc in (Milter.CONTINUE, Milter.TEMPFAIL, Milter.REJECT)
        if rc == Milter.CONTINUE:
            assert ctx._reply is None
        else:
            code, xcode, text = ctx._reply
            assert code[0] == xcode[0] == ("4" if rc == Milter.TEMPFAIL else "5")
            # RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets with its CRLF.
            line = " ".join(ctx._reply).encode("ascii")
            assert len(line) + 2 <= 512 and b"\r" not in line and b"\n" not in line
        ctx._stage = Milter.M_EOM
        ctx._body = None
        assert ctx._priv.eom() in (Milter.CONTINUE, Milter.TEMPFAIL)
        for line in records.lines:
            line.encode("utf-8")  # what SysLogHandler does: surrogates would raise here
            assert "\n" not in line and "\r" not in line
        Milter.close_callback(ctx)

    try:
        check()
    finally:
        stsmilter_log.removeHandler(records)
        stsmilter_log.setLevel(level)


class _RecordingMilter(milter.StsMilter):
    def envrcpt(self, to, *params):
        self.seen = (to, params)
        return Milter.CONTINUE


@BOUNDED
@given(raw=recipients, params=st.lists(st.binary(max_size=12), max_size=3))
def test_envrcpt_gets_the_recipient_as_milter_base_decodes_it(raw, params):
    """StsMilter.envrcpt_bytes skips Milter.Base's per-call decoding-strategy lookup; the
    recipient string it passes on must be exactly Milter.Base's (the ESMTP parameters
    are not read, so they are not decoded)."""
    ours, base = _RecordingMilter(), _RecordingMilter()
    assert ours.envrcpt_bytes(raw, *params) == Milter.Base.envrcpt_bytes(base, raw, *params) == Milter.CONTINUE
    assert type(ours.seen[0]) is type(base.seen[0]) is str
    assert ours.seen[0] == base.seen[0]
    assert ours.seen[0].encode("utf-8", "surrogateescape") == raw


# --- the milter's own handling of what pymilter cannot decode


def open_session(monkeypatch, macros, ip="198.51.100.7", connect=True, **scope):
    cfg = config.defaults().replace(scope=scope)
    monkeypatch.setattr(Milter, "factory", milter.make_milter_class(Decider(WorldDiscovery(), cfg.milter, cfg.scope),
                                                                    cfg))
    monkeypatch.setattr(testctx.TestCtx, "default_opts", [Milter.CURR_ACTS, 0x1FFFFF, 0, 0])
    ctx = BytesCtx()
    ctx._macros.update(macros)
    assert ctx._negotiate() == Milter.CONTINUE
    if connect:
        ctx._stage = Milter.M_CONNECT
        Milter.connect_callback(ctx, "client.example", socket.AF_INET, (ip, 40000))
    ctx._stage = Milter.M_ENVFROM
    ctx._priv.envfrom_bytes(b"<s@here.example>")
    return ctx


@pytest.mark.parametrize(
    "macros, scope, expected",
    [
        # A SASL login that is not UTF-8 is still a login: the sender is in scope.
        ({"{auth_authen}": b"\xffalice"}, {}, Milter.TEMPFAIL),
        ({"{auth_authen}": b""}, {}, Milter.CONTINUE),
        # A daemon name that is not UTF-8 is none of the configured ones.
        ({"{daemon_name}": b"ORIGINATING\xff"}, {"daemon_names": ("ORIGINATING",)}, Milter.CONTINUE),
        ({"{daemon_name}": b"ORIGINATING"}, {"daemon_names": ("ORIGINATING",)}, Milter.TEMPFAIL),
    ],
)
def test_scope_macros_that_are_not_utf8(monkeypatch, macros, scope, expected):
    ctx = open_session(monkeypatch, macros, **scope)
    assert ctx.rcpt_bytes(b"<u@bad.example>") == expected


def test_a_mailer_name_that_is_not_utf8_is_not_skipped(monkeypatch):
    ctx = open_session(monkeypatch, {"{rcpt_mailer}": b"lo\xffcal", "i": b"\xff"}, ip="127.0.0.1",
                       skip_mailers=("local",))
    assert ctx.rcpt_bytes(b"<u@bad.example>") == Milter.TEMPFAIL
    ctx._macros["{rcpt_mailer}"] = b"local"
    assert ctx.rcpt_bytes(b"<u@bad.example>") == Milter.CONTINUE


def test_a_connection_whose_connect_pymilter_could_not_decode_is_checked(monkeypatch):
    # pymilter decodes the host name in C: a non-UTF-8 name never reaches connect().
    ctx = open_session(monkeypatch, {}, connect=False)
    assert ctx.rcpt_bytes(b"<u@bad.example>") == Milter.TEMPFAIL


def test_untrapped_decode_errors_are_one_line_a_minute(monkeypatch, caplog):
    clock = [1000.0]
    monkeypatch.setattr(milter.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(milter, "_untrapped", {"next_log": 0.0, "count": 0})
    error = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    with caplog.at_level(logging.INFO, logger="stsmilter"):
        for _ in range(3):
            milter.log_untrapped_exception(UnicodeDecodeError, error, None)
        clock[0] += milter.UNTRAPPED_LOG_INTERVAL
        milter.log_untrapped_exception(UnicodeDecodeError, error, None)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all(r.levelno == logging.WARNING for r in caplog.records)
    assert messages[0].startswith("milter: 1 MTA packet(s) with text that is not UTF-8")
    assert messages[1].startswith("milter: 3 MTA packet(s)")  # the two held back, and this one
    assert not any(r.exc_info for r in caplog.records)


def test_other_untrapped_exceptions_are_logged_with_their_traceback(caplog):
    try:
        raise RuntimeError("bug")
    except RuntimeError as e:
        exc_info = (type(e), e, e.__traceback__)
    with caplog.at_level(logging.ERROR, logger="stsmilter"):
        milter.log_untrapped_exception(*exc_info)
    assert caplog.records[-1].exc_info == exc_info


# --- the MX TLS check: what an MX host sends -------------------------------------------


smtp_streams = st.one_of(
    st.binary(max_size=3000),  # anything at all
    st.lists(st.one_of(  # lines that look like SMTP, or nearly
        st.builds(lambda code, sep, text: code + sep + text + b"\r\n",
                  st.sampled_from([b"220", b"250", b"421", b"554", b"199", b"600", b"2x0", b"25"]),
                  st.sampled_from([b" ", b"-", b"", b"x"]),
                  st.binary(max_size=40)),
        st.binary(max_size=1200),
    ), max_size=120).map(b"".join),
)


@BOUNDED
@given(stream=smtp_streams)
def test_every_byte_stream_from_an_mx_host_is_a_reply_or_a_protocol_error(stream):
    """The reply reader of the MX TLS check (engine/mxtls.py) on any bytes a peer sends,
    then EOF: one Reply within the bounds, or ProtocolError; nothing else, no hang."""
    import asyncio

    from stsmilter.engine import mxtls, mxtls_probe

    async def read():
        reader = asyncio.StreamReader()
        reader.feed_data(stream)
        reader.feed_eof()
        return await mxtls_probe._Session(reader, None).reply()

    try:
        reply = asyncio.run(read())
    except mxtls.ProtocolError as e:
        assert str(e).isprintable()
        return
    assert 200 <= reply.code <= 599 and 1 <= len(reply.lines) <= mxtls.MAX_LINES
    assert sum(len(line) for line in reply.lines) <= mxtls.MAX_REPLY
    assert mxtls.offers_starttls(reply) in (True, False)
