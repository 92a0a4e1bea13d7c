"""A real HTTPS server on loopback serving MTA-STS policy hosts for integration tests.

One TLS listener on 127.0.0.1 (port chosen at start) serves many virtual hosts
``mta-sts.<domain>``: the SNI callback switches the SSLContext to that host's
certificate, issued by a per-run ``trustme`` CA (``ca_file``). Each host's policy body
and misbehaviour can be changed while the server runs; every request is logged per host.

``no_tls`` works despite SNI: the ClientHello is peeked (not consumed) and, if it names a
no_tls host, answered with plain HTTP, as a misconfigured port-443 HTTP server would.
"""

import dataclasses
import datetime
import os
import select
import shutil
import socket
import ssl
import tempfile
import threading
import time
import warnings
from typing import NamedTuple, Optional

import trustme

POLICY_PATH = "/.well-known/mta-sts.txt"
OVERSIZE_BODY = b"x" * (64 * 1024 + 1)  # one byte over the fetcher's 64 KiB cap
LYING_LENGTH = 100  # Content-Length announced by oversize="lying_length"
OVERSIZE_VARIANTS = (None, "no_length", "lying_length", "true_length")
UNKNOWN_HOST = "unknown-host.invalid"  # default certificate when SNI names no configured host
POLL_SECONDS = 0.1  # how often blocking loops look at the stop flag
IO_TIMEOUT = 10.0  # backstop for reads from a client that went quiet
MAX_REQUEST_HEAD = 64 * 1024
CHUNK_SIZE = 4096  # for chunked=True


@dataclasses.dataclass(frozen=True)
class Host:
    """What one virtual host serves; a frozen snapshot is taken per connection."""

    body: bytes = b""
    status: int = 200
    redirect: Optional[str] = None  # Location; status becomes 301 unless status is 3xx
    content_type: Optional[str] = "text/plain"  # None: no Content-Type header at all
    oversize: Optional[str] = None  # one of OVERSIZE_VARIANTS: serve OVERSIZE_BODY
    content_length: Optional[int] = None  # announce this instead of the real length
    chunked: bool = False  # Transfer-Encoding: chunked, no Content-Length
    drip: float = 0.0  # seconds between single bytes of the body
    drip_headers: bool = False  # with drip: the status line and headers drip too
    hang: bool = False  # complete TLS, read the request, never answer
    expired: bool = False  # certificate not_after in the past
    wrong_name: bool = False  # certificate for another name
    untrusted: bool = False  # certificate from a CA that ca_file does not hold
    no_tls: bool = False  # answer the ClientHello with plain HTTP

    def __post_init__(self):
        if self.oversize not in OVERSIZE_VARIANTS:
            raise ValueError(f"oversize must be one of {OVERSIZE_VARIANTS}")
        if self.expired + self.wrong_name + self.untrusted + self.no_tls > 1:
            raise ValueError("expired, wrong_name, untrusted and no_tls exclude each other")


class Request(NamedTuple):
    path: str
    headers: dict  # lower-case name -> value (last one wins)


class HttpsServer:
    def __init__(self, address="127.0.0.1", tls_maximum_version: Optional[ssl.TLSVersion] = None, port=0):
        """tls_maximum_version applies to every host (OpenSSL fixes the protocol range
        before the SNI callback runs, so it cannot vary per host). port: 0 picks a free
        one at start; a client that always fetches from 443 needs that one."""
        self.address = address
        self.port = None
        self._wanted_port = port
        self.ca_file = None
        self.connections = 0  # TCP connections accepted, any host
        self._tls_maximum_version = tls_maximum_version
        self._ca = trustme.CA()
        self._other_ca = trustme.CA()  # for untrusted certificates
        self._lock = threading.Lock()
        self._hosts = {}  # host -> (Host, SSLContext | None)
        self._log = {}  # host -> [Request]
        self._stopping = threading.Event()
        self._threads = set()
        self._open = set()  # client sockets, shut down at stop() to unblock their threads
        self._listener = None
        self._acceptor = None
        self._wake = None  # socketpair: stop() writes to it to end the accept loop at once
        self._tmpdir = None
        self._sni = threading.local()  # the SNI callback runs in the connection's thread
        self._default_context = self._context(self._ca.issue_cert(UNKNOWN_HOST))
        self._default_context.sni_callback = self._on_sni

    # -- configuration (thread-safe) --------------------------------------------------
    def serve(self, host, body=b"", **misbehaviour):
        """Serve ``body`` for ``host`` (e.g. "mta-sts.example.com"), replacing its settings."""
        self._set(host.lower(), Host(body=body, **misbehaviour))

    def update(self, host, **changes):
        """Change some settings of an already served host."""
        with self._lock:
            current = self._hosts[host.lower()][0]
        self._set(host.lower(), dataclasses.replace(current, **changes))

    def _set(self, host, settings):
        context = None if settings.no_tls else self._context(self._leaf(host, settings))
        with self._lock:
            self._hosts[host] = (settings, context)

    def _leaf(self, host, settings):
        if settings.untrusted:
            return self._other_ca.issue_cert(host)
        if settings.wrong_name:
            return self._ca.issue_cert("mta-sts.wrong-name.invalid")
        if settings.expired:
            now = datetime.datetime.now(datetime.timezone.utc)
            return self._ca.issue_cert(host, not_before=now - datetime.timedelta(days=2),
                                       not_after=now - datetime.timedelta(days=1))
        return self._ca.issue_cert(host)

    def _context(self, leaf):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if self._tls_maximum_version is not None:
            with warnings.catch_warnings():  # old versions are deprecated: that is the point
                warnings.simplefilter("ignore", DeprecationWarning)
                context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
                context.maximum_version = self._tls_maximum_version
            context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 refuses TLS < 1.2 above level 0
        leaf.configure_cert(context)
        return context

    # -- request log --------------------------------------------------------------------
    def requests(self, host):
        with self._lock:
            return list(self._log.get(host.lower(), ()))

    def count(self, host):
        return len(self.requests(host))

    def reset_log(self):
        with self._lock:
            self._log.clear()
            self.connections = 0

    # -- lifecycle ------------------------------------------------------------------------
    def start(self):
        self._tmpdir = tempfile.mkdtemp(prefix="stsmilter-https-")
        self.ca_file = os.path.join(self._tmpdir, "ca.pem")
        self._ca.cert_pem.write_to_path(self.ca_file)
        try:
            self._listener = socket.socket(socket.AF_INET6 if ":" in self.address else socket.AF_INET)
            if self._wanted_port:  # a fixed port: the last run's TIME_WAIT connections must not block it
                self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((self.address, self._wanted_port))
            self._listener.listen(64)
            self._listener.setblocking(False)
            self._wake = socket.socketpair()
            self.port = self._listener.getsockname()[1]
            self._acceptor = self._spawn(self._accept_loop)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        self._stopping.set()
        if self._acceptor is not None:
            self._wake[1].send(b"x")
            self._acceptor.join()  # no new connection threads after this
        with self._lock:
            threads, sockets = list(self._threads), list(self._open)
        for sock in sockets:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # raw shutdown wakes a blocked recv
            except OSError:
                pass
        for thread in threads:
            thread.join(timeout=IO_TIMEOUT)
        for sock in (self._listener, *(self._wake or ())):
            if sock is not None:
                sock.close()
        self._listener = self._wake = self._acceptor = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def _spawn(self, target, *args):
        thread = threading.Thread(target=self._run, args=(target, *args), daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()
        return thread

    def _run(self, target, *args):
        try:
            target(*args)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _accept_loop(self):
        while True:
            select.select([self._listener, self._wake[0]], [], [])
            if self._stopping.is_set():
                return
            try:
                conn, _ = self._listener.accept()
            except BlockingIOError:
                continue  # the client gave up between select and accept
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._open.add(conn)
            self._spawn(self._connection, conn)

    # -- one connection -----------------------------------------------------------------
    def _on_sni(self, tls_socket, server_name, _initial_context):
        host = (server_name or "").lower()
        self._sni.host = host
        with self._lock:
            _, context = self._hosts.get(host, (None, None))
        if context is not None:
            tls_socket.context = context

    def _connection(self, conn):
        sock = conn
        try:
            conn.settimeout(IO_TIMEOUT)
            plain_host = self._no_tls_host(conn)
            if plain_host is not None:
                conn.recv(MAX_REQUEST_HEAD)  # the ClientHello, taken for a request
                settings = self._settings(plain_host)
            else:
                self._sni.host = None
                sock = self._default_context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
                with self._lock:  # wrapping detached conn: stop() must shut down the TLS socket
                    self._open.discard(conn)
                    self._open.add(sock)
                if self._stopping.is_set():
                    return
                sock.do_handshake()
                host = self._sni.host
                settings = self._settings(host)
                request = self._read_request(sock)
                if request is None:
                    return
                with self._lock:
                    self._log.setdefault(host, []).append(request)
            if settings is None:
                settings = Host(status=404, body=b"no such host\n")
            self._respond(sock, settings)
        except (OSError, ValueError):
            pass  # clients hang up, refuse our certificates, or send garbage: all expected
        finally:
            with self._lock:
                self._open.discard(conn)
                self._open.discard(sock)
            sock.close()
            conn.close()

    def _settings(self, host):
        with self._lock:
            return self._hosts.get(host, (None, None))[0]

    def _no_tls_host(self, conn):
        """The no_tls host named by the ClientHello's SNI, if any (peeked, not consumed)."""
        with self._lock:
            plain = [h for h, (settings, _) in self._hosts.items() if settings.no_tls]
        if not plain:
            return None
        hello = b""
        give_up = time.monotonic() + IO_TIMEOUT
        while time.monotonic() < give_up and not self._stopping.is_set():
            select.select([conn], [], [], POLL_SECONDS)
            hello = conn.recv(MAX_REQUEST_HEAD, socket.MSG_PEEK)
            if not hello or (len(hello) >= 5 and len(hello) >= 5 + int.from_bytes(hello[3:5], "big")):
                break
            time.sleep(0.01)
        for host in plain:
            # a server_name entry: type 0 (host_name), 2-byte length, the name
            if b"\x00" + len(host).to_bytes(2, "big") + host.encode() in hello:
                return host
        return None

    def _read_request(self, sock):
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            if not data or len(head) > MAX_REQUEST_HEAD:
                return None
            head += data
        lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return Request(parts[1] if len(parts) > 1 else "", headers)

    def _respond(self, sock, settings):
        if settings.hang:
            self._stopping.wait()
            return
        status, body, length = settings.status, settings.body, len(settings.body)
        headers = []
        if settings.redirect:
            status = status if 300 <= status < 400 else 301
            headers.append(("Location", settings.redirect))
        if settings.oversize:
            body = OVERSIZE_BODY
            length = {"no_length": None, "lying_length": LYING_LENGTH}.get(settings.oversize, len(body))
        if settings.content_length is not None:
            length = settings.content_length
        if settings.chunked:
            pieces = [body[i : i + CHUNK_SIZE] for i in range(0, len(body), CHUNK_SIZE)] + [b""]
            body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
            length = None
            headers.append(("Transfer-Encoding", "chunked"))
        if settings.content_type is not None:
            headers.append(("Content-Type", settings.content_type))
        if length is not None:
            headers.append(("Content-Length", str(length)))
        headers.append(("Connection", "close"))
        head = f"HTTP/1.1 {status} Whatever\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
        if settings.drip and settings.drip_headers:
            self._drip(sock, head.encode("latin-1") + body, settings.drip)
        elif settings.drip:
            sock.sendall(head.encode("latin-1"))
            self._drip(sock, body, settings.drip)
        else:
            sock.sendall(head.encode("latin-1") + body)

    def _drip(self, sock, data, interval):
        for i in range(len(data)):
            if self._stopping.wait(interval):
                return
            sock.sendall(data[i : i + 1])
