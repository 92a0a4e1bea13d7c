"""Let a private Postfix route mail by recipient domain without DNS leaving loopback.

DNS is disabled in the test Postfix (smtp_dns_support_level = disabled, smtp_host_lookup
= native), so it looks the recipient domain up as a host name through the C library,
i.e. /etc/hosts. Postfix is started inside a private mount namespace (unshare --mount)
in which /etc/hosts is a bind-mounted file mapping each test domain to its own loopback
address (127.0.0.2, .3, ...), and /etc/resolv.conf points at 127.0.0.1 so nothing can
leak. Every peer listens on the same port on its own address; smtp_tcp_port names that
port. The TLS policy lookup key is then the plain recipient domain, as in production.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from typing import Dict, Iterable, Iterator, List


def common_free_port(addresses: Iterable[str]) -> int:
    """A port free on every one of addresses."""
    addresses = list(addresses)
    for _ in range(50):
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            port = s.getsockname()[1]
        probes = []
        try:
            for address in addresses:
                probe = socket.socket()
                probes.append(probe)
                probe.bind((address, port))
            return port
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError("no common free port")


@contextlib.contextmanager
def private_hosts(hosts: Dict[str, str]) -> Iterator[List[str]]:
    """Yield a command prefix (for PostfixInstance(wrapper=...)) that runs the command in
    a mount namespace where /etc/hosts maps each name in hosts to its address."""
    directory = tempfile.mkdtemp(prefix="stsmilter-ns-")
    os.chmod(directory, 0o755)  # Postfix daemons (user postfix) read the files
    try:
        hosts_file = os.path.join(directory, "hosts")
        with open(hosts_file, "w") as f:
            f.write("127.0.0.1 localhost\n")
            f.writelines(f"{address} {name}\n" for name, address in hosts.items())
        resolv = os.path.join(directory, "resolv.conf")
        with open(resolv, "w") as f:
            f.write("nameserver 127.0.0.1\n")
        os.chmod(hosts_file, 0o644)
        os.chmod(resolv, 0o644)
        yield [
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && shift 2 && exec "$@"',
            "sh", hosts_file, resolv,
        ]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def can_unshare() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None
