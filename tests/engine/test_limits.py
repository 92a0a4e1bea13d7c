"""PriorityLimiter and Want (stsmilter/limits.py): the bound on DNS queries and fetches,
with work a caller waits for served first.

Each test drives one event loop with asyncio.run; a fake clock decides which Wants are
urgent, so the order is checked exactly, not by timing."""

import asyncio

import pytest
from prometheus_client import REGISTRY

from stsmilter.engine.limits import BACKGROUND, PriorityLimiter, Want, current_want


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


async def _hold(limiter, want, name, order, release):
    """Take a slot as `want`, note the order in which slots were granted, hold until released."""
    current_want.set(want)
    async with limiter:
        order.append(name)
        await release.wait()


async def _settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_at_most_limit_holders_and_fifo_among_equals():
    async def run():
        clock = Clock()
        limiter = PriorityLimiter(2, clock=clock)
        order, release = [], asyncio.Event()
        tasks = [asyncio.create_task(_hold(limiter, BACKGROUND, n, order, release)) for n in "abcde"]
        await _settle()
        assert order == ["a", "b"] and limiter.active == 2 and limiter.waiting == 3
        release.set()
        await asyncio.gather(*tasks)
        assert order == list("abcde") and limiter.active == 0 and limiter.waiting == 0

    asyncio.run(run())


def test_work_a_caller_waits_for_goes_before_background_work():
    async def run():
        clock = Clock()
        limiter = PriorityLimiter(1, clock=clock)
        order, gates = [], {n: asyncio.Event() for n in ("first", "refresh1", "refresh2", "lookup")}
        tasks = [asyncio.create_task(_hold(limiter, BACKGROUND, "first", order, gates["first"]))]
        await _settle()
        for name in ("refresh1", "refresh2"):
            tasks.append(asyncio.create_task(_hold(limiter, BACKGROUND, name, order, gates[name])))
        await _settle()
        tasks.append(asyncio.create_task(_hold(limiter, Want(clock.now + 5), "lookup", order, gates["lookup"])))
        await _settle()
        for name in ("first", "lookup", "refresh1", "refresh2"):
            gates[name].set()
            await _settle()
        await asyncio.gather(*tasks)
        assert order == ["first", "lookup", "refresh1", "refresh2"]

    asyncio.run(run())


def test_a_discovery_whose_callers_gave_up_goes_after_those_still_waited_for():
    async def run():
        clock = Clock()
        limiter = PriorityLimiter(1, clock=clock)
        order, release = [], asyncio.Event()
        tasks = [asyncio.create_task(_hold(limiter, BACKGROUND, "first", order, release))]
        await _settle()
        early = Want(clock.now + 1)  # its caller gives up after 1 s
        tasks.append(asyncio.create_task(_hold(limiter, early, "abandoned", order, release)))
        tasks.append(asyncio.create_task(_hold(limiter, Want(clock.now + 5), "waited-for", order, release)))
        await _settle()
        clock.now += 2
        release.set()
        await asyncio.gather(*tasks)
        assert order == ["first", "waited-for", "abandoned"]

    asyncio.run(run())


def test_background_work_that_a_caller_joins_is_promoted():
    async def run():
        clock = Clock()
        limiter = PriorityLimiter(1, clock=clock)
        order, release = [], asyncio.Event()
        tasks = [asyncio.create_task(_hold(limiter, BACKGROUND, "first", order, release))]
        await _settle()
        joined = Want(0.0, asyncio.get_running_loop())
        for name, want in (("background", Want()), ("joined", joined)):
            tasks.append(asyncio.create_task(_hold(limiter, want, name, order, release)))
        await _settle()
        joined.extend(clock.now + 5)  # a lookup joins the job (from another thread, as lookup() does)
        await _settle()
        release.set()
        await asyncio.gather(*tasks)
        assert order == ["first", "joined", "background"]

    asyncio.run(run())


def test_a_cancelled_waiter_leaves_and_a_slot_granted_as_it_is_cancelled_passes_on():
    async def run():
        limiter = PriorityLimiter(1, clock=Clock())
        order, release = [], asyncio.Event()
        first = asyncio.create_task(_hold(limiter, BACKGROUND, "first", order, release))
        await _settle()
        gone = asyncio.create_task(_hold(limiter, BACKGROUND, "gone", order, release))
        last = asyncio.create_task(_hold(limiter, BACKGROUND, "last", order, release))
        await _settle()
        gone.cancel()  # its deadline, while queued
        await _settle()
        assert limiter.waiting == 1
        release.set()
        await asyncio.gather(first, last)
        assert order == ["first", "last"] and limiter.active == 0
        with pytest.raises(asyncio.CancelledError):
            await gone

        # Granted and cancelled in the same loop iteration: the slot is not lost.
        release.clear()
        holder = asyncio.create_task(_hold(limiter, BACKGROUND, "holder", order, release))
        await _settle()
        unlucky = asyncio.create_task(_hold(limiter, BACKGROUND, "unlucky", order, release))
        after = asyncio.create_task(_hold(limiter, BACKGROUND, "after", order, release))
        await _settle()
        release.set()
        await asyncio.sleep(0)  # holder leaves: "unlucky" is granted its slot...
        unlucky.cancel()  # ...and cancelled before it runs
        await asyncio.gather(holder, after)
        assert order[-2:] == ["holder", "after"] and limiter.active == 0

    asyncio.run(run())


def test_a_full_limiter_says_so_in_a_metric_and_one_line(caplog):
    async def run():
        limiter = PriorityLimiter(1, "fetch", clock=Clock())
        release = asyncio.Event()
        tasks = [asyncio.create_task(_hold(limiter, BACKGROUND, n, [], release)) for n in range(4)]
        await _settle()
        waiting = REGISTRY.get_sample_value("stsmilter_discovery_waiting", {"stage": "fetch"})
        release.set()
        await asyncio.gather(*tasks)
        return waiting

    caplog.set_level("WARNING", logger="stsmilter.discovery")
    assert asyncio.run(run()) == 3
    assert [r.getMessage() for r in caplog.records if r.name == "stsmilter.discovery"] == [  # (a scrape may log too)
        "discovery: all 1 fetch slots are busy ([fetch] max_concurrent); 1 waiting, callers waiting for an answer first"
    ]
    assert REGISTRY.get_sample_value("stsmilter_discovery_waiting", {"stage": "fetch"}) == 0


def test_want_is_urgent_until_its_time():
    want = Want(10.0)
    assert want.urgent(9.9) and not want.urgent(10.0)
    want.extend(5.0)  # an earlier time never shortens it
    assert want.until == 10.0
    want.extend(12.0)
    assert want.urgent(11.0)
    assert not BACKGROUND.urgent(0.0)
