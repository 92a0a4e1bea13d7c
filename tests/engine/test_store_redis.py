"""RedisStore against a real private redis-server: keys expire with what they hold, a
prefix keeps installations apart, what Redis holds is checked like a sqlite row, events
work, and an unreachable or silent Redis costs one bounded timeout. (The single-flight
lock, claim() and release(): test_store_redis_lock.py; the answers the refresher gets
are compared with the other stores in test_store.py.)"""

import json
import random
import socket
import threading
import time

import pytest
from prometheus_client import REGISTRY

from stsmilter.engine.policy import FAILED, NONE, Policy, Result
from stsmilter.engine.store import StoreError, make_entry
from stsmilter.engine.store.base import stored_fields
from stsmilter.engine.store.redis import RedisStore
from test_store import JUNK

DAY = 86400.0


@pytest.fixture
def client(redis_server):
    c = redis_server.client()
    yield c
    c.close()


@pytest.fixture
def store(redis_server):
    s = RedisStore(redis_server.url, prefix="t:", refresh_interval=DAY)
    yield s
    s.close()


def policy_entry(domain, fetched_ago=0.0, max_age=DAY, mode="enforce", failures=0, policy_id="i1"):
    mx = () if mode == "none" else (f"mx.{domain}",)
    return make_entry(domain, policy_id, Policy("STSv1", mode, int(max_age), mx), time.time() - fetched_ago,
                      refresh_failures=failures, last_error="sts-webpki-invalid" if failures else None)


def bad_entries():
    return REGISTRY.get_sample_value("stsmilter_store_bad_entries_total") or 0.0


# --- what goes in, and how long it stays


def test_a_policy_key_expires_with_the_policy_and_holds_one_small_json_object(store, client):
    store.put(policy_entry("a.example", fetched_ago=600, max_age=3600))
    ttl = client.pttl("t:p:a.example") / 1000
    assert 2990 < ttl <= 3000
    fields = json.loads(client.get("t:p:a.example"))
    assert fields["policy_id"] == "i1" and fields["policy"]["mx"] == ["mx.a.example"]
    assert "domain" not in fields  # the key names it
    entry = policy_entry("b.example", fetched_ago=600, max_age=3600, failures=2)
    store.put(entry)
    assert store.get("b.example") == entry  # every field, times to the last bit
    store.put(policy_entry("a.example", fetched_ago=7200, max_age=3600))  # already expired: not kept
    assert not client.exists("t:p:a.example") and [e.domain for e in store.entries()] == ["b.example"]


def test_answers_without_a_policy_expire_after_their_ttl_and_are_a_few_bytes(store, client):
    store.put_answer(Result("none.example", NONE, reason="no-txt-record"), 300)
    store.put_answer(Result("broken.example", FAILED, reason="sts-webpki-invalid", policy_id="id7"), 60)
    assert client.get("t:n:none.example") == b"none no-txt-record"
    assert client.get("t:n:broken.example") == b"failed sts-webpki-invalid id7"
    assert 299 < client.pttl("t:n:none.example") / 1000 <= 300 and 59 < client.pttl("t:n:broken.example") / 1000 <= 60
    assert store.get_answer("none.example") == Result("none.example", NONE, "no-txt-record", "cache")
    assert store.get_answer("broken.example") == Result("broken.example", FAILED, "sts-webpki-invalid", "cache", "id7")
    store.put(policy_entry("none.example"))  # a policy replaces the answer
    assert store.get_answer("none.example") is None
    store.put_answer(Result("zero.example", NONE, reason="no-txt-record"), 0)  # negative_ttl = 0: not shared
    assert not client.exists("t:n:zero.example")


def test_a_prefix_keeps_two_installations_apart(store, redis_server, client):
    other = RedisStore(redis_server.url, prefix="other:")
    try:
        store.put(policy_entry("a.example"))
        other.put(policy_entry("b.example"))
        assert [e.domain for e in store.entries()] == ["a.example"] and store.count() == 1
        assert [e.domain for e in other.entries()] == ["b.example"] and other.get("a.example") is None
        assert store.purge_all() == 1
        assert other.count() == 1 and client.exists("other:p:b.example")
    finally:
        other.close()


def test_due_with_a_shorter_interval_than_the_schedule_was_written_with(store):
    store.put(policy_entry("week.example", fetched_ago=2 * 3600, max_age=7 * DAY))
    assert store.due(time.time(), DAY) == []
    assert [e.domain for e in store.due(time.time(), 3600)] == ["week.example"]


def test_purge_expired_drops_the_schedule_of_keys_redis_expired(store, client):
    store.put(policy_entry("short.example", fetched_ago=0, max_age=1))
    store.put(policy_entry("long.example"))
    time.sleep(1.1)
    assert not client.exists("t:p:short.example") and store.count() == 2  # the key went, the member stayed
    assert store.purge_expired(time.time()) == 1
    assert store.count() == 1 and [e.domain for e in store.entries()] == ["long.example"]


# --- what comes back is input


@pytest.mark.parametrize("value, reason", [
    (b"{not json", "not JSON"),
    (b"[" * 100000, "JSON"),
    (b"[]", "not an object"),
    (b"x" * (256 * 1024 + 1), "bytes"),
    (json.dumps({"policy_id": "i1", "policy": {"version": "STSv1", "mode": "enforce", "max_age": 1e400,
                                               "mx": ["mx.a.example"]}, "fetched_at": 1, "checked_at": 1}), "max_age"),
    (json.dumps({"policy_id": "not valid", "policy": {}, "fetched_at": 1, "checked_at": 1}), "policy id"),
], ids=["not-json", "deep", "list", "huge", "max-age", "policy-id"])
def test_a_bad_value_is_skipped_counted_and_dropped(store, client, value, reason):
    store.put(policy_entry("good.example"))
    client.set("t:p:bad.example", value)
    client.zadd("t:due", {"bad.example": 0})
    before = bad_entries()
    assert store.get("bad.example") is None
    assert store.bad_entries == 1 and reason in store.last_bad[1] and bad_entries() == before + 1
    assert not client.exists("t:p:bad.example")  # dropped: counted once
    assert [e.domain for e in store.entries()] == ["good.example"] and store.bad_entries == 1


def test_a_bad_domain_in_the_schedule_or_a_key_is_never_trusted(store, client):
    good = stored_fields(policy_entry("good.example"))
    for member in (b"\xff\xfe", b"UPPER.example", b"[192.0.2.1]", b"x" * 300):
        client.zadd("t:due", {member: 0})
        client.set(b"t:p:" + member, json.dumps(good))
    assert list(store.entries()) == [] and store.bad_entries == 4
    assert store.count() == 0 and client.keys("t:p:*") == [b"t:p:\xff\xfe"]  # (never read: not a domain)


def test_any_stored_fields_give_an_entry_or_are_skipped(store, client):
    rng = random.Random(8462)
    good = stored_fields(policy_entry("x.example"))
    for n in range(500):
        fields = dict(good)
        for name in rng.sample(list(fields), rng.randint(0, 2)):
            fields[name] = rng.choice([j.decode("latin-1") if isinstance(j, bytes) else j for j in JUNK])
        if rng.random() < 0.1:
            del fields[rng.choice(list(fields))]
        if rng.random() < 0.1:
            fields["added_by_a_newer_release"] = [1, 2]
        try:
            value = json.dumps(fields)
        except ValueError:  # nan/inf are written as such by json.dumps; fine either way
            value = "{}"
        client.set(f"t:p:d{n}.example", value)
        client.zadd("t:due", {f"d{n}.example": 0})
    good_entries = list(store.entries())
    assert 0 < len(good_entries) < 500 and store.bad_entries == 500 - len(good_entries)
    assert list(store.entries()) == good_entries and store.bad_entries == 500 - len(good_entries)


def test_unknown_names_are_ignored_and_missing_ones_take_their_default(store, client):
    fields = stored_fields(policy_entry("a.example", failures=2))
    fields["added_by_a_newer_release"] = {"x": 1}
    del fields["last_error"], fields["refresh_failures"]
    client.set("t:p:a.example", json.dumps(fields))
    entry = store.get("a.example")
    assert (entry.policy_id, entry.refresh_failures, entry.last_error) == ("i1", 0, None)


@pytest.mark.parametrize("value", [b"none", b"none no-txt-record id1", b"failed sts-webpki-invalid",
                                   b"failed sts-webpki-invalid not-an-id", b"valid x", b"none NO", b"\xff",
                                   b"none " + b"a" * 200, b""], ids=lambda v: repr(v[:30]))
def test_a_bad_answer_is_skipped_counted_and_dropped(store, client, value):
    client.set("t:n:a.example", value)
    assert store.get_answer("a.example") is None and store.bad_entries == 1
    assert not client.exists("t:n:a.example")




def sent_by_redis(client):
    return client.info("stats")["total_net_output_bytes"]


def test_a_huge_value_is_found_too_large_without_being_read(store, client):
    """Redis strings may hold 512 MB: reading one whole to find it too large would cost
    every daemon that much memory at once."""
    huge = b"{" + b" " * (32 * 1024 * 1024)
    client.set("t:p:a.example", huge)
    client.set("t:p:b.example", huge)
    client.zadd("t:due", {"a.example": 0, "b.example": 0})
    client.set("t:n:c.example", huge)
    before = sent_by_redis(client)
    assert store.get("a.example") is None and list(store.entries()) == []
    assert store.bad_entries == 2 and "bytes" in store.last_bad[1]
    assert store.get_answer("c.example") is None and store.bad_entries == 3
    assert sent_by_redis(client) - before < 4 * 1024 * 1024
    assert not client.exists("t:p:a.example", "t:p:b.example", "t:n:c.example")

WRONG_TYPES = {
    "list": lambda c, key: c.rpush(key, "x"),
    "hash": lambda c, key: c.hset(key, "a", "b"),
    "set": lambda c, key: c.sadd(key, "a"),
    "zset": lambda c, key: c.zadd(key, {"a": 1}),
    "stream": lambda c, key: c.xadd(key, {"a": "b"}),
}


@pytest.mark.parametrize("kind", WRONG_TYPES)
def test_a_policy_or_answer_key_of_another_type_is_skipped_counted_and_dropped(store, client, kind):
    """Not a StoreError (which would make the whole daemon leave Redis alone for a while,
    and again at every lookup of the domain): one bad entry, dropped."""
    store.put(policy_entry("good.example"))
    WRONG_TYPES[kind](client, "t:p:bad.example")
    WRONG_TYPES[kind](client, "t:n:bad.example")
    client.zadd("t:due", {"bad.example": 0})
    before = bad_entries()
    assert store.get("bad.example") is None
    assert store.get_answer("bad.example") is None
    assert store.bad_entries == 2 and bad_entries() == before + 2
    assert "not a string" in store.last_bad[1]
    assert not client.exists("t:p:bad.example") and not client.exists("t:n:bad.example")
    assert [e.domain for e in store.entries()] == ["good.example"] and store.bad_entries == 2


@pytest.mark.parametrize("kind", ["string", "list", "hash"])
def test_a_schedule_or_event_stream_of_another_type_is_replaced_not_a_lasting_failure(store, redis_server,
                                                                                      client, kind):
    def spoil(key):
        if kind == "string":
            client.set(key, "junk")
        else:
            WRONG_TYPES[kind](client, key)

    spoil("t:due")
    before = bad_entries()
    store.put(policy_entry("a.example"))
    assert [e.domain for e in store.entries()] == ["a.example"] and store.count() == 1
    assert store.bad_entries == 1 and bad_entries() == before + 1 and "t:due" in store.last_bad[0]
    spoil("t:events")
    reader = RedisStore(redis_server.url, prefix="t:")
    try:
        position = reader.last_event()
        assert reader.bad_entries == 1 and "t:events" in reader.last_bad[0]
        store.announce("purge", "a.example")
        assert reader.read_events(position, 0.1)[1] == [("purge", "a.example", store.sender)]
    finally:
        reader.close()
    assert client.type("t:due") == b"zset" and client.type("t:events") == b"stream"


# --- events


def test_events_reach_another_store_and_malformed_ones_are_skipped(store, redis_server, client):
    reader = RedisStore(redis_server.url, prefix="t:")
    try:
        position = reader.last_event()
        assert position == b"0-0"
        store.announce("changed", "a.example")
        client.xadd("t:events", {"op": "purge", "domain": "NOT.normalized", "from": "x"})
        client.xadd("t:events", {"op": "explode", "domain": "a.example", "from": "x"})
        client.xadd("t:events", {"op": b"\xff", "domain": "a.example"})
        client.xadd("t:events", {"op": "purge-all", "domain": "a.example", "from": "x"})
        store.announce("purge", "b.example")
        store.announce("purge-all")
        position, events = reader.read_events(position, 0.1)
        assert events == [("changed", "a.example", store.sender), ("purge", "b.example", store.sender),
                          ("purge-all", "", store.sender)]
        assert reader.read_events(position, 0.1) == (position, [])
        started = time.monotonic()
        later = threading.Timer(0.3, store.announce, ("changed", "c.example"))
        later.start()
        _, events = reader.read_events(position, 5)  # a blocking read: returns on the event
        later.join()
        assert events == [("changed", "c.example", store.sender)] and time.monotonic() - started < 2
    finally:
        reader.close()


# --- a Redis that is not there, or does not answer


def test_an_unreachable_redis_is_one_quick_store_error(free_port_url):
    store = RedisStore(free_port_url, timeout=0.3)
    started = time.monotonic()
    for call in (lambda: store.get("a.example"), lambda: store.put(policy_entry("a.example")), store.count,
                 lambda: store.claim("a.example", 1), lambda: store.read_events(b"0-0", 0.1)):
        with pytest.raises(StoreError, match="redis: .*[Cc]onnect") as failure:
            call()
        assert failure.value.kind == "ConnectionError"
    assert time.monotonic() - started < 2
    store.close()


@pytest.fixture
def free_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{s.getsockname()[1]}/0"


@pytest.fixture
def silent_server():
    """A TCP server that accepts and never answers (a hung Redis); its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held, stop = [], threading.Event()

    def accept():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def test_a_silent_redis_costs_one_timeout_per_call_and_no_retry(silent_server):
    store = RedisStore(silent_server, timeout=0.3)
    for call in (lambda: store.get("a.example"), lambda: store.put(policy_entry("a.example"))):
        started = time.monotonic()
        with pytest.raises(StoreError) as failure:
            call()
        assert 0.25 < time.monotonic() - started < 0.9 and failure.value.kind == "TimeoutError"
    store.close()


def test_the_password_never_reaches_a_log_line():
    store = RedisStore("redis://user:s3cret@127.0.0.1:1/0", timeout=0.1)
    assert "s3cret" not in store.name and store.name == "redis://user:***@127.0.0.1:1/0"
    with pytest.raises(StoreError) as failure:
        store.get("a.example")
    assert "s3cret" not in str(failure.value)
    store.close()
