"""MX TLS check ([probe]): will delivery to this MX host get past STARTTLS and the
certificate check that an MTA-STS policy demands (RFC 8461 §4.1)?

The milter's verdict compares a domain's MX names with its policy; most real MTA-STS
delivery failures are something else: the name matches, but the host's certificate has
expired, names another host, does not chain to a trusted root, or the host offers no
STARTTLS. Postfix then defers the message for days and bounces it. This module looks at
an MX host the way the MTA's SMTP client will, so that the milter can refuse at
submission what delivery would refuse (decision.py, reason "mx-tls").

One check of one MX host, a coroutine on the engine's loop (probe()):
- the host's addresses through the engine's resolver (A then AAAA, at most
  MAX_ADDRESSES, as Postfix's smtp_mx_address_limit), each judged by the policy fetch's
  address guard ([fetch] allow_private_addresses);
- per address, in turn: TCP to [probe] port, the greeting (220, else "unreachable"),
  EHLO [probe] helo_name, STARTTLS if the EHLO reply offers it, the TLS handshake with
  SNI = the MX name, verified against the system CAs (or [probe] ca_file) and the name
  (OpenSSL's host check: a wildcard covers exactly one left-most label, RFC 8461 §4.1),
  then QUIT. Never MAIL, RCPT or DATA. The first address that is "ok" ends the check;
  addresses that cannot be reached are passed over, as the MTA passes over them;
- all within [probe] timeout, each address getting an equal share of what is left.

Every byte from the peer is hostile: reply lines are capped (MAX_LINE), a reply has at
most MAX_LINES lines and MAX_REPLY bytes, a line that is not an SMTP reply ends the
check as "unreachable", plaintext the peer sends after its 220 to STARTTLS (the
STARTTLS injection) too, and peer text reaches a log line only quoted and short.

Results (RFC 8460 §4.3 names where one fits):
  ok                          STARTTLS and a certificate valid for the MX name
  starttls-not-supported      EHLO answered without STARTTLS, or STARTTLS refused (5xx)
  certificate-expired         X509_V_ERR_CERT_HAS_EXPIRED
  certificate-host-mismatch   X509_V_ERR_HOSTNAME_MISMATCH
  certificate-not-trusted     no chain to a trusted root (self-signed, unknown issuer, ...)
  validation-failure          any other certificate or TLS handshake failure
  unreachable                 no address, refused, timed out, a 4xx/5xx greeting or EHLO,
                              a peer that breaks the protocol or hangs up
The first six are definitive (FAILURES, except ok): the MTA will meet them too.
"unreachable" never decides: the host may answer the MTA later.

The pure part (no I/O; mutation-tested): parse_line(), ReplyReader, offers_starttls(),
classify_verify(), classify_error(), lifetime(), failing_host() (the rule the Decider
applies: every policy-matching MX host has a definitive failure).

MxTlsChecker: results per MX host for [probe] ttl ("ok") or [probe] failure_ttl (the
rest), a lock-free peek() on the milter's path, one check in flight per host (single
flight), at most [probe] max_concurrent checks at once (waiting callers first:
limits.py), at most max_entries hosts remembered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import ssl
import threading
import time
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

from stsmilter import metrics
from stsmilter.config.schema import is_helo_name
from stsmilter.engine import dns as sts_dns
from stsmilter.engine import fetch
from stsmilter.engine.limits import PriorityLimiter, Want
from stsmilter.engine.loop import EngineLoop
from stsmilter.ratelog import RateLimitedLog

log = logging.getLogger("stsmilter.mxtls")

OK = "ok"
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERTIFICATE_EXPIRED = "certificate-expired"
CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
UNREACHABLE = "unreachable"
RESULTS = (OK, STARTTLS_NOT_SUPPORTED, CERTIFICATE_EXPIRED, CERTIFICATE_HOST_MISMATCH, CERTIFICATE_NOT_TRUSTED,
           VALIDATION_FAILURE, UNREACHABLE)
# What the MTA will meet too: these decide. "unreachable" never does.
FAILURES = frozenset({STARTTLS_NOT_SUPPORTED, CERTIFICATE_EXPIRED, CERTIFICATE_HOST_MISMATCH,
                      CERTIFICATE_NOT_TRUSTED, VALIDATION_FAILURE})

# The words an SMTP reply uses for each failure: fixed text, never the peer's.
DESCRIPTIONS = {
    STARTTLS_NOT_SUPPORTED: "STARTTLS is not offered",
    CERTIFICATE_EXPIRED: "certificate has expired",
    CERTIFICATE_HOST_MISMATCH: "certificate is not valid for the host name",
    CERTIFICATE_NOT_TRUSTED: "certificate is not trusted",
    VALIDATION_FAILURE: "TLS handshake or certificate check failed",
}

# OpenSSL's X509_V_ERR_* codes (stable across OpenSSL versions).
X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_HOSTNAME_MISMATCH = 62
UNTRUSTED_CODES = frozenset({
    2,  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
    18,  # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
    19,  # X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
    20,  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21,  # X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
    27,  # X509_V_ERR_CERT_UNTRUSTED
    28,  # X509_V_ERR_CERT_REJECTED
})

MAX_ADDRESSES = 5  # addresses tried per host: Postfix's smtp_mx_address_limit default
MAX_LINE = 1000  # bytes of one reply line with its CRLF (RFC 5321 §4.5.3.1.5 says 512)
MAX_LINES = 100  # lines of one multi-line reply
MAX_REPLY = 16 * 1024  # bytes of one reply, all lines
CHUNK = 4096  # bytes read from the peer at a time
QUIT_WAIT = 1.0  # seconds given to the peer's answer to QUIT (the result is known by then)
DETAIL_CHARS = 200  # one line of detail, at most
WARNING_INTERVAL = 1.0  # at most one failure line a second; the metric counts them all
MAX_QUEUED_CHECKS = 10000

class ProtocolError(Exception):
    """The peer does not speak SMTP as a server must: the check ends "unreachable"."""


# --- the pure part ----------------------------------------------------------------------


class Reply(NamedTuple):
    code: int
    lines: Tuple[str, ...]  # the text after the code and separator, one per line


def parse_line(line: bytes) -> Tuple[int, bool, str]:
    """(code, last, text) of one reply line ending in CRLF (or a bare LF), RFC 5321
    §4.2: three digits 200-599, then a space (the last line), "-" (more follow) or
    nothing. ProtocolError for anything else."""
    if line.endswith(b"\r\n"):
        line = line[:-2]
    elif line.endswith(b"\n"):
        line = line[:-1]
    else:
        raise ProtocolError("reply line without end of line")
    digits, separator = line[:3], line[3:4]
    if len(digits) != 3 or not digits.isdigit() or not b"200" <= digits <= b"599" or separator not in (b"", b" ", b"-"):
        raise ProtocolError(f"not an SMTP reply: {quote(line)}")
    return int(digits), separator != b"-", line[4:].decode("ascii", "replace")


class ReplyReader:
    """Lines in, one Reply out: feed(line) returns the Reply at its last line, None
    before. Bounded: MAX_LINES lines, MAX_REPLY bytes, one code throughout."""

    def __init__(self) -> None:
        self.code: Optional[int] = None
        self.texts: list = []
        self.size = 0

    def feed(self, line: bytes) -> Optional[Reply]:
        self.size += len(line)
        if self.size > MAX_REPLY or len(self.texts) >= MAX_LINES:
            raise ProtocolError(f"reply longer than {MAX_LINES} lines or {MAX_REPLY} bytes")
        code, last, text = parse_line(line)
        if self.code is not None and code != self.code:
            raise ProtocolError(f"reply lines with codes {self.code} and {code}")
        self.code = code
        self.texts.append(text)
        return Reply(code, tuple(self.texts)) if last else None


def offers_starttls(reply: Reply) -> bool:
    """The EHLO reply lists the STARTTLS keyword (RFC 3207 §4): a line after the first
    (which names the server) whose first word it is, in any case."""
    for text in reply.lines[1:]:
        words = text.split()
        if words and words[0].upper() == "STARTTLS":
            return True
    return False


def classify_verify(code: int) -> str:
    """An OpenSSL certificate verification error code as an RFC 8460 result."""
    if code == X509_V_ERR_CERT_HAS_EXPIRED:
        return CERTIFICATE_EXPIRED
    if code == X509_V_ERR_HOSTNAME_MISMATCH:
        return CERTIFICATE_HOST_MISMATCH
    if code in UNTRUSTED_CODES:
        return CERTIFICATE_NOT_TRUSTED
    return VALIDATION_FAILURE


def classify_error(error: BaseException) -> str:
    """What a failed TLS handshake means for delivery. A certificate the check refused:
    its verify code. Another TLS error (no shared protocol or cipher, a fatal alert, a
    peer that answered STARTTLS and then spoke plaintext): validation-failure, the MTA
    fails the same way. The peer closing or resetting the connection in the middle:
    unreachable (it may be transient)."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return classify_verify(error.verify_code)
    if isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)):
        return UNREACHABLE
    if isinstance(error, ssl.SSLError):
        return VALIDATION_FAILURE
    return UNREACHABLE


class HostResult(NamedTuple):
    kind: str  # one of RESULTS
    detail: str  # one line: which address, what happened (peer text quoted)
    checked_at: float  # the checker's clock() at the end of the check
    expires: float  # clock() time from which the host is checked again


class Settings(NamedTuple):
    port: int = 25  # [probe] port
    helo_name: str = "localhost"  # [probe] helo_name, or this host's name
    timeout: float = 10.0  # [probe] timeout: one whole check of one host
    ttl: float = 3600.0  # [probe] ttl: how long an "ok" is remembered
    failure_ttl: float = 300.0  # [probe] failure_ttl: how long anything else is
    max_entries: int = 200000  # [cache] max_entries: MX hosts remembered
    allow_private: bool = False  # [fetch] allow_private_addresses


def lifetime(kind: str, settings: Settings) -> float:
    """Seconds a result is remembered: an "ok" for ttl, any other result for failure_ttl
    (a fixed certificate is seen within it; a broken host is not asked more often)."""
    return settings.ttl if kind == OK else settings.failure_ttl


def failing_host(hosts: Sequence[str], results: Sequence[Optional[HostResult]]) -> Optional[Tuple[str, HostResult]]:
    """The host (and its result) to name when every policy-matching MX host has a
    definitive TLS failure; None when one is ok, unknown (None) or unreachable, or there
    is no host. The first host is named: the MTA tries it first (MX preference)."""
    if not results:
        return None
    for result in results:
        if result is None or result.kind not in FAILURES:
            return None
    return hosts[0], results[0]


def quote(text) -> str:
    """Peer-supplied text, printable and short enough for a log line."""
    text = ascii(text.decode("ascii", "replace") if isinstance(text, bytes) else str(text))
    return text if len(text) <= fetch.DETAIL_CHARS else text[: fetch.DETAIL_CHARS - 3] + "..."


def _os_error(error: BaseException) -> str:
    """An OSError as its system message ("Connection refused"), not asyncio's wrapping."""
    errno = getattr(error, "errno", None)
    if errno:
        return os.strerror(errno)
    return getattr(error, "strerror", None) or type(error).__name__


def _detail(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 3] + "..."


def default_helo_name() -> str:
    """This host's fully qualified name ([probe] helo_name empty), as an MTA names itself;
    "localhost" if the system has no usable one."""
    for name in (socket.getfqdn(), socket.gethostname()):
        if "." in name and is_helo_name(name):
            return name
    return "localhost"


def make_context(ca_file: str = "") -> ssl.SSLContext:
    """Verification as the MTA does it for an MTA-STS domain: a chain to the system CAs
    (or ca_file only) and a certificate valid for the MX name. OSError/ssl.SSLError for
    an unusable ca_file."""
    context = ssl.create_default_context(cafile=ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


# --- one check (the engine's loop) -----------------------------------------------------


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


# --- the checker ------------------------------------------------------------------------


_CHECKS = {kind: metrics.MX_CHECKS.labels(result=kind) for kind in RESULTS}


class MxTlsChecker:
    """Thread-safe. peek() and a check() whose hosts are all known never block or lock;
    check() waits at most its timeout; a check that outlives its caller goes on and fills
    the cache."""

    def __init__(self, resolver: sts_dns.Resolver, settings: Settings, context: ssl.SSLContext,
                 clock: Callable[[], float] = time.monotonic, *, engine: EngineLoop,
                 limiter: Optional[PriorityLimiter] = None, prober: Callable = probe) -> None:
        self.resolver, self.settings, self.context, self.clock = resolver, settings, context, clock
        self.prober = prober  # probe(); tests give a scripted one
        self.engine = engine  # the discovery's loop: closed with it
        self.limiter = limiter if limiter is not None else PriorityLimiter(64)
        # A plain dict read without the lock on the milter's path; writers hold the lock
        # and evict the oldest insertion at max_entries.
        self._results: Dict[str, HostResult] = {}
        # MX hosts asked about for an enforce domain whose result is a failure: the gauge.
        self._enforced: Dict[str, None] = {}
        self._lock = threading.Lock()
        self._jobs: Dict[str, Tuple[concurrent.futures.Future, Want]] = {}
        self._closed = False
        self._failures = RateLimitedLog(log, WARNING_INTERVAL, clock, " (%d more MX TLS check lines not logged)")
        metrics.MX_TLS_FAILING.set_function(self.failing_enforced)

    def reconfigure(self, resolver: sts_dns.Resolver, settings: Settings, context: ssl.SSLContext) -> None:
        """Config reload: for checks started from now on; the results stay."""
        self.resolver, self.settings, self.context = resolver, settings, context

    def peek(self, host: str) -> Optional[HostResult]:
        result = self._results.get(host)
        if result is not None and result.expires > self.clock():
            return result
        return None

    def check(self, hosts: Sequence[str], timeout: Optional[float] = None,
              enforce: bool = True) -> Tuple[Optional[HostResult], ...]:
        """The result of each host (None: unknown by the timeout). Hosts not known are
        checked (each once, whoever else asks); the wait ends as soon as one host is ok
        (the others' checks go on), all are known, or timeout passes. enforce: the
        hosts serve an enforce domain (stsmilter_mx_tls_failing_hosts)."""
        now = self.clock()
        results = [self._results.get(host) for host in hosts]
        missing = []
        for index, result in enumerate(results):
            if result is None or result.expires <= now:
                results[index] = None
                missing.append(index)
            elif enforce and result.kind in FAILURES and hosts[index] not in self._enforced:
                with self._lock:
                    self._enforced[hosts[index]] = None
        if not missing:
            return tuple(results)
        futures = {index: self.submit(hosts[index], wait=timeout, enforce=enforce) for index in missing}
        if not any(result is not None and result.kind == OK for result in results):
            self._wait(set(futures.values()), timeout)
        for index, future in futures.items():
            if future.done() and not future.cancelled() and future.exception() is None:
                results[index] = future.result()
        return tuple(results)

    @staticmethod
    def _wait(pending, timeout: Optional[float]) -> None:
        """Until every future is done, one of them is "ok", or timeout (seconds) passes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = concurrent.futures.wait(pending, left, concurrent.futures.FIRST_COMPLETED)
            if not done:
                return
            for future in done:
                if not future.cancelled() and future.exception() is None:
                    result = future.result()
                    if result is not None and result.kind == OK:
                        return

    def submit(self, host: str, wait: Optional[float] = None, enforce: bool = False) -> concurrent.futures.Future:
        """Start (or join) the check of host: a Future of its HostResult (None: refused,
        the checker is closed or too many checks wait). wait: the caller waits that many
        seconds; until then the check goes before background work (limits.py)."""
        until = time.monotonic() + (wait if wait is not None else 0.0)
        with self._lock:
            job = self._jobs.get(host)
            if job is None:
                # A check that ended since the caller looked: its result (stored before
                # the job goes), not a second check.
                known = self._results.get(host)
                if known is not None and known.expires > self.clock():
                    answer = known
                elif self._closed or len(self._jobs) >= MAX_QUEUED_CHECKS:
                    answer = None
                else:
                    want = Want(until, self.engine.loop)
                    job = self._jobs[host] = (self.engine.submit(self._run(host), want), want)
                if job is None:
                    done: concurrent.futures.Future = concurrent.futures.Future()
                    done.set_result(answer)
                    if enforce and answer is not None and answer.kind in FAILURES:
                        self._enforced[host] = None
                    return done
            if enforce:  # kept while the host has a job or a result (both bounded)
                self._enforced[host] = None
        job[1].extend(until)
        return job[0]

    def failing_enforced(self) -> int:
        """MX hosts of enforce domains whose current result is a definitive failure."""
        now = self.clock()
        results = self._results
        count = 0
        for host in list(self._enforced):
            result = results.get(host)
            if result is not None and result.kind in FAILURES and result.expires > now:
                count += 1
        return count

    def close(self) -> None:
        """A reload that sets [probe] enabled = no, or shutdown: checks under way end as
        they would; later checks are refused (unknown: the verdict without the check)."""
        with self._lock:
            self._closed = True
        metrics.MX_TLS_FAILING.set_function(lambda: 0)

    async def _run(self, host: str) -> Optional[HostResult]:
        try:
            if self._closed:
                return None
            settings = self.settings
            async with self.limiter:
                kind, detail = await self.prober(self.resolver, host, settings, self.context)
            return self._store(host, kind, _detail(detail), settings)
        except Exception:
            log.exception("MX TLS check of %s failed unexpectedly", host)
            # Stored, so that a bug is not re-run (and logged) for every recipient.
            return self._store(host, UNREACHABLE, "internal error", self.settings)
        finally:
            with self._lock:
                self._jobs.pop(host, None)

    def _store(self, host: str, kind: str, detail: str, settings: Settings) -> HostResult:
        _CHECKS[kind].inc()
        now = self.clock()
        result = HostResult(kind, detail, now, now + lifetime(kind, settings))
        with self._lock:
            self._results.pop(host, None)
            if len(self._results) >= settings.max_entries:
                oldest = next(iter(self._results))
                del self._results[oldest]
                self._enforced.pop(oldest, None)
            self._results[host] = result
            if kind not in FAILURES:
                self._enforced.pop(host, None)
        if kind in FAILURES:
            self._failures.log("failure", logging.WARNING, "MX TLS check of %s: %s: %s", host, kind, detail)
        elif kind == UNREACHABLE:
            self._failures.log("unreachable", logging.INFO, "MX TLS check of %s: unreachable: %s", host, detail)
        else:
            log.debug("MX TLS check of %s: ok: %s", host, detail)
        return result
