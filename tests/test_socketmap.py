"""socketmap.py: the answer table, key normalization, and a real server on loopback."""

import concurrent.futures
import dataclasses
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time

import pytest
from prometheus_client import REGISTRY

from stsmilter import config, socketmap
from stsmilter.policy import Policy, Result

ENFORCE = Policy("STSv1", "enforce", 86400, ("mx1.example.com", "*.example.net"))
TESTING = dataclasses.replace(ENFORCE, mode="testing")
SECURE = b"OK secure match=mx1.example.com:.example.net servername=hostname"


def valid(domain="example.com", sts=ENFORCE):
    return Result(domain, "valid", source="cache", policy_id="id1", policy=sts)


def make_settings(**changes):
    changes.setdefault("listen", config.Listen("inet", host="127.0.0.1", port=0))
    changes.setdefault("lookup_timeout", 0.3)
    return dataclasses.replace(config.defaults().socketmap, **changes)


class FakeDiscovery:
    """peek() answers from `cached`; submit() answers from `fetched` after `delays`."""

    def __init__(self):
        self.cached = {}
        self.fetched = {}
        self.delays = {}
        self.submit_error = None
        self.peek_error = None
        self.submits = []
        self.futures = []
        self.timers = []

    def peek(self, domain):
        if self.peek_error:
            raise self.peek_error
        return self.cached.get(domain)

    def submit(self, domain):
        self.submits.append(domain)
        if self.submit_error:
            raise self.submit_error
        future = concurrent.futures.Future()
        self.futures.append(future)
        outcome = self.fetched.get(domain, Result(domain, "none"))
        finish = future.set_exception if isinstance(outcome, Exception) else future.set_result
        if outcome == "cancel":
            finish = lambda _: future.cancel()  # noqa: E731
        delay = self.delays.get(domain, 0)
        if delay:
            timer = threading.Timer(delay, finish, (outcome,))
            self.timers.append(timer)
            timer.start()
        else:
            finish(outcome)
        return future

    def close(self):
        for timer in self.timers:
            timer.cancel()
            timer.join()


@pytest.fixture
def discovery():
    fake = FakeDiscovery()
    yield fake
    fake.close()


@pytest.fixture
def serve(discovery):
    """serve(**settings) -> a started server; every server is stopped at teardown."""
    servers = []

    def start(idle_timeout=socketmap.IDLE_TIMEOUT, **changes):
        server = socketmap.SocketmapServer(discovery, make_settings(**changes), idle_timeout=idle_timeout)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def clients():
    """connect(server) -> a blocking client socket; all are closed at teardown."""
    sockets = []

    def connect(server):
        family = socket.AF_UNIX if isinstance(server.address, str) else socket.AF_INET
        if family == socket.AF_INET and ":" in server.address[0]:
            family = socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_STREAM)
        sockets.append(sock)
        sock.settimeout(5)
        sock.connect(server.address)
        return sock

    yield connect
    for sock in sockets:
        sock.close()


def request(key, name=b"postfix"):
    return socketmap.netstring(name + b" " + key)


def read_replies(sock, count):
    """Exactly `count` reply payloads, and nothing after them."""
    replies, data = [], b""
    while len(replies) < count:
        colon = data.find(b":")
        if colon > 0 and len(data) > colon + int(data[:colon]):
            length = int(data[:colon])
            assert data[colon + 1 + length : colon + 2 + length] == b","
            replies.append(data[colon + 1 : colon + 1 + length])
            data = data[colon + 2 + length :]
            continue
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(replies, data)
        data += chunk
    assert data == b""
    return replies


def ask(sock, key):
    sock.sendall(request(key))
    return read_replies(sock, 1)[0]


def assert_closed(sock, within=3.0):
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass


def sample(result):
    return REGISTRY.get_sample_value("stsmilter_socketmap_lookups_total", {"result": result}) or 0.0


# --- answer() and normalize_key(): pure


@pytest.mark.parametrize(
    "result, changes, expected",
    [
        (valid(), {}, SECURE),
        (valid(sts=TESTING), {}, b"NOTFOUND "),
        (valid(sts=TESTING), {"strict_testing": True}, SECURE),
        (valid(sts=dataclasses.replace(ENFORCE, mode="none", mx=())), {}, b"NOTFOUND "),
        (valid(sts=dataclasses.replace(ENFORCE, mode="none", mx=())), {"strict_testing": True}, b"NOTFOUND "),
        (Result("example.com", "none"), {}, b"NOTFOUND "),
        (Result("example.com", "failed", reason="sts-policy-fetch-error"), {}, b"NOTFOUND "),
        (Result("example.com", "pending"), {}, b"TEMP MTA-STS policy lookup in progress"),
        (Result("example.com", "pending"), {"on_timeout": "notfound"}, b"NOTFOUND "),
        (valid(sts=dataclasses.replace(ENFORCE, mx=("*.a.example", "b.example"))), {},
         b"OK secure match=.a.example:b.example servername=hostname"),
        (valid(sts=dataclasses.replace(ENFORCE, mx=())), {}, b"TEMP MTA-STS policy lists no mx"),
    ],
)
def test_answer_table(result, changes, expected):
    assert socketmap.answer(result, make_settings(**changes)) == expected


def test_answer_tlsrpt_attributes():
    got = socketmap.answer(valid(), make_settings(tlsrpt=True))
    assert got == (
        SECURE + b" policy_type=sts policy_domain=example.com"
        b" mx_host_pattern=mx1.example.com mx_host_pattern=*.example.net"
        b" { policy_string = version: STSv1 } { policy_string = mode: enforce }"
        b" { policy_string = mx: mx1.example.com } { policy_string = mx: *.example.net }"
        b" { policy_string = max_age: 86400 }"
    )
    testing = socketmap.answer(valid(sts=TESTING), make_settings(tlsrpt=True, strict_testing=True))
    assert b"{ policy_string = mode: testing }" in testing
    assert socketmap.answer(valid(sts=TESTING), make_settings(tlsrpt=True)) == b"NOTFOUND "


def test_answer_too_long_for_postfix_drops_tlsrpt_attributes():
    many = tuple("mx%d.%s.example" % (i, "a" * 50) for i in range(600))
    got = socketmap.answer(valid(sts=dataclasses.replace(ENFORCE, mx=many)), make_settings(tlsrpt=True))
    assert got.startswith(b"OK secure match=mx0.") and b"policy_type" not in got
    assert len(got) <= socketmap.MAX_REPLY


@pytest.mark.parametrize(
    "key, expected",
    [
        (b"example.com", "example.com"),
        (b"Example.COM.", "example.com"),
        (b"mail-1.sub.example.com", "mail-1.sub.example.com"),
        (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("B\u00fccher.example".encode(), "xn--bcher-kva.example"),  # U-labels -> A-labels
        (b"localhost", "localhost"),
        (b"", None),
        (b".", None),
        (b".example.com", None),  # Postfix parent-domain lookup
        (b"example..com", None),
        (b"example.com..", None),
        (b"[mx.example.com]", None),
        (b"[mx.example.com]:25", None),
        (b"mx.example.com:25", None),
        (b"192.0.2.1", None),
        (b"[192.0.2.1]", None),
        (b"2001:db8::1", None),
        (b"[ipv6:2001:db8::1]", None),
        (b"exa_mple.com", None),
        (b"exa mple.com", None),
        (b"-example.com", None),
        (b"example-.com", None),
        (b"a" * 64 + b".com", None),
        (b".".join([b"a" * 60] * 5), None),  # longer than 253
        (b"\xff\xfe.example", None),  # not UTF-8
        ("\u2603.example".encode(), None),  # a symbol: not IDNA 2008
        ("ex\u200bample.com".encode(), "example.com"),  # UTS 46 ignores it, as Postfix does
        (b"user@example.com", None),
        ("b\u00fccher.example..".encode(), None),  # as the milter: one trailing dot only
        (b"b\xfccher.example", None),  # latin-1
        (b"\xed\xa0\x80.example", None),  # an encoded surrogate
    ],
)
def test_normalize_key(key, expected):
    assert socketmap.normalize_key(key) == expected


def test_answer_for_a_policy_cached_before_patterns_were_canonical():
    # A store written by an older version may hold "MX1.Example.COM." as it was published.
    old = dataclasses.replace(ENFORCE, mx=("MX1.Example.COM.", "*.Example.NET."))
    assert socketmap.answer(valid(sts=old), make_settings()) == SECURE
    tlsrpt = socketmap.answer(valid(sts=old), make_settings(tlsrpt=True))
    assert b"mx_host_pattern=mx1.example.com mx_host_pattern=*.example.net" in tlsrpt
    assert b"{ policy_string = mx: *.example.net }" in tlsrpt


# --- the server on loopback


def test_fast_path_answers_from_peek_without_submit(serve, clients, discovery):
    discovery.cached["example.com"] = valid()
    server = serve()
    sock = clients(server)
    before, observed = sample("ok"), REGISTRY.get_sample_value("stsmilter_socketmap_lookup_seconds_count")
    assert ask(sock, b"Example.com.") == SECURE
    assert ask(sock, b"example.com") == SECURE
    assert discovery.submits == []
    assert sample("ok") == before + 2
    assert REGISTRY.get_sample_value("stsmilter_socketmap_lookup_seconds_count") == observed + 2


def test_any_map_name_is_accepted(serve, clients, discovery):
    discovery.cached["example.com"] = valid()
    sock = clients(serve())
    for name in (b"postfix", b"sts", b"x"):
        sock.sendall(request(b"example.com", name=name))
        assert read_replies(sock, 1) == [SECURE]


def test_slow_path_submits_and_answers(serve, clients, discovery):
    discovery.fetched["example.com"] = valid()
    sock = clients(serve())
    assert ask(sock, b"example.com") == SECURE
    assert ask(sock, b"other.example") == b"NOTFOUND "
    assert discovery.submits == ["example.com", "other.example"]


def test_keys_that_are_not_domains_are_not_looked_up(serve, clients, discovery):
    sock = clients(serve())
    for key in (b"[mx.example.com]:25", b".example.com", b"192.0.2.1", b""):
        assert ask(sock, key) == b"NOTFOUND "
    sock.sendall(socketmap.netstring(b"postfix"))  # no key at all
    assert read_replies(sock, 1) == [b"NOTFOUND "]
    assert discovery.submits == []


def test_pipelined_replies_keep_request_order(serve, clients, discovery):
    discovery.cached["fast.example"] = valid("fast.example")
    discovery.fetched["slow.example"] = valid("slow.example", TESTING)
    discovery.delays["slow.example"] = 0.2
    discovery.fetched["slower.example"] = valid("slower.example")
    discovery.delays["slower.example"] = 0.25
    sock = clients(serve(lookup_timeout=2))
    keys = [b"fast.example", b"slower.example", b"fast.example", b"slow.example", b"[x]", b"fast.example"]
    sock.sendall(b"".join(request(k) for k in keys))
    assert read_replies(sock, len(keys)) == [SECURE, SECURE, SECURE, b"NOTFOUND ", b"NOTFOUND ", SECURE]
    assert ask(sock, b"fast.example") == SECURE  # the connection goes on after the queue drained


def test_many_pipelined_slow_requests_are_throttled_not_dropped(serve, clients, discovery):
    count = socketmap.MAX_PIPELINED * 3
    for i in range(count):
        discovery.fetched["d%d.example" % i] = valid("d%d.example" % i)
        discovery.delays["d%d.example" % i] = 0.05
    sock = clients(serve(lookup_timeout=5))
    sock.sendall(b"".join(request(b"d%d.example" % i) for i in range(count)))
    assert read_replies(sock, count) == [SECURE] * count


def test_requests_split_byte_by_byte(serve, clients, discovery):
    discovery.cached["example.com"] = valid()
    sock = clients(serve())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for byte in request(b"example.com") + request(b"example.com"):
        sock.sendall(bytes([byte]))
        time.sleep(0.001)
    assert read_replies(sock, 2) == [SECURE, SECURE]


@pytest.mark.parametrize(
    "garbage",
    [
        b"x",  # not a digit
        b"12a:",  # non-digit length
        b"123456:",  # more than five digits
        b"123456",  # more than five digits, colon still to come
        b"01025:" + b"a" * 1025 + b",",  # longer than MAX_REQUEST
        b"3:abc;",  # no comma
        b":abc,",  # empty length
        b" 3:abc,",  # int() would accept whitespace
        b"1_0:postfix ab,",  # and underscores
    ],
)
def test_malformed_netstring_gets_perm_and_close(serve, clients, discovery, garbage):
    discovery.cached["example.com"] = valid()
    server = serve()
    sock = clients(server)
    before = sample("perm")
    assert ask(sock, b"example.com") == SECURE
    sock.sendall(garbage + request(b"example.com"))
    assert read_replies(sock, 1) == [b"PERM malformed request"]
    assert_closed(sock)
    assert sample("perm") == before + 1
    assert ask(clients(server), b"example.com") == SECURE  # others are still served


def test_perm_waits_for_earlier_pipelined_answers(serve, clients, discovery):
    discovery.fetched["slow.example"] = valid("slow.example")
    discovery.delays["slow.example"] = 0.2
    sock = clients(serve(lookup_timeout=2))
    sock.sendall(request(b"slow.example") + b"junk")
    assert read_replies(sock, 2) == [SECURE, b"PERM malformed request"]
    assert_closed(sock)


def test_ten_megabytes_without_comma_buffer_at_most_a_request(serve, clients, discovery, monkeypatch):
    largest = []
    original = socketmap._Connection.data_received

    def spy(self, data):
        original(self, data)
        largest.append(len(self.buffer))

    monkeypatch.setattr(socketmap._Connection, "data_received", spy)
    sock = clients(serve())
    sock.sendall(b"1024:")
    sent = 5
    chunk = b"a" * 65536
    try:
        while sent < 10 * 1024 * 1024:
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        assert read_replies(sock, 1) == [b"PERM malformed request"]
    except ConnectionResetError:
        pass  # our unread bytes made the kernel reset the connection after the reply
    assert_closed(sock)
    assert largest and max(largest) <= socketmap.MAX_REQUEST + 7


def test_idle_connection_is_closed(serve, clients, discovery):
    discovery.cached["example.com"] = valid()
    server = serve(idle_timeout=0.5)
    sock = clients(server)
    for _ in range(3):  # requests keep it open past the idle timeout
        time.sleep(0.3)
        assert ask(sock, b"example.com") == SECURE
    started = time.monotonic()
    assert_closed(sock)
    assert 0.4 < time.monotonic() - started < 2.0
    assert not server.connections


def test_lookup_timeout_answers_temp_and_lets_the_fetch_go_on(serve, clients, discovery):
    discovery.fetched["slow.example"] = valid("slow.example")
    discovery.delays["slow.example"] = 1.0
    sock = clients(serve(lookup_timeout=0.2))
    before = sample("temp")
    started = time.monotonic()
    assert ask(sock, b"slow.example") == b"TEMP MTA-STS policy lookup in progress"
    assert time.monotonic() - started < 0.9
    assert sample("temp") == before + 1
    assert not discovery.futures[0].cancelled()
    assert discovery.futures[0].result(timeout=3) == valid("slow.example")


def test_lookup_timeout_with_on_timeout_notfound(serve, clients, discovery):
    discovery.fetched["slow.example"] = valid("slow.example")
    discovery.delays["slow.example"] = 1.0
    sock = clients(serve(lookup_timeout=0.2, on_timeout="notfound"))
    assert ask(sock, b"slow.example") == b"NOTFOUND "


def test_pending_peek_goes_to_discovery(serve, clients, discovery):
    discovery.cached["example.com"] = Result("example.com", "pending")
    discovery.fetched["example.com"] = valid()
    sock = clients(serve())
    assert ask(sock, b"example.com") == SECURE
    assert discovery.submits == ["example.com"]


def test_engine_exceptions_answer_temp(serve, clients, discovery):
    sock = clients(serve())
    discovery.fetched["broken.example"] = RuntimeError("engine bug")
    assert ask(sock, b"broken.example") == b"TEMP internal error"
    discovery.fetched["cancelled.example"] = "cancel"
    discovery.delays["cancelled.example"] = 0.05
    assert ask(sock, b"cancelled.example") == b"TEMP internal error"
    discovery.submit_error = RuntimeError("cannot submit")
    assert ask(sock, b"other.example") == b"TEMP internal error"
    discovery.peek_error = RuntimeError("cannot peek")
    assert ask(sock, b"third.example") == b"TEMP internal error"
    discovery.peek_error = discovery.submit_error = None
    discovery.cached["example.com"] = valid()
    assert ask(sock, b"example.com") == SECURE


def test_update_takes_effect_for_the_next_request(serve, clients, discovery):
    discovery.cached["example.com"] = valid(sts=TESTING)
    server = serve()
    sock = clients(server)
    assert ask(sock, b"example.com") == b"NOTFOUND "
    server.update(discovery, make_settings(strict_testing=True))
    assert ask(sock, b"example.com") == SECURE
    other = FakeDiscovery()
    other.cached["example.com"] = valid()
    server.update(other, make_settings(tlsrpt=True))
    assert ask(sock, b"example.com").startswith(SECURE + b" policy_type=sts")
    discovery.cached["example.com"] = valid()
    server.update(discovery, make_settings())
    assert ask(sock, b"example.com") == SECURE


def test_unix_socket_listener(serve, clients, discovery):
    directory = tempfile.mkdtemp(prefix="stsmilter-socketmap-")
    try:
        path = os.path.join(directory, "socketmap.sock")
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)  # a socket file nobody listens on
        stale.close()
        discovery.cached["example.com"] = valid()
        server = serve(listen=config.Listen("unix", path=path), socket_mode=0o600)
        assert server.address == path
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert ask(clients(server), b"example.com") == SECURE
        with pytest.raises(OSError, match="another server is listening"):
            socketmap.SocketmapServer(discovery, make_settings(listen=config.Listen("unix", path=path))).start()
        server.stop()
        assert not os.path.exists(path)
        with open(path, "w"):
            pass
        with pytest.raises(OSError, match="exists and is not a socket"):
            socketmap.SocketmapServer(discovery, make_settings(listen=config.Listen("unix", path=path))).start()
    finally:
        shutil.rmtree(directory)


def test_ipv6_listener(serve, clients, discovery):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("::1 is not configured")
    discovery.cached["example.com"] = valid()
    server = serve(listen=config.Listen("inet", host="::1", port=0))
    assert server.address[0] == "::1"
    assert ask(clients(server), b"example.com") == SECURE


def test_bind_failure_raises_a_clear_oserror(serve, discovery):
    server = serve()
    port = server.address[1]
    second = socketmap.SocketmapServer(discovery, make_settings(listen=config.Listen("inet", "127.0.0.1", port)))
    with pytest.raises(OSError, match=r"socketmap: cannot listen on inet:127\.0\.0\.1:%d: " % port) as caught:
        second.start()
    assert caught.value.errno is not None
    second.stop()  # harmless when start() failed


def evicted(reason):
    return REGISTRY.get_sample_value("stsmilter_socketmap_evicted_connections_total", {"reason": reason}) or 0.0


def test_at_max_connections_the_longest_idle_connection_makes_room(serve, clients, discovery):
    discovery.cached["example.com"] = valid()
    server = serve(max_connections=3)
    oldest, middle, busy = clients(server), clients(server), clients(server)
    for sock in (oldest, middle, busy):
        assert ask(sock, b"example.com") == SECURE
    assert ask(oldest, b"example.com") == SECURE  # now `middle` has been idle the longest
    before = evicted("max_connections")
    newcomer = clients(server)
    assert ask(newcomer, b"example.com") == SECURE
    assert_closed(middle)
    assert evicted("max_connections") == before + 1
    assert server.evicted_connections["max_connections"] == 1
    for sock in (oldest, busy, newcomer):  # the others are served as before
        assert ask(sock, b"example.com") == SECURE
    assert len(server.connections) == 3


def test_a_connection_with_a_lookup_under_way_is_evicted_last(serve, clients, discovery):
    discovery.cached["example.com"] = valid()
    discovery.fetched["slow.example"] = valid("slow.example")
    discovery.delays["slow.example"] = 1.0
    server = serve(max_connections=2, lookup_timeout=5)
    waiting, idle = clients(server), clients(server)
    waiting.sendall(request(b"slow.example"))  # the longest idle, but it waits for an answer
    time.sleep(0.1)
    assert ask(idle, b"example.com") == SECURE
    newcomer = clients(server)
    assert ask(newcomer, b"example.com") == SECURE
    assert_closed(idle)
    assert read_replies(waiting, 1) == [SECURE]  # answered, not evicted


def test_one_client_holding_every_connection_locks_no_one_out(serve, clients, discovery):
    discovery.cached["example.com"] = valid()
    server = serve(max_connections=50)
    held = [clients(server) for _ in range(50)]
    poll = time.monotonic() + 5
    while len(server.connections) < 50 and time.monotonic() < poll:
        time.sleep(0.01)
    for _ in range(5):  # Postfix, reconnecting for every lookup, is always answered
        assert ask(clients(server), b"example.com") == SECURE
    assert len(server.connections) <= 50
    for sock in held[:5]:
        assert_closed(sock, within=1)


def test_an_incomplete_request_must_complete_within_request_timeout(serve, clients, discovery):
    discovery.cached["example.com"] = valid()
    server = serve(request_timeout=0.5)
    slow = clients(server)
    before = evicted("request_timeout")
    started = time.monotonic()
    for byte in request(b"example.com")[:-1]:  # one byte every 0.1 s never finishes in time
        try:
            slow.sendall(bytes([byte]))
        except OSError:
            break
        time.sleep(0.1)
    assert_closed(slow)
    assert 0.5 <= time.monotonic() - started < 3
    assert evicted("request_timeout") == before + 1
    steady = clients(server)  # complete requests, however far apart, are not affected
    for _ in range(3):
        assert ask(steady, b"example.com") == SECURE
        time.sleep(0.3)
    assert ask(steady, b"example.com") == SECURE


def test_postmap_is_answered_while_a_client_holds_the_limit(serve, clients, discovery):
    postmap = shutil.which("postmap") or shutil.which("postmap", path="/usr/sbin:/usr/local/sbin")
    if postmap is None:
        pytest.skip("Postfix postmap(1) not installed")
    discovery.cached["example.com"] = valid()
    server = serve(max_connections=20)
    held = [clients(server) for _ in range(20)]
    config_dir = tempfile.mkdtemp(prefix="stsmilter-postfix-")
    try:
        open(os.path.join(config_dir, "main.cf"), "w").close()
        table = "socketmap:inet:127.0.0.1:%d:postfix" % server.address[1]
        run = subprocess.run([postmap, "-q", "example.com", table], env=dict(os.environ, MAIL_CONFIG=config_dir),
                             capture_output=True, text=True, timeout=30)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == SECURE.decode()[3:]
    finally:
        shutil.rmtree(config_dir)
    assert len(held) == 20


def test_stop_closes_live_connections(discovery, clients):
    discovery.fetched["slow.example"] = valid("slow.example")
    discovery.delays["slow.example"] = 5
    server = socketmap.SocketmapServer(discovery, make_settings(lookup_timeout=10))
    server.start()
    try:
        idle, busy = clients(server), clients(server)
        busy.sendall(request(b"slow.example"))
        time.sleep(0.1)
        thread = server._thread
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 2.0
        assert not thread.is_alive()
        assert_closed(idle, within=1)
        assert_closed(busy, within=1)
    finally:
        server.stop()


def test_loop_thread_blocks_daemon_signals(serve):
    server = serve()
    mask = concurrent.futures.Future()
    server.loop.call_soon_threadsafe(lambda: mask.set_result(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
    assert socketmap.BLOCKED_SIGNALS <= mask.result(timeout=2)


def test_postmap_client(serve, discovery):
    postmap = shutil.which("postmap") or shutil.which("postmap", path="/usr/sbin:/usr/local/sbin")
    if postmap is None:
        pytest.skip("Postfix postmap(1) not installed")
    discovery.cached["example.com"] = valid()
    server = serve(tlsrpt=True)
    config_dir = tempfile.mkdtemp(prefix="stsmilter-postfix-")
    try:
        open(os.path.join(config_dir, "main.cf"), "w").close()
        table = "socketmap:inet:127.0.0.1:%d:postfix" % server.address[1]
        env = dict(os.environ, MAIL_CONFIG=config_dir)
        run = subprocess.run([postmap, "-q", "example.com", table], env=env, capture_output=True, text=True,
                             timeout=30)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == socketmap.answer(valid(), server.state[1]).decode()[3:]
        missing = subprocess.run([postmap, "-q", ".example.com", table], env=env, capture_output=True, timeout=30)
        assert missing.returncode == 1  # NOTFOUND
    finally:
        shutil.rmtree(config_dir)


@pytest.mark.parametrize("mx", [("mx.example.com servername=evil",), ("mx.example.com}",), ("*.*.example.com",)])
def test_answer_refuses_text_that_would_change_postfix_syntax(mx):
    with pytest.raises(ValueError):
        socketmap.answer(valid(sts=dataclasses.replace(ENFORCE, mx=mx)), make_settings(tlsrpt=True))


# --- gaps found by mutation testing (tests/mutation/mutate.py)


def test_answer_for_an_upper_case_mx_pattern_is_lower_case():
    # DNS names compare case-insensitively (RFC 4343); the match= list is canonical.
    sts = dataclasses.replace(ENFORCE, mx=("MX1.Example.COM", "*.EXAMPLE.net"))
    assert socketmap.answer(valid(sts=sts), make_settings()) == SECURE


def test_longest_legal_domain_key():
    # RFC 1035 §2.3.4 / RFC 5321 §4.5.3.1.2: 253 octets is the longest name in text form.
    longest = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert socketmap.normalize_key(longest.encode()) == longest
    assert socketmap.normalize_key(longest.encode() + b".") == longest
    assert socketmap.normalize_key(longest.encode() + b"b") is None
    discovery = FakeDiscovery()
    discovery.cached[longest] = valid(longest)
    assert socketmap.answer(valid(longest), make_settings()) == SECURE


@pytest.mark.parametrize("status", ["failed", "none", "bogus"])
def test_a_result_that_is_not_valid_never_enforces_even_with_a_policy(status):
    # A failed discovery may still carry the policy it failed to refresh: only "valid"
    # (RFC 8461 §5.1: a policy that applies) turns into "secure".
    assert socketmap.answer(Result("example.com", status, policy=ENFORCE), make_settings()) == b"NOTFOUND "


@pytest.mark.parametrize("result", [valid(sts=dataclasses.replace(ENFORCE, version="STSv2")), valid("bad domain")])
def test_answer_refuses_a_policy_it_cannot_vouch_for(result):
    # RFC 8461 §3.2: only version STSv1 is defined. An enforce policy the socketmap cannot
    # turn into Postfix syntax is TEMP (retry), never NOTFOUND (delivery in clear).
    with pytest.raises(ValueError) as caught:
        socketmap.answer(result, make_settings())
    assert str(caught.value) == "unsafe text in the policy of %r" % result.domain


def test_tlsrpt_attributes_up_to_exactly_the_postfix_reply_limit():
    # The longest reply the Postfix socketmap client takes is MAX_REPLY octets: a reply of
    # exactly that length keeps its TLSRPT attributes, a longer one drops them.
    def reply(length, max_age, count=None):
        base = tuple("mx%04d.%s.example" % (i, "a" * 50) for i in range(count or base_count))
        last = ".".join(["c" * 60] * (length // 61) + ["c" * max(1, length % 61)])
        sts = dataclasses.replace(ENFORCE, mx=base + (last,), max_age=max_age)
        return socketmap.answer(valid(sts=sts), make_settings(tlsrpt=True))

    per_pattern = len(reply(1, 1, 2)) - len(reply(1, 1, 1))
    base_count = (socketmap.MAX_REPLY - len(reply(1, 1, 1)) - 100) // per_pattern
    length = (socketmap.MAX_REPLY - len(reply(1, 1))) // 3  # each octet of the last name is there 3 times
    replies = [reply(n, max_age) for n in range(length - 2, length + 3) for max_age in (1, 10, 100)]
    with_attributes = {len(r) for r in replies if b"policy_type" in r}
    assert max(with_attributes) == socketmap.MAX_REPLY
    assert any(b"policy_type" not in r and r.endswith(b"servername=hostname") for r in replies)  # dropped
