"""MX TLS check ([probe]): will delivery to this MX host get past STARTTLS and the
certificate check that an MTA-STS policy demands (RFC 8461 §4.1)?

The milter's verdict compares a domain's MX names with its policy; most real MTA-STS
delivery failures are something else: the name matches, but the host's certificate has
expired, names another host, does not chain to a trusted root, or the host offers no
STARTTLS. Postfix then defers the message for days and bounces it. This module looks at
an MX host the way the MTA's SMTP client will, so that the milter can refuse at
submission what delivery would refuse (decision.py, reason "mx-tls").

One check of one MX host, a coroutine on the engine's loop (mxtls_probe.probe()):
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

This module is the pure part (no I/O; mutation-tested): the results, parse_line(),
ReplyReader, offers_starttls(), classify_verify(), classify_error(), lifetime(),
failing_host() (the rule the Decider applies: every policy-matching MX host has a
definitive failure). mxtls_probe.py is one check of one host over SMTP (probe());
mxtls_checker.py the MxTlsChecker: results per MX host for [probe] ttl ("ok") or
[probe] failure_ttl (the rest), a lock-free peek() on the milter's path, one check in
flight per host (single flight), at most [probe] max_concurrent checks at once (waiting
callers first: limits.py), at most max_entries hosts remembered.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from typing import NamedTuple, Optional, Sequence, Tuple

from stsmilter.config.schema import is_helo_name
from stsmilter.engine import fetch

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


def one_line_detail(text: str) -> str:
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
