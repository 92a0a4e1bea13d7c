"""Persistent policy stores behind one small interface.

MTA-STS protection lives in the cache (RFC 8461 §3.3, §10.2): a policy learnt yesterday
must still apply after a restart, when an attacker may be hiding today's TXT record.
``SqliteStore`` is the embedded default; ``MemoryStore`` serves ``[cache] path =``
(empty). A shared store (e.g. Redis) only has to implement ``Store``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
from typing import Dict, Iterator, List, Optional

from stsmilter.policy import VALID, Policy, Result

# Modes come from a three-word vocabulary; sharing the string objects keeps 100 000
# cached policies from carrying 100 000 copies of "enforce".
_MODES = {m: m for m in ("enforce", "testing", "none")}


@dataclasses.dataclass(frozen=True)
class Entry:
    """A cached policy: the Result handed to front ends plus refresh bookkeeping."""

    result: Result  # status VALID, source "cache"
    checked_at: float  # when the TXT id was last confirmed (or the policy fetched)
    refresh_failures: int = 0  # consecutive failed refreshes
    last_error: Optional[str] = None

    @property
    def domain(self) -> str:
        return self.result.domain

    @property
    def policy(self) -> Policy:
        return self.result.policy  # type: ignore[return-value]

    @property
    def policy_id(self) -> str:
        return self.result.policy_id  # type: ignore[return-value]

    @property
    def fetched_at(self) -> float:
        return self.result.fetched_at  # type: ignore[return-value]

    @property
    def expires(self) -> float:
        return self.result.expires  # type: ignore[return-value]


def make_entry(
    domain: str,
    policy_id: str,
    policy: Policy,
    fetched_at: float,
    checked_at: Optional[float] = None,
    refresh_failures: int = 0,
    last_error: Optional[str] = None,
) -> Entry:
    policy = dataclasses.replace(policy, mode=_MODES.get(policy.mode, policy.mode))
    result = Result(
        domain=domain,
        status=VALID,
        source="cache",
        policy_id=policy_id,
        policy=policy,
        fetched_at=fetched_at,
        expires=fetched_at + policy.max_age,
    )
    return Entry(result, fetched_at if checked_at is None else checked_at, refresh_failures, last_error)


class Store:
    """Interface: thread-safe, one entry per domain."""

    def get(self, domain: str) -> Optional[Entry]:
        raise NotImplementedError

    def put(self, entry: Entry) -> None:
        raise NotImplementedError

    def delete(self, domain: str) -> bool:
        raise NotImplementedError

    def entries(self) -> Iterator[Entry]:
        """Every entry (a snapshot: safe to modify the store while iterating)."""
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def due(self, now: float, interval: float) -> List[Entry]:
        """Unexpired entries due for a refresh: fetched at least interval ago, or past half
        their max_age (so a short-lived policy is renewed before it lapses, without being
        refetched on every refresher pass)."""
        return [
            e
            for e in self.entries()
            if e.expires > now and (e.fetched_at <= now - interval or (now - e.fetched_at) * 2 >= e.expires - e.fetched_at)
        ]

    def purge_expired(self, now: float) -> int:
        """Remove expired entries; returns how many."""
        expired = [e.domain for e in self.entries() if e.expires <= now]
        return sum(1 for domain in expired if self.delete(domain))

    def count_failing(self, now: float) -> int:
        """Unexpired enforce/testing entries whose last refresh failed."""
        return sum(1 for e in self.entries() if e.refresh_failures and e.policy.mode != "none" and e.expires > now)

    def close(self) -> None:
        pass


class MemoryStore(Store):
    def __init__(self) -> None:
        self._entries: Dict[str, Entry] = {}
        self._lock = threading.Lock()

    def get(self, domain: str) -> Optional[Entry]:
        return self._entries.get(domain)

    def put(self, entry: Entry) -> None:
        with self._lock:
            self._entries[entry.domain] = entry

    def delete(self, domain: str) -> bool:
        with self._lock:
            return self._entries.pop(domain, None) is not None

    def entries(self) -> Iterator[Entry]:
        with self._lock:
            snapshot = list(self._entries.values())
        return iter(snapshot)

    def count(self) -> int:
        return len(self._entries)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS policies (
    domain TEXT PRIMARY KEY,
    policy_id TEXT NOT NULL,
    policy TEXT NOT NULL,          -- JSON: version, mode, max_age, mx
    fetched_at REAL NOT NULL,
    expires REAL NOT NULL,         -- fetched_at + max_age: lets the refresher query
    mode TEXT NOT NULL,            -- (both duplicated from policy for the refresher)
    checked_at REAL NOT NULL,
    refresh_failures INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS policies_fetched ON policies (fetched_at);
CREATE INDEX IF NOT EXISTS policies_expires ON policies (expires);
"""


class SqliteStore(Store):
    """One sqlite file; one connection shared under a lock (writes are rare: a fetch,
    an id check every few minutes per domain)."""

    def __init__(self, path: str) -> None:
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, mode=0o750, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def _row_to_entry(self, row) -> Optional[Entry]:
        domain, policy_id, text, fetched_at, checked_at, failures, last_error = row
        try:
            data = json.loads(text)
            policy = Policy(
                version=str(data["version"]),
                mode=str(data["mode"]),
                max_age=int(data["max_age"]),
                mx=tuple(str(m) for m in data["mx"]),
            )
        except (ValueError, KeyError, TypeError):
            return None  # a damaged row is dropped, not trusted
        return make_entry(domain, policy_id, policy, fetched_at, checked_at, failures, last_error)

    _COLUMNS = "domain, policy_id, policy, fetched_at, checked_at, refresh_failures, last_error"

    def get(self, domain: str) -> Optional[Entry]:
        with self._lock:
            row = self._db.execute(f"SELECT {self._COLUMNS} FROM policies WHERE domain = ?", (domain,)).fetchone()
        return self._row_to_entry(row) if row else None

    def put(self, entry: Entry) -> None:
        policy_json = json.dumps(entry.policy.as_dict(), separators=(",", ":"))
        with self._lock:
            self._db.execute(
                f"INSERT OR REPLACE INTO policies ({self._COLUMNS}, expires, mode) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.domain,
                    entry.policy_id,
                    policy_json,
                    entry.fetched_at,
                    entry.checked_at,
                    entry.refresh_failures,
                    entry.last_error,
                    entry.expires,
                    entry.policy.mode,
                ),
            )

    def delete(self, domain: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM policies WHERE domain = ?", (domain,)).rowcount > 0

    def entries(self) -> Iterator[Entry]:
        with self._lock:
            rows: List[tuple] = self._db.execute(f"SELECT {self._COLUMNS} FROM policies ORDER BY domain").fetchall()
        return (e for e in map(self._row_to_entry, rows) if e is not None)

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM policies").fetchone()[0]

    def due(self, now: float, interval: float) -> List[Entry]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._COLUMNS} FROM policies WHERE expires > ?"
                " AND (fetched_at <= ? OR (? - fetched_at) * 2 >= expires - fetched_at)",
                (now, now - interval, now),
            ).fetchall()
        return [e for e in map(self._row_to_entry, rows) if e is not None]

    def purge_expired(self, now: float) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM policies WHERE expires <= ?", (now,)).rowcount

    def count_failing(self, now: float) -> int:
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM policies WHERE refresh_failures > 0 AND mode != 'none' AND expires > ?", (now,)
            ).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_store(path: str) -> Store:
    """The store named by [cache] path: empty means memory only."""
    return SqliteStore(path) if path else MemoryStore()
