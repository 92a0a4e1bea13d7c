"""Talking to Redis: a client whose every call is bounded by [cache] redis_timeout and
never retried, and every redis-py or socket error turned into one StoreError line."""

from __future__ import annotations

import functools
from typing import Any, Callable

import redis
import redis.backoff
import redis.exceptions
import redis.retry

from stsmilter.engine.store.base import StoreError


def failure(e: Exception) -> StoreError:
    text = (str(e) or type(e).__name__).splitlines()[0]
    return StoreError(f"redis: {text}", type(e).__name__)


def wrong_type(e: Exception) -> bool:
    """A command met a key holding another Redis type (written by someone else)."""
    return isinstance(e, redis.exceptions.ResponseError) and "WRONGTYPE" in str(e)  # also "Command # 2 ... WRONGTYPE"


def reply_text(reply: Any) -> str:
    """A status reply (TYPE's) as text, whichever way the redis-py release returns it."""
    return reply.decode("ascii", "replace") if isinstance(reply, bytes) else str(reply)


class NotAString:
    """What get() read from a policy or answer key that holds another Redis type."""


NOT_A_STRING = NotAString()


def redis_errors(method: Callable) -> Callable:
    """Whatever redis-py or the socket raises becomes a StoreError (one line). A schedule
    or event stream of another type is replaced and the call made once more: otherwise
    every call would fail, and the daemon would leave Redis alone for good."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            try:
                return method(self, *args, **kwargs)
            except redis.exceptions.ResponseError as e:
                if not (wrong_type(e) and self._replace_foreign_keys()):
                    raise
                return method(self, *args, **kwargs)
        except (redis.exceptions.RedisError, OSError) as e:
            raise failure(e) from None

    return wrapper


def make_client(url: str, timeout: float) -> "redis.Redis":
    """A client whose every call gives up after timeout seconds, without retrying (a
    retry would multiply the wait of a lookup while Redis is unreachable)."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry_on_timeout=False,
        retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        health_check_interval=30,
    )


def prepare(url: str, timeout: float) -> None:
    """Build (and drop) a client before privileges are dropped: redis-py imports some of
    its modules on first use, which the service user may not be able to read."""
    import importlib

    for name in ("hashlib", "secrets", "uuid"):  # scripts' SHA1 and tokens: imported lazily by some releases
        importlib.import_module(name)
    client = make_client(url, timeout)
    client.lock("x", timeout=1, blocking=False, thread_local=False)
    client.close()
