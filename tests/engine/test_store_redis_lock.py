"""RedisStore's single-flight lock against a real private redis-server: claim() and
release() are how a fleet keeps to one fetch per policy (fleet.py: the daemon holding a
domain's claim fetches, the others wait for its answer).

The rules, as README "Several daemons" and fleet.py use them:
- one claim per domain at a time, per prefix; a claim is SET NX with an expiry (PX), so
  a holder that dies frees the domain after `seconds`;
- release() deletes the claim only while it is still the caller's: a claim that expired
  and was taken by another daemon survives the late release of its former holder;
- the value is a random token of our own (never redis-py's uuid1 default, which would
  put this host's MAC address into Redis);
- a key there without an expiry is not a claim (nobody would ever free it): it is
  counted as a bad entry and replaced by a claim;
- every Redis failure is one StoreError (one line, .kind the cause).

`make mutate` runs these against claim, release and what they call
(tests/mutation/mutate.py); each test starts its own redis-server (~50 ms).
"""

import re
import threading
import time
import uuid

import pytest
import redis.exceptions
import redis.lock

from stsmilter.engine.store import StoreError
from stsmilter.engine.store import redis_client
from stsmilter.engine.store.redis import RedisStore


@pytest.fixture
def client(redis_server):
    c = redis_server.client()
    yield c
    c.close()


@pytest.fixture
def stores(redis_server):
    """new(prefix="t:") -> a RedisStore on the private server; all closed at teardown."""
    made = []

    def new(prefix="t:", **kwargs):
        store = RedisStore(redis_server.url, prefix=prefix, **kwargs)
        made.append(store)
        return store

    yield new
    for store in made:
        store.close()


def in_thread(call, within=5.0):
    """call() in another thread; its outcome, or a failure if it has not returned within
    `within` seconds (a claim must never wait for another daemon's)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as e:  # handed to the test below
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(within)
    assert not thread.is_alive(), f"still running after {within} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# --- claim


def test_a_claim_is_the_domains_lock_key_with_an_expiry(stores, client):
    store = stores()
    lock = store.claim("a.example", 5)
    assert lock is not None
    assert client.keys("*") == [b"t:l:a.example"]  # <prefix>l:<domain>, and nothing else
    assert 4000 < client.pttl("t:l:a.example") <= 5000  # PX: seconds as milliseconds
    short = store.claim("b.example", 0.3)
    assert 0 < client.pttl("t:l:b.example") <= 300
    assert short is not None


def test_a_held_domain_is_refused_at_once_and_other_domains_are_free(stores):
    one, two = stores(), stores()
    assert one.claim("a.example", 30) is not None
    started = time.monotonic()
    assert in_thread(lambda: two.claim("a.example", 30)) is None  # never waits for the holder
    assert in_thread(lambda: one.claim("a.example", 30)) is None  # not even its own holder's store
    assert time.monotonic() - started < 2
    assert two.claim("b.example", 30) is not None  # one lock per domain


def test_the_prefix_separates_claims_of_two_installations(stores, client):
    assert stores("t:").claim("a.example", 5) is not None
    assert stores("other:").claim("a.example", 5) is not None
    assert sorted(client.keys("*")) == [b"other:l:a.example", b"t:l:a.example"]


def test_the_token_is_random_and_not_a_uuid1(stores, client):
    store = stores()
    tokens = []
    for n in range(4):
        assert store.claim(f"d{n}.example", 5) is not None
        tokens.append(client.get(f"t:l:d{n}.example").decode("ascii"))
    assert all(re.fullmatch(r"[0-9a-f]{32}", token) for token in tokens), tokens  # 128 random bits, in hex
    assert len(set(tokens)) == 4
    mac = "%012x" % uuid.getnode()
    assert not any(token.endswith(mac) for token in tokens)  # uuid1's node field is the MAC address


def test_the_token_is_ours_whatever_redis_pys_default(stores, client, monkeypatch):
    """redis-py's own token is uuid1 (with the MAC address) in Debian's 4.3 and uuid4 in
    later releases: a claim never leaves it to redis-py, neither on its first SET NX nor
    on the one after replacing a stuck key."""
    marker = uuid.UUID("5e11ed00-0000-1000-8000-00005e11ed00")

    class DefaultTokens:
        uuid1 = uuid4 = staticmethod(lambda *args, **kwargs: marker)

    monkeypatch.setattr(redis.lock, "uuid", DefaultTokens)
    client.set("t:l:stuck.example", "junk")
    store = stores()
    for domain in ("a.example", "stuck.example"):
        assert store.claim(domain, 5) is not None
        token = client.get(f"t:l:{domain}")
        assert re.fullmatch(rb"[0-9a-f]{32}", token) and token != marker.hex.encode()


def test_a_claim_that_expired_can_be_taken_again(stores, client):
    one, two = stores(), stores()
    assert one.claim("a.example", 0.2) is not None
    deadline = time.monotonic() + 5
    while client.exists("t:l:a.example") and time.monotonic() < deadline:  # Redis expires it
        time.sleep(0.02)
    assert two.claim("a.example", 5) is not None  # its holder died: the domain is free again


# --- release


def test_release_frees_the_domain(stores, client):
    one, two = stores(), stores()
    lock = one.claim("a.example", 30)
    assert two.claim("a.example", 30) is None
    one.release(lock)
    assert not client.exists("t:l:a.example")
    assert two.claim("a.example", 30) is not None


def test_a_claim_taken_in_one_thread_is_released_from_another(stores, client):
    """fleet.py may release from another thread than the one that claimed: the token
    must not live in thread-local storage (redis-py's default)."""
    store = stores()
    lock = in_thread(lambda: store.claim("a.example", 30))
    store.release(lock)
    assert not client.exists("t:l:a.example")


def test_a_late_release_leaves_the_new_holders_claim_alone(stores, client):
    """The work took longer than the claim: it expired, another daemon claimed the
    domain and is fetching. The first daemon's release must not free the domain (a plain
    DEL would let a third daemon fetch too: two fetches of one policy)."""
    first, second, third = stores(), stores(), stores()
    late = first.claim("a.example", 0.2)
    assert late is not None
    deadline = time.monotonic() + 5
    while client.exists("t:l:a.example") and time.monotonic() < deadline:
        time.sleep(0.02)
    current = second.claim("a.example", 30)
    assert current is not None
    token = client.get("t:l:a.example")
    first.release(late)  # too late: no error, and nothing happens
    assert client.get("t:l:a.example") == token and client.pttl("t:l:a.example") > 25000
    assert third.claim("a.example", 30) is None  # still held by the second daemon
    second.release(current)
    assert third.claim("a.example", 30) is not None


def test_releasing_twice_is_harmless(stores, client):
    store = stores()
    lock = store.claim("a.example", 30)
    store.release(lock)
    other = stores().claim("a.example", 30)
    store.release(lock)  # the lock knows it released already: the new claim stays
    assert other is not None and client.exists("t:l:a.example")


# --- a key there that is not one of our claims


def test_a_lock_key_that_never_expires_is_replaced_by_a_claim(stores, client):
    """Our claims always expire (SET NX PX): a key without a TTL there is not one of
    ours, and would otherwise make every first lookup of the domain wait the lock out
    and keep its refresh from ever running."""
    store = stores()
    client.set("t:l:a.example", "junk")
    client.rpush("t:l:b.example", "junk")
    lock = store.claim("a.example", 5)
    assert lock is not None and store.bad_entries == 1
    assert store.last_bad == ("t:l:a.example", "a lock without expiry")
    assert store.claim("b.example", 5) is not None and store.bad_entries == 2
    assert store.last_bad == ("t:l:b.example", "a lock without expiry")
    for key in ("t:l:a.example", "t:l:b.example"):
        assert client.type(key) == b"string" and 0 < client.pttl(key) <= 5000
        assert re.fullmatch(rb"[0-9a-f]{32}", client.get(key))
    assert store.claim("a.example", 5) is None  # our own claim stands
    assert store.bad_entries == 2
    store.release(lock)
    assert not client.exists("t:l:a.example")


def test_a_claim_of_another_daemon_is_not_a_bad_entry(stores):
    one, two = stores(), stores()
    assert one.claim("a.example", 30) is not None
    assert two.claim("a.example", 30) is None and two.bad_entries == 0 and two.last_bad is None


def test_a_claim_that_ends_while_it_is_looked_at_is_not_a_bad_entry(stores, client, monkeypatch):
    """The holder released (or its claim expired) between our SET NX and our PTTL: the
    key is gone (PTTL -2), which is no stuck lock; the domain's answer is coming."""
    store = stores()
    client.set("t:l:a.example", "theirs", px=30000)
    real_pttl = store._client.pttl

    def released_meanwhile(key):
        client.delete(key)
        return real_pttl(key)

    monkeypatch.setattr(store._client, "pttl", released_meanwhile)
    assert store.claim("a.example", 5) is None
    assert store.bad_entries == 0 and not client.exists("t:l:a.example")


def test_a_stuck_key_replaced_under_our_feet_is_not_waited_for(stores, client, monkeypatch):
    """Another daemon claims the domain between our DEL of a stuck key and our second
    SET NX: we are refused at once, not made to wait for its claim."""
    store, other = stores(), stores()
    client.set("t:l:a.example", "junk")
    real_delete = store._client.delete
    taken = []

    def delete_and_lose_the_race(*keys):
        removed = real_delete(*keys)
        taken.append(other.claim("a.example", 0.5))
        return removed

    monkeypatch.setattr(store._client, "delete", delete_and_lose_the_race)
    started = time.monotonic()
    assert in_thread(lambda: store.claim("a.example", 5)) is None
    assert time.monotonic() - started < 0.4  # not the other's 0.5 s claim waited out
    assert taken[0] is not None and store.bad_entries == 1


# --- failures are one StoreError


def test_a_redis_that_went_away_is_one_store_error_for_release_and_claim(redis_server, stores):
    store = stores(timeout=0.3)
    held = store.claim("a.example", 5)
    redis_server.stop()  # killed while the claim is held
    for call in (lambda: store.release(held), lambda: store.claim("a.example", 1)):
        with pytest.raises(StoreError) as failure:
            call()
        assert failure.value.kind == "ConnectionError"
        text = str(failure.value)
        assert text.startswith("redis: ") and "\n" not in text and re.search("[Cc]onnect", text)


def test_a_lock_replaced_by_another_type_fails_its_release_as_a_store_error(stores, client):
    store = stores()
    lock = store.claim("a.example", 30)
    client.delete("t:l:a.example")
    client.rpush("t:l:a.example", "junk")  # WRONGTYPE for the release script's GET
    with pytest.raises(StoreError) as failure:
        store.release(lock)
    assert failure.value.kind == "ResponseError" and "WRONGTYPE" in str(failure.value)
    assert client.type("t:l:a.example") == b"list" and store.bad_entries == 0  # nothing of ours to replace


@pytest.mark.parametrize("error, expected", [
    (redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:1.\nConnection refused."),
     ("redis: Error 111 connecting to 127.0.0.1:1.", "ConnectionError")),
    (redis.exceptions.TimeoutError(), ("redis: TimeoutError", "TimeoutError")),
    (OSError("second\nline"), ("redis: second", "OSError")),
])
def test_a_failure_is_one_line_naming_its_cause(error, expected):
    failure = redis_client.failure(error)
    assert isinstance(failure, StoreError) and (str(failure), failure.kind) == expected


@pytest.mark.parametrize("error, wrong_type", [
    (redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), True),
    (redis.exceptions.ResponseError("Command # 2 (ZADD t:due 1 a) of pipeline caused error: WRONGTYPE ..."), True),
    (redis.exceptions.ResponseError("ERR unknown command"), False),
    (redis.exceptions.ConnectionError("WRONGTYPE"), False),  # only a reply says so
])
def test_wrong_type_is_told_from_other_errors(error, wrong_type):
    assert redis_client.wrong_type(error) is wrong_type


class _Calls:
    """A stand-in for a RedisStore: counts _replace_foreign_keys() calls."""

    def __init__(self, replaced):
        self.replaced, self.replacements = replaced, 0

    def _replace_foreign_keys(self):
        self.replacements += 1
        return self.replaced


def test_the_error_wrapper_retries_once_after_replacing_a_foreign_key():
    attempts = []

    @redis_client.redis_errors
    def method(self, value, *, keyword):
        attempts.append((value, keyword))
        if len(attempts) == 1:
            raise redis.exceptions.ResponseError("WRONGTYPE Operation against a key")
        return "answer"

    assert method.__name__ == "method"  # functools.wraps: log lines and tracebacks name it
    store = _Calls(replaced=True)
    assert method(store, 1, keyword=2) == "answer"
    assert attempts == [(1, 2), (1, 2)] and store.replacements == 1


@pytest.mark.parametrize("message, replaced, replacements", [
    ("WRONGTYPE Operation against a key", False, 1),  # nothing to replace: the error stands
    ("ERR something else", True, 0),  # not a wrong type: nothing is looked at
])
def test_the_error_wrapper_raises_a_store_error_when_a_retry_cannot_help(message, replaced, replacements):
    attempts = []

    @redis_client.redis_errors
    def method(self):
        attempts.append(1)
        raise redis.exceptions.ResponseError(message)

    store = _Calls(replaced)
    with pytest.raises(StoreError) as failure:
        method(store)
    assert (str(failure.value), failure.value.kind) == ("redis: " + message, "ResponseError")
    assert failure.value.__cause__ is None and failure.value.__suppress_context__  # "from None": one line
    assert len(attempts) == 1 and store.replacements == replacements


def test_the_error_wrapper_passes_other_exceptions_through():
    @redis_client.redis_errors
    def method(self):
        raise KeyError("a bug, not a Redis failure")

    with pytest.raises(KeyError):
        method(_Calls(False))
