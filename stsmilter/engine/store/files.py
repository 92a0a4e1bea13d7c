"""Opening the sqlite cache file, whatever it looks like.

The daemon must start and serve (a cache is an optimisation of protection, never a
reason to hold the mail), so with recover=True:
- a file whose content cannot be used (not a database, damaged, foreign or newer schema,
  unreadable by us) is renamed to ``<path>.corrupt-<UTC time>`` together with its
  ``-wal``/``-shm``/``-journal`` and replaced by an empty cache;
- a location that cannot be used (read-only or full file system, missing directory, a
  symlink or other non-regular file) leaves the file alone: the policies it holds are
  read if possible, new ones are kept in memory only until a restart.
Either way: one log line naming the file and the reason, and stsmilter_store_errors_total
{op="open"}. Without recover (the one-shot commands) the same problems raise StoreError.

Symlinks are never followed (lstat): the daemon may start as root, and whoever owns the
cache directory must not be able to point the cache at another file.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
import urllib.parse
from typing import Iterator, Optional, Tuple

from stsmilter import metrics
from stsmilter.engine.store.base import MemoryStore, Store, StoreError, UnusableStore
from stsmilter.engine.store.sqlite import SqliteStore

log = logging.getLogger("stsmilter.store")

# The main file last: a fresh database must never meet the old one's -wal (sqlite would
# replay it into the new file).
COMPANIONS = ("-wal", "-shm", "-journal", "")
_MAGIC = b"SQLite format 3\0"


def _os_error(name: str, e: OSError, path: str, unusable: bool = False) -> StoreError:
    """name: the file or directory concerned; named in the message unless it is path."""
    kind = errno.errorcode.get(e.errno or 0, "OSError")
    where = "" if name == path else f"{name}: "
    return (UnusableStore if unusable else StoreError)(f"{where}{e.strerror or e}", kind)


def ensure_directory(path: str) -> None:
    """Create the cache file's directory if missing, but only that one: a typo in the
    path must not grow a directory tree."""
    directory = os.path.dirname(path)
    if not directory or os.path.isdir(directory):
        return
    try:
        os.mkdir(directory, 0o750)
    except FileExistsError:
        pass
    except OSError as e:
        raise _os_error(f"directory {directory}", e, path) from None


def _present(path: str) -> Iterator[Tuple[str, str, int]]:
    """(suffix, name, lstat mode) of the cache file and each companion that exists, in
    COMPANIONS order, each looked at just before it is yielded (not followed)."""
    for suffix in COMPANIONS:
        name = path + suffix
        try:
            mode = os.lstat(name).st_mode
        except FileNotFoundError:
            continue
        except OSError as e:
            raise _os_error(name, e, path) from None
        yield suffix, name, mode


def check_files(path: str) -> None:
    """The cache file and its companions are absent or regular files (not followed)."""
    for _suffix, name, mode in _present(path):
        if stat.S_ISLNK(mode):
            raise StoreError(f"{name} is a symbolic link: not following it", "symlink")
        if not stat.S_ISREG(mode):
            raise StoreError(f"{name} is not a regular file: not using it", "not-regular")


def probe(path: str) -> None:
    """We can read and write the files, and the main one looks like a sqlite database."""
    for suffix in COMPANIONS:
        name = path + suffix
        try:
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except PermissionError as e:  # ours, but not for us: not usable as it is
            raise _os_error(name, e, path, unusable=True) from None
        except OSError as e:  # EROFS and friends: the location, not the file
            raise _os_error(name, e, path) from None
        try:
            header = os.read(fd, len(_MAGIC)) if suffix == "" else b""
        except OSError as e:
            raise _os_error(name, e, path) from None
        finally:
            os.close(fd)
        if header and header != _MAGIC:
            raise UnusableStore("not a SQLite database", "SQLITE_NOTADB")


def open_checked(path: str) -> SqliteStore:
    ensure_directory(path)
    check_files(path)
    probe(path)
    return SqliteStore(path)


def move_aside(path: str) -> str:
    """Rename the cache file and its companions to <path>.corrupt-<UTC time>[-wal...];
    returns the new name of the main file. Symlinks are refused, not followed."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = f"{path}.corrupt-{stamp}", 0
    while any(os.path.lexists(target + suffix) for suffix in COMPANIONS):
        n += 1
        target = f"{path}.corrupt-{stamp}.{n}"
    for suffix, name, mode in _present(path):
        if not stat.S_ISREG(mode):
            raise StoreError(f"{name} is not a regular file: not moving it", "not-regular")
        try:
            os.rename(name, target + suffix)
        except OSError as e:
            raise _os_error(name, e, path) from None
    return target


def read_only_snapshot(path: str) -> Optional[MemoryStore]:
    """What a file we cannot write still holds (read-only or full file system), in memory."""
    if not os.path.isfile(path):
        return None
    quoted = urllib.parse.quote(os.path.abspath(path))
    # immutable=1 also reads a WAL-mode file whose -shm cannot be created (read-only
    # file system), at the price of ignoring what is still in its -wal.
    for params in ("mode=ro", "mode=ro&immutable=1"):
        try:
            snapshot = SqliteStore(path, uri=f"file:{quoted}?{params}")
        except StoreError:
            continue
        try:
            entries = list(snapshot.entries())
        except StoreError:
            continue
        finally:
            snapshot.close()
        memory = MemoryStore()
        for entry in entries:
            memory.put(entry)
        memory.bad_entries, memory.last_bad = snapshot.bad_entries, snapshot.last_bad
        return memory
    return None


def _memory_only(path: str, problem: StoreError) -> Store:
    metrics.STORE_ERRORS.labels(op="open").inc()
    snapshot = None
    if problem.kind not in ("symlink", "not-regular"):
        snapshot = read_only_snapshot(path)
    if snapshot is None:
        log.warning("cache %s: %s: policies are kept in memory only until a restart", path, problem)
        return MemoryStore()
    log.warning(
        "cache %s: %s: %d policies read from it, new ones are kept in memory only until a restart",
        path, problem, snapshot.count(),
    )
    return snapshot


def open_sqlite(path: str, recover: bool) -> Store:
    try:
        return open_checked(path)
    except UnusableStore as e:
        if not recover:
            raise StoreError(f"cache {path}: {e}", e.kind) from None
        unusable = e
    except StoreError as e:
        if not recover:
            raise StoreError(f"cache {path}: {e}", e.kind) from None
        return _memory_only(path, e)
    try:
        moved = move_aside(path)
    except StoreError as e:
        # Unusable as a store, but perhaps readable (a file we may not write).
        return _memory_only(path, StoreError(f"{unusable}, and it cannot be moved aside ({e})", unusable.kind))
    metrics.STORE_ERRORS.labels(op="open").inc()
    log.warning("cache %s: %s: moved aside to %s, starting with an empty cache", path, unusable, moved)
    try:
        return open_checked(path)
    except StoreError as e:
        return _memory_only(path, e)
