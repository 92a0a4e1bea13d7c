"""Store operations that cannot fail their caller.

PolicyCache runs every store call through a StoreGuard: a failure (StoreError, or any
other exception from a backend) is counted in stsmilter_store_errors_total{op}, logged
at most once a minute per kind as one line, and reported to the caller as "not done" so
it carries on from memory. After a failure the store is left alone for retry_after
seconds: a locked or hung store then costs one wait, not one per lookup.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from typing import Any, Callable, Optional, Tuple

from stsmilter import metrics
from stsmilter.ratelog import RateLimitedLog
from stsmilter.engine.store.base import Store, StoreError

log = logging.getLogger("stsmilter.store")


class StoreGuard:
    def __init__(
        self, store: Store, retry_after: Optional[float] = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.retry_after = store.retry_after if retry_after is None else retry_after  # the backend's own by default
        self.clock = clock
        self._lock = threading.Lock()
        self._resume_at = 0.0  # monotonic time before which the store is not touched
        self._log = RateLimitedLog(log, clock=clock)
        self._bad_reported = 0  # (a read-only snapshot arrives with its skipped entries)

    @property
    def available(self) -> bool:
        return self.clock() >= self._resume_at

    def call(self, op: str, method: Callable[..., Any], *args: Any) -> Tuple[bool, Any]:
        """(True, what method returned), or (False, None) if it failed or the store is
        resting after a failure."""
        if not self.available:
            return False, None
        try:
            value = method(*args)
        except Exception as e:  # any backend failure, expected or not, is a store failure
            self._failed(op, e)
            return False, None
        if self.store.bad_entries != self._bad_reported:
            self._report_bad_entries()
        return True, value

    def _failed(self, op: str, e: Exception) -> None:
        metrics.STORE_ERRORS.labels(op=op).inc()
        with self._lock:
            self._resume_at = self.clock() + self.retry_after
        kind = getattr(e, "kind", None) or getattr(e, "sqlite_errorname", None) or type(e).__name__
        # A backend's own errors speak for themselves; anything else is a bug: say what it is.
        text = str(e) if isinstance(e, (StoreError, sqlite3.Error, OSError)) else f"{type(e).__name__}: {e}"
        self._log.log(
            (op, kind), logging.WARNING,
            "cache %s: %s failed: %s; policies stay in memory, the store is tried again in %d s",
            self.store.name, op, text.splitlines()[0] if text else kind, self.retry_after,
        )

    def _report_bad_entries(self) -> None:
        with self._lock:
            skipped = self.store.bad_entries - self._bad_reported
            self._bad_reported = self.store.bad_entries
        key, reason = self.store.last_bad or ("?", "?")
        self._log.log(
            "bad-entries", logging.WARNING,
            "cache %s: skipped %d unusable stored policies (latest: %s: %s)", self.store.name, skipped, key, reason,
        )
