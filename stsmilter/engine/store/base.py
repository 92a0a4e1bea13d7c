"""The store interface, the cached entry, and the checks every backend applies to what it
reads back (a store file is input like any other: it may be damaged or foreign)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import re
import threading
import time
import urllib.parse
from typing import Any, Dict, Iterator, List, Optional, Tuple

from stsmilter import metrics
from stsmilter.engine.dns import MAX_TTL
from stsmilter.engine.policy import (
    FAILED,
    MAX_AGE_LIMIT,
    MODES,
    NONE,
    SLOTS,
    VALID,
    Policy,
    Result,
    is_normalized_domain,
    valid_mx_pattern,
)

# Modes come from a three-word vocabulary; sharing the string objects keeps 100 000
# cached policies from carrying 100 000 copies of "enforce".
_MODES = {m: m for m in MODES}
_POLICY_ID = re.compile(r"[A-Za-z0-9]{1,32}")  # RFC 8461 §3.1 sts-id
# A time this far ahead of the clock is not a fetch time: such an entry would never be
# refreshed nor expire. (A day absorbs a clock that was set back.)
FUTURE_SLACK = 86400.0
MAX_LAST_ERROR = 200
# Many domains share their provider's MX patterns: check each spelling once.
_valid_pattern = functools.lru_cache(maxsize=8192)(valid_mx_pattern)


@functools.lru_cache(maxsize=8192, typed=True)
def _shared(value):
    """One object for equal values (bounded): provider MX patterns and the few usual TTLs
    are held once, not once per cached policy."""
    return value


class StoreError(Exception):
    """A store operation failed (disk full, I/O error, locked, unreadable...).
    str() is one line for the operator; kind is a short stable name of the cause
    (for rate-limited logging), e.g. "SQLITE_FULL" or "EACCES"."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


class UnusableStore(StoreError):
    """The store's content cannot be used (not a database, damaged, foreign schema):
    the daemon moves it aside and starts an empty one."""


class BadEntry(ValueError):
    """One stored entry that cannot be trusted; str() says why."""


@dataclasses.dataclass(frozen=True, **SLOTS)
class Entry:
    """A cached policy: the Result handed to front ends plus refresh bookkeeping."""

    result: Result  # status VALID, source "cache"
    checked_at: float  # when the TXT id was last confirmed (or the policy fetched)
    refresh_failures: int = 0  # consecutive failed refreshes
    last_error: Optional[str] = None
    # The DNS TTL of the _mta-sts TXT record when its id was last confirmed: the id is
    # checked again once it has passed (discovery.py). None: not known (an entry stored
    # before the TTL was kept), [cache] id_check_interval applies.
    txt_ttl: Optional[int] = None

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

    @property
    def failing(self) -> bool:
        """An enforce/testing policy whose last refresh failed."""
        return bool(self.refresh_failures) and self.policy.mode != "none"

    def confirmed(self, at: float, txt_ttl: Optional[int]) -> "Entry":
        """This entry with its TXT id confirmed at `at`; txt_ttl: the record's TTL then
        (None: keep the one known)."""
        ttl = self.txt_ttl if txt_ttl is None else _shared(txt_ttl)
        return dataclasses.replace(self, checked_at=at, txt_ttl=ttl)


def make_entry(
    domain: str,
    policy_id: str,
    policy: Policy,
    fetched_at: float,
    checked_at: Optional[float] = None,
    refresh_failures: int = 0,
    last_error: Optional[str] = None,
    txt_ttl: Optional[int] = None,
) -> Entry:
    policy = dataclasses.replace(policy, mode=_MODES.get(policy.mode, policy.mode), mx=tuple(map(_shared, policy.mx)))
    result = Result(
        domain=domain,
        status=VALID,
        source="cache",
        policy_id=policy_id,
        policy=policy,
        fetched_at=fetched_at,
        expires=fetched_at + policy.max_age,
    )
    checked = fetched_at if checked_at is None else checked_at
    return Entry(result, checked, refresh_failures, last_error, None if txt_ttl is None else _shared(txt_ttl))


def policy_json(entry: Entry) -> str:
    return json.dumps(entry.policy.as_dict(), separators=(",", ":"))


def entry_fields(entry: Entry) -> Dict[str, Any]:
    """The stored form of an entry, one value per field (policy as JSON text):
    decode_entry(**entry_fields(entry)) gives it back. Every backend stores these."""
    return {
        "domain": entry.domain,
        "policy_id": entry.policy_id,
        "policy": policy_json(entry),
        "fetched_at": entry.fetched_at,
        "checked_at": entry.checked_at,
        "refresh_failures": entry.refresh_failures,
        "last_error": entry.last_error,
        "txt_ttl": entry.txt_ttl,
    }


# A key-value store (Redis) keeps entry_fields() as one object: without the domain (the
# key names it), the policy as an object, and without the fields that hold their default.
# A reader passes on every name decode_entry() takes and ignores others, and a missing
# one takes its default, so a new field needs nothing here, and daemons of two releases
# can share one store during an upgrade.
_DEFAULTS: Dict[str, Any] = {"refresh_failures": 0, "last_error": None, "txt_ttl": None}


def stored_fields(entry: Entry) -> Dict[str, Any]:
    fields = entry_fields(entry)
    del fields["domain"]
    fields["policy"] = entry.policy.as_dict()
    return {name: value for name, value in fields.items() if name not in _DEFAULTS or value != _DEFAULTS[name]}


def decode_fields(domain: Any, fields: Any, now: Optional[float] = None) -> Entry:
    """An Entry from stored_fields() read back (a dict), checked like decode_entry()."""
    if not isinstance(fields, dict):
        raise BadEntry("not an object")
    args = dict(_DEFAULTS)
    args.update((name, value) for name, value in fields.items() if name in _DECODE_ARGS)
    missing = _DECODE_ARGS.difference(args)
    if missing:
        raise BadEntry(f"no {', '.join(sorted(missing))}")
    return decode_entry(domain, now=now, **args)


# Answers without a policy ("none" for negative_ttl, "failed" for failure_backoff) in a
# shared store: "STATUS REASON [ID]", a few bytes (there can be many).
_ANSWER_REASON = re.compile(r"[a-z0-9-]{1,40}")


def encode_answer(result: Result) -> str:
    return " ".join(p for p in (result.status, result.reason or "", result.policy_id or "") if p)


def decode_answer(domain: str, text: Any) -> Result:
    if not isinstance(text, str) or len(text) > 100:
        raise BadEntry("answer is not short text")
    parts = text.split(" ")
    status, reason = parts[0], parts[1] if len(parts) > 1 else ""
    policy_id = parts[2] if len(parts) == 3 else None
    # "none" carries no id, "failed" the id whose fetch failed
    valid = len(parts) == (2 if status == NONE else 3) and status in (NONE, FAILED)
    if not valid or not _ANSWER_REASON.fullmatch(reason) or (policy_id and not _POLICY_ID.fullmatch(policy_id)):
        raise BadEntry(f"answer {text[:40]!r}")
    return Result(domain, status, reason=reason, source="cache", policy_id=policy_id)


def redacted(url: str) -> str:
    """A store URL without its password, for log lines and messages."""
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return url.rpartition("@")[2]
    if password is None:
        return url
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urllib.parse.urlunsplit(parts._replace(netloc=user + parts.netloc.rpartition("@")[2]))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _time(name: str, value: Any, now: float) -> float:
    if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
        raise BadEntry(f"{name} is not a time: {str(value)[:40]!r}")
    if not 0 <= value <= now + FUTURE_SLACK:
        raise BadEntry(f"{name} out of range: {value!r}")
    return float(value)


def _printable(text: str) -> str:
    """Printable ASCII: `stsmilter cache list` shows it on a terminal (no escapes, no
    line of its own). We write reason codes; anything else was written by someone else."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def _policy(data: Any) -> Policy:
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except (ValueError, RecursionError):
            raise BadEntry("policy is not JSON") from None
    if not isinstance(data, dict):
        raise BadEntry("policy is not an object")
    version, mode, max_age, mx = (data.get(k) for k in ("version", "mode", "max_age", "mx"))
    if version != "STSv1":
        raise BadEntry(f"policy version {str(version)[:20]!r}")
    if mode not in _MODES:
        raise BadEntry(f"policy mode {str(mode)[:20]!r}")
    if not _is_int(max_age) or not 0 <= max_age <= MAX_AGE_LIMIT:
        raise BadEntry(f"max_age out of range: {str(max_age)[:40]}")
    if not isinstance(mx, list) or not all(isinstance(p, str) and _valid_pattern(p) for p in mx):
        raise BadEntry("mx is not a list of MX patterns")
    if mode != "none" and not mx:
        raise BadEntry(f"mode {mode} without mx")
    return Policy(version="STSv1", mode=mode, max_age=max_age, mx=tuple(mx))


def decode_entry(
    domain: Any,
    policy_id: Any,
    policy: Any,
    fetched_at: Any,
    checked_at: Any,
    refresh_failures: Any,
    last_error: Any,
    now: Optional[float] = None,
    txt_ttl: Any = None,
) -> Entry:
    """An Entry from stored fields (policy: JSON text or a dict), each checked for type and
    range; BadEntry says what is wrong. txt_ttl None: not stored (an older entry)."""
    now = time.time() if now is None else now
    if not is_normalized_domain(domain):
        raise BadEntry(f"domain {str(domain)[:60]!r}")
    if not isinstance(policy_id, str) or not _POLICY_ID.fullmatch(policy_id):
        raise BadEntry(f"policy id {str(policy_id)[:40]!r}")
    if not _is_int(refresh_failures) or not 0 <= refresh_failures < 2**31:
        raise BadEntry(f"refresh_failures {str(refresh_failures)[:20]!r}")
    if last_error is not None and not isinstance(last_error, str):
        raise BadEntry("last_error is not text")
    if txt_ttl is not None and not (_is_int(txt_ttl) and 0 <= txt_ttl <= MAX_TTL):
        raise BadEntry(f"txt_ttl {str(txt_ttl)[:20]!r}")
    return make_entry(
        domain,
        policy_id,
        _policy(policy),
        _time("fetched_at", fetched_at, now),
        _time("checked_at", checked_at, now),
        refresh_failures,
        _printable(last_error[:MAX_LAST_ERROR]) if last_error else None,
        txt_ttl,
    )


# The names decode_fields() passes on (decode_entry's stored fields).
_DECODE_ARGS = frozenset(inspect.signature(decode_entry).parameters) - {"domain", "now"}


class Store:
    """Persistence behind PolicyCache: the cache decides, a store only remembers.

    Thread-safe, one entry per domain. Any method may raise StoreError; PolicyCache
    turns that into a counted, rate-limited log line and carries on from memory. A
    backend never returns an entry it cannot vouch for: it decodes with decode_entry(),
    and passes what fails to _skip_bad() (counted) instead of returning it.
    """

    name = "memory"  # what log lines call this store (a path, a URL)
    # Several daemons share this store (fleet.py coordinates them); such a store also
    # offers claim(), release(), announce() and read_events() (store/redis.py).
    shared = False
    retry_after = 30.0  # seconds the guard leaves the store alone after a failure

    def __init__(self) -> None:
        self.bad_entries = 0  # entries found unusable so far (skipped, and dropped if possible)
        self.last_bad: Optional[Tuple[str, str]] = None  # (key, reason) of the latest

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
        return [e for e in self.entries() if is_due(e, now, interval)]

    def purge_expired(self, now: float) -> int:
        """Remove expired entries; returns how many."""
        expired = [e.domain for e in self.entries() if e.expires <= now]
        return sum(1 for domain in expired if self.delete(domain))

    def close(self) -> None:
        pass

    # Answers without a policy: kept in memory only unless the store is shared.

    def get_answer(self, domain: str) -> Optional[Result]:
        """A shared "none" or "failed" answer for domain (source "cache"), or None."""
        return None

    def put_answer(self, result: Result, ttl: float) -> None:
        """Share a "none" or "failed" answer for ttl seconds."""

    def _skip_bad(self, key: Any, reason: str) -> None:
        metrics.STORE_BAD_ENTRIES.inc()
        self.bad_entries += 1
        self.last_bad = (str(key)[:80], reason)


def is_due(entry: Entry, now: float, interval: float) -> bool:
    """Store.due()'s rule for one entry."""
    fetched, expires = entry.fetched_at, entry.expires
    return expires > now and (fetched <= now - interval or (now - fetched) * 2 >= expires - fetched)


class MemoryStore(Store):
    """No persistence: [cache] path empty, or a cache location that cannot be used."""

    def __init__(self) -> None:
        super().__init__()
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
