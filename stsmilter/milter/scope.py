"""Which milter sessions stsmilter checks: the client, local submission, and Postfix's
emulated session for non-SMTP mail.

Non-SMTP mail: Postfix's cleanup(8) runs non_smtpd_milters on mail from sendmail(1),
postdrop and qmqpd(8) with an emulated session whose connect event is "localhost",
AF_INET 127.0.0.1, port 0. No TCP client has port 0 (smtpd(8) passes the real one, and a
client over a unix socket or stdin arrives without an inet address), so port 0 is the
signal. Postfix cannot refuse one recipient of such mail: a 4xx or 5xx for a recipient
makes it log "can't reject recipient in non-smtpd(8) submission" and keep the whole
message in the maildrop queue, retried forever (session.py applies [milter] non_smtp).
Sendmail runs milters in SMTP sessions only (its sendmail(1) relays over SMTP through
the MSP), where per-recipient replies work.
"""

from __future__ import annotations

import functools
import ipaddress
import socket

INET_FAMILIES = (socket.AF_INET, socket.AF_INET6)


def non_smtp_session(family, hostaddr) -> bool:
    """True for Postfix's emulated connection for non-SMTP mail: an inet address with
    port 0, which no TCP client has (see the module docstring)."""
    if family in INET_FAMILIES:
        try:  # cheaper than checking the shape first; pymilter gives (address, port, ...)
            return hostaddr[1] == 0
        except (TypeError, IndexError, KeyError):
            pass
    return False


def client_trusted(family, hostaddr, trusted_address) -> bool:
    """True for a client whose address trusted_address() accepts, or without a network
    address (a unix socket, or smtpd(8) on stdin): local submission."""
    if family not in INET_FAMILIES or not isinstance(hostaddr, tuple) or not hostaddr:
        return True
    return trusted_address(hostaddr[0])


def client_text(family, hostaddr) -> str:
    """The client's IP address for log lines; "local" without one (a unix socket)."""
    if family in INET_FAMILIES and isinstance(hostaddr, tuple) and hostaddr:
        return str(hostaddr[0])
    return "local"


def trusted_address_check(networks: tuple):
    """address -> bool: in one of networks. Remembered per address (MTAs and submission
    clients come back all day), one memo per configuration snapshot so that the key is
    the address alone: hashing the networks on every call cost more than the check."""
    return functools.lru_cache(maxsize=4096)(functools.partial(_address_in, networks=networks))


def _address_in(address: str, networks: tuple) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:192.0.2.1 from a dual-stack socket
    return any(ip in net for net in networks)
