"""Pure MTA-STS policy code (RFC 8461): no I/O.

Value objects for a policy and a discovery result; parsing of the _mta-sts TXT record
(§3.1) and of the policy file (§3.2); MX pattern validation and matching (§4.1);
recipient domain normalization.
"""

import dataclasses
import functools
import logging
import re
import sys
import unicodedata
from typing import Iterable, List, Optional, Tuple, Union

import idna

MAX_AGE_LIMIT = 31557600  # RFC 8461 §3.2: max_age is capped at one year

# Discovery statuses (Result.status)
VALID = "valid"  # a policy applies (any mode, "none" included)
NONE = "none"  # no usable TXT record and nothing cached
FAILED = "failed"  # record present (or DNS failed) but no policy obtained, nothing cached
PENDING = "pending"  # discovery not finished within the caller's deadline

MODES = ("enforce", "testing", "none")

log = logging.getLogger("stsmilter.policy")

# Value objects held once per cached domain carry no per-instance dict where the language
# allows (Python 3.10+): about 50 bytes less each (README "Sizing").
SLOTS = {"slots": True} if sys.version_info >= (3, 10) else {}


class PolicyError(ValueError):
    """A policy file that cannot be used; str() is a short message, safe to log."""

    def __init__(self, message: str, reason: str = "sts-policy-invalid"):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class TxtRecord:
    """The one valid "v=STSv1" record at _mta-sts.<domain> (RFC 8461 §3.1)."""

    id: str
    extensions: Tuple[Tuple[str, str], ...] = ()  # (name, value) in record order, id excluded


@dataclasses.dataclass(frozen=True, **SLOTS)
class Policy:
    version: str
    mode: str  # "enforce" | "testing" | "none"
    max_age: int
    mx: Tuple[str, ...]

    def matches(self, host: str) -> bool:
        return any(mx_matches(pattern, host) for pattern in self.mx)

    def as_dict(self) -> dict:
        return {"version": self.version, "mode": self.mode, "max_age": self.max_age, "mx": list(self.mx)}


@dataclasses.dataclass(frozen=True, **SLOTS)
class Result:
    """The answer to "which MTA-STS policy applies to this domain right now"."""

    domain: str
    status: str
    reason: Optional[str] = None
    source: Optional[str] = None  # "fetched" | "cache" | None
    policy_id: Optional[str] = None
    policy: Optional[Policy] = None
    fetched_at: Optional[float] = None
    expires: Optional[float] = None

    @property
    def mode(self) -> Optional[str]:
        return self.policy.mode if self.policy is not None and self.status == VALID else None


# --- helpers shared by the parsers. Character classes are spelled out ([A-Za-z0-9], not
# \w or \d) because the grammars are ASCII-only and Python's classes are Unicode-aware.

_WSP = " \t"
LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")  # applied to lower-case; also tlspolicy.py


def _quote(text: str, limit: int = 40) -> str:
    """Untrusted text for an error message: truncated, non-printables escaped by repr."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def _strip_dot(name: str) -> str:
    return name[:-1] if name.endswith(".") else name


def _is_hostname(name: str) -> bool:
    """Lower-case ASCII name without trailing dot: LDH labels, and not an IP address."""
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    # An all-numeric last label is never a TLD (RFC 3696 §2); this rejects "192.0.2.1".
    return all(LDH_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


# --- TXT record (RFC 8461 §3.1)

_STS_VERSION_PREFIX = re.compile(r"v=STSv1[ \t]*;")
_STS_FIELD = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}=[\x21-\x3a\x3c\x3e-\x7e]+"
# sts-text-record = sts-version 1*(sts-field-delim sts-field) [sts-field-delim], with
# sts-field-delim = *WSP ";" *WSP: WSP may stand on either side of the optional final ";",
# but a record that ends in WSP without it is outside the grammar (§3.1: no policy).
_DELIM = r"[ \t]*;[ \t]*"
_STS_RECORD = re.compile(rf"v=STSv1(?:{_DELIM}{_STS_FIELD})+(?:{_DELIM})?")
_STS_ID = re.compile(r"[A-Za-z0-9]{1,32}")

TxtInput = Union[str, bytes, List[Union[str, bytes]], Tuple[Union[str, bytes], ...]]


def _txt_text(record: TxtInput) -> str:
    if isinstance(record, (list, tuple)):
        return "".join(_txt_text(part) for part in record)  # character-strings join without spaces
    if isinstance(record, (bytes, bytearray)):
        try:
            return bytes(record).decode("ascii")
        except UnicodeDecodeError:
            # Still let the "v=STSv1;" prefix count the record as STSv1; the ASCII-only
            # grammar then rejects the non-ASCII characters latin-1 maps the bytes to.
            return bytes(record).decode("latin-1")
    if isinstance(record, str):
        return record
    raise TypeError(f"TXT record must be str, bytes or a list of them, not {type(record).__name__}")


def _parse_sts_record(text: str) -> Optional[TxtRecord]:
    if not _STS_RECORD.fullmatch(text):
        return None
    ids, extensions = [], []
    for field in text.split(";")[1:]:  # values cannot contain ";", so this split is exact
        name, _, value = field.strip(_WSP).partition("=")
        if name == "id":
            ids.append(value)
        elif name:  # not the empty field after the optional final delimiter
            extensions.append((name, value))
    if len(ids) != 1 or not _STS_ID.fullmatch(ids[0]):
        return None
    return TxtRecord(id=ids[0], extensions=tuple(extensions))


def sts_record_texts(strings: Iterable[TxtInput]) -> List[str]:
    """The records of an RRset that start with "v=STSv1" + optional WSP + ";": zero of them
    means the domain publishes no MTA-STS record, more than one an ambiguous RRset."""
    if isinstance(strings, (str, bytes, bytearray)):
        raise TypeError("takes a list of records, not a single record")
    return [text for text in map(_txt_text, strings) if _STS_VERSION_PREFIX.match(text)]


def parse_txt(strings: Iterable[TxtInput]) -> Optional[TxtRecord]:
    """The TXT RRset of _mta-sts.<domain> -> its one valid STSv1 record, else None."""
    if isinstance(strings, (str, bytes, bytearray)):
        raise TypeError("parse_txt takes a list of records, not a single record")
    sts_records = sts_record_texts(strings)
    if len(sts_records) != 1:  # zero, or an ambiguous RRset (§3.1: "not exactly one")
        return None
    return _parse_sts_record(sts_records[0])


# --- policy file (RFC 8461 §3.2)

_LINE_BREAK = re.compile(r"\r?\n")
_POLICY_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_MAX_AGE = re.compile(r"[0-9]{1,10}")
_SINGLE_KEYS = ("version", "mode", "max_age")


def _has_control(value: str) -> bool:
    return any(unicodedata.category(char) == "Cc" and char != "\t" for char in value)


def _decode_policy(body: Union[bytes, str]) -> str:
    if isinstance(body, str):
        return body
    if isinstance(body, (bytes, bytearray, memoryview)):
        try:
            return bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyError("not valid UTF-8") from None
    raise TypeError(f"policy body must be bytes or str, not {type(body).__name__}")


def parse_policy(body: Union[bytes, str]) -> Policy:
    """The body of https://mta-sts.<domain>/.well-known/mta-sts.txt -> Policy or PolicyError."""
    text = _decode_policy(body)
    first = {}  # version/mode/max_age: the first occurrence wins
    mx_values = []
    for number, line in enumerate(_LINE_BREAK.split(text), 1):
        if not line.strip(_WSP):
            continue
        if "\r" in line:
            raise PolicyError(f"line {number}: carriage return without line feed")
        key, colon, value = line.partition(":")
        if not colon:
            raise PolicyError(f"line {number}: no ':' in {_quote(line)}")
        if not _POLICY_KEY.fullmatch(key):
            raise PolicyError(f"line {number}: bad key {_quote(key)}")
        value = value.strip(_WSP)
        if _has_control(value):
            raise PolicyError(f"line {number}: control character in the value of {key}")
        if key == "mx":
            mx_values.append(value)
        elif key in _SINGLE_KEYS:
            first.setdefault(key, value)
        # any other key is an extension: ignored (§3.2), including "Mode" (keys are case-sensitive)

    for key in _SINGLE_KEYS:
        if key not in first:
            raise PolicyError(f"{key}: missing")
    if first["version"] != "STSv1":
        raise PolicyError(f"version: must be STSv1, not {_quote(first['version'])}")
    mode = first["mode"]
    if mode not in MODES:
        raise PolicyError(f"mode: must be enforce, testing or none, not {_quote(mode)}")
    if not _MAX_AGE.fullmatch(first["max_age"]):
        raise PolicyError(f"max_age: not a number of 1 to 10 digits: {_quote(first['max_age'])}")
    max_age = int(first["max_age"])
    if max_age > MAX_AGE_LIMIT:
        log.warning("policy max_age %d above %d seconds, capped", max_age, MAX_AGE_LIMIT)
        max_age = MAX_AGE_LIMIT

    patterns = []
    for value in mx_values:
        pattern = canonical_mx_pattern(value)
        if pattern is None:
            raise PolicyError(f"mx: invalid pattern {_quote(value)}")
        patterns.append(pattern)
    patterns = list(dict.fromkeys(patterns))  # without duplicates, in policy order
    if mode != "none" and not patterns:
        raise PolicyError(f"mx: mode {mode} needs at least one mx")
    return Policy(version="STSv1", mode=mode, max_age=max_age, mx=tuple(patterns))


# --- MX patterns (RFC 8461 §4.1)


def canonical_mx_pattern(pattern: str) -> Optional[str]:
    """An mx value -> the form a Policy keeps and the MTA is given: lower-case, without a
    trailing dot (certificate names and Postfix's match= names have none); None unless it
    is an A-label host name, optionally with "*." as the whole leftmost label.

    §3.2 spells the value ["*."] Domain (RFC 5321: no trailing dot), but §4.1 compares
    names, and "mx1.example.com." names the same host: refusing it would drop the
    domain's enforcement over a spelling.
    """
    if not isinstance(pattern, str) or not pattern.isascii():  # before lower(): "\u212a" -> "k"
        return None
    name = _strip_dot(pattern.lower())
    host = name[2:] if name.startswith("*.") else name
    return name if len(name) <= 253 and _is_hostname(host) else None


def valid_mx_pattern(pattern: str) -> bool:
    return canonical_mx_pattern(pattern) is not None


def mx_matches(pattern: str, host: str) -> bool:
    """True if host is the name pattern, or one label in front of a "*." pattern's suffix."""
    if not (isinstance(pattern, str) and isinstance(host, str) and pattern.isascii() and host.isascii()):
        return False
    pattern, host = _strip_dot(pattern.lower()), _strip_dot(host.lower())
    if pattern.startswith("*.") and len(pattern) > 2:
        suffix = pattern[1:]  # ".example.com"
        label = host[: -len(suffix)] if host.endswith(suffix) else ""
        return bool(label) and "." not in label
    return bool(host) and host == pattern


# --- recipient domains


@functools.lru_cache(maxsize=10000)  # the milter normalizes the same domains all day
def normalize_domain(domain: str) -> Optional[str]:
    """Lower-case A-label domain without trailing dot; None for an address literal."""
    name = domain.strip()
    if len(name) > 2 and name.startswith("[") and name.endswith("]"):
        return None  # [192.0.2.1], [IPv6:...]: no MTA-STS for a literal (RFC 8461 applies to domains)
    name = _strip_dot(name)
    if not name:
        raise ValueError("empty domain")
    if name.isascii():
        # ASCII stays out of idna: its IDNA 2008 checks reject real LDH names such as "r3---sn".
        name = name.lower()
    else:
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except UnicodeError:  # idna.IDNAError and codec errors
            raise ValueError(f"not a valid internationalized domain: {_quote(domain)}") from None
    if not _is_hostname(name):
        raise ValueError(f"not a valid domain: {_quote(domain)}")
    return name


def is_normalized_domain(text) -> bool:
    """text is a domain exactly as normalize_domain() gives it: a key read back from a
    store, an event or a control request names a domain only in that form."""
    if not isinstance(text, str):
        return False
    try:
        return normalize_domain(text) == text
    except ValueError:
        return False


def _last_unquoted_at(address: str) -> int:
    """Index of the "@" that starts the domain: the last one outside a quoted local part."""
    position, quoted, escaped = -1, False, False
    for index, char in enumerate(address):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "@" and not quoted:
            position = index
    return position


def recipient_domain(address: str) -> Optional[str]:
    """Envelope recipient ("<u@Dom.Example.>", "u@dom.example") -> normalized domain.

    None for an address without a domain ("postmaster") or with an address literal.
    """
    text = address.strip()
    if text.startswith("<") or text.endswith(">"):
        if not (len(text) >= 2 and text.startswith("<") and text.endswith(">")):
            raise ValueError(f"unbalanced angle brackets: {_quote(address)}")
        text = text[1:-1]
    # Without a quoted local part the domain simply follows the last "@".
    at = text.rfind("@") if '"' not in text else _last_unquoted_at(text)
    if at < 0:
        return None
    return normalize_domain(text[at + 1 :])
