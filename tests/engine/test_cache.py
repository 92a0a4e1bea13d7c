"""PolicyCache over a failing store: memory decides, the store only remembers.

The store here is a real SqliteStore wrapped in a fake that raises what sqlite raises
on a full disk, a read-only file system or a held lock (sqlite3.OperationalError), or a
StoreError; the daemon-level tests with a real full tmpfs are in test_store_faults.py."""

import logging
import sqlite3
import time

import pytest
from prometheus_client import REGISTRY

from stsmilter.engine.cache import PolicyCache
from stsmilter.engine.discovery import Discovery, Settings
from stsmilter.engine.fetch import FetchError
from stsmilter.engine.policy import Policy
from stsmilter.engine.store import SqliteStore, StoreError, make_entry
from test_discovery import ENFORCE, Clock, FakeFetcher, FakeResolver, publish

FULL = sqlite3.OperationalError("database or disk is full")
DAY = 86400.0


class FaultyStore:
    """Delegates to a real store; methods named in `faults` raise instead."""

    def __init__(self, inner):
        self.inner = inner
        self.faults = {}  # method name -> exception
        self.calls = []

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args):
            self.calls.append(name)
            if name in self.faults:
                raise self.faults[name]
            return attr(*args)

        return call


def errors(op):
    return REGISTRY.get_sample_value("stsmilter_store_errors_total", {"op": op})


def entry(domain, clock, mode="enforce", failures=0, fetched_ago=0.0, max_age=DAY):
    mx = () if mode == "none" else (f"mx.{domain}",)
    return make_entry(domain, "i1", Policy("STSv1", mode, int(max_age), mx), clock.now - fetched_ago,
                      refresh_failures=failures, last_error="sts-policy-fetch-error" if failures else None)


@pytest.fixture
def clock():
    return Clock(time.time())


@pytest.fixture
def store(tmp_path, clock):
    s = FaultyStore(SqliteStore(str(tmp_path / "cache.sqlite"), clock=clock))
    yield s
    s.inner.close()


@pytest.fixture
def cache(store, clock):
    return PolicyCache(store, 1000, negative_ttl=60, failure_backoff=300, clock=clock, retry_after=30)


def store_lines(caplog):
    return [r for r in caplog.records if r.name == "stsmilter.store"]


def test_a_refused_write_keeps_the_policy_in_memory_counted_and_logged_once(cache, store, clock, caplog):
    store.faults["put"] = FULL
    before = errors("write")
    with caplog.at_level(logging.WARNING, "stsmilter.store"):
        for n in range(20):
            cache.put(entry(f"d{n}.example", clock))
    assert [cache.get(f"d{n}.example").policy.mode for n in range(20)] == ["enforce"] * 20
    # One failure, then the store rests for retry_after: not one error per policy.
    assert errors("write") == before + 1 and store.calls.count("put") == 1
    lines = store_lines(caplog)
    assert len(lines) == 1 and lines[0].exc_info is None
    assert "write failed: database or disk is full" in lines[0].getMessage()
    assert cache.unsaved == 20 and cache.count() == 20  # the gauge counts what memory holds


def test_the_refresher_writes_refused_entries_once_the_store_takes_them(cache, store, clock):
    store.faults["put"] = FULL
    for n in range(3):
        cache.put(entry(f"d{n}.example", clock))
    assert cache.flush() == 0  # the store still rests
    del store.faults["put"]
    cache._guard._resume_at = 0  # retry_after has passed
    assert cache.flush() == 3 and cache.unsaved == 0
    assert sorted(e.domain for e in store.inner.entries()) == ["d0.example", "d1.example", "d2.example"]


def test_flush_stops_at_the_first_refusal(cache, store, clock):
    store.faults["put"] = FULL
    for n in range(5):
        cache.put(entry(f"d{n}.example", clock))
    cache._guard._resume_at = 0
    cache._guard.retry_after = 0  # even a store that may be retried at once is not hammered
    calls = store.calls.count("put")
    assert cache.flush() == 0 and store.calls.count("put") == calls + 1 and cache.unsaved == 5


@pytest.mark.parametrize("fault", [FULL, sqlite3.OperationalError("disk I/O error"),
                                   StoreError("attempt to write a readonly database", "SQLITE_READONLY"),
                                   RuntimeError("a bug in a backend")])
def test_reads_that_fail_answer_from_memory(cache, store, clock, fault):
    cache.put(entry("a.example", clock))
    before = errors("read")  # (collecting metrics asks the store for its count: before the faults)
    for method in ("get", "entries", "count", "due", "purge_expired"):
        store.faults[method] = fault
    assert cache.get("a.example").policy.mode == "enforce"
    assert cache.get("unknown.example") is None  # a miss, not an exception
    assert cache.count() == 1
    assert errors("read") == before + 1


def test_a_miss_in_memory_is_looked_up_in_the_store_and_kept(cache, store, clock):
    store.inner.put(entry("evicted.example", clock))  # e.g. beyond max_entries at load
    assert cache.peek("evicted.example") is None
    assert cache.get("evicted.example").policy.mode == "enforce"
    assert cache.peek("evicted.example") is not None  # memory has it now
    assert store.calls.count("get") == 1


def test_due_comes_from_memory_when_the_store_cannot_say(cache, store, clock):
    cache.put(entry("old.example", clock, fetched_ago=2 * DAY, max_age=30 * DAY))
    cache.put(entry("new.example", clock, fetched_ago=60, max_age=30 * DAY))
    store.faults["due"] = sqlite3.OperationalError("database is locked")
    assert [e.domain for e in cache.due(clock.now, DAY)] == ["old.example"]


def test_due_prefers_memory_for_what_the_store_refused(cache, store, clock):
    cache.put(entry("a.example", clock, fetched_ago=2 * DAY, max_age=30 * DAY))  # due, saved
    store.faults["put"] = FULL
    cache.put(entry("a.example", clock, fetched_ago=0, max_age=30 * DAY))  # refreshed; store refused
    cache.put(entry("b.example", clock, fetched_ago=2 * DAY, max_age=30 * DAY))  # due, memory only
    del store.faults["put"]
    assert sorted(e.domain for e in cache.due(clock.now, DAY)) == ["b.example"]


def test_purge_when_the_store_fails_still_empties_memory(cache, store, clock):
    cache.put(entry("gone.example", clock, fetched_ago=2 * DAY, max_age=DAY))
    cache.put(entry("kept.example", clock))
    store.faults["purge_expired"] = FULL
    assert cache.purge_expired(clock.now) == 1
    assert cache.peek("gone.example") is None and cache.peek("kept.example") is not None


def test_load_that_fails_starts_empty_and_logs_one_line(store, clock, caplog):
    store.faults["entries"] = sqlite3.DatabaseError("database disk image is malformed")
    cache = PolicyCache(store, 1000, 60, 300, clock=clock)
    with caplog.at_level(logging.WARNING, "stsmilter.store"):
        assert cache.load() == 0
    assert len(store_lines(caplog)) == 1


def test_failing_gauge_follows_each_refresh_at_once(cache, clock):
    def gauge():
        return REGISTRY.get_sample_value("stsmilter_refresh_failing_policies")

    cache.put(entry("a.example", clock))
    cache.put(entry("none.example", clock, mode="none", failures=2))
    assert gauge() == 0
    cache.put(entry("a.example", clock, failures=1))
    assert gauge() == 1
    cache.put(entry("a.example", clock))
    assert gauge() == 0
    cache.put(entry("b.example", clock, failures=3, max_age=60))
    assert gauge() == 1
    clock.now += 61  # expired: no longer counted, and no longer held once purged
    assert gauge() == 0
    cache.purge_expired(clock.now)
    assert cache._failing == {}


def test_failing_entries_are_counted_from_the_store_at_load(store, clock):
    store.inner.put(entry("a.example", clock, failures=2))
    store.inner.put(entry("b.example", clock))
    cache = PolicyCache(store, 1000, 60, 300, clock=clock)
    cache.load()
    assert REGISTRY.get_sample_value("stsmilter_refresh_failing_policies") == 1


def test_the_store_is_tried_again_after_retry_after(store, clock):
    cache = PolicyCache(store, 1000, 60, 300, clock=clock, retry_after=0.2)
    store.faults["put"] = FULL
    cache.put(entry("a.example", clock))
    cache.put(entry("b.example", clock))
    assert store.calls.count("put") == 1
    del store.faults["put"]
    time.sleep(0.25)
    cache.put(entry("c.example", clock))
    assert store.calls.count("put") == 2 and store.inner.get("c.example") is not None


def test_the_store_says_how_long_the_guard_rests(store, clock):
    store.retry_after = 5.0  # as a network store (Redis) does: it comes back by itself
    assert PolicyCache(store, 1000, 60, 300, clock=clock).guard.retry_after == 5.0
    assert PolicyCache(store, 1000, 60, 300, clock=clock, retry_after=0.2).guard.retry_after == 0.2


# --- through Discovery: the answer never depends on the store


@pytest.fixture
def world(cache, clock):
    resolver, fetcher = FakeResolver(), FakeFetcher()
    disc = Discovery(resolver, fetcher, cache, Settings(refresh_interval=3600, recheck_in_background=False),
                     clock=clock)
    yield resolver, fetcher, disc
    disc.close()


def test_a_fetched_policy_applies_when_the_store_refuses_it(world, store, caplog):
    resolver, fetcher, disc = world
    store.faults["put"] = FULL
    store.faults["get"] = FULL
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    with caplog.at_level(logging.INFO):
        r = disc.lookup("example.com")
        again = disc.lookup("example.com")
    assert (r.status, r.source, r.policy.mode) == ("valid", "fetched", "enforce")
    assert (again.status, again.source, again.policy.mode) == ("valid", "cache", "enforce")
    assert not [rec for rec in caplog.records if rec.exc_info]  # no traceback anywhere


def test_the_refresher_refreshes_from_memory_when_the_store_cannot_be_read(world, store, clock):
    resolver, fetcher, disc = world
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    disc.lookup("example.com")
    for method in ("due", "purge_expired", "entries", "get", "put"):
        store.faults[method] = sqlite3.OperationalError("disk I/O error")
    clock.now += 3601
    fetcher.bodies["example.com"] = FetchError("HTTP 503")
    assert disc.refresh_due() == 1
    deadline = time.monotonic() + 5
    while disc.cache.peek("example.com").refresh_failures == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    # The failure shows in the gauge as soon as the refresh has failed, not a pass later.
    assert REGISTRY.get_sample_value("stsmilter_refresh_failing_policies") == 1
    assert disc.cache.peek("example.com").policy.mode == "enforce"


def test_a_refresher_pass_writes_what_the_store_refused(world, store):
    resolver, fetcher, disc = world
    store.faults["put"] = FULL
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    disc.lookup("example.com")
    assert store.inner.get("example.com") is None
    del store.faults["put"]
    disc.cache._guard._resume_at = 0  # the store's rest is over
    disc.refresh_due()
    assert store.inner.get("example.com").policy.mode == "enforce" and disc.cache.unsaved == 0


# --- memory that holds the whole store spares discovery a store read per new domain

def test_a_store_that_fit_in_memory_is_not_asked_for_what_memory_lacks(store, clock):
    for n in range(3):
        store.inner.put(entry(f"d{n}.example", clock))
    cache = PolicyCache(store, 100, negative_ttl=60, failure_backoff=300, clock=clock)
    assert cache.load() == 3 and cache.complete
    assert cache.get("d1.example").policy.mode == "enforce"
    assert cache.get("never-seen.example") is None
    assert store.calls.count("get") == 0


def test_a_store_larger_than_memory_is_asked(store, clock):
    for n in range(120):  # the 20 oldest stay in the store only
        store.inner.put(entry(f"d{n}.example", clock, fetched_ago=120 - n))
    cache = PolicyCache(store, 100, negative_ttl=60, failure_backoff=300, clock=clock)
    assert cache.load() == 100 and not cache.complete
    assert cache.peek("d0.example") is None and cache.get("d0.example") is not None
    assert store.calls.count("get") == 1


def test_the_first_eviction_makes_memory_incomplete(store, clock):
    cache = PolicyCache(store, 100, negative_ttl=60, failure_backoff=300, clock=clock)
    cache.load()
    for n in range(100):
        cache.put(entry(f"d{n}.example", clock))
    assert cache.complete
    cache.put(entry("d0.example", clock))  # replacing one evicts nothing
    assert cache.complete
    cache.put(entry("one-more.example", clock))  # the least recently used goes: the store still has it
    assert not cache.complete
    assert cache.get("d1.example").domain == "d1.example" and store.calls.count("get") == 1


def test_after_a_failed_load_the_store_is_always_asked(store, clock):
    store.faults["entries"] = FULL
    cache = PolicyCache(store, 100, negative_ttl=60, failure_backoff=300, clock=clock, retry_after=0)
    cache.load()
    assert not cache.complete
    cache.get("anything.example")
    assert store.calls.count("get") == 1
