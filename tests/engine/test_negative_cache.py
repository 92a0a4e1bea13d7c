"""NegativeCache: domains without a usable TXT record, remembered for negative_ttl, bounded.

The behaviour the old TTLCache gave is pinned here: an entry answers until its TTL has
passed (rounded up to the whole second) and not after; ttl 0 keeps nothing; the bound
holds, and what it drops is the entry closest to its expiry."""

import random

import pytest

from stsmilter.engine.negative_cache import NegativeCache


class Clock:
    """A clock the test moves (not test_discovery's: this file stands alone for make mutate)."""

    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock(1_700_000_000.0)


def test_an_entry_answers_for_its_ttl_and_not_after(clock):
    cache = NegativeCache(100, 60, clock)
    cache.put("a.example", "no-txt-record")
    clock.now += 59.9
    assert cache.get("a.example") == "no-txt-record"
    clock.now += 0.1
    assert cache.get("a.example") is None
    assert cache.get("unknown.example") is None


def test_expiry_is_rounded_up_to_the_second(clock):
    clock.now += 0.25
    cache = NegativeCache(100, 60, clock)
    cache.put("a.example", "invalid-txt-record")
    clock.now += 60.5  # 60.75 s after: still within the second that started at 60 s
    assert cache.get("a.example") == "invalid-txt-record"
    clock.now += 0.25
    assert cache.get("a.example") is None


def test_ttl_zero_keeps_nothing(clock):
    cache = NegativeCache(100, 0, clock)
    cache.put("a.example", "no-txt-record")
    assert cache.get("a.example") is None and len(cache) == 0


def test_expired_entries_leave_memory_at_the_next_put(clock):
    cache = NegativeCache(100, 60, clock)
    for n in range(50):
        cache.put(f"d{n}.example", "no-txt-record")
    clock.now += 59.5
    cache.put("new.example", "no-txt-record")
    assert len(cache) == 51
    clock.now += 0.5  # the first fifty have expired now
    cache.put("newer.example", "no-txt-record")
    assert len(cache) == 2 and len(cache._order) == 3  # their stamp (the same second) and both domains


def test_when_full_the_entry_closest_to_expiry_goes_first(clock):
    cache = NegativeCache(3, 60, clock)
    for name in ("a", "b", "c"):
        cache.put(f"{name}.example", "no-txt-record")
        clock.now += 1
    cache.put("a.example", "no-txt-record")  # put again: a expires last now
    cache.put("d.example", "no-txt-record")
    assert [d for d in ("a", "b", "c", "d") if cache.get(f"{d}.example")] == ["a", "c", "d"]
    assert len(cache) == 3


def test_put_again_takes_the_new_reason_and_expiry(clock):
    cache = NegativeCache(100, 60, clock)
    cache.put("a.example", "no-txt-record")
    clock.now += 30
    cache.put("a.example", "invalid-txt-record")
    clock.now += 59  # 89 s after the first put
    assert cache.get("a.example") == "invalid-txt-record"
    cache.put("other.example", "no-txt-record")  # expires what is due: a's first place is stale
    assert cache.get("a.example") == "invalid-txt-record"


def test_a_forgotten_domain_put_again_is_not_dropped_by_its_old_place(clock):
    cache = NegativeCache(100, 60, clock)
    cache.put("a.example", "no-txt-record")
    assert cache.pop("a.example") == "no-txt-record" and cache.get("a.example") is None
    assert cache.pop("a.example") is None
    clock.now += 30
    cache.put("a.example", "no-txt-record")
    clock.now += 31  # the first put's expiry has passed
    cache.put("b.example", "no-txt-record")
    assert cache.get("a.example") == "no-txt-record"


def test_a_domain_put_again_and_again_does_not_grow_the_order(clock):
    cache = NegativeCache(100, 86400, clock)
    for n in range(50):
        cache.put(f"d{n}.example", "no-txt-record")
    for n in range(10000):  # a forced re-check every 10 s, for a day
        clock.now += 10
        cache.put("hot.example", "no-txt-record" if n % 2 else "invalid-txt-record")
    assert len(cache._order) <= 2 * 100 + 64 + 2
    assert all(cache.get(f"d{n}.example") is None for n in range(50))  # expired meanwhile
    assert cache.get("hot.example") == "no-txt-record" and len(cache) <= 2


def test_compact_keeps_every_live_entry_and_its_expiry(clock):
    cache = NegativeCache(1000, 100, clock)
    for n in range(20):
        cache.put(f"d{n}.example", "no-txt-record")
        cache.put(f"d{n}.example", "invalid-txt-record")  # stale places for compact() to drop
        clock.now += 1
    cache.compact()
    assert len(cache._order) == 40  # one stamp per second, one place per domain
    clock.now += 79  # d0 was put 99 s ago, d19 80 s ago
    assert [cache.get(f"d{n}.example") for n in (0, 19)] == ["invalid-txt-record"] * 2
    clock.now += 1
    cache.put("new.example", "no-txt-record")
    assert cache.get("d0.example") is None and cache.get("d1.example") == "invalid-txt-record"


@pytest.mark.parametrize("seed", range(20))
def test_against_a_model(clock, seed):
    """Random puts, pops and clock steps: every answer is the model's; an entry gone
    before its expiry was dropped for the bound, and it was one closest to expiry."""
    rng = random.Random(seed)
    maxsize, ttl = 8, rng.choice((5, 30, 60.5))
    cache = NegativeCache(maxsize, ttl, clock)
    model = {}  # domain -> (expires, reason)
    domains = [f"d{n}.example" for n in range(20)]
    for _ in range(2000):
        op = rng.random()
        if op < 0.6:
            domain, reason = rng.choice(domains), rng.choice(("no-txt-record", "invalid-txt-record"))
            before = dict(model)
            cache.put(domain, reason)
            expires = float(-(-(clock.now + ttl) // 1))
            model[domain] = (expires, reason)
            live = {d: e for d, e in model.items() if e[0] > clock.now}
            for gone in [d for d in live if cache.get(d) is None]:
                # dropped for the bound: nothing else live was due sooner
                assert gone in before and live[gone][0] <= min(e[0] for d, e in live.items() if d != domain)
                del model[gone]
            assert len(cache) <= maxsize
        elif op < 0.7:
            domain = rng.choice(domains)
            cache.pop(domain)
            model.pop(domain, None)
        else:
            clock.now += rng.choice((0.3, 1, 4, 20))
        for domain in domains:
            expected = model.get(domain)
            assert cache.get(domain) == (expected[1] if expected and expected[0] > clock.now else None)


# --- through PolicyCache, as discovery uses it


def test_policy_cache_hands_out_one_result_per_recently_asked_domain(clock):
    from stsmilter.engine.cache import PolicyCache
    from stsmilter.engine.policy import NONE, Policy, Result
    from stsmilter.engine.store import MemoryStore, make_entry

    cache = PolicyCache(MemoryStore(), 100, negative_ttl=60, failure_backoff=300, clock=clock)
    cache.put_negative(Result("a.example", NONE, reason="no-txt-record"))
    first = cache.negative("a.example")
    assert (first.domain, first.status, first.reason, first.source, first.policy) == (
        "a.example", "none", "no-txt-record", "cache", None)
    assert cache.negative("a.example") is first  # the socketmap reuses its reply for it
    cache.put_negative(Result("a.example", NONE, reason="invalid-txt-record"))
    assert cache.negative("a.example").reason == "invalid-txt-record"
    clock.now += 60
    assert cache.negative("a.example") is None
    cache.put_negative(Result("b.example", NONE, reason="no-txt-record"))
    cache.put(make_entry("b.example", "i1", Policy("STSv1", "enforce", 86400, ("mx.b.example",)), clock.now))
    assert cache.negative("b.example") is None  # a policy replaces the negative answer
    cache.put_negative(Result("c.example", NONE, reason="no-txt-record"))
    cache.delete("c.example")
    assert cache.negative("c.example") is None


# --- found by mutation testing (tests/mutation/mutate.py)


def test_a_ttl_of_one_second_keeps_an_entry(clock):
    cache = NegativeCache(100, 1, clock)
    cache.put("a.example", "no-txt-record")
    assert cache.get("a.example") == "no-txt-record"
    clock.now += 1
    assert cache.get("a.example") is None


def test_the_order_is_compacted_past_twice_the_bound_plus_64_places(clock):
    """A domain put again and again within one second (same stamp) adds one stale place
    each time; compact() runs once the order holds more than 2 * maxsize + 64 places,
    not before (it costs a pass over the whole order)."""
    cache = NegativeCache(10, 60, clock)
    for _ in range(83):
        cache.put("hot.example", "no-txt-record")
    assert len(cache._order) == 1 + 83  # one stamp, 83 places (82 of them stale)
    cache.put("hot.example", "no-txt-record")
    assert len(cache._order) == 2  # 85 > 84: compacted to the stamp and the live place
    assert cache.get("hot.example") == "no-txt-record"


def test_compact_keeps_one_stamp_for_the_domains_sharing_it_and_one_place_per_domain(clock):
    cache = NegativeCache(100, 60, clock)
    for domain in ("a.example", "b.example", "a.example", "c.example"):
        cache.put(domain, "no-txt-record")  # one second, one reason: one stamp
    cache.compact()
    assert len(cache._order) == 4  # the stamp, a, b, c (a's first place was stale)
    cache.put("d.example", "no-txt-record")  # the same stamp: no new one pushed
    assert len(cache._order) == 5
    clock.now += 60
    cache.put("e.example", "no-txt-record")  # all four expire together, the stamp with them
    assert [cache.get(d) for d in ("a.example", "d.example", "e.example")] == [None, None, "no-txt-record"]
    assert len(cache._order) == 2
