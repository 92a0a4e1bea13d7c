"""Discovery under load and failure, over fake DNS and fetch (tests/engine/test_discovery.py's
fakes and clock): remembered failures ([cache] dns_failure_ttl), dead and hanging
destinations that cost only their own time, waiting callers first, and the MX cache.

The same guarantees run against the real daemon, a DNS server that drops queries and a
policy host that hangs in tests/service/test_fairness.py."""

import asyncio
import threading
import time

import pytest
from prometheus_client import REGISTRY

from stsmilter.engine import dns
from stsmilter.engine.cache import PolicyCache
from stsmilter.engine.discovery import Discovery, Settings
from stsmilter.engine.fetch import FetchError, FetchTimeout
from stsmilter.engine.store import MemoryStore
from test_discovery import ENFORCE, Clock, FakeFetcher, FakeResolver, publish

FAILURE_TTL = 60


class DeadResolver(FakeResolver):
    """TXT queries for names in `dead` never get an answer: each waits its lifetime, then
    times out, as a query to a dead name server does."""

    def __init__(self):
        super().__init__()
        self.dead = set()

    async def txt(self, name, lifetime=None):
        if name in self.dead:
            with self.lock:
                self.txt_queries += 1
            try:
                await asyncio.wait_for(asyncio.Event().wait(), lifetime or self.timeout)
            except TimeoutError:
                pass
            raise dns.TempDnsError("timeout")
        return await super().txt(name, lifetime)


class HangingFetcher(FakeFetcher):
    """Fetches for domains in `hanging` take `hang` seconds, then time out."""

    def __init__(self, hang=5.0):
        super().__init__()
        self.hanging, self.hang = set(), hang

    async def fetch(self, domain, deadline=None):
        if domain in self.hanging:
            with self.lock:
                self.fetches += 1
            await asyncio.sleep(self.hang)
            raise FetchTimeout("timeout")
        return await super().fetch(domain, deadline)


def make_world(resolver, fetcher, failure_ttl=FAILURE_TTL, **settings):
    clock = Clock()
    cache = PolicyCache(MemoryStore(), 1000, negative_ttl=60, failure_backoff=300, clock=clock, failure_ttl=failure_ttl)
    settings = Settings(**{"id_check_interval": 300, "refresh_interval": 3600, **settings})
    return clock, Discovery(resolver, fetcher, cache, settings, clock=clock)


@pytest.fixture
def world():
    resolver, fetcher = DeadResolver(), HangingFetcher()
    resolver.timeout = 0.2
    clock, disc = make_world(resolver, fetcher)
    yield clock, resolver, fetcher, disc
    disc.close()


def failures_answered():
    return REGISTRY.get_sample_value("stsmilter_cache_lookups_total", {"result": "failure"}) or 0.0


# --- failed lookups are remembered for dns_failure_ttl

def test_a_failed_txt_lookup_is_answered_without_a_new_query_until_the_ttl_passes(world):
    clock, resolver, fetcher, disc = world
    resolver.txt_records["_mta-sts.dead.example"] = dns.TempDnsError("SERVFAIL")
    r = disc.lookup("dead.example")
    assert (r.status, r.reason) == ("failed", "dns-error") and resolver.txt_queries == 1
    before = failures_answered()
    clock.now += FAILURE_TTL - 1
    for _ in range(3):
        r = disc.lookup("dead.example")
        assert (r.status, r.reason, r.source) == ("failed", "dns-error", "cache")
    assert disc.peek("dead.example").status == "failed"  # the socketmap's fast path knows it too
    assert resolver.txt_queries == 1 and failures_answered() == before + 4
    assert REGISTRY.get_sample_value("stsmilter_remembered_failures") == 1
    clock.now += 2  # the ttl (rounded up to the second) has passed: asked again
    disc.lookup("dead.example")
    assert resolver.txt_queries == 2


def test_a_timeout_is_remembered_like_a_servfail(world):
    clock, resolver, fetcher, disc = world
    resolver.dead.add("_mta-sts.dead.example")
    assert disc.lookup("dead.example", timeout=5).reason == "dns-error"
    assert disc.lookup("dead.example", timeout=5).reason == "dns-error"
    assert resolver.txt_queries == 1


def test_a_remembered_failure_keeps_the_cached_policy_and_skips_its_recheck(world):
    clock, resolver, fetcher, disc = world
    disc.settings = Settings(id_check_interval=300, refresh_interval=3600, recheck_in_background=False)
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    disc.lookup("example.com")
    clock.now += 301
    resolver.txt_records["_mta-sts.example.com"] = dns.TempDnsError("timeout")
    assert disc.lookup("example.com").policy.mode == "enforce"  # the re-check failed: the cache applies
    clock.now += 10
    r = disc.lookup("example.com")
    assert (r.status, r.policy_id, r.policy.mode) == ("valid", "a1", "enforce")
    assert disc.lookup("example.com", force=True).source == "cache"  # a forced re-check too: no refetch, no reject
    assert resolver.txt_queries == 2 and fetcher.fetches == 1
    clock.now += FAILURE_TTL
    resolver.txt_records["_mta-sts.example.com"] = ["v=STSv1; id=a1"]
    disc.lookup("example.com")
    assert resolver.txt_queries == 3


def test_the_daemon_starts_no_background_recheck_while_a_failure_is_remembered(world):
    clock, resolver, fetcher, disc = world
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    disc.lookup("example.com")
    resolver.txt_records["_mta-sts.example.com"] = dns.TempDnsError("timeout")
    clock.now += 301
    assert disc.peek("example.com").policy_id == "a1"  # stale: a background re-check starts, and fails
    deadline = time.monotonic() + 5
    while disc.cache.failure("example.com") is None or disc._jobs:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for _ in range(5):
        assert disc.peek("example.com").policy_id == "a1"
        assert not disc._jobs  # a re-check would be listed at once (submit registers it)
    assert resolver.txt_queries == 2


def test_a_policy_host_that_hangs_is_remembered_and_one_that_refuses_is_not(world):
    clock, resolver, fetcher, disc = world
    fetcher.hang = 0.05
    publish(resolver, fetcher, "hangs.example", "h1", ENFORCE)
    fetcher.hanging.add("hangs.example")
    assert disc.lookup("hangs.example").reason == "sts-policy-fetch-error"
    assert disc.lookup("hangs.example").source == "cache"
    assert (resolver.txt_queries, fetcher.fetches) == (1, 1)  # not even the TXT record is asked again
    publish(resolver, fetcher, "refuses.example", "r1", FetchError("HTTP 500"))
    disc.lookup("refuses.example")
    disc.lookup("refuses.example")  # the backoff (per id) spares the host, but the TXT id is checked
    assert (resolver.txt_queries, fetcher.fetches) == (3, 2)


def test_a_purge_forgets_a_remembered_failure(world):
    clock, resolver, fetcher, disc = world
    resolver.txt_records["_mta-sts.dead.example"] = dns.TempDnsError("SERVFAIL")
    disc.lookup("dead.example")
    disc.cache.forget("dead.example")  # stsmilter cache purge: the administrator wants a retry now
    clock.now += 1
    disc.lookup("dead.example")
    assert resolver.txt_queries == 2


def test_the_refresher_skips_a_domain_whose_lookup_failed_recently(world):
    clock, resolver, fetcher, disc = world
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    disc.lookup("example.com")
    clock.now += 3601
    disc.cache.put_failure("example.com", "dns-error")
    assert disc.refresh_due() == 0
    clock.now += FAILURE_TTL + 1
    assert disc.refresh_due() == 1


def test_dns_failure_ttl_zero_remembers_nothing():
    resolver, fetcher = DeadResolver(), HangingFetcher()
    clock, disc = make_world(resolver, fetcher, failure_ttl=0)
    try:
        resolver.txt_records["_mta-sts.dead.example"] = dns.TempDnsError("SERVFAIL")
        disc.lookup("dead.example")
        disc.lookup("dead.example")
        assert resolver.txt_queries == 2
    finally:
        disc.close()


# --- a dead or hanging destination costs only its own time

def test_hundreds_of_dead_domains_do_not_delay_a_good_one(world):
    clock, resolver, fetcher, disc = world
    resolver.timeout = 3.0
    threads = threading.active_count()
    dead = [f"dead{n}.example" for n in range(600)]
    resolver.dead.update("_mta-sts." + d for d in dead)
    futures = [disc.submit(d, wait=5) for d in dead]
    time.sleep(0.2)
    publish(resolver, fetcher, "good.example", "g1", ENFORCE)
    started = time.monotonic()
    r = disc.lookup("good.example", timeout=5)
    assert r.status == "valid" and time.monotonic() - started < 0.5
    assert threading.active_count() <= threads + 4  # the store threads at most: no thread per lookup
    assert {f.result(10).reason for f in futures} == {"dns-error"}


def test_hanging_policy_hosts_do_not_delay_a_good_one(world):
    clock, resolver, fetcher, disc = world
    hanging = [f"hang{n}.example" for n in range(150)]
    for domain in hanging:
        publish(resolver, fetcher, domain, "h1", ENFORCE)
    fetcher.hanging.update(hanging)
    fetcher.hang = 3.0
    futures = [disc.submit(d, wait=5) for d in hanging]
    time.sleep(0.2)
    publish(resolver, fetcher, "good.example", "g1", ENFORCE)
    started = time.monotonic()
    assert disc.lookup("good.example", timeout=5).status == "valid"
    assert time.monotonic() - started < 0.5
    assert {f.result(10).reason for f in futures} == {"sts-policy-fetch-error"}


def test_at_the_fetch_bound_a_waiting_caller_goes_before_refreshes():
    resolver, fetcher = DeadResolver(), HangingFetcher()
    clock, disc = make_world(resolver, fetcher, max_concurrent=1)
    try:
        for n in range(3):
            publish(resolver, fetcher, f"cached{n}.example", "c1", ENFORCE)
            disc.lookup(f"cached{n}.example")
        clock.now += 3601  # all three are due for a refresh
        fetcher.delay = 0.3
        order = []
        original = fetcher.fetch

        async def noting(domain, deadline=None):
            order.append(domain)
            return await original(domain, deadline)

        fetcher.fetch = noting
        assert disc.refresh_due() == 3
        time.sleep(0.05)  # the first refresh holds the one slot, two wait
        publish(resolver, fetcher, "new.example", "n1", ENFORCE)
        assert disc.lookup("new.example", timeout=5).status == "valid"
        assert order[:2] == ["cached0.example", "new.example"]
    finally:
        disc.close()


# --- the MX cache (Decider's discovery.mx): min(DNS TTL, [cache] mx_ttl), TTL 0 none

@pytest.mark.parametrize("dns_ttl, mx_ttl, cached_for", [
    (120, 300, 120),  # the DNS TTL, under mx_ttl
    (3600, 300, 300),  # mx_ttl caps a long TTL
    (0, 300, 0),  # TTL 0: asked every time
    (300, 0, 0),  # mx_ttl 0: never cached
])
def test_mx_sets_are_cached_for_the_shorter_of_the_dns_ttl_and_mx_ttl(dns_ttl, mx_ttl, cached_for):
    resolver, fetcher = DeadResolver(), HangingFetcher()
    clock, disc = make_world(resolver, fetcher, mx_ttl=mx_ttl)
    try:
        resolver.mx_sets["example.com"] = dns.MxSet(hosts=("mx1.example.com",), ttl=dns_ttl)
        start = clock.now
        assert disc.mx("example.com", 1.0).hosts == ("mx1.example.com",)
        resolver.mx_sets["example.com"] = dns.MxSet(hosts=("mx2.example.com",), ttl=dns_ttl)  # the domain moves
        if cached_for:
            clock.now = start + cached_for - 0.5
            assert disc.mx("example.com", 1.0).hosts == ("mx1.example.com",)
            assert resolver.mx_queries == 1
        clock.now = start + cached_for
        assert disc.mx("example.com", 1.0).hosts == ("mx2.example.com",)
        assert resolver.mx_queries == 2
    finally:
        disc.close()


def test_an_mx_lookup_that_fails_is_not_cached(world):
    clock, resolver, fetcher, disc = world
    resolver.mx_sets["example.com"] = dns.TempDnsError("SERVFAIL")
    with pytest.raises(dns.TempDnsError):
        disc.mx("example.com", 1.0)
    resolver.mx_sets["example.com"] = dns.MxSet(hosts=("mx1.example.com",), ttl=300)
    assert disc.mx("example.com", 1.0).hosts == ("mx1.example.com",)
    assert resolver.mx_queries == 2
