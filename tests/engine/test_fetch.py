"""HTTPS policy fetch against a real loopback HTTPS server (tests/world/https_server.py)."""

import socket
import ssl
import time
import warnings

import pytest

from stsmilter import __version__
from stsmilter.engine import dns
from stsmilter.engine.fetch import MAX_BODY, FetchError, Fetcher, FetchTimeout, WebPkiError, is_public_address
from world.https_server import LYING_LENGTH, OVERSIZE_BODY, POLICY_PATH, HttpsServer
from world.sync import Sync

DOMAIN = "policy.example"
HOST = "mta-sts." + DOMAIN
POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: mx.policy.example\r\nmax_age: 86400\r\n"


class FakeResolver:
    """Answers every address query with a fixed list (or raises); remembers the calls."""

    def __init__(self, answer=("127.0.0.1",)):
        self.answer = answer
        self.calls = []

    async def addresses(self, host, lifetime=None):
        self.calls.append((host, lifetime))
        if isinstance(self.answer, Exception):
            raise self.answer
        return list(self.answer)


def fetcher_for(server, resolver=None, **options):
    options = {"port": server.port, "ca_file": server.ca_file, "allow_private": True, "timeout": 5.0, **options}
    return Sync(Fetcher(resolver or FakeResolver(), **options))


def fetch_error(fetcher, domain=DOMAIN, **kwargs):
    with pytest.raises(FetchError) as caught:
        fetcher.fetch(domain, **kwargs)
    return caught.value


# -- the address guard (pure) --------------------------------------------------------

@pytest.mark.parametrize(
    "address, public",
    [
        # Values only: nothing here is ever connected to.
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("::ffff:8.8.8.8", True),  # IPv4-mapped: judged as the IPv4 address
        ("2002:808:808::", True),  # 6to4 of a public address
        ("64:ff9b::808:808", True),  # NAT64 of a public address
        ("127.0.0.1", False),
        ("127.8.9.10", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.1.1", False),
        ("100.64.0.1", False),  # shared address space (CGNAT)
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("224.0.1.1", False),  # multicast that ipaddress calls global
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("192.0.2.1", False),  # documentation
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fe80::1%eth0", False),
        ("fc00::1", False),
        ("fec0::1", False),
        ("ff02::1", False),
        ("ff0e::1", False),
        ("2001:db8::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("::127.0.0.1", False),  # IPv4-compatible (deprecated)
        ("2002:7f00:1::", False),  # 6to4 of loopback
        ("64:ff9b::a01:203", False),  # NAT64 of 10.1.2.3
        ("localhost", False),
        ("127.1", False),
        ("", False),
    ],
)
def test_address_guard(address, public):
    assert is_public_address(address) is public


@pytest.mark.integration
@pytest.mark.parametrize(
    "answer",
    [["127.0.0.1"], ["10.1.2.3"], ["169.254.1.1"], ["::1"], ["0.0.0.0"], ["224.0.0.1"],
     ["::ffff:127.0.0.1"], ["10.1.2.3", "127.0.0.1", "fe80::1"]],
)
def test_private_addresses_are_refused_before_connecting(https_server, monkeypatch, answer):
    def no_dialling(*args, **kwargs):  # a broken guard must fail here, not dial 10.x
        raise AssertionError(f"tried to connect to {args}")

    monkeypatch.setattr(socket, "create_connection", no_dialling)
    https_server.serve(HOST, POLICY)
    fetcher = fetcher_for(https_server, FakeResolver(answer), allow_private=False)
    started = time.monotonic()
    error = fetch_error(fetcher)
    assert time.monotonic() - started < 0.5
    assert type(error) is FetchError and error.reason == "sts-policy-fetch-error"
    assert str(error).startswith("address not allowed: ")
    assert https_server.connections == 0 and https_server.count(HOST) == 0


# -- DNS -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "answer, message",
    [(dns.NoRecord("NXDOMAIN"), "dns: NXDOMAIN"), (dns.TempDnsError("timeout"), "dns: timeout"), ([], "dns: no address")],
)
def test_dns_problems_are_fetch_errors(answer, message):
    resolver = FakeResolver(answer)
    error = fetch_error(Sync(Fetcher(resolver, timeout=3.0)))
    assert type(error) is FetchError and error.reason == "sts-policy-fetch-error"
    assert str(error) == message
    (host, lifetime), = resolver.calls
    assert host == HOST and 0 < lifetime <= 3.0


# -- success -----------------------------------------------------------------------------------

@pytest.mark.integration
def test_body_is_returned_exactly_with_one_request(https_server):
    https_server.serve(HOST, POLICY)
    assert fetcher_for(https_server).fetch(DOMAIN) == POLICY
    (path, headers), = https_server.requests(HOST)
    assert path == POLICY_PATH
    assert headers["host"] == f"{HOST}:{https_server.port}"
    assert headers["user-agent"] == f"stsmilter/{__version__}"
    assert headers["accept"] == "text/plain"
    assert headers["connection"] == "close"


@pytest.mark.integration
def test_each_fetch_makes_exactly_one_request(https_server):
    https_server.serve(HOST, POLICY)
    fetcher = fetcher_for(https_server)
    for expected in (1, 2, 3):
        fetcher.fetch(DOMAIN)
        assert https_server.count(HOST) == expected


@pytest.mark.integration
@pytest.mark.parametrize("content_type", ["TEXT/PLAIN; charset=utf-8", "text/plain;charset=us-ascii", "Text/Plain"])
def test_text_plain_with_parameters_or_any_case_is_accepted(https_server, content_type):
    https_server.serve(HOST, POLICY, content_type=content_type)
    assert fetcher_for(https_server).fetch(DOMAIN) == POLICY


@pytest.mark.integration
def test_body_of_exactly_64_kib_is_accepted(https_server):
    https_server.serve(HOST, b"a" * MAX_BODY)
    assert fetcher_for(https_server).fetch(DOMAIN) == b"a" * MAX_BODY


@pytest.mark.integration
def test_chunked_body_is_decoded(https_server):
    https_server.serve(HOST, POLICY * 200, chunked=True)
    assert fetcher_for(https_server).fetch(DOMAIN) == POLICY * 200


@pytest.mark.integration
def test_addresses_are_tried_in_order(https_server):
    https_server.serve(HOST, POLICY)  # the server listens on 127.0.0.1 only: 127.0.0.2 refuses
    resolver = FakeResolver(["127.0.0.2", "127.0.0.1"])
    assert fetcher_for(https_server, resolver).fetch(DOMAIN) == POLICY
    assert https_server.count(HOST) == 1


# -- HTTP answers that do not count --------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_are_not_followed(https_server, status):
    target = "mta-sts.elsewhere.example"
    https_server.serve(target, POLICY)
    https_server.serve(HOST, redirect=f"https://{target}:{https_server.port}{POLICY_PATH}", status=status)
    error = fetch_error(fetcher_for(https_server))
    assert type(error) is FetchError and error.reason == "sts-policy-fetch-error"
    assert str(error) == f"HTTP {status}: redirects are not followed"
    assert https_server.count(HOST) == 1 and https_server.count(target) == 0


@pytest.mark.integration
@pytest.mark.parametrize("status", [404, 500, 204, 203])
def test_only_status_200_counts(https_server, status):
    https_server.serve(HOST, POLICY, status=status)
    error = fetch_error(fetcher_for(https_server))
    assert type(error) is FetchError and error.reason == "sts-policy-fetch-error"
    assert str(error) == f"HTTP {status}"


@pytest.mark.integration
@pytest.mark.parametrize(
    "content_type, shown",
    [("text/html", "'text/html'"), ("text/plainx", "'text/plainx'"), ("application/octet-stream", "'application/octet-stream'"),
     ("text/plain, text/html", "'text/plain, text/html'"), (None, "''")],
)
def test_other_content_types_are_refused(https_server, content_type, shown):
    https_server.serve(HOST, POLICY, content_type=content_type)
    error = fetch_error(fetcher_for(https_server))
    assert type(error) is FetchError and error.reason == "sts-policy-fetch-error"
    assert str(error) == f"Content-Type {shown} is not text/plain"


@pytest.mark.integration
@pytest.mark.parametrize(
    "misbehaviour",
    [{"oversize": "no_length"}, {"oversize": "true_length"}, {"oversize": "no_length", "chunked": True}],
    ids=["no-length", "true-length", "chunked"],
)
def test_body_over_64_kib_is_refused(https_server, misbehaviour):
    assert len(OVERSIZE_BODY) == MAX_BODY + 1
    https_server.serve(HOST, **misbehaviour)
    error = fetch_error(fetcher_for(https_server))
    assert type(error) is FetchError and error.reason == "sts-policy-fetch-error"
    assert str(error) == "policy body over 64 KiB"


@pytest.mark.integration
def test_lying_small_content_length_frames_the_body(https_server):
    # HTTP framing: the body ends where Content-Length says; the oversize tail is never
    # read, so it can neither cost memory nor reach the policy parser.
    https_server.serve(HOST, oversize="lying_length")
    assert fetcher_for(https_server).fetch(DOMAIN) == OVERSIZE_BODY[:LYING_LENGTH]


@pytest.mark.integration
def test_body_shorter_than_content_length_is_refused(https_server):
    https_server.serve(HOST, POLICY, content_length=len(POLICY) + 10)
    error = fetch_error(fetcher_for(https_server))
    assert type(error) is FetchError and str(error) == "truncated body"


# -- one deadline ---------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("drip_headers", [False, True], ids=["body", "headers-and-body"])
def test_slow_drip_cannot_stretch_the_deadline(https_server, drip_headers):
    https_server.serve(HOST, b"x" * 100, drip=0.3, drip_headers=drip_headers)
    started = time.monotonic()
    error = fetch_error(fetcher_for(https_server, timeout=1.5))
    elapsed = time.monotonic() - started
    assert type(error) is FetchTimeout and str(error) == "timeout" and error.reason == "sts-policy-fetch-error"
    assert 1.4 < elapsed < 2.5


@pytest.mark.integration
def test_hanging_server_times_out(https_server):
    https_server.serve(HOST, POLICY, hang=True)
    started = time.monotonic()
    error = fetch_error(fetcher_for(https_server, timeout=1.0))
    assert type(error) is FetchTimeout and str(error) == "timeout" and error.reason == "sts-policy-fetch-error"
    assert time.monotonic() - started < 1.5


@pytest.mark.integration
def test_an_earlier_deadline_wins_over_the_timeout(https_server):
    https_server.serve(HOST, POLICY, hang=True)
    started = time.monotonic()
    error = fetch_error(fetcher_for(https_server, timeout=30.0), deadline=started + 0.8)
    assert str(error) == "timeout"
    assert time.monotonic() - started < 1.3


@pytest.mark.integration
def test_a_past_deadline_fails_without_touching_the_network(https_server):
    https_server.serve(HOST, POLICY)
    resolver = FakeResolver()
    error = fetch_error(fetcher_for(https_server, resolver), deadline=time.monotonic() - 1)
    assert str(error) == "timeout"
    assert resolver.calls == [] and https_server.connections == 0


# -- TLS and WebPKI --------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize(
    "variant, message",
    [
        ("expired", "certificate: certificate has expired"),
        ("wrong_name", f"certificate: Hostname mismatch, certificate is not valid for '{HOST}'."),
        ("untrusted", "certificate: unable to get local issuer certificate"),
    ],
)
def test_invalid_certificates_are_webpki_errors(https_server, variant, message):
    https_server.serve(HOST, POLICY, **{variant: True})
    error = fetch_error(fetcher_for(https_server))
    assert type(error) is WebPkiError and error.reason == "sts-webpki-invalid"
    assert str(error) == message
    assert https_server.count(HOST) == 0


@pytest.mark.integration
def test_system_trust_store_rejects_the_test_ca(https_server):
    https_server.serve(HOST, POLICY)
    error = fetch_error(fetcher_for(https_server, ca_file=""))
    assert type(error) is WebPkiError and error.reason == "sts-webpki-invalid"
    assert str(error).startswith("certificate: ")
    assert https_server.count(HOST) == 0


@pytest.mark.integration
def test_a_host_the_server_does_not_know_gets_no_valid_certificate(https_server):
    error = fetch_error(fetcher_for(https_server), domain="unknown.example")
    assert type(error) is WebPkiError and "Hostname mismatch" in str(error)


@pytest.mark.integration
def test_plain_http_on_the_https_port_is_a_fetch_error(https_server):
    https_server.serve(HOST, POLICY, no_tls=True)
    error = fetch_error(fetcher_for(https_server))
    assert type(error) is FetchError and error.reason == "sts-policy-fetch-error"
    assert str(error).startswith("tls: ")


def _old_tls_client_connects(server):
    """Whether this OpenSSL can speak TLS 1.1 at all (else the refusal proves nothing)."""
    context = ssl.create_default_context(cafile=server.ca_file)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=HOST) as tls:
                return tls.version() == "TLSv1.1"
    except (ssl.SSLError, ValueError, OSError):
        return False


@pytest.mark.integration
def test_a_tls_1_1_only_server_is_refused():
    with HttpsServer(tls_maximum_version=ssl.TLSVersion.TLSv1_1) as server:
        server.serve(HOST, POLICY)
        if not _old_tls_client_connects(server):
            pytest.skip("the local OpenSSL cannot speak TLS 1.1, so there is nothing to refuse")
        error = fetch_error(fetcher_for(server))
        assert type(error) is FetchError and error.reason == "sts-policy-fetch-error"
        assert str(error) == "tls: TLSV1_ALERT_PROTOCOL_VERSION"
        assert server.count(HOST) == 0


# -- a policy host that accepts TCP and never speaks TLS -----------------------------------

@pytest.fixture
def tls_black_hole():
    """A TCP listener on 127.0.0.1 that accepts (the kernel does) and never answers."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(512)
        yield hole.getsockname()[1]


@pytest.mark.integration
def test_a_host_that_never_completes_the_handshake_times_out(tls_black_hole):
    fetcher = Sync(Fetcher(FakeResolver(), port=tls_black_hole, timeout=0.8, allow_private=True))
    started = time.monotonic()
    error = fetch_error(fetcher)
    assert type(error) is FetchTimeout and str(error) == "timeout"
    assert 0.7 < time.monotonic() - started < 1.5


@pytest.mark.integration
def test_hanging_hosts_cost_only_their_own_time(tls_black_hole, https_server):
    """200 fetches from hosts that hang, and one from a host that answers, all at once on
    one event loop: the good one is as quick as alone, the others end at their own
    deadline together, and no thread is started for any of them."""
    import asyncio
    import threading

    https_server.serve(HOST, POLICY)
    hanging = Fetcher(FakeResolver(), port=tls_black_hole, timeout=1.0, allow_private=True)
    good = Fetcher(FakeResolver(), port=https_server.port, timeout=5.0, ca_file=https_server.ca_file,
                   allow_private=True)

    async def burst():
        threads = threading.active_count()
        stuck = [asyncio.ensure_future(hanging.fetch(f"d{n}.example")) for n in range(200)]
        await asyncio.sleep(0.1)
        started = time.monotonic()
        body = await good.fetch(DOMAIN)
        good_seconds = time.monotonic() - started
        assert threading.active_count() == threads
        outcomes = await asyncio.gather(*stuck, return_exceptions=True)
        return body, good_seconds, outcomes

    started = time.monotonic()
    body, good_seconds, outcomes = asyncio.run(burst())
    assert body == POLICY and good_seconds < 0.5
    assert all(type(o) is FetchTimeout for o in outcomes)
    assert time.monotonic() - started < 2.0
