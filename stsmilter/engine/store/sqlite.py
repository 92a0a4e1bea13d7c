"""The embedded store: one sqlite file (WAL), one connection shared under a lock (writes
are rare: a fetch, an id check every few minutes per domain).

The schema carries a version (PRAGMA user_version). Files written before it had one
(user_version 0 with a ``policies`` table) are adopted in place, and each later version
is reached by one migration step, so an upgrade keeps its cache: 1 -> 2 adds the TXT
record's TTL (``txt_ttl``, NULL for the policies stored before). Opening checks the file
(quick_check, schema); what cannot be used raises UnusableStore, and the caller
(files.open_sqlite) decides whether to move it aside.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Callable, Iterator, List, Optional

from stsmilter.engine.store.base import BadEntry, Entry, Store, StoreError, UnusableStore, decode_entry, entry_fields

SCHEMA_VERSION = 2

_CREATE_V1 = (
    """CREATE TABLE IF NOT EXISTS policies (
    domain TEXT PRIMARY KEY,
    policy_id TEXT NOT NULL,
    policy TEXT NOT NULL,          -- JSON: version, mode, max_age, mx
    fetched_at REAL NOT NULL,
    expires REAL NOT NULL,         -- fetched_at + max_age: lets the refresher query
    mode TEXT NOT NULL,            -- (both duplicated from policy for the refresher)
    checked_at REAL NOT NULL,
    refresh_failures INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
)""",
    "CREATE INDEX IF NOT EXISTS policies_fetched ON policies (fetched_at)",
    "CREATE INDEX IF NOT EXISTS policies_expires ON policies (expires)",
)
_V1_COLUMNS = ("domain", "policy_id", "policy", "fetched_at", "expires", "mode", "checked_at", "refresh_failures",
               "last_error")
_COLUMNS = _V1_COLUMNS + ("txt_ttl",)
_INSERT = f"INSERT OR REPLACE INTO policies ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_SELECT = "SELECT rowid, domain, policy_id, policy, fetched_at, checked_at, refresh_failures, last_error, expires, mode"

# Errors that say the file's content is bad, not that the disk or the lock is.
_CONTENT_ERRORS = {"SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_FORMAT"}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def store_error(e: sqlite3.Error) -> StoreError:
    """A StoreError for a sqlite3 exception (UnusableStore if the content is bad)."""
    kind = getattr(e, "sqlite_errorname", None)  # Python 3.11+
    if kind is None:  # older: sqlite3 raises plain DatabaseError for bad content
        kind = "SQLITE_CORRUPT" if type(e) is sqlite3.DatabaseError else type(e).__name__
    return (UnusableStore if kind in _CONTENT_ERRORS else StoreError)(str(e), kind)


def _migrate_from_0(db: sqlite3.Connection) -> None:
    """user_version 0: a new file, or one written before the schema had a version (the
    same policies table, which stays as it is)."""
    for statement in _CREATE_V1:  # (not executescript(): it would commit the migration's transaction)
        db.execute(statement)


def _migrate_from_1(db: sqlite3.Connection) -> None:
    """The TXT record's TTL; NULL (not known) for the policies already stored."""
    db.execute("ALTER TABLE policies ADD COLUMN txt_ttl INTEGER")


_MIGRATIONS: List[Callable[[sqlite3.Connection], None]] = [_migrate_from_0, _migrate_from_1]  # index = from version


def _check_columns(db: sqlite3.Connection, version: int) -> None:
    columns = {r[1] for r in db.execute("PRAGMA table_info(policies)")}
    missing = [c for c in (_COLUMNS if version >= 2 else _V1_COLUMNS) if c not in columns]
    if missing:
        raise UnusableStore(f"table policies lacks {', '.join(missing)}", "foreign-schema")


def check_schema(db: sqlite3.Connection) -> int:
    """The file's schema version, if this stsmilter can use or migrate it; reads only, so
    a file that is not ours is left exactly as it was."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if not 0 <= version <= SCHEMA_VERSION:
        raise UnusableStore(f"schema version {version}, this stsmilter knows {SCHEMA_VERSION}", "schema-version")
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if version == 0 and tables - {"policies"}:
        raise UnusableStore(f"not a stsmilter cache (tables: {', '.join(sorted(tables))[:100]})", "foreign-schema")
    if version > 0 or tables:
        _check_columns(db, version)
    return version


def migrate(db: sqlite3.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION, one step per version, each in a transaction."""
    while True:
        version = check_schema(db)
        if version == SCHEMA_VERSION:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            _MIGRATIONS[version](db)
            _check_columns(db, version + 1)
            db.execute(f"PRAGMA user_version = {version + 1}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise


class SqliteStore(Store):
    def __init__(
        self,
        path: str,
        timeout: float = 2.0,
        check: bool = True,
        uri: Optional[str] = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Open (creating if absent) and check the file. timeout: how long a write waits for
        another process's lock. uri: open this sqlite URI instead (read-only snapshots).
        clock: what decoding compares stored times with."""
        super().__init__()
        self.path = self.name = path
        self.clock = clock
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                uri or path, check_same_thread=False, isolation_level=None, timeout=timeout, uri=uri is not None
            )
        except sqlite3.Error as e:
            raise store_error(e) from None
        try:
            with self._lock:
                if check:
                    problem = self._db.execute("PRAGMA quick_check(1)").fetchone()[0]
                    if problem != "ok":
                        raise UnusableStore(f"damaged: {problem[:100]}", "SQLITE_CORRUPT")
                version = check_schema(self._db)  # before anything writes to a file that may not be ours
                if uri is None:
                    self._db.execute("PRAGMA journal_mode=WAL")
                    self._db.execute("PRAGMA synchronous=NORMAL")
                    migrate(self._db)
                    version = SCHEMA_VERSION
                # A read-only snapshot of an older file has no TTL column: NULL stands in.
                self._select = _SELECT + (", txt_ttl" if version >= 2 else ", NULL")
        except (sqlite3.Error, StoreError) as e:
            self._db.close()
            if isinstance(e, StoreError):
                raise
            raise store_error(e) from None

    def _decode(self, rows: list) -> List[Entry]:
        """Entries from rows; a row that fails the checks is counted and deleted."""
        now = self.clock()
        good, bad = [], []
        for rowid, domain, policy_id, text, fetched_at, checked_at, failures, last_error, expires, mode, ttl in rows:
            try:
                entry = decode_entry(domain, policy_id, text, fetched_at, checked_at, failures, last_error, now, ttl)
                if mode != entry.policy.mode or not _is_number(expires) or abs(expires - entry.expires) > 1:
                    raise BadEntry("mode or expires column disagrees with the policy")
            except Exception as e:  # BadEntry, or a check that did not foresee this value
                self._skip_bad(domain, str(e) if isinstance(e, BadEntry) else type(e).__name__)
                bad.append(rowid)
            else:
                good.append(entry)
        if bad:
            try:  # never usable: drop it, so it is counted once (best effort)
                self._db.executemany("DELETE FROM policies WHERE rowid = ?", [(r,) for r in bad])
            except sqlite3.Error:
                pass
        return good

    def _execute(self, sql: str, args: tuple = (), select: bool = False):
        """rows (decoded into entries if select), or the cursor of a write."""
        with self._lock:
            try:
                cursor = self._db.execute(sql, args)
                return self._decode(cursor.fetchall()) if select else cursor
            except sqlite3.Error as e:
                raise store_error(e) from None

    def get(self, domain: str) -> Optional[Entry]:
        entries = self._execute(f"{self._select} FROM policies WHERE domain = ?", (domain,), select=True)
        return entries[0] if entries else None

    def put(self, entry: Entry) -> None:
        # expires and mode: copies for the refresher's queries (checked against the policy on read)
        row = dict(entry_fields(entry), expires=entry.expires, mode=entry.policy.mode)
        self._execute(_INSERT, tuple(row[c] for c in _COLUMNS))

    def delete(self, domain: str) -> bool:
        return self._execute("DELETE FROM policies WHERE domain = ?", (domain,)).rowcount > 0

    def entries(self) -> Iterator[Entry]:
        return iter(self._execute(f"{self._select} FROM policies ORDER BY domain", select=True))

    def count(self) -> int:
        with self._lock:
            try:
                return self._db.execute("SELECT COUNT(*) FROM policies").fetchone()[0]
            except sqlite3.Error as e:
                raise store_error(e) from None

    def due(self, now: float, interval: float) -> List[Entry]:
        return self._execute(
            f"{self._select} FROM policies WHERE expires > ? AND (fetched_at <= ? OR (? - fetched_at) * 2 >= expires - fetched_at)",
            (now, now - interval, now),
            select=True,
        )

    def purge_expired(self, now: float) -> int:
        return self._execute("DELETE FROM policies WHERE expires <= ?", (now,)).rowcount

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
