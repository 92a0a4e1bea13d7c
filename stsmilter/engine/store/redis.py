"""A store in Redis shared by several daemons ([cache] redis = URL): one fetch per policy
for the whole fleet and one view of every policy (fleet.py coordinates the daemons).

Imported only when [cache] redis is set: redis-py is an optional extra
(``stsmilter[redis]``; Debian's python3-redis 4.3 is enough). Every key starts with
[cache] redis_prefix, so several installations can share one Redis:

- ``<prefix>p:<domain>``: a policy, JSON (base.stored_fields), expiring with the policy;
- ``<prefix>n:<domain>``: an answer without a policy ("none no-txt-record" for
  negative_ttl, "failed <reason> <id>" for failure_backoff), a few bytes;
- ``<prefix>due``: sorted set, domain -> when its refresh is due (refresher, count);
- ``<prefix>l:<domain>``: the single-flight lock (SET NX PX, redis-py's Lock);
- ``<prefix>events``: a stream of "changed"/"purge" events every daemon reads.

Redis content is input like a sqlite row: everything read back goes through the same
checks (base.decode_fields/decode_answer); what fails is skipped, counted and dropped.
Every call is bounded by [cache] redis_timeout, with no retries, and any failure is a
StoreError: the guard then leaves Redis alone for retry_after seconds and the daemon
carries on from memory.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import redis
import redis.exceptions
import redis.lock

from stsmilter.engine.policy import Result, is_normalized_domain
from stsmilter.engine.store.base import (
    BadEntry,
    Entry,
    Store,
    decode_answer,
    decode_fields,
    encode_answer,
    is_due,
    redacted,
    stored_fields,
)
from stsmilter.engine.store.redis_client import NOT_A_STRING, make_client, redis_errors, reply_text

BATCH = 500  # keys per read (_read) / ZREM
MAX_VALUE = 256 * 1024  # a stored policy is far smaller; anything larger is not ours
EVENTS_KEPT = 10000  # the stream is trimmed to about this many events
MAX_EVENTS_READ = 1000


class RedisStore(Store):
    shared = True
    retry_after = 5.0  # a network store comes back by itself: look again soon

    def __init__(
        self,
        url: str,
        prefix: str = "stsmilter:",
        timeout: float = 0.5,
        refresh_interval: float = 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.name = redacted(url)
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        self.refresh_interval = refresh_interval
        self.clock = clock
        self.sender = os.urandom(6).hex()  # tells this process's events from the others'
        self._client = make_client(url, timeout)
        self._reader: Optional[redis.Redis] = None  # read_events()'s own blocking connection
        self.events_per_read = MAX_EVENTS_READ
        self._due_key = f"{prefix}due"
        self._events_key = f"{prefix}events"

    # --- keys

    def _policy_key(self, domain: str) -> str:
        return f"{self.prefix}p:{domain}"

    def _answer_key(self, domain: str) -> str:
        return f"{self.prefix}n:{domain}"

    def _lock_key(self, domain: str) -> str:
        return f"{self.prefix}l:{domain}"

    # --- decoding what Redis holds (input like any other)

    def _replace_foreign_keys(self) -> bool:
        """Drop (and count) the schedule or the event stream if it is not a sorted set or
        a stream: the next write makes a new one. True if one was dropped."""
        replaced = False
        for key, expected in ((self._due_key, "zset"), (self._events_key, "stream")):
            found = reply_text(self._client.type(key))
            if found not in ("none", expected):
                self._skip_bad(key, f"a Redis {found}, not a {expected}")
                self._client.delete(key)
                replaced = True
        return replaced

    def _read(self, keys: Sequence[str]) -> List[Any]:
        """Each key's value: bytes, at most MAX_VALUE + 1 of them (a Redis string may hold
        512 MB: GET would read it all to find it too large); None if the key is absent;
        NOT_A_STRING if it holds another Redis type. One round trip, atomic."""
        pipe = self._client.pipeline(transaction=True)
        for key in keys:
            pipe.type(key)
            pipe.getrange(key, 0, MAX_VALUE)
        replies = pipe.execute(raise_on_error=False)
        values = []
        for kind, value in zip(replies[::2], replies[1::2]):
            if isinstance(kind, Exception):
                raise kind
            kind = reply_text(kind)
            if kind == "none":
                values.append(None)
            elif kind != "string":
                values.append(NOT_A_STRING)
            elif isinstance(value, Exception):
                raise value
            else:
                values.append(value)
        return values

    def _get(self, key: str) -> Any:
        return self._read([key])[0]

    def _decode(self, domain: str, value: Any, now: float) -> Optional[Entry]:
        if value is None:
            return None
        try:
            if value is NOT_A_STRING:
                raise BadEntry("not a string value")
            if len(value) > MAX_VALUE:
                raise BadEntry(f"more than {MAX_VALUE} bytes")
            try:
                fields = json.loads(value)
            except (ValueError, RecursionError):
                raise BadEntry("not JSON") from None
            return decode_fields(domain, fields, now)
        except Exception as e:  # BadEntry, or a check that did not foresee this value
            self._skip_bad(domain, str(e) if isinstance(e, BadEntry) else type(e).__name__)
            try:  # never usable: drop it, so it is counted once (best effort)
                self._client.delete(self._policy_key(domain))
                self._client.zrem(self._due_key, domain)
            except (redis.exceptions.RedisError, OSError):
                pass
            return None

    def _domains(self, members: Sequence[bytes]) -> List[str]:
        domains, bad = [], []
        for member in members:
            try:
                domains.append(member.decode("ascii"))
            except UnicodeDecodeError:
                self._skip_bad(member, "domain is not ASCII")
                bad.append(member)
        if bad:
            self._client.zrem(self._due_key, *bad)
        return domains

    def _load(self, domains: List[str]) -> List[Tuple[str, Optional[Entry]]]:
        """(domain, entry or None) for each domain, in batches."""
        now = self.clock()
        out = []
        for start in range(0, len(domains), BATCH):
            batch = domains[start : start + BATCH]
            values = self._read([self._policy_key(d) for d in batch])
            out += [(d, self._decode(d, v, now)) for d, v in zip(batch, values)]
        return out

    # --- Store

    @redis_errors
    def ping(self) -> None:
        self._client.ping()

    @redis_errors
    def get(self, domain: str) -> Optional[Entry]:
        return self._decode(domain, self._get(self._policy_key(domain)), self.clock())

    def _due_at(self, entry: Entry) -> float:
        """When the refresher should take the entry (is_due's rule with our interval)."""
        return min(entry.fetched_at + self.refresh_interval, (entry.fetched_at + entry.expires) / 2)

    @redis_errors
    def put(self, entry: Entry) -> None:
        ttl_ms = int((entry.expires - self.clock()) * 1000)
        pipe = self._client.pipeline(transaction=True)
        if ttl_ms <= 0:
            pipe.delete(self._policy_key(entry.domain))
            pipe.zrem(self._due_key, entry.domain)
        else:
            value = json.dumps(stored_fields(entry), separators=(",", ":"))
            pipe.set(self._policy_key(entry.domain), value, px=ttl_ms)
            pipe.zadd(self._due_key, {entry.domain: self._due_at(entry)})
            pipe.delete(self._answer_key(entry.domain))
        pipe.execute()

    @redis_errors
    def delete(self, domain: str) -> bool:
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(self._policy_key(domain))
        pipe.delete(self._answer_key(domain))
        pipe.zrem(self._due_key, domain)
        removed, _answer, _member = pipe.execute()
        return removed > 0

    @redis_errors
    def entries(self) -> Iterator[Entry]:
        domains = self._domains(self._client.zrange(self._due_key, 0, -1))
        return iter(sorted((e for _d, e in self._load(domains) if e is not None), key=lambda e: e.domain))

    @redis_errors
    def count(self) -> int:
        return int(self._client.zcard(self._due_key))

    @redis_errors
    def due(self, now: float, interval: float) -> List[Entry]:
        # Scores were computed with our refresh_interval; a shorter interval asked for
        # reaches that much further ahead, and is_due() decides exactly.
        horizon = now + max(0.0, self.refresh_interval - interval)
        domains = self._domains(self._client.zrangebyscore(self._due_key, "-inf", horizon))
        return [e for _d, e in self._load(domains) if e is not None and is_due(e, now, interval)]

    @redis_errors
    def purge_expired(self, now: float) -> int:
        """Redis expires the policy keys itself; this drops their refresh schedule (an
        expired policy was due before it expired, so only due members are looked at)."""
        domains = self._domains(self._client.zrangebyscore(self._due_key, "-inf", now))
        gone = [d for d, e in self._load(domains) if e is None or e.expires <= now]
        for start in range(0, len(gone), BATCH):
            batch = gone[start : start + BATCH]
            pipe = self._client.pipeline(transaction=False)
            pipe.zrem(self._due_key, *batch)
            pipe.delete(*[self._policy_key(d) for d in batch])
            pipe.execute()
        return len(gone)

    def close(self) -> None:
        for client in (self._client, self._reader):
            if client is not None:
                try:
                    client.close()
                except Exception:  # nothing left to lose
                    pass

    @redis_errors
    def get_answer(self, domain: str) -> Optional[Result]:
        value = self._get(self._answer_key(domain))
        if value is None:
            return None
        try:
            if value is NOT_A_STRING:
                raise BadEntry("not a string value")
            return decode_answer(domain, value.decode("ascii"))
        except (BadEntry, UnicodeDecodeError) as e:
            self._skip_bad(domain, str(e) if isinstance(e, BadEntry) else "answer is not ASCII")
            self._client.delete(self._answer_key(domain))
            return None

    @redis_errors
    def put_answer(self, result: Result, ttl: float) -> None:
        ttl_ms = int(ttl * 1000)
        if ttl_ms > 0:
            self._client.set(self._answer_key(result.domain), encode_answer(result), px=ttl_ms)

    # --- what a shared store adds (fleet.py)

    @redis_errors
    def claim(self, domain: str, seconds: float) -> Optional[redis.lock.Lock]:
        """The domain's lock for at most seconds (SET NX PX), or None if another holds it."""
        key = self._lock_key(domain)
        lock = self._client.lock(key, timeout=seconds, thread_local=False)  # acquire() says blocking=False
        # Our own random token: redis-py's default (uuid1) would put this host's MAC address in Redis.
        if lock.acquire(blocking=False, token=os.urandom(16).hex()):
            return lock
        if self._client.pttl(key) != -1:  # a claim (ours always expire), or gone meanwhile
            return None
        # Not a claim: without a TTL it would hold the domain for ever (every first lookup
        # waiting it out, its refresh never run).
        self._skip_bad(key, "a lock without expiry")
        self._client.delete(key)
        return lock if lock.acquire(blocking=False, token=os.urandom(16).hex()) else None

    @redis_errors
    def release(self, lock: redis.lock.Lock) -> None:
        try:
            lock.release()
        except redis.exceptions.LockError:
            pass  # it expired (the work took longer than the lock): nothing to release

    @redis_errors
    def announce(self, op: str, domain: str = "") -> None:
        """Tell every daemon sharing the store: op "changed" (reload domain), "purge"
        (forget domain) or "purge-all"."""
        fields = {"op": op, "domain": domain, "from": self.sender}
        self._client.xadd(self._events_key, fields, maxlen=EVENTS_KEPT, approximate=True)

    @redis_errors
    def last_event(self) -> bytes:
        """The id of the newest event ("0-0" if none): read_events() starts after it."""
        newest = self._client.xrevrange(self._events_key, count=1)
        return newest[0][0] if newest else b"0-0"

    @redis_errors
    def read_events(self, after: bytes, block: float) -> Tuple[bytes, List[Tuple[str, str, str]]]:
        """Events after the id `after`, waiting up to block seconds for one: (the last id
        read, [(op, domain, sender)]). A malformed event is skipped."""
        if self._reader is None:
            self._reader = make_client(self.url, block + self.timeout)
        answer = self._reader.xread({self._events_key: after}, count=MAX_EVENTS_READ, block=max(1, int(block * 1000)))
        events = []
        for _stream, items in answer or ():
            for event_id, fields in items:
                after = event_id
                event = _event(fields)
                if event is not None:
                    events.append(event)
        return after, events

    @redis_errors
    def purge_all(self) -> int:
        """Remove every policy and answer under our prefix; returns the policies removed."""
        removed = 0
        for pattern in (f"{self.prefix}p:*", f"{self.prefix}n:*"):
            batch: List[bytes] = []
            for key in self._client.scan_iter(match=pattern, count=BATCH):
                batch.append(key)
                if len(batch) >= BATCH:
                    removed += self._unlink(batch, pattern)
                    batch = []
            if batch:
                removed += self._unlink(batch, pattern)
        self._client.delete(self._due_key)
        return removed

    def _unlink(self, keys: List[bytes], pattern: str) -> int:
        n = int(self._client.delete(*keys))
        return n if pattern.endswith("p:*") else 0


_OPS = ("changed", "purge", "purge-all")


def _event(fields: Any) -> Optional[Tuple[str, str, str]]:
    try:
        op, domain, sender = (fields.get(k, b"").decode("ascii") for k in (b"op", b"domain", b"from"))
    except (AttributeError, UnicodeDecodeError):
        return None
    if op not in _OPS or len(domain) > 253 or len(sender) > 32 or (op != "purge-all") != bool(domain):
        return None
    if domain and not is_normalized_domain(domain):
        return None
    return op, domain, sender
