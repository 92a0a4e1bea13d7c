"""One MX TLS check of one MX host, a coroutine on the engine's loop: the SMTP session
up to STARTTLS and the verified handshake (mxtls.py's docstring says what is checked,
how every peer byte is bounded, and what each result means)."""

from __future__ import annotations

import asyncio
import ssl
from typing import Optional, Tuple

from stsmilter.engine import dns as sts_dns
from stsmilter.engine import fetch
from stsmilter.engine.mxtls import (
    CHUNK, MAX_ADDRESSES, MAX_LINE, OK, QUIT_WAIT, STARTTLS_NOT_SUPPORTED, UNREACHABLE, ProtocolError, Reply,
    ReplyReader, Settings, _os_error, classify_error, offers_starttls, quote,
)


class _Session:
    """One SMTP client connection: lines read through a buffer of our own (so that
    bytes the peer sends ahead are seen, not handed to TLS), capped as above."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buffer = bytearray()

    async def line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                if end + 1 > MAX_LINE:
                    break
                line = bytes(self.buffer[: end + 1])
                del self.buffer[: end + 1]
                return line
            if len(self.buffer) >= MAX_LINE:
                break
            data = await self.reader.read(CHUNK)
            if not data:
                raise ProtocolError("connection closed by the peer")
            self.buffer += data
        raise ProtocolError(f"reply line over {MAX_LINE} bytes")

    async def reply(self) -> Reply:
        reader = ReplyReader()
        while True:
            reply = reader.feed(await self.line())
            if reply is not None:
                return reply

    async def send(self, command: bytes) -> None:
        self.writer.write(command + b"\r\n")
        await self.writer.drain()

    async def quit(self) -> None:
        """QUIT in plaintext, its answer not awaited (the result does not depend on it)."""
        try:
            await self.send(b"QUIT")
        except OSError:
            pass


async def probe_address(host: str, address: str, settings: Settings, context: ssl.SSLContext,
                        end: float) -> Tuple[str, str]:
    """(result, detail) of one SMTP session to address for host, ended by loop time end."""
    stage = "connect"
    writer = None
    try:
        async with asyncio.timeout_at(end):
            try:
                reader, writer = await asyncio.open_connection(address, settings.port, limit=CHUNK)
            except OSError as e:
                return UNREACHABLE, f"{address}: connect: {_os_error(e)}"
            session = _Session(reader, writer)
            stage = "greeting"
            greeting = await session.reply()
            if greeting.code != 220:
                await session.quit()
                return UNREACHABLE, f"{address}: greeting {greeting.code} {quote(greeting.lines[0])}"
            stage = "EHLO"
            await session.send(b"EHLO " + settings.helo_name.encode("ascii"))
            ehlo = await session.reply()
            if ehlo.code != 250:
                await session.quit()
                return UNREACHABLE, f"{address}: EHLO answered {ehlo.code} {quote(ehlo.lines[0])}"
            if not offers_starttls(ehlo):
                await session.quit()
                return STARTTLS_NOT_SUPPORTED, f"{address}: the EHLO reply does not offer STARTTLS"
            stage = "STARTTLS"
            await session.send(b"STARTTLS")
            answer = await session.reply()
            if answer.code != 220:
                await session.quit()
                kind = STARTTLS_NOT_SUPPORTED if answer.code >= 500 else UNREACHABLE
                return kind, f"{address}: STARTTLS answered {answer.code} {quote(answer.lines[0])}"
            if session.buffer:
                raise ProtocolError("plaintext after the 220 to STARTTLS")
            stage = "TLS handshake"
            tls = fetch._Tls(context, host, reader, writer)
            try:
                await tls.handshake()
            except (ssl.SSLError, OSError, EOFError) as e:
                kind = classify_error(e)
                why = getattr(e, "verify_message", None) or getattr(e, "reason", None) or getattr(e, "strerror", None)
                return kind, f"{address}: TLS handshake: {fetch._short(why or type(e).__name__)}"
            version = tls.sslobj.version()
        try:  # polite, not needed: the result stands whatever the peer does now
            async with asyncio.timeout(max(0.0, min(QUIT_WAIT, end - asyncio.get_running_loop().time()))):
                await tls.send(b"QUIT\r\n")
                await tls.recv()
        except (TimeoutError, ssl.SSLError, OSError, EOFError):
            pass
        return OK, f"{address}: {version}, certificate valid for {host}"
    except TimeoutError:
        return UNREACHABLE, f"{address}: no answer within [probe] timeout ({stage})"
    except ProtocolError as e:
        return UNREACHABLE, f"{address}: {stage}: {e}"
    except (OSError, EOFError) as e:
        return UNREACHABLE, f"{address}: {stage}: {_os_error(e)}"
    finally:
        if writer is not None:
            writer.transport.abort()  # no TLS close_notify dance with a hostile peer


async def probe(resolver: sts_dns.Resolver, host: str, settings: Settings, context: ssl.SSLContext) -> Tuple[str, str]:
    """(result, detail) for host: its addresses in turn until one is ok; otherwise the
    first definitive failure met, else "unreachable"."""
    loop = asyncio.get_running_loop()
    end = loop.time() + settings.timeout
    try:
        async with asyncio.timeout_at(end):
            found = await resolver.addresses(host, lifetime=settings.timeout)
    except TimeoutError:
        return UNREACHABLE, "address lookup: timeout"
    except sts_dns.DnsError as e:
        return UNREACHABLE, f"address lookup: {fetch._short(e)}"
    addresses = []
    for address in found[:MAX_ADDRESSES]:
        ip = fetch._ip(address)
        if ip is not None and (settings.allow_private or fetch.is_public_address(address)):
            addresses.append(str(ip))
    if not addresses:
        return UNREACHABLE, f"address not allowed: {', '.join(quote(a) for a in found[:3])}"
    outcome: Optional[Tuple[str, str]] = None
    for index, address in enumerate(addresses):
        left = end - loop.time()
        if left <= 0:
            break
        kind, detail = await probe_address(host, address, settings, context, loop.time() + left / (len(addresses) - index))
        if kind == OK:
            return kind, detail
        if outcome is None or (outcome[0] == UNREACHABLE and kind != UNREACHABLE):
            outcome = (kind, detail)
    return outcome or (UNREACHABLE, "no time left for an address")
