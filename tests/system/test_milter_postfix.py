"""End to end: a real private Postfix on loopback, configured as README.rst says, talks
to the real `stsmilter run` daemon, which discovers policies from the real loopback DNS
and HTTPS servers. A client sends to a mix of recipients; the test asserts every RCPT
reply, what reached the sink, the hold queue and /metrics."""

import os
import re
import shutil
import tempfile
import time

import pytest

from stsmilter.engine.policy import Policy
from stsmilter.engine.store import SqliteStore, make_entry
from world.daemon import sample, scrape

pytestmark = pytest.mark.integration

SENDER = "alice@sender.example"


def publish_domains(world):
    world.publish("good.example", "g1")  # MX mx.good.example matches
    world.publish("bad.example", "b1", mx_hosts=["mx.attacker.example"])  # policy says mx.bad.example
    world.publish("testing.example", "t1", mode="testing", mx_hosts=["mx.elsewhere.example"])
    world.publish("none.example", "n1", mode="none", mx_patterns=())
    world.publish("broken.example", "x1", status=500)
    world.dns.add("plain.example", "MX", "10 mx.plain.example.")  # no MTA-STS at all


RECIPIENTS = [
    "a@plain.example",
    "b@good.example",
    "c@bad.example",
    "d@testing.example",
    "e@none.example",
    "f@broken.example",
]


def decisions(metrics_text, action, mode, reason):
    return sample(metrics_text, "stsmilter_decisions_total", action=action, mode=mode, reason=reason)


def run_postfix(postfix_factory, smtp_sink, milter_spec):
    return postfix_factory(
        relay=("127.0.0.1", smtp_sink.port),
        milter=milter_spec,
        non_smtpd_milter=True,
    )


@pytest.fixture(params=["tcp", "unix"])
def milter_transport(request):
    if request.param == "tcp":
        yield None
        return
    # A directory Postfix's smtpd (user postfix) can traverse; pytest's tmp_path is 0700.
    rundir = tempfile.mkdtemp(prefix="stsmilter-sock-")
    os.chmod(rundir, 0o755)
    try:
        yield os.path.join(rundir, "milter.sock")
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def test_tempfail_only_violating_recipient_others_delivered(sts_world, start_daemon, postfix_factory, smtp_sink,
                                                           milter_transport):
    publish_domains(sts_world)
    extra = {"socket_mode": "0666"} if milter_transport else {}
    daemon = start_daemon(unix_socket=milter_transport, milter=extra)
    spec = f"unix:{milter_transport}" if milter_transport else f"inet:127.0.0.1:{daemon.milter_port}"
    postfix = run_postfix(postfix_factory, smtp_sink, spec)

    result = postfix.send(SENDER, RECIPIENTS, "Subject: hi\n\nhello\n")
    codes = {rcpt: reply.code for rcpt, reply in result.rcpt.items()}
    assert codes == {r: (451 if r == "c@bad.example" else 250) for r in RECIPIENTS}, result
    text = result.rcpt["c@bad.example"].text
    assert text.startswith("4.7.5 MTA-STS policy of bad.example")
    assert "mx.attacker.example" in text and "mx.bad.example" in text

    smtp_sink.wait_for(1, timeout=15)
    delivered = smtp_sink.messages[0]
    assert sorted(delivered.rcpt_tos) == sorted(r for r in RECIPIENTS if r != "c@bad.example")

    m = scrape(daemon.metrics_port)
    assert decisions(m, "tempfail", "enforce", "mx-mismatch") == 1
    assert decisions(m, "accept", "enforce", "mx-match") == 1
    assert decisions(m, "accept", "testing", "mx-mismatch") == 1
    assert decisions(m, "accept", "none", "mode-none") == 1
    assert decisions(m, "accept", "", "no-policy") == 1
    assert decisions(m, "accept", "", "discovery-failed") == 1
    assert sample(m, "stsmilter_policy_fetches_total", result="ok") == 4
    assert sample(m, "stsmilter_policy_fetches_total", result="sts-policy-fetch-error") == 1
    assert sample(m, "stsmilter_cache_entries") == 4  # good, bad, testing, none
    # Postfix has a queue file once a.plain.example was accepted: the line names it.
    queue_id = re.search(r"queued as (\w+)", result.data.text).group(1)
    line = next(line for line in daemon.log().splitlines() if "domain=bad.example" in line)
    assert f"queue_id={queue_id} client=127.0.0.1 domain=bad.example " in line and "action=tempfail" in line


def test_hold_puts_the_message_on_hold(sts_world, start_daemon, postfix_factory, smtp_sink):
    publish_domains(sts_world)
    daemon = start_daemon(milter={"on_violation": "hold"})
    postfix = run_postfix(postfix_factory, smtp_sink, f"inet:127.0.0.1:{daemon.milter_port}")
    result = postfix.send(SENDER, ["b@good.example", "c@bad.example"], "Subject: held\n\nwait\n")
    assert [r.code for r in result.rcpt.values()] == [250, 250]
    held = postfix.wait_until(postfix.hold_queue, timeout=10, what="a message in the hold queue")
    assert sorted(r["address"] for r in held[0]["recipients"]) == ["b@good.example", "c@bad.example"]
    assert smtp_sink.messages == []
    assert decisions(scrape(daemon.metrics_port), "hold", "enforce", "mx-mismatch") == 1


def cache_policy(cache_path, domain, policy_id, patterns, fetched_ago):
    """Leave a policy in the daemon's cache file, fetched `fetched_ago` seconds ago (its id
    confirmed just now, so the daemon does not look at the TXT record first)."""
    now = time.time()
    store = SqliteStore(str(cache_path))
    try:
        store.put(make_entry(domain, policy_id, Policy("STSv1", "enforce", 86400, patterns), now - fetched_ago,
                             checked_at=now))
    finally:
        store.close()


# Older than what the forced re-check before a reject accepts without fetching (a
# minute: discovery.FORCE_FRESH_SECONDS).
CACHED_AGO = 600


def test_reject_after_refetch(sts_world, start_daemon, postfix_factory, smtp_sink, tmp_path):
    """RFC 8461 §5: a permanent refusal only on a policy fetched just now. The daemon
    judges the RCPT on its cached (ten-minute-old) policy of bad.example, refetches it,
    and refuses with 550 because the fresh policy still allows no MX host."""
    publish_domains(sts_world)
    cache_policy(tmp_path / "cache.sqlite", "bad.example", "b1", ("mx.bad.example",), CACHED_AGO)
    daemon = start_daemon(milter={"on_violation": "reject"})
    postfix = run_postfix(postfix_factory, smtp_sink, f"inet:127.0.0.1:{daemon.milter_port}")
    result = postfix.send(SENDER, ["c@bad.example"], "Subject: x\n\ny\n")
    reply = result.rcpt["c@bad.example"]
    assert reply.code == 550 and reply.text.startswith("5.7.5 MTA-STS policy of bad.example")
    assert sts_world.https.count("mta-sts.bad.example") == 1  # the re-check's fetch, and only it
    m = scrape(daemon.metrics_port)
    assert sample(m, "stsmilter_policy_fetches_total", result="ok") == 1
    assert decisions(m, "reject", "enforce", "mx-mismatch") == 1


def test_a_refetched_policy_that_allows_the_mx_accepts(sts_world, start_daemon, postfix_factory, smtp_sink,
                                                        tmp_path):
    """The cached policy allows no MX host of bad.example, but the one on the server now
    does: the refetch before the reject finds it, and the recipient is accepted."""
    sts_world.publish("bad.example", "b1", mx_hosts=["mx.attacker.example"], mx_patterns=("mx.attacker.example",))
    cache_policy(tmp_path / "cache.sqlite", "bad.example", "b1", ("mx.bad.example",), CACHED_AGO)
    daemon = start_daemon(milter={"on_violation": "reject"})
    postfix = run_postfix(postfix_factory, smtp_sink, f"inet:127.0.0.1:{daemon.milter_port}")
    result = postfix.send(SENDER, ["c@bad.example"], "Subject: x\n\ny\n")
    assert result.rcpt["c@bad.example"].code == 250
    assert sts_world.https.count("mta-sts.bad.example") == 1
    assert decisions(scrape(daemon.metrics_port), "accept", "enforce", "mx-match") == 1


def test_out_of_scope_client_is_untouched(sts_world, start_daemon, postfix_factory, smtp_sink):
    publish_domains(sts_world)
    # Loopback is not trusted here and the client does not authenticate: inbound mail.
    daemon = start_daemon(scope={"trusted_networks": "192.0.2.0/24"})
    postfix = run_postfix(postfix_factory, smtp_sink, f"inet:127.0.0.1:{daemon.milter_port}")
    result = postfix.send(SENDER, ["c@bad.example"], "Subject: in\n\nbound\n")
    assert result.rcpt["c@bad.example"].code == 250
    assert decisions(scrape(daemon.metrics_port), "accept", "", "out-of-scope") == 1
    assert sts_world.https.count("mta-sts.bad.example") == 0  # not even looked up


def test_dry_run_accepts_and_counts(sts_world, start_daemon, postfix_factory, smtp_sink):
    publish_domains(sts_world)
    daemon = start_daemon(milter={"dry_run": "yes"})
    postfix = run_postfix(postfix_factory, smtp_sink, f"inet:127.0.0.1:{daemon.milter_port}")
    result = postfix.send(SENDER, ["c@bad.example"], "Subject: dry\n\nrun\n")
    assert result.rcpt["c@bad.example"].code == 250
    assert decisions(scrape(daemon.metrics_port), "accept", "enforce", "mx-mismatch") == 1
    assert "would=tempfail" in daemon.log()


def test_check_agrees_with_the_milter(sts_world, start_daemon):
    import json

    publish_domains(sts_world)
    conf = sts_world.write_config("check.conf")
    proc = sts_world.cli("check", "--json", "-c", conf, *RECIPIENTS)
    assert proc.returncode == 0, proc.stderr
    rows = {row["recipient"]: row for row in json.loads(proc.stdout)}
    assert {r: rows[r]["action"] for r in RECIPIENTS} == {
        r: ("tempfail" if r == "c@bad.example" else "accept") for r in RECIPIENTS
    }
    bad = rows["c@bad.example"]
    assert bad["reply"].startswith("451 4.7.5 MTA-STS policy of bad.example")
    assert (bad["reason"], bad["mode"], bad["mx"]) == ("mx-mismatch", "enforce", ["mx.attacker.example"])
    assert rows["d@testing.example"]["mode"] == "testing"


def test_usr1_reload_changes_decisions_for_new_connections(sts_world, start_daemon, postfix_factory, smtp_sink):
    publish_domains(sts_world)
    daemon = start_daemon()
    postfix = run_postfix(postfix_factory, smtp_sink, f"inet:127.0.0.1:{daemon.milter_port}")
    assert postfix.send(SENDER, ["c@bad.example"], "Subject: 1\n\nx\n").rcpt["c@bad.example"].code == 451
    daemon.reload(lambda text: text.replace("[milter]\n", "[milter]\ndry_run = yes\n"))
    assert postfix.send(SENDER, ["c@bad.example"], "Subject: 2\n\nx\n").rcpt["c@bad.example"].code == 250
    m = scrape(daemon.metrics_port)
    assert decisions(m, "tempfail", "enforce", "mx-mismatch") == 1
    assert decisions(m, "accept", "enforce", "mx-mismatch") == 1  # the dry-run one
    assert sample(m, "stsmilter_policy_fetches_total", result="ok") == 1  # the cache survived the reload
