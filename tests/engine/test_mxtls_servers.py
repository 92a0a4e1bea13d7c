"""The MX TLS check against real SMTP servers on loopback (world/mx_hosts.py): aiosmtpd
with trustme certificates (good, expired, for another name, from an untrusted CA, a
wildcard), no STARTTLS, a 421 greeting, a greeting that never comes, and scripted
hostile peers. Names resolve through the loopback DNS server."""

import threading
import time

import pytest

from stsmilter.engine import mxtls
from stsmilter.engine.dns import Resolver
from stsmilter.engine.limits import PriorityLimiter
from stsmilter.engine.mxtls_checker import MxTlsChecker
from stsmilter.engine.mxtls import (
    CERTIFICATE_EXPIRED, CERTIFICATE_HOST_MISMATCH, CERTIFICATE_NOT_TRUSTED, OK, STARTTLS_NOT_SUPPORTED, UNREACHABLE,
    VALIDATION_FAILURE,
)
from world.mx_hosts import converse, converse_text_instead_of_tls

pytestmark = pytest.mark.integration

HELO = "probe.stsmilter.test"


@pytest.fixture
def make_checker(dns_server, mx_hosts, engine):
    checkers = []

    def make(timeout=3.0, allow_private=True, limit=16):
        resolver = Resolver(nameservers=(dns_server.address,), port=dns_server.port, timeout=1.0)
        settings = mxtls.Settings(port=mx_hosts.port, helo_name=HELO, timeout=timeout, allow_private=allow_private)
        checker = MxTlsChecker(resolver, settings, mxtls.make_context(mx_hosts.ca_file), engine=engine,
                               limiter=PriorityLimiter(limit, "probe"))
        checkers.append(checker)
        return checker

    yield make
    for checker in checkers:
        checker.close()


def check(checker, host, timeout=10.0):
    (result,) = checker.check([host], timeout=timeout)
    assert result is not None, f"no result for {host} in {timeout} s"
    return result


def wait_for(predicate, what, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.01)


# --- one server per kind ------------------------------------------------------------------------

KIND_RESULTS = [
    # (kind, result, a piece of the detail)
    ("good", OK, "certificate valid for"),
    ("wildcard", OK, "certificate valid for"),  # *.kind.example covers mx.kind.example
    ("expired", CERTIFICATE_EXPIRED, "certificate has expired"),
    ("wrong_name", CERTIFICATE_HOST_MISMATCH, "Hostname mismatch"),
    ("deep_wildcard", CERTIFICATE_HOST_MISMATCH, "Hostname mismatch"),  # *.example covers one label only
    ("untrusted", CERTIFICATE_NOT_TRUSTED, "unable to get local issuer certificate"),
    ("no_starttls", STARTTLS_NOT_SUPPORTED, "does not offer STARTTLS"),
    ("greeting_421", UNREACHABLE, "greeting 421 '4.3.2 mx busy"),
    ("silent", UNREACHABLE, "no answer within [probe] timeout (greeting)"),
    ("refused", UNREACHABLE, "connect: Connection refused"),
]


@pytest.mark.parametrize("kind, expected, detail", KIND_RESULTS, ids=[k[0] for k in KIND_RESULTS])
def test_each_kind_of_mx_host(mx_hosts, make_checker, kind, expected, detail):
    name = f"mx.{kind.replace('_', '-')}.example"
    (mx,) = mx_hosts.add(name, kind)
    mx_hosts.start()
    checker = make_checker(timeout=1.5)
    started = time.monotonic()
    result = check(checker, name)
    assert time.monotonic() - started < 2.5  # within [probe] timeout, plus the scheduling
    assert result.kind == expected and detail in result.detail, result
    assert result.detail.startswith(mx.address + ": ")
    if kind in ("refused", "greeting_421", "silent"):
        return
    # aiosmtpd: EHLO with [probe] helo_name, never MAIL/RCPT/DATA, and QUIT (over TLS
    # once the handshake worked; in plaintext without STARTTLS; a failed handshake ends
    # the connection, as the MTA ends it).
    wait_for(lambda: kind not in ("good", "wildcard", "no_starttls") or "QUIT" in mx.commands(), "QUIT")
    assert mx.events[0] == ("EHLO", HELO, False)
    assert not {"MAIL", "RCPT", "DATA"} & set(mx.commands())
    if kind in ("good", "wildcard"):
        assert mx.events[1:] == [("QUIT", "", True)]
    if kind != "no_starttls":
        assert mx.sni == [name]  # SNI is the MX name (RFC 8461 §4.1)


def test_every_address_until_one_is_good(mx_hosts, make_checker):
    """The MTA tries an MX host's addresses in turn (up to smtp_mx_address_limit), so the
    check does: a good address anywhere makes the host ok; otherwise the first definitive
    failure names it; addresses nobody answers on never decide."""
    mx_hosts.add("mx.third.example", "refused", "expired", "good")
    mx_hosts.add("mx.failing.example", "refused", "wrong_name", "expired")
    mx_hosts.add("mx.gone.example", "refused", "greeting_421")
    mx_hosts.start()
    checker = make_checker()
    assert check(checker, "mx.third.example").kind == OK
    good = mx_hosts.by_name["mx.third.example"][2]
    assert good.sni == ["mx.third.example"]
    # The DNS server's A records come in any order; the first failure met is named.
    failing = check(checker, "mx.failing.example")
    named = [mx for mx in mx_hosts.by_name["mx.failing.example"] if failing.detail.startswith(mx.address + ": ")]
    assert len(named) == 1 and named[0].kind in ("wrong_name", "expired")
    assert failing.kind == {"wrong_name": CERTIFICATE_HOST_MISMATCH, "expired": CERTIFICATE_EXPIRED}[named[0].kind]
    # Both failing addresses were tried: either could have been good.
    assert [len(mx.sni) for mx in mx_hosts.by_name["mx.failing.example"][1:]] == [1, 1]
    assert check(checker, "mx.gone.example").kind == UNREACHABLE


def test_private_addresses_are_refused_like_the_policy_fetchs(mx_hosts, make_checker):
    """[fetch] allow_private_addresses = no: nothing connects to loopback."""
    (mx,) = mx_hosts.add("mx.private.example", lambda conn: conn.send(b"220 hi\r\n"))
    mx_hosts.start()
    result = check(make_checker(allow_private=False), "mx.private.example")
    assert result.kind == UNREACHABLE and result.detail == f"address not allowed: '{mx.address}'"
    assert mx.connections == 0


def test_a_name_without_address_is_unreachable(mx_hosts, make_checker):
    mx_hosts.start()
    result = check(make_checker(), "mx.nowhere.example")
    assert result.kind == UNREACHABLE and result.detail.startswith("address lookup: ")


def test_many_callers_one_check(mx_hosts, make_checker):
    """However many recipients ask at once, one SMTP session; then the result answers."""
    (mx,) = mx_hosts.add("mx.busy.example", "expired")
    mx_hosts.start()
    checker = make_checker()
    results = []

    def ask():
        for _ in range(20):
            results.append(checker.check(["mx.busy.example"], timeout=5)[0])

    threads = [threading.Thread(target=ask) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(results) == 200 and {r.kind for r in results} == {CERTIFICATE_EXPIRED}
    assert mx.commands() == ["EHLO"] and len(mx.sni) == 1


# --- hostile peers ------------------------------------------------------------------------------


def drip(conn):
    for byte in b"220 slowly\r\n":
        conn.send(bytes([byte]))
        time.sleep(0.3)


def hang_up_during_handshake(conn):
    conn.sock.recv(4096)
    conn.sock.shutdown(2)


HOSTILE = [
    # (id, script, result, a piece of the detail)
    ("line-too-long", lambda c: (c.send(b"220 " + b"x" * 5000), c.hold()), UNREACHABLE, "reply line over 1000 bytes"),
    ("endless-reply", lambda c: (c.send(b"220-x\r\n" * 200), c.hold()), UNREACHABLE, "longer than 100 lines"),
    ("http-server", lambda c: c.send(b"HTTP/1.1 400 Bad Request\r\n\r\n"), UNREACHABLE, "not an SMTP reply: 'HTTP/1.1"),
    ("mixed-codes", converse(ehlo=b"250-mx\r\n251 STARTTLS\r\n"), UNREACHABLE, "codes 250 and 251"),
    ("hangs-up", lambda c: (c.send(b"220 bye\r\n"), c.read_line()), UNREACHABLE, "EHLO: connection closed by the peer"),
    ("554-greeting", converse(greeting=b"554 5.7.1 no thanks\r\n", ehlo=None), UNREACHABLE, "greeting 554"),
    ("ehlo-refused", converse(ehlo=b"550 5.7.1 not you\r\n"), UNREACHABLE, "EHLO answered 550"),
    ("starttls-454", converse(starttls=b"454 4.7.0 TLS not available\r\n"), UNREACHABLE, "STARTTLS answered 454"),
    ("starttls-502", converse(starttls=b"502 5.5.1 not implemented\r\n"), STARTTLS_NOT_SUPPORTED,
     "STARTTLS answered 502"),
    ("injection", converse(starttls=b"220 go ahead\r\n250 injected\r\n"), UNREACHABLE, "plaintext after the 220"),
    ("text-instead-of-tls", converse_text_instead_of_tls, VALIDATION_FAILURE, "TLS handshake: "),
    ("reset-in-handshake", converse(then=hang_up_during_handshake), UNREACHABLE, "TLS handshake: "),
    ("drip", drip, UNREACHABLE, "no answer within [probe] timeout (greeting)"),
    ("binary", converse(greeting=b"220 \x00\xff\x1b[2J hi\r\n", ehlo=b"250-\xff\xfe\r\n250 8BITMIME\r\n"),
     STARTTLS_NOT_SUPPORTED, "does not offer STARTTLS"),
]


@pytest.mark.parametrize("script, expected, detail", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_peers(mx_hosts, make_checker, caplog, script, expected, detail):
    mx_hosts.add("mx.hostile.example", script)
    mx_hosts.start()
    started = time.monotonic()
    result = check(make_checker(timeout=1.5), "mx.hostile.example")
    assert time.monotonic() - started < 2.5
    assert result.kind == expected and detail in result.detail, result
    assert result.detail.isprintable() and len(result.detail) <= mxtls.DETAIL_CHARS
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.exc_info]
