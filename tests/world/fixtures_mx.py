"""pytest plugin: MX hosts for the MX TLS check (world/mx_hosts.py), stopped at teardown."""

import pytest

from world.mx_hosts import MxHosts, quiet_aiosmtpd


@pytest.fixture
def mx_hosts(dns_server):
    """An MxHosts on the loopback DNS server: add() hosts, start(); stopped (and its
    temp dir removed) at teardown, also when the test failed. aiosmtpd's tracebacks for
    the handshakes a test fails on purpose are silenced meanwhile."""
    hosts = MxHosts(dns_server)
    with quiet_aiosmtpd():
        try:
            yield hosts
        finally:
            hosts.stop()
