"""Several MTAs behind one Redis behave like one: three real `stsmilter run` daemons share
a private redis-server ([cache] redis) against the loopback DNS/HTTPS world. One fetch
per policy for the whole fleet, one view of every policy, purges that reach every
daemon within 2 s, and mail that keeps flowing when Redis does not. Also: a lone daemon
on its sqlite store takes `cache purge` within 2 s and `cache list` shows what it serves."""

import json
import os
import threading
import time

import pytest

from world.daemon import poll_until, sample, scrape
from world.fixtures_sts import policy_text
from world.socketmap_client import ask

pytestmark = pytest.mark.integration


def secure(domain, mx=None):
    return f"OK secure match={mx or 'mx.' + domain} servername=hostname"


def fetches(world, domain):
    return world.https.count(f"mta-sts.{domain}")


def txt_queries(world, domain):
    return world.dns.count(f"_mta-sts.{domain}", "TXT")


def assert_no_traceback(*daemons):
    for daemon in daemons:
        assert "Traceback" not in daemon.log(), daemon.log()


def store_errors(daemon):
    text = scrape(daemon.metrics_port)
    return sum(sample(text, "stsmilter_store_errors_total", op=op) for op in ("open", "read", "write", "delete"))


@pytest.fixture
def fleet(sts_world, redis_server, start_daemon, request):  # (daemons stop before Redis)
    """start(name) -> a daemon of the fleet (all on one Redis, one key prefix)."""
    prefix = f"t{os.getpid()}-{request.node.name[-20:]}:"

    def start(name):
        # (generous timeouts: the domain's lock lasts the DNS plus the fetch timeout, and a
        # loaded machine must not let it expire under a slow fetch)
        return start_daemon(name=name, cache={"redis": redis_server.url, "redis_prefix": prefix, "path": ""},
                            socketmap={"dane": "no"}, dns={"timeout": "5"}, fetch={"timeout": "10"})

    start.prefix = prefix
    start.redis = redis_server
    return start


def ask_all_at_once(daemons, domain, per_daemon=3):
    """Every daemon asked per_daemon times at the same moment; their answers."""
    barrier = threading.Barrier(len(daemons) * per_daemon)
    answers, threads = [], []

    def one(port):
        barrier.wait(10)
        answers.append(ask(port, domain))

    for daemon in daemons:
        for _ in range(per_daemon):
            threads.append(threading.Thread(target=one, args=(daemon.socketmap_port,)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return answers


def test_the_fleet_fetches_each_policy_once_and_every_daemon_serves_it(sts_world, fleet):
    daemons = [fleet(name) for name in ("a", "b", "c")]
    first = "first.example"
    sts_world.publish(first)
    assert ask_all_at_once(daemons, first) == [secure(first)] * 9
    assert (fetches(sts_world, first), txt_queries(sts_world, first)) == (1, 1)

    # Fetched by one, answered by the others without a fetch.
    second = "second.example"
    sts_world.publish(second)
    assert ask(daemons[0].socketmap_port, second) == secure(second)
    assert [ask(d.socketmap_port, second) for d in daemons[1:]] == [secure(second)] * 2
    assert (fetches(sts_world, second), txt_queries(sts_world, second)) == (1, 1)

    # No policy: the negative answer is shared too.
    assert [ask(d.socketmap_port, "nothing.example") for d in daemons] == ["NOTFOUND "] * 3
    assert txt_queries(sts_world, "nothing.example") == 1

    # A daemon restarted with an empty memory answers known domains from Redis.
    daemons[2].stop()
    restarted = fleet("c")
    assert ask(restarted.socketmap_port, first) == secure(first)
    assert ask(restarted.socketmap_port, second) == secure(second)
    assert (fetches(sts_world, first), fetches(sts_world, second)) == (1, 1)
    assert_no_traceback(*daemons)


def test_a_purge_on_one_host_reaches_every_daemon_within_2_seconds(sts_world, fleet):
    daemons = [fleet(name) for name in ("a", "b", "c")]
    domain = "moved.example"
    sts_world.publish(domain)
    assert [ask(d.socketmap_port, domain) for d in daemons] == [secure(domain)] * 3
    # The policy host now serves another policy under the same id: nobody would notice
    # before the next refresh; a purge makes every daemon fetch it again.
    sts_world.https.serve(f"mta-sts.{domain}", policy_text(mx=("mx2.{domain}",), domain=domain))
    before = fetches(sts_world, domain)
    proc = sts_world.cli("cache", "purge", "-c", daemons[1].config_path, domain)
    purged = time.monotonic()
    assert (proc.returncode, proc.stdout) == (0, "purged 1 policy\n"), proc.stderr
    assert proc.stderr == f"stsmilter: every daemon sharing {fleet.redis.url} forgets it too\n"
    new = secure(domain, f"mx2.{domain}")

    def all_serve_the_new_policy():
        return all(ask(d.socketmap_port, domain) == new for d in daemons)

    poll_until(all_serve_the_new_policy, 2.0 - (time.monotonic() - purged), "every daemon to serve the new policy")
    assert fetches(sts_world, domain) == before + 1  # one fetch for the fleet

    # `cache list` shows what a daemon serves.
    proc = sts_world.cli("cache", "list", "--json", "-c", daemons[2].config_path)
    rows = {row["domain"]: row for row in json.loads(proc.stdout)}
    assert rows[domain]["mx"] == [f"mx2.{domain}"]
    proc = sts_world.cli("cache", "list", "-c", daemons[2].config_path)
    assert "1 policy served by the running daemon" in proc.stderr

    proc = sts_world.cli("cache", "purge", "-c", daemons[0].config_path, "--all")
    assert proc.returncode == 0, proc.stderr
    poll_until(lambda: all(not json.loads(sts_world.cli("cache", "list", "--json", "-c", d.config_path).stdout)
                           for d in daemons), 2.0, "every daemon to forget every policy")
    assert_no_traceback(*daemons)


def test_redis_down_is_not_mail_down_and_redis_back_is_used_again(sts_world, fleet):
    daemons = [fleet(name) for name in ("a", "b", "c")]
    cached = "cached.example"
    sts_world.publish(cached)
    assert [ask(d.socketmap_port, cached) for d in daemons] == [secure(cached)] * 3

    fleet.redis.stop()  # killed: no persistence, everything it held is gone
    new = "new-while-down.example"
    sts_world.publish(new)
    started = time.monotonic()
    assert [ask(d.socketmap_port, cached) for d in daemons] == [secure(cached)] * 3
    assert [ask(d.socketmap_port, new) for d in daemons] == [secure(new)] * 3  # each fetches it itself
    assert time.monotonic() - started < 10
    for daemon in daemons:
        daemon.wait_log("reading the fleet's events failed")
        assert store_errors(daemon) > 0
        # each kind of failure logged once (at most once a minute), however often it repeats
        faults = [line.split(" WARNING ", 1)[1] for line in daemon.log().splitlines() if " WARNING " in line]
        assert faults and len(faults) == len(set(faults)), faults

    fleet.redis.start()  # back, empty
    client = fleet.redis.client()
    for daemon in daemons:  # each uses Redis again from this line on (its 5 s rest after a failure is over)
        daemon.wait_log("in step with the store again", timeout=15)
    # What Redis lost comes back from the daemons' memory, at once.
    poll_until(lambda: client.exists(f"{fleet.prefix}p:{cached}") and client.exists(f"{fleet.prefix}p:{new}"),
               15, "the daemons to write back what Redis lost")
    after = "after.example"
    sts_world.publish(after)
    poll_until(lambda: ask(daemons[0].socketmap_port, after) == secure(after), 10, "the new domain", interval=0.5)
    poll_until(lambda: client.exists(f"{fleet.prefix}p:{after}"), 10, "Redis to be used again")
    assert [ask(d.socketmap_port, after) for d in daemons[1:]] == [secure(after)] * 2
    assert fetches(sts_world, after) == 1
    errors = [store_errors(d) for d in daemons]
    time.sleep(3)  # the errors stopped: nothing counted since
    assert [ask(d.socketmap_port, cached) for d in daemons] == [secure(cached)] * 3
    assert [store_errors(d) for d in daemons] == errors
    assert_no_traceback(*daemons)


def test_a_hung_redis_costs_a_bounded_wait_then_none(sts_world, fleet):
    daemons = [fleet(name) for name in ("a", "b")]
    cached = "cached.example"
    sts_world.publish(cached)
    assert [ask(d.socketmap_port, cached) for d in daemons] == [secure(cached)] * 2
    fleet.redis.pause()
    try:
        new = "new-while-hung.example"
        sts_world.publish(new)
        for daemon in daemons:
            started = time.monotonic()
            assert ask(daemon.socketmap_port, cached) == secure(cached)  # from memory: no wait at all
            assert time.monotonic() - started < 0.5
            started = time.monotonic()
            assert ask(daemon.socketmap_port, new) == secure(new)
            # one [cache] redis_timeout (0.5 s), after which Redis rests: the fetch goes on alone
            assert time.monotonic() - started < 3
        for daemon in daemons:
            daemon.wait_log("read failed: redis: Timeout", timeout=10)
    finally:
        fleet.redis.resume()
    client = fleet.redis.client()
    attempts = iter(range(1000))

    def a_new_domain_lands_in_redis(daemon):
        domain = f"after{next(attempts)}.example"
        sts_world.publish(domain)
        return ask(daemon.socketmap_port, domain) == secure(domain) and client.exists(f"{fleet.prefix}p:{domain}")

    for daemon in daemons:  # each uses Redis again, once the rest after its last failure is over
        poll_until(lambda: a_new_domain_lands_in_redis(daemon), 15, "Redis to be used again", interval=0.5)
    assert_no_traceback(*daemons)


def test_a_lone_daemon_takes_a_purge_within_2_seconds_and_lists_what_it_serves(sts_world, start_daemon):
    daemon = start_daemon(socketmap={"dane": "no"})  # the default sqlite store
    domain = "lone.example"
    sts_world.publish(domain)
    assert ask(daemon.socketmap_port, domain) == secure(domain)
    sts_world.https.serve(f"mta-sts.{domain}", policy_text(mx=("mx2.{domain}",), domain=domain))
    proc = sts_world.cli("cache", "purge", "-c", daemon.config_path, domain)
    purged = time.monotonic()
    assert (proc.returncode, proc.stdout) == (0, "purged 1 policy\n"), proc.stderr
    assert "the running daemon dropped 1 from memory" in proc.stderr
    new = secure(domain, f"mx2.{domain}")
    poll_until(lambda: ask(daemon.socketmap_port, domain) == new, 2.0 - (time.monotonic() - purged),
               "the daemon to serve the new policy")
    proc = sts_world.cli("cache", "list", "--json", "-c", daemon.config_path)
    assert [(row["domain"], row["mx"]) for row in json.loads(proc.stdout)] == [(domain, [f"mx2.{domain}"])]
    assert_no_traceback(daemon)


def test_cache_list_shows_a_memory_only_daemon_s_policies(sts_world, start_daemon):
    daemon = start_daemon(cache={"path": ""}, socketmap={"dane": "no"})
    sts_world.publish("memory.example")
    assert ask(daemon.socketmap_port, "memory.example") == secure("memory.example")
    proc = sts_world.cli("cache", "list", "-c", daemon.config_path)
    assert proc.stdout.startswith("memory.example id=id1 mode=enforce expires=")
    assert proc.stderr == "1 policy served by the running daemon\n"
    daemon.stop()
    proc = sts_world.cli("cache", "list", "-c", daemon.config_path)  # no daemon: the (empty) store
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "0 cached policies\n")
