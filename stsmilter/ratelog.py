"""One log line per kind of fault per interval, however often the fault repeats.

A fault on the mail path (a full disk under the cache, say) can repeat on every lookup;
the log gets its first occurrence at once, then at most one line per interval that says
how many were left out. Metrics count every occurrence.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Dict, Hashable, Tuple


class RateLimitedLog:
    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        left_out: str = " (%d more since the last such line)",  # appended to a line after a gap
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.left_out_note = left_out
        self._lock = threading.Lock()
        self._kinds: Dict[Hashable, Tuple[float, int]] = {}  # kind -> (last logged, left out since)

    def log(self, kind: Hashable, level: int, message: str, *args) -> bool:
        """Log message unless this kind was logged less than interval ago; True if logged."""
        now = self.clock()
        with self._lock:
            last, left_out = self._kinds.get(kind, (None, 0))
            if last is not None and now - last < self.interval:
                self._kinds[kind] = (last, left_out + 1)
                return False
            self._kinds[kind] = (now, 0)
            if len(self._kinds) > 1000:  # kinds come from small vocabularies; stay bounded anyway
                self._kinds = {kind: (now, 0)}
        if left_out:
            message += self.left_out_note
            args = (*args, left_out)
        self.logger.log(level, message, *args)
        return True
