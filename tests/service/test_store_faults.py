"""The real daemon with its cache on real faulty ground: a small tmpfs filled up or
remounted read-only, corrupt files, files it may not read, kill -9 in the middle of
cache writes. Every answer comes from the real socketmap (or `stsmilter query`);
whatever happens to the store, a policy that was answered stays answered. (A symlinked
cache file, never followed, is in test_privileges.py and test_store_files.py.)"""

import glob
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from world.daemon import poll_until, sample, scrape
from world.socketmap_client import Socketmap
from world import paths

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs and dropping capabilities need root"),
]

V0_FILE = str(paths.DATA / "cache-v0.sqlite")
# setpriv: still uid 0, but without the capabilities that let root ignore file modes,
# so a file mode of 000 or a read-only directory means what it says.
NO_DAC = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]


def secure(domain):
    return f"OK secure match=mx.{domain} servername=hostname"


def answer(daemon, domain):
    client = Socketmap(daemon.socketmap_port)
    try:
        return client.ask(domain)
    finally:
        client.close()


def hide(world, *domains):
    """Take the TXT records away: from now on only a cached policy can answer "secure"
    (without one the answer is NOTFOUND)."""
    for domain in domains:
        world.dns.remove(f"_mta-sts.{domain}", "TXT")


def store_lines(daemon, text):
    return [line for line in daemon.log().splitlines() if text in line]


def assert_no_traceback(daemon):
    assert "Traceback" not in daemon.log(), daemon.log()


@pytest.fixture
def tmpfs(tmp_path):
    """tmpfs(size) -> the path of a new tmpfs of that size, unmounted at teardown."""
    mounts = []

    def mount(size):
        path = tmp_path / f"fs{len(mounts)}"
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
        mounts.append(path)
        return str(path)

    yield mount
    for path in mounts:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)  # still busy: detach it


def fill(directory):
    """Fill the file system until it refuses another byte."""
    fd = os.open(os.path.join(directory, f"filler{time.monotonic_ns()}"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 512, 1):  # then the last partial blocks
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


def remount(directory, mode):
    subprocess.run(["mount", "-o", f"remount,{mode}", directory], check=True)


# --- item 1: a store that refuses writes never turns a policy off


def test_full_file_system_policies_apply_from_memory_one_line_and_a_metric(tmpfs, start_daemon, sts_world):
    fs = tmpfs("1m")
    cache = os.path.join(fs, "cache.sqlite")
    daemon = start_daemon(cache={"path": cache})
    sts_world.publish("before.example")
    assert answer(daemon, "before.example") == secure("before.example")
    fill(fs)
    domains = [f"full{i}.example" for i in range(5)]
    client = Socketmap(daemon.socketmap_port)
    for domain in domains:
        sts_world.publish(domain)
        assert client.ask(domain) == secure(domain)  # fetched, refused by the disk, enforced
    hide(sts_world, *domains)
    for _ in range(3):
        for domain in domains:
            assert client.ask(domain) == secure(domain)
    client.close()
    metrics = scrape(daemon.metrics_port)
    assert sample(metrics, "stsmilter_store_errors_total", op="write") >= 1
    assert sample(metrics, "stsmilter_cache_entries") == 6
    [line] = store_lines(daemon, "failed:")  # 5 refused writes, one line
    assert f"cache {cache}: write failed: database or disk is full" in line
    assert_no_traceback(daemon)

    # A restart on the still full file system keeps what the file held.
    daemon.stop()
    fill(fs)  # closing freed the -wal's space: take it too
    hide(sts_world, "before.example")
    again = start_daemon(name="again", cache={"path": cache})
    assert answer(again, "before.example") == secure("before.example")
    assert_no_traceback(again)


def test_a_start_on_a_read_only_file_system_serves_what_the_file_holds(tmpfs, start_daemon, sts_world):
    # (Linux refuses to remount a file system read-only while the daemon holds the cache
    # open for writing: a read-only cache is met at start, e.g. after a reboot.)
    fs = tmpfs("4m")
    cache = os.path.join(fs, "cache.sqlite")
    daemon = start_daemon(cache={"path": cache})
    sts_world.publish("before.example")
    assert answer(daemon, "before.example") == secure("before.example")
    daemon.stop()
    remount(fs, "ro")
    again = None
    try:
        hide(sts_world, "before.example")
        again = start_daemon(name="again", cache={"path": cache})
        assert answer(again, "before.example") == secure("before.example")
        [line] = store_lines(again, f"cache {cache}: ")
        assert "Read-only file system" in line and "1 policies read from it" in line
        assert "in memory only until a restart" in line
        for domain in ("new1.example", "new2.example"):
            sts_world.publish(domain)
            assert answer(again, domain) == secure(domain)
        hide(sts_world, "new1.example", "new2.example")
        assert answer(again, "new1.example") == secure("new1.example")
        metrics = scrape(again.metrics_port)
        assert sample(metrics, "stsmilter_store_errors_total", op="open") == 1
        assert sample(metrics, "stsmilter_cache_entries") == 3
        assert_no_traceback(again)
    finally:
        if again is not None:
            again.stop()  # before the file system goes back to read-write (teardown)
        remount(fs, "rw")


# --- item 2: the daemon starts whatever the cache file looks like


def _random_bytes(path, rng):
    with open(path, "wb") as f:
        f.write(rng.randbytes(65536))
    for suffix in ("-wal", "-shm"):  # companions of the same quality
        with open(path + suffix, "wb") as f:
            f.write(rng.randbytes(4096))


def _sqlite(path, *statements):
    db = sqlite3.connect(path)
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()


def _truncated(path):
    rows = [(f"d{i}.example", "i1", '{"version":"STSv1","mode":"none","max_age":86400,"mx":[]}', time.time(),
             time.time() + 86400, "none", time.time(), 0, None) for i in range(3000)]
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE policies (domain TEXT PRIMARY KEY, policy_id, policy, fetched_at, expires, mode,"
               " checked_at, refresh_failures, last_error)")
    db.executemany("INSERT INTO policies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.commit()
    db.close()
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)


CORRUPT = {
    "random-bytes": (_random_bytes, "not a SQLite database"),
    "truncated": (lambda p, _rng: _truncated(p), "database disk image is malformed"),
    "foreign-schema": (lambda p, _rng: _sqlite(p, "CREATE TABLE mailboxes (address TEXT)"), "not a stsmilter cache"),
    "newer-schema": (lambda p, _rng: _sqlite(p, "PRAGMA user_version = 9"), "schema version 9, this stsmilter knows 2"),
}


@pytest.mark.parametrize("name", CORRUPT)
def test_an_unusable_cache_file_is_moved_aside_and_the_daemon_serves(start_daemon, sts_world, tmp_path, name, rng):
    make, reason = CORRUPT[name]
    cache = str(tmp_path / "state" / "cache.sqlite")
    os.mkdir(os.path.dirname(cache))
    make(cache, rng)
    originals = {s: open(cache + s, "rb").read() for s in ("", "-wal", "-shm") if os.path.exists(cache + s)}
    daemon = start_daemon(cache={"path": cache})
    sts_world.publish("fresh.example")
    assert answer(daemon, "fresh.example") == secure("fresh.example")
    [line] = store_lines(daemon, f"cache {cache}")
    [moved] = glob.glob(f"{cache}.corrupt-*[0-9TZ]")
    assert f"cache {cache}: {reason}" in line and f"moved aside to {moved}, starting with an empty cache" in line
    for suffix, content in originals.items():
        assert open(moved + suffix, "rb").read() == content
    assert sample(scrape(daemon.metrics_port), "stsmilter_store_errors_total", op="open") == 1
    assert_no_traceback(daemon)
    # The new file persists again: a restart answers from it.
    daemon.stop()
    hide(sts_world, "fresh.example")
    again = start_daemon(name="again", cache={"path": cache})
    assert answer(again, "fresh.example") == secure("fresh.example")
    assert store_lines(again, f"cache {cache}") == []


def test_bad_rows_are_skipped_and_counted_and_the_rest_applies(start_daemon, sts_world, tmp_path):
    cache = str(tmp_path / "cache.sqlite")
    now = time.time()

    def row(domain, max_age="86400", fetched_at=now, checked_at=now, failures=0):
        policy = f'{{"version":"STSv1","mode":"enforce","max_age":{max_age},"mx":["mx.{domain}"]}}'
        return (domain, "id1", policy, fetched_at, now + 86400, "enforce", checked_at, failures, None)

    db = sqlite3.connect(cache)  # a file whose columns take anything, as another writer's might
    db.execute("CREATE TABLE policies (domain TEXT PRIMARY KEY, policy_id, policy, fetched_at, expires, mode,"
               " checked_at, refresh_failures, last_error)")
    db.executemany("INSERT INTO policies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [
        row("good.example"),
        row("huge.example", max_age="1e400"),
        row("text.example", fetched_at="yesterday"),
        row("null.example", checked_at=None),
        row("nulls.example", fetched_at=None, checked_at=None, failures=None),
    ])
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    daemon = start_daemon(cache={"path": cache})
    assert answer(daemon, "good.example") == secure("good.example")  # no TXT record: from the file
    for domain in ("huge.example", "text.example", "null.example", "nulls.example"):
        assert answer(daemon, domain) == "NOTFOUND "
    assert sample(scrape(daemon.metrics_port), "stsmilter_store_bad_entries_total") == 4
    [line] = store_lines(daemon, f"cache {cache}")
    assert "skipped 4 unusable stored policies" in line
    assert glob.glob(f"{cache}.corrupt-*") == [] and sqlite3.connect(cache).execute(
        "SELECT domain FROM policies").fetchall() == [("good.example",)]
    assert_no_traceback(daemon)


def test_an_unreadable_cache_file_is_moved_aside(start_daemon, sts_world, tmp_path):
    cache = str(tmp_path / "cache.sqlite")
    _sqlite(cache, "CREATE TABLE t (x)")
    os.chmod(cache, 0)
    daemon = start_daemon(prefix=NO_DAC, cache={"path": cache})
    sts_world.publish("fresh.example")
    assert answer(daemon, "fresh.example") == secure("fresh.example")
    [line] = store_lines(daemon, f"cache {cache}")
    assert f"cache {cache}: Permission denied: moved aside to {cache}.corrupt-" in line
    assert os.stat(glob.glob(f"{cache}.corrupt-*")[0]).st_mode & 0o777 == 0
    assert_no_traceback(daemon)


def test_an_unwritable_directory_means_memory_only_with_what_the_file_holds(start_daemon, sts_world, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    cache = str(state / "cache.sqlite")
    first = start_daemon(cache={"path": cache})
    sts_world.publish("before.example")
    assert answer(first, "before.example") == secure("before.example")
    first.stop()
    os.chmod(cache, 0o444)
    os.chmod(state, 0o555)
    try:
        hide(sts_world, "before.example")
        daemon = start_daemon(name="again", prefix=NO_DAC, cache={"path": cache})
        assert answer(daemon, "before.example") == secure("before.example")
        sts_world.publish("new.example")
        assert answer(daemon, "new.example") == secure("new.example")
        [line] = store_lines(daemon, f"cache {cache}")
        assert "Permission denied, and it cannot be moved aside" in line
        assert "1 policies read from it, new ones are kept in memory only until a restart" in line
        assert sample(scrape(daemon.metrics_port), "stsmilter_store_errors_total", op="open") == 1
        assert_no_traceback(daemon)
        daemon.stop()
    finally:
        os.chmod(state, 0o755)


def test_a_missing_cache_in_an_unwritable_directory_means_memory_only(start_daemon, sts_world, tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o555)
    cache = str(state / "cache.sqlite")
    try:
        daemon = start_daemon(prefix=NO_DAC, cache={"path": cache})
        sts_world.publish("new.example")
        assert answer(daemon, "new.example") == secure("new.example")
        [line] = store_lines(daemon, f"cache {cache}")
        assert "policies are kept in memory only until a restart" in line
        assert sample(scrape(daemon.metrics_port), "stsmilter_store_errors_total", op="open") == 1
        assert_no_traceback(daemon)
        daemon.stop()
    finally:
        os.chmod(state, 0o755)


def test_a_cache_written_before_schema_versions_keeps_its_policies(start_daemon, sts_world, tmp_path):
    cache = str(tmp_path / "cache.sqlite")
    shutil.copyfile(V0_FILE, cache)
    shift = time.time() - 1_796_000_000  # the file's policies were fetched at 1796000000
    _sqlite(cache, f"UPDATE policies SET fetched_at = fetched_at + {shift}, expires = expires + {shift},"
                   f" checked_at = checked_at + {shift}")
    daemon = start_daemon(cache={"path": cache})
    # Nothing is published: every answer comes from the upgraded file.
    assert answer(daemon, "enforce.example") == (
        "OK secure match=mx1.enforce.example:.mx.enforce.example servername=hostname")
    assert answer(daemon, "failing.example") == secure("failing.example")
    assert answer(daemon, "none.example") == "NOTFOUND "
    assert sample(scrape(daemon.metrics_port), "stsmilter_refresh_failing_policies") == 1
    assert sample(scrape(daemon.metrics_port), "stsmilter_cache_entries") == 4
    proc = sts_world.cli("query", "--json", "-c", daemon.config_path, "testing.example")
    assert proc.returncode == 0, proc.stderr
    assert '"source": "cache"' in proc.stdout and '"mode": "testing"' in proc.stdout
    assert sqlite3.connect(cache).execute("PRAGMA user_version").fetchone()[0] == 2
    assert daemon.log().count("WARNING") == 0
    assert_no_traceback(daemon)


# --- kill -9


def test_kill_9_in_the_middle_of_cache_writes_loses_nothing_answered(start_daemon, sts_world, tmp_path, rng):
    cache = str(tmp_path / "cache.sqlite")
    daemon = start_daemon(cache={"path": cache})
    domains = [f"k{i}.example" for i in range(400)]
    for domain in domains:
        sts_world.publish(domain)
    answered, lock = [], threading.Lock()

    def client(chunk):
        sm = Socketmap(daemon.socketmap_port)
        try:
            for domain in chunk:
                if sm.ask(domain) == secure(domain):
                    with lock:
                        answered.append(domain)
        except OSError:  # the kill
            pass
        finally:
            sm.close()

    clients = [threading.Thread(target=client, args=(domains[n::4],)) for n in range(4)]
    for thread in clients:
        thread.start()
    threshold = rng.randint(40, 120)  # the kill lands somewhere else each run (the seed is printed)
    poll_until(lambda: len(answered) >= threshold, 60, "answers before the kill")
    os.kill(daemon.pid, signal.SIGKILL)  # every client is between a fetch, a write and an answer
    for thread in clients:
        thread.join(30)
    assert daemon.proc.wait(10) == -signal.SIGKILL
    killed_at = len(answered)
    assert killed_at < len(domains)  # the kill came in the middle
    db = sqlite3.connect(cache)
    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    db.close()

    hide(sts_world, *domains)
    again = start_daemon(name="again", cache={"path": cache})
    sm = Socketmap(again.socketmap_port)
    missing = [domain for domain in answered if sm.ask(domain) != secure(domain)]
    sm.close()
    assert missing == [], f"{len(missing)} of {killed_at} answered policies lost"
    assert_no_traceback(again)


# --- the one-shot commands: strict, one line


@pytest.mark.parametrize("argv", [
    ["query", "example.com"], ["query", "--json", "example.com"], ["check", "user@example.com"],
    ["cache", "list"], ["cache", "list", "--json"], ["cache", "purge", "--all"], ["cache", "purge", "a.example"],
])
@pytest.mark.parametrize("what", ["file", "directory"])
def test_a_user_who_cannot_open_the_cache_gets_one_line(sts_world, tmp_path, argv, what):
    state = tmp_path / "state"
    state.mkdir()
    cache = str(state / "cache.sqlite")
    _sqlite(cache, "CREATE TABLE t (x)")
    os.chmod(cache if what == "file" else state, 0)
    conf = sts_world.write_config(cache_path=cache)
    try:
        proc = subprocess.run([*NO_DAC, sys.executable, "-m", "stsmilter", *argv, "-c", conf],
                              capture_output=True, text=True, timeout=60)
    finally:
        os.chmod(state, 0o755)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.count("stsmilter:") == 1, proc.stderr
    assert proc.stderr.startswith("stsmilter: ") and cache in proc.stderr and "Permission denied" in proc.stderr
    if what == "file":  # (a directory it may not search: the store's lstat names the -wal it looked for)
        assert proc.stderr.startswith(f"stsmilter: cache {cache}: Permission denied")
        assert ("--no-cache" in proc.stderr) == (argv[0] in ("query", "check"))
    assert glob.glob(f"{cache}.corrupt-*") == [] and os.stat(cache).st_mode & 0o777 == (0 if what == "file" else 0o644)
