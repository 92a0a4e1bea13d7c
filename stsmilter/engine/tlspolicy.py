"""The TLS policy an MTA gets for a domain: the answer behind the socketmap, without I/O.

answer() turns a discovery result (and, for an enforced policy, a DANE verdict) into the
reply payload Postfix's smtp_tls_policy_maps and Sendmail 8.17's FEATURE(`sts') map get:
"OK secure match=... servername=hostname" for an MTA-STS policy the MTA must enforce,
"OK dane-only" when DANE governs, "NOTFOUND " when the MTA's own TLS level applies, TEMP
while a lookup is under way, when a DNSSEC lookup failed or the policy lists no MX (and,
through the caller, for a policy it cannot vouch for). socketmap/connection.py frames it as a
netstring. Mutation-tested (tests/mutation/mutate.py).

DANE first (RFC 8461 §2, [socketmap] dane = auto): for a domain whose MTA-STS policy the
MTA must enforce, the DANE verdict (dane.py) decides between "dane-only" (DANE governs),
the MTA-STS answer (DANE does not apply) and TEMP (a DNSSEC lookup failed). The map name
"sts" is Sendmail's FEATURE(`sts'): Sendmail 8.17 understands only "secure ..." there and
runs its own DANE in the binary before these checks (README), so it gets the MTA-STS
answer without a DANE check.
"""

import re
from typing import Optional

from stsmilter.engine import dane, policy

MAX_REPLY = 100000  # the Postfix socketmap client refuses longer replies

NOTFOUND = b"NOTFOUND "
IN_PROGRESS = b"TEMP MTA-STS policy lookup in progress"
NO_MX = b"TEMP MTA-STS policy lists no mx"
DANE_ONLY = b"OK dane-only"  # Postfix: DANE or nothing; never "dane" (falls back to "may")
DANE_DNS_ERROR = b"TEMP DNSSEC lookup for DANE failed"
SENDMAIL_MAP = b"sts"  # FEATURE(`sts') asks "sts DOMAIN"

_DOMAIN = re.compile(r"(?:{0}\.)*{0}".format(policy.LDH_LABEL.pattern))


def normalize_key(key: bytes) -> Optional[str]:
    """The domain a request key names (lower-case A-labels, no trailing dot), or None for
    anything else: [host]:port, host:port, IP literals, ".parent" lookups, junk, bytes
    that are not UTF-8. The milter's normalization (U-labels through UTS 46, as Postfix
    does), so that both front ends look up the same domain."""
    try:
        return policy.normalize_domain(key.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included
        return None


def dane_first(map_name: bytes) -> bool:
    """Whether an enforced policy's answer for this map waits for the DANE verdict: not
    for Sendmail's "sts" map, whose MTA has run its own DANE before it asks."""
    return map_name != SENDMAIL_MAP


def on_timeout_answer(settings) -> bytes:
    return NOTFOUND if settings.on_timeout == "notfound" else IN_PROGRESS


def enforced(result: policy.Result, settings) -> bool:
    """The MTA must enforce this result's policy (mode enforce, or testing with
    strict_testing): the answers where DANE comes first."""
    sts = result.policy
    if result.status != policy.VALID or sts is None:
        return False
    return sts.mode == "enforce" or (sts.mode == "testing" and settings.strict_testing)


def answer(result: policy.Result, settings, verdict: Optional[dane.Verdict] = None) -> bytes:
    """The reply payload (without netstring framing) for a discovery result and, for an
    enforced policy, the DANE verdict (None: no DANE check, the MTA-STS answer).
    ValueError for a policy whose text could change Postfix's syntax (the socketmap
    answers TEMP internal error)."""
    if result.status == policy.PENDING:
        return on_timeout_answer(settings)
    if not enforced(result, settings):
        return NOTFOUND
    if verdict is not None and verdict.kind != dane.NO_DANE:
        if verdict.kind == dane.DANE:
            return DANE_ONLY
        if verdict.kind == dane.DNS_ERROR:
            return DANE_DNS_ERROR  # "secure" might override DANE; "dane-only" might block
        return on_timeout_answer(settings)  # PENDING
    sts = result.policy
    if not sts.mx:
        return NO_MX  # enforced, yet no MX can satisfy it: defer rather than downgrade
    # The parser gives canonical patterns; a policy cached by an older version may not be.
    # Checked here too because they become Postfix syntax.
    patterns = [policy.canonical_mx_pattern(p) for p in sts.mx]
    if sts.version != "STSv1" or not _DOMAIN.fullmatch(result.domain) or None in patterns:
        raise ValueError("unsafe text in the policy of %r" % result.domain)  # -> TEMP internal error
    # Postfix's ".example.com" also matches deeper names, RFC 8461's "*." one label only:
    # a documented, accepted weakening (the certificate must still name the MX host).
    secure = "OK secure match=%s servername=hostname" % ":".join(p[1:] if p[:2] == "*." else p for p in patterns)
    if settings.tlsrpt:
        # Postfix 3.10 TLSRPT attributes (TLSRPT_README); "{ name = value }" protects spaces.
        lines = ["version: " + sts.version, "mode: " + sts.mode] + ["mx: " + p for p in patterns]
        lines.append("max_age: %d" % sts.max_age)
        attributes = ["policy_type=sts", "policy_domain=" + result.domain] + ["mx_host_pattern=" + p for p in patterns]
        reported = " ".join([secure] + attributes + ["{ policy_string = %s }" % line for line in lines])
        if len(reported) <= MAX_REPLY:
            return reported.encode("ascii")
    return secure.encode("ascii")
