"""SharedFleet (stsmilter/fleet.py) one rule at a time, beside test_fleet.py (which runs whole
Discovery engines): once() over test_fleet.py's fake shared store on a real engine loop
(who works, who waits, what wakes a waiter, what is announced and released, and when a
waiter gives up), and the events thread's loop (_listen, _apply, _synchronise) driven by
a scripted store in the test's own thread.

Fleet rules (fleet.py's docstring, HACKING.rst "Several daemons"): the first daemon to
claim a domain runs work() and announces "changed"; the others wait (events wake them,
they poll otherwise) until shared() answers, at most lock_seconds + poll, then work()
themselves; wait=False: None while another daemon holds the domain; store unusable:
work(). Events: "changed" -> reload (not our own), "purge" -> forget, "purge-all" ->
forget_all; after an outage the missed events are read, then memory and store resync."""

import asyncio
import logging
import threading
import time

import pytest
from prometheus_client import REGISTRY

from stsmilter.engine import fleet as fleet_module
from stsmilter.engine.cache import PolicyCache
from stsmilter.engine.loop import EngineLoop
from stsmilter.engine.fleet import Fleet, SharedFleet
from stsmilter.engine.policy import Policy
from stsmilter.engine.store import StoreError, make_entry
from test_discovery import Clock
from test_fleet import FakeSharedStore, SharedBacking

DOMAIN = "example.com"
LOCK_SECONDS = 5.0


def fleet_lines(caplog):
    """What fleet.py logged (a scrape of the gauges may log the store's own lines)."""
    return [r for r in caplog.records if r.name == "stsmilter.fleet"]


def write_errors(op="write"):
    return REGISTRY.get_sample_value("stsmilter_store_errors_total", {"op": op}) or 0.0


class FaultyStore(FakeSharedStore):
    """The fake shared store, recording claim/release/announce/get and failing the methods
    named in `faults` (StoreError), one call at a time."""

    faults = frozenset()

    def __init__(self, backing, sender):
        super().__init__(backing, sender)
        self.calls = []

    def _fault(self, name, args):
        self.calls.append((name, *args))
        if name in self.faults:
            raise StoreError(f"{name} refused", "ConnectionError")

    def claim(self, domain, seconds):
        self._fault("claim", (domain, seconds))
        return super().claim(domain, seconds)

    def release(self, lock):
        self._fault("release", (lock,))
        return super().release(lock)

    def announce(self, op, domain=""):
        self._fault("announce", (op, domain))
        return super().announce(op, domain)

    def get(self, domain):
        self._fault("get", (domain,))
        return super().get(domain)

    def named(self, name):
        return [call for call in self.calls if call[0] == name]


class Daemon:
    """One daemon's SharedFleet on the shared engine loop (retry_after 0: every store call
    is tried, so each failure is counted)."""

    def __init__(self, backing, sender, engine, lock_seconds=LOCK_SECONDS, poll=0.05):
        self.store = FaultyStore(backing, sender)
        self.cache = PolicyCache(self.store, 100, 60, 300, clock=backing.clock, retry_after=0)
        self.fleet = SharedFleet(self.cache, lock_seconds, poll)
        self.fleet.bind(engine)
        self.engine = engine

    def start(self, domain, shared, work, wait=True):
        return self.engine.submit(self.fleet.once(domain, shared, work, wait))

    def once(self, *args, **kwargs):
        return self.start(*args, **kwargs).result(10)

    def waiting(self, domain):
        return domain in self.fleet._waiting


class Board:
    """What shared() finds in the store: another daemon's answer, per domain."""

    def __init__(self):
        self.answers = {}
        self.asked = 0

    def shared(self, domain):
        def look():
            self.asked += 1
            return self.answers.get(domain)
        return look


class Work:
    """work(): counts its calls, may wait on `gate` (a threading.Event), puts its answer
    on the board (as discovery's work fills the store) and returns it."""

    def __init__(self, board, domain, answer="mine", gate=None, error=None):
        self.board, self.domain, self.answer, self.gate, self.error = board, domain, answer, gate, error
        self.calls = 0

    async def __call__(self):
        self.calls += 1
        if self.gate is not None:
            await asyncio.to_thread(self.gate.wait, 10)
        if self.error is not None:
            raise self.error
        self.board.answers[self.domain] = self.answer
        return self.answer


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def backing():
    return SharedBacking(Clock(time.time()))


@pytest.fixture
def pair(backing, engine):
    return Daemon(backing, "d0", engine), Daemon(backing, "d1", engine)


# --- once(): who works


def test_an_answer_already_in_the_store_is_taken_without_a_lock_or_work(pair):
    a, _ = pair
    board = Board()
    board.answers[DOMAIN] = "theirs"
    work = Work(board, DOMAIN)
    assert a.once(DOMAIN, board.shared(DOMAIN), work) == "theirs"
    assert work.calls == 0 and a.store.named("claim") == [] and a.store.backing.events == []


def test_the_daemon_that_takes_the_lock_works_announces_changed_and_releases(pair):
    a, b = pair
    board = Board()
    work = Work(board, DOMAIN)
    assert a.once(DOMAIN, board.shared(DOMAIN), work) == "mine"
    assert work.calls == 1
    assert a.store.named("claim") == [("claim", DOMAIN, LOCK_SECONDS)]  # the lock lives lock_seconds
    assert a.store.backing.events == [("changed", DOMAIN, "d0")]
    assert len(a.store.named("release")) == 1
    assert b.store.claim(DOMAIN, 1) is not None  # released: another daemon may take it at once


def test_an_answer_that_arrived_just_before_the_lock_was_taken_is_used_without_work(pair):
    a, _ = pair
    answers = iter([None, "theirs"])  # nothing at first; there once the lock is ours
    work = Work(Board(), DOMAIN)
    assert a.once(DOMAIN, lambda: next(answers), work) == "theirs"
    assert work.calls == 0 and a.store.backing.events == []
    assert len(a.store.named("release")) == 1 and a.store.backing.locks == {}


def test_work_that_fails_releases_the_lock_and_announces_nothing(pair):
    a, b = pair
    board = Board()
    work = Work(board, DOMAIN, error=RuntimeError("bug"))
    with pytest.raises(RuntimeError):
        a.once(DOMAIN, board.shared(DOMAIN), work)
    assert a.store.backing.events == [] and b.store.claim(DOMAIN, 1) is not None


def test_with_the_store_unusable_each_daemon_works_on_its_own(pair):
    a, b = pair
    board = Board()
    a.store.backing.set_down(True)
    before = write_errors()
    works = [Work(board, DOMAIN), Work(board, DOMAIN)]
    board.answers.clear()
    assert a.once(DOMAIN, lambda: None, works[0]) == "mine"
    assert b.once(DOMAIN, lambda: None, works[1]) == "mine"
    assert [w.calls for w in works] == [1, 1]
    assert write_errors() == before + 2  # each claim: a failed write
    assert a.store.backing.events == []


@pytest.mark.parametrize("faults", [{"announce"}, {"release"}, {"announce", "release"}])
def test_a_failed_announce_or_release_is_a_failed_write_and_the_answer_stands(pair, faults):
    a, _ = pair
    a.store.faults = frozenset(faults)
    board = Board()
    before = write_errors()
    assert a.once(DOMAIN, board.shared(DOMAIN), Work(board, DOMAIN)) == "mine"
    assert write_errors() == before + len(faults)
    assert len(a.store.named("announce")) == 1 and len(a.store.named("release")) == 1


def test_wait_false_skips_a_domain_another_daemon_holds(pair):
    """The refresher: another daemon is refreshing it; no work, no wait."""
    a, b = pair
    lock = b.store.claim(DOMAIN, 60)
    board = Board()
    work = Work(board, DOMAIN)
    started = time.monotonic()
    assert a.once(DOMAIN, board.shared(DOMAIN), work, wait=False) is None
    assert work.calls == 0 and time.monotonic() - started < 1.0 and not a.waiting(DOMAIN)
    board.answers[DOMAIN] = "theirs"  # the holder's answer, once there, is taken
    assert a.once(DOMAIN, board.shared(DOMAIN), work, wait=False) == "theirs"
    b.store.release(lock)


# --- once(): waiting for the daemon that holds the domain


def test_a_waiter_wakes_on_the_holders_announcement_not_at_its_poll(backing, engine):
    a = Daemon(backing, "d0", engine, lock_seconds=60, poll=30)
    b = Daemon(backing, "d1", engine, lock_seconds=60, poll=30)
    board = Board()
    gate = threading.Event()
    holder = b.start(DOMAIN, board.shared(DOMAIN), Work(board, DOMAIN, answer="theirs", gate=gate))
    wait_until(lambda: b.store.named("claim"))
    work = Work(board, DOMAIN)
    waiter = a.start(DOMAIN, board.shared(DOMAIN), work)
    wait_until(lambda: a.waiting(DOMAIN))
    started = time.monotonic()
    gate.set()
    assert holder.result(5) == "theirs"
    a.fleet._apply(*backing.events[-1])  # what a's events thread does with b's "changed"
    assert waiter.result(5) == "theirs" and time.monotonic() - started < 5  # its poll is 30 s
    assert work.calls == 0 and not a.waiting(DOMAIN)


def test_the_events_thread_wakes_a_waiter(backing, engine):
    a = Daemon(backing, "d0", engine, lock_seconds=60, poll=30)
    b = Daemon(backing, "d1", engine, lock_seconds=60, poll=30)
    a.fleet.start()
    try:
        board = Board()
        gate = threading.Event()
        holder = b.start(DOMAIN, board.shared(DOMAIN), Work(board, DOMAIN, answer="theirs", gate=gate))
        wait_until(lambda: b.store.named("claim"))
        waiter = a.start(DOMAIN, board.shared(DOMAIN), Work(board, DOMAIN))
        wait_until(lambda: a.waiting(DOMAIN))
        gate.set()
        assert holder.result(5) == "theirs" and waiter.result(5) == "theirs"
        thread = a.fleet._thread
        assert thread.is_alive() and thread.name == "sts-fleet" and thread.daemon  # never holds up exit
    finally:
        a.fleet.close()


def test_without_an_event_a_waiter_looks_at_the_store_every_poll(backing, engine):
    a = Daemon(backing, "d0", engine, lock_seconds=60, poll=0.1)
    b = Daemon(backing, "d1", engine)
    lock = b.store.claim(DOMAIN, 60)
    board = Board()
    work = Work(board, DOMAIN)
    started = time.monotonic()
    waiter = a.start(DOMAIN, board.shared(DOMAIN), work)
    wait_until(lambda: a.waiting(DOMAIN))
    board.answers[DOMAIN] = "theirs"  # the holder's answer; its announcement is lost
    assert waiter.result(5) == "theirs" and time.monotonic() - started < 2  # not lock_seconds (60)
    assert work.calls == 0
    b.store.release(lock)


def test_a_lock_released_without_an_answer_is_taken_by_a_waiter(backing, engine):
    a = Daemon(backing, "d0", engine, lock_seconds=60, poll=0.05)
    b = Daemon(backing, "d1", engine)
    lock = b.store.claim(DOMAIN, 60)
    board = Board()
    work = Work(board, DOMAIN)
    waiter = a.start(DOMAIN, board.shared(DOMAIN), work)
    wait_until(lambda: a.waiting(DOMAIN))
    b.store.release(lock)  # the holder's work failed: nothing in the store
    assert waiter.result(5) == "mine" and work.calls == 1
    assert backing.events == [("changed", DOMAIN, "d0")]


def test_a_holder_that_never_answers_is_waited_for_lock_seconds_plus_poll(backing, engine, caplog):
    caplog.set_level(logging.INFO, logger="stsmilter.fleet")
    a = Daemon(backing, "d0", engine, lock_seconds=0.3, poll=0.2)
    b = Daemon(backing, "d1", engine)
    b.store.claim(DOMAIN, 60)  # a daemon that died holding it
    board = Board()
    work = Work(board, DOMAIN)
    started = time.monotonic()
    assert a.once(DOMAIN, board.shared(DOMAIN), work) == "mine"
    elapsed = time.monotonic() - started
    assert 0.3 + 0.2 <= elapsed < 3 and work.calls == 1
    assert len(a.store.named("claim")) >= 2  # it kept asking for the lock meanwhile
    assert [r.getMessage() for r in fleet_lines(caplog)] == [
        "example.com: another daemon's discovery takes too long; discovering it here"]


# --- _wait_for and _wake: one event per waited-for domain, nothing left behind


def test_waiters_on_one_domain_share_a_wakeup_and_leave_nothing_behind(pair, engine):
    a, _ = pair

    async def scenario():
        fleet = a.fleet
        first = asyncio.create_task(fleet._wait_for(DOMAIN, 0.05))
        second = asyncio.create_task(fleet._wait_for(DOMAIN, 10))
        other = asyncio.create_task(fleet._wait_for("other.example", 10))
        await asyncio.sleep(0.2)  # first timed out; second and other still wait
        assert first.done() and not second.done() and not other.done()
        fleet._wake_now(DOMAIN)
        await asyncio.wait_for(second, 1)
        assert not other.done()
        fleet._wake_now("other.example")
        await asyncio.wait_for(other, 1)
        assert fleet._waiting == {}
        timed_out = [asyncio.create_task(fleet._wait_for(DOMAIN, 0.01)) for _ in range(3)]
        await asyncio.gather(*timed_out)
        assert fleet._waiting == {}  # nobody waits: nothing kept for the domain

    engine.submit(scenario()).result(10)


def test_a_waiter_that_arrives_as_the_domain_is_woken_can_be_woken_again(pair, engine):
    """A wakeup replaces the domain's event; a waiter of the old one that leaves must not
    take the new waiter's place with it."""
    a, _ = pair

    async def scenario():
        fleet = a.fleet
        old = asyncio.create_task(fleet._wait_for(DOMAIN, 10))
        await asyncio.sleep(0.01)
        fleet._wake_now(DOMAIN)
        new = asyncio.create_task(fleet._wait_for(DOMAIN, 10))
        await asyncio.wait_for(old, 1)
        await asyncio.sleep(0.01)
        assert not new.done()
        fleet._wake_now(DOMAIN)
        await asyncio.wait_for(new, 1)
        assert fleet._waiting == {}

    engine.submit(scenario()).result(10)


def test_one_wakeup_wakes_every_waiter_of_the_domain(pair, engine):
    a, _ = pair

    async def scenario():
        fleet = a.fleet
        waiters = [asyncio.create_task(fleet._wait_for(DOMAIN, 10)) for _ in range(3)]
        await asyncio.sleep(0.01)
        fleet._wake_now(DOMAIN)
        await asyncio.wait_for(asyncio.gather(*waiters), 1)
        assert fleet._waiting == {}

    engine.submit(scenario()).result(10)


def test_the_last_waiter_of_a_domain_stays_wakeable_when_the_others_time_out(pair, engine):
    a, _ = pair

    async def scenario():
        fleet = a.fleet
        early = [asyncio.create_task(fleet._wait_for(DOMAIN, 0.02)) for _ in range(2)]
        last = asyncio.create_task(fleet._wait_for(DOMAIN, 10))
        await asyncio.gather(*early)
        await asyncio.sleep(0.01)
        assert not last.done()
        fleet._wake_now(DOMAIN)
        await asyncio.wait_for(last, 1)

    engine.submit(scenario()).result(10)


def test_a_wakeup_for_a_domain_nobody_waits_for_does_nothing(pair):
    a, _ = pair
    a.fleet._wake_now("nobody.example")  # the usual case: "changed" for a domain nobody waits for
    assert a.fleet._waiting == {}


def test_wake_from_another_thread_reaches_the_loop(pair, engine):
    a, _ = pair
    waiter = engine.submit(a.fleet._wait_for(DOMAIN, 10))
    wait_until(lambda: a.waiting(DOMAIN))
    a.fleet._wake(DOMAIN)  # from the events thread
    waiter.result(2)


def test_wake_without_a_loop_or_with_a_closed_one_does_nothing(backing):
    fleet = SharedFleet(PolicyCache(FaultyStore(backing, "d0"), 10, 60, 300), LOCK_SECONDS)
    fleet._wake(DOMAIN)  # not bound yet
    engine = EngineLoop()
    fleet.bind(engine)
    engine.close()
    fleet._wake(DOMAIN)  # shutting down: nobody waits


# --- _apply: what each event does to memory


class RecordingCache:
    def __init__(self, store):
        self.store = store
        self.calls = []
        self.resyncs = []  # what resync() answers, in turn
        self.written = 0

    def reload(self, domain):
        self.calls.append(("reload", domain))

    def forget(self, domain):
        self.calls.append(("forget", domain))
        return True

    def forget_all(self):
        self.calls.append(("forget_all",))
        return 3

    def resync(self):
        self.calls.append(("resync",))
        return self.resyncs.pop(0)

    def flush(self):
        self.calls.append(("flush",))
        return self.written


class Stopping:
    """threading.Event for _listen, recording each wait (which never blocks)."""

    def __init__(self):
        self.flag, self.waits = False, []

    def is_set(self):
        return self.flag

    def set(self):
        self.flag = True

    def wait(self, timeout=None):
        self.waits.append(timeout)
        return self.flag


class ScriptedStore:
    """The events side of a shared store: each read_events() (and last_event()) takes
    the next step of a script: an exception to raise or a value to return. When the
    script is done, the daemon is stopping and the store closes under the read."""

    name = "scripted://fleet"
    sender = "me"
    events_per_read = 3

    def __init__(self, script, stopping, last_events=("0",)):
        self.script, self.stopping = list(script), stopping
        self.last_events = list(last_events)
        self.reads = []  # (after, block)
        self.last_event_calls = 0

    def last_event(self):
        self.last_event_calls += 1
        step = self.last_events.pop(0)
        if isinstance(step, Exception):
            raise step
        return step

    def read_events(self, after, block):
        self.reads.append((after, block))
        if not self.script:
            self.stopping.set()
            raise StoreError("closed", "ConnectionError")
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


def events_fleet(script, last_events=("0",)):
    stopping = Stopping()
    store = ScriptedStore(script, stopping, last_events)
    cache = RecordingCache(store)
    fleet = SharedFleet(cache, LOCK_SECONDS)
    fleet._stopping = stopping
    woken = []
    fleet._wake = woken.append
    return fleet, store, cache, woken


def test_changed_by_another_daemon_is_reloaded_and_wakes_its_waiters():
    fleet, _, cache, woken = events_fleet([])
    fleet._apply("changed", DOMAIN, "other")
    assert cache.calls == [("reload", DOMAIN)] and woken == [DOMAIN]


def test_our_own_change_is_not_reloaded_but_still_wakes_our_waiters():
    fleet, _, cache, woken = events_fleet([])
    fleet._apply("changed", DOMAIN, "me")
    assert cache.calls == [] and woken == [DOMAIN]


def test_a_purge_forgets_the_domain_and_says_so(caplog):
    caplog.set_level(logging.INFO, logger="stsmilter.fleet")
    fleet, _, cache, woken = events_fleet([])
    fleet._apply("purge", DOMAIN, "cli")
    assert cache.calls == [("forget", DOMAIN)] and woken == []
    assert [r.getMessage() for r in fleet_lines(caplog)] == ["cache: example.com purged (stsmilter cache purge)"]


def test_a_purge_of_everything_forgets_everything_and_says_how_much(caplog):
    caplog.set_level(logging.INFO, logger="stsmilter.fleet")
    fleet, _, cache, woken = events_fleet([])
    fleet._apply("purge-all", "", "cli")
    assert cache.calls == [("forget_all",)] and woken == []
    assert [r.getMessage() for r in fleet_lines(caplog)] == ["cache: all 3 policies purged (stsmilter cache purge --all)"]


def test_an_unknown_event_changes_nothing(caplog):
    caplog.set_level(logging.INFO, logger="stsmilter.fleet")
    fleet, _, cache, woken = events_fleet([])
    fleet._apply("rename", DOMAIN, "future-version")
    assert cache.calls == [] and woken == [] and fleet_lines(caplog) == []


# --- _synchronise: after an outage, memory and store catch up with each other


def test_synchronise_reports_a_store_it_cannot_read_yet():
    fleet, _, cache, _ = events_fleet([])
    cache.resyncs = [None]
    assert fleet._synchronise() is False and cache.calls == [("resync",)]


def test_synchronise_with_nothing_missing_writes_nothing_and_says_it_is_in_step(caplog):
    caplog.set_level(logging.INFO, logger="stsmilter.fleet")
    fleet, _, cache, _ = events_fleet([])
    cache.resyncs = [0]
    assert fleet._synchronise() is True and cache.calls == [("resync",)]
    assert [r.getMessage() for r in fleet_lines(caplog)] == [
        "cache scripted://fleet: in step with the store again (wrote back 0 of 0 policies it lacked)"]


def test_synchronise_writes_back_what_the_store_lacks_and_says_so(caplog):
    caplog.set_level(logging.INFO, logger="stsmilter.fleet")
    fleet, _, cache, _ = events_fleet([])
    cache.resyncs, cache.written = [2], 1
    assert fleet._synchronise() is True and cache.calls == [("resync",), ("flush",)]
    assert [r.getMessage() for r in fleet_lines(caplog)] == [
        "cache scripted://fleet: in step with the store again (wrote back 1 of 2 policies it lacked)"]


# --- _listen: the events thread's loop


def changed(domain, sender="other"):
    return ("changed", domain, sender)


def test_events_are_applied_in_order_reading_on_from_where_the_last_read_ended(caplog):
    caplog.set_level(logging.INFO, logger="stsmilter.fleet")
    fleet, store, cache, woken = events_fleet([
        ("2", [changed("a.example"), ("purge", "b.example", "cli")]),
        ("3", [changed("c.example", "me")]),
    ])
    fleet._listen()
    assert store.last_event_calls == 1  # where to start: once, at the start
    assert store.reads == [("0", fleet_module.EVENT_WAIT), ("2", fleet_module.EVENT_WAIT),
                           ("3", fleet_module.EVENT_WAIT)]
    assert cache.calls == [("reload", "a.example"), ("forget", "b.example")]
    assert woken == ["a.example", "c.example"]
    assert fleet._stopping.waits == []  # a closed store while stopping: the thread just ends
    assert [(r.levelname, r.getMessage()) for r in fleet_lines(caplog)] == [
        ("INFO", "cache: b.example purged (stsmilter cache purge)")]  # nothing about reading "again"


def test_after_an_outage_the_missed_events_are_read_then_memory_and_store_resync(caplog):
    caplog.set_level(logging.INFO, logger="stsmilter.fleet")
    down = StoreError("Connection refused", "ConnectionError")
    fleet, store, cache, woken = events_fleet([
        down, down,
        ("5", [changed("a.example")]),  # what happened meanwhile, fewer than a full read
        ("6", [changed("b.example")]),
    ])
    cache.resyncs = [0]
    before = write_errors("read")
    fleet._listen()
    assert [after for after, _ in store.reads] == ["0", "0", "0", "5", "6"]  # the missed events: from "0"
    blocks = [block for _, block in store.reads]
    assert blocks[0] == fleet_module.EVENT_WAIT and blocks[3:] == [fleet_module.EVENT_WAIT] * 2
    assert all(block <= 0.1 for block in blocks[1:3])  # out of sync: do not wait for an event
    assert fleet._stopping.waits == [fleet_module.RETRY_SECONDS] * 2
    assert write_errors("read") == before + 2
    assert cache.calls == [("reload", "a.example"), ("resync",), ("reload", "b.example")]
    messages = [(r.levelname, r.getMessage()) for r in fleet_lines(caplog)]
    assert messages == [
        ("WARNING", "cache scripted://fleet: reading the fleet's events failed: Connection refused;"
                    " policies stay in memory"),  # the second failure of that kind: within the minute
        ("INFO", "cache scripted://fleet: reading the fleet's events again"),
        ("INFO", "cache scripted://fleet: in step with the store again (wrote back 0 of 0 policies it lacked)"),
    ]


def test_each_kind_of_read_failure_is_logged(caplog):
    fleet, _, cache, _ = events_fleet([StoreError("refused", "ConnectionError"),
                                       StoreError("timed out", "TimeoutError"), ("1", [])])
    cache.resyncs = [0]
    fleet._listen()
    assert [r.getMessage() for r in fleet_lines(caplog) if r.levelno == logging.WARNING] == [
        "cache scripted://fleet: reading the fleet's events failed: refused; policies stay in memory",
        "cache scripted://fleet: reading the fleet's events failed: timed out; policies stay in memory",
    ]


def test_resync_waits_until_the_missed_events_are_all_read():
    full = [changed(f"d{n}.example") for n in range(ScriptedStore.events_per_read)]
    fleet, store, cache, _ = events_fleet([
        StoreError("down", "ConnectionError"),
        ("3", full),  # a full read: more may be waiting
        ("4", [changed("last.example")]),
    ])
    cache.resyncs = [0]
    fleet._listen()
    assert [c for c in cache.calls if c[0] == "resync"] == [("resync",)]
    assert cache.calls.index(("resync",)) == len(full) + 1  # after the last missed event
    assert [block <= 0.1 for _, block in store.reads] == [False, True, True, False]


def test_a_store_that_cannot_be_read_for_the_resync_is_tried_again():
    fleet, store, cache, _ = events_fleet([
        StoreError("down", "ConnectionError"),
        ("1", []),
        ("1", []),
        ("1", []),
    ])
    cache.resyncs = [None, 2]
    cache.written = 2
    fleet._listen()
    assert cache.calls == [("resync",), ("resync",), ("flush",)]
    assert [block <= 0.1 for _, block in store.reads] == [False, True, True, False, False]


def test_where_to_start_is_asked_again_until_the_store_answers():
    fleet, store, cache, _ = events_fleet([("7", [])], last_events=[StoreError("down", "ConnectionError"), "4"])
    cache.resyncs = [0]
    fleet._listen()
    assert store.last_event_calls == 2 and store.reads[0][0] == "4"
    assert store.reads[1][0] == "7"


def test_a_bug_in_reading_events_is_logged_and_the_thread_carries_on(caplog):
    fleet, store, cache, woken = events_fleet([ValueError("boom"), ("1", [changed("a.example")])])
    before = write_errors("read")
    fleet._listen()
    assert [(r.levelname, r.getMessage()) for r in fleet_lines(caplog)] == [
        ("ERROR", "cache scripted://fleet: reading the fleet's events failed: ValueError: boom")]
    assert fleet._stopping.waits == [fleet_module.RETRY_SECONDS]
    assert woken == ["a.example"] and write_errors("read") == before  # a bug is not a store failure
    assert [block for _, block in store.reads][1] == fleet_module.EVENT_WAIT  # not an outage: in sync


def test_a_failure_while_stopping_ends_the_thread_quietly(caplog):
    class Closing(ScriptedStore):
        def read_events(self, after, block):
            self.stopping.set()  # close(): the store is closed under the read
            raise self.script.pop(0)

    for error in (StoreError("closed", "ConnectionError"), ValueError("closed file")):
        stopping = Stopping()
        store = Closing([error], stopping)
        fleet = SharedFleet(RecordingCache(store), LOCK_SECONDS)
        fleet._stopping = stopping
        fleet._listen()
        assert stopping.waits == [] and fleet_lines(caplog) == []


def test_close_ends_the_events_thread(backing):
    fleet = SharedFleet(PolicyCache(FaultyStore(backing, "d0"), 10, 60, 300), LOCK_SECONDS)
    fleet.start()
    thread = fleet._thread
    assert thread.is_alive()
    fleet.close()
    backing.set_down(True)  # wakes its blocking read, as closing the Redis connection does
    thread.join(5)
    assert not thread.is_alive()


def test_a_lone_daemon_just_works():
    lone = Fleet()
    lone.bind(None)
    lone.start()
    calls = []

    async def work():
        calls.append(1)
        return "mine"

    assert asyncio.run(lone.once(DOMAIN, lambda: "never asked", work)) == "mine" and calls == [1]
    lone.close()


def test_a_changed_event_makes_memory_take_the_other_daemons_policy(pair):
    """_apply over a real cache: another daemon's fetched policy reaches this one's memory."""
    a, _ = pair
    entry = make_entry(DOMAIN, "id1", Policy("STSv1", "enforce", 86400, ("mx.example.com",)),
                       a.store.backing.clock())
    a.store.backing.policies.put(entry)
    a.fleet._apply("changed", DOMAIN, "d1")
    assert a.cache.peek(DOMAIN) == entry
    a.store.calls.clear()
    a.fleet._apply("changed", "other.example", "d0")  # our own: memory has it already
    assert a.store.named("get") == []
