"""Discovery's rules at their edges (stsmilter/discovery.py), beside test_discovery.py and
test_discovery_load.py, over the same fake DNS, fetch and clock: each test holds one rule
of discovery.py's docstring or of RFC 8461 (§3.2 max_age, §3.3 and §5.1 the TXT id and
its TTL, §5.1 no downgrade on a failed lookup, §10.2 proactive refresh) at the exact
second where it changes its answer, and the engine's own contract (HACKING.rst "Engine
contract": reasons, metrics, log lines, single flight, the refresher).

make mutate runs it against discovery.py (tests/mutation/mutate.py)."""

import asyncio
import dataclasses
import threading
import time

import pytest
from prometheus_client import REGISTRY

from stsmilter import config
from stsmilter.engine import discovery, dns
from stsmilter.engine.cache import PolicyCache
from stsmilter.engine.discovery import FORCE_FRESH_SECONDS, Discovery, Settings
from stsmilter.engine.fetch import FetchError, FetchTimeout, WebPkiError
from stsmilter.engine.limits import current_want
from stsmilter.engine.policy import Result
from stsmilter.engine.store import MemoryStore
from test_discovery import ENFORCE, TESTING, Clock, FakeFetcher, FakeResolver, GatedResolver, publish, publish_with_ttl
from test_fleet import FakeSharedStore, SharedBacking

DOMAIN = "example.com"
MAX_AGE = 86400  # ENFORCE's max_age
FAILURE_TTL = 60


@dataclasses.dataclass
class World:
    clock: Clock
    resolver: FakeResolver
    fetcher: FakeFetcher
    cache: PolicyCache
    disc: Discovery


def make_world(resolver=None, fetcher=None, store=None, failure_ttl=FAILURE_TTL, **settings):
    clock = Clock()
    resolver = resolver if resolver is not None else FakeResolver()
    fetcher = fetcher if fetcher is not None else FakeFetcher()
    cache = PolicyCache(store if store is not None else MemoryStore(), 1000, negative_ttl=60, failure_backoff=300,
                        clock=clock, failure_ttl=failure_ttl)
    settings = Settings(**{"id_check_interval": 300, "refresh_interval": 3600, "recheck_in_background": False,
                           **settings})
    return World(clock, resolver, fetcher, cache, Discovery(resolver, fetcher, cache, settings, clock=clock))


@pytest.fixture
def world():
    w = make_world()
    yield w
    w.disc.close()


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


KINDS = ("hit", "negative", "miss", "stale", "failure")


def lookups():
    return {kind: REGISTRY.get_sample_value("stsmilter_cache_lookups_total", {"result": kind}) or 0.0
            for kind in KINDS}


def counted(before, **expected):
    """stsmilter_cache_lookups_total{result} moved by exactly `expected` since `before`."""
    after = lookups()
    return {kind: after[kind] - before[kind] for kind in KINDS} == {kind: expected.get(kind, 0) for kind in KINDS}


def fetches(result):
    return REGISTRY.get_sample_value("stsmilter_policy_fetches_total", {"result": result}) or 0.0


# --- what each answer counts: stsmilter_cache_lookups_total{result} (README "Metrics")


def test_a_fresh_cached_policy_is_a_hit_answered_without_a_job(world):
    publish(world.resolver, world.fetcher, DOMAIN, "a1", ENFORCE)
    world.disc.lookup(DOMAIN)
    before = lookups()
    assert world.disc.lookup(DOMAIN).policy_id == "a1"
    assert world.disc.peek(DOMAIN).policy_id == "a1"
    assert counted(before, hit=2) and not world.disc._jobs and world.resolver.txt_queries == 1


def test_a_none_answer_is_counted_negative_and_peek_knows_it(world):
    world.resolver.txt_records["_mta-sts.nothing.example"] = ["v=spf1 -all"]
    assert world.disc.lookup("nothing.example").status == "none"
    before = lookups()
    assert world.disc.lookup("nothing.example") == Result("nothing.example", "none", reason="no-txt-record",
                                                          source="cache")
    assert world.disc.peek("nothing.example") == Result("nothing.example", "none", reason="no-txt-record",
                                                        source="cache")
    assert counted(before, negative=2) and world.resolver.txt_queries == 1 and not world.disc._jobs


def test_an_unknown_domain_is_a_miss(world):
    before = lookups()
    assert world.disc.peek("unknown.example") is None
    assert counted(before, miss=1)
    world.disc.lookup("unknown.example")
    assert counted(before, miss=2)


def test_a_due_id_check_is_counted_stale(world):
    publish(world.resolver, world.fetcher, DOMAIN, "a1", ENFORCE)
    world.disc.lookup(DOMAIN)
    world.clock.now += 300
    before = lookups()
    world.disc.lookup(DOMAIN)
    assert counted(before, stale=1)


def test_a_remembered_failure_is_counted_failure_not_miss(world):
    world.resolver.txt_records["_mta-sts.dead.example"] = dns.TempDnsError("SERVFAIL")
    world.disc.lookup("dead.example")
    before = lookups()
    assert world.disc.peek("dead.example") == Result("dead.example", "failed", reason="dns-error", source="cache")
    assert counted(before, failure=1)


# --- the daemon answers from the cache and re-checks the id in the background


def test_a_stale_lookup_starts_the_id_recheck_by_itself():
    w = make_world(recheck_in_background=True)
    try:
        publish(w.resolver, w.fetcher, DOMAIN, "a1", ENFORCE)
        w.disc.lookup(DOMAIN)
        w.clock.now += 301
        publish(w.resolver, w.fetcher, DOMAIN, "a2", TESTING)
        assert w.disc.lookup(DOMAIN, timeout=5).policy_id == "a1"  # at once, from the cache
        wait_until(lambda: w.cache.peek(DOMAIN).policy_id == "a2")  # nobody else asked for it
    finally:
        w.disc.close()


# --- exact seconds: max_age (RFC 8461 §3.2), the TXT TTL (§3.3, §5.1), FORCE_FRESH_SECONDS


def test_at_its_expiry_second_a_policy_no_longer_applies_even_with_its_id_unchanged(world):
    """max_age is the policy's lifetime from its fetch: at fetched_at + max_age it is
    over; an unchanged id does not extend it, a fetch must (RFC 8461 §5.1)."""
    publish(world.resolver, world.fetcher, DOMAIN, "a1", ENFORCE)
    fetched_at = world.clock.now
    world.disc.lookup(DOMAIN)
    world.fetcher.bodies[DOMAIN] = FetchError("HTTP 503")
    world.clock.now = fetched_at + MAX_AGE - 1
    assert world.disc.lookup(DOMAIN).policy_id == "a1"  # its id re-checked and confirmed, waited for
    world.clock.now = fetched_at + MAX_AGE
    assert world.disc.peek(DOMAIN) is None
    r = world.disc.lookup(DOMAIN)
    assert (r.status, r.reason, r.policy) == ("failed", "sts-policy-fetch-error", None)


def test_the_id_is_checked_again_at_the_very_second_its_interval_ends(world):
    publish_with_ttl(world.resolver, world.fetcher, DOMAIN, "a1", ENFORCE, 3600)  # interval: id_check_interval
    start = world.clock.now
    world.disc.lookup(DOMAIN)
    world.clock.now = start + 299.5
    world.disc.lookup(DOMAIN)
    assert world.resolver.txt_queries == 1
    world.clock.now = start + 300
    world.disc.lookup(DOMAIN)
    assert world.resolver.txt_queries == 2


def test_a_forced_recheck_refetches_a_policy_fetched_a_minute_ago(world):
    """FORCE_FRESH_SECONDS: a policy fetched less than a minute ago is fresh enough to
    reject on; one fetched a minute ago or more is fetched again first (RFC 8461 §5)."""
    publish(world.resolver, world.fetcher, DOMAIN, "a1", ENFORCE)
    start = world.clock.now
    world.disc.lookup(DOMAIN)
    world.clock.now = start + 59.5
    assert world.disc.lookup(DOMAIN, force=True).source == "fetched" and world.fetcher.fetches == 1
    world.clock.now = start + 60
    assert world.disc.lookup(DOMAIN, force=True).source == "fetched" and world.fetcher.fetches == 2
    assert FORCE_FRESH_SECONDS == 60.0


def test_a_late_recheck_answers_with_the_cached_policy_until_it_expires(world):
    publish(world.resolver, world.fetcher, DOMAIN, "a1", ENFORCE)
    fetched_at = world.clock.now
    world.disc.lookup(DOMAIN)
    world.resolver.delay = 0.5
    world.clock.now = fetched_at + MAX_AGE - 1  # id check due, the policy still valid
    assert world.disc.lookup(DOMAIN, timeout=0.05).policy_id == "a1"
    world.clock.now = fetched_at + MAX_AGE  # expired: a late discovery is pending, never the old policy
    assert world.disc.lookup(DOMAIN, timeout=0.05) == Result(DOMAIN, "pending", reason="lookup-timeout")


# --- a remembered failure (dns_failure_ttl) and a forced re-check


def test_a_forced_recheck_during_a_remembered_failure_keeps_the_cached_policy(world):
    publish(world.resolver, world.fetcher, DOMAIN, "a1", ENFORCE)
    world.disc.lookup(DOMAIN)
    world.clock.now += FORCE_FRESH_SECONDS + 1
    world.cache.put_failure(DOMAIN, "dns-error")
    r = world.disc.lookup(DOMAIN, force=True)
    assert (r.status, r.policy_id, r.policy.mode) == ("valid", "a1", "enforce")
    assert world.resolver.txt_queries == 1 and world.fetcher.fetches == 1


def test_a_forced_recheck_during_a_remembered_failure_without_a_policy_is_that_failure(world):
    world.cache.put_failure(DOMAIN, "dns-error")
    assert world.disc.lookup(DOMAIN, force=True) == Result(DOMAIN, "failed", reason="dns-error", source="cache")
    assert world.resolver.txt_queries == 0


def test_a_dns_failure_found_by_a_lookup_begun_before_a_purge_is_not_remembered():
    """A purge is how an administrator asks for a retry at once."""
    w = make_world(resolver=GatedResolver())
    try:
        w.resolver.txt_records["_mta-sts." + DOMAIN] = dns.TempDnsError("SERVFAIL")
        w.resolver.armed = True
        future = w.disc.submit(DOMAIN)
        assert w.resolver.entered.wait(5)
        w.clock.now += 1
        w.cache.forget(DOMAIN)
        w.resolver.gate.set()
        assert future.result(5).reason == "dns-error"
        assert w.cache.failure(DOMAIN) is None
        w.resolver.armed = False
        w.disc.lookup(DOMAIN)
        assert w.resolver.txt_queries == 2
    finally:
        w.resolver.gate.set()
        w.disc.close()


# --- the MX set (the milter's Decider): its own deadline, waiting-caller priority, TTL


class RecordingResolver(FakeResolver):
    def __init__(self):
        super().__init__()
        self.mx_calls = []  # (lifetime, Want of the task, time.monotonic())
        self.hang = False
        self.cancelled = threading.Event()

    async def mx(self, domain, lifetime=None):
        self.mx_calls.append((lifetime, current_want.get(), time.monotonic()))
        if self.hang:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return await super().mx(domain, lifetime)


def test_an_mx_lookup_gets_the_callers_time_or_the_resolvers_and_goes_first():
    w = make_world(resolver=RecordingResolver())
    try:
        w.resolver.timeout = 4.0
        w.disc.mx(DOMAIN)
        w.disc.mx("other.example", 1.5)
        (default, want, asked), (given, other_want, other_asked) = w.resolver.mx_calls
        assert (default, given) == (4.0, 1.5)
        # the caller waits: its DNS query goes before background work until its deadline
        assert want.urgent(asked) and asked - 0.5 < want.until - 4.0 <= asked
        assert other_want.urgent(other_asked) and other_asked - 0.5 < other_want.until - 1.5 <= other_asked
    finally:
        w.disc.close()


def test_an_mx_lookup_that_hangs_is_given_up_half_a_second_after_its_lifetime():
    w = make_world(resolver=RecordingResolver())
    try:
        w.resolver.hang = True
        started = time.monotonic()
        with pytest.raises(dns.TempDnsError) as raised:
            w.disc.mx(DOMAIN, 0.2)
        assert str(raised.value) == "timeout"
        assert 0.2 + 0.5 <= time.monotonic() - started < 3
        assert w.resolver.cancelled.wait(5)  # the query does not go on behind the caller's back
    finally:
        w.disc.close()


def test_an_mx_set_with_a_one_second_ttl_is_cached_for_that_second(world):
    world.resolver.mx_sets[DOMAIN] = dns.MxSet(hosts=("mx1.example.com",), ttl=1)
    start = world.clock.now
    world.disc.mx(DOMAIN, 1.0)
    world.clock.now = start + 0.5
    world.disc.mx(DOMAIN, 1.0)
    assert world.resolver.mx_queries == 1
    world.clock.now = start + 1
    world.disc.mx(DOMAIN, 1.0)
    assert world.resolver.mx_queries == 2


# --- jobs: the bound on jobs in flight, single flight, a caller joining, a bug


def test_past_max_queued_jobs_a_new_domain_is_refused_but_a_running_job_can_be_joined(world, monkeypatch):
    monkeypatch.setattr(discovery, "MAX_QUEUED_JOBS", 2)
    world.resolver.delay = 0.3
    first = world.disc.submit("a.example")
    world.disc.submit("b.example")
    refused = world.disc.submit("c.example")
    assert refused.done() and refused.result() == Result("c.example", "pending", reason="overloaded")
    assert world.disc.submit("a.example") is first  # joining is not a new job
    assert first.result(5).status == "none"
    wait_until(lambda: not world.disc._jobs)
    assert world.disc.submit("c.example").result(5).status == "none"
    assert world.resolver.txt_queries == 3  # a, b, and c once it was accepted


def test_a_caller_joining_a_background_job_moves_its_fetch_ahead_of_the_refreshes():
    """Waiting callers first (limits.py): a job started in the background (a stale
    answer's re-check) that a caller then waits for is promoted at the fetch bound."""
    w = make_world(max_concurrent=1)
    try:
        for n in range(3):
            publish(w.resolver, w.fetcher, f"cached{n}.example", "c1", ENFORCE)
            w.disc.lookup(f"cached{n}.example")
        publish(w.resolver, w.fetcher, "joined.example", "j1", ENFORCE)
        w.clock.now += 3601  # the three are due for a refresh
        order = []
        original = w.fetcher.fetch

        async def noting(domain, deadline=None):
            order.append(domain)
            await asyncio.sleep(0.1)
            return await original(domain, deadline)

        w.fetcher.fetch = noting
        assert w.disc.refresh_due() == 3
        wait_until(lambda: w.disc.fetch_slots.waiting == 2)  # one fetching, two refreshes waiting
        background = w.disc.submit("joined.example")  # nobody waits for it (yet)
        wait_until(lambda: w.disc.fetch_slots.waiting == 3)
        assert w.disc.lookup("joined.example", timeout=5).status == "valid"  # a caller joins it
        assert background.result(5).status == "valid"
        assert order[:2] == ["cached0.example", "joined.example"]
    finally:
        w.disc.close()


def test_a_bug_in_a_job_is_an_internal_error_logged_once_and_the_job_ends(world, caplog):
    class Broken(FakeResolver):
        async def txt(self, name, lifetime=None):
            raise RuntimeError("bug")

    world.disc.resolver = Broken()
    assert world.disc.lookup(DOMAIN) == Result(DOMAIN, "failed", reason="internal-error")
    records = [r for r in caplog.records if r.name == "stsmilter.discovery"]
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("ERROR", "discovery of example.com failed unexpectedly")]
    assert records[0].exc_info[0] is RuntimeError
    assert not world.disc._jobs
    world.disc.resolver = world.resolver
    publish(world.resolver, world.fetcher, DOMAIN, "a1", ENFORCE)
    assert world.disc.lookup(DOMAIN).status == "valid"


# --- a private store that fits in memory (cache.complete): read from memory on the loop


def test_a_complete_cache_still_knows_its_policies_when_the_id_is_rechecked():
    store = MemoryStore()
    w = make_world(store=store)
    try:
        publish(w.resolver, w.fetcher, DOMAIN, "a1", ENFORCE)
        w.cache.load()
        assert w.cache.complete
        w.disc.lookup(DOMAIN)
        w.clock.now += 301
        r = w.disc.lookup(DOMAIN)  # same id: confirmed, not fetched again
        assert (r.policy_id, r.source) == ("a1", "cache") and w.fetcher.fetches == 1
    finally:
        w.disc.close()


# --- a shared store: answers without a policy are offered to the fleet


def test_a_shared_store_gets_the_none_answers_and_the_failed_fetches():
    backing = SharedBacking(Clock())
    w = make_world(store=FakeSharedStore(backing, "d0"))
    try:
        backing.clock = w.clock
        w.disc.lookup("nothing.example")
        assert w.cache.store.get_answer("nothing.example") == Result("nothing.example", "none",
                                                                     reason="no-txt-record", source="cache")
        w.resolver.txt_records["_mta-sts.broken.example"] = ["v=STSv1; id=b1"]
        w.fetcher.bodies["broken.example"] = FetchError("HTTP 500")
        w.disc.lookup("broken.example")
        assert w.cache.store.get_answer("broken.example") == Result(
            "broken.example", "failed", reason="sts-policy-fetch-error", source="cache", policy_id="b1")
    finally:
        w.disc.close()


# --- a fetch: its metrics, its log line, what is remembered


def test_a_fetch_is_counted_by_result_and_timed(world):
    publish(world.resolver, world.fetcher, DOMAIN, "a1", ENFORCE)
    publish(world.resolver, world.fetcher, "bad.example", "b1", WebPkiError("certificate verify failed"))
    ok, bad = fetches("ok"), fetches("sts-webpki-invalid")
    seconds = REGISTRY.get_sample_value("stsmilter_policy_fetch_seconds_sum")
    world.fetcher.delay = 0.1
    world.disc.lookup(DOMAIN)
    world.disc.lookup("bad.example")
    assert (fetches("ok"), fetches("sts-webpki-invalid")) == (ok + 1, bad + 1)
    assert 0.2 <= REGISTRY.get_sample_value("stsmilter_policy_fetch_seconds_sum") - seconds < 5


def test_a_failed_fetch_logs_domain_id_reason_and_detail(world, caplog):
    """README: "policy fetch for DOMAIN (id ID) failed: REASON: DETAIL" (warning)."""
    publish(world.resolver, world.fetcher, DOMAIN, "a1", WebPkiError("certificate verify failed"))
    world.disc.lookup(DOMAIN)
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "stsmilter.discovery"] == [
        ("WARNING", "policy fetch for example.com (id a1) failed: sts-webpki-invalid: certificate verify failed")]


def test_an_invalid_policy_is_backed_off_but_not_remembered_as_a_failed_lookup(world):
    """Only a host that hangs is remembered (dns_failure_ttl); an invalid policy backs off
    its id (failure_backoff) while the TXT id is still checked: a new id is seen at once."""
    publish(world.resolver, world.fetcher, DOMAIN, "a1", b"version: STSv1\nmode: enforce\nmax_age: 1\n")
    assert world.disc.lookup(DOMAIN).reason == "sts-policy-invalid"
    assert world.cache.failure(DOMAIN) is None
    publish(world.resolver, world.fetcher, DOMAIN, "a2", ENFORCE)
    assert world.disc.lookup(DOMAIN).policy_id == "a2"
    assert (world.resolver.txt_queries, world.fetcher.fetches) == (2, 2)


class GatedFetcher(FakeFetcher):
    def __init__(self):
        super().__init__()
        self.gate, self.entered = threading.Event(), threading.Event()

    async def fetch(self, domain, deadline=None):
        self.entered.set()
        await asyncio.to_thread(self.gate.wait, 10)
        return await super().fetch(domain, deadline)


def test_a_hang_found_by_a_fetch_begun_before_a_purge_is_not_remembered():
    w = make_world(fetcher=GatedFetcher())
    try:
        publish(w.resolver, w.fetcher, DOMAIN, "a1", FetchTimeout("timeout"))
        future = w.disc.submit(DOMAIN)
        assert w.fetcher.entered.wait(5)
        w.clock.now += 1
        w.cache.forget(DOMAIN)
        w.fetcher.gate.set()
        assert future.result(5).reason == "sts-policy-fetch-error"
        assert w.cache.failure(DOMAIN) is None and w.cache.backoff(DOMAIN, "a1") is None
    finally:
        w.fetcher.gate.set()
        w.disc.close()


# --- refreshes (RFC 8461 §10.2): the refresher and `stsmilter cache refresh`


def test_refreshing_a_domain_without_a_policy_is_a_lookup_that_knows_its_none_answer(world):
    world.resolver.txt_records["_mta-sts.nothing.example"] = ["v=spf1 -all"]
    world.disc.lookup("nothing.example")
    assert world.disc.refresh("nothing.example") == Result("nothing.example", "none", reason="no-txt-record",
                                                           source="cache")
    assert world.resolver.txt_queries == 1


def test_a_refresh_fetches_the_id_the_txt_record_names_now(world):
    publish_with_ttl(world.resolver, world.fetcher, DOMAIN, "a1", ENFORCE, 3600)
    world.disc.lookup(DOMAIN)
    world.clock.now += 3601
    publish_with_ttl(world.resolver, world.fetcher, DOMAIN, "a2", TESTING, 120)
    r = world.disc.refresh(DOMAIN)
    entry = world.cache.peek(DOMAIN)
    assert (r.policy_id, entry.policy_id, entry.txt_ttl, entry.policy.mode) == ("a2", "a2", 120, "testing")


def test_a_refresh_without_a_txt_record_refetches_the_id_and_ttl_it_knows(world):
    """A vanished record does not end a cached policy (RFC 8461 §5.1); the refresh keeps it fresh."""
    publish_with_ttl(world.resolver, world.fetcher, DOMAIN, "a1", ENFORCE, 120)
    world.disc.lookup(DOMAIN)
    world.clock.now += 3601
    del world.resolver.txt_records["_mta-sts." + DOMAIN]
    r = world.disc.refresh(DOMAIN)
    entry = world.cache.peek(DOMAIN)
    assert (r.policy_id, entry.policy_id, entry.txt_ttl, entry.fetched_at) == ("a1", "a1", 120, world.clock.now)
    assert world.fetcher.fetches == 2


def test_a_refresh_does_not_fetch_an_id_that_is_backing_off(world):
    publish(world.resolver, world.fetcher, DOMAIN, "a1", ENFORCE)
    world.disc.lookup(DOMAIN)
    world.clock.now += 3601
    publish(world.resolver, world.fetcher, DOMAIN, "a2", ENFORCE)
    world.cache.set_backoff(DOMAIN, "a2", "sts-policy-fetch-error")
    r = world.disc.refresh(DOMAIN)
    assert r.policy_id == "a1" and world.fetcher.fetches == 1


def test_the_refresher_leaves_a_backing_off_policy_alone(world):
    publish(world.resolver, world.fetcher, DOMAIN, "a1", ENFORCE)
    world.disc.lookup(DOMAIN)
    world.clock.now += 3601
    world.cache.set_backoff(DOMAIN, "a1", "sts-policy-fetch-error")
    world.cache.set_backoff("other.example", "a1", "x")  # another domain's backoff: no matter
    assert world.disc.refresh_due() == 0
    assert world.resolver.txt_queries == 1 and not world.disc._jobs


def test_a_refresher_pass_during_shutdown_starts_no_refresh():
    w = make_world()
    publish(w.resolver, w.fetcher, DOMAIN, "a1", ENFORCE)
    w.disc.lookup(DOMAIN)
    w.clock.now += 3601
    w.disc.close()
    assert w.disc.refresh_due() == 1  # due, but not started
    assert w.resolver.txt_queries == 1 and not w.disc._jobs


def test_a_refresh_asked_for_while_the_refresher_runs_it_joins_that_refresh(world):
    publish(world.resolver, world.fetcher, DOMAIN, "a1", ENFORCE)
    world.disc.lookup(DOMAIN)
    world.clock.now += 3601
    world.fetcher.delay = 0.3
    assert world.disc.refresh_due() == 1
    world.disc.refresh(DOMAIN)  # `stsmilter cache refresh` meanwhile
    assert world.fetcher.fetches == 2


class RecordingStop:
    """Discovery._stopping for the refresher: records each wait and ends the thread at
    the second one."""

    def __init__(self):
        self.waits = []
        self.flag = False

    def wait(self, timeout=None):
        self.waits.append(timeout)
        return len(self.waits) > 1

    def is_set(self):
        return self.flag

    def set(self):
        self.flag = True


def test_the_refresher_runs_a_pass_a_minute_on_a_daemon_thread_of_its_own(world, caplog):
    world.disc._stopping = RecordingStop()
    passes = []

    def failing_pass():
        passes.append(threading.current_thread())
        raise RuntimeError("store exploded")

    world.disc.refresh_due = failing_pass
    world.disc.start_refresher()
    world.disc._refresher.join(5)
    assert world.disc._stopping.waits == [60.0, 60.0]
    thread = passes[0]
    assert (thread.name, thread.daemon) == ("sts-refresher", True)  # never holds up the exit
    records = [r for r in caplog.records if r.name == "stsmilter.discovery"]
    assert [(r.levelname, r.getMessage()) for r in records] == [("ERROR", "refresher pass failed")]


def test_close_waits_five_seconds_at_most_for_the_refresher(world):
    class Thread:
        joined = []

        def join(self, timeout=None):
            self.joined.append(timeout)

    world.disc._refresher = Thread()
    world.disc.close()
    assert Thread.joined == [5]


def test_settings_come_from_the_cache_and_fetch_sections():
    cfg = config.loads("[cache]\nid_check_interval = 123\nid_check_min_interval = 45\nrefresh_interval = 678\n"
                       "mx_ttl = 90\n[fetch]\nmax_concurrent = 7\n")
    assert Settings.from_config(cfg) == Settings(id_check_interval=123, id_check_min_interval=45, refresh_interval=678,
                                                 mx_ttl=90, max_concurrent=7, recheck_in_background=True)


# --- a job asked for directly (submit: the socketmap's background lookups) applies the
# cache's answers itself: "a caller that missed the cache just before another job filled
# it lands here"


def test_a_job_for_a_fresh_cached_policy_answers_it_without_a_query(world):
    publish(world.resolver, world.fetcher, DOMAIN, "a1", ENFORCE)
    start = world.clock.now
    world.disc.lookup(DOMAIN)
    world.clock.now = start + 299.5
    assert world.disc.submit(DOMAIN).result(5).policy_id == "a1"
    assert world.resolver.txt_queries == 1
    world.clock.now = start + 300  # the id check is due at this very second
    world.disc.submit(DOMAIN).result(5)
    assert world.resolver.txt_queries == 2


def test_a_job_for_a_domain_with_a_none_answer_answers_it_without_a_query(world):
    world.disc.lookup("nothing.example")
    r = world.disc.submit("nothing.example").result(5)
    assert r == Result("nothing.example", "none", reason="no-txt-record", source="cache")
    assert world.resolver.txt_queries == 1


def test_an_expired_policy_counts_as_nothing_cached_for_the_none_answer(world):
    """discovery.py: "TXT record absent/invalid: an unexpired cached policy still applies;
    with nothing cached the answer is none, cached negative_ttl". An expired policy is
    nothing cached (RFC 8461 §3.2 max_age); the none answer is then used like any other,
    not asked again per lookup until the refresher purges the entry."""
    publish(world.resolver, world.fetcher, DOMAIN, "a1", ENFORCE)
    world.disc.lookup(DOMAIN)
    del world.resolver.txt_records["_mta-sts." + DOMAIN]
    world.clock.now += MAX_AGE  # the very second the policy expires
    assert world.disc.lookup(DOMAIN).status == "none"  # expired, and no record: none, remembered
    before = lookups()
    assert world.disc.lookup(DOMAIN) == Result(DOMAIN, "none", reason="no-txt-record", source="cache")
    assert counted(before, negative=1)  # answered by lookup() itself, not by a job
    assert world.resolver.txt_queries == 2


def test_an_unexpired_policy_outranks_a_none_answer_shared_by_another_daemon(world):
    """RFC 8461 §5.1: a cached policy applies until it expires, whatever DNS says; a "none"
    another daemon shared (it has no policy for the domain) must not switch it off."""
    publish(world.resolver, world.fetcher, DOMAIN, "a1", ENFORCE)
    world.disc.lookup(DOMAIN)
    world.clock.now += 300  # the id check is due: lookup() waits for it (recheck_in_background off)
    world.cache.put_negative(Result(DOMAIN, "none", reason="no-txt-record"), share=False)
    r = world.disc.lookup(DOMAIN)
    assert (r.status, r.policy_id, r.policy.mode) == ("valid", "a1", "enforce")
    assert world.resolver.txt_queries == 2


# --- the answers of a failed fetch, as the front ends get them


def test_a_failed_first_fetch_names_its_reason_and_the_id(world):
    publish(world.resolver, world.fetcher, DOMAIN, "a1", WebPkiError("certificate verify failed"))
    assert world.disc.lookup(DOMAIN) == Result(DOMAIN, "failed", reason="sts-webpki-invalid", policy_id="a1")
    world.clock.now += 10  # within failure_backoff: the failure is the cache's answer now
    assert world.disc.lookup(DOMAIN) == Result(DOMAIN, "failed", reason="sts-webpki-invalid", source="cache",
                                               policy_id="a1")
    assert world.fetcher.fetches == 1


# --- construction: the engine loop and the fleet it is given, the fetch bound's stage


def test_discovery_runs_its_jobs_on_the_engine_loop_it_is_given():
    from stsmilter.engine.loop import EngineLoop

    engine = EngineLoop()
    loops = []

    class Noting(FakeResolver):
        async def txt(self, name, lifetime=None):
            loops.append(asyncio.get_running_loop())
            return await super().txt(name, lifetime)

    clock = Clock()
    cache = PolicyCache(MemoryStore(), 100, 60, 300, clock=clock)
    disc = Discovery(Noting(), FakeFetcher(), cache, Settings(), clock=clock, engine=engine)
    try:
        assert disc.engine is engine
        disc.lookup(DOMAIN)
        assert loops == [engine.loop]
    finally:
        disc.close()
    assert engine.closed  # closed with the Discovery


def test_at_the_fetch_bound_the_fetch_stage_says_so(caplog):
    w = make_world(max_concurrent=1)
    try:
        for name in ("one.example", "two.example"):
            publish(w.resolver, w.fetcher, name, "x1", ENFORCE)
        gate = threading.Event()
        original = w.fetcher.fetch

        async def held(domain, deadline=None):
            await asyncio.to_thread(gate.wait, 10)
            return await original(domain, deadline)

        w.fetcher.fetch = held
        futures = [w.disc.submit(name) for name in ("one.example", "two.example")]
        wait_until(lambda: w.disc.fetch_slots.waiting == 1)
        assert REGISTRY.get_sample_value("stsmilter_discovery_waiting", {"stage": "fetch"}) == 1
        gate.set()
        assert [f.result(5).status for f in futures] == ["valid", "valid"]
        assert "discovery: all 1 fetch slots are busy ([fetch] max_concurrent); 1 waiting, callers waiting for an" \
               " answer first" in [r.getMessage() for r in caplog.records if r.name == "stsmilter.discovery"]
    finally:
        w.disc.close()


def test_a_reload_gives_new_jobs_the_new_resolver_fetcher_and_settings(world):
    resolver, fetcher = FakeResolver(), FakeFetcher()
    publish(resolver, fetcher, DOMAIN, "r1", ENFORCE)
    settings = Settings(id_check_interval=10, recheck_in_background=False)
    world.disc.reconfigure(resolver, fetcher, settings)
    assert world.disc.lookup(DOMAIN).policy_id == "r1"
    assert (resolver.txt_queries, fetcher.fetches, world.resolver.txt_queries) == (1, 1, 0)
    assert world.disc.settings is settings


# --- what a daemon of a fleet takes from the shared store (run on store threads by
# fleet.once): another daemon's policy, "none" or failed fetch, judged like its own


class SharingStore(FakeSharedStore):
    """The fleet's fake store (test_fleet.py), counting what this daemon writes back."""

    def __init__(self, backing, sender):
        super().__init__(backing, sender)
        self.shared_answers = 0

    def put_answer(self, result, ttl):
        self.shared_answers += 1
        super().put_answer(result, ttl)


@pytest.fixture
def shared():
    backing = SharedBacking(None)
    w = make_world(store=SharingStore(backing, "d0"))
    backing.clock = w.clock
    yield w, backing
    w.disc.close()


def stored_policy(w, backing, policy_id="a1", fetched_at=None, max_age=MAX_AGE):
    """Another daemon's fetched policy, in the shared store only."""
    from stsmilter.engine.policy import Policy
    from stsmilter.engine.store import make_entry

    entry = make_entry(DOMAIN, policy_id, Policy("STSv1", "enforce", max_age, ("mx.example.com",)),
                       w.clock.now if fetched_at is None else fetched_at)
    backing.policies.put(entry)
    return entry


def test_a_first_lookup_takes_another_daemons_policy_until_its_expiry_second(shared):
    w, backing = shared
    entry = stored_policy(w, backing, fetched_at=w.clock.now - MAX_AGE + 1)
    assert w.disc._shared_answer(DOMAIN) == entry.result
    w.clock.now += 1  # its expiry second: not a policy any more
    assert w.disc._shared_answer(DOMAIN) is None


def test_a_first_lookup_takes_another_daemons_answers_without_sharing_them_again(shared):
    w, backing = shared
    backing.answers["nothing.example"] = ("none no-txt-record", w.clock.now + 60)
    backing.answers["broken.example"] = ("failed sts-webpki-invalid b1", w.clock.now + 300)
    assert w.disc._shared_answer("nothing.example") == Result("nothing.example", "none", reason="no-txt-record",
                                                              source="cache")
    assert w.disc._shared_answer("broken.example") == Result("broken.example", "failed", reason="sts-webpki-invalid",
                                                             source="cache", policy_id="b1")
    assert w.cache.negative("nothing.example") is not None  # remembered here too...
    assert w.cache.backoff("broken.example", "b1") == "sts-webpki-invalid"
    assert w.cache.store.shared_answers == 0  # ...but not written back: it came from there
    assert w.disc._shared_answer("unknown.example") is None


def test_a_new_id_takes_another_daemons_fetch_of_that_id_made_after_ours(shared):
    w, backing = shared
    ours = w.clock.now - 100
    entry = stored_policy(w, backing, "a2", fetched_at=ours + 1)
    assert w.disc._shared_fetch(DOMAIN, "a2", ours) == entry
    assert w.disc._shared_fetch(DOMAIN, "a2", ours + 1) is None  # not after ours
    assert w.disc._shared_fetch(DOMAIN, "a3", ours) is None  # another id


def test_a_new_id_takes_another_daemons_failed_fetch_of_that_id_only(shared):
    w, backing = shared
    backing.answers[DOMAIN] = ("failed sts-webpki-invalid a2", w.clock.now + 300)
    assert w.disc._shared_fetch(DOMAIN, "a3", 0.0) is None
    assert w.cache.backoff(DOMAIN, "a3") is None
    assert w.disc._shared_fetch(DOMAIN, "a2", 0.0) == "sts-webpki-invalid"
    assert w.cache.backoff(DOMAIN, "a2") == "sts-webpki-invalid" and w.cache.store.shared_answers == 0
    backing.answers[DOMAIN] = ("none no-txt-record", w.clock.now + 60)
    assert w.disc._shared_fetch(DOMAIN, "a2", 0.0) is None


def test_a_refresh_takes_another_daemons_refetch_made_after_ours(shared):
    w, backing = shared
    ours = stored_policy(w, backing, fetched_at=w.clock.now - 10)
    assert w.disc._shared_refresh(DOMAIN, ours) is None  # the store holds ours: nobody refetched it
    theirs = stored_policy(w, backing, fetched_at=w.clock.now)
    assert w.disc._shared_refresh(DOMAIN, ours) == theirs.result


def test_a_daemon_that_missed_the_event_takes_another_daemons_fetch_of_the_new_id():
    """The fleet (test_fleet.py) without events: a new id that another daemon fetched
    after our fetch, more than a minute ago, is taken from the store, not fetched again."""
    from test_fleet import Fleet as FleetWorld

    world = FleetWorld(listen=False)
    try:
        a, b = world.daemons
        publish(world.resolver, world.fetcher, DOMAIN, "a1", ENFORCE)
        a.lookup(DOMAIN)
        b.lookup(DOMAIN)
        world.clock.now += 301
        publish(world.resolver, world.fetcher, DOMAIN, "a2", TESTING)
        assert b.lookup(DOMAIN).policy_id == "a2" and world.fetcher.fetches == 2
        world.clock.now += 200  # a's id check, well over a minute after b's fetch
        r = a.lookup(DOMAIN)
        assert (r.policy_id, r.policy.mode) == ("a2", "testing") and world.fetcher.fetches == 2
    finally:
        world.close()


def test_at_its_expiry_second_a_remembered_failure_answers_instead_of_the_policy(world):
    """A remembered failure answers with the cached policy while it applies, and as a
    failure once it has expired (RFC 8461 §3.2 max_age; §5.1)."""
    publish(world.resolver, world.fetcher, DOMAIN, "a1", ENFORCE)
    fetched_at = world.clock.now
    world.disc.lookup(DOMAIN)
    world.clock.now = fetched_at + MAX_AGE - 1
    world.cache.put_failure(DOMAIN, "dns-error")
    assert world.disc.lookup(DOMAIN).policy_id == "a1"
    world.clock.now = fetched_at + MAX_AGE
    world.cache.put_failure(DOMAIN, "dns-error")
    assert world.disc.lookup(DOMAIN) == Result(DOMAIN, "failed", reason="dns-error", source="cache")
    assert world.resolver.txt_queries == 1


def test_mx_sets_are_kept_for_a_thousand_domains_at_least():
    """The MX cache holds max(1000, [cache] max_entries) sets, least recently used out."""
    clock, resolver = Clock(), FakeResolver()
    cache = PolicyCache(MemoryStore(), 10, 60, 300, clock=clock)  # max_entries 10: the floor decides
    disc = Discovery(resolver, FakeFetcher(), cache, Settings(), clock=clock)
    try:
        domains = [f"d{n}.example" for n in range(1001)]
        for domain in domains[:1000]:
            disc.mx(domain, 1.0)
        disc.mx(domains[0], 1.0)  # from the cache, and now the most recently used
        assert resolver.mx_queries == 1000
        disc.mx(domains[1000], 1.0)  # the 1001st: d1 (least recently used) leaves
        disc.mx(domains[0], 1.0)
        assert resolver.mx_queries == 1001
        disc.mx(domains[1], 1.0)
        assert resolver.mx_queries == 1002
    finally:
        disc.close()


# --- in a fleet without its events (test_fleet.py's daemons, listen=False): what a
# daemon takes from the store instead of fetching


@pytest.fixture
def quiet_fleet():
    from test_fleet import Fleet as FleetWorld

    world = FleetWorld(listen=False)
    yield world
    world.close()


@pytest.mark.parametrize("theirs_after, fetched", [
    (150, 2),  # another daemon fetched it 50 s before our forced re-check: fresh enough
    (100, 3),  # 100 s before: not fresh enough to reject on, fetched again
])
def test_a_forced_recheck_takes_another_daemons_fetch_only_from_the_last_minute(quiet_fleet, theirs_after, fetched):
    world = quiet_fleet
    a, b = world.daemons
    publish(world.resolver, world.fetcher, DOMAIN, "a1", ENFORCE)
    start = world.clock.now
    a.lookup(DOMAIN)
    assert b.lookup(DOMAIN).policy_id == "a1" and world.fetcher.fetches == 1  # b took a's from the store
    world.clock.now = start + 100
    assert a.lookup(DOMAIN, force=True).source == "fetched" and world.fetcher.fetches == 2
    world.clock.now = start + 100 + (200 - theirs_after)  # b's forced re-check
    r = b.lookup(DOMAIN, force=True)
    assert (r.status, r.source, world.fetcher.fetches) == ("valid", "fetched", fetched)


def test_a_refresh_takes_another_daemons_refetch_from_the_store(quiet_fleet):
    world = quiet_fleet
    a, b = world.daemons
    publish(world.resolver, world.fetcher, DOMAIN, "a1", ENFORCE)
    a.lookup(DOMAIN)
    b.lookup(DOMAIN)
    world.clock.now += 3601
    assert a.refresh(DOMAIN).policy_id == "a1" and world.fetcher.fetches == 2
    r = b.refresh(DOMAIN)  # b did not hear of it: the store has it
    assert r.policy_id == "a1" and world.fetcher.fetches == 2
    assert b.cache.peek(DOMAIN).fetched_at == world.clock.now


def test_the_fleet_lock_of_a_new_id_fetch_is_the_domains(quiet_fleet):
    world = quiet_fleet
    a, _ = world.daemons
    publish(world.resolver, world.fetcher, DOMAIN, "a1", ENFORCE)
    a.lookup(DOMAIN)
    world.clock.now += 301
    publish(world.resolver, world.fetcher, DOMAIN, "a2", TESTING)
    held = []
    original = world.fetcher.fetch

    async def noting(domain, deadline=None):
        held.append(sorted(world.backing.locks))
        return await original(domain, deadline)

    world.fetcher.fetch = noting
    assert a.lookup(DOMAIN).policy_id == "a2"
    assert held == [[DOMAIN]] and world.backing.locks == {}


def test_an_mx_set_with_ttl_zero_is_not_kept_even_if_the_clock_steps_back(world):
    """TTL 0 (RFC 1035: not to be cached): asked every time. The clock is the wall clock
    (time.time), which an NTP step can move back."""
    world.resolver.mx_sets[DOMAIN] = dns.MxSet(hosts=("mx1.example.com",), ttl=0)
    world.disc.mx(DOMAIN, 1.0)
    world.clock.now -= 1
    world.disc.mx(DOMAIN, 1.0)
    assert world.resolver.mx_queries == 2
