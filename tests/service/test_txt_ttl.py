"""A changed TXT id is seen within the record's TTL (RFC 8461 §3.3, §5.1), end to end.

The real `stsmilter run` answers through its socketmap while the loopback DNS server
publishes the _mta-sts record with a given TTL and the HTTPS server the policy; then the
domain publishes a new id (and a new policy). The daemon must serve the new policy once
the TTL has passed, not before, and not before [cache] id_check_min_interval either
(the floor under a TTL of 0); the one-shot `stsmilter query` and `check` show the new
policy at once, whatever the TTL."""

import json
import time

import pytest

from test_store_faults import Socketmap
from world.daemon import poll_until
from world.fixtures_sts import policy_text

pytestmark = pytest.mark.integration

FLOOR = 2  # [cache] id_check_min_interval for these tests (the default is 60 s)


def secure(domain, host="mx"):
    return f"OK secure match={host}.{domain} servername=hostname"


def change_policy(world, domain, policy_id, ttl, mode="enforce"):
    """The domain's next policy: mx pattern mx2.<domain>, under a new TXT id."""
    world.https.serve(f"mta-sts.{domain}", policy_text(mode, ("mx2.{domain}",), domain=domain))
    world.set_txt_id(domain, policy_id, txt_ttl=ttl)


def first_answer(client, domain):
    """Ask until the policy is cached (the first lookup may answer TEMP while fetching);
    returns the monotonic times before the first question and after the answer: the
    daemon confirmed the TXT id between the two."""
    before = time.monotonic()
    poll_until(lambda: client.ask(domain) == secure(domain), 15, f"the first policy of {domain}")
    return before, time.monotonic()


def watch_until_new_answer(client, world, domain, timeout):
    """Ask every 50 ms until the new policy is served; returns [(time, answer, TXT queries
    the DNS server has seen for the domain)], the new answer last."""
    samples = []

    def new_policy_served():
        answer = client.ask(domain)
        samples.append((time.monotonic(), answer, world.dns.count(f"_mta-sts.{domain}", "TXT")))
        return answer == secure(domain, "mx2")

    poll_until(new_policy_served, timeout, f"the new policy of {domain}")
    return samples


@pytest.mark.parametrize("ttl, earliest", [
    (5, 5),  # the TTL decides (between the floor and id_check_interval)
    (0, FLOOR),  # TTL 0: the floor, not a TXT query per lookup
])
def test_the_daemon_serves_a_new_id_once_the_ttl_has_passed(start_daemon, sts_world, ttl, earliest):
    domain = "moving.example"
    sts_world.publish(domain, "a1", txt_ttl=ttl)
    daemon = start_daemon(cache={"id_check_min_interval": str(FLOOR)})
    client = Socketmap(daemon.socketmap_port)
    try:
        asked, answered = first_answer(client, domain)
        learnt = sts_world.dns.count(f"_mta-sts.{domain}", "TXT")
        change_policy(sts_world, domain, "a2", ttl)
        samples = watch_until_new_answer(client, sts_world, domain, timeout=earliest + 15)
    finally:
        client.close()
    served_at = samples[-1][0]
    # Until then the cached policy answered (also while its id was re-checked).
    assert {answer for _, answer, _ in samples[:-1]} <= {secure(domain)}
    # Not before the TTL (or the floor): the id was confirmed after `asked` at the earliest;
    # and no TXT query before then either, though the socketmap was asked every 50 ms.
    assert served_at - asked >= earliest
    assert all(queries == learnt for at, _, queries in samples if at < asked + earliest)
    # Soon after it: one background re-check and one fetch (slack for a loaded machine).
    assert served_at - answered <= earliest + 5
    assert learnt < samples[-1][2] <= learnt + 2  # one re-check (a lost datagram is asked twice)
    assert sts_world.https.count(f"mta-sts.{domain}") == 2


def test_query_and_check_see_a_new_id_at_once(start_daemon, sts_world):
    domain = "verified.example"
    sts_world.publish(domain, "a1", txt_ttl=3600)
    daemon = start_daemon()
    client = Socketmap(daemon.socketmap_port)
    try:
        first_answer(client, domain)  # the daemon has it cached (memory and file)
    finally:
        client.close()
    change_policy(sts_world, domain, "a2", 3600, mode="testing")
    # The administrator verifies the change right away: the one-shot commands re-check
    # the TXT record whatever its TTL, and fetch the policy of the new id.
    proc = sts_world.cli("query", "--json", "-c", daemon.config_path, domain)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert (data["id"], data["source"], data["policy"]["mode"], data["policy"]["mx"]) == (
        "a2", "fetched", "testing", [f"mx2.{domain}"])
    change_policy(sts_world, domain, "a3", 3600, mode="enforce")
    proc = sts_world.cli("check", "--json", "-c", daemon.config_path, f"user@{domain}")
    assert proc.returncode == 0, proc.stderr
    [decision] = json.loads(proc.stdout)
    assert (decision["policy_id"], decision["mode"]) == ("a3", "enforce")
    assert sts_world.https.count(f"mta-sts.{domain}") == 3
