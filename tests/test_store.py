"""Both stores answer the refresher's questions the same way."""

import pytest

from stsmilter.policy import Policy
from stsmilter.store import MemoryStore, SqliteStore, make_entry

NOW = 1_800_000_000.0
DAY = 86400.0


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    s = MemoryStore() if request.param == "memory" else SqliteStore(str(tmp_path / "c.sqlite"))
    yield s
    s.close()


def put(store, domain, fetched_ago, max_age, mode="enforce", failures=0):
    mx = () if mode == "none" else ("mx." + domain,)
    store.put(make_entry(domain, "i1", Policy("STSv1", mode, int(max_age), mx), NOW - fetched_ago,
                         refresh_failures=failures))


def test_due_purge_and_failing(store):
    put(store, "fresh.example", fetched_ago=60, max_age=30 * DAY)
    put(store, "old.example", fetched_ago=2 * DAY, max_age=30 * DAY)  # a refresh_interval has passed
    put(store, "expiring.example", fetched_ago=1900, max_age=3600)  # past half its max_age
    put(store, "short.example", fetched_ago=60, max_age=3600)  # short-lived, but just fetched
    put(store, "expired.example", fetched_ago=2 * DAY, max_age=DAY, failures=4)
    put(store, "failing.example", fetched_ago=60, max_age=30 * DAY, failures=2)
    put(store, "failing-none.example", fetched_ago=60, max_age=30 * DAY, mode="none", failures=2)
    assert sorted(e.domain for e in store.due(NOW, DAY)) == ["expiring.example", "old.example"]
    assert store.count_failing(NOW) == 1
    assert store.purge_expired(NOW) == 1
    assert store.get("expired.example") is None and store.count() == 6


def test_round_trip_keeps_every_field(store):
    put(store, "a.example", fetched_ago=10, max_age=DAY, failures=3)
    entry = store.get("a.example")
    assert (entry.policy_id, entry.policy.mx, entry.fetched_at, entry.expires, entry.refresh_failures) == (
        "i1", ("mx.a.example",), NOW - 10, NOW - 10 + DAY, 3)
    assert entry.result.status == "valid" and entry.result.source == "cache"
    assert store.delete("a.example") and not store.delete("a.example")


def test_a_damaged_sqlite_row_is_dropped_not_trusted(tmp_path):
    s = SqliteStore(str(tmp_path / "c.sqlite"))
    put(s, "a.example", 10, DAY)
    s._db.execute("UPDATE policies SET policy = '{not json' WHERE domain = 'a.example'")
    assert s.get("a.example") is None and list(s.entries()) == []
    s.close()
