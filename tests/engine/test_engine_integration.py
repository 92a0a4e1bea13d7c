"""The engine against real servers on loopback: a DNS server answering the resolver, an
HTTPS server with a per-run trustme CA. Each scenario is asserted through
`stsmilter query --json` (a subprocess, as an operator runs it) and the library."""

import json
import threading
import time

import pytest

from stsmilter import config, engine
from world.fixtures_sts import policy_text

pytestmark = pytest.mark.integration


def query(world, domain, conf=None, *extra):
    proc = world.cli("query", "--json", "-c", conf or world.write_config(), *extra, domain)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def library_lookup(world, domain, **config_sections):
    cfg = config.loads(world.config_text(cache_path="", **config_sections))
    discovery = engine.open_engine(cfg)
    try:
        return discovery.lookup(domain)
    finally:
        discovery.close()


def test_valid_enforce_policy(sts_world):
    sts_world.publish("example.com", "20261128", mx_patterns=("mx1.example.com", "*.mx.example.com"))
    data = query(sts_world, "Example.COM.")
    assert data["domain"] == "example.com"
    assert (data["status"], data["reason"], data["source"], data["id"]) == ("valid", None, "fetched", "20261128")
    assert data["policy"] == {"version": "STSv1", "mode": "enforce", "max_age": 86400,
                              "mx": ["mx1.example.com", "*.mx.example.com"]}
    assert data["expires"] and data["expires"].endswith("+00:00")
    assert sts_world.https.count("mta-sts.example.com") == 1


def test_no_record(sts_world):
    data = query(sts_world, "nopolicy.example")
    assert (data["status"], data["reason"], data["source"], data["policy"]) == ("none", "no-txt-record", None, None)


# (name, how to publish it, expected status, expected reason)
SCENARIOS = [
    ("redirect", dict(redirect="https://mta-sts.other.example/.well-known/mta-sts.txt"), "failed", "sts-policy-fetch-error"),
    ("notfound", dict(status=404), "failed", "sts-policy-fetch-error"),
    ("servererror", dict(status=500), "failed", "sts-policy-fetch-error"),
    ("html", dict(content_type="text/html"), "failed", "sts-policy-fetch-error"),
    ("oversize", dict(oversize="no_length"), "failed", "sts-policy-fetch-error"),
    # A short Content-Length is honoured: 100 bytes of "x" are read, which is no policy.
    ("oversize-lying", dict(oversize="lying_length"), "failed", "sts-policy-invalid"),
    ("drip", dict(drip=0.4), "failed", "sts-policy-fetch-error"),
    ("hang", dict(hang=True), "failed", "sts-policy-fetch-error"),
    ("expired", dict(expired=True), "failed", "sts-webpki-invalid"),
    ("wrongname", dict(wrong_name=True), "failed", "sts-webpki-invalid"),
    ("untrusted", dict(untrusted=True), "failed", "sts-webpki-invalid"),
    ("badpolicy", dict(body=b"version: STSv1\nmode: enforce\nmax_age: 600\n"), "failed", "sts-policy-invalid"),
    ("multitxt", dict(txt=["v=STSv1; id=a", "v=STSv1; id=b"]), "none", "invalid-txt-record"),
    ("badtxt", dict(txt=["v=STSv1; id=not_valid!"]), "none", "invalid-txt-record"),
    ("stsv10", dict(txt=["v=STSv10; id=a"]), "none", "no-txt-record"),
    ("plaintext-ca", dict(content_type="TEXT/Plain; charset=utf-8"), "valid", None),
]


@pytest.mark.parametrize("name, how, status, reason", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_fetch_and_record_scenarios(sts_world, name, how, status, reason):
    domain = f"{name}.example"
    sts_world.publish(domain, **how)
    started = time.monotonic()
    data = query(sts_world, domain)
    assert (data["status"], data["reason"]) == (status, reason)
    assert time.monotonic() - started < 10  # [fetch] timeout is 2 s: drip/hang cannot stretch it
    if name == "redirect":
        assert sts_world.https.count("mta-sts.other.example") == 0
    result = library_lookup(sts_world, domain)
    assert (result.status, result.reason) == (status, reason)


@pytest.mark.parametrize("fault", ["servfail", "drop"])
def test_dns_failure_is_failed_not_none(sts_world, fault):
    sts_world.publish("flaky.example")
    getattr(sts_world.dns, fault)("_mta-sts.flaky.example")
    data = query(sts_world, "flaky.example")
    assert (data["status"], data["reason"]) == ("failed", "dns-error")


def test_cname_is_followed_but_policy_host_stays_the_original(sts_world):
    sts_world.dns.add("_mta-sts.alias.example", "CNAME", "_mta-sts.provider.example.")
    sts_world.dns.add("_mta-sts.provider.example", "TXT", "v=STSv1; id=prov1")
    sts_world.dns.add("mta-sts.alias.example", "A", "127.0.0.1")
    sts_world.https.serve("mta-sts.alias.example", policy_text(domain="alias.example"))
    data = query(sts_world, "alias.example")
    assert (data["status"], data["id"]) == ("valid", "prov1")
    assert sts_world.https.count("mta-sts.alias.example") == 1
    assert sts_world.https.count("mta-sts.provider.example") == 0


def test_private_address_refused_unless_allowed(sts_world):
    sts_world.publish("internal.example")
    conf = sts_world.write_config(fetch={"allow_private_addresses": "no"})
    data = query(sts_world, "internal.example", conf)
    assert (data["status"], data["reason"]) == ("failed", "sts-policy-fetch-error")
    assert sts_world.https.connections == 0


def test_cache_survives_restart_with_the_policy_host_gone(sts_world):
    sts_world.publish("kept.example", "v1")
    ca_copy = sts_world.tmp_path / "ca.pem"
    ca_copy.write_bytes(open(sts_world.https.ca_file, "rb").read())
    conf = sts_world.write_config(fetch={"ca_file": str(ca_copy)})
    assert query(sts_world, "kept.example", conf)["source"] == "fetched"
    sts_world.https.stop()
    sts_world.dns.remove("_mta-sts.kept.example")
    data = query(sts_world, "kept.example", conf)
    assert (data["status"], data["source"], data["id"], data["policy"]["mode"]) == ("valid", "cache", "v1", "enforce")


def test_id_change_triggers_refetch_and_failure_keeps_old_policy(sts_world):
    sts_world.publish("moving.example", "v1")
    conf = sts_world.write_config(cache={"id_check_interval": "0"})
    assert query(sts_world, "moving.example", conf)["id"] == "v1"
    assert query(sts_world, "moving.example", conf)["source"] == "cache"  # same id: no fetch
    assert sts_world.https.count("mta-sts.moving.example") == 1
    sts_world.set_txt_id("moving.example", "v2")
    sts_world.https.serve("mta-sts.moving.example", policy_text("testing", domain="moving.example"))
    data = query(sts_world, "moving.example", conf)
    assert (data["source"], data["id"], data["policy"]["mode"]) == ("fetched", "v2", "testing")
    sts_world.set_txt_id("moving.example", "v3")
    sts_world.https.update("mta-sts.moving.example", status=500)
    data = query(sts_world, "moving.example", conf)
    assert (data["status"], data["id"], data["policy"]["mode"]) == ("valid", "v2", "testing")


def test_200_threads_one_txt_query_one_fetch(sts_world):
    sts_world.publish("popular.example", drip=0.0)
    cfg = config.loads(sts_world.config_text(cache_path=""))
    discovery = engine.open_engine(cfg)
    sts_world.dns.reset_log()
    results, barrier = [], threading.Barrier(200)

    def ask():
        barrier.wait()
        results.append(discovery.lookup("popular.example", timeout=10))

    threads = [threading.Thread(target=ask) for _ in range(200)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        discovery.close()
    assert [r.status for r in results] == ["valid"] * 200
    assert sts_world.dns.count("_mta-sts.popular.example", "TXT") == 1
    assert sts_world.https.count("mta-sts.popular.example") == 1


def test_query_usage_and_config_errors_exit_2(sts_world, tmp_path):
    bad = tmp_path / "bad.conf"
    bad.write_text("[milter]\nbogus = 1\n")
    proc = sts_world.cli("query", "-c", str(bad), "example.com")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "bogus: unknown key" in proc.stderr
    proc = sts_world.cli("query", "-c", sts_world.write_config(), "not a domain")
    assert proc.returncode == 2
    proc = sts_world.cli("query")
    assert proc.returncode == 2


def test_missing_ca_file_is_a_config_error(sts_world, tmp_path):
    proc = sts_world.cli("query", "-c", sts_world.write_config(fetch={"ca_file": str(tmp_path / "absent.pem")}), "x.example")
    assert proc.returncode == 2
    assert "[fetch] ca_file" in proc.stderr and proc.stderr.count("\n") == 1


def test_query_runs_without_any_config_file(sts_world, tmp_path):
    # No -c and no /etc/stsmilter/stsmilter.conf: defaults. An address literal needs no
    # network at all, so this stays on loopback whatever the system resolver is.
    proc = sts_world.cli("query", "--json", "[127.0.0.1]")
    assert proc.returncode == 2 and "address literal" in proc.stderr


def test_human_readable_output(sts_world):
    sts_world.publish("human.example", "h1")
    proc = sts_world.cli("query", "-c", sts_world.write_config(), "human.example")
    assert proc.returncode == 0
    assert "status:  valid" in proc.stdout and "mode:    enforce" in proc.stdout and "mx:      mx.human.example" in proc.stdout


@pytest.mark.parametrize("text, wanted", [
    ("", True),
    ("[socketmap]\ndane = no\n", False),
    ("[socketmap]\ndane = no\n[socketmap postfix]\ndane = auto\n", True),
    ("[socketmap]\ndane = no\n[socketmap strict]\nstrict_testing = yes\n", False),
    ("[socketmap strict]\ndane = no\n", True),
])
def test_the_dane_checker_runs_when_any_map_wants_it(text, wanted):
    from stsmilter import config, engine

    assert engine.dane_wanted(config.loads(text)) is wanted
