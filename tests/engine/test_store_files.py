"""open_store() on real files in every state: the daemon always gets a store (moving an
unusable file aside, or memory only), the one-shot commands get one line of error.
Faults that need another user or a real file system (unreadable files, read-only and full
file systems) are exercised against the real daemon in test_store_faults.py."""

import glob
import logging
import os
import sqlite3
import time

import pytest
from prometheus_client import REGISTRY

from stsmilter.engine.policy import Policy
from stsmilter.engine.store import MemoryStore, SqliteStore, StoreError, make_entry, open_store
from stsmilter.engine.store.files import move_aside

POLICY = Policy("STSv1", "enforce", 86400, ("mx.a.example",))


def opened(op="open"):
    return REGISTRY.get_sample_value("stsmilter_store_errors_total", {"op": op})


def filled(path, n=1):
    s = SqliteStore(path)
    for i in range(n):
        s.put(make_entry(f"d{i}.example", "i1", POLICY, time.time()))
    s.close()


def truncated(path):
    filled(path, 2000)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def foreign(path):
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE mailboxes (address TEXT)")
    db.commit()
    db.close()


def newer(path):
    filled(path)
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 3")
    db.close()


UNUSABLE = {
    "random-bytes": (lambda p, rng: open(p, "wb").write(rng.randbytes(8192)), "not a SQLite database"),
    "text": (lambda p, _rng: open(p, "w").write("hello\n"), "not a SQLite database"),
    "truncated": (lambda p, _rng: truncated(p), "damaged|malformed"),
    "foreign-schema": (lambda p, _rng: foreign(p), "not a stsmilter cache"),
    "newer-schema": (lambda p, _rng: newer(p), "schema version 3"),
}


@pytest.mark.parametrize("name", UNUSABLE)
def test_the_daemon_moves_an_unusable_file_aside_and_starts_empty(tmp_path, caplog, name, rng):
    make, reason = UNUSABLE[name]
    path = str(tmp_path / "cache.sqlite")
    make(path, rng)
    with open(path, "rb") as f:
        content = f.read()
    before = opened()
    with caplog.at_level(logging.INFO, "stsmilter"):
        store = open_store(path)
    assert isinstance(store, SqliteStore) and store.count() == 0
    store.put(make_entry("a.example", "i1", POLICY, time.time()))  # and it works
    store.close()
    [moved] = glob.glob(f"{path}.corrupt-*")
    assert moved.startswith(f"{path}.corrupt-{time.strftime('%Y%m%d', time.gmtime())}T")
    with open(moved, "rb") as f:
        assert f.read() == content  # kept for a post-mortem, byte for byte
    [line] = caplog.records
    assert path in line.getMessage() and "moved aside to " + moved in line.getMessage()
    assert line.exc_info is None and any(word in line.getMessage() for word in reason.split("|"))
    assert opened() == before + 1


@pytest.mark.parametrize("name", UNUSABLE)
def test_a_one_shot_command_gets_one_line_and_the_file_is_left_alone(tmp_path, name, rng):
    make, reason = UNUSABLE[name]
    path = str(tmp_path / "cache.sqlite")
    make(path, rng)
    with open(path, "rb") as f:
        content = f.read()
    with pytest.raises(StoreError) as raised:
        open_store(path, recover=False)
    message = str(raised.value)
    assert message.startswith(f"cache {path}: ") and "\n" not in message
    assert any(word in message for word in reason.split("|"))
    with open(path, "rb") as f:
        assert f.read() == content
    assert glob.glob(f"{path}.corrupt-*") == []


def test_companions_move_with_the_file_as_one_readable_database(tmp_path):
    path = str(tmp_path / "cache.sqlite")
    writer = sqlite3.connect(path)  # left open: its -wal and -shm stay, as after a crash
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE other (x)")
    writer.execute("INSERT INTO other VALUES (1)")
    writer.commit()
    assert os.path.exists(path + "-wal") and os.path.exists(path + "-shm")
    moved = move_aside(path)
    writer.close()
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(moved) + s for s in ("", "-wal", "-shm"))
    # The moved trio is still one readable database.
    assert sqlite3.connect(moved).execute("SELECT x FROM other").fetchall() == [(1,)]


def test_move_aside_does_not_overwrite_an_earlier_one(tmp_path):
    path = str(tmp_path / "cache.sqlite")
    names = []
    for _ in range(3):
        with open(path, "w") as f:
            f.write("junk")
        names.append(move_aside(path))
    assert len(set(names)) == 3 and all(os.path.exists(n) for n in names)


@pytest.mark.parametrize("companion", ["", "-wal", "-shm", "-journal"])
def test_a_symlink_is_never_followed_nor_moved(tmp_path, caplog, companion):
    target = tmp_path / "precious"
    target.write_text("root's file\n")
    os.chmod(target, 0o600)
    path = str(tmp_path / "cache.sqlite")
    if companion:
        filled(path)
    os.symlink(target, path + companion)
    before = opened()
    with caplog.at_level(logging.WARNING, "stsmilter"):
        store = open_store(path)
    assert isinstance(store, MemoryStore)
    [line] = caplog.records
    assert f"{path}{companion} is a symbolic link: not following it" in line.getMessage()
    assert "memory only" in line.getMessage()
    assert os.path.islink(path + companion) and target.read_text() == "root's file\n"
    assert os.stat(target).st_mode & 0o777 == 0o600 and glob.glob(f"{path}.corrupt-*") == []
    assert opened() == before + 1
    with pytest.raises(StoreError, match="symbolic link"):
        open_store(path, recover=False)


def test_a_symlink_to_a_real_cache_is_not_read_either(tmp_path, caplog):
    elsewhere = str(tmp_path / "elsewhere.sqlite")
    filled(elsewhere, 3)
    path = str(tmp_path / "cache.sqlite")
    os.symlink(elsewhere, path)
    with caplog.at_level(logging.WARNING, "stsmilter"):
        store = open_store(path)
    assert isinstance(store, MemoryStore) and store.count() == 0
    assert "read from it" not in caplog.records[0].getMessage()


def test_a_directory_in_place_of_the_file_means_memory_only(tmp_path, caplog):
    path = str(tmp_path / "cache.sqlite")
    os.mkdir(path)
    with caplog.at_level(logging.WARNING, "stsmilter"):
        assert isinstance(open_store(path), MemoryStore)
    assert "is not a regular file" in caplog.records[0].getMessage() and os.path.isdir(path)


def test_only_the_last_directory_is_created(tmp_path, caplog):
    path = str(tmp_path / "state" / "cache.sqlite")
    open_store(path).close()
    assert os.path.isfile(path) and os.stat(tmp_path / "state").st_mode & 0o777 == 0o750
    deep = str(tmp_path / "typo" / "state" / "cache.sqlite")
    with pytest.raises(StoreError, match=f"cache {deep}: directory .*typo/state: No such file"):
        open_store(deep, recover=False)
    with caplog.at_level(logging.WARNING, "stsmilter"):
        assert isinstance(open_store(deep), MemoryStore)
    assert not os.path.exists(tmp_path / "typo")


def test_bad_rows_are_not_a_reason_to_move_the_file(tmp_path):
    path = str(tmp_path / "cache.sqlite")
    filled(path, 3)
    db = sqlite3.connect(path)
    db.execute("UPDATE policies SET checked_at = 'soon' WHERE domain = 'd1.example'")
    db.commit()
    db.close()
    store = open_store(path)
    assert sorted(e.domain for e in store.entries()) == ["d0.example", "d2.example"]
    assert glob.glob(f"{path}.corrupt-*") == []
    store.close()
