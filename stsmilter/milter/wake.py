"""Keep libmilter's worker pool from leaving a milter connection unserved.

Debian's libmilter (8.17, and sendmail's since 8.14) is built with its worker pool
(_FFR_WORKERS_POOL: the library exports mi_pool_controller_init and mi_start_session).
A session with bytes to read is marked "ready to run" whenever the pool counts an idle
worker, but that count drops only when a signalled worker wakes up: when a new
connection and other sessions become ready at about the same moment, more sessions
are marked ready than there are workers woken to take them. Each woken worker takes
the oldest ready session, and if that one is a broken client (a packet that never
completes) the worker sits in its read for the whole [milter] timeout. No new worker
is started for a session already marked ready, so a well-formed client (Postfix) can
wait for its option negotiation reply until some worker finishes, up to [milter]
timeout (seen: 120 s). A no-op pymilter milter shows the same under the same load.

Any new connection to the milter socket ends such a wait: libmilter either starts a
worker for it (none idle), which serves the stranded session after the new one, or
wakes an idle worker, which takes the oldest ready session first. So a thread opens
and closes one connection to our own milter socket every WAKE_INTERVAL seconds. The
empty session never reaches Python (libmilter reads EOF and closes it), and costs a
loopback connect and, at most, one thread start per interval.
"""

from __future__ import annotations

import threading
import time

from stsmilter.milter.stop import poke

WAKE_INTERVAL = 0.5  # seconds; a stranded session waits about this long, not [milter] timeout


def start_waker(socket_spec: str, interval: float = WAKE_INTERVAL) -> threading.Thread:
    """Poke the milter socket every interval seconds, for as long as the process runs."""

    def wake() -> None:
        while True:
            time.sleep(interval)
            poke(socket_spec)

    thread = threading.Thread(target=wake, name="sts-milter-wake", daemon=True)
    thread.start()
    return thread
