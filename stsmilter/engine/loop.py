"""The engine's event loop: one thread, where every discovery and DANE check waits.

Waiting on the network costs a socket and a coroutine here, not a thread, so a burst
of dead or hanging destinations grows the number of coroutines, not a queue in front
of a thread pool. The front ends stay synchronous or on loops of their own: they hand
work in with submit() and wait on the concurrent.futures.Future it returns.

Nothing on the loop may block: calls into the store (sqlite, Redis) and other blocking
calls go through blocking(), which runs them on a few threads of their own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import threading
from typing import Any, Awaitable, Callable, Optional, TypeVar

from stsmilter.engine.limits import Want, current_want
from stsmilter.threads import block_signals

log = logging.getLogger("stsmilter.engine")

T = TypeVar("T")
STORE_THREADS = 4  # store calls are short (the guard bounds a sick store's); they only must not block the loop


class EngineLoop:
    def __init__(self, name: str = "sts-engine", store_threads: int = STORE_THREADS) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(_exception_handler)
        self._blocking = concurrent.futures.ThreadPoolExecutor(
            max_workers=store_threads, thread_name_prefix="sts-store", initializer=block_signals
        )
        self._closing = threading.Lock()
        self.closed = False
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name=name, daemon=True)
        self._thread.start()
        started.wait()

    def _run(self, started: threading.Event) -> None:
        block_signals()  # HUP/TERM/INT are libmilter's, USR1 the reload thread's
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(started.set)
        try:
            self.loop.run_forever()
        finally:
            self._finish()

    def _finish(self) -> None:
        """As asyncio.run() ends: cancel what still runs, let it unwind, close the loop."""
        loop = self.loop
        for _round in range(3):  # work handed in while the loop stopped starts late: cancel it too
            tasks = asyncio.all_tasks(loop)
            if not tasks:
                break
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    def submit(self, coroutine: Awaitable[T], want: Optional[Want] = None) -> "concurrent.futures.Future[T]":
        """Run coroutine on the loop as a task of its own; want (if given) is what the
        limiters see of its urgency, in it and in every task it starts. Once the loop is
        closed: a cancelled future."""
        with self._closing:  # handed in before close() asks the loop to stop, or refused
            if not self.closed:
                if want is None:
                    return asyncio.run_coroutine_threadsafe(coroutine, self.loop)
                # The loop runs the callback that makes the task in a copy of this context,
                # and the task copies it in turn: the task and what it starts see want.
                context = contextvars.copy_context()
                context.run(current_want.set, want)
                return context.run(asyncio.run_coroutine_threadsafe, coroutine, self.loop)
        coroutine.close()
        refused: concurrent.futures.Future = concurrent.futures.Future()
        refused.cancel()
        return refused

    async def blocking(self, function: Callable[..., T], *args: Any) -> T:
        """function(*args) on a store thread, awaited from the loop."""
        return await self.loop.run_in_executor(self._blocking, function, *args)

    def close(self) -> None:
        """Stop the loop: what still runs is cancelled (its waiters get CancelledError)."""
        with self._closing:
            if self.closed:
                return
            self.closed = True
            # Queued behind every task handed in: each starts, then _finish() cancels it.
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self._blocking.shutdown(wait=False, cancel_futures=True)


def _exception_handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """Nothing of what the network does reaches the log as a traceback: an exception
    nobody retrieved (a task cancelled at shutdown, a transport error) is one line."""
    exception = context.get("exception")
    if isinstance(exception, (asyncio.CancelledError, ConnectionError, TimeoutError)):
        return
    message = context.get("message", "")
    if exception is not None:
        log.error("engine: %s: %s: %s", message, type(exception).__name__, exception)
    else:
        log.error("engine: %s", message)
