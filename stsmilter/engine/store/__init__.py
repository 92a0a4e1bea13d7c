"""Persistent policy stores behind one small interface.

MTA-STS protection lives in the cache (RFC 8461 §3.3, §10.2): a policy learnt yesterday
must still apply after a restart, when an attacker may be hiding today's TXT record.
But a store only remembers; it never decides. PolicyCache (cache.py) keeps every policy
in memory first and treats the store as best-effort persistence, so a full disk or a
damaged file costs persistence, never enforcement.

- base.py: the ``Store`` interface, ``Entry``, the checks applied to everything read
  back (``decode_entry``), ``MemoryStore``;
- sqlite.py: ``SqliteStore``, the embedded default, with its versioned schema;
- files.py: opening the sqlite file whatever it looks like (moved aside if unusable);
- redis.py: ``RedisStore``, shared by several daemons ([cache] redis), imported only
  when chosen (redis-py is an optional extra).
"""

from stsmilter.engine.store.base import (  # noqa: F401 (the package's interface)
    BadEntry,
    Entry,
    MemoryStore,
    Store,
    StoreError,
    UnusableStore,
    decode_entry,
    is_due,
    make_entry,
    redacted,
)
from stsmilter.engine.store.files import open_sqlite
from stsmilter.engine.store.sqlite import SCHEMA_VERSION, SqliteStore  # noqa: F401


def open_store(path: str, recover: bool = True) -> Store:
    """The store named by [cache] path: empty means memory only.

    recover (the daemon): a file that cannot be used is moved aside, a location that
    cannot be used means memory only; both logged once and counted. Without recover (the
    one-shot commands), both raise StoreError (one line for the operator)."""
    if not path:
        return MemoryStore()
    return open_sqlite(path, recover)


def open_configured(cache, recover: bool = True) -> Store:
    """The store the [cache] section names: Redis when redis is set, else open_store(path).
    Without recover (the one-shot commands) an unreachable Redis raises StoreError."""
    if not cache.redis:
        return open_store(cache.path, recover)
    from stsmilter.engine.store.redis import RedisStore

    store = RedisStore(cache.redis, cache.redis_prefix, cache.redis_timeout, cache.refresh_interval)
    if not recover:
        try:
            store.ping()
        except StoreError:
            store.close()
            raise
    return store


def configured_name(cache) -> str:
    """What messages call the store the [cache] section names."""
    return redacted(cache.redis) if cache.redis else cache.path
