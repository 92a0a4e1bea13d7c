"""EngineLoop: work handed in runs on the loop with its Want; after close() it is refused
at once (a cancelled future), and nothing handed in is left unawaited."""

import asyncio
import gc
import threading
import time
import warnings

import pytest

from stsmilter.engine.limits import Want, current_want
from stsmilter.engine.loop import EngineLoop


def test_submitted_work_runs_on_the_loop_with_its_want(engine):
    want = Want()

    async def seen():
        await asyncio.sleep(0)
        return current_want.get()

    assert engine.submit(seen(), want).result(5) is want
    assert engine.submit(seen()).result(5) is not want  # no want given: not this one


@pytest.mark.parametrize("with_want", [False, True])
def test_work_handed_in_after_close_is_cancelled_and_never_left_unawaited(engine, with_want):
    engine.close()
    ran = []

    async def work():
        ran.append(True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        future = engine.submit(work(), Want() if with_want else None)
        gc.collect()
    assert future.cancelled() and ran == []
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []


def test_close_cancels_what_still_runs(engine):
    async def forever():
        await asyncio.Event().wait()

    future = engine.submit(forever())
    engine.close()
    assert future.cancelled()


def test_work_cancelled_by_close_before_it_started_is_never_left_unawaited():
    engine = EngineLoop(name="test-engine")
    blocker = engine.submit(asyncio.sleep(5))
    held, gate = threading.Event(), threading.Event()

    def hold():
        held.set()
        gate.wait(5)

    engine.loop.call_soon_threadsafe(hold)  # the loop is held up while work is queued ...
    assert held.wait(5)
    ran = []

    async def work():
        ran.append(True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        futures = [engine.submit(work(), Want()) for _ in range(5)]
        closer = threading.Thread(target=engine.close)
        closer.start()
        while not engine.closed:  # ... and behind it the loop's stop
            time.sleep(0.001)
        gate.set()
        closer.join(10)
        cancelled = [f.cancelled() for f in [blocker] + futures]
        del engine, blocker, futures, closer
        gc.collect()  # what was never awaited says so when it is collected
    assert cancelled == [True] * 6 and ran == []
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []
