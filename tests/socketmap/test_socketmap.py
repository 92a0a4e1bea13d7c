"""socketmap.py and socketmap/server.py: a real server on loopback (the answers
themselves: test_tlspolicy.py)."""

import concurrent.futures
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

from stsmilter import config, threads
from stsmilter.socketmap import connection as socketmap, server as socketmap_server
from stsmilter.engine.policy import Result
from test_tlspolicy import SECURE, TESTING, make_settings, valid
from world.socketmap_client import read_replies, request


class FakeDiscovery:
    """peek() answers from `cached`; submit() answers from `fetched` after `delays`."""

    def __init__(self):
        self.cached = {}
        self.fetched = {}
        self.delays = {}
        self.submit_error = None
        self.peek_error = None
        self.submits = []
        self.waits = []  # how long each submit said its caller waits
        self.futures = []
        self.timers = []

    def peek(self, domain):
        if self.peek_error:
            raise self.peek_error
        return self.cached.get(domain)

    def submit(self, domain, wait=None):
        self.submits.append(domain)
        self.waits.append(wait)
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

    def start(idle_timeout=socketmap_server.IDLE_TIMEOUT, maps=None, **changes):
        server = socketmap_server.SocketmapServer(discovery, make_settings(**changes), idle_timeout=idle_timeout,
                                                  maps=maps)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def ask(sock, key, name=b"postfix"):
    sock.sendall(request(key, name))
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


def answered(kind, map_label="default"):
    return REGISTRY.get_sample_value("stsmilter_socketmap_answers_total", {"kind": kind, "map": map_label}) or 0.0


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


def test_a_map_section_overrides_its_keys_for_its_name_only(serve, clients, discovery):
    """[socketmap strict] strict_testing = yes: a testing policy is enforced for
    "strict DOMAIN" only; other names keep [socketmap]; counted per configured map."""
    discovery.cached["example.com"] = valid(sts=TESTING)
    sock = clients(serve(maps={"strict": {"strict_testing": True, "tlsrpt": True}}))
    before = answered("secure", "strict"), answered("notfound", "default"), answered("notfound", "sts")
    assert ask(sock, b"example.com", name=b"strict").startswith(SECURE + b" policy_type=sts")
    for name in (b"postfix", b"Strict", b"strictly", b"sts"):
        assert ask(sock, b"example.com", name=name) == b"NOTFOUND "
    assert answered("secure", "strict") == before[0] + 1
    assert answered("notfound", "default") == before[1] + 3  # names without a section: one label
    assert answered("notfound", "sts") == before[2] + 1
    assert REGISTRY.get_sample_value("stsmilter_socketmap_answers_total", {"kind": "secure", "map": "Strict"}) is None


def test_a_map_section_has_its_own_lookup_timeout_and_on_timeout(serve, clients, discovery):
    discovery.fetched["slow.example"] = valid("slow.example")
    discovery.delays["slow.example"] = 0.6
    sock = clients(serve(lookup_timeout=5.0, maps={"quick": {"lookup_timeout": 0.1, "on_timeout": "notfound"},
                                                   "patient": {"on_timeout": "notfound"}}))
    started = time.monotonic()
    assert ask(sock, b"slow.example", name=b"quick") == b"NOTFOUND "
    assert time.monotonic() - started < 0.5
    # The same lookup, still under way, for a map that waits [socketmap]'s 5 s: the answer.
    assert ask(sock, b"slow.example", name=b"patient").startswith(b"OK secure match=")


def test_a_reload_changes_the_map_sections(serve, clients, discovery):
    discovery.cached["example.com"] = valid(sts=TESTING)
    server = serve()
    sock = clients(server)
    assert ask(sock, b"example.com", name=b"strict") == b"NOTFOUND "
    server.update(discovery, make_settings(), {"strict": {"strict_testing": True}})
    assert ask(sock, b"example.com", name=b"strict") == SECURE
    assert ask(sock, b"example.com") == b"NOTFOUND "
    server.update(discovery, make_settings())
    assert ask(sock, b"example.com", name=b"strict") == b"NOTFOUND "


def test_slow_path_submits_and_answers(serve, clients, discovery):
    discovery.fetched["example.com"] = valid()
    sock = clients(serve())
    assert ask(sock, b"example.com") == SECURE
    assert ask(sock, b"other.example") == b"NOTFOUND "
    assert discovery.submits == ["example.com", "other.example"]


def test_a_lookup_tells_discovery_how_long_its_client_waits(serve, clients, discovery):
    """So that discovery serves it before background work (limits.py): for lookup_timeout."""
    discovery.fetched["example.com"] = valid()
    sock = clients(serve(lookup_timeout=3.5))
    assert ask(sock, b"example.com") == SECURE
    assert discovery.waits == [3.5]


def test_keys_that_are_not_domains_are_not_looked_up(serve, clients, discovery):
    sock = clients(serve())
    before = sample("notfound"), answered("notfound")
    for key in (b"[mx.example.com]:25", b".example.com", b"192.0.2.1", b""):
        assert ask(sock, key) == b"NOTFOUND "
    sock.sendall(socketmap.netstring(b"postfix"))  # no key at all
    assert read_replies(sock, 1) == [b"NOTFOUND "]
    assert discovery.submits == []
    assert (sample("notfound"), answered("notfound")) == (before[0] + 5, before[1] + 5)


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
    before, before_kind = sample("perm"), answered("perm")
    assert ask(sock, b"example.com") == SECURE
    sock.sendall(garbage + request(b"example.com"))
    assert read_replies(sock, 1) == [b"PERM malformed request"]
    assert_closed(sock)
    assert sample("perm") == before + 1 and answered("perm") == before_kind + 1
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
    original = socketmap.Connection.data_received

    def spy(self, data):
        original(self, data)
        largest.append(len(self.buffer))

    monkeypatch.setattr(socketmap.Connection, "data_received", spy)
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
    server = serve(idle_timeout=1.0)
    sock = clients(server)
    for _ in range(3):  # requests keep it open past the idle timeout
        time.sleep(0.5)
        assert ask(sock, b"example.com") == SECURE
    started = time.monotonic()
    assert_closed(sock)
    assert 0.9 < time.monotonic() - started < 3.0
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
    before = sample("temp"), answered("temp")
    discovery.fetched["broken.example"] = RuntimeError("engine bug")
    assert ask(sock, b"broken.example") == b"TEMP internal error"
    discovery.fetched["cancelled.example"] = "cancel"
    discovery.delays["cancelled.example"] = 0.05
    assert ask(sock, b"cancelled.example") == b"TEMP internal error"
    discovery.submit_error = RuntimeError("cannot submit")
    assert ask(sock, b"other.example") == b"TEMP internal error"
    discovery.peek_error = RuntimeError("cannot peek")
    assert ask(sock, b"third.example") == b"TEMP internal error"  # from the fast path
    assert (sample("temp"), answered("temp")) == (before[0] + 4, before[1] + 4)
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
            socketmap_server.SocketmapServer(discovery, make_settings(listen=config.Listen("unix", path=path))).start()
        server.stop()
        assert not os.path.exists(path)
        with open(path, "w"):
            pass
        with pytest.raises(OSError, match="exists and is not a socket"):
            socketmap_server.SocketmapServer(discovery, make_settings(listen=config.Listen("unix", path=path))).start()
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
    second = socketmap_server.SocketmapServer(discovery, make_settings(listen=config.Listen("inet", "127.0.0.1", port)))
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
    poll(lambda: discovery.submits == ["slow.example"], "the server to look slow.example up")
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


# What `postmap -q example.com socketmap:...` prints (one line) for valid(), written out by
# hand: socketmap_table(5) says the server's "OK <data>" is a lookup that found <data>;
# Postfix's smtp_tls_policy_maps (postconf(5)) reads <data> as "secure match=<patterns>
# servername=hostname", RFC 8461 §4.1's "*.example.net" being Postfix's ".example.net".
POSTMAP_SECURE = "secure match=mx1.example.com:.example.net servername=hostname\n"
# With [socketmap] tlsrpt = yes: Postfix 3.10's TLSRPT attributes follow (RFC 8460's
# policy-type, policy-domain, each mx pattern as written, and every line of the policy).
POSTMAP_SECURE_TLSRPT = (
    "secure match=mx1.example.com:.example.net servername=hostname policy_type=sts policy_domain=example.com"
    " mx_host_pattern=mx1.example.com mx_host_pattern=*.example.net"
    " { policy_string = version: STSv1 } { policy_string = mode: enforce }"
    " { policy_string = mx: mx1.example.com } { policy_string = mx: *.example.net }"
    " { policy_string = max_age: 86400 }\n"
)


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
        assert run.stdout == POSTMAP_SECURE
    finally:
        shutil.rmtree(config_dir)
    assert len(held) == 20


def test_stop_closes_live_connections(discovery, clients):
    discovery.fetched["slow.example"] = valid("slow.example")
    discovery.delays["slow.example"] = 5
    server = socketmap_server.SocketmapServer(discovery, make_settings(lookup_timeout=10))
    server.start()
    try:
        idle, busy = clients(server), clients(server)
        busy.sendall(request(b"slow.example"))
        poll(lambda: discovery.submits == ["slow.example"], "the server to look slow.example up")
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
    assert threads.BLOCKED_SIGNALS <= mask.result(timeout=2)


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
        assert run.stdout == POSTMAP_SECURE_TLSRPT
        missing = subprocess.run([postmap, "-q", ".example.com", table], env=env, capture_output=True, timeout=30)
        assert missing.returncode == 1  # NOTFOUND
    finally:
        shutil.rmtree(config_dir)




# --- a client that pipelines and does not read its replies


def on_loop(server, function):
    """function() run in the server's event loop thread (its state is that thread's)."""
    done = concurrent.futures.Future()

    def run():
        try:
            done.set_result(function())
        except BaseException as e:  # handed to the test
            done.set_exception(e)

    server.loop.call_soon_threadsafe(run)
    return done.result(timeout=5)


def poll(predicate, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.01)


def test_a_client_that_never_reads_is_not_read_from_until_it_reads(serve, discovery):
    """Replies the client does not read pile up in the server's write buffer; past its
    high-water mark (asyncio's pause_writing) the server stops reading the client's
    requests (pause_reading), so what it buffers stays bounded whatever the client
    sends; when the client reads again, the server resumes and answers every request."""
    discovery.cached["example.com"] = valid()
    server = serve()
    reply = socketmap.netstring(SECURE)
    batch = request(b"example.com") * 1000
    before = sample("ok")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the client's side fills at once
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.settimeout(5)
        sock.connect(server.address)
        sock.setblocking(False)
        sent, stalled_since = 0, None
        limit = 16 * 1024 * 1024  # the server must have stopped reading long before (~1.5 MB here)
        while sent < limit:
            try:
                sent += sock.send(batch[sent % len(batch):])  # the stream goes on where it stopped
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 1.0:
                    break  # nothing taken for a second: the server does not read us
                time.sleep(0.01)
        assert sent < limit, "the server kept reading a client that does not read"
        requests_sent = sent // len(request(b"example.com"))  # (the last one may be incomplete)

        connection = on_loop(server, lambda: next(iter(server.connections)))
        paused, reading, buffered = on_loop(server, lambda: (connection.write_paused, connection.transport.is_reading(),
                                                             connection.transport.get_write_buffer_size()))
        answered = sample("ok") - before
        print(f"sent {sent} bytes ({requests_sent} requests), answered {answered:.0f}, buffered {buffered} bytes")
        assert paused and not reading
        assert answered < requests_sent  # the rest wait, unread, in the socket buffers
        # Bounded: asyncio's high-water mark (64 KiB) plus the replies to one read (256 KiB
        # of requests), whatever the client sent.
        assert buffered <= 64 * 1024 + (256 * 1024 // len(request(b"example.com")) + 1) * len(reply)

        sock.settimeout(10)  # the client reads again: every request is answered, in order
        expected = (sent // len(request(b"example.com"))) * len(reply)
        got = bytearray()
        while len(got) < expected:
            chunk = sock.recv(1 << 20)
            assert chunk, f"connection closed after {len(got)} of {expected} bytes; {dict(server.evicted_connections)}"
            got += chunk
        assert got == reply * (expected // len(reply))
        poll(lambda: on_loop(server, lambda: not connection.write_paused and connection.transport.is_reading()),
             "the server to read the client again")
        sock.sendall(request(b"example.com")[sent % len(request(b"example.com")):])  # the incomplete request
        assert read_replies(sock, 1) == [SECURE]
        sock.sendall(request(b"example.com"))
        assert read_replies(sock, 1) == [SECURE]
    finally:
        sock.close()
