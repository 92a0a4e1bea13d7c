"""fleet.py over a fake shared store: several Discovery engines ("daemons") on one store
fetch each policy once, share every answer, refresh once, hear purges and changes, and
work on their own when the store is down. The same with real daemons and a real Redis
is in test_fleet_daemons.py."""

import threading
import time

import pytest

from stsmilter.engine import dns
from stsmilter.engine.cache import PolicyCache
from stsmilter.engine.discovery import Discovery, Settings
from stsmilter.engine.fetch import FetchError
from stsmilter.engine.fleet import SharedFleet
from stsmilter.engine.store import MemoryStore, Store, StoreError
from stsmilter.engine.store.base import decode_answer, encode_answer
from test_discovery import ENFORCE, TESTING, Clock, FakeFetcher, FakeResolver, publish


class SharedBacking:
    """What a Redis holds for the fleet: policies, answers, locks, events."""

    def __init__(self, clock):
        self.clock = clock
        self.policies = MemoryStore()
        self.answers = {}  # domain -> (Result, expires)
        self.locks = {}  # domain -> (token, monotonic expiry)
        self.events = []  # (op, domain, sender)
        self.changed = threading.Condition()
        self.down = False
        self.mutex = threading.Lock()

    def set_down(self, down):
        with self.changed:
            self.down = down
            self.changed.notify_all()  # a blocking read fails at once, as on a closed connection


class FakeSharedStore(Store):
    shared = True
    retry_after = 0.2
    events_per_read = 100

    def __init__(self, backing, sender):
        super().__init__()
        self.backing = backing
        self.sender = sender
        self.name = "fake://fleet"

    def __getattribute__(self, name):
        if name in _GUARDED and object.__getattribute__(self, "backing").down:
            def down(*_args):
                raise StoreError("redis: Connection refused", "ConnectionError")
            return down
        return object.__getattribute__(self, name)

    def get(self, domain):
        return self.backing.policies.get(domain)

    def put(self, entry):
        self.backing.policies.put(entry)
        self.backing.answers.pop(entry.domain, None)

    def delete(self, domain):
        self.backing.answers.pop(domain, None)
        return self.backing.policies.delete(domain)

    def entries(self):
        return self.backing.policies.entries()

    def count(self):
        return self.backing.policies.count()

    def get_answer(self, domain):  # as Redis keeps it: "STATUS REASON [ID]" (store/base.py)
        answer = self.backing.answers.get(domain)
        return decode_answer(domain, answer[0]) if answer and answer[1] > self.backing.clock() else None

    def put_answer(self, result, ttl):
        self.backing.answers[result.domain] = (encode_answer(result), self.backing.clock() + ttl)

    def claim(self, domain, seconds):
        with self.backing.mutex:
            held = self.backing.locks.get(domain)
            if held is not None and held[1] > time.monotonic():
                return None
            token = object()
            self.backing.locks[domain] = (token, time.monotonic() + seconds)
            return (domain, token)

    def release(self, lock):
        domain, token = lock
        with self.backing.mutex:
            if self.backing.locks.get(domain, (None,))[0] is token:
                del self.backing.locks[domain]

    def announce(self, op, domain=""):
        with self.backing.changed:
            self.backing.events.append((op, domain, self.sender))
            self.backing.changed.notify_all()

    def last_event(self):
        return len(self.backing.events)

    def read_events(self, after, block):
        with self.backing.changed:
            self.backing.changed.wait_for(lambda: len(self.backing.events) > after or self.backing.down, block)
        if self.backing.down:
            raise StoreError("redis: Connection closed by server", "ConnectionError")
        events = self.backing.events[after:]
        return after + len(events), events


_GUARDED = {"get", "put", "delete", "entries", "count", "due", "purge_expired", "get_answer", "put_answer", "claim",
            "release", "announce", "last_event", "read_events"}


class Fleet:
    def __init__(self, size=2, lock_seconds=5.0, listen=True):
        self.clock = Clock(time.time())
        self.resolver, self.fetcher = FakeResolver(), FakeFetcher()
        self.backing = SharedBacking(self.clock)
        self.daemons = [self.daemon(f"d{n}", lock_seconds, listen) for n in range(size)]

    def daemon(self, sender, lock_seconds=5.0, listen=True):
        store = FakeSharedStore(self.backing, sender)
        cache = PolicyCache(store, 1000, negative_ttl=60, failure_backoff=300, clock=self.clock)  # rests store.retry_after
        cache.load()
        settings = Settings(id_check_interval=300, refresh_interval=3600, recheck_in_background=False)
        fleet = SharedFleet(cache, lock_seconds, poll=0.05)
        disc = Discovery(self.resolver, self.fetcher, cache, settings, clock=self.clock, fleet=fleet)
        if listen:
            fleet.start()
        return disc

    def close(self):
        for disc in self.daemons:
            disc.close()


@pytest.fixture
def fleet():
    f = Fleet()
    yield f
    f.close()


def all_at_once(calls):
    barrier = threading.Barrier(len(calls))
    results = [None] * len(calls)

    def run(n, call):
        barrier.wait(5)
        results[n] = call()

    threads = [threading.Thread(target=run, args=(n, call)) for n, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    return results


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_concurrent_first_lookups_across_the_fleet_cost_one_txt_lookup_and_one_fetch(fleet):
    a, b = fleet.daemons
    publish(fleet.resolver, fleet.fetcher, "example.com", "a1", ENFORCE)
    fleet.fetcher.delay = 0.3
    results = all_at_once([lambda d=d: d.lookup("example.com") for d in (a, b, a, b)])
    assert [(r.status, r.policy_id) for r in results] == [("valid", "a1")] * 4
    assert (fleet.resolver.txt_queries, fleet.fetcher.fetches) == (1, 1)
    assert a.cache.peek("example.com") is not None and b.cache.peek("example.com") is not None


def test_a_policy_one_daemon_fetched_is_the_others_without_a_fetch(fleet):
    a, b = fleet.daemons
    publish(fleet.resolver, fleet.fetcher, "example.com", "a1", ENFORCE)
    assert a.lookup("example.com").source == "fetched"
    wait_until(lambda: b.cache.peek("example.com") is not None)  # "changed": b's memory takes it
    r = b.lookup("example.com")
    assert (r.status, r.source, r.policy_id) == ("valid", "cache", "a1")
    assert (fleet.resolver.txt_queries, fleet.fetcher.fetches) == (1, 1)


def test_without_the_event_a_daemon_still_takes_the_policy_from_the_store():
    fleet = Fleet(listen=False)
    try:
        a, b = fleet.daemons
        publish(fleet.resolver, fleet.fetcher, "example.com", "a1", ENFORCE)
        a.lookup("example.com")
        assert b.cache.peek("example.com") is None
        assert b.lookup("example.com").policy_id == "a1" and fleet.fetcher.fetches == 1
    finally:
        fleet.close()


def test_answers_without_a_policy_are_shared(fleet):
    a, b = fleet.daemons
    assert a.lookup("nothing.example").status == "none"
    assert b.lookup("nothing.example").status == "none" and fleet.resolver.txt_queries == 1
    fleet.resolver.txt_records["_mta-sts.broken.example"] = ["v=STSv1; id=b1"]
    fleet.fetcher.bodies["broken.example"] = FetchError("HTTP 500")
    assert a.lookup("broken.example").reason == "sts-policy-fetch-error"
    r = b.lookup("broken.example")
    assert (r.status, r.reason, r.policy_id) == ("failed", "sts-policy-fetch-error", "b1")
    assert fleet.fetcher.fetches == 1  # the broken host is not hammered by the fleet either
    assert b.cache.backoff("broken.example", "b1") == "sts-policy-fetch-error"


def test_a_new_id_is_fetched_by_one_daemon_for_all(fleet):
    a, b = fleet.daemons
    publish(fleet.resolver, fleet.fetcher, "example.com", "a1", ENFORCE)
    a.lookup("example.com")
    b.lookup("example.com")
    publish(fleet.resolver, fleet.fetcher, "example.com", "a2", TESTING)
    fleet.clock.now += 301  # both re-check the id
    assert a.lookup("example.com").policy_id == "a2"
    r = b.lookup("example.com")
    assert (r.policy_id, r.policy.mode) == ("a2", "testing")
    assert fleet.fetcher.fetches == 2  # a1 once, a2 once


def test_a_forced_recheck_takes_another_daemons_fresh_fetch(fleet):
    a, b = fleet.daemons
    publish(fleet.resolver, fleet.fetcher, "example.com", "a1", ENFORCE)
    a.lookup("example.com")
    fleet.clock.now += 120  # older than FORCE_FRESH_SECONDS
    assert a.lookup("example.com", force=True).source == "fetched" and fleet.fetcher.fetches == 2
    r = b.lookup("example.com", force=True)
    assert (r.status, r.source) == ("valid", "fetched") and fleet.fetcher.fetches == 2


def test_a_policy_is_refreshed_by_one_daemon_and_skipped_by_another_meanwhile(fleet):
    a, b = fleet.daemons
    publish(fleet.resolver, fleet.fetcher, "example.com", "a1", ENFORCE)
    a.lookup("example.com")
    wait_until(lambda: b.cache.peek("example.com") is not None)
    fleet.clock.now += 3601  # due on both
    lock = b.cache.store.claim("example.com", 5)  # as if a third daemon were refreshing it
    assert b.refresh("example.com").fetched_at == fleet.clock.now - 3601 and fleet.fetcher.fetches == 1
    b.cache.store.release(lock)
    assert a.refresh_due() == 1
    wait_until(lambda: fleet.fetcher.fetches == 2)
    wait_until(lambda: b.cache.peek("example.com").fetched_at == fleet.clock.now)  # b heard of it
    assert b.refresh_due() == 0 and fleet.fetcher.fetches == 2


def test_a_holder_that_never_answers_is_waited_for_its_lock_time_only():
    fleet = Fleet(lock_seconds=0.5)
    try:
        a, b = fleet.daemons
        publish(fleet.resolver, fleet.fetcher, "example.com", "a1", ENFORCE)
        a.cache.store.claim("example.com", 60)  # a daemon that died holding it (its lock would expire)
        started = time.monotonic()
        assert b.lookup("example.com").status == "valid"
        assert 0.5 <= time.monotonic() - started < 2 and fleet.fetcher.fetches == 1
    finally:
        fleet.close()


def test_with_the_store_down_every_daemon_works_on_its_own(fleet):
    a, b = fleet.daemons
    publish(fleet.resolver, fleet.fetcher, "cached.example", "c1", ENFORCE)
    a.lookup("cached.example")
    wait_until(lambda: b.cache.peek("cached.example") is not None)
    fleet.backing.set_down(True)
    publish(fleet.resolver, fleet.fetcher, "new.example", "n1", ENFORCE)
    assert [d.lookup("cached.example").status for d in (a, b)] == ["valid"] * 2
    assert [d.lookup("new.example").status for d in (a, b)] == ["valid"] * 2
    assert fleet.fetcher.fetches == 3  # the new one fetched by each: nobody to ask
    assert a.cache.unsaved == 1


def test_after_an_outage_memory_fills_the_store_back_but_a_purge_meanwhile_wins(fleet):
    a, b = fleet.daemons
    for domain in ("kept.example", "purged.example"):
        publish(fleet.resolver, fleet.fetcher, domain, "x1", ENFORCE)
        a.lookup(domain)
    wait_until(lambda: b.cache.peek("purged.example") is not None)
    fleet.backing.set_down(True)
    time.sleep(0.1)  # the events readers notice
    fleet.backing.policies = MemoryStore()  # a Redis restarted empty...
    fleet.backing.events.append(("purge", "purged.example", "cli"))  # ...and a purge before they came back
    fleet.backing.set_down(False)
    wait_until(lambda: fleet.backing.policies.get("kept.example") is not None)
    wait_until(lambda: a.cache.peek("purged.example") is None and b.cache.peek("purged.example") is None)
    time.sleep(0.3)
    assert fleet.backing.policies.get("purged.example") is None
    assert a.cache.unsaved == 0 and b.cache.unsaved == 0


def test_purges_reach_every_daemon_and_own_changes_are_not_reloaded(fleet):
    a, b = fleet.daemons
    for domain in ("one.example", "two.example"):
        publish(fleet.resolver, fleet.fetcher, domain, "x1", ENFORCE)
        a.lookup(domain)
    wait_until(lambda: b.cache.peek("two.example") is not None)
    cli = FakeSharedStore(fleet.backing, "cli")
    cli.delete("one.example")
    cli.announce("purge", "one.example")
    wait_until(lambda: a.cache.peek("one.example") is None and b.cache.peek("one.example") is None)
    assert a.cache.peek("two.example") is not None
    cli.announce("purge-all")
    wait_until(lambda: a.cache.snapshot() == [] and b.cache.snapshot() == [])


def test_a_daemon_restarted_with_an_empty_memory_answers_from_the_store(fleet):
    a, _ = fleet.daemons
    publish(fleet.resolver, fleet.fetcher, "example.com", "a1", ENFORCE)
    a.lookup("example.com")
    restarted = fleet.daemon("d9")
    fleet.daemons.append(restarted)
    assert restarted.cache.peek("example.com") is not None  # load() at start
    assert restarted.lookup("example.com").source == "cache" and fleet.fetcher.fetches == 1


def test_a_dns_failure_is_not_shared_the_next_daemon_tries_itself(fleet):
    a, b = fleet.daemons
    fleet.resolver.txt_records["_mta-sts.flaky.example"] = dns.TempDnsError("SERVFAIL")
    assert a.lookup("flaky.example").reason == "dns-error"
    publish(fleet.resolver, fleet.fetcher, "flaky.example", "f1", ENFORCE)
    assert b.lookup("flaky.example").status == "valid"


def test_expired_policies_leave_every_daemons_memory_whoever_purged_the_store(fleet):
    a, b = fleet.daemons
    publish(fleet.resolver, fleet.fetcher, "example.com", "a1", ENFORCE)
    a.lookup("example.com")
    wait_until(lambda: b.cache.peek("example.com") is not None)
    fleet.clock.now += 86401
    a.cache.purge_expired(fleet.clock.now)
    assert fleet.backing.policies.count() == 0
    b.cache.purge_expired(fleet.clock.now)  # the store has nothing left to purge
    assert b.cache.snapshot() == []


def test_a_reload_with_new_timeouts_gives_the_fleet_lock_the_new_time(fleet):
    from stsmilter import config, engine
    disc = fleet.daemons[0]
    engine.reconfigure(disc, config.loads("[dns]\nnameservers = 127.0.0.1\ntimeout = 2\n[fetch]\ntimeout = 7\n"))
    assert disc.fleet.lock_seconds == 2 + 7 + 1.0
    engine.reconfigure(disc, config.loads("[dns]\nnameservers = 127.0.0.1\ntimeout = 3\n[fetch]\ntimeout = 4\n"))
    assert disc.fleet.lock_seconds == 3 + 4 + 1.0
