"""A full NegativeCache (negative answers, remembered failures) forgets one entry per new
one, the one closest to its expiry, and nothing else.

negative_cache.py: "when the cache is full the entry closest to its expiry is the one
forgotten". The bug these pin (found while testing cache.py's failure memory): the
bound's _pop_left(None) popped the leftmost stamp and one domain, and the next
_pop_left(now) (the next put, or count(): every scrape of stsmilter_remembered_failures)
then dropped the other domains of that stamp (put in the same second with the same
reason) as if expired. Under a flood of dead domains the failure memory of issue 19
forgot most of what it held, and those domains were asked again at once."""

from stsmilter.engine.cache import PolicyCache
from stsmilter.engine.negative_cache import NegativeCache
from stsmilter.engine.store import MemoryStore

T0 = 1_700_000_000.0


class Clock:
    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now


def test_a_full_cache_forgets_one_entry_per_new_domain():
    clock = Clock()
    cache = NegativeCache(3, 60, clock)
    for name in "abcd":  # one second, one reason: one stamp
        cache.put(f"{name}.example", "no-txt-record")
    assert [cache.get(f"{n}.example") is not None for n in "abcd"] == [False, True, True, True]
    cache.put("e.example", "no-txt-record")  # full: b (closest to expiry, put first) goes
    assert [cache.get(f"{n}.example") is not None for n in "abcde"] == [False, False, True, True, True]


def test_counting_a_full_cache_forgets_nothing_unexpired():
    clock = Clock()
    cache = NegativeCache(2, 60, clock)
    for name in "abc":
        cache.put(f"{name}.example", "no-txt-record")
    assert cache.count() == 2
    assert cache.get("c.example") == "no-txt-record"


def test_a_scrape_of_the_remembered_failures_gauge_keeps_them():
    """[cache] dns_failure_ttl at its bound (max_entries): reading the gauge must not make
    the daemon ask dead name servers again."""
    clock = Clock()
    cache = PolicyCache(MemoryStore(), 2, 60, 300, clock=clock, failure_ttl=60)
    for name in "abc":
        cache.put_failure(f"{name}.example", "dns-error")
    assert cache.count_remembered_failures() == 2
    assert cache.failure("c.example") is not None
