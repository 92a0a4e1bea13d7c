"""Delivery-time enforcement with a real Postfix asking `stsmilter run`'s socketmap.

Postfix routes by recipient domain through a private /etc/hosts (world/mx_routing.py):
each test domain maps to its own loopback address, where an SMTP sink plays its MX.
stsmilter itself resolves through the loopback DNS test server.
"""

import json
import os
import shutil
import subprocess
import tempfile

import pytest
import trustme

from world.daemon import sample, scrape
from world.mx_routing import can_unshare, common_free_port, private_hosts
from world.smtp_peers import SmtpSink, tls_server_context

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not can_unshare(), reason="needs root and unshare"),
]

PEERS = {  # domain -> (loopback address, offers STARTTLS)
    "good.example": ("127.0.0.2", True),
    "stripped.example": ("127.0.0.3", False),
    "plain.example": ("127.0.0.4", True),
}


@pytest.fixture
def namespace_wrapper():
    with private_hosts({domain: address for domain, (address, _tls) in PEERS.items()}) as wrapper:
        yield wrapper


def test_postfix_enforces_tls_via_socketmap(sts_world, start_daemon, postfix_factory, namespace_wrapper):
    mx_ca = trustme.CA()
    port = common_free_port([address for address, _ in PEERS.values()])
    sinks = {}
    try:
        for domain, (address, tls) in PEERS.items():
            context = tls_server_context(mx_ca, f"mx.{domain}") if tls else None
            sinks[domain] = SmtpSink(host=address, port=port, tls_context=context).start()
        for domain in ("good.example", "stripped.example"):
            sts_world.publish(domain, "p1")  # enforce, mx: mx.<domain>
        daemon = start_daemon()
        postfix = postfix_factory(
            wrapper=namespace_wrapper,
            tls_ca_pem=mx_ca.cert_pem.bytes(),
            main_cf_extra={
                "smtp_tcp_port": str(port),
                "smtp_tls_policy_maps": f"socketmap:inet:127.0.0.1:{daemon.socketmap_port}:postfix",
                "smtp_tls_security_level": "may",
                "smtp_tls_loglevel": "1",
            },
        )
        for domain in PEERS:
            result = postfix.send("alice@sender.example", [f"bob@{domain}"], f"Subject: to {domain}\n\nhello\n")
            assert result.rcpt[f"bob@{domain}"].code == 250

        good = sinks["good.example"].wait_for(1, timeout=20)[0]
        assert good.tls and good.tls_version in ("TLSv1.2", "TLSv1.3")
        plain = sinks["plain.example"].wait_for(1, timeout=20)[0]
        assert plain.tls  # no policy: opportunistic TLS, still used when offered

        # The stripping attack: the MX offers no STARTTLS. Postfix must defer, not deliver.
        # (The log line is the evidence: with 1 s retry timers the message moves between
        # the deferred and active queues too fast to catch it in one of them.)
        postfix.wait_for_log(r"to=<bob@stripped\.example>.*status=deferred \(TLS is required", timeout=20)
        queued = [r["address"] for m in postfix.queue() for r in m.get("recipients", [])]
        assert "bob@stripped.example" in queued
        assert sinks["stripped.example"].messages == []
        assert "Verified TLS connection established" in postfix.log_text()

        m = scrape(daemon.metrics_port)
        assert sample(m, "stsmilter_socketmap_lookups_total", result="ok") >= 2
        assert sample(m, "stsmilter_socketmap_lookups_total", result="notfound") >= 1
    finally:
        for sink in sinks.values():
            sink.stop()


SCENARIOS = {  # domain -> (how to publish, expected postmap answer or None for NOTFOUND)
    "enforce.example": (dict(mx_patterns=("mx1.enforce.example", "*.mx.enforce.example")),
                        "secure match=mx1.enforce.example:.mx.enforce.example servername=hostname"),
    "testing.example": (dict(mode="testing"), None),
    "none.example": (dict(mode="none", mx_patterns=()), None),
    "broken.example": (dict(status=500), None),
    "webpki.example": (dict(expired=True), None),
}


_POSTMAP_CONFIG = None


def postmap(port, key):
    """`postmap -q KEY socketmap:...`, as Postfix's own lookup client, with a private
    minimal main.cf (no /etc/postfix/main.cf on a test machine)."""
    global _POSTMAP_CONFIG
    if _POSTMAP_CONFIG is None or not os.path.exists(_POSTMAP_CONFIG):
        _POSTMAP_CONFIG = tempfile.mkdtemp(prefix="stsmilter-postmap-")
        with open(os.path.join(_POSTMAP_CONFIG, "main.cf"), "w") as f:
            f.write("compatibility_level = 3.6\nmaillog_file = /dev/stdout\n")
    proc = subprocess.run(["postmap", "-c", _POSTMAP_CONFIG, "-q", key, f"socketmap:inet:127.0.0.1:{port}:postfix"],
                          capture_output=True, text=True, timeout=30)
    assert "fatal" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout.strip()


@pytest.fixture(autouse=True, scope="module")
def _remove_postmap_config():
    yield
    if _POSTMAP_CONFIG:
        shutil.rmtree(_POSTMAP_CONFIG, ignore_errors=True)


@pytest.mark.skipif(not shutil.which("postmap"), reason="postmap not installed")
def test_postmap_answers_match_the_policy_table(sts_world, start_daemon):
    for domain, (how, _) in SCENARIOS.items():
        sts_world.publish(domain, "s1", **how)
    daemon = start_daemon()
    for domain, (_, expected) in SCENARIOS.items():
        code, out = postmap(daemon.socketmap_port, domain)
        if expected is None:
            assert code == 1 and out == "", (domain, out)  # NOTFOUND
        else:
            assert (code, out) == (0, expected), domain
    assert postmap(daemon.socketmap_port, "nopolicy.example") == (1, "")
    assert postmap(daemon.socketmap_port, "[mx.enforce.example]:25") == (1, "")
    # Parent-domain probes are not policy lookups.
    assert postmap(daemon.socketmap_port, ".enforce.example") == (1, "")


@pytest.mark.skipif(not shutil.which("postmap"), reason="postmap not installed")
def test_strict_testing_makes_testing_secure(sts_world, start_daemon):
    sts_world.publish("testing.example", "s1", mode="testing")
    daemon = start_daemon(socketmap={"strict_testing": "yes"})
    assert postmap(daemon.socketmap_port, "testing.example") == (0, "secure match=mx.testing.example servername=hostname")


def test_milter_warms_the_cache_for_the_socketmap(sts_world, start_daemon):
    sts_world.publish("warm.example", "w1")
    daemon = start_daemon()
    proc = sts_world.cli("query", "--json", "-c", daemon.config_path, "warm.example")
    assert json.loads(proc.stdout)["status"] == "valid"
