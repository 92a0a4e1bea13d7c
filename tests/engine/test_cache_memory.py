"""PolicyCache's own rules, one at a time, over a recording in-memory store and a clock
the test moves: what memory keeps (bound, newest first, LRU), what a purge forgets and
for how long it refuses what a lookup begun before it found, negative answers and the
fetch-failure backoff (kept for their TTLs, shared with a fleet), the refresher's
due()/flush() bookkeeping and the gauges. Fast and self-contained (no Discovery, no
sqlite): `make mutate` runs it against cache.py (tests/mutation/mutate.py). What a
failing sqlite store does to the cache: test_cache.py."""

import pytest
from prometheus_client import REGISTRY

from stsmilter.engine import cache as cache_module
from stsmilter.engine.cache import PURGE_MEMORY_SECONDS, RECENT_NEGATIVE_RESULTS, PolicyCache
from stsmilter.engine.policy import FAILED, NONE, Policy, Result
from stsmilter.engine.store import MemoryStore, StoreError, make_entry

DAY = 86400.0
T0 = 1_700_000_000.0


class Clock:
    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now


class Store(MemoryStore):
    """MemoryStore that records calls, can fail a method (faults: name -> exception),
    run a hook before one (hooks: name -> callable(*args)), and share answers like a
    fleet's store when shared=True."""

    def __init__(self, shared=False):
        super().__init__()
        self.shared = shared
        self.calls = []
        self.faults = {}
        self.hooks = {}
        self.answers = {}  # domain -> (Result, ttl)
        self.closed = False
        self.extra_count = 0  # entries other daemons wrote (count() only)

    def _enter(self, name, *args):
        self.calls.append((name,) + args)
        if name in self.hooks:
            self.hooks[name](*args)
        if name in self.faults:
            raise self.faults[name]

    def get(self, domain):
        self._enter("get", domain)
        return super().get(domain)

    def put(self, entry):
        self._enter("put", entry)
        super().put(entry)

    def delete(self, domain):
        self._enter("delete", domain)
        return super().delete(domain)

    def entries(self):
        self._enter("entries")
        return super().entries()

    def count(self):
        self._enter("count")
        return super().count() + self.extra_count

    def due(self, now, interval):
        self._enter("due", now, interval)
        return super().due(now, interval)

    def purge_expired(self, now):
        self._enter("purge_expired", now)
        return super().purge_expired(now)

    def get_answer(self, domain):
        self._enter("get_answer", domain)
        held = self.answers.get(domain)
        return held[0] if held else None

    def put_answer(self, result, ttl):
        self._enter("put_answer", result, ttl)
        self.answers[result.domain] = (result, ttl)

    def close(self):
        self._enter("close")
        self.closed = True

    def named(self, name):
        return [call for call in self.calls if call[0] == name]


def entry(domain, fetched_at=T0, max_age=DAY, mode="enforce", failures=0, checked_at=None, policy_id="i1"):
    mx = () if mode == "none" else (f"mx.{domain}",)
    return make_entry(domain, policy_id, Policy("STSv1", mode, int(max_age), mx), fetched_at, checked_at=checked_at,
                      refresh_failures=failures, last_error="sts-policy-fetch-error" if failures else None)


def none_result(domain, reason="no-txt-record"):
    return Result(domain, NONE, reason=reason)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store():
    return Store()


def make_cache(store, clock, max_entries=100, negative_ttl=60, failure_backoff=300):
    # retry_after 0: a store fault costs one call, the next call tries again
    return PolicyCache(store, max_entries, negative_ttl, failure_backoff, clock=clock, retry_after=0)


@pytest.fixture
def cache(store, clock):
    return make_cache(store, clock)


def domains(entries):
    return sorted(e.domain for e in entries)


# --- load, peek, get


def test_load_keeps_the_newest_entries_up_to_the_bound(store, clock):
    for n, fetched in enumerate([T0 - 50, T0 - 10, T0 - 40, T0 - 20, T0 - 30]):
        store.put(entry(f"d{n}.example", fetched_at=fetched))
    cache = make_cache(store, clock, max_entries=3)
    assert cache.load() == 3
    assert domains(cache.snapshot()) == ["d1.example", "d3.example", "d4.example"]  # fetched 10, 20, 30 s ago
    assert cache.max_entries == 3


def test_load_counts_the_failing_entries_it_read(store, clock):
    store.put(entry("a.example", failures=2))
    store.put(entry("b.example"))
    store.put(entry("none.example", mode="none", failures=1))  # mode none: nothing to fail
    cache = make_cache(store, clock)
    assert cache.load() == 3
    assert cache.count_failing() == 1


def test_load_from_a_store_that_cannot_be_read_holds_nothing(store, clock):
    store.put(entry("a.example"))
    store.faults["entries"] = StoreError("gone")
    cache = make_cache(store, clock)
    assert cache.load() == 0 and cache.snapshot() == []


def test_peek_is_memory_only_and_get_falls_back_to_the_store(cache, store):
    store.put(entry("stored.example"))
    assert cache.peek("stored.example") is None and store.named("get") == []
    got = cache.get("stored.example")
    assert got == entry("stored.example") and store.named("get") == [("get", "stored.example")]
    assert cache.peek("stored.example") is got  # memory keeps what the store had
    assert cache.get("stored.example") is got and len(store.named("get")) == 1
    assert cache.get("unknown.example") is None


def test_memory_is_bounded_least_recently_used_first(store, clock):
    cache = make_cache(store, clock, max_entries=2)
    cache.put(entry("a.example"))
    cache.put(entry("b.example"))
    cache.peek("a.example")  # a is used: b is the least recently used
    cache.put(entry("c.example"))
    assert domains(cache.snapshot()) == ["a.example", "c.example"]
    assert cache.get("b.example") == entry("b.example")  # the store still answers for it


# --- put, delete, forget (a purge) and what a lookup begun before a purge found


def test_put_offers_the_store_first_and_replaces_a_negative_answer(cache, store):
    cache.put_negative(none_result("a.example"))
    cache.put(entry("a.example"))
    assert store.get("a.example") == entry("a.example") and cache.unsaved == 0
    assert cache.negative("a.example") is None
    assert cache.peek("a.example") == entry("a.example")


def test_a_refused_write_is_kept_in_memory_as_unsaved(cache, store):
    store.faults["put"] = StoreError("full")
    cache.put(entry("a.example"))
    assert cache.peek("a.example") == entry("a.example") and cache.unsaved == 1
    del store.faults["put"]
    cache.put(entry("a.example", fetched_at=T0 + 1))  # saved now: nothing waits any more
    assert cache.unsaved == 0


def test_delete_says_whether_memory_or_the_store_held_the_domain(cache, store):
    store.put(entry("store-only.example"))
    store.faults["put"] = StoreError("full")
    cache.put(entry("memory-only.example"))
    del store.faults["put"]
    assert cache.delete("store-only.example") is True
    assert cache.delete("memory-only.example") is True
    assert cache.delete("unknown.example") is False
    assert cache.peek("memory-only.example") is None and store.get("store-only.example") is None


def test_forget_drops_every_trace_of_one_domain_only(cache, store, clock):
    store.faults["put"] = StoreError("full")
    for domain in ("a.example", "b.example"):
        cache.put(entry(domain, failures=1))
        cache.set_backoff(domain, "id2", "sts-webpki-invalid")
    del store.faults["put"]
    cache.put_negative(none_result("n.example"))
    assert cache.forget("a.example") is True
    assert cache.peek("a.example") is None and cache.backoff("a.example", "id2") is None
    assert cache.count_failing() == 1 and cache.unsaved == 1  # b's
    assert cache.peek("b.example") is not None and cache.backoff("b.example", "id2") == "sts-webpki-invalid"
    assert cache.forget("n.example") is False  # held a negative answer, not a policy
    assert cache.negative("n.example") is None
    assert cache.forget("unknown.example") is False


def test_a_policy_found_before_a_purge_is_not_kept(cache, store, clock):
    """A lookup under way when `stsmilter cache purge` ran must not put back what the
    administrator purged; one begun at or after the purge is kept."""
    cache.forget("a.example")  # the purge, at T0
    cache.put(entry("a.example", fetched_at=T0 - 1))
    assert cache.peek("a.example") is None and store.get("a.example") is None  # not even written
    cache.put(entry("a.example", fetched_at=T0))  # fetched at the purge's very second: after it
    assert cache.peek("a.example") == entry("a.example", fetched_at=T0)
    cache.put(entry("b.example", fetched_at=T0 - 1))  # another domain is not concerned
    assert cache.peek("b.example") is not None


def test_a_purge_during_the_stores_write_wins(cache, store, clock):
    store.faults["put"] = StoreError("full")
    cache.put(entry("a.example", fetched_at=T0 - 5))  # unsaved
    del store.faults["put"]
    clock.now = T0 + 1
    store.hooks["put"] = lambda e: cache.forget(e.domain)  # purged while the store wrote it
    cache.put(entry("a.example", fetched_at=T0))
    assert cache.peek("a.example") is None and cache.unsaved == 0


def test_a_purged_entry_coming_back_from_the_store_is_refused(cache, store):
    store.put(entry("a.example", fetched_at=T0 - 10))  # a write-back that raced the purge
    cache.forget("a.example")
    assert cache.get("a.example") is None and cache.peek("a.example") is None
    assert cache.reload("a.example") is None and cache.peek("a.example") is None


def test_a_purge_is_remembered_for_a_day_and_then_forgotten(cache, clock):
    cache.forget("a.example")
    clock.now = T0 + PURGE_MEMORY_SECONDS - 1
    cache.put(entry("a.example", fetched_at=T0 - 1))
    assert cache.peek("a.example") is None
    clock.now = T0 + PURGE_MEMORY_SECONDS
    cache.put(entry("a.example", fetched_at=T0 - 1))
    assert cache.peek("a.example") is not None
    assert PURGE_MEMORY_SECONDS == 86400.0  # longer than any lookup, and than a write-back


def test_forget_all_empties_memory_and_refuses_what_was_found_before(cache, store, clock):
    store.faults["put"] = StoreError("full")
    cache.put(entry("a.example", failures=1))
    cache.put(entry("b.example"))
    del store.faults["put"]
    cache.put_negative(none_result("n.example"))
    cache.negative("n.example")
    cache.set_backoff("c.example", "id1", "sts-policy-fetch-error")
    clock.now = T0 + 10
    assert cache.forget_all() == 2
    assert cache.snapshot() == [] and cache.unsaved == 0 and cache.count_failing() == 0
    assert cache.negative("n.example") is None and cache.backoff("c.example", "id1") is None
    assert cache._negative_results == {}
    cache.put(entry("d.example", fetched_at=T0 + 9))  # begun before the purge
    cache.put_negative(none_result("m.example"), started=T0 + 9)
    cache.set_backoff("e.example", "id1", "x", started=T0 + 9)
    assert cache.peek("d.example") is None and cache.negative("m.example") is None
    assert cache.backoff("e.example", "id1") is None
    cache.put(entry("d.example", fetched_at=T0 + 10))
    assert cache.peek("d.example") is not None


def test_after_forget_all_negative_answers_keep_their_ttl_and_bound(store, clock):
    cache = make_cache(store, clock, max_entries=2, negative_ttl=30)
    cache.forget_all()
    for domain in ("a.example", "b.example", "c.example"):
        cache.put_negative(none_result(domain))
    assert [cache.negative(d) is not None for d in ("a.example", "b.example", "c.example")] == [False, True, True]
    clock.now += 29
    assert cache.negative("c.example") is not None
    clock.now += 1
    assert cache.negative("c.example") is None


def test_snapshot_is_sorted_by_domain(cache):
    for domain in ("c.example", "a.example", "b.example"):
        cache.put(entry(domain))
    assert [e.domain for e in cache.snapshot()] == ["a.example", "b.example", "c.example"]


# --- a store shared with other daemons: reload, stored_answer, resync


def test_reload_takes_the_stores_entry_only_if_it_is_newer(cache, store):
    mine = entry("a.example", fetched_at=T0 - 100)
    cache.put(mine)
    older = entry("a.example", fetched_at=T0 - 200)
    store.put(older)
    assert cache.reload("a.example") is older and cache.peek("a.example") is mine
    same = entry("a.example", fetched_at=T0 - 100)  # equal, not newer: memory keeps its own
    store.put(same)
    assert cache.reload("a.example") is same and cache.peek("a.example") is mine
    confirmed = entry("a.example", fetched_at=T0 - 100, checked_at=T0 - 50)  # same fetch, id confirmed later
    store.put(confirmed)
    assert cache.reload("a.example") is confirmed and cache.peek("a.example") is confirmed
    refetched = entry("a.example", fetched_at=T0 - 10, checked_at=T0 - 60)  # fetched later: newer
    store.put(refetched)
    cache.reload("a.example")
    assert cache.peek("a.example") is refetched
    assert cache.reload("unknown.example") is None


def test_reload_replaces_a_negative_answer_and_tracks_failing(cache, store):
    cache.put_negative(none_result("a.example"))
    store.faults["put"] = StoreError("full")
    cache.put(entry("b.example", fetched_at=T0 - 100))  # unsaved
    del store.faults["put"]
    store.put(entry("a.example", failures=1))
    store.put(entry("b.example", failures=1))
    cache.reload("a.example")
    cache.reload("b.example")
    assert cache.negative("a.example") is None and cache.peek("a.example").refresh_failures == 1
    assert cache.count_failing() == 2
    assert cache.unsaved == 0  # the store holds something newer than what waited


def test_stored_answer_is_the_stores_never_memorys(cache, store):
    cache.put_negative(none_result("a.example"))
    assert cache.stored_answer("a.example") is None
    shared = Result("b.example", FAILED, reason="sts-webpki-invalid", source="cache", policy_id="id1")
    store.answers["b.example"] = (shared, 60)
    assert cache.stored_answer("b.example") is shared


def test_resync_adopts_newer_entries_and_offers_what_the_store_lost(cache, store):
    cache.put(entry("kept.example", fetched_at=T0 - 100))
    cache.put(entry("lost.example", fetched_at=T0 - 100))
    cache.put(entry("stale.example", fetched_at=T0 - 100))
    mine = cache.peek("kept.example")
    store.put(entry("kept.example", fetched_at=T0 - 200))  # the store's copy is older: memory's stays
    store.delete("lost.example")  # a Redis restarted empty
    newer = entry("stale.example", fetched_at=T0 - 10, failures=1)
    store.put(newer)  # another daemon refreshed it meanwhile
    fresh = entry("new.example")
    store.put(fresh)
    assert cache.resync() == 1  # lost.example waits to be written
    assert cache.peek("stale.example") is newer and cache.peek("new.example") is fresh
    assert cache.peek("kept.example") is mine
    assert cache.count_failing() == 1
    assert cache.flush() == 1 and store.get("lost.example") is not None and cache.unsaved == 0


def test_resync_with_memory_full_leaves_new_entries_to_the_store(store, clock):
    store.put(entry("new.example"))  # first in the store's order
    cache = make_cache(store, clock, max_entries=2)
    cache.put(entry("a.example", fetched_at=T0 - 100))
    cache.put(entry("b.example", fetched_at=T0 - 100))
    newer = entry("b.example", fetched_at=T0 - 1)
    store.put(newer)
    assert cache.resync() == 0
    # new.example is skipped, and what comes after it in the store is still looked at
    assert domains(cache.snapshot()) == ["a.example", "b.example"] and cache.peek("b.example") is newer


def test_resync_with_memory_full_still_takes_newer_copies_of_what_it_holds(store, clock):
    cache = make_cache(store, clock, max_entries=2)
    cache.put(entry("a.example", fetched_at=T0 - 100))
    cache.put(entry("b.example", fetched_at=T0 - 100))
    newer = entry("b.example", fetched_at=T0 - 1)
    store.put(newer)
    store.put(entry("new.example"))  # last in the store's order: no room for it
    assert cache.resync() == 0
    assert domains(cache.snapshot()) == ["a.example", "b.example"] and cache.peek("b.example") is newer


def test_resync_refuses_what_was_purged_and_reports_an_unreadable_store(cache, store):
    store.put(entry("a.example", fetched_at=T0 - 10))
    cache.forget("a.example")
    assert cache.resync() == 0 and cache.peek("a.example") is None
    store.faults["entries"] = StoreError("gone")
    assert cache.resync() is None


# --- expiry, the refresher's due() and flush()


def test_purge_expired_drops_what_expired_by_now_from_store_and_memory(cache, store, clock):
    cache.put(entry("gone.example", fetched_at=T0 - 100, max_age=100))  # expires exactly now
    cache.put(entry("kept.example", fetched_at=T0 - 100, max_age=101))
    assert cache.purge_expired(T0) == 1
    assert domains(cache.snapshot()) == ["kept.example"] and domains(store.entries()) == ["kept.example"]


def test_purge_expired_trusts_a_private_store_that_removed_nothing(cache, store):
    cache.put(entry("a.example", fetched_at=T0 - 2 * DAY))  # expired
    store.delete("a.example")
    assert cache.purge_expired(T0) == 0
    assert cache.peek("a.example") is not None and len(store.named("purge_expired")) == 1


def test_purge_expired_in_a_fleet_checks_memory_whatever_the_store_removed(clock):
    store = Store(shared=True)
    cache = make_cache(store, clock)
    cache.put(entry("a.example", fetched_at=T0 - 2 * DAY))
    store.delete("a.example")  # another daemon purged it already
    assert cache.purge_expired(T0) == 0
    assert cache.peek("a.example") is None


def test_purge_expired_counts_memory_when_the_store_fails(cache, store):
    store.faults["put"] = StoreError("full")
    cache.put(entry("a.example", fetched_at=T0 - 2 * DAY))
    cache.put(entry("b.example", fetched_at=T0 - 2 * DAY))
    cache.put(entry("c.example"))
    store.faults["purge_expired"] = StoreError("gone")
    assert cache.purge_expired(T0) == 2 and domains(cache.snapshot()) == ["c.example"]
    assert cache.unsaved == 1


def test_purge_expired_stops_counting_expired_failing_entries(cache, clock):
    cache.put(entry("a.example", fetched_at=T0 - 100, max_age=100, failures=1))
    cache.put(entry("b.example", fetched_at=T0 - 100, max_age=101, failures=1))
    assert cache.count_failing() == 1  # expired exactly now: no longer counted
    cache.purge_expired(T0)
    assert list(cache._failing) == ["b.example"]


def test_due_adds_memorys_newer_entries_for_what_the_store_refused(cache, store):
    cache.put(entry("old.example", fetched_at=T0 - 2 * DAY, max_age=30 * DAY))  # due, saved
    cache.put(entry("refreshed.example", fetched_at=T0 - 2 * DAY, max_age=30 * DAY))  # due in the store...
    store.faults["put"] = StoreError("full")
    cache.put(entry("refreshed.example", fetched_at=T0 - 60, max_age=30 * DAY))  # ...not in memory
    cache.put(entry("memory.example", fetched_at=T0 - 2 * DAY, max_age=30 * DAY))  # due, memory only
    cache.put(entry("fresh.example", fetched_at=T0 - 60, max_age=30 * DAY))
    del store.faults["put"]
    assert domains(cache.due(T0, DAY)) == ["memory.example", "old.example"]
    assert store.named("due") == [("due", T0, DAY)]


def test_due_comes_from_memory_when_the_store_cannot_say(cache, store):
    cache.put(entry("old.example", fetched_at=T0 - 2 * DAY, max_age=30 * DAY))
    cache.put(entry("new.example", fetched_at=T0 - 60, max_age=30 * DAY))
    store.faults["due"] = StoreError("gone")
    assert domains(cache.due(T0, DAY)) == ["old.example"]


def test_due_skips_an_unsaved_domain_memory_no_longer_holds(store, clock):
    cache = make_cache(store, clock, max_entries=1)
    store.faults["put"] = StoreError("full")
    cache.put(entry("a.example", fetched_at=T0 - 2 * DAY, max_age=30 * DAY))
    cache.put(entry("b.example", fetched_at=T0 - 2 * DAY, max_age=30 * DAY))  # a leaves memory
    del store.faults["put"]
    assert domains(cache.due(T0, DAY)) == ["b.example"]


def test_flush_writes_what_the_store_refused_and_stops_at_a_failure(cache, store):
    store.faults["put"] = StoreError("full")
    for domain in ("a.example", "b.example", "c.example"):
        cache.put(entry(domain))
    assert cache.unsaved == 3
    puts = len(store.named("put"))
    assert cache.flush() == 0 and len(store.named("put")) == puts + 1 and cache.unsaved == 3
    del store.faults["put"]
    assert cache.flush() == 3 and cache.unsaved == 0
    assert domains(store.entries()) == ["a.example", "b.example", "c.example"]
    assert cache.flush() == 0


def test_flush_keeps_waiting_for_an_entry_replaced_while_it_wrote(cache, store):
    store.faults["put"] = StoreError("full")
    cache.put(entry("a.example", fetched_at=T0 - 10))
    del store.faults["put"]
    newer = entry("a.example", fetched_at=T0)

    def replace_once(written):
        del store.hooks["put"]
        store.faults["put"] = StoreError("full")
        cache.put(newer)  # refused: the newer one waits
        del store.faults["put"]

    store.hooks["put"] = replace_once
    assert cache.flush() == 1  # the older one was written
    assert cache.unsaved == 1 and cache.peek("a.example") is newer
    assert cache.flush() == 1 and store.get("a.example") == newer and cache.unsaved == 0


def test_flush_forgets_an_unsaved_domain_memory_no_longer_holds(store, clock):
    cache = make_cache(store, clock, max_entries=1)
    store.faults["put"] = StoreError("full")
    cache.put(entry("a.example"))
    cache.put(entry("b.example"))  # a leaves memory, still listed as unsaved
    del store.faults["put"]
    assert cache.flush() == 1 and cache.unsaved == 0
    assert domains(store.entries()) == ["b.example"]


# --- the gauges


def gauge(name):
    return REGISTRY.get_sample_value(name)


def test_count_is_the_larger_of_store_and_memory(cache, store):
    cache.put(entry("a.example"))
    store.extra_count = 5  # other daemons' entries
    assert cache.count() == 6 and gauge("stsmilter_cache_entries") == 6
    store.extra_count = 0
    store.faults["put"] = StoreError("full")
    cache.put(entry("b.example"))
    cache.put(entry("c.example"))
    assert cache.count() == 3  # the store has one, memory three
    store.faults["count"] = StoreError("gone")
    assert cache.count() == 3


def test_count_after_close_does_not_touch_the_store(cache, store):
    cache.put(entry("a.example"))
    cache.close()
    assert store.closed
    calls = len(store.calls)
    assert cache.count() == 1 and len(store.calls) == calls


def test_close_swallows_a_failing_close(cache, store):
    store.faults["close"] = StoreError("gone")
    cache.close()  # nothing left to lose: no exception
    assert cache.count() == 0


def test_count_failing_counts_unexpired_failing_policies(cache, clock):
    cache.put(entry("a.example", failures=1, max_age=60))
    cache.put(entry("b.example", failures=2))
    cache.put(entry("c.example"))
    cache.put(entry("none.example", mode="none", failures=3))
    assert cache.count_failing() == 2 and gauge("stsmilter_refresh_failing_policies") == 2
    clock.now = T0 + 60  # a expires
    assert cache.count_failing() == 1
    cache.put(entry("b.example", fetched_at=T0 + 60))  # refreshed fine
    assert cache.count_failing() == 0


# --- negative answers


def test_a_negative_answer_lasts_negative_ttl(cache, clock):
    cache.put_negative(none_result("a.example", "invalid-txt-record"))
    got = cache.negative("a.example")
    assert got == Result("a.example", NONE, reason="invalid-txt-record", source="cache")
    clock.now += 59
    assert cache.negative("a.example") is got  # one object while nothing changed
    clock.now += 1
    assert cache.negative("a.example") is None
    assert cache.negative("unknown.example") is None


def test_a_negative_answer_without_a_reason_has_none(cache):
    cache.put_negative(Result("a.example", NONE))
    assert cache.negative("a.example") == Result("a.example", NONE, reason=None, source="cache")


def test_a_new_reason_gives_a_new_result(cache):
    cache.put_negative(none_result("a.example", "no-txt-record"))
    first = cache.negative("a.example")
    cache.put_negative(none_result("a.example", "invalid-txt-record"))
    second = cache.negative("a.example")
    assert second is not first and second.reason == "invalid-txt-record"


def test_recent_negative_results_are_bounded(store, clock):
    cache = make_cache(store, clock, max_entries=3 * RECENT_NEGATIVE_RESULTS)
    for n in range(RECENT_NEGATIVE_RESULTS + 1):
        cache.put_negative(none_result(f"d{n}.example"))
    first = cache.negative("d0.example")
    for n in range(1, RECENT_NEGATIVE_RESULTS):
        cache.negative(f"d{n}.example")
        assert cache.negative("d0.example") is first
    assert len(cache._negative_results) == RECENT_NEGATIVE_RESULTS
    last = cache.negative(f"d{RECENT_NEGATIVE_RESULTS}.example")  # one more: start again
    assert len(cache._negative_results) == 1 and cache.negative("d0.example") is not first
    assert last == none_result(f"d{RECENT_NEGATIVE_RESULTS}.example").__class__(
        f"d{RECENT_NEGATIVE_RESULTS}.example", NONE, reason="no-txt-record", source="cache")


def test_negative_answers_are_bounded_by_max_entries(store, clock):
    cache = make_cache(store, clock, max_entries=2)
    for domain in ("a.example", "b.example", "c.example"):
        cache.put_negative(none_result(domain))
    assert [cache.negative(d) is not None for d in ("a.example", "b.example", "c.example")] == [False, True, True]


def test_negative_ttl_zero_keeps_and_shares_nothing(clock):
    store = Store(shared=True)
    cache = make_cache(store, clock, negative_ttl=0)
    cache.put_negative(none_result("a.example"))
    assert cache.negative("a.example") is None and store.named("put_answer") == []


def test_a_negative_answer_is_shared_with_a_fleet_for_its_ttl(clock):
    store = Store(shared=True)
    cache = make_cache(store, clock, negative_ttl=60)
    result = none_result("a.example")
    cache.put_negative(result)
    assert store.named("put_answer") == [("put_answer", result, 60)]
    cache.put_negative(none_result("b.example"), share=False)  # it came from the fleet
    assert len(store.named("put_answer")) == 1 and cache.negative("b.example") is not None


def test_a_private_store_is_not_offered_negative_answers(cache, store):
    cache.put_negative(none_result("a.example"))
    assert store.named("put_answer") == []


def test_a_negative_answer_found_before_a_purge_is_not_kept(cache, clock):
    cache.forget("a.example")  # at T0
    cache.put_negative(none_result("a.example"), started=T0 - 1)
    assert cache.negative("a.example") is None
    cache.put_negative(none_result("a.example"), started=T0)
    assert cache.negative("a.example") is not None
    cache.put_negative(none_result("b.example"), started=T0 - 1)  # another domain
    assert cache.negative("b.example") is not None
    cache.forget("c.example")
    cache.put_negative(none_result("c.example"))  # started unknown: kept
    assert cache.negative("c.example") is not None


# --- fetch failure backoff


def test_a_failed_fetch_backs_off_for_failure_backoff(cache, clock):
    cache.set_backoff("a.example", "id1", "sts-webpki-invalid")
    assert cache.backoff("a.example", "id1") == "sts-webpki-invalid"
    assert cache.backoff("a.example", "id2") is None  # a new id is fetched at once
    assert cache.backoff("b.example", "id1") is None
    clock.now += 299
    assert cache.backoff("a.example", "id1") == "sts-webpki-invalid"
    clock.now += 1
    assert cache.backoff("a.example", "id1") is None


def test_backoff_zero_remembers_and_shares_nothing(clock):
    store = Store(shared=True)
    cache = make_cache(store, clock, failure_backoff=0)
    cache.set_backoff("a.example", "id1", "sts-webpki-invalid")
    assert cache.backoff("a.example", "id1") is None and store.named("put_answer") == []


def test_a_failed_fetch_is_shared_with_a_fleet_for_the_backoff(clock):
    store = Store(shared=True)
    cache = make_cache(store, clock, failure_backoff=300)
    cache.set_backoff("a.example", "id7", "sts-policy-fetch-error")
    expected = Result("a.example", FAILED, reason="sts-policy-fetch-error", source="cache", policy_id="id7")
    assert store.named("put_answer") == [("put_answer", expected, 300)]
    cache.set_backoff("b.example", "id1", "x", share=False)  # it came from the fleet
    assert len(store.named("put_answer")) == 1 and cache.backoff("b.example", "id1") == "x"


def test_a_private_store_is_not_offered_failed_fetches(cache, store):
    cache.set_backoff("a.example", "id1", "x")
    assert store.named("put_answer") == []


def test_a_failed_fetch_begun_before_a_purge_does_not_back_off(clock):
    store = Store(shared=True)
    cache = make_cache(store, clock)
    cache.forget("a.example")  # at T0: the administrator asks for a retry now
    cache.set_backoff("a.example", "id1", "x", started=T0 - 1)
    assert cache.backoff("a.example", "id1") is None and store.named("put_answer") == []
    cache.set_backoff("a.example", "id1", "x", started=T0)
    assert cache.backoff("a.example", "id1") == "x"


def test_backoff_is_bounded_by_max_entries(store, clock):
    cache = make_cache(store, clock, max_entries=2)
    for domain in ("a.example", "b.example", "c.example"):
        cache.set_backoff(domain, "id1", "x")
    assert sum(cache.backoff(d, "id1") is not None for d in ("a.example", "b.example", "c.example")) == 2


def test_the_guard_and_its_rest_come_from_the_store_unless_given(store, clock):
    store.retry_after = 7.0
    assert PolicyCache(store, 10, 60, 300, clock=clock).guard.retry_after == 7.0
    assert PolicyCache(store, 10, 60, 300, clock=clock, retry_after=0.5).guard.retry_after == 0.5
    cache = PolicyCache(store, 10, 60, 300, clock=clock)
    assert cache.guard.store is store and cache.store is store and cache.clock is clock
    assert cache_module.RECENT_NEGATIVE_RESULTS == 1024


# --- found by mutation testing (tests/mutation/mutate.py)


def errors(op):
    return REGISTRY.get_sample_value("stsmilter_store_errors_total", {"op": op}) or 0.0


def _shared_cache(clock):
    store = Store(shared=True)
    return store, make_cache(store, clock)


# Each store call is counted under the op README's metrics table names when it fails.
STORE_CALLS = [
    ("load", "entries", "read", lambda c: c.load()),
    ("get", "get", "read", lambda c: c.get("a.example")),
    ("reload", "get", "read", lambda c: c.reload("a.example")),
    ("stored_answer", "get_answer", "read", lambda c: c.stored_answer("a.example")),
    ("resync", "entries", "read", lambda c: c.resync()),
    ("due", "due", "read", lambda c: c.due(T0, DAY)),
    ("count", "count", "read", lambda c: c.count()),
    ("put", "put", "write", lambda c: c.put(entry("a.example"))),
    ("flush", "put", "write", lambda c: c.flush()),
    ("put_negative", "put_answer", "write", lambda c: c.put_negative(none_result("a.example"))),
    ("set_backoff", "put_answer", "write", lambda c: c.set_backoff("a.example", "id1", "x")),
    ("delete", "delete", "delete", lambda c: c.delete("a.example")),
    ("purge_expired", "purge_expired", "delete", lambda c: c.purge_expired(T0)),
]


@pytest.mark.parametrize("method, op, call", [c[1:] for c in STORE_CALLS], ids=[c[0] for c in STORE_CALLS])
def test_a_failed_store_call_is_counted_under_its_op(clock, method, op, call):
    store, cache = _shared_cache(clock)
    store.faults["put"] = StoreError("full")
    cache.put(entry("b.example"))  # something for flush() to write
    del store.faults["put"]
    before = {name: errors(name) for name in ("read", "write", "delete")}
    store.faults[method] = StoreError("gone")
    call(cache)
    del store.faults[method]  # (reading the registry calls count() for the entries gauge)
    after = {name: errors(name) for name in ("read", "write", "delete")}
    assert {name: after[name] - before[name] for name in after} == {name: float(name == op) for name in after}


def test_a_backoff_under_a_second_lasts_what_it_says(store, clock):
    cache = make_cache(store, clock, failure_backoff=0.5)
    cache.set_backoff("a.example", "id1", "x")
    clock.now += 0.4
    assert cache.backoff("a.example", "id1") == "x"
    clock.now += 0.1
    assert cache.backoff("a.example", "id1") is None


def test_a_one_second_backoff_and_negative_ttl_are_kept_and_shared(clock):
    store = Store(shared=True)
    cache = make_cache(store, clock, negative_ttl=1, failure_backoff=1)
    cache.set_backoff("a.example", "id1", "x")
    cache.put_negative(none_result("b.example"))
    assert cache.backoff("a.example", "id1") == "x" and cache.negative("b.example") is not None
    assert [(call[1].domain, call[2]) for call in store.named("put_answer")] == [("a.example", 1), ("b.example", 1)]


def test_a_newer_entry_refused_by_the_store_during_a_purged_write_still_waits(cache, store, clock):
    """A lookup begun before a purge writes its (purged) entry while a lookup begun after
    the purge puts a newer one that the store refuses: the newer one stays unsaved (the
    refresher writes it), whatever the older write finds when it returns."""
    old, newer = entry("a.example", fetched_at=T0 - 5), entry("a.example", fetched_at=T0 + 1)

    def purge_and_race(_written):
        del store.hooks["put"]
        clock.now = T0
        cache.forget("a.example")
        store.faults["put"] = StoreError("full")
        cache.put(newer)
        del store.faults["put"]

    store.hooks["put"] = purge_and_race
    cache.put(old)
    assert cache.peek("a.example") is newer and cache.unsaved == 1
    assert cache.flush() == 1 and store.get("a.example") == newer


# --- failed lookups remembered for [cache] dns_failure_ttl (failure(), put_failure())
# A TXT lookup that failed (timeout, SERVFAIL) or a policy host that hung is answered
# "failed" from memory for dns_failure_ttl (README "Failures"); memory only, never shared.


def failure_cache(store, clock, failure_ttl=60, max_entries=100):
    return PolicyCache(store, max_entries, 60, 300, clock=clock, retry_after=0, failure_ttl=failure_ttl)


def failed(domain, reason="dns-error"):
    return Result(domain, FAILED, reason=reason, source="cache")


def test_a_failed_lookup_is_remembered_for_dns_failure_ttl(store, clock):
    cache = failure_cache(store, clock, failure_ttl=60)
    assert cache.failure("a.example") is None and cache.count_remembered_failures() == 0
    cache.put_failure("a.example", "dns-error")
    got = cache.failure("a.example")
    assert got == failed("a.example")
    assert cache.failure("b.example") is None
    assert cache.count_remembered_failures() == 1
    assert REGISTRY.get_sample_value("stsmilter_remembered_failures") == 1
    clock.now += 59
    assert cache.failure("a.example") is got  # one object while nothing changed (the socketmap reuses its reply)
    clock.now += 1
    assert cache.failure("a.example") is None and cache.count_remembered_failures() == 0
    assert REGISTRY.get_sample_value("stsmilter_remembered_failures") == 0
    assert [call for call in store.calls if call[0] != "count"] == []  # memory only (count: the gauges)


def test_a_remembered_failure_is_memory_only_in_a_fleet_too(clock):
    store = Store(shared=True)
    cache = failure_cache(store, clock)
    cache.put_failure("a.example", "dns-error")
    assert store.named("put_answer") == [] and cache.failure("a.example") == failed("a.example")


def test_a_new_failure_reason_gives_a_new_result(store, clock):
    cache = failure_cache(store, clock)
    cache.put_failure("a.example", "dns-error")
    first = cache.failure("a.example")
    cache.put_failure("a.example", "sts-policy-fetch-error")  # its policy host hung
    second = cache.failure("a.example")
    assert second is not first and second == failed("a.example", "sts-policy-fetch-error")


def test_dns_failure_ttl_zero_remembers_no_failure(store, clock):
    cache = PolicyCache(store, 100, 60, 300, clock=clock)  # failure_ttl defaults to 0
    cache.put_failure("a.example", "dns-error")
    assert cache.failure("a.example") is None and cache.count_remembered_failures() == 0


def test_remembered_failures_are_bounded_by_max_entries(store, clock):
    cache = failure_cache(store, clock, max_entries=2)
    for domain in ("a.example", "b.example", "c.example"):
        cache.put_failure(domain, "dns-error")
    assert [cache.failure(d) is not None for d in ("a.example", "b.example", "c.example")] == [False, True, True]


def test_failure_answers_and_negative_answers_are_kept_apart(store, clock):
    cache = failure_cache(store, clock)
    cache.put_failure("a.example", "dns-error")
    assert cache.negative("a.example") is None  # a failed lookup is never "none" (RFC 8461 §5.1)
    cache.put_negative(none_result("b.example"))
    assert cache.failure("b.example") is None


def test_an_answer_found_later_ends_the_remembered_failure(store, clock):
    """A policy (fetched or another daemon's) or a "none" answer replaces the failure."""
    cache = failure_cache(store, clock)
    for domain in ("put.example", "none.example", "reloaded.example", "kept.example"):
        cache.put_failure(domain, "dns-error")
    cache.put(entry("put.example"))
    cache.put_negative(none_result("none.example"))
    store.put(entry("reloaded.example"))  # another daemon's fetch
    assert cache.reload("reloaded.example") == entry("reloaded.example")
    assert [cache.failure(d) is None for d in ("put.example", "none.example", "reloaded.example")] == [True] * 3
    assert cache.failure("kept.example") == failed("kept.example")
    assert cache.count_remembered_failures() == 1


def test_a_reload_of_nothing_newer_keeps_the_remembered_failure(store, clock):
    cache = failure_cache(store, clock)
    cache.put(entry("a.example", fetched_at=T0))
    cache.put_failure("a.example", "dns-error")  # its id re-check failed since
    store.put(entry("a.example", fetched_at=T0 - 10))  # the store holds an older copy
    assert cache.reload("a.example") == entry("a.example", fetched_at=T0 - 10)
    assert cache.failure("a.example") == failed("a.example")
    assert cache.reload("unknown.example") is None


def test_a_purge_forgets_the_remembered_failure(store, clock):
    """A purge is how an administrator asks for a retry at once."""
    cache = failure_cache(store, clock)
    cache.put_failure("a.example", "dns-error")
    cache.put_failure("b.example", "dns-error")
    cache.forget("a.example")
    assert cache.failure("a.example") is None and cache.failure("b.example") is not None
    assert cache.count_remembered_failures() == 1


def test_a_failure_found_by_a_lookup_begun_before_a_purge_is_not_remembered(store, clock):
    cache = failure_cache(store, clock)
    cache.forget("a.example")  # at T0
    cache.put_failure("a.example", "dns-error", started=T0 - 1)
    assert cache.failure("a.example") is None
    cache.put_failure("a.example", "dns-error", started=T0)  # begun at the purge's very second: after it
    assert cache.failure("a.example") is not None
    cache.put_failure("b.example", "dns-error", started=T0 - 1)  # another domain
    assert cache.failure("b.example") is not None
    cache.forget("c.example")
    cache.put_failure("c.example", "dns-error")  # started unknown: kept
    assert cache.failure("c.example") is not None


def test_forget_all_forgets_failures_and_later_ones_keep_their_ttl_and_bound(store, clock):
    cache = failure_cache(store, clock, failure_ttl=30, max_entries=2)
    cache.put_failure("old.example", "dns-error")
    cache.failure("old.example")
    clock.now = T0 + 10
    cache.forget_all()
    assert cache.failure("old.example") is None and cache.count_remembered_failures() == 0
    assert cache._failure_results == {}
    cache.put_failure("before.example", "dns-error", started=T0 + 9)  # begun before the purge --all
    assert cache.failure("before.example") is None
    for domain in ("a.example", "b.example", "c.example"):
        cache.put_failure(domain, "dns-error")
    assert [cache.failure(d) is not None for d in ("a.example", "b.example", "c.example")] == [False, True, True]
    clock.now += 29
    assert cache.failure("c.example") is not None
    clock.now += 1
    assert cache.failure("c.example") is None


def test_recent_failure_results_are_bounded(store, clock):
    cache = failure_cache(store, clock, max_entries=3 * RECENT_NEGATIVE_RESULTS)
    for n in range(RECENT_NEGATIVE_RESULTS + 1):
        cache.put_failure(f"d{n}.example", "dns-error")
    first = cache.failure("d0.example")
    for n in range(1, RECENT_NEGATIVE_RESULTS):
        assert cache.failure(f"d{n}.example") is not None
    assert cache.failure("d0.example") is first and len(cache._failure_results) == RECENT_NEGATIVE_RESULTS
    cache.failure(f"d{RECENT_NEGATIVE_RESULTS}.example")  # one more: start again
    assert len(cache._failure_results) == 1 and cache.failure("d0.example") is not first


# --- complete: memory holds every policy the store holds, so get() need not ask it


def test_a_private_store_that_fits_in_memory_is_not_asked_for_what_memory_lacks(store, clock):
    store.put(entry("a.example"))
    cache = make_cache(store, clock, max_entries=2)
    assert cache.complete is False  # before load(): the store may hold anything
    assert cache.get("unknown.example") is None and store.named("get") == [("get", "unknown.example")]
    assert cache.load() == 1
    assert cache.complete
    store.calls.clear()
    assert cache.get("unknown.example") is None and cache.get("a.example") == entry("a.example")
    assert store.named("get") == []


def test_a_store_filling_memory_exactly_is_complete_and_one_more_is_not(clock):
    exact = Store()
    for domain in ("a.example", "b.example"):
        exact.put(entry(domain))
    cache = make_cache(exact, clock, max_entries=2)
    cache.load()
    assert cache.complete
    larger = Store()
    for domain in ("a.example", "b.example", "c.example"):
        larger.put(entry(domain, fetched_at=T0 + len(larger.calls)))
    cache = make_cache(larger, clock, max_entries=2)
    cache.load()
    assert not cache.complete
    larger.calls.clear()
    assert cache.get("unknown.example") is None and larger.named("get") == [("get", "unknown.example")]


def test_a_shared_store_is_never_complete(clock):
    """Other daemons write it: memory cannot know everything it holds."""
    store = Store(shared=True)
    store.put(entry("a.example"))
    cache = make_cache(store, clock)
    cache.load()
    assert not cache.complete
    store.calls.clear()
    assert cache.get("unknown.example") is None and store.named("get") == [("get", "unknown.example")]


def test_a_store_that_cannot_be_read_at_load_is_not_complete(store, clock):
    store.faults["entries"] = StoreError("gone")
    cache = make_cache(store, clock)
    cache.load()
    assert not cache.complete


def test_memory_stops_being_complete_when_a_new_policy_evicts_one(store, clock):
    cache = make_cache(store, clock, max_entries=2)
    cache.load()
    cache.put(entry("a.example"))
    cache.put(entry("b.example"))  # memory full, and it still holds everything
    assert cache.complete
    cache.put(entry("a.example", fetched_at=T0 + 1))  # a domain memory holds: nothing leaves
    assert cache.complete
    cache.put(entry("c.example"))  # b (least recently used) leaves memory, not the store
    assert cache.complete is False
    store.calls.clear()
    assert cache.get("b.example") == entry("b.example") and store.named("get") == [("get", "b.example")]
