"""Both stores answer the refresher's questions the same way."""

import random
import shutil
import sqlite3

import pytest
from prometheus_client import REGISTRY

from stsmilter.engine.policy import Policy
from stsmilter.engine.store import (SCHEMA_VERSION, BadEntry, MemoryStore, SqliteStore, UnusableStore, decode_entry,
                                    make_entry)
from world import paths

NOW = 1_800_000_000.0
DAY = 86400.0


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "redis":
        from stsmilter.engine.store.redis import RedisStore

        s = RedisStore(request.getfixturevalue("redis_server").url, clock=lambda: NOW, refresh_interval=DAY)
    else:
        s = MemoryStore() if request.param == "memory" else SqliteStore(str(tmp_path / "c.sqlite"), clock=lambda: NOW)
    yield s
    s.close()


def put(store, domain, fetched_ago, max_age, mode="enforce", failures=0):
    mx = () if mode == "none" else ("mx." + domain,)
    store.put(make_entry(domain, "i1", Policy("STSv1", mode, int(max_age), mx), NOW - fetched_ago,
                         refresh_failures=failures))


def test_due_and_purge(store):
    put(store, "fresh.example", fetched_ago=60, max_age=30 * DAY)
    put(store, "old.example", fetched_ago=2 * DAY, max_age=30 * DAY)  # a refresh_interval has passed
    put(store, "expiring.example", fetched_ago=1900, max_age=3600)  # past half its max_age
    put(store, "short.example", fetched_ago=60, max_age=3600)  # short-lived, but just fetched
    put(store, "expired.example", fetched_ago=2 * DAY, max_age=DAY, failures=4)
    put(store, "failing.example", fetched_ago=60, max_age=30 * DAY, failures=2)
    put(store, "failing-none.example", fetched_ago=60, max_age=30 * DAY, mode="none", failures=2)
    assert sorted(e.domain for e in store.due(NOW, DAY)) == ["expiring.example", "old.example"]
    assert store.purge_expired(NOW) == (0 if store.shared else 1)  # Redis never kept the expired one
    assert store.get("expired.example") is None and store.count() == 6


def test_round_trip_keeps_every_field(store):
    put(store, "a.example", fetched_ago=10, max_age=DAY, failures=3)
    entry = store.get("a.example")
    assert (entry.policy_id, entry.policy.mx, entry.fetched_at, entry.expires, entry.refresh_failures) == (
        "i1", ("mx.a.example",), NOW - 10, NOW - 10 + DAY, 3)
    assert entry.txt_ttl is None  # not known
    store.put(entry.confirmed(NOW - 5, 120))  # the TXT id confirmed, its record's TTL 120 s
    entry = store.get("a.example")
    assert (entry.checked_at, entry.txt_ttl, entry.refresh_failures) == (NOW - 5, 120, 3)
    assert entry.result.status == "valid" and entry.result.source == "cache"
    assert store.delete("a.example") and not store.delete("a.example")


def test_a_damaged_sqlite_row_is_dropped_not_trusted(tmp_path):
    s = SqliteStore(str(tmp_path / "c.sqlite"), clock=lambda: NOW)
    put(s, "a.example", 10, DAY)
    s._db.execute("UPDATE policies SET policy = '{not json' WHERE domain = 'a.example'")
    assert s.get("a.example") is None and list(s.entries()) == []
    s.close()


# --- what is read back is checked, not trusted

GOOD = dict(domain="a.example", policy_id="i1", policy='{"version":"STSv1","mode":"enforce","max_age":86400,"mx":["mx.a.example"]}',
            fetched_at=NOW - 10, checked_at=NOW - 5, refresh_failures=0, last_error=None, txt_ttl=300)


def test_decode_entry_accepts_a_good_entry():
    entry = decode_entry(**GOOD, now=NOW)
    assert (entry.domain, entry.policy.mode, entry.policy.max_age, entry.expires, entry.txt_ttl) == (
        "a.example", "enforce", 86400, NOW - 10 + 86400, 300)


@pytest.mark.parametrize("ttl", [None, 0, 2**31 - 1])
def test_decode_entry_takes_a_missing_zero_or_largest_txt_ttl(ttl):
    assert decode_entry(**dict(GOOD, txt_ttl=ttl), now=NOW).txt_ttl == ttl


def test_entry_fields_is_what_decode_entry_takes():
    entry = decode_entry(**GOOD, now=NOW)
    from stsmilter.engine.store.base import entry_fields
    assert decode_entry(**entry_fields(entry), now=NOW) == entry


@pytest.mark.parametrize("field, value, reason", [
    ("policy", '{"version":"STSv1","mode":"enforce","max_age":1e400,"mx":["mx.a.example"]}', "max_age"),
    ("policy", '{"version":"STSv1","mode":"enforce","max_age":31557601,"mx":["mx.a.example"]}', "max_age"),
    ("policy", '{"version":"STSv1","mode":"enforce","max_age":-1,"mx":["mx.a.example"]}', "max_age"),
    ("policy", '{"version":"STSv1","mode":"enforce","max_age":true,"mx":["mx.a.example"]}', "max_age"),
    ("policy", '{"version":"STSv1","mode":"enforce","max_age":"86400","mx":["mx.a.example"]}', "max_age"),
    ("policy", '{"version":"STSv1","mode":"enforce","max_age":86400,"mx":[]}', "without mx"),
    ("policy", '{"version":"STSv1","mode":"enforce","max_age":86400,"mx":["mx a.example"]}', "mx"),
    ("policy", '{"version":"STSv1","mode":"enforce","max_age":86400,"mx":"mx.a.example"}', "mx"),
    ("policy", '{"version":"STSv1","mode":"Enforce","max_age":86400,"mx":["mx.a.example"]}', "mode"),
    ("policy", '{"version":"STSv2","mode":"enforce","max_age":86400,"mx":["mx.a.example"]}', "version"),
    ("policy", "[" * 100000, "JSON"),
    ("policy", "{not json", "JSON"),
    ("policy", None, "not an object"),
    ("policy", "[]", "not an object"),
    ("fetched_at", "yesterday", "not a time"),
    ("fetched_at", None, "not a time"),
    ("fetched_at", float("inf"), "not a time"),
    ("fetched_at", float("nan"), "not a time"),
    ("fetched_at", -1.0, "out of range"),
    ("fetched_at", NOW + 2 * DAY, "out of range"),  # would never be refreshed nor expire
    ("checked_at", b"\x00", "not a time"),
    ("checked_at", True, "not a time"),
    ("refresh_failures", None, "refresh_failures"),
    ("refresh_failures", -1, "refresh_failures"),
    ("refresh_failures", 2.5, "refresh_failures"),
    ("refresh_failures", 2**63 - 1, "refresh_failures"),
    ("last_error", 7, "last_error"),
    ("domain", None, "domain"),
    ("domain", "A.Example", "domain"),
    ("domain", "a.example.", "domain"),
    ("domain", "[192.0.2.1]", "domain"),
    ("domain", "x" * 300, "domain"),
    ("policy_id", None, "policy id"),
    ("policy_id", "not-valid", "policy id"),
    ("policy_id", "x" * 33, "policy id"),
    ("txt_ttl", -1, "txt_ttl"),
    ("txt_ttl", 2**31, "txt_ttl"),  # RFC 2181 §8: at most 2^31 - 1
    ("txt_ttl", 300.0, "txt_ttl"),
    ("txt_ttl", "300", "txt_ttl"),
    ("txt_ttl", True, "txt_ttl"),
])
def test_decode_entry_rejects_wrong_types_and_ranges(field, value, reason):
    with pytest.raises(BadEntry, match=reason):
        decode_entry(**dict(GOOD, **{field: value}), now=NOW)


@pytest.mark.parametrize("stored, kept", [
    ("sts-webpki-invalid", "sts-webpki-invalid"),
    ("x\x1b[2J\nexample.org id=1 mode=none", "x?[2J?example.org id=1 mode=none"),
    ("caf\u00e9\u202e", "caf??"),
])
def test_decode_entry_keeps_last_error_printable(stored, kept):
    """`stsmilter cache list` prints it to a terminal: a stored value must not carry
    terminal escapes or a line of its own."""
    assert decode_entry(**dict(GOOD, last_error=stored, refresh_failures=1), now=NOW).last_error == kept


V1_COLUMNS = ("domain", "policy_id", "policy", "fetched_at", "expires", "mode", "checked_at", "refresh_failures",
              "last_error")


def nullable_file(path, rows):
    """A schema-version-1 file whose columns accept anything (as a file written by
    another program, or damaged, may): the stored values reach the checks unchanged."""
    db = sqlite3.connect(path)
    db.execute(f"CREATE TABLE policies ({', '.join(V1_COLUMNS)})")
    db.executemany(f"INSERT INTO policies VALUES ({', '.join('?' * len(V1_COLUMNS))})", rows)
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()


def row(**changes):
    values = {**GOOD, "expires": NOW - 10 + 86400, "mode": "enforce", **changes}
    return tuple(values[c] for c in V1_COLUMNS)


def test_bad_rows_are_skipped_counted_and_dropped(tmp_path):
    path = str(tmp_path / "c.sqlite")
    huge = '{"version":"STSv1","mode":"enforce","max_age":1e400,"mx":["mx.a.example"]}'
    nullable_file(path, [
        row(),
        row(domain="huge.example", policy=huge),
        row(domain="text.example", fetched_at="yesterday"),
        row(domain="null.example", policy_id=None),
        row(domain="nulls.example", policy=None, fetched_at=None, checked_at=None, refresh_failures=None),
        row(domain="inf.example", fetched_at=1e400),
        row(domain="mode.example", mode="none"),  # the refresher's mode column disagrees
        row(domain="expires.example", expires=NOW + 10 * 365 * DAY),  # so does its expires
        row(domain=None),
        row(domain=b"\xff\xfe"),
    ])
    bad = REGISTRY.get_sample_value("stsmilter_store_bad_entries_total")
    s = SqliteStore(path, clock=lambda: NOW)
    assert [e.domain for e in s.entries()] == ["a.example"]
    assert s.bad_entries == 9 and REGISTRY.get_sample_value("stsmilter_store_bad_entries_total") == bad + 9
    assert s.count() == 1  # dropped: counted once, not on every read
    assert [e.domain for e in s.due(NOW + 86400, DAY)] == [] and s.bad_entries == 9
    s.close()


# --- schema versions

V0_FILE = str(paths.DATA / "cache-v0.sqlite")
# tests/data/cache-v0.sqlite was written by stsmilter at commit d8917bc (before the schema
# had a version): its SqliteStore.put() of enforce.example (fetched 1796000000, max_age
# 604800), testing.example, none.example and failing.example (3 refresh failures).


def v0_copy(tmp_path, shift):
    """A copy of the v0 file with every time moved by shift seconds (its policies would
    have expired by now), through the v0 columns as they are."""
    path = str(tmp_path / "cache.sqlite")
    shutil.copyfile(V0_FILE, path)
    db = sqlite3.connect(path)
    db.execute("UPDATE policies SET fetched_at = fetched_at + ?, expires = expires + ?, checked_at = checked_at + ?",
               (shift,) * 3)
    db.commit()
    db.close()
    return path


def test_a_cache_written_before_schema_versions_is_adopted_with_its_policies(tmp_path):
    path = v0_copy(tmp_path, NOW - 1_796_000_000)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 0
    s = SqliteStore(path, clock=lambda: NOW)
    entries = {e.domain: e for e in s.entries()}
    assert sorted(entries) == ["enforce.example", "failing.example", "none.example", "testing.example"]
    enforce = entries["enforce.example"]
    assert (enforce.policy_id, enforce.policy.mode, enforce.policy.mx, enforce.fetched_at, enforce.expires) == (
        "20261130", "enforce", ("mx1.enforce.example", "*.mx.enforce.example"), NOW, NOW + 604800)
    assert (entries["failing.example"].refresh_failures, entries["failing.example"].last_error) == (
        3, "sts-webpki-invalid")
    assert entries["testing.example"].checked_at == NOW - 60
    assert s.bad_entries == 0
    s.put(make_entry("new.example", "n1", Policy("STSv1", "testing", 600, ("mx.new.example",)), NOW))
    s.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    again = SqliteStore(path, clock=lambda: NOW)  # a second start: nothing left to migrate
    assert again.count() == 5
    again.close()


V1_FILE = str(paths.DATA / "cache-v1.sqlite")
# tests/data/cache-v1.sqlite was written by stsmilter at commit bfc9dc3 (schema version 1,
# before the TXT record's TTL was kept): its SqliteStore.put() of enforce.example (fetched
# 1796000000, max_age 604800), testing.example (checked 60 s before 1796000000),
# none.example and failing.example (3 refresh failures).


def test_a_version_1_cache_is_migrated_in_place_with_its_policies(tmp_path):
    path = str(tmp_path / "cache.sqlite")
    shutil.copyfile(V1_FILE, path)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 1
    s = SqliteStore(path, clock=lambda: 1_796_000_000.0)
    entries = {e.domain: e for e in s.entries()}
    assert sorted(entries) == ["enforce.example", "failing.example", "none.example", "testing.example"]
    enforce = entries["enforce.example"]
    assert (enforce.policy_id, enforce.policy.mode, enforce.policy.mx, enforce.expires, enforce.txt_ttl) == (
        "20261201", "enforce", ("mx1.enforce.example", "*.mx.enforce.example"), 1_796_604_800.0, None)
    assert entries["testing.example"].checked_at == 1_796_000_000.0 - 60
    assert (entries["failing.example"].refresh_failures, entries["failing.example"].last_error) == (
        3, "sts-webpki-invalid")
    assert all(e.txt_ttl is None for e in entries.values()) and s.bad_entries == 0
    s.put(enforce.confirmed(1_796_000_100.0, 3600))  # the new column takes the TTL
    s.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    assert db.execute("SELECT domain, txt_ttl FROM policies ORDER BY domain").fetchall() == [
        ("enforce.example", 3600), ("failing.example", None), ("none.example", None), ("testing.example", None)]
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    again = SqliteStore(path, clock=lambda: 1_796_000_000.0)  # a second start: nothing left to migrate
    assert again.get("enforce.example").txt_ttl == 3600 and again.count() == 4
    again.close()


def test_a_version_1_cache_read_only_is_read_without_migrating(tmp_path):
    path = str(tmp_path / "cache.sqlite")
    shutil.copyfile(V1_FILE, path)
    before = open(path, "rb").read()
    snapshot = SqliteStore(path, uri=f"file:{path}?mode=ro", clock=lambda: 1_796_000_000.0)
    assert sorted((e.domain, e.txt_ttl) for e in snapshot.entries()) == [
        ("enforce.example", None), ("failing.example", None), ("none.example", None), ("testing.example", None)]
    snapshot.close()
    assert open(path, "rb").read() == before


@pytest.mark.parametrize("setup, reason", [
    ("CREATE TABLE users (name TEXT)", "not a stsmilter cache"),
    ("CREATE TABLE policies (domain TEXT, policy_id TEXT, policy TEXT, fetched_at REAL, expires REAL, mode TEXT,"
     " checked_at REAL, refresh_failures INTEGER, last_error TEXT); PRAGMA user_version = 2", "lacks txt_ttl"),
    ("CREATE TABLE policies (domain TEXT, policy TEXT)", "lacks policy_id, fetched_at"),
    ("CREATE TABLE policies (domain TEXT); PRAGMA user_version = 1", "lacks"),
    ("PRAGMA user_version = 7", "schema version 7, this stsmilter knows 2"),
    ("PRAGMA user_version = -1", "schema version -1"),
])
def test_a_foreign_or_newer_schema_is_unusable_and_left_unchanged(tmp_path, setup, reason):
    path = str(tmp_path / "c.sqlite")
    db = sqlite3.connect(path)
    db.executescript(setup)
    db.close()
    before = open(path, "rb").read()
    with pytest.raises(UnusableStore, match=reason):
        SqliteStore(path)
    assert open(path, "rb").read() == before


JUNK = [None, True, 0, -1, 1, 2**63 - 1, -(2**63), 0.5, -0.0, 1e400, -1e400, float("nan"), NOW, NOW - 10,
        "", "a.example", "A.EXAMPLE", "bücher.example", "xn--bcher-kva.example", "i1", "x" * 5000, "\x00",
        "yesterday", "[]", "{}", "null", "1e400", b"", b"\xff", b"a.example",
        '{"version":"STSv1","mode":"enforce","max_age":86400,"mx":["mx.a.example"]}',
        '{"version":"STSv1","mode":"none","max_age":0,"mx":[]}',
        '{"version":"STSv1","mode":"testing","max_age":86400,"mx":[1, null]}',
        '{"version":"STSv1","mode":"enforce","max_age":86400,"mx":[["mx.a.example"]]}',
        '{"version":null,"mode":{},"max_age":[],"mx":{}}']


def test_any_stored_values_give_an_entry_or_bad_entry_never_another_exception():
    rng = random.Random(8461)
    fields = list(GOOD)
    decoded = 0
    for _ in range(20000):
        values = dict(GOOD)
        for field in rng.sample(fields, rng.randint(1, 3)):
            values[field] = rng.choice(JUNK)
        try:
            entry = decode_entry(**values, now=NOW)
        except BadEntry:
            continue
        decoded += 1
        assert entry.policy.mode in ("enforce", "testing", "none") and 0 <= entry.policy.max_age <= 31557600
        assert 0 <= entry.fetched_at <= NOW + 86400 and entry.expires == entry.fetched_at + entry.policy.max_age
    assert decoded > 100  # the good values do get through


def test_the_sqlite_store_survives_any_stored_values(tmp_path):
    rng = random.Random(12)
    path = str(tmp_path / "c.sqlite")
    rows = []
    for n in range(2000):
        values = {**GOOD, "domain": f"d{n}.example", "expires": NOW - 10 + 86400, "mode": "enforce"}
        for field in rng.sample(list(values), rng.randint(0, 2)):
            values[field] = rng.choice(JUNK)
        rows.append(tuple(values[c] for c in V1_COLUMNS))
    nullable_file(path, rows)
    s = SqliteStore(path, clock=lambda: NOW)
    good = list(s.entries())
    assert 0 < len(good) < 2000 and s.bad_entries == 2000 - len(good)
    assert s.count() == len(good) and list(s.entries()) == good and s.bad_entries == 2000 - len(good)
    s.close()
