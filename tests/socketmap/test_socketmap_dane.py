"""The socketmap server with DANE first: asking a DANE checker (fast path from peek(),
slow path through submit(), Sendmail's "sts" map). answer() with a verdict: test_tlspolicy.py."""

import concurrent.futures
import threading
import time

import pytest

from stsmilter.engine.policy import Result
from test_socketmap import FakeDiscovery, answered, ask, serve  # noqa: F401 (serve: a fixture)
from test_tlspolicy import DANE, DNS_ERROR, NO_DANE, SECURE, TESTING, make_settings, valid
from world.socketmap_client import read_replies, request


class FakeChecker:
    """peek() from `cached`; submit() answers from `verdicts` (optionally after a gate)."""

    def __init__(self):
        self.cached, self.verdicts = {}, {}
        self.peeks, self.submits, self.waits = [], [], []
        self.gate = None

    def peek(self, domain):
        self.peeks.append(domain)
        return self.cached.get(domain)

    def submit(self, domain, wait=None):
        self.submits.append(domain)
        self.waits.append(wait)
        future = concurrent.futures.Future()
        outcome = self.verdicts.get(domain, NO_DANE)

        def finish():
            if self.gate is not None:
                self.gate.wait(10)
            future.set_result(outcome)

        threading.Thread(target=finish, daemon=True).start()
        return future


@pytest.fixture
def world():
    discovery, checker = FakeDiscovery(), FakeChecker()
    discovery.dane = checker
    yield discovery, checker
    if checker.gate is not None:
        checker.gate.set()
    discovery.close()


@pytest.fixture
def discovery(world):
    """The discovery test_socketmap's serve() starts its servers on."""
    return world[0]


def test_fast_path_answers_dane_only_from_two_peeks(serve, clients, world):
    discovery, checker = world
    discovery.cached["example.com"] = valid()
    checker.cached["example.com"] = DANE
    sock = clients(serve())
    before = answered("dane"), answered("secure")
    assert [ask(sock, b"example.com") for _ in range(3)] == [b"OK dane-only"] * 3
    assert discovery.submits == [] and checker.submits == []
    assert checker.peeks == ["example.com"] * 3  # asked every time: a verdict expires
    assert (answered("dane"), answered("secure")) == (before[0] + 3, before[1])


def test_a_new_verdict_changes_the_answer(serve, clients, world):
    discovery, checker = world
    discovery.cached["example.com"] = valid()
    checker.cached["example.com"] = DANE
    sock = clients(serve())
    assert ask(sock, b"example.com") == b"OK dane-only"
    checker.cached["example.com"] = NO_DANE
    assert ask(sock, b"example.com") == SECURE
    checker.cached["example.com"] = DNS_ERROR
    assert ask(sock, b"example.com") == b"TEMP DNSSEC lookup for DANE failed"


def test_no_cached_verdict_waits_for_the_check(serve, clients, world):
    discovery, checker = world
    discovery.cached["example.com"] = valid()
    checker.verdicts["example.com"] = DANE
    sock = clients(serve())
    assert ask(sock, b"example.com") == b"OK dane-only"
    assert checker.submits == ["example.com"] and discovery.submits == []
    [wait] = checker.waits  # the client waits what is left of lookup_timeout (0.3 s here)
    assert 0.2 < wait <= 0.3


def test_discovery_then_the_check(serve, clients, world):
    discovery, checker = world
    discovery.fetched["example.com"] = valid()
    checker.verdicts["example.com"] = DANE
    sock = clients(serve())
    assert ask(sock, b"example.com") == b"OK dane-only"
    assert discovery.submits == ["example.com"] and checker.submits == ["example.com"]


def test_a_slow_check_answers_as_on_timeout_says(serve, clients, world):
    discovery, checker = world
    discovery.cached["example.com"] = valid()
    checker.gate = threading.Event()
    sock = clients(serve(lookup_timeout=0.1))
    assert ask(sock, b"example.com") == b"TEMP MTA-STS policy lookup in progress"
    sock = clients(serve(lookup_timeout=0.1, on_timeout="notfound"))
    assert ask(sock, b"example.com") == b"NOTFOUND "


def test_no_check_when_nothing_is_enforced(serve, clients, world):
    discovery, checker = world
    discovery.cached["testing.example"] = valid("testing.example", sts=TESTING)
    discovery.fetched["none.example"] = Result("none.example", "none")
    sock = clients(serve())
    assert ask(sock, b"testing.example") == b"NOTFOUND "
    assert ask(sock, b"none.example") == b"NOTFOUND "
    assert checker.peeks == [] and checker.submits == []


def test_sendmail_sts_map_gets_the_mta_sts_answer_without_a_check(serve, clients, world):
    discovery, checker = world
    discovery.cached["example.com"] = valid()
    checker.cached["example.com"] = DANE
    sock = clients(serve())
    assert ask(sock, b"example.com", name=b"sts") == SECURE
    assert ask(sock, b"example.com") == b"OK dane-only"  # same key, Postfix's map: its own entry
    assert ask(sock, b"example.com", name=b"sts") == SECURE
    assert checker.peeks == ["example.com"]


def test_without_a_checker_the_answers_are_unchanged(serve, clients, world):
    discovery, _checker = world
    discovery.dane = None  # [socketmap] dane = no
    discovery.cached["example.com"] = valid()
    assert ask(clients(serve()), b"example.com") == SECURE


def test_update_picks_up_a_new_checker(serve, clients, world):
    discovery, checker = world
    discovery.cached["example.com"] = valid()
    checker.cached["example.com"] = DANE
    discovery.dane = None
    server = serve()
    sock = clients(server)
    assert ask(sock, b"example.com") == SECURE
    discovery.dane = checker
    server.update(discovery, make_settings())
    assert ask(sock, b"example.com") == b"OK dane-only"


def test_pipelined_fast_and_slow_dane_answers_keep_their_order(serve, clients, world):
    discovery, checker = world
    for domain in ("a.example", "b.example", "c.example"):
        discovery.cached[domain] = valid(domain)
    checker.cached["a.example"] = DANE
    checker.verdicts["b.example"] = DANE  # b waits for the check
    checker.cached["c.example"] = NO_DANE
    sock = clients(serve())
    sock.sendall(b"".join(request(d) for d in (b"a.example", b"b.example", b"c.example")))
    assert read_replies(sock, 3) == [
        b"OK dane-only", b"OK dane-only", b"OK secure match=mx1.example.com:.example.net servername=hostname"]


def test_a_checker_closed_by_a_reload_before_the_update_answers_without_a_traceback(serve, clients, world, caplog):
    """[socketmap] dane = no on reload: engine.reconfigure closes the checker before
    the socketmap's update(); a request waiting for discovery meanwhile then asks the
    closed checker. The answer is on_timeout's (the MTA asks again), not TEMP internal
    error with a traceback."""
    from stsmilter.engine import dane
    from test_dane import ScriptedResolver
    from stsmilter.engine.dane import FOUND, MxFacts

    from stsmilter.engine.loop import EngineLoop

    discovery, _fake = world
    engine = EngineLoop()
    real = dane.DaneChecker(ScriptedResolver(MxFacts(FOUND, True, ("mx1.example",), 300.0), {}), engine=engine)
    discovery.dane = real
    discovery.fetched["example.com"] = valid()
    discovery.delays["example.com"] = 0.3
    sock = clients(serve(lookup_timeout=2.0))
    sock.sendall(request(b"example.com"))
    deadline = time.monotonic() + 5
    while not discovery.submits and time.monotonic() < deadline:
        time.sleep(0.01)
    real.close()  # while discovery is under way
    try:
        assert read_replies(sock, 1) == [b"TEMP MTA-STS policy lookup in progress"]
        assert not [r for r in caplog.records if r.exc_info]
    finally:
        engine.close()


def test_dane_per_map_and_sendmails_map_only_when_its_section_says_so(serve, clients, world):
    """[socketmap] dane = no with [socketmap postfix] dane = auto: DANE first for "postfix"
    only. "sts" gets no check even with a section, unless that section sets dane."""
    discovery, checker = world
    discovery.cached["example.com"] = valid()
    checker.cached["example.com"] = DANE
    maps = {"postfix": {"dane": "auto"}, "sts": {"strict_testing": True}}
    sock = clients(serve(dane="no", maps=maps))
    assert ask(sock, b"example.com") == b"OK dane-only"
    assert ask(sock, b"example.com", name=b"other") == SECURE
    assert ask(sock, b"example.com", name=b"sts") == SECURE
    sock = clients(serve(dane="no", maps={"sts": {"dane": "auto"}}))
    assert ask(sock, b"example.com", name=b"sts") == b"OK dane-only"
    assert ask(sock, b"example.com") == SECURE
