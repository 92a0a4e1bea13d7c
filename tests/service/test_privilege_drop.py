"""The daemon after it dropped privileges, fed internationalized and hostile input.

The interpreter on these machines lives under /root/.pyenv, which a service user such
as nobody cannot read: any module or codec Python imports after the drop fails there
(``LookupError: unknown encoding: punycode`` for a U-label). Two tests: one runs the
daemon through tests/world/late_imports.py and drives every front end and engine path
it can reach, asserting that nothing is imported after the drop point (any user); the
other starts it as root with [daemon] user = nobody, as an operator would (root only).
"""

import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile

import pytest

from world.daemon import free_port, poll_until, scrape, terminate, wait_for_port
from world.milter_client import OPTNEG, packet, read_packet
from world.socketmap_client import Socketmap
from world import paths

pytestmark = pytest.mark.integration

LATE_IMPORTS = str(paths.WORLD / "late_imports.py")
IDN = "xn--bcher-kva.example"  # bücher.example
IDN_UTF8 = "bücher.example".encode()

# --- one milter transaction (world/milter_client.py: the MTA side of protocol 6)

P_NR_CONN, P_NR_MAIL = 0x1000, 0x4000


def milter_rcpts(address, recipients, hostname=b"localhost", mailer=b"smtp", **macros):
    """One connection from 127.0.0.1, MAIL, then RCPT for each bytes recipient: the
    (command, data) reply to each RCPT (b"c" continue, b"y" reply code...). macros:
    bytes values for {daemon_name} (connect), {auth_authen} and i (MAIL)."""
    with socket.create_connection(address, timeout=20) as sock:
        sock.sendall(OPTNEG)
        cmd, data = read_packet(sock)
        assert cmd == b"O"
        protocol = struct.unpack("!I", data[8:12])[0]
        daemon = b"{daemon_name}\0" + macros.get("daemon_name", b"smtpd") + b"\0"
        sock.sendall(packet(b"D", b"C" + daemon)
                     + packet(b"C", hostname + b"\0" + b"4" + struct.pack("!H", 40000) + b"127.0.0.1\0"))
        if not protocol & P_NR_CONN:
            read_packet(sock)
        mail = b"i\0" + macros.get("i", b"4QX1") + b"\0{auth_authen}\0" + macros.get("auth_authen", b"") + b"\0"
        sock.sendall(packet(b"D", b"M" + mail) + packet(b"M", b"<sender@here.example>\0"))
        if not protocol & P_NR_MAIL:
            read_packet(sock)
        replies = []
        for rcpt in recipients:
            sock.sendall(packet(b"D", b"R{rcpt_mailer}\0" + mailer + b"\0") + packet(b"R", rcpt + b"\0"))
            replies.append(read_packet(sock))
        sock.sendall(packet(b"Q"))
    return replies


def socketmap_ask(port, keys):
    """The reply payloads for requests "postfix KEY", on one connection."""
    client = Socketmap(port, timeout=20)
    try:
        return [client.ask_bytes(key) for key in keys]
    finally:
        client.close()


def publish_world(world):
    world.publish("good.example")
    world.publish(IDN)
    world.publish("trailing-dot.example", mx_patterns=("mx.trailing-dot.example.",))
    world.publish("mismatch.example", mx_patterns=("other.mismatch.example",))
    world.publish("testing.example", mode="testing")
    world.publish("badcert.example", expired=True)
    world.publish("invalid.example", body=b"version: STSv2\n")
    world.publish("missing.example", status=404)
    world.publish("wrongname.example", wrong_name=True)
    world.dns.servfail("_mta-sts.servfail.example")


KEYS = [
    (b"good.example", b"OK secure match=mx.good.example servername=hostname"),
    (IDN_UTF8, b"OK secure match=mx.%s servername=hostname" % IDN.encode()),
    (IDN.encode(), b"OK secure match=mx.%s servername=hostname" % IDN.encode()),
    (b"trailing-dot.example", b"OK secure match=mx.trailing-dot.example servername=hostname"),
    (b"B\xc3\xbcCHER.example.", b"OK secure match=mx.%s servername=hostname" % IDN.encode()),
    (b"\xff\xfe.example", b"NOTFOUND "),
    (b"b\xfccher.example", b"NOTFOUND "),  # latin-1, not UTF-8
    (b"\xed\xa0\x80.example", b"NOTFOUND "),  # an encoded surrogate
    ("\u2603.example".encode(), b"NOTFOUND "),
    (b"testing.example", b"NOTFOUND "),
    (b"badcert.example", b"NOTFOUND "),
    (b"invalid.example", b"NOTFOUND "),
    (b"missing.example", b"NOTFOUND "),
    (b"wrongname.example", b"NOTFOUND "),
    (b"servfail.example", b"NOTFOUND "),
    (b"nothing.example", b"NOTFOUND "),
    (b"[192.0.2.1]", b"NOTFOUND "),
]

RCPTS = [
    (b"<u@good.example>", b"c"),
    (b"<u@" + IDN_UTF8 + b">", b"c"),
    (b"<u@trailing-dot.example>", b"c"),
    (b"<u@mismatch.example>", b"y"),  # 451 4.7.5 reply
    (b"<u@b\xfccher.example>", b"c"),  # not UTF-8: bad-domain, accepted
    (b"<\xff@good.example>", b"c"),
    (b"<u@\xed\xa0\x80.example>", b"c"),
    (b"<u@testing.example>", b"c"),
    (b"<u@badcert.example>", b"c"),
    (b"<@good.example>", b"c"),
    (b"<u@[192.0.2.1]>", b"c"),
]


def exercise(daemon_log, ports):
    """Every path the tests can reach from outside; asserts the answers on the way."""
    milter_port, socketmap_port, metrics_port = ports
    got = socketmap_ask(socketmap_port, [key for key, _ in KEYS])
    assert got == [answer for _, answer in KEYS], daemon_log()
    replies = milter_rcpts(("127.0.0.1", milter_port), [rcpt for rcpt, _ in RCPTS])
    assert [cmd for cmd, _ in replies] == [expected for _, expected in RCPTS], daemon_log()
    assert replies[3][1].startswith(b"451 4.7.5 ")
    # Macro values and a host name that are not UTF-8 (pymilter decodes them strictly).
    hostile = milter_rcpts(("127.0.0.1", milter_port), [b"<u@mismatch.example>", b"<u@good.example>"],
                           hostname=b"h\xffst", mailer=b"sm\xfftp", daemon_name=b"\xff", auth_authen=b"\xfe",
                           i=b"\xff")
    assert [cmd for cmd, _ in hostile] == [b"y", b"c"], (hostile, daemon_log())
    # broken framing and a closed connection
    with socket.create_connection(("127.0.0.1", socketmap_port), timeout=10) as sock:
        sock.sendall(b"3:abc;")
        assert sock.recv(100) == b"22:PERM malformed request,"
    metrics = scrape(metrics_port)
    assert "stsmilter_socketmap_lookups_total" in metrics


def config_for(world, rundir, ports, cache=None, probe=None, **daemon):
    milter_port, socketmap_port, metrics_port = ports
    ca_file = os.path.join(rundir, "ca.pem")  # readable by the service user
    shutil.copyfile(world.https.ca_file, ca_file)
    os.chmod(ca_file, 0o644)
    text = world.config_text(
        cache_path=os.path.join(rundir, "state", "cache.sqlite"),
        fetch={"ca_file": ca_file, "timeout": "2"},
        milter={"socket": f"inet:{milter_port}@127.0.0.1", "lookup_timeout": "5"},
        socketmap={"listen": f"inet:127.0.0.1:{socketmap_port}", "lookup_timeout": "5"},
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
        daemon={"log": "stderr", "log_level": "debug", "pidfile": os.path.join(rundir, "run", "s.pid"), **daemon},
        cache=cache or {},
        probe=probe or {},
    )
    path = os.path.join(rundir, "drop.conf")  # the service user reads it again on USR1
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    return path


@pytest.fixture
def rundir():
    # World-traversable: pytest's tmp_path is 0700 root, and the daemon may run as nobody.
    path = tempfile.mkdtemp(prefix="stsmilter-drop-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_daemon(argv, log_path):
    log = open(log_path, "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc


def read_log(path):
    with open(path, "rb") as f:
        return f.read().decode(errors="replace")


def assert_clean(text):
    for bad in ("Traceback", "LookupError", "ImportError", "UnicodeDecodeError", "UnicodeEncodeError",
                "Logging error", "late-import:"):
        assert bad not in text, text


def cache_control(world, conf, socketmap_port, daemon_log):
    """`stsmilter cache list` and `cache purge` against the running daemon, and the
    purged domain discovered again."""
    listed = world.cli("cache", "list", "--json", "-c", conf)
    assert listed.returncode == 0 and "good.example" in listed.stdout, listed.stderr + daemon_log()
    before = world.https.count("mta-sts.good.example")
    purged = world.cli("cache", "purge", "-c", conf, "good.example")
    assert (purged.returncode, purged.stdout) == (0, "purged 1 policy\n"), purged.stderr + daemon_log()
    poll_until(lambda: socketmap_ask(socketmap_port, [b"good.example"]) == [KEYS[0][1]]
               and world.https.count("mta-sts.good.example") == before + 1, 10, "a new fetch")


def drive_daemon(world, rundir, argv_prefix, cache=None, probe=None, **daemon_keys):
    publish_world(world)
    ports = (free_port(), free_port(), free_port())
    conf = config_for(world, rundir, ports, cache=cache, probe=probe, **daemon_keys)
    log_path = os.path.join(rundir, "log")
    proc = run_daemon(argv_prefix + [conf], log_path)
    try:
        wait_for_port(ports[2], timeout=20)
        wait_for_port(ports[0], timeout=20)
        exercise(lambda: read_log(log_path), ports)
        proc.send_signal(signal.SIGUSR1)
        poll_until(lambda: "configuration reloaded" in read_log(log_path), 10, "the reload")
        exercise(lambda: read_log(log_path), ports)  # now from the cache
        cache_control(world, conf, ports[1], lambda: read_log(log_path))
        assert terminate(proc) == 0
    finally:
        terminate(proc)
    return read_log(log_path)


def test_nothing_is_imported_after_the_privilege_drop(sts_world, rundir):
    """Every path the daemon takes from start to stop, with U-labels, non-UTF-8 bytes,
    fetch failures, a reload and the metrics page: no module left to import late."""
    text = drive_daemon(sts_world, rundir, [sys.executable, LATE_IMPORTS], user="", group="")
    assert "configuration reloaded" in text and "stopping" in text
    assert_clean(text)
    # The undecodable host name: one line for both rounds (rate-limited), no exception text.
    assert text.count("text that is not UTF-8 where pymilter expects UTF-8") == 1, text


def test_nothing_is_imported_after_the_privilege_drop_on_redis(sts_world, rundir, redis_server):
    """The same on a shared store: redis-py's locks, events and answers, the fleet's
    events thread and the cache control socket load nothing late either."""
    text = drive_daemon(sts_world, rundir, [sys.executable, LATE_IMPORTS], cache={"redis": redis_server.url},
                        user="", group="")
    assert "configuration reloaded" in text and "good.example purged" in text and "stopping" in text
    assert_clean(text)


def test_nothing_is_imported_after_the_privilege_drop_with_the_mx_tls_check(sts_world, rundir):
    """[probe] enabled: the MX hosts of the policy-matching domains get checked (address
    lookup, SMTP, STARTTLS, the handshake against [probe] ca_file), all after the drop
    point, and load nothing late; the answers stay those above."""
    import trustme

    from world.smtp_peers import SmtpSink, tls_server_context

    ca = trustme.CA()
    ca_file = os.path.join(rundir, "mx-ca.pem")
    ca.cert_pem.write_to_path(ca_file)
    os.chmod(ca_file, 0o644)
    names = ["mx.good.example", f"mx.{IDN}", "mx.trailing-dot.example", "mx.testing.example"]
    with SmtpSink(tls_context=tls_server_context(ca, *names), hostname="mx.stsmilter.test") as sink:
        probe = {"enabled": "yes", "port": str(sink.port), "helo_name": "mta.stsmilter.test", "ca_file": ca_file,
                 "timeout": "3"}
        text = drive_daemon(sts_world, rundir, [sys.executable, LATE_IMPORTS], probe=probe, user="", group="")
    assert "configuration reloaded" in text and "stopping" in text
    for name in names:
        assert f"MX TLS check of {name}: ok: 127.0.0.1: TLSv1.3, certificate valid for {name}" in text, text
    assert_clean(text)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_root_start_as_nobody_serves_u_labels_and_hostile_bytes(sts_world, rundir):
    nobody = pwd.getpwnam("nobody")
    text = drive_daemon(sts_world, rundir, [sys.executable, "-m", "stsmilter", "run", "-c"],
                        user="nobody", group="nogroup")
    assert os.stat(os.path.join(rundir, "state", "cache.sqlite")).st_uid == nobody.pw_uid
    assert_clean(text)
