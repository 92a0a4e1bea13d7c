"""MX hosts for the MX TLS check ([probe]): real SMTP servers on loopback, one address of
127.0.0.0/8 per MX host address and one port for all of them (the check's [probe] port),
with A records in the loopback DNS server.

What an address presents (its kind):
  good          aiosmtpd with STARTTLS, a certificate for the name from the test CA (ca_file)
  expired       ... a certificate for the name whose not_after was yesterday
  wrong_name    ... a certificate for another name
  untrusted     ... a certificate for the name from a CA that ca_file does not hold
  wildcard      ... a certificate for *.<the name's parent> (one label, RFC 8461 §4.1)
  deep_wildcard ... a certificate for *.<the parent of the name's parent> (two labels)
  no_starttls   aiosmtpd offering no STARTTLS
  greeting_421  "421 4.3.2 ..." at once, then closes
  silent        accepts and never says a thing
  refused       nothing listens there
  a callable    a scripted peer: called with a Conn per connection (hostile peers)

Every server records what clients did: EHLO names, SNI names, MAIL/RCPT/DATA (a check
must never send them) and QUIT; a scripted peer counts the TCP connections it accepted.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple, Union

import trustme

from world.mx_routing import common_free_port
from world.smtp_peers import SmtpSink

KINDS = ("good", "expired", "wrong_name", "untrusted", "wildcard", "deep_wildcard", "no_starttls", "greeting_421",
         "silent", "refused")
ADDRESS_PREFIX = "127.0.21."  # addresses are handed out from 127.0.21.1 on
POLL_SECONDS = 0.05


class Witness:
    """An aiosmtpd handler that records the SMTP commands a client sends."""

    def __init__(self, host: "MxAddress") -> None:
        self.host = host

    def _add(self, command: str, argument: str, server) -> None:
        self.host.record(command, argument, getattr(server, "_tls_protocol", None) is not None)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        self._add("EHLO", hostname, server)
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self._add("MAIL", address, server)
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        self._add("RCPT", address, server)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self._add("DATA", "", server)
        return "250 OK"

    async def handle_QUIT(self, server, session, envelope):
        self._add("QUIT", "", server)
        return "221 Bye"


class Conn:
    """One connection to a scripted peer, for its script."""

    def __init__(self, sock: socket.socket, stopping: threading.Event) -> None:
        self.sock, self.stopping = sock, stopping
        self.sock.settimeout(POLL_SECONDS)
        self.received = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self, timeout: float = 10.0) -> bytes:
        """One line from the client (b"" if it closed or went quiet for timeout)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.received and time.monotonic() < deadline and not self.stopping.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            self.received += data
        line, sep, self.received = self.received.partition(b"\n")
        return line + sep

    def hold(self) -> None:
        """Keep the connection open, saying nothing, until the client closes it or the peer stops."""
        while not self.stopping.is_set():
            try:
                if not self.sock.recv(4096):
                    return
            except socket.timeout:
                continue
            except OSError:
                return


class ScriptedPeer:
    """A TCP listener on (host, port) that runs script(Conn) in a thread per connection."""

    def __init__(self, host: str, port: int, script: Callable[[Conn], None]) -> None:
        self.host, self.port, self.script = host, port, script
        self.stopping = threading.Event()
        self.threads: List[threading.Thread] = []
        self.sockets: List[socket.socket] = []
        self.listener: Optional[socket.socket] = None
        self.errors: List[str] = []

    def start(self) -> "ScriptedPeer":
        listener = socket.socket()
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, self.port))
            listener.listen(16)
            listener.settimeout(POLL_SECONDS)
        except BaseException:
            listener.close()
            raise
        self.listener = listener
        self._spawn(self._accept)
        return self

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _peer = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.sockets.append(sock)
            self.on_connection()
            self._spawn(self._serve, sock)

    def on_connection(self) -> None:  # replaced by MxAddress
        pass

    def _serve(self, sock: socket.socket) -> None:
        try:
            self.script(Conn(sock, self.stopping))
        except OSError:
            pass  # the client went away: that is its right
        except Exception as e:  # a broken script must fail the test, not vanish
            self.errors.append(repr(e))
        finally:
            sock.close()

    def stop(self) -> None:
        self.stopping.set()
        if self.listener is not None:
            self.listener.close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self.threads:
            thread.join(5)
        alive = [t for t in self.threads if t.is_alive()]
        assert not alive, f"scripted peer {self.host}:{self.port}: {len(alive)} threads did not stop"


def greeting_421(conn: Conn) -> None:
    conn.send(b"421 4.3.2 mx busy, try again later\r\n")
    conn.read_line(timeout=2)  # QUIT, perhaps


def silent(conn: Conn) -> None:
    conn.hold()


def converse(greeting=b"220 mx ESMTP\r\n", ehlo=b"250-mx\r\n250 STARTTLS\r\n", starttls=b"220 go ahead\r\n",
             then=None):
    """A scripted SMTP server: greeting, EHLO reply, STARTTLS reply, then then(conn)."""

    def script(conn):
        conn.send(greeting)
        if ehlo is None or not conn.read_line().startswith(b"EHLO "):
            return conn.hold()
        conn.send(ehlo)
        line = conn.read_line()
        if starttls is None or line != b"STARTTLS\r\n":
            return conn.hold()
        conn.send(starttls)
        if then is not None:
            then(conn)
        conn.hold()

    return script


def answer_tls_with_text(conn: Conn) -> None:
    conn.sock.recv(4096)  # the ClientHello
    conn.send(b"500 5.5.1 what?\r\n")


# Says 220 to STARTTLS, then answers the ClientHello with SMTP text: a handshake failure
# the MTA meets too (validation-failure).
converse_text_instead_of_tls = converse(then=answer_tls_with_text)


class MxAddress:
    """One server: an address of an MX host name, of one kind."""

    def __init__(self, name: str, address: str, kind: Union[str, Callable]) -> None:
        self.name, self.address, self.kind = name, address, kind
        self.events: List[Tuple[str, str, bool]] = []  # (command, argument, after STARTTLS)
        self.sni: List[Optional[str]] = []
        self.connections = 0
        self.server = None
        self._lock = threading.Lock()

    def record(self, command: str, argument: str, tls: bool) -> None:
        with self._lock:
            self.events.append((command, argument, tls))

    def commands(self) -> List[str]:
        with self._lock:
            return [command for command, _argument, _tls in self.events]

    def _count(self) -> None:
        with self._lock:
            self.connections += 1


class MxHosts:
    """add() the MX hosts, start(), then publish their names' A records; stop() undoes it."""

    def __init__(self, dns_server) -> None:
        self.dns = dns_server
        self.ca = trustme.CA()
        self.other_ca = trustme.CA()
        self.tmpdir = tempfile.mkdtemp(prefix="stsmilter-mx-")
        os.chmod(self.tmpdir, 0o755)
        self.ca_file = os.path.join(self.tmpdir, "mx-ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        os.chmod(self.ca_file, 0o644)
        self.port: Optional[int] = None
        self.addresses: List[MxAddress] = []
        self.by_name: Dict[str, List[MxAddress]] = {}
        self._next = 1

    def add(self, name: str, *kinds: Union[str, Callable]) -> List[MxAddress]:
        """MX host name with one address per kind (in A record order); before start()."""
        assert self.port is None, "add() before start()"
        added = []
        for kind in kinds or ("good",):
            assert callable(kind) or kind in KINDS, kind
            address = MxAddress(name, f"{ADDRESS_PREFIX}{self._next}", kind)
            self._next += 1
            added.append(address)
        self.addresses += added
        self.by_name.setdefault(name, []).extend(added)
        return added

    def host(self, name: str) -> MxAddress:
        """The one address of a single-address host."""
        (address,) = self.by_name[name]
        return address

    def start(self) -> "MxHosts":
        self.port = common_free_port([a.address for a in self.addresses] or ["127.0.0.1"])
        for mx in self.addresses:
            mx.server = self._server(mx)
            if mx.server is not None:
                mx.server.start()
        for name, addresses in self.by_name.items():
            for mx in addresses:
                self.dns.add(name, "A", mx.address)
        return self

    def _server(self, mx: MxAddress):
        kind = mx.kind
        if kind == "refused":
            return None
        if callable(kind) or kind in ("greeting_421", "silent"):
            script = kind if callable(kind) else {"greeting_421": greeting_421, "silent": silent}[kind]
            peer = ScriptedPeer(mx.address, self.port, script)
            peer.on_connection = mx._count
            return peer
        context = None if kind == "no_starttls" else self._context(mx)
        return SmtpSink(host=mx.address, port=self.port, tls_context=context, hostname=mx.name, handler=Witness(mx))

    def _context(self, mx: MxAddress) -> ssl.SSLContext:
        now = datetime.datetime.now(datetime.timezone.utc)
        if mx.kind == "expired":
            leaf = self.ca.issue_cert(mx.name, not_before=now - datetime.timedelta(days=30),
                                      not_after=now - datetime.timedelta(days=1))
        elif mx.kind == "wrong_name":
            leaf = self.ca.issue_cert("mx.wrong-name.invalid")
        elif mx.kind == "untrusted":
            leaf = self.other_ca.issue_cert(mx.name)
        elif mx.kind == "wildcard":
            leaf = self.ca.issue_cert("*." + mx.name.split(".", 1)[1])
        elif mx.kind == "deep_wildcard":
            leaf = self.ca.issue_cert("*." + mx.name.split(".", 2)[2])
        else:
            leaf = self.ca.issue_cert(mx.name)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        leaf.configure_cert(context)

        def sni(_ssl_object, server_name, _context):
            mx.sni.append(server_name)

        context.sni_callback = sni
        return context

    def stop(self) -> None:
        problems = []
        for mx in self.addresses:
            if mx.server is not None:
                try:
                    mx.server.stop()
                except Exception as e:  # keep stopping the others
                    problems.append(repr(e))
                problems += getattr(mx.server, "errors", [])
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        assert not problems, problems


class quiet_aiosmtpd:
    """aiosmtpd logs a traceback on "mail.log" for each handshake a test fails on purpose."""

    def __enter__(self):
        self.logger = logging.getLogger("mail.log")
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)
        return self

    def __exit__(self, *exc_info):
        self.logger.setLevel(self.level)
