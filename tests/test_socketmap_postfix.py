"""Delivery-time enforcement with a real Postfix asking `stsmilter run`'s socketmap.

How Postfix finds the MX peers without DNS leaving loopback: DNS is disabled in
Postfix (smtp_dns_support_level = disabled, smtp_host_lookup = native), so it looks up
the recipient domain itself as a host name through the C library, i.e. /etc/hosts.
Postfix is started inside a private mount namespace (unshare --mount) in which
/etc/hosts is a bind-mounted file mapping each test domain to its own loopback address
(127.0.0.2, .3, ...), and /etc/resolv.conf points at 127.0.0.1 so nothing can leak.
Every peer listens on the same port on its own address; smtp_tcp_port names that port.
The TLS policy lookup key is then the plain recipient domain, as in production.
stsmilter itself resolves through the loopback DNS test server.
"""

import json
import os
import shutil
import socket
import subprocess
import tempfile

import pytest
import trustme

from world.daemon import sample, scrape
from world.smtp_peers import SmtpSink, tls_server_context

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare"),
]

PEERS = {  # domain -> (loopback address, offers STARTTLS)
    "good.example": ("127.0.0.2", True),
    "stripped.example": ("127.0.0.3", False),
    "plain.example": ("127.0.0.4", True),
}


def common_free_port(addresses):
    """A port free on every one of addresses."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            port = s.getsockname()[1]
        try:
            probes = []
            for address in addresses:
                probe = socket.socket()
                probes.append(probe)
                probe.bind((address, port))
            return port
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError("no common free port")


@pytest.fixture
def namespace_files():
    directory = tempfile.mkdtemp(prefix="stsmilter-ns-")
    os.chmod(directory, 0o755)
    try:
        hosts = os.path.join(directory, "hosts")
        with open(hosts, "w") as f:
            f.write("127.0.0.1 localhost\n")
            for domain, (address, _tls) in PEERS.items():
                f.write(f"{address} {domain}\n")
        resolv = os.path.join(directory, "resolv.conf")
        with open(resolv, "w") as f:
            f.write("nameserver 127.0.0.1\n")
        os.chmod(hosts, 0o644)
        os.chmod(resolv, 0o644)
        yield hosts, resolv
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_postfix_enforces_tls_via_socketmap(sts_world, start_daemon, postfix_factory, namespace_files):
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
        hosts, resolv = namespace_files
        ca_pem = os.path.join(os.path.dirname(hosts), "mx-ca.pem")
        mx_ca.cert_pem.write_to_path(ca_pem)
        wrapper = [
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && shift 2 && exec "$@"',
            "sh", hosts, resolv,
        ]
        postfix = postfix_factory(
            wrapper=wrapper,
            main_cf_extra={
                "smtp_tcp_port": str(port),
                "smtp_tls_policy_maps": f"socketmap:inet:127.0.0.1:{daemon.socketmap_port}:postfix",
                "smtp_tls_CAfile": ca_pem,
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
