"""A private validating resolver: Debian's unbound, on loopback, for DNSSEC/DANE tests.

Its own config in a temp directory (never the system service or /etc/unbound): it asks
only the loopback authoritative server (a forward zone for ".": a stub zone for "."
would prime the root from it and fail; no root hints are ever used), never an address outside 127.0.0.0/8, and validates with the trust anchors it is
given (one per signed test apex; everything else is "insecure", as no root key is set).
Settings from FIELD-NOTES, "A private validating resolver".
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile

import dns.exception
import dns.flags
import dns.message
import dns.query

from world.daemon import poll_until

UNBOUND = "/usr/sbin/unbound"
START_TIMEOUT = 20.0

# Every IPv4 range except 127.0.0.0/8 (unbound has no "all but"), and no IPv6 at all.
OUTSIDE_LOOPBACK = ("0.0.0.0/2", "64.0.0.0/3", "96.0.0.0/4", "112.0.0.0/5", "120.0.0.0/6", "124.0.0.0/7",
                    "126.0.0.0/8", "128.0.0.0/1")


def free_udp_tcp_port(address):
    """A port free for both UDP and TCP on address."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((address, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((address, port))
                except OSError:
                    continue
        if port != 2024:
            return port
    raise OSError("no port free for both UDP and TCP")


class UnboundResolver:
    """start() -> self (answering queries), stop() kills it and removes its directory.
    Call stop() whenever the object exists, even if start() failed."""

    def __init__(self, upstream_port, trust_anchors=(), address="127.0.0.1", port=None,
                 upstream_address="127.0.0.1"):
        self.address = address
        self.port = port
        self.upstream = (upstream_address, upstream_port)
        self.trust_anchors = list(trust_anchors)
        self.root = tempfile.mkdtemp(prefix="stsmilter-unbound-")
        self.config_path = os.path.join(self.root, "unbound.conf")
        self.log_path = os.path.join(self.root, "unbound.log")
        self.proc = None

    def config_text(self):
        lines = [
            "server:",
            f"  interface: {self.address}@{self.port}",
            f"  outgoing-interface: {self.upstream[0]}",
            '  chroot: ""',
            '  username: ""',
            f'  directory: "{self.root}"',
            f'  pidfile: "{self.root}/unbound.pid"',
            f'  logfile: "{self.log_path}"',
            "  use-syslog: no",
            "  verbosity: 1",
            "  val-log-level: 2",
            "  num-threads: 1",
            "  so-reuseport: no",
            "  outgoing-range: 64",
            "  num-queries-per-thread: 32",
            "  msg-cache-size: 1m",
            "  rrset-cache-size: 1m",
            "  do-ip6: no",
            '  module-config: "validator iterator"',
            # Names under test. are "locally served" (RFC 6761) unless told otherwise.
            '  local-zone: "test." nodefault',
            "  do-not-query-localhost: no",
            *(f"  do-not-query-address: {network}" for network in OUTSIDE_LOOPBACK),
            "  qname-minimisation: no",
            "  aggressive-nsec: no",
            "  prefetch: no",
            "  harden-referral-path: no",
            "  target-fetch-policy: \"0 0 0 0 0\"",
            "  access-control: 127.0.0.0/8 allow",
            *(f'  trust-anchor: "{anchor}"' for anchor in self.trust_anchors),
            # Every name goes to the loopback server: no root priming, no root hints.
            "forward-zone:",
            '  name: "."',
            f"  forward-addr: {self.upstream[0]}@{self.upstream[1]}",
            "",
        ]
        return "\n".join(lines)

    def start(self):
        try:
            if self.port is None:
                self.port = free_udp_tcp_port(self.address)
            with open(self.config_path, "w") as f:
                f.write(self.config_text())
            with open(os.path.join(self.root, "stdout.log"), "wb") as out:
                self.proc = subprocess.Popen([UNBOUND, "-d", "-c", self.config_path], stdout=out,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            poll_until(self._answers, START_TIMEOUT, f"unbound on {self.address}:{self.port}",
                       detail=lambda: "; log:\n" + self.log_text()[-3000:])
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"unbound exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
        query = dns.message.make_query("localhost.", "A")
        try:
            dns.query.udp(query, self.address, timeout=0.5, port=self.port)
        except (OSError, dns.exception.Timeout):
            return False
        return True

    def query(self, name, rdtype, timeout=5.0):
        """The resolver's response to a DO query (for tests that inspect the AD bit)."""
        query = dns.message.make_query(name, rdtype, want_dnssec=True)
        return dns.query.udp(query, self.address, timeout=timeout, port=self.port)

    def authenticated(self, name, rdtype):
        return bool(self.query(name, rdtype).flags & dns.flags.AD)

    def log_text(self):
        texts = []
        for name in ("stdout.log", "unbound.log"):
            try:
                with open(os.path.join(self.root, name), errors="replace") as f:
                    texts.append(f.read())
            except OSError:
                pass
        return "\n".join(texts)

    def stop(self):
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
