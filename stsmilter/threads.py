"""Helper threads: the signals they leave alone, and a listener on an asyncio loop of its own.

libmilter's signal thread waits for HUP/TERM/INT and the daemon's reload thread for USR1
(signal.sigwait), so no other thread may take them. daemon.run blocks them before any
thread exists and every thread inherits the mask; the engine's threads block them
themselves too (block_signals), since the CLI and the tests start them elsewhere.
"""

from __future__ import annotations

import errno
import logging
import signal
import threading
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # imported where a loop starts: the engine and the CLI use block_signals() alone
    import asyncio

BLOCKED_SIGNALS = frozenset({signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1})

# What asyncio's selector loop hands its exception handler when accept() fails for lack of
# resources; it then stops accepting on that listener for a second by itself. CPython 3.11
# goes on trying (and reporting) up to `backlog` accepts in the same pass.
ACCEPT_OUT_OF_RESOURCES = "socket.accept() out of system resource"


def block_signals() -> None:
    """Leave HUP/TERM/INT to libmilter and USR1 to the reload thread (a thread's first call)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED_SIGNALS)


class LoopServer:
    """A listener served from an asyncio loop in a thread of its own (libmilter owns the
    main thread and the signals): start() binds and returns once listening, stop() ends
    both. A subclass provides _bind() (the listener: an asyncio Server) and _shutdown(),
    and may schedule work on the loop in _serving().

    A failed accept() for lack of file descriptors is one counted, rate-limited line
    (descriptors.out_of_descriptors, listener = what), not asyncio's traceback; anything
    else goes to asyncio's default handler."""

    thread_name = "stsmilter-loop"
    log = logging.getLogger("stsmilter")  # what stop() warns on
    what = "server"  # its name in that warning

    def __init__(self) -> None:
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self._listener: Optional[asyncio.AbstractServer] = None
        self._thread: Optional[threading.Thread] = None
        self._startup_error: Optional[BaseException] = None
        self._accept_paused_until = 0.0  # loop time: one report per pause, not per attempt

    async def _bind(self) -> asyncio.AbstractServer:
        raise NotImplementedError

    async def _shutdown(self) -> None:
        """Close the listener and the connections (run in the loop after it stopped)."""
        raise NotImplementedError

    def _serving(self) -> None:
        """Called in the loop thread once listening, before the loop runs."""

    def start(self) -> None:
        """Bind and serve; returns once listening. _bind()'s exception (OSError: the
        address is unusable) if it cannot."""
        if self._thread is not None:
            raise RuntimeError(f"{self.what} already started")
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=self.thread_name, daemon=True)
        self._thread.start()
        ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            self._thread, error, self._startup_error = None, self._startup_error, None
            raise error

    def stop(self, timeout: float = 2.0) -> None:
        """Close the listener and every connection, and join the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            self.log.warning("%s: the server thread did not stop within %.1f s", self.what, timeout)

    def _loop_exception(self, loop, context) -> None:
        exc = context.get("exception")
        if (context.get("message") == ACCEPT_OUT_OF_RESOURCES and isinstance(exc, OSError)
                and exc.errno in (errno.EMFILE, errno.ENFILE)):
            now = loop.time()
            if now >= self._accept_paused_until:
                self._accept_paused_until = now + 0.5  # asyncio pauses 1 s
                self._out_of_descriptors(self.what)
            return
        loop.default_exception_handler(context)

    def _run(self, ready: threading.Event) -> None:
        import asyncio

        from stsmilter.descriptors import out_of_descriptors  # now: out of descriptors, no module file opens

        self._out_of_descriptors = out_of_descriptors
        block_signals()
        self.loop = loop = asyncio.new_event_loop()
        loop.set_exception_handler(self._loop_exception)
        try:
            try:
                self._listener = loop.run_until_complete(self._bind())
            except Exception as e:
                self._startup_error = e
                return
            finally:
                ready.set()
            self._serving()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
        finally:
            loop.close()
