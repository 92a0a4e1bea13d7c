"""HTTPS policy fetch (RFC 8461 §3.3): https://mta-sts.<domain>/.well-known/mta-sts.txt.

Everything the network sends is hostile: addresses are checked before connecting, the
certificate must be valid for the host (WebPKI), only a 200 text/plain answer counts,
redirects are not followed, the body is capped at 64 KiB while it streams, and one
deadline bounds the whole fetch however slowly the server talks.
"""

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from typing import Optional

from stsmilter import __version__
from stsmilter.dns import DnsError

POLICY_PATH = "/.well-known/mta-sts.txt"
MAX_BODY = 64 * 1024  # RFC 8461 §3.3 lets clients cap the policy size; 64 KiB is generous
CHUNK = 8192
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
# 6to4 (RFC 3056): judged by the IPv4 address inside. Python before 3.11.4 (Debian 12
# ships 3.11.2) lists all of 2002::/16 as private; later versions do not.
SIXTOFOUR_PREFIX = ipaddress.ip_network("2002::/16")
USER_AGENT = f"stsmilter/{__version__}"
DETAIL_CHARS = 40  # longest piece of peer-supplied text quoted in an error message
LIBRARY_TEXT_CHARS = 100  # longest OpenSSL/resolver message kept in an error message


class FetchError(Exception):
    reason = "sts-policy-fetch-error"


class WebPkiError(FetchError):
    reason = "sts-webpki-invalid"


def _quote(text) -> str:
    """Peer-supplied text, made printable and short enough for a log line."""
    text = ascii(str(text))
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 3] + "..."


def _short(text) -> str:
    """A message from our own libraries (OpenSSL, the resolver), kept to one short line."""
    text = " ".join(str(text).split())
    return text if len(text) <= LIBRARY_TEXT_CHARS else text[: LIBRARY_TEXT_CHARS - 3] + "..."


def _ip(address: str):
    """The address to connect to, or None if it is not an IP literal; IPv4-mapped IPv6
    is unwrapped so it is judged (and dialled) as the IPv4 address it really is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_public_address(address: str) -> bool:
    """True if the address is globally routable, so fetching from it cannot be used to
    reach loopback, private, link-local, multicast, CGNAT or reserved services (SSRF)."""
    ip = _ip(address)
    if ip is None:
        return False
    if ip.version == 6 and ip in NAT64_PREFIX:  # DNS64 on an IPv6-only host: judge the IPv4 inside
        return is_public_address(str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
    if ip.version == 6 and ip in SIXTOFOUR_PREFIX:
        return is_public_address(str(ip.sixtofour))
    if not ip.is_global or ip.is_multicast or ip.is_reserved:
        return False
    if ip.version == 6:
        # 6to4 and Teredo carry an IPv4 address that must pass too.
        embedded = [ip.sixtofour] + list(ip.teredo or ())
        if ip.is_site_local or any(v4 is not None and not is_public_address(str(v4)) for v4 in embedded):
            return False
    return True


class _PreconnectedHTTP(http.client.HTTPConnection):
    """http.client over our own verified TLS socket; it must never dial by itself.

    http.client is used rather than a hand-written client because its response parsing
    (status line, header count and line-length limits, chunked decoding) is well tested;
    the connection, TLS, addresses and every timeout stay under our control."""

    def __init__(self, sock, host):
        super().__init__(host)
        self.sock = sock

    def connect(self):
        raise http.client.NotConnected("refusing to dial")


class Fetcher:
    def __init__(self, resolver, port=443, timeout=10.0, ca_file="", allow_private=False):
        self.resolver = resolver
        self.port = port
        self.timeout = timeout
        self.allow_private = allow_private
        # No cafile: the system trust store. With a cafile: that file only.
        self.context = ssl.create_default_context(cafile=ca_file or None)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.check_hostname = True
        self.context.verify_mode = ssl.CERT_REQUIRED

    def fetch(self, domain: str, deadline: Optional[float] = None) -> bytes:
        """The raw body of https://mta-sts.<domain>/.well-known/mta-sts.txt.

        ``domain`` is normalized already. ``deadline`` is a time.monotonic() value; the
        earlier of it and now + timeout ends the whole fetch. Raises FetchError/WebPkiError."""
        host = "mta-sts." + domain
        end = time.monotonic() + self.timeout
        if deadline is not None:
            end = min(end, deadline)
        addresses = self._addresses(host, end)
        sock = self._connect(addresses, end)
        # The watchdog shuts the connection down at the deadline, which also ends reads
        # inside http.client that a dripping server would keep alive one byte at a time.
        # It works on a dup of the descriptor: wrapping in TLS detaches the original.
        try:
            watched = sock.dup()
        except OSError as e:
            sock.close()
            raise FetchError(f"network: {e.strerror or type(e).__name__}") from None
        expired = threading.Event()

        def watchdog():
            expired.set()
            try:
                watched.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        timer = threading.Timer(max(0.0, end - time.monotonic()), watchdog)
        timer.daemon = True
        timer.start()
        try:
            body = self._exchange(sock, host, end)
        except FetchError:
            if expired.is_set():
                raise FetchError("timeout") from None
            raise
        finally:
            timer.cancel()
            timer.join()
            watched.close()
            sock.close()
        if expired.is_set():  # a read cut short by the watchdog can look like a clean EOF
            raise FetchError("timeout")
        return body

    def _addresses(self, host, end):
        try:
            found = self.resolver.addresses(host, lifetime=_remaining(end))
        except DnsError as e:
            raise FetchError(f"dns: {_short(e)}") from None
        _remaining(end)
        if not found:
            raise FetchError("dns: no address")
        allowed = []
        for address in found:
            ip = _ip(address)
            if ip is not None and (self.allow_private or is_public_address(address)):
                allowed.append(str(ip))
        if not allowed:
            raise FetchError(f"address not allowed: {', '.join(_quote(a) for a in found[:3])}")
        return allowed

    def _connect(self, addresses, end):
        """A TCP connection to the first address that answers; each attempt gets an
        equal share of the time left so one black hole cannot starve the others."""
        failure = "connect failed"
        for index, address in enumerate(addresses):
            share = _remaining(end) / (len(addresses) - index)
            try:
                return socket.create_connection((address, self.port), timeout=share)
            except socket.timeout:
                failure = f"connect {address}: timeout"
            except OSError as e:
                failure = f"connect {address}: {e.strerror or type(e).__name__}"
        if time.monotonic() >= end:
            raise FetchError("timeout")
        raise FetchError(failure)

    def _exchange(self, raw_sock, host, end):
        try:
            raw_sock.settimeout(_remaining(end))
            sock = self.context.wrap_socket(raw_sock, server_hostname=host)
        except ssl.SSLCertVerificationError as e:
            raise WebPkiError(f"certificate: {_short(e.verify_message or e.reason)}") from None
        except socket.timeout:
            raise FetchError("timeout") from None
        except ssl.SSLError as e:
            raise FetchError(f"tls: {_short(e.reason or type(e).__name__)}") from None
        except OSError as e:
            raise FetchError(f"tls: {e.strerror or type(e).__name__}") from None
        conn = _PreconnectedHTTP(sock, host)
        response = None
        try:
            sock.settimeout(_remaining(end))
            conn.putrequest("GET", POLICY_PATH, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", host if self.port == 443 else f"{host}:{self.port}")
            conn.putheader("User-Agent", USER_AGENT)
            conn.putheader("Accept", "text/plain")
            conn.putheader("Connection", "close")
            conn.endheaders()
            sock.settimeout(_remaining(end))
            response = conn.getresponse()
            _check_headers(response)
            return _read_body(response, sock, end)
        except socket.timeout:
            raise FetchError("timeout") from None
        except ssl.SSLError as e:
            raise FetchError(f"tls: {_short(e.reason or type(e).__name__)}") from None
        except http.client.HTTPException as e:
            raise FetchError(f"bad HTTP response: {type(e).__name__}") from None
        except OSError as e:
            raise FetchError(f"network: {e.strerror or type(e).__name__}") from None
        finally:
            # With "Connection: close" http.client hands the socket to the response, whose
            # file object keeps the descriptor open until the response itself is closed.
            if response is not None:
                response.close()
            conn.close()
            sock.close()


def _remaining(end) -> float:
    left = end - time.monotonic()
    if left <= 0:
        raise FetchError("timeout")
    return left


def _check_headers(response):
    if 300 <= response.status < 400:
        raise FetchError(f"HTTP {response.status}: redirects are not followed")
    if response.status != 200:
        raise FetchError(f"HTTP {response.status}")
    content_type = response.getheader("Content-Type") or ""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "text/plain":
        raise FetchError(f"Content-Type {_quote(media_type)} is not text/plain")
    if response.length is not None and response.length > MAX_BODY:
        raise FetchError("policy body over 64 KiB")


def _read_body(response, sock, end) -> bytes:
    """Up to MAX_BODY bytes, counted as they arrive. Content-Length (when given) frames
    the body, as HTTP requires, but is never trusted to bound memory."""
    declared = response.length
    chunks, total = [], 0
    while not response.isclosed():  # http.client closes the socket once the body is complete
        sock.settimeout(_remaining(end))
        chunk = response.read(CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > MAX_BODY:
            raise FetchError("policy body over 64 KiB")
        chunks.append(chunk)
    if declared is not None and total != declared:
        raise FetchError("truncated body")  # http.client's read(amt) returns short silently
    return b"".join(chunks)
