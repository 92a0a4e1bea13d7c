"""mxtls.py without a network: the pure part (reply lines, STARTTLS in an EHLO reply,
OpenSSL errors as RFC 8460 results, the all-hosts-fail rule, result lifetimes) and the
checker's cache, single flight, bounds and gauge with a scripted probe. The same checks
against real SMTP servers: test_mxtls_servers.py."""

import asyncio
import logging
import ssl
import threading
import time

import pytest
from prometheus_client import REGISTRY

from stsmilter.engine import mxtls, mxtls_checker
from stsmilter.engine.limits import PriorityLimiter
from stsmilter.engine.mxtls_checker import MxTlsChecker
from stsmilter.engine.mxtls import (
    CERTIFICATE_EXPIRED, CERTIFICATE_HOST_MISMATCH, CERTIFICATE_NOT_TRUSTED, OK, STARTTLS_NOT_SUPPORTED, UNREACHABLE,
    VALIDATION_FAILURE, HostResult, ProtocolError, Reply, ReplyReader,
)

# --- parse_line: RFC 5321 §4.2 reply lines ---------------------------------------------------


@pytest.mark.parametrize("line, parsed", [
    (b"220 mx.example.com ESMTP\r\n", (220, True, "mx.example.com ESMTP")),
    (b"250-STARTTLS\r\n", (250, False, "STARTTLS")),
    (b"250\r\n", (250, True, "")),  # code alone (Reply-code CRLF)
    (b"250 \r\n", (250, True, "")),
    (b"250-\r\n", (250, False, "")),
    (b"421 busy\n", (421, True, "busy")),  # a bare LF, as Postfix's client accepts it
    (b"200 lowest\r\n", (200, True, "lowest")),
    (b"599 highest\r\n", (599, True, "highest")),
    (b"554 5.7.1 no\xffway\r\n", (554, True, "5.7.1 no\ufffdway")),  # never an exception for a byte
    (b"250 two  spaces \r\n", (250, True, "two  spaces ")),
    (b"250 a\rb\r\n", (250, True, "a\rb")),  # CR inside the text stays text
])
def test_parse_line(line, parsed):
    assert mxtls.parse_line(line) == parsed


@pytest.mark.parametrize("line", [
    b"220 no end of line",
    b"220 a bare CR\r",
    b"\r\n",
    b"\n",
    b"22\r\n",
    b"22 x\r\n",
    b"2200 x\r\n",  # a fourth digit is no separator
    b"220x\r\n",
    b"2a0 x\r\n",
    b"abc x\r\n",
    b" 220 x\r\n",
    b"-220 x\r\n",
    b"199 x\r\n",
    b"600 x\r\n",
    b"099 x\r\n",
    b"\xb2\xb2\xb0 x\r\n",
    b"\xef\xbc\x92\xef\xbc\x95\xef\xbc\x90 x\r\n",  # fullwidth digits: not ASCII digits
])
def test_parse_line_refuses_what_is_no_reply(line):
    with pytest.raises(ProtocolError):
        mxtls.parse_line(line)


def test_a_line_must_end():
    with pytest.raises(ProtocolError) as raised:
        mxtls.parse_line(b"220 cut short")
    assert str(raised.value) == "reply line without end of line"


def test_a_line_that_is_no_reply_is_quoted_short_in_the_error():
    with pytest.raises(ProtocolError) as raised:
        mxtls.parse_line(b"HTTP/1.1 400 \x1b[31m" + b"x" * 500 + b"\r\n")
    text = str(raised.value)
    assert text.startswith("not an SMTP reply: 'HTTP/1.1 400 \\x1b[31m")
    assert len(text) < 80 and text.endswith("...")


# --- ReplyReader: one reply from its lines, bounded ----------------------------------------------


def read(*lines):
    reader = ReplyReader()
    replies = [reader.feed(line) for line in lines]
    assert all(r is None for r in replies[:-1])
    return replies[-1]


def test_a_multi_line_reply():
    assert read(b"250-mx.example.com\r\n", b"250-PIPELINING\r\n", b"250 STARTTLS\r\n") == Reply(
        250, ("mx.example.com", "PIPELINING", "STARTTLS"))
    assert read(b"220 ready\r\n") == Reply(220, ("ready",))


def test_a_reply_is_not_done_before_its_last_line():
    reader = ReplyReader()
    assert reader.feed(b"250-a\r\n") is None
    assert reader.feed(b"250-b\r\n") is None
    assert reader.feed(b"250 c\r\n") == Reply(250, ("a", "b", "c"))


def test_the_lines_of_one_reply_share_their_code():
    reader = ReplyReader()
    reader.feed(b"250-a\r\n")
    with pytest.raises(ProtocolError, match="codes 250 and 251"):
        reader.feed(b"251 b\r\n")


def test_a_reply_has_at_most_max_lines_lines():
    lines = [b"250-x\r\n"] * (mxtls.MAX_LINES - 1)
    assert read(*lines, b"250 y\r\n").lines[-1] == "y"  # exactly MAX_LINES: fine
    reader = ReplyReader()
    for line in [b"250-x\r\n"] * mxtls.MAX_LINES:
        reader.feed(line)
    with pytest.raises(ProtocolError, match="longer than"):
        reader.feed(b"250 y\r\n")


def test_a_reply_has_at_most_max_reply_bytes():
    line = b"250-" + b"x" * 996 + b"\r\n"  # 1002 bytes
    count = mxtls.MAX_REPLY // len(line)
    reader = ReplyReader()
    for _ in range(count):
        assert reader.feed(line) is None
    last = b"250 " + b"y" * (mxtls.MAX_REPLY - count * len(line) - 6) + b"\r\n"
    assert reader.feed(last).code == 250  # exactly MAX_REPLY bytes: fine
    reader = ReplyReader()
    for _ in range(count):
        reader.feed(line)
    with pytest.raises(ProtocolError):
        reader.feed(last[:-2] + b"y\r\n")  # one byte more


# --- offers_starttls: RFC 3207 §4 -----------------------------------------------------------------


@pytest.mark.parametrize("lines, offered", [
    (("mx.example.com", "PIPELINING", "STARTTLS"), True),
    (("mx.example.com", "starttls"), True),  # keywords are case-insensitive (RFC 5321 §2.4)
    (("mx.example.com", "StartTLS "), True),
    (("mx.example.com", "STARTTLS extra"), True),
    (("mx.example.com", "PIPELINING"), False),
    (("mx.example.com",), False),
    (("STARTTLS",), False),  # the first line names the server
    (("STARTTLS", "8BITMIME"), False),
    (("mx.example.com", "STARTTLSX"), False),
    (("mx.example.com", "X-STARTTLS"), False),
    (("mx.example.com", ""), False),
    (("mx.example.com", "", "STARTTLS"), True),
])
def test_offers_starttls(lines, offered):
    assert mxtls.offers_starttls(Reply(250, lines)) is offered


# --- OpenSSL errors as RFC 8460 results ---------------------------------------------------------


@pytest.mark.parametrize("code, kind", [
    (10, CERTIFICATE_EXPIRED),  # X509_V_ERR_CERT_HAS_EXPIRED
    (62, CERTIFICATE_HOST_MISMATCH),  # X509_V_ERR_HOSTNAME_MISMATCH
    (2, CERTIFICATE_NOT_TRUSTED),
    (18, CERTIFICATE_NOT_TRUSTED),  # self-signed leaf
    (19, CERTIFICATE_NOT_TRUSTED),  # self-signed root in the chain
    (20, CERTIFICATE_NOT_TRUSTED),  # unknown issuer (trustme's second CA)
    (21, CERTIFICATE_NOT_TRUSTED),
    (27, CERTIFICATE_NOT_TRUSTED),
    (28, CERTIFICATE_NOT_TRUSTED),
    (9, VALIDATION_FAILURE),  # not yet valid: not an RFC 8460 name of its own
    (23, VALIDATION_FAILURE),  # revoked
    (7, VALIDATION_FAILURE),  # bad signature
    (0, VALIDATION_FAILURE),
    (11, VALIDATION_FAILURE),
    (61, VALIDATION_FAILURE),
    (63, VALIDATION_FAILURE),
])
def test_classify_verify(code, kind):
    assert mxtls.classify_verify(code) == kind


def verify_error(code):
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_code = code
    return error


@pytest.mark.parametrize("error, kind", [
    (verify_error(10), CERTIFICATE_EXPIRED),
    (verify_error(62), CERTIFICATE_HOST_MISMATCH),
    (verify_error(20), CERTIFICATE_NOT_TRUSTED),
    (verify_error(9), VALIDATION_FAILURE),
    (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), VALIDATION_FAILURE),
    (ssl.SSLError(1, "[SSL: TLSV1_ALERT_PROTOCOL_VERSION]"), VALIDATION_FAILURE),
    (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), UNREACHABLE),  # the peer hung up
    (ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed"), UNREACHABLE),
    (ssl.SSLSyscallError(5, "Some I/O error occurred"), UNREACHABLE),
    (ConnectionResetError(104, "Connection reset by peer"), UNREACHABLE),
    (EOFError(), UNREACHABLE),
])
def test_classify_error(error, kind):
    assert mxtls.classify_error(error) == kind


def test_every_failure_has_fixed_words_for_the_reply():
    assert set(mxtls.DESCRIPTIONS) == mxtls.FAILURES
    assert set(mxtls.RESULTS) == mxtls.FAILURES | {OK, UNREACHABLE}
    assert mxtls.DESCRIPTIONS[CERTIFICATE_EXPIRED] == "certificate has expired"


# --- lifetime and the all-hosts-fail rule --------------------------------------------------------


def test_lifetime():
    settings = mxtls.Settings(ttl=3600.0, failure_ttl=300.0)
    assert mxtls.lifetime(OK, settings) == 3600.0
    for kind in mxtls.FAILURES | {UNREACHABLE}:
        assert mxtls.lifetime(kind, settings) == 300.0


def result(kind):
    return HostResult(kind, f"{kind} detail", 1000.0, 1300.0)


EXPIRED, MISNAMED, OK_RESULT, GONE = (result(k) for k in (CERTIFICATE_EXPIRED, CERTIFICATE_HOST_MISMATCH, OK,
                                                             UNREACHABLE))


@pytest.mark.parametrize("results, named", [
    ([EXPIRED], 0),
    ([EXPIRED, MISNAMED], 0),  # the first host is named: the MTA tries it first
    ([MISNAMED, EXPIRED], 0),
    ([result(STARTTLS_NOT_SUPPORTED)], 0),
    ([result(CERTIFICATE_NOT_TRUSTED), result(VALIDATION_FAILURE)], 0),
    ([EXPIRED, OK_RESULT], None),  # one good host: the MTA delivers there
    ([OK_RESULT, EXPIRED], None),
    ([EXPIRED, None], None),  # unknown: the verdict without the check
    ([None, EXPIRED], None),
    ([EXPIRED, GONE], None),  # unreachable never decides
    ([GONE, EXPIRED], None),
    ([GONE], None),
    ([None], None),
    ([], None),
])
def test_failing_host(results, named):
    hosts = [f"mx{n}.example" for n in range(len(results))]
    assert mxtls.failing_host(hosts, results) == (None if named is None else (hosts[named], results[named]))


def test_quote_and_detail_stay_one_short_line():
    assert mxtls.quote(b"\x00ab\n") == "'\\x00ab\\n'"
    assert mxtls.quote("x" * 100) == "'" + "x" * 36 + "..."
    assert mxtls.quote("x" * 38) == "'" + "x" * 38 + "'"  # 40 characters: kept
    assert mxtls.one_line_detail("a\n b\t c") == "a b c"
    assert mxtls.one_line_detail("y" * 300) == "y" * 197 + "..."
    assert mxtls.one_line_detail("y" * 200) == "y" * 200


def test_the_check_context_verifies_chain_and_name():
    context = mxtls.make_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    with pytest.raises(OSError):
        mxtls.make_context("/nonexistent/ca.pem")


def test_the_default_helo_name_is_a_name_an_mta_may_send():
    from stsmilter.config.schema import is_helo_name

    name = mxtls.default_helo_name()
    assert is_helo_name(name) and ("." in name or name == "localhost")


# --- MxTlsChecker with a scripted probe --------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class ScriptedProbe:
    """probe() from a dict host -> (kind, detail); records calls; optional gates per host
    (an Event the probe waits for) and the most probes seen running at once."""

    def __init__(self, answers=None):
        self.answers = dict(answers or {})
        self.calls = []
        self.gates = {}
        self.running = 0
        self.most = 0

    async def __call__(self, resolver, host, settings, context):
        self.calls.append(host)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            gate = self.gates.get(host)
            if gate is not None:
                await asyncio.to_thread(gate.wait, 10)
            answer = self.answers.get(host, (OK, "fine"))
            if isinstance(answer, Exception):
                raise answer
            return answer
        finally:
            self.running -= 1


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def make_checker(clock, engine):
    checkers = []

    def make(prober, limit=64, **settings):
        checker = MxTlsChecker(None, mxtls.Settings(**settings), None, clock=clock, engine=engine,
                           limiter=PriorityLimiter(limit), prober=prober)
        checkers.append(checker)
        return checker

    yield make
    for checker in checkers:
        checker.close()


def wait_until(predicate, what, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.002)


def counted(kind):
    return REGISTRY.get_sample_value("stsmilter_mx_checks_total", {"result": kind}) or 0.0


def failing_gauge():
    return REGISTRY.get_sample_value("stsmilter_mx_tls_failing_hosts")


def test_an_ok_is_remembered_for_ttl_a_failure_for_failure_ttl(make_checker, clock):
    prober = ScriptedProbe({"bad.example": (CERTIFICATE_EXPIRED, "expired")})
    checker = make_checker(prober, ttl=3600.0, failure_ttl=300.0)
    before = counted(OK), counted(CERTIFICATE_EXPIRED)
    (bad,) = checker.check(["bad.example"], timeout=5)
    (good,) = checker.check(["good.example"], timeout=5)
    assert good == HostResult(OK, "fine", 1000.0, 4600.0)
    assert bad == HostResult(CERTIFICATE_EXPIRED, "expired", 1000.0, 1300.0)
    assert (counted(OK), counted(CERTIFICATE_EXPIRED)) == (before[0] + 1, before[1] + 1)
    clock.now = 1299.9
    assert checker.check(["good.example", "bad.example"], timeout=5) == (good, bad)
    assert checker.peek("bad.example") is bad
    assert sorted(prober.calls) == ["bad.example", "good.example"]
    clock.now = 1300.0
    assert checker.peek("bad.example") is None and checker.peek("good.example") is good
    assert checker.check(["bad.example"], timeout=5)[0].checked_at == 1300.0
    assert prober.calls.count("bad.example") == 2
    clock.now = 4600.0
    assert checker.peek("good.example") is None
    checker.check(["good.example"], timeout=5)
    assert prober.calls.count("good.example") == 2


def test_each_host_is_checked_once_per_ttl_however_many_ask(make_checker, clock):
    """Issue 21: "A host is never checked more often than its ttl allows, however much
    mail goes to it" (and one check in flight per host)."""
    prober = ScriptedProbe({"mx2.example": (CERTIFICATE_NOT_TRUSTED, "untrusted")})
    for host in ("mx1.example", "mx2.example"):
        prober.gates[host] = threading.Event()
    checker = make_checker(prober, ttl=600.0, failure_ttl=60.0)
    answers = []

    def ask():
        for _ in range(50):
            answers.append(checker.check(["mx1.example", "mx2.example"], timeout=0.001))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert answers and all(a == (None, None) for a in answers)  # unknown while the checks run
    for gate in prober.gates.values():
        gate.set()
    wait_until(lambda: checker.peek("mx1.example") and checker.peek("mx2.example"), "both results")
    for second in range(0, 1200, 10):  # twenty minutes of steady mail, every ten seconds
        clock.now = 1000.0 + second
        for _ in range(20):
            checker.check(["mx1.example", "mx2.example"], timeout=5)
        # A re-check of mx2 that mx1's "ok" did not wait for ends before the clock moves on.
        wait_until(lambda: not checker._jobs, "the checks under way")
    # mx1 (ok): at 1000 and again at its expiry 1600; mx2 (failing): every 60 s of 1200
    assert prober.calls.count("mx1.example") == 2
    assert prober.calls.count("mx2.example") == 20


def test_waiting_ends_at_the_first_good_host_and_the_others_finish_later(make_checker):
    prober = ScriptedProbe({"slow.example": (CERTIFICATE_EXPIRED, "expired")})
    prober.gates["slow.example"] = threading.Event()
    checker = make_checker(prober)
    started = time.monotonic()
    slow, fast = checker.check(["slow.example", "fast.example"], timeout=5)
    assert time.monotonic() - started < 2
    assert slow is None and fast.kind == OK
    prober.gates["slow.example"].set()
    checker.submit("slow.example").result(5)
    assert checker.peek("slow.example").kind == CERTIFICATE_EXPIRED


def test_a_known_good_host_means_no_wait_for_the_others(make_checker):
    prober = ScriptedProbe()
    checker = make_checker(prober)
    checker.check(["good.example"], timeout=5)
    prober.gates["new.example"] = threading.Event()
    started = time.monotonic()
    good, new = checker.check(["good.example", "new.example"], timeout=5)
    assert time.monotonic() - started < 2 and good.kind == OK and new is None
    wait_until(lambda: "new.example" in prober.calls, "the new host's check")  # checked all the same
    prober.gates["new.example"].set()
    wait_until(lambda: checker.peek("new.example"), "the new host's result")
    assert prober.calls == ["good.example", "new.example"]


def test_check_gives_up_at_its_timeout_and_the_result_fills_the_cache(make_checker):
    prober = ScriptedProbe({"mx.example": (STARTTLS_NOT_SUPPORTED, "no STARTTLS")})
    prober.gates["mx.example"] = threading.Event()
    checker = make_checker(prober)
    started = time.monotonic()
    assert checker.check(["mx.example"], timeout=0.05) == (None,)
    assert 0.05 <= time.monotonic() - started < 2
    prober.gates["mx.example"].set()
    checker.submit("mx.example").result(5)
    assert checker.check(["mx.example"], timeout=0)[0].kind == STARTTLS_NOT_SUPPORTED
    assert prober.calls == ["mx.example"]


def test_a_check_that_ends_between_look_and_submit_is_not_run_again(make_checker):
    prober = ScriptedProbe({"mx.example": (CERTIFICATE_EXPIRED, "expired")})
    checker = make_checker(prober)
    first = checker.submit("mx.example", enforce=True).result(5)
    wait_until(lambda: not checker._jobs, "the job to go")
    again = checker.submit("mx.example", enforce=True)  # as check() does when its look came first
    assert again.done() and again.result() is first and prober.calls == ["mx.example"]
    assert failing_gauge() == 1


def test_concurrent_submits_share_one_check(make_checker):
    prober = ScriptedProbe()
    prober.gates["mx.example"] = threading.Event()
    checker = make_checker(prober)
    futures = [checker.submit("mx.example") for _ in range(20)]
    assert len({id(f) for f in futures}) == 1
    prober.gates["mx.example"].set()
    assert {f.result(5).kind for f in futures} == {OK}
    assert prober.calls == ["mx.example"]


def test_concurrency_is_bounded(make_checker):
    prober = ScriptedProbe()
    hosts = [f"mx{n}.example" for n in range(6)]
    release = threading.Event()
    for host in hosts:
        prober.gates[host] = release
    checker = make_checker(prober, limit=2)
    futures = [checker.submit(host) for host in hosts]
    wait_until(lambda: len(prober.calls) == 2 and checker.limiter.waiting == 4, "two checks, four waiting")
    assert not any(f.done() for f in futures) and prober.running == 2
    release.set()
    assert [f.result(5).kind for f in futures] == [OK] * 6
    assert prober.most == 2


def test_the_results_are_bounded(make_checker):
    checker = make_checker(ScriptedProbe(), max_entries=3)
    for n in range(5):
        checker.check([f"mx{n}.example"], timeout=5)
    assert [n for n in range(5) if checker.peek(f"mx{n}.example")] == [2, 3, 4]


def test_an_unexpected_exception_is_unreachable_and_remembered(make_checker, caplog):
    prober = ScriptedProbe({"mx.example": RuntimeError("boom")})
    checker = make_checker(prober)
    (found,) = checker.check(["mx.example"], timeout=5)
    assert (found.kind, found.detail) == (UNREACHABLE, "internal error")
    assert "MX TLS check of mx.example failed unexpectedly" in caplog.text
    assert checker.check(["mx.example"], timeout=5) == (found,) and prober.calls == ["mx.example"]


def test_a_closed_checker_answers_unknown(make_checker):
    prober = ScriptedProbe()
    prober.gates["running.example"] = threading.Event()
    checker = make_checker(prober)
    running = checker.submit("running.example")
    wait_until(lambda: prober.calls, "the check to start")
    checker.close()
    prober.gates["running.example"].set()
    assert running.result(5).kind == OK  # a check under way ends as it would
    assert checker.check(["later.example"], timeout=5) == (None,)
    assert checker.submit("later.example").result(5) is None
    assert "later.example" not in prober.calls


def test_too_many_queued_checks_are_refused(make_checker, monkeypatch):
    monkeypatch.setattr(mxtls_checker, "MAX_QUEUED_CHECKS", 2)
    prober = ScriptedProbe()
    release = threading.Event()
    checker = make_checker(prober)
    for host in ("a.example", "b.example", "c.example"):
        prober.gates[host] = release
    first = [checker.submit("a.example"), checker.submit("b.example")]
    assert checker.submit("c.example").result(1) is None
    assert checker.submit("a.example") is first[0]  # joining a check is not queueing one
    release.set()
    assert [f.result(5).kind for f in first] == [OK, OK]


def test_the_gauge_counts_failing_mx_hosts_of_enforce_domains(make_checker, clock):
    prober = ScriptedProbe({"bad1.example": (CERTIFICATE_EXPIRED, "x"), "bad2.example": (VALIDATION_FAILURE, "x"),
                            "gone.example": (UNREACHABLE, "x"), "testing.example": (CERTIFICATE_EXPIRED, "x")})
    checker = make_checker(prober, failure_ttl=300.0)
    checker.check(["bad1.example", "good.example", "gone.example"], timeout=5, enforce=True)
    wait_until(lambda: not checker._jobs, "the checks the good host's result did not wait for")
    checker.check(["testing.example"], timeout=5, enforce=False)
    assert failing_gauge() == 1
    checker.check(["bad2.example"], timeout=5, enforce=True)
    assert failing_gauge() == 2
    checker.check(["testing.example"], timeout=5, enforce=True)  # now asked for an enforce domain too
    assert failing_gauge() == 3
    clock.now += 300.0  # expired: no longer known to fail
    assert failing_gauge() == 0
    prober.answers["bad1.example"] = (OK, "renewed")
    checker.check(["bad1.example", "bad2.example"], timeout=5, enforce=True)
    wait_until(lambda: not checker._jobs, "the checks the good host's result did not wait for")
    assert failing_gauge() == 1
    checker.close()
    assert failing_gauge() == 0


def test_failures_are_logged_at_most_once_a_second(make_checker, clock, caplog):
    caplog.set_level(logging.INFO, logger="stsmilter.mxtls")
    prober = ScriptedProbe({f"bad{n}.example": (CERTIFICATE_EXPIRED, f"detail {n}") for n in range(4)})
    prober.answers["gone.example"] = (UNREACHABLE, "refused")
    checker = make_checker(prober)
    for n in range(3):
        checker.check([f"bad{n}.example"], timeout=5)
    checker.check(["gone.example"], timeout=5)
    clock.now += mxtls.WARNING_INTERVAL
    checker.check(["bad3.example"], timeout=5)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "MX TLS check of bad0.example: certificate-expired: detail 0"),
        ("INFO", "MX TLS check of gone.example: unreachable: refused"),
        ("WARNING", "MX TLS check of bad3.example: certificate-expired: detail 3 (2 more MX TLS check lines not logged)"),
    ]


def test_reconfigure_applies_to_checks_started_later(make_checker, clock):
    prober = ScriptedProbe()
    checker = make_checker(prober, ttl=3600.0)
    seen = []

    async def other(resolver, host, settings, context):
        seen.append((resolver, settings.port, context))
        return OK, "other"

    checker.prober = other
    checker.reconfigure("resolver", mxtls.Settings(port=2525, ttl=60.0), "context")
    assert checker.check(["mx.example"], timeout=5)[0].expires == clock.now + 60.0
    assert seen == [("resolver", 2525, "context")]


def test_os_errors_read_as_the_system_says_them():
    assert mxtls._os_error(ConnectionRefusedError(111, "Connect call failed ('192.0.2.1', 25)")) == \
        "Connection refused"
    assert mxtls._os_error(OSError("no errno")) == "OSError"
    assert mxtls._os_error(OSError(0, "zero")) == "zero"
    assert mxtls._os_error(EOFError()) == "EOFError"


# --- built from the Config, switched by a reload ------------------------------------------------


def test_the_engine_builds_the_checker_from_the_config_and_a_reload_switches_it():
    from stsmilter import config, engine

    cfg = config.defaults().replace(cache={"path": ""}, dns={"nameservers": ("127.0.0.1",)},
                                    probe={"enabled": True, "helo_name": "mta.example.net", "port": 2525, "ttl": 600.0})
    plain = engine.open_engine(cfg.replace(probe={"enabled": False}), one_shot=True)
    plain.close()
    assert plain.mxtls is None
    disc = engine.open_engine(cfg)
    try:
        checker = disc.mxtls
        assert checker.settings == mxtls.Settings(port=2525, helo_name="mta.example.net", timeout=10.0, ttl=600.0,
                                                  failure_ttl=300.0, max_entries=200000, allow_private=False)
        assert (checker.limiter.limit, checker.limiter.stage) == (64, "probe")
        assert checker.engine is disc.engine and checker.resolver is disc.resolver
        engine.reconfigure(disc, cfg.replace(probe={"timeout": 3.0}, fetch={"allow_private_addresses": True}))
        assert disc.mxtls is checker and checker.resolver is disc.resolver
        assert (checker.settings.timeout, checker.settings.allow_private) == (3.0, True)
        with pytest.raises(config.ConfigError, match=r"\[probe\] ca_file /nonexistent/ca.pem: No such file"):
            engine.reconfigure(disc, cfg.replace(probe={"ca_file": "/nonexistent/ca.pem"}))
        assert checker.settings.timeout == 3.0  # a refused reload changes nothing
        engine.reconfigure(disc, cfg.replace(probe={"enabled": False}))
        assert disc.mxtls is None and checker.check(["mx.example"], timeout=1) == (None,)  # closed
        engine.reconfigure(disc, cfg)
        assert disc.mxtls is not None and disc.mxtls is not checker
    finally:
        disc.close()
        disc.cache.close()
