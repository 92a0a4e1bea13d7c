"""The socketmap server: listener, thread, connection limits, shutdown.

SocketmapServer binds the [socketmap] listen address (TCP or a unix socket: a stale socket
file left by a dead server is replaced, anything else refused) and serves it from an event
loop in its own thread (libmilter owns the main thread and the signals). Each connection
speaks connection.py; the answers are tlspolicy.py's.

No local client can lock the others out: at the connection limit a new connection
closes the longest-idle one (Postfix reconnects on its next lookup), and a request
that has begun must be complete within request_timeout or its connection is closed.
"""

import asyncio
import collections
import errno
import logging
import os
import socket
import stat
import time

from stsmilter import metrics
from stsmilter.unixsocket import chmod_socket
from stsmilter.socketmap.connection import Connection, Inbox, counts
from stsmilter.socketmap.maps import MapTable
from stsmilter.threads import LoopServer

log = logging.getLogger("stsmilter.socketmap")  # one logger for the socketmap front end

IDLE_TIMEOUT = 300.0  # Postfix reconnects when we close an idle connection
EVICTION_SCAN = 64  # at the limit, look this far into the longest-idle for one without a request


class SocketmapServer(LoopServer):
    """start() binds and serves from a thread of its own; stop() ends both."""

    thread_name, log, what = "stsmilter-socketmap", log, "socketmap"

    def __init__(self, discovery, settings, idle_timeout: float = IDLE_TIMEOUT, maps=None):
        super().__init__()
        # One tuple, so update() swaps all at once: the engine, the settings per map name
        # ([socketmap] and its [socketmap NAME] sections: maps.py), the engine's DANE
        # checker (None when no map has dane = auto).
        self.state = (discovery, self._table(settings, maps), getattr(discovery, "dane", None))
        self.listen = settings.listen
        self.idle_timeout = idle_timeout
        # At most this many connections; the daemon may set it below max_connections
        # to keep file descriptors for the milter (daemon.open_files_budget).
        self.connection_limit = settings.max_connections
        self.connections = collections.OrderedDict()  # Connection -> None, least recently active first
        self.begun = set()  # connections holding an incomplete request
        self.cache = {}  # request key -> _Entry; used by the loop thread only
        self.evicted_connections = collections.Counter()  # reason -> count
        self.inbox = None  # Inbox on the loop, once serving

    def evict_idlest(self) -> None:
        """Close the connection idle the longest, preferring one with no request under
        way, to admit a new one: one client holding every connection locks no one out."""
        victim = None
        for scanned, connection in enumerate(self.connections):
            if victim is None:
                victim = connection
            if not connection.queue and not connection.buffer:
                victim = connection
                break
            if scanned >= EVICTION_SCAN:
                break
        if victim is not None:
            self._evict(victim, "max_connections")

    def _expire_requests(self) -> None:
        """Close connections whose incomplete request is older than request_timeout."""
        timeout = self.state[1].base.request_timeout
        now = time.monotonic()
        for connection in [c for c in self.begun if now - c.request_started >= timeout]:
            self._evict(connection, "request_timeout")
        self.loop.call_later(min(1.0, timeout / 4), self._expire_requests)

    def _evict(self, connection, reason: str) -> None:
        self.connections.pop(connection, None)
        self.begun.discard(connection)
        connection.closing = True
        connection.transport.abort()  # connection_lost cancels its lookups
        self.evicted_connections[reason] += 1
        metrics.SOCKETMAP_EVICTED_CONNECTIONS.labels(reason=reason).inc()
        count = self.evicted_connections[reason]
        if count & (count - 1) == 0:  # 1, 2, 4, 8...: a flood logs a handful of lines
            if reason == "max_connections":
                log.warning("socketmap: %d connections open; closed the longest-idle to admit a new one"
                            " (%d so far)", self.connection_limit, count)
            else:
                log.warning("socketmap: a request was not complete within [socketmap] request_timeout;"
                            " connection closed (%d so far)", count)

    def update(self, discovery, settings, maps=None) -> None:
        """Engine and settings for the next request; a new listen needs a new server."""
        self.state = (discovery, self._table(settings, maps), getattr(discovery, "dane", None))

    @staticmethod
    def _table(settings, maps) -> MapTable:
        table = MapTable(settings, maps or {})
        for label in table.labels():
            counts(label)  # every configured map's series exist from the start
        return table

    @property
    def address(self):
        """The bound (host, port), or the unix socket path."""
        if self.listen.family == "unix":
            return self.listen.path
        return self._listener.sockets[0].getsockname()[:2]

    def _serving(self) -> None:
        self.inbox = Inbox(self.loop)
        self.loop.call_soon(self._expire_requests)

    async def _bind(self):
        try:
            return await self._listen()
        except OSError as e:
            raise OSError(e.errno, "socketmap: cannot listen on %s: %s" % (self.listen, e.strerror or e)) from None

    async def _listen(self):
        loop, factory = asyncio.get_running_loop(), lambda: Connection(self)
        if self.listen.family == "unix":
            _remove_stale_socket(self.listen.path)
            listener = await loop.create_unix_server(factory, self.listen.path, backlog=1024, start_serving=False)
            chmod_socket(self.listen.path, self.state[1].base.socket_mode)  # before the first accept
        else:
            listener = await loop.create_server(factory, self.listen.host, self.listen.port, backlog=1024,
                                                start_serving=False)
        await listener.start_serving()
        log.info("socketmap: listening on %s", self.listen)
        return listener

    async def _shutdown(self):
        self._listener.close()
        if self.listen.family == "unix":  # at once, so that no successor can have bound it yet
            try:
                os.unlink(self.listen.path)
            except FileNotFoundError:
                pass
        for _ in range(3):
            await asyncio.sleep(0)  # accepts already under way become connections
        for connection in list(self.connections):
            connection.transport.abort()  # connection_lost cancels its lookups
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        if tasks:
            await asyncio.wait(tasks, timeout=0.5)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file that nobody listens on; refuse to touch anything else."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, "%s exists and is not a socket" % path)
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: left behind by a server that died
            return
    raise OSError(errno.EADDRINUSE, "another server is listening on %s" % path)
