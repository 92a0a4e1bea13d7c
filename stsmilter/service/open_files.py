"""The daemon's open-files budget: RLIMIT_NOFILE against what the configuration may open.

Every socketmap connection is a file descriptor, and so is every milter session
(libmilter accepts as long as accept() works and bounds nothing). The daemon raises its
soft limit as far as the configuration needs (up to the hard limit) and, if that is not
enough, serves fewer socketmap connections than [socketmap] max_connections so that
RESERVE descriptors stay for the milter, DNS, policy fetches, the store, the listeners
and the logs.

If the process runs out all the same (a low hard limit, a flood of milter connections:
libmilter accepts whatever it can), no listener spins or logs a traceback: milter/shed.py
sheds waiting milter connections; the socketmap and metrics listeners (asyncio) stop
accepting for a second when accept() fails, the control socket for half a second. Every
such event goes through descriptors.out_of_descriptors(): a count in
stsmilter_out_of_descriptors_total and at most one line a minute per listener.
"""

from __future__ import annotations

import logging
import resource


log = logging.getLogger("stsmilter")

# Milter sessions (one per MTA process: Postfix's default_process_limit is 100), DNS
# and store descriptors, listeners, logs, pipes (the milter guard's: two, or a duplicate
# of the milter listener, a quiet socket and a spare), the interpreter's own.
RESERVE = 256
FLOOR = 16  # socketmap connections served however low the limit

def needed(cfg) -> int:
    """Descriptors the configuration may hold open at once."""
    from stsmilter.service.metrics_server import MAX_CONNECTIONS as METRICS_CONNECTIONS

    from stsmilter.engine.loop import STORE_THREADS

    # A UDP socket per DNS query in flight, an HTTPS socket per fetch.
    total = RESERVE + cfg.dns.max_concurrent + cfg.fetch.max_concurrent
    if cfg.socketmap.listen is not None:
        total += cfg.socketmap.max_connections
    if cfg.metrics.listen is not None:
        total += METRICS_CONNECTIONS
    if cfg.cache.redis:  # a Redis connection per store thread, plus the refresher's, the events' and spares
        total += STORE_THREADS + 4
    if cfg.probe.enabled:  # a TCP connection per MX TLS check in flight
        total += cfg.probe.max_concurrent
    return total


def ensure(cfg) -> int:
    """Raise the soft open-files limit toward what cfg needs; return how many socketmap
    connections fit under the limit in force ([socketmap] max_connections if all do)."""
    need = needed(cfg)
    wanted = cfg.socketmap.max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < target:  # soft == hard: nothing to raise, the warning below
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open files limit raised from %d to %d", soft, target)
            soft = target
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, target, e)
    if soft == resource.RLIM_INFINITY or soft >= need or cfg.socketmap.listen is None:
        return wanted
    allowed = max(FLOOR, min(wanted, wanted - (need - soft)))
    log.warning(
        "open files limit %d (hard %d) is below the %d the configuration needs: serving at most %d"
        " socketmap connections instead of [socketmap] max_connections = %d (raise LimitNOFILE/ulimit -n)",
        soft, hard, need, allowed, wanted,
    )
    return allowed
