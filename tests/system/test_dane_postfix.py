"""DANE first with real parts: a signed loopback zone, a private validating unbound,
`stsmilter run`, Postfix's own socketmap client (postmap -q) and `stsmilter check`, and a
real Postfix delivering over DANE inside a network namespace (world/dane_delivery_netns.py).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from world.daemon import poll_until, sample, scrape
from world.fixtures_dane import SCENARIOS, TEMP_ANSWER
from world.postfix import processes_under
from world.socketmap_client import ask, read_replies, request
from world import paths

ROOT = paths.ROOT

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not shutil.which("postmap"), reason="postmap not installed"),
]


@pytest.fixture(scope="module")
def postmap_config():
    directory = tempfile.mkdtemp(prefix="stsmilter-postmap-")
    with open(os.path.join(directory, "main.cf"), "w") as f:
        f.write("compatibility_level = 3.6\nmaillog_file = /dev/stdout\n")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def postmap(postmap_config):
    """postmap(port, key, name="postfix") -> (exit status, stdout, stderr) of `postmap -q`."""

    def query(port, key, name="postfix"):
        proc = subprocess.run(["postmap", "-c", postmap_config, "-q", key, f"socketmap:inet:127.0.0.1:{port}:{name}"],
                              capture_output=True, text=True, timeout=30)
        return proc.returncode, proc.stdout.strip(), proc.stderr

    return query


def settled_answer(port, key, name="postfix", timeout=15.0):
    """The socketmap's answer once discovery and the DANE check are done."""
    return poll_until(lambda: (lambda a: a if "in progress" not in a else None)(ask(port, key, name)),
                      timeout, f"a settled socketmap answer for {key}", interval=0.1)


def test_postmap_answers_dane_first(dane_world, start_daemon, postmap):
    dane_world.publish_scenarios()
    resolver = dane_world.start_resolver()
    daemon = start_daemon(dns=dane_world.dns_section(resolver))
    for domain, (_tlsa, _patterns, expected) in SCENARIOS.items():
        answer = settled_answer(daemon.socketmap_port, domain)
        if expected is None:
            assert answer == TEMP_ANSWER, domain
            code, out, err = postmap(daemon.socketmap_port, domain)
            assert code != 0 and out == "" and "DNSSEC lookup for DANE failed" in err, err
        else:
            assert postmap(daemon.socketmap_port, domain)[:2] == (0, expected), domain
    # Sendmail's FEATURE(`sts') map: Sendmail understands only "secure" there (README).
    assert postmap(daemon.socketmap_port, "dane.dnssec.test", name="sts")[:2] == (
        0, "secure match=mx.dane.dnssec.test servername=hostname")
    metrics = scrape(daemon.metrics_port)
    assert sample(metrics, "stsmilter_socketmap_answers_total", kind="dane", map="default") >= 2
    assert sample(metrics, "stsmilter_socketmap_answers_total", kind="secure", map="default") + sample(
        metrics, "stsmilter_socketmap_answers_total", kind="secure", map="sts") >= 4
    assert sample(metrics, "stsmilter_socketmap_answers_total", kind="secure", map="sts") == 1
    assert sample(metrics, "stsmilter_socketmap_answers_total", kind="temp", map="default") >= 1
    assert sample(metrics, "stsmilter_dane_checks_total", verdict="dane") == 2  # once per domain: cached
    assert sample(metrics, "stsmilter_dane_checks_total", verdict="no-dane") == 3
    assert sample(metrics, "stsmilter_dane_checks_total", verdict="dns-error") >= 1
    assert "DANE check of broken.dnssec.test: TLSA lookup failed for mx.broken.dnssec.test" in daemon.log()


def test_dane_no_keeps_the_mta_sts_answers(dane_world, start_daemon, postmap):
    dane_world.publish_scenarios()
    resolver = dane_world.start_resolver()
    daemon = start_daemon(dns=dane_world.dns_section(resolver), socketmap={"dane": "no"})
    for domain in ("dane.dnssec.test", "broken.dnssec.test"):
        settled_answer(daemon.socketmap_port, domain)
    assert postmap(daemon.socketmap_port, "dane.dnssec.test")[:2] == (
        0, "secure match=mx.dane.dnssec.test servername=hostname")
    assert postmap(daemon.socketmap_port, "broken.dnssec.test")[:2] == (
        0, "secure match=mx.broken.dnssec.test servername=hostname")
    assert sample(scrape(daemon.metrics_port), "stsmilter_dane_checks_total", verdict="no-dane") == 0


def test_a_reload_switches_dane_on(dane_world, start_daemon):
    dane_world.publish("dane.dnssec.test")
    resolver = dane_world.start_resolver()
    daemon = start_daemon(dns=dane_world.dns_section(resolver), socketmap={"dane": "no"})
    assert settled_answer(daemon.socketmap_port, "dane.dnssec.test").startswith("OK secure ")
    daemon.reload(lambda text: text.replace("dane = no", "dane = auto"))
    assert settled_answer(daemon.socketmap_port, "dane.dnssec.test") == "OK dane-only"


def test_check_json_mirrors_delivery(dane_world, sts_world, start_daemon):
    dane_world.publish_scenarios()
    dane_world.publish("brokenmismatch.dnssec.test", tlsa="servfail", mx_patterns=("mx.elsewhere.test",))
    resolver = dane_world.start_resolver()
    daemon = start_daemon(dns=dane_world.dns_section(resolver))
    recipients = ["u@mismatch.dnssec.test", "u@dane.dnssec.test", "u@nodane.dnssec.test",
                  "u@brokenmismatch.dnssec.test"]
    proc = sts_world.cli("check", "--json", "-c", daemon.config_path, *recipients)
    assert proc.returncode == 0, proc.stderr
    got = {d["recipient"]: (d["action"], d["reason"], d["mode"]) for d in json.loads(proc.stdout)}
    assert got == {
        # The MTA-STS policy matches no MX, but the socketmap answers dane-only: delivered.
        "u@mismatch.dnssec.test": ("accept", "dane", "enforce"),
        "u@dane.dnssec.test": ("accept", "mx-match", "enforce"),
        "u@nodane.dnssec.test": ("accept", "mx-match", "enforce"),
        # Mismatch and DNSSEC failing: delivery would wait (TEMP), so the milter tempfails.
        "u@brokenmismatch.dnssec.test": ("tempfail", "mx-dns-error", "enforce"),
    }
    config_no = sts_world.write_config("dane-no.conf", dns=dane_world.dns_section(resolver),
                                       socketmap={"listen": "", "dane": "no"})
    proc = sts_world.cli("check", "--json", "-c", config_no, "u@mismatch.dnssec.test")
    decision = json.loads(proc.stdout)[0]
    assert (decision["action"], decision["reason"]) == ("tempfail", "mx-mismatch")
    assert decision["reply"].startswith("451 4.7.5 MTA-STS policy of mismatch.dnssec.test")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"),
                    reason="needs root, unshare and ip")
def test_postfix_delivers_over_dane_in_a_network_namespace():
    """Postfix's DANE needs a validating resolver in /etc/resolv.conf, which cannot name a
    port: so the whole world (DNS, unbound on 127.0.0.1:53, HTTPS, MX sinks on port 25,
    stsmilter, Postfix) runs in a fresh network namespace that has only loopback, with
    private resolv.conf and hosts bind-mounted in its own mount namespace."""
    outer = tempfile.mkdtemp(prefix="stsmilter-netns-")
    os.chmod(outer, 0o755)
    try:
        resolv, hosts = os.path.join(outer, "resolv.conf"), os.path.join(outer, "hosts")
        with open(resolv, "w") as f:
            f.write("nameserver 127.0.0.1\noptions trust-ad\n")  # glibc passes AD on only with trust-ad
        with open(hosts, "w") as f:
            f.write("127.0.0.1 localhost mta.stsmilter.test\n")
        for path in (resolv, hosts):
            os.chmod(path, 0o644)
        setup = ('ip link set lo up && mount --bind "$1" /etc/resolv.conf && mount --bind "$2" /etc/hosts'
                 ' && hostname mta.stsmilter.test && shift 2 && exec "$@"')
        env = dict(os.environ, STSMILTER_NETNS="1", TMPDIR=outer)
        command = ["unshare", "--net", "--mount", "--uts", "sh", "-c", setup, "sh", resolv, hosts,
                   sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x", "-ra",
                   f"--basetemp={outer}/basetemp", "tests/world/dane_delivery_netns.py"]
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
        assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-10000:] + proc.stderr[-3000:]
    finally:
        for pid in processes_under(outer):  # only if the inner run was killed mid-way
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        shutil.rmtree(outer, ignore_errors=True)


def test_a_reload_that_switches_dane_off_under_load_answers_every_request(dane_world, start_daemon):
    """USR1 with dane = no while DANE checks run and more wait in the checker's queue
    (TLSA lookups that time out; 16 domains, 8 workers): every pipelined request gets an
    answer the MTA can act on, none "TEMP internal error", and the log has no traceback."""
    domains = [f"slow{n}.dnssec.test" for n in range(16)]
    for domain in domains:
        dane_world.publish(domain)
        dane_world.dns.drop(f"_25._tcp.mx.{domain}", "TLSA")
    resolver = dane_world.start_resolver()
    daemon = start_daemon(dns=dane_world.dns_section(resolver), socketmap={"lookup_timeout": "10"})
    with socket.create_connection(("127.0.0.1", daemon.socketmap_port), timeout=30) as sock:
        sock.sendall(b"".join(request(d.encode()) for d in domains))
        poll_until(lambda: any(dane_world.dns.count(f"_25._tcp.mx.{d}", "TLSA") for d in domains), 15,
                   "the first DANE checks")
        daemon.reload(lambda text: text.replace("[socketmap]\n", "[socketmap]\ndane = no\n", 1))
        replies = read_replies(sock, len(domains))
    assert not [r for r in replies if r == b"TEMP internal error"], replies
    acceptable = {b"TEMP MTA-STS policy lookup in progress", b"TEMP DNSSEC lookup for DANE failed"}
    acceptable |= {b"OK secure match=mx.%s servername=hostname" % d.encode() for d in domains}
    assert set(replies) <= acceptable, replies
    assert "Traceback" not in daemon.log()
