"""Pure MTA-STS policy code (RFC 8461): no I/O.

Value objects for a policy and a discovery result; parsing of the _mta-sts TXT record
(§3.1) and of the policy file (§3.2); MX pattern validation and matching (§4.1);
recipient domain normalization.
"""

import dataclasses
from typing import Optional, Tuple

MAX_AGE_LIMIT = 31557600  # RFC 8461 §3.2: max_age is capped at one year

# Discovery statuses (Result.status)
VALID = "valid"  # a policy applies (any mode, "none" included)
NONE = "none"  # no usable TXT record and nothing cached
FAILED = "failed"  # record present (or DNS failed) but no policy obtained, nothing cached
PENDING = "pending"  # discovery not finished within the caller's deadline


@dataclasses.dataclass(frozen=True)
class Policy:
    version: str
    mode: str  # "enforce" | "testing" | "none"
    max_age: int
    mx: Tuple[str, ...]

    def matches(self, host: str) -> bool:
        return any(mx_matches(pattern, host) for pattern in self.mx)

    def as_dict(self) -> dict:
        return {"version": self.version, "mode": self.mode, "max_age": self.max_age, "mx": list(self.mx)}


@dataclasses.dataclass(frozen=True)
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


def mx_matches(pattern: str, host: str) -> bool:
    raise NotImplementedError  # filled in by the policy parsing work
