"""HTTPS policy fetch (RFC 8461 §3.3): https://mta-sts.<domain>/.well-known/mta-sts.txt.

Everything the network sends is hostile: addresses are checked before connecting, the
certificate must be valid for the host (WebPKI), only a 200 text/plain answer counts,
redirects are not followed, the body is capped at 64 KiB while it streams, and one
deadline bounds the whole fetch however slowly the server talks.

A fetch is a coroutine on the engine's event loop: while a policy host hangs, the fetch
holds a socket, not a thread. TLS runs in an ssl.SSLObject over memory BIOs on a plain
asyncio stream (asyncio's own TLS transport reserves a 256 KiB read buffer per
connection: a burst of hanging policy hosts would cost that much each). The HTTP
response is parsed by h11, a small, well-tested HTTP/1.1 state machine that does no I/O
of its own (status line, header limits, chunked and Content-Length framing); the
connection, TLS, addresses and the deadline stay ours.
"""

import asyncio
import ipaddress
import ssl
from typing import Optional

import h11

from stsmilter import __version__
from stsmilter.engine.dns import DnsError

POLICY_PATH = "/.well-known/mta-sts.txt"
MAX_BODY = 64 * 1024  # RFC 8461 §3.3 lets clients cap the policy size; 64 KiB is generous
CHUNK = 8192
MAX_HEAD = 16 * 1024  # status line and headers of the answer (h11's incomplete-event limit)
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
# 6to4 (RFC 3056): judged by the IPv4 address inside. Python before 3.11.4 (Debian 12
# ships 3.11.2) lists all of 2002::/16 as private; later versions do not.
SIXTOFOUR_PREFIX = ipaddress.ip_network("2002::/16")
USER_AGENT = f"stsmilter/{__version__}"
DETAIL_CHARS = 40  # longest piece of peer-supplied text quoted in an error message
LIBRARY_TEXT_CHARS = 100  # longest OpenSSL/resolver message kept in an error message


class FetchError(Exception):
    reason = "sts-policy-fetch-error"
    timed_out = False  # the policy host (or its DNS) did not answer in time


class FetchTimeout(FetchError):
    """The whole fetch outlived its deadline: a host that hangs, or drips."""

    timed_out = True


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

    async def fetch(self, domain: str, deadline: Optional[float] = None) -> bytes:
        """The raw body of https://mta-sts.<domain>/.well-known/mta-sts.txt.

        ``domain`` is normalized already. ``deadline`` is a time.monotonic() value (the
        event loop's clock); the earlier of it and now + timeout ends the whole fetch.
        Raises FetchError (FetchTimeout past the deadline) or WebPkiError."""
        host = "mta-sts." + domain
        loop = asyncio.get_running_loop()
        end = loop.time() + self.timeout
        if deadline is not None:
            end = min(end, deadline)
        if end <= loop.time():
            raise FetchTimeout("timeout")
        writer = None
        try:
            async with asyncio.timeout_at(end):
                addresses = await self._addresses(host, end - loop.time())
                reader, writer = await self._connect(addresses, end)
                tls = _Tls(self.context, host, reader, writer)
                await self._handshake(tls)
                return await self._exchange(tls, host)
        except TimeoutError:
            raise FetchTimeout("timeout") from None
        finally:
            if writer is not None:
                writer.transport.abort()  # no TLS close_notify dance with a hostile peer

    async def _addresses(self, host, lifetime):
        try:
            found = await self.resolver.addresses(host, lifetime=lifetime)
        except DnsError as e:
            raise FetchError(f"dns: {_short(e)}") from None
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

    async def _connect(self, addresses, end):
        """A TCP connection to the first address that answers; each attempt gets an
        equal share of the time left so one black hole cannot starve the others."""
        loop = asyncio.get_running_loop()
        failure = "connect failed"
        for index, address in enumerate(addresses):
            share = (end - loop.time()) / (len(addresses) - index)
            try:
                async with asyncio.timeout(share):
                    return await asyncio.open_connection(address, self.port, limit=CHUNK)
            except TimeoutError:
                failure = f"connect {address}: timeout"
            except OSError as e:
                failure = f"connect {address}: {e.strerror or type(e).__name__}"
        raise FetchError(failure)

    async def _handshake(self, tls: "_Tls") -> None:
        try:
            await tls.handshake()
        except ssl.SSLCertVerificationError as e:
            raise WebPkiError(f"certificate: {_short(e.verify_message or e.reason)}") from None
        except ssl.SSLError as e:
            raise FetchError(f"tls: {_short(e.reason or type(e).__name__)}") from None
        except (OSError, EOFError) as e:  # the peer hung up during the handshake
            raise FetchError(f"tls: {getattr(e, 'strerror', None) or type(e).__name__}") from None

    async def _exchange(self, tls: "_Tls", host) -> bytes:
        http = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        request = h11.Request(method="GET", target=POLICY_PATH, headers=[
            ("Host", host if self.port == 443 else f"{host}:{self.port}"),
            ("User-Agent", USER_AGENT),
            ("Accept", "text/plain"),
            ("Connection", "close"),
        ])
        chunks, total, head_seen = [], 0, False
        try:
            await tls.send(http.send(request) + http.send(h11.EndOfMessage()))
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    http.receive_data(await tls.recv())  # b"": the peer closed
                elif isinstance(event, h11.Response):
                    _check_head(event)
                    head_seen = True
                elif isinstance(event, h11.Data):
                    total += len(event.data)  # counted as it arrives, whatever the headers said
                    if total > MAX_BODY:
                        raise FetchError("policy body over 64 KiB")
                    chunks.append(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    return b"".join(chunks)
                elif isinstance(event, h11.ConnectionClosed):
                    raise FetchError("truncated body")
                # h11.InformationalResponse (1xx): the answer is still to come
        except h11.RemoteProtocolError as e:
            if head_seen:  # the body ended early (closed before its Content-Length, a broken chunk)
                raise FetchError("truncated body") from None
            raise FetchError(f"bad HTTP response: {_short(e)}") from None
        except ssl.SSLError as e:
            raise FetchError(f"tls: {_short(e.reason or type(e).__name__)}") from None
        except (OSError, EOFError) as e:
            raise FetchError(f"network: {getattr(e, 'strerror', None) or type(e).__name__}") from None


class _Tls:
    """TLS over an asyncio stream: an ssl.SSLObject fed through memory BIOs (the Python
    documentation's "Memory BIO Support"), reading at most CHUNK bytes at a time."""

    def __init__(self, context: ssl.SSLContext, host: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(self.incoming, self.outgoing, server_hostname=host)
        self.reader, self.writer = reader, writer

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def _fill(self) -> None:
        data = await self.reader.read(CHUNK)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    async def handshake(self) -> None:
        while True:
            try:
                self.sslobj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
        await self._flush()

    async def send(self, data: bytes) -> None:
        self.sslobj.write(data)
        await self._flush()

    async def recv(self) -> bytes:
        """Up to CHUNK bytes of plaintext; b"" once the peer has closed (with or without
        close_notify: the HTTP framing decides whether the answer was complete)."""
        while True:
            try:
                return self.sslobj.read(CHUNK)
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""


def _check_head(response: h11.Response) -> None:
    status = response.status_code
    if 300 <= status < 400:
        raise FetchError(f"HTTP {status}: redirects are not followed")
    if status != 200:
        raise FetchError(f"HTTP {status}")
    fields = {}
    for name, value in response.headers:  # h11 gives lower-case names
        fields.setdefault(name, value)
    content_type = fields.get(b"content-type", b"").decode("latin-1")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "text/plain":
        raise FetchError(f"Content-Type {_quote(media_type)} is not text/plain")
    length = fields.get(b"content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise FetchError("policy body over 64 KiB")
