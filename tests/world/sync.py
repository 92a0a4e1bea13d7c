"""Plain calls into the engine's coroutines, for tests that exercise one layer alone.

The engine's DNS, fetch and DANE lookups are coroutines that the daemon runs on its
engine loop (stsmilter/engine/loop.py). A test that checks, say, the resolver against a
real DNS server wants to call it like a function: Sync(obj).method(...) runs the
coroutine method to completion on a fresh event loop (asyncio.run), and passes any other
attribute through."""

import asyncio
import functools
import inspect


class Sync:
    def __init__(self, target):
        self._target = target

    @property
    def target(self):
        return self._target

    def __getattr__(self, name):
        attribute = getattr(self._target, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute

        @functools.wraps(attribute)
        def call(*args, **kwargs):
            return asyncio.run(attribute(*args, **kwargs))

        return call
