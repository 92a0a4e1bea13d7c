"""Out of file descriptors: the one line and the count every listener reports.

Every listener of the daemon (libmilter's, through the milter guard; the socketmap's, the
/metrics server's and the control socket's) reports here when it could not accept for
lack of descriptors: stsmilter_out_of_descriptors_total{listener} counts each time, and
one line a minute per listener says so. A small module of its own, below every layer,
so that the front ends and the helper threads need not import the service to report.
"""

from __future__ import annotations

import logging
import resource

from stsmilter import metrics
from stsmilter.ratelog import RateLimitedLog

log = logging.getLogger("stsmilter")

_said = RateLimitedLog(log)


def out_of_descriptors(listener: str, count: int = 1) -> None:
    """Count count connections (or accept pauses) a listener ("milter", "socketmap",
    "metrics", "control") could not serve for lack of descriptors; log it at most once a
    minute per listener."""
    metrics.OUT_OF_DESCRIPTORS.labels(listener=listener).inc(count)
    _said.log(listener, logging.WARNING,
              "%s: out of file descriptors (open files limit %d): new connections are refused until some close",
              listener, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
