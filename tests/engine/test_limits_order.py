"""PriorityLimiter's order at its edges (stsmilter/limits.py), beside test_limits.py: never
more than `limit` holders, a cancelled urgent waiter does not let background work jump
the queue, a caller that joins work while it is being parked still promotes it, the
waiting count after cancellations, and the "slots are busy" line at most once a minute
(README "Many destinations are dead at once").

One event loop per test (asyncio.run); a fake clock decides urgency and the log's minute."""

import asyncio

import pytest

from stsmilter.engine import limits
from stsmilter.engine.limits import BACKGROUND, PriorityLimiter, Want
from stsmilter.ratelog import RateLimitedLog
from test_limits import Clock, _hold, _settle


def _tasks(limiter, order, plan):
    """One task per (name, want), each holding until its own event is set."""
    gates = {name: asyncio.Event() for name, _ in plan}
    tasks = {name: asyncio.create_task(_hold(limiter, want, name, order, gates[name])) for name, want in plan}
    return tasks, gates


def test_a_release_hands_out_one_slot_not_more_than_the_limit():
    async def run():
        limiter = PriorityLimiter(1, clock=Clock())
        order = []
        tasks, gates = _tasks(limiter, order, [(n, BACKGROUND) for n in "abc"])
        await _settle()
        gates["a"].set()
        await _settle()
        assert order == ["a", "b"] and limiter.active == 1 and limiter.waiting == 1
        gates["b"].set()
        await _settle()
        assert order == ["a", "b", "c"] and limiter.active == 1 and limiter.waiting == 0
        gates["c"].set()
        await asyncio.gather(*tasks.values())
        assert limiter.active == 0

    asyncio.run(run())


def test_a_cancelled_urgent_waiter_does_not_let_background_work_pass_the_urgent_one_behind_it():
    """Waiting callers first (limits.py): an urgent waiter that left the queue is skipped,
    and the next urgent one is served before the background work parked earlier."""
    async def run():
        clock = Clock()
        limiter = PriorityLimiter(1, clock=clock)
        order = []
        tasks, gates = _tasks(limiter, order, [("holder", BACKGROUND), ("refresh", BACKGROUND)])
        await _settle()
        more, more_gates = _tasks(limiter, order, [("gone", Want(clock.now + 5)), ("lookup", Want(clock.now + 5))])
        tasks.update(more)
        gates.update(more_gates)
        await _settle()
        tasks.pop("gone").cancel()  # its caller's deadline, while queued
        await _settle()
        assert limiter.waiting == 2
        for name in ("holder", "lookup", "refresh"):
            gates[name].set()
        await asyncio.gather(*tasks.values())
        assert order == ["holder", "lookup", "refresh"]

    asyncio.run(run())


def test_waiting_counts_each_cancelled_waiter_once():
    async def run():
        limiter = PriorityLimiter(1, clock=Clock())
        order = []
        tasks, gates = _tasks(limiter, order, [(n, BACKGROUND) for n in ("holder", "w1", "w2", "w3")])
        await _settle()
        assert limiter.waiting == 3
        tasks.pop("w1").cancel()
        await _settle()
        assert limiter.waiting == 2
        for name in ("w2", "w3"):
            tasks.pop(name).cancel()
        await _settle()
        assert limiter.waiting == 0
        gates["holder"].set()
        await tasks.pop("holder")
        assert limiter.active == 0
        # Nothing waits any more: the next caller gets the free slot at once.
        await asyncio.wait_for(limiter.acquire(), 1)
        assert limiter.active == 1 and order == ["holder"]

    asyncio.run(run())


class JoiningClock(Clock):
    """Calls join() at the first reading after `want` was parked: a caller joining the
    work from another thread lands between parking and the limiter's second look."""

    def __init__(self):
        super().__init__()
        self.want = None
        self.joined = False

    def __call__(self):
        if self.want is not None and self.want.parked and not self.joined:
            self.joined = True
            self.want.extend(self.now + 5)
        return self.now


def test_a_caller_that_joins_while_the_work_is_being_parked_still_promotes_it():
    """Want.extend(): "parking sets parked before it reads until, and extend sets until
    before it reads parked: one of them sees the other". Here extend() cannot promote
    (no loop to call back), so the limiter's second look must."""
    async def run():
        clock = JoiningClock()
        limiter = PriorityLimiter(1, clock=clock)
        order = []
        tasks, gates = _tasks(limiter, order, [("holder", BACKGROUND), ("refresh", BACKGROUND)])
        await _settle()
        clock.want = Want(0.0)  # nobody waits for it yet; no loop: extend() only sets until
        more, more_gates = _tasks(limiter, order, [("joined", clock.want)])
        tasks.update(more)
        gates.update(more_gates)
        await _settle()
        assert clock.joined and clock.want.until == clock.now + 5
        for name in ("holder", "joined", "refresh"):
            gates[name].set()
        await asyncio.gather(*tasks.values())
        assert order == ["holder", "joined", "refresh"]

    asyncio.run(run())


def test_extending_a_want_without_a_loop_sets_its_time_only():
    async def run():
        clock = Clock()
        limiter = PriorityLimiter(1, clock=clock)
        order = []
        want = Want(0.0)
        tasks, gates = _tasks(limiter, order, [("holder", BACKGROUND), ("parked", want)])
        await _settle()
        assert want.parked
        want.extend(clock.now + 5)  # from the loop's own thread: nothing to call back
        assert want.urgent(clock.now)
        for gate in gates.values():
            gate.set()
        await asyncio.gather(*tasks.values())
        assert order == ["holder", "parked"]

    asyncio.run(run())


def test_a_want_nobody_waits_for_is_never_urgent():
    # time.monotonic() starts at 0 (boot) at the earliest: not urgent even then
    assert not Want().urgent(0.0)


def test_a_full_limiter_logs_at_most_one_line_a_minute_and_counts_the_rest(monkeypatch, caplog):
    """README: "discovery: all N fetch slots are busy ...": warning, at most one a minute;
    the next line says how many were left out."""
    clock = Clock()
    monkeypatch.setattr(limits, "RateLimitedLog", lambda logger, **kw: RateLimitedLog(logger, clock=clock, **kw))

    async def run():
        limiter = PriorityLimiter(1, "dns", clock=clock)
        order = []
        tasks, gates = _tasks(limiter, order, [(n, BACKGROUND) for n in ("holder", "w1", "w2", "w3")])
        await _settle()
        clock.now += 59.5
        more, more_gates = _tasks(limiter, order, [("w4", BACKGROUND)])
        await _settle()
        clock.now += 0.5
        last, last_gates = _tasks(limiter, order, [("w5", BACKGROUND)])
        await _settle()
        for gate in (*gates.values(), *more_gates.values(), *last_gates.values()):
            gate.set()
        await asyncio.gather(*tasks.values(), *more.values(), *last.values())

    caplog.set_level("WARNING", logger="stsmilter.discovery")
    asyncio.run(run())
    assert [r.getMessage() for r in caplog.records if r.name == "stsmilter.discovery"] == [
        "discovery: all 1 dns slots are busy ([dns] max_concurrent); 1 waiting, callers waiting for an answer first",
        "discovery: all 1 dns slots are busy ([dns] max_concurrent); 5 waiting, callers waiting for an answer first"
        " (3 more times since the last such line)",
    ]
    assert all(r.levelname == "WARNING" for r in caplog.records if r.name == "stsmilter.discovery")


@pytest.mark.parametrize("stage", ["dns", "fetch"])
def test_each_stage_names_its_own_setting(stage, caplog):
    async def run():
        limiter = PriorityLimiter(1, stage, clock=Clock())
        order = []
        tasks, gates = _tasks(limiter, order, [("holder", BACKGROUND), ("waiter", BACKGROUND)])
        await _settle()
        for gate in gates.values():
            gate.set()
        await asyncio.gather(*tasks.values())

    caplog.set_level("WARNING", logger="stsmilter.discovery")
    asyncio.run(run())
    assert [r.getMessage() for r in caplog.records if r.name == "stsmilter.discovery"] == [
        f"discovery: all 1 {stage} slots are busy ([{stage}] max_concurrent); 1 waiting, callers waiting for an"
        " answer first"
    ]
