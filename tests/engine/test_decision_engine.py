"""The milter's decision over a real Discovery (fake DNS and fetch, fake clock): the
permanent reject of RFC 8461 §5 only after a refetch that really happens, and the
forced re-check that runs past the decision's deadline tempfails instead.

test_decision.py covers every decision over a scripted discovery; here the engine
decides what the forced re-check returns, so the fetch count is what proves it."""

import time

import pytest

from stsmilter import config
from stsmilter.engine import dns
from stsmilter.engine.cache import PolicyCache
from stsmilter.engine.decision import Decider
from stsmilter.engine.discovery import FORCE_FRESH_SECONDS, Discovery, Settings
from stsmilter.engine.store import MemoryStore
from test_discovery import ENFORCE, Clock, FakeFetcher, FakeResolver, publish

DOMAIN = "example.com"
RECIPIENT = "<user@example.com>"
WRONG_MX = ("mx.elsewhere.example",)  # the policy says mx.example.com


@pytest.fixture
def engine():
    clock, resolver, fetcher = Clock(), FakeResolver(), FakeFetcher()
    cache = PolicyCache(MemoryStore(), 1000, negative_ttl=60, failure_backoff=300, clock=clock)
    disc = Discovery(resolver, fetcher, cache, Settings(id_check_interval=300), clock=clock)
    publish(resolver, fetcher, DOMAIN, "a1", ENFORCE)
    resolver.mx_sets[DOMAIN] = dns.MxSet(hosts=WRONG_MX, ttl=300)
    disc.lookup(DOMAIN)  # cached, fetch 1
    yield clock, resolver, fetcher, disc
    disc.close()


def decider(disc, **milter):
    cfg = config.defaults().replace(milter={"on_violation": "reject", **milter}, socketmap={"dane": "no"})
    return Decider(disc, cfg.milter, cfg.scope)


def test_a_reject_follows_a_refetch_that_confirms_the_violation(engine):
    clock, resolver, fetcher, disc = engine
    clock.now += FORCE_FRESH_SECONDS + 1  # the cached policy is not fresh enough to reject on
    d = decider(disc).decide(RECIPIENT)
    assert (d.action, d.reason, d.reply[:2]) == ("reject", "mx-mismatch", ("550", "5.7.5"))
    assert fetcher.fetches == 2  # the policy was fetched again before the permanent answer


def test_a_policy_fetched_within_the_last_minute_is_not_fetched_again(engine):
    clock, resolver, fetcher, disc = engine
    clock.now += FORCE_FRESH_SECONDS - 1
    assert decider(disc).decide(RECIPIENT).action == "reject"
    assert fetcher.fetches == 1


def test_a_refetch_that_now_allows_the_mx_accepts(engine):
    clock, resolver, fetcher, disc = engine
    clock.now += FORCE_FRESH_SECONDS + 1
    fetcher.bodies[DOMAIN] = ENFORCE.replace(b"mx: mx.example.com", b"mx: mx.elsewhere.example")
    d = decider(disc).decide(RECIPIENT)
    assert (d.action, d.reason) == ("accept", "mx-match")
    assert fetcher.fetches == 2


def test_a_refetch_still_running_at_the_deadline_tempfails(engine):
    """forced lookup -> pending at the deadline -> 451, never a 550 on an old policy; the
    refetch goes on and fills the cache."""
    clock, resolver, fetcher, disc = engine
    clock.now += FORCE_FRESH_SECONDS + 1
    fetcher.delay = 1.0
    started = time.monotonic()
    d = decider(disc).decide(RECIPIENT, deadline=time.monotonic() + 0.3)
    assert time.monotonic() - started < 0.8
    assert (d.action, d.would, d.reason) == ("tempfail", "tempfail", "mx-mismatch")
    assert d.reply[:2] == ("451", "4.7.5") and "(policy could not be re-checked)" in d.reply[2]
    deadline = time.monotonic() + 5
    while disc.cache.peek(DOMAIN).fetched_at != clock.now:
        assert time.monotonic() < deadline, "the refetch did not finish"
        time.sleep(0.01)
    assert fetcher.fetches == 2


def test_a_refetch_that_fails_tempfails(engine):
    from stsmilter.engine.fetch import FetchError

    clock, resolver, fetcher, disc = engine
    clock.now += FORCE_FRESH_SECONDS + 1
    fetcher.bodies[DOMAIN] = FetchError("HTTP 503")
    d = decider(disc).decide(RECIPIENT)
    assert (d.action, d.reason) == ("tempfail", "mx-mismatch")
    assert "(policy could not be re-checked)" in d.reply[2]
