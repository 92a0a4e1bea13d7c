"""Discovery rules (RFC 8461 §3.3, §5.1) over fake DNS and fetch, with a fake clock.

The same rules run against real DNS and HTTPS servers in test_engine_integration.py;
here fakes keep every case fast and let the clock jump."""

import asyncio
import threading
import time

import pytest
from prometheus_client import REGISTRY

from stsmilter.engine import dns
from stsmilter.engine.cache import PolicyCache
from stsmilter.engine.discovery import Discovery, Settings
from stsmilter.engine.fetch import FetchError, WebPkiError
from stsmilter.engine.store import Entry, MemoryStore, SqliteStore

ENFORCE = b"version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 86400\n"
TESTING = b"version: STSv1\nmode: testing\nmx: *.example.com\nmax_age: 86400\n"
NONE_POLICY = b"version: STSv1\nmode: none\nmax_age: 86400\n"


class Clock:
    def __init__(self, now=1_700_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


class FakeResolver:
    def __init__(self):
        self.txt_records = {}  # name -> list[str] | exception
        self.txt_ttls = {}  # name -> TTL of its TXT answer (default: 3600, above id_check_interval)
        self.txt_queries = 0
        self.mx_sets = {}  # domain -> MxSet | exception (default: mx.<domain>, TTL 300)
        self.mx_queries = 0
        self.delay = 0.0
        self.timeout = 5.0
        self.lock = threading.Lock()

    async def txt(self, name, lifetime=None):
        with self.lock:
            self.txt_queries += 1
        await asyncio.sleep(self.delay)
        value = self.txt_records.get(name, dns.NoRecord("NXDOMAIN"))
        if isinstance(value, Exception):
            raise value
        return dns.TxtSet(tuple(value), self.txt_ttls.get(name, 3600))

    async def mx(self, domain, lifetime=None):
        with self.lock:
            self.mx_queries += 1
        value = self.mx_sets.get(domain, dns.MxSet(hosts=("mx." + domain,), ttl=300, null_mx=False))
        if isinstance(value, Exception):
            raise value
        return value


class FakeFetcher:
    def __init__(self):
        self.bodies = {}  # domain -> bytes | exception
        self.fetches = 0
        self.delay = 0.0
        self.lock = threading.Lock()

    async def fetch(self, domain, deadline=None):
        with self.lock:
            self.fetches += 1
        await asyncio.sleep(self.delay)
        value = self.bodies.get(domain, FetchError("HTTP 404"))
        if isinstance(value, Exception):
            raise value
        return value


@pytest.fixture
def world():
    clock = Clock()
    resolver, fetcher = FakeResolver(), FakeFetcher()
    cache = PolicyCache(MemoryStore(), 1000, negative_ttl=60, failure_backoff=300, clock=clock)
    # The rules are easiest to see with the re-check waited for (as the CLI does); the
    # daemon's background re-check has its own test below.
    settings = Settings(id_check_interval=300, refresh_interval=3600, recheck_in_background=False)
    disc = Discovery(resolver, fetcher, cache, settings, clock=clock)
    yield clock, resolver, fetcher, disc
    disc.close()


def publish(resolver, fetcher, domain, policy_id, body):
    resolver.txt_records["_mta-sts." + domain] = [f"v=STSv1; id={policy_id}"]
    fetcher.bodies[domain] = body


def test_first_lookup_fetches_then_cache_answers_without_network(world):
    clock, resolver, fetcher, disc = world
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    r = disc.lookup("example.com")
    assert (r.status, r.source, r.policy_id, r.policy.mode) == ("valid", "fetched", "a1", "enforce")
    assert r.expires == clock.now + 86400
    clock.now += 100
    r = disc.lookup("example.com")
    assert (r.status, r.source) == ("valid", "cache")
    assert (resolver.txt_queries, fetcher.fetches) == (1, 1)


def test_unchanged_id_is_rechecked_without_fetching(world):
    clock, resolver, fetcher, disc = world
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    disc.lookup("example.com")
    clock.now += 301  # id check due
    r = disc.lookup("example.com")
    assert (r.status, r.source, r.policy_id) == ("valid", "cache", "a1")
    assert (resolver.txt_queries, fetcher.fetches) == (2, 1)


def test_new_id_triggers_a_fetch(world):
    clock, resolver, fetcher, disc = world
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    disc.lookup("example.com")
    clock.now += 301
    publish(resolver, fetcher, "example.com", "a2", TESTING)
    r = disc.lookup("example.com")
    assert (r.source, r.policy_id, r.policy.mode) == ("fetched", "a2", "testing")
    assert fetcher.fetches == 2


def test_failed_fetch_keeps_cached_policy_until_it_expires(world):
    clock, resolver, fetcher, disc = world
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    disc.lookup("example.com")
    clock.now += 301
    publish(resolver, fetcher, "example.com", "a2", WebPkiError("certificate verify failed"))
    r = disc.lookup("example.com")
    assert (r.status, r.policy_id, r.policy.mode) == ("valid", "a1", "enforce")
    clock.now = r.expires + 1  # expired, and the fetch still fails
    r = disc.lookup("example.com")
    assert (r.status, r.reason, r.policy) == ("failed", "sts-webpki-invalid", None)


def test_cached_policy_survives_a_vanished_txt_record(world):
    clock, resolver, fetcher, disc = world
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    disc.lookup("example.com")
    del resolver.txt_records["_mta-sts.example.com"]
    clock.now += 301
    r = disc.lookup("example.com")
    assert (r.status, r.policy_id, r.policy.mode) == ("valid", "a1", "enforce")


def test_fetched_mode_none_replaces_the_cached_policy_at_once(world):
    clock, resolver, fetcher, disc = world
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    disc.lookup("example.com")
    clock.now += 301
    publish(resolver, fetcher, "example.com", "off", NONE_POLICY)
    r = disc.lookup("example.com")
    assert (r.status, r.policy_id, r.policy.mode) == ("valid", "off", "none")
    assert disc.lookup("example.com").policy.mode == "none"


@pytest.mark.parametrize(
    "txt, reason",
    [
        (dns.NoRecord("NXDOMAIN"), "no-txt-record"),
        (["v=STSv1; id=a", "v=STSv1; id=b"], "invalid-txt-record"),
        (["v=STSv10; id=a"], "no-txt-record"),
        (["v=STSv1; id=this-is-not-valid"], "invalid-txt-record"),
    ],
)
def test_no_usable_record_is_none_and_negatively_cached(world, txt, reason):
    clock, resolver, fetcher, disc = world
    resolver.txt_records["_mta-sts.example.com"] = txt
    r = disc.lookup("example.com")
    assert (r.status, r.reason, r.source) == ("none", reason, None)
    assert disc.lookup("example.com").source == "cache"
    assert resolver.txt_queries == 1
    clock.now += 61  # negative_ttl over
    disc.lookup("example.com")
    assert resolver.txt_queries == 2
    assert fetcher.fetches == 0


def test_dns_failure_is_failed_never_none_and_not_cached(world):
    clock, resolver, fetcher, disc = world
    resolver.txt_records["_mta-sts.example.com"] = dns.TempDnsError("SERVFAIL")
    r = disc.lookup("example.com")
    assert (r.status, r.reason) == ("failed", "dns-error")
    disc.lookup("example.com")
    assert resolver.txt_queries == 2


def test_a_resolver_outage_logs_one_txt_failure_line_a_minute(world, caplog):
    clock, resolver, fetcher, disc = world
    domains = [f"d{n}.example" for n in range(5)]
    for domain in domains:
        resolver.txt_records["_mta-sts." + domain] = dns.TempDnsError("SERVFAIL")
    caplog.set_level("INFO", logger="stsmilter.discovery")
    for domain in domains:
        assert disc.lookup(domain).reason == "dns-error"
    lines = [r.getMessage() for r in caplog.records if "TXT lookup" in r.getMessage()]
    assert lines == ["TXT lookup for _mta-sts.d0.example failed: SERVFAIL"]
    clock.now += 59
    disc.lookup(domains[1])
    assert len([r for r in caplog.records if "TXT lookup" in r.getMessage()]) == 1
    clock.now += 2
    disc.lookup(domains[2])
    lines = [r.getMessage() for r in caplog.records if "TXT lookup" in r.getMessage()]
    assert lines[1:] == ["TXT lookup for _mta-sts.d2.example failed: SERVFAIL"
                         " (5 more TXT lookup failures since the last such line)"]


def test_dns_failure_with_cached_policy_uses_the_cache(world):
    clock, resolver, fetcher, disc = world
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    disc.lookup("example.com")
    clock.now += 301
    resolver.txt_records["_mta-sts.example.com"] = dns.TempDnsError("timeout")
    r = disc.lookup("example.com")
    assert (r.status, r.policy.mode) == ("valid", "enforce")


def test_failed_fetch_is_not_retried_for_the_same_id_within_backoff(world):
    clock, resolver, fetcher, disc = world
    publish(resolver, fetcher, "example.com", "a1", FetchError("HTTP 500"))
    assert disc.lookup("example.com").reason == "sts-policy-fetch-error"
    clock.now += 299
    r = disc.lookup("example.com")
    assert (r.status, r.reason, fetcher.fetches) == ("failed", "sts-policy-fetch-error", 1)
    publish(resolver, fetcher, "example.com", "a2", ENFORCE)  # a new id is fetched at once
    assert disc.lookup("example.com").status == "valid"
    assert fetcher.fetches == 2


def test_backoff_ends_after_five_minutes(world):
    clock, resolver, fetcher, disc = world
    publish(resolver, fetcher, "example.com", "a1", b"version: STSv1\nmode: enforce\nmax_age: 1\n")
    assert disc.lookup("example.com").reason == "sts-policy-invalid"
    clock.now += 301
    fetcher.bodies["example.com"] = ENFORCE
    assert disc.lookup("example.com").status == "valid"
    assert fetcher.fetches == 2


def test_single_flight_and_pending(world):
    clock, resolver, fetcher, disc = world
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    fetcher.delay = 0.5
    results = []
    threads = [threading.Thread(target=lambda: results.append(disc.lookup("example.com", timeout=5))) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {r.status for r in results} == {"valid"}
    assert (resolver.txt_queries, fetcher.fetches) == (1, 1)


def test_pending_past_the_deadline_and_the_job_fills_the_cache(world):
    clock, resolver, fetcher, disc = world
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    fetcher.delay = 0.4
    started = time.monotonic()
    r = disc.lookup("example.com", timeout=0.05)
    assert r.status == "pending"
    assert time.monotonic() - started < 0.3
    disc.submit("example.com").result(timeout=5)
    assert disc.peek("example.com").policy.mode == "enforce"


def test_force_refetches_unless_just_fetched(world):
    clock, resolver, fetcher, disc = world
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    disc.lookup("example.com")
    assert disc.lookup("example.com", force=True).source == "fetched"
    assert fetcher.fetches == 1  # fetched under a minute ago counts as fresh
    clock.now += 120
    r = disc.lookup("example.com", force=True)
    assert (r.source, fetcher.fetches) == ("fetched", 2)


def test_force_with_failing_fetch_returns_the_cached_policy_as_cache(world):
    clock, resolver, fetcher, disc = world
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    disc.lookup("example.com")
    clock.now += 120
    fetcher.bodies["example.com"] = FetchError("timeout")
    assert disc.lookup("example.com", force=True).source == "cache"


def test_peek_never_blocks_and_starts_a_background_recheck(world):
    clock, resolver, fetcher, disc = world
    assert disc.peek("example.com") is None
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    disc.lookup("example.com")
    clock.now += 301
    publish(resolver, fetcher, "example.com", "a2", TESTING)
    assert disc.peek("example.com").policy_id == "a1"  # still valid, answered at once
    disc.submit("example.com").result(timeout=5)
    assert disc.peek("example.com").policy_id == "a2"


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _failing():
    return REGISTRY.get_sample_value("stsmilter_refresh_failing_policies")


def test_refresher_refreshes_due_policies_and_tracks_failures(world):
    clock, resolver, fetcher, disc = world
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    publish(resolver, fetcher, "other.example", "b1", NONE_POLICY)
    disc.lookup("example.com")
    disc.lookup("other.example")
    assert disc.refresh_due() == 0
    clock.now += 3601
    fetcher.bodies["example.com"] = FetchError("HTTP 503")
    fetcher.bodies["other.example"] = FetchError("HTTP 503")
    assert disc.refresh_due() == 2
    # The gauge follows each refresh as it ends: no further refresher pass is needed.
    wait_for(lambda: disc.cache.peek("other.example").refresh_failures == 1 and _failing() == 1)
    entry = disc.cache.get("example.com")
    assert (entry.refresh_failures, entry.last_error) == (1, "sts-policy-fetch-error")
    assert _failing() == 1  # the mode none policy does not count
    # The jobs themselves must be over too: a pass joins a job still listed, even one whose
    # result is already in the cache, and would start no new refresh.
    wait_for(lambda: not disc._jobs)
    clock.now += 301  # backoff over: the next pass refreshes again, successfully
    fetcher.bodies["example.com"] = ENFORCE
    disc.refresh_due()
    wait_for(lambda: _failing() == 0)
    assert disc.cache.get("example.com").refresh_failures == 0
    assert REGISTRY.get_sample_value("stsmilter_cache_entries") == 2


def test_refresher_drops_expired_policies(world):
    clock, resolver, fetcher, disc = world
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    disc.lookup("example.com")
    clock.now += 86401
    disc.refresh_due()
    assert disc.cache.count() == 0


def test_sqlite_store_survives_a_restart(tmp_path):
    clock, resolver, fetcher = Clock(), FakeResolver(), FakeFetcher()
    path = str(tmp_path / "cache.sqlite")
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    cache = PolicyCache(SqliteStore(path), 1000, 60, 300, clock=clock)
    disc = Discovery(resolver, fetcher, cache, clock=clock)
    disc.lookup("example.com")
    disc.close()
    cache.store.close()

    # New process: DNS now hides the record and the policy host is gone.
    resolver, fetcher = FakeResolver(), FakeFetcher()
    clock.now += 3600
    cache = PolicyCache(SqliteStore(path), 1000, 60, 300, clock=clock)
    assert cache.load() == 1
    disc = Discovery(resolver, fetcher, cache, clock=clock)
    assert disc.peek("example.com").policy.mx == ("mx.example.com",)
    r = disc.lookup("example.com")
    assert (r.status, r.policy_id, r.policy.mode, r.source) == ("valid", "a1", "enforce", "cache")
    disc.close()
    cache.store.close()


def test_daemon_answers_from_cache_and_rechecks_in_the_background(world):
    clock, resolver, fetcher, disc = world
    disc.settings = Settings(id_check_interval=300, refresh_interval=3600)  # the daemon's default
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    disc.lookup("example.com")
    clock.now += 301
    publish(resolver, fetcher, "example.com", "a2", TESTING)
    resolver.delay = 0.3  # a slow DNS must not hold the caller
    started = time.monotonic()
    r = disc.lookup("example.com", timeout=5)
    assert (r.policy_id, r.source) == ("a1", "cache")
    assert time.monotonic() - started < 0.2
    disc.submit("example.com").result(timeout=5)
    assert disc.lookup("example.com").policy_id == "a2"


# --- the TXT record's TTL (RFC 8461 §3.3, §5.1): a changed id is noticed once the TTL of
# the _mta-sts record has passed; [cache] id_check_min_interval (60 s) is the floor under
# a short TTL, id_check_interval (300 s here) the ceiling over a long one.


def publish_with_ttl(resolver, fetcher, domain, policy_id, body, ttl):
    publish(resolver, fetcher, domain, policy_id, body)
    resolver.txt_ttls["_mta-sts." + domain] = ttl


@pytest.mark.parametrize("ttl, unchecked, checked", [
    (120, 119, 121),  # the TTL decides, between floor and ceiling (RFC 8461 §3.3, §5.1)
    (0, 59, 61),  # TTL 0: not a TXT query per lookup; the floor
    (30, 59, 61),  # below the floor: the floor
    (86400, 299, 301),  # above id_check_interval: id_check_interval
])
def test_a_new_id_is_seen_once_the_txt_ttl_has_passed(world, ttl, unchecked, checked):
    clock, resolver, fetcher, disc = world
    publish_with_ttl(resolver, fetcher, "example.com", "a1", ENFORCE, ttl)
    start = clock.now
    disc.lookup("example.com")
    publish_with_ttl(resolver, fetcher, "example.com", "a2", TESTING, ttl)
    clock.now = start + unchecked
    assert disc.lookup("example.com").policy_id == "a1"
    assert resolver.txt_queries == 1  # nothing asked before its time
    clock.now = start + checked
    r = disc.lookup("example.com")
    assert (r.policy_id, r.source, r.policy.mode) == ("a2", "fetched", "testing")
    assert (resolver.txt_queries, fetcher.fetches) == (2, 2)


def test_each_confirmation_takes_the_ttl_of_the_answer(world):
    clock, resolver, fetcher, disc = world
    publish_with_ttl(resolver, fetcher, "example.com", "a1", ENFORCE, 3600)
    disc.lookup("example.com")
    resolver.txt_ttls["_mta-sts.example.com"] = 90  # the domain lowers its TTL before a change
    clock.now += 301
    disc.lookup("example.com")  # same id: confirmed, with the new TTL
    assert disc.cache.peek("example.com").txt_ttl == 90
    publish(resolver, fetcher, "example.com", "a2", TESTING)
    clock.now += 89
    assert disc.lookup("example.com").policy_id == "a1"
    clock.now += 2
    assert disc.lookup("example.com").policy_id == "a2"
    assert disc.cache.peek("example.com").txt_ttl == 90  # the fetched entry keeps the TTL it was named with


def test_a_vanished_record_keeps_the_ttl_it_had(world):
    clock, resolver, fetcher, disc = world
    publish_with_ttl(resolver, fetcher, "example.com", "a1", ENFORCE, 100)
    disc.lookup("example.com")
    del resolver.txt_records["_mta-sts.example.com"]
    clock.now += 101
    assert disc.lookup("example.com").policy_id == "a1"  # the cached policy still applies (§5.1)
    publish_with_ttl(resolver, fetcher, "example.com", "a2", TESTING, 100)  # back, with a new id
    clock.now += 99
    assert disc.lookup("example.com").policy_id == "a1"
    clock.now += 2
    assert disc.lookup("example.com").policy_id == "a2"


def test_floor_above_the_ceiling_leaves_the_ceiling(world):
    clock, resolver, fetcher, disc = world
    disc.settings = Settings(id_check_interval=30, id_check_min_interval=60, recheck_in_background=False)
    publish_with_ttl(resolver, fetcher, "example.com", "a1", ENFORCE, 0)
    disc.lookup("example.com")
    clock.now += 31  # id_check_interval is never exceeded
    disc.lookup("example.com")
    assert resolver.txt_queries == 2


def test_an_entry_without_a_known_ttl_is_checked_every_id_check_interval(world):
    clock, resolver, fetcher, disc = world
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    disc.lookup("example.com")
    entry = disc.cache.peek("example.com")
    disc.cache.put(Entry(entry.result, entry.checked_at, txt_ttl=None))  # stored before TTLs were kept
    resolver.txt_ttls["_mta-sts.example.com"] = 10
    clock.now += 299
    disc.lookup("example.com")
    assert resolver.txt_queries == 1
    clock.now += 2
    disc.lookup("example.com")
    assert resolver.txt_queries == 2 and disc.cache.peek("example.com").txt_ttl == 10


def test_the_daemon_rechecks_in_the_background_once_the_ttl_has_passed(world):
    clock, resolver, fetcher, disc = world
    disc.settings = Settings(id_check_interval=300, refresh_interval=3600)  # the daemon's default
    publish_with_ttl(resolver, fetcher, "example.com", "a1", ENFORCE, 90)
    disc.lookup("example.com")
    publish_with_ttl(resolver, fetcher, "example.com", "a2", TESTING, 90)
    clock.now += 89
    assert disc.peek("example.com").policy_id == "a1" and resolver.txt_queries == 1
    clock.now += 2
    assert disc.peek("example.com").policy_id == "a1"  # answered at once; the re-check starts
    wait_for(lambda: disc.peek("example.com").policy_id == "a2")


def test_the_ttl_survives_a_restart(tmp_path):
    clock, resolver, fetcher = Clock(), FakeResolver(), FakeFetcher()
    path = str(tmp_path / "cache.sqlite")
    publish_with_ttl(resolver, fetcher, "example.com", "a1", ENFORCE, 120)
    settings = Settings(recheck_in_background=False)
    cache = PolicyCache(SqliteStore(path), 1000, 60, 300, clock=clock)
    disc = Discovery(resolver, fetcher, cache, settings, clock=clock)
    disc.lookup("example.com")
    disc.close()
    cache.close()

    publish_with_ttl(resolver, fetcher, "example.com", "a2", TESTING, 120)
    cache = PolicyCache(SqliteStore(path), 1000, 60, 300, clock=clock)
    assert cache.load() == 1
    disc = Discovery(resolver, fetcher, cache, settings, clock=clock)
    clock.now += 119
    assert disc.lookup("example.com").policy_id == "a1"
    clock.now += 2  # the TTL stored with the entry, not id_check_interval (300 s)
    assert disc.lookup("example.com").policy_id == "a2"
    disc.close()
    cache.close()


@pytest.mark.parametrize("one_shot, settings", [
    (True, (0.0, 60.0, False)),  # query/check: every lookup re-checks the id and waits for it
    (False, (300.0, 60.0, True)),  # the daemon: the TTL, between the configured bounds
])
def test_one_shot_commands_recheck_the_id_on_every_lookup(one_shot, settings):
    from stsmilter import config, engine

    cfg = config.defaults().replace(cache={"path": ""}, socketmap={"dane": "no"})
    disc = engine.open_engine(cfg, one_shot=one_shot)
    try:
        s = disc.settings
        assert (s.id_check_interval, s.id_check_min_interval, s.recheck_in_background) == settings
    finally:
        disc.close()
        disc.cache.close()


class GatedResolver(FakeResolver):
    """txt() waits for `gate` once `armed`: a lookup held in flight while a purge runs."""

    def __init__(self):
        super().__init__()
        self.armed, self.gate, self.entered = False, threading.Event(), threading.Event()

    async def txt(self, name, lifetime=None):
        if self.armed:
            self.entered.set()
            await asyncio.to_thread(self.gate.wait, 10)
        return await super().txt(name, lifetime)


@pytest.fixture
def gated_world():
    clock = Clock()
    resolver, fetcher = GatedResolver(), FakeFetcher()
    cache = PolicyCache(MemoryStore(), 1000, negative_ttl=60, failure_backoff=300, clock=clock)
    settings = Settings(id_check_interval=300, refresh_interval=3600, recheck_in_background=False)
    disc = Discovery(resolver, fetcher, cache, settings, clock=clock)
    yield clock, resolver, fetcher, disc, cache
    resolver.gate.set()
    disc.close()


def _purge_while_in_flight(clock, resolver, disc, cache, domain):
    """Start a lookup, purge the domain while its TXT lookup is under way, let it finish."""
    resolver.armed = True
    future = disc.submit(domain)
    assert resolver.entered.wait(5)
    clock.now += 1
    cache.forget(domain)
    cache.store.delete(domain)  # what `stsmilter cache purge` does to the store
    resolver.gate.set()
    return future.result(5)


def test_a_purge_is_not_undone_by_an_id_check_started_before_it(gated_world):
    """The re-check confirms the id of the policy it read before the purge: confirming
    it must not put the purged policy back (memory or store)."""
    clock, resolver, fetcher, disc, cache = gated_world
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    disc.lookup("example.com")
    clock.now += 301  # id check due
    result = _purge_while_in_flight(clock, resolver, disc, cache, "example.com")
    assert result.policy_id == "a1"  # the lookup that began before the purge gets its answer
    assert cache.peek("example.com") is None and cache.store.get("example.com") is None
    clock.now += 1
    resolver.armed = False
    assert disc.lookup("example.com").source == "fetched"  # discovered afresh
    assert fetcher.fetches == 2


def test_a_purge_is_not_undone_by_a_fetch_started_before_it(gated_world):
    clock, resolver, fetcher, disc, cache = gated_world
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    _purge_while_in_flight(clock, resolver, disc, cache, "example.com")
    assert cache.peek("example.com") is None and cache.store.get("example.com") is None


def test_a_policy_written_back_to_the_store_before_the_purge_reached_memory_stays_purged(gated_world):
    """`cache purge` empties the store, then tells the daemon: a job that wrote the old
    policy back in between must not bring it back from the store afterwards."""
    clock, resolver, fetcher, disc, cache = gated_world
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    disc.lookup("example.com")
    old = cache.peek("example.com")
    clock.now += 10
    cache.forget("example.com")
    cache.store.put(old)  # the write-back that raced the purge
    assert cache.get("example.com") is None
    assert cache.reload("example.com") is None
    clock.now += 1
    assert disc.lookup("example.com").source == "fetched"
    assert cache.peek("example.com").fetched_at > old.fetched_at


def test_a_purge_is_not_undone_by_a_failure_or_a_none_found_by_a_lookup_started_before_it(gated_world):
    """A purge is how an administrator asks for a retry at once: a fetch failure (its
    backoff) or a "no policy" answer found by a lookup already under way is not kept."""
    clock, resolver, fetcher, disc, cache = gated_world
    resolver.txt_records["_mta-sts.broken.example"] = ["v=STSv1; id=b1"]  # its fetch fails
    result = _purge_while_in_flight(clock, resolver, disc, cache, "broken.example")
    assert result.status == "failed" and cache.backoff("broken.example", "b1") is None
    resolver.armed, resolver.entered = False, threading.Event()
    assert disc.lookup("broken.example").status == "failed"
    assert fetcher.fetches == 2  # fetched again at once, not after failure_backoff
    resolver.armed, resolver.gate = True, threading.Event()
    assert _purge_while_in_flight(clock, resolver, disc, cache, "nothing.example").status == "none"
    assert cache.negative("nothing.example") is None


def test_the_refresher_thread_refreshes_due_policies_survives_a_failing_pass_and_stops(world, caplog):
    """start_refresher(): the daemon's thread, not a test calling refresh_due() by hand."""
    clock, resolver, fetcher, disc = world
    publish(resolver, fetcher, "example.com", "a1", ENFORCE)
    disc.lookup("example.com")
    clock.now += 3601  # due
    passes = []
    original = disc.refresh_due

    def counted_pass():
        passes.append(clock.now)
        if len(passes) == 1:
            raise RuntimeError("store exploded")  # a bug in one pass must not end the thread
        return original()

    disc.refresh_due = counted_pass
    disc.start_refresher(period=0.02)
    wait_for(lambda: disc.cache.peek("example.com").fetched_at == clock.now)  # the refresh is in the cache
    assert fetcher.fetches == 2
    assert "refresher pass failed" in caplog.text
    disc.close()
    assert not disc._refresher.is_alive()  # close() ends the thread (it waits at most a period)
