"""Fixtures: a loopback authoritative DNS server, and stsmilter resolvers pointed at it."""

import pytest

from stsmilter.engine.dns import Resolver
from world.dns_server import DnsServer
from world.sync import Sync

TEST_TIMEOUT = 1.0  # seconds; short so that timeout tests stay fast


@pytest.fixture
def dns_server():
    """A started DnsServer on 127.0.0.1 with an empty zone; stopped at teardown."""
    with DnsServer() as server:
        yield server
    assert not server.errors, f"the test DNS server failed while answering: {server.errors!r}"


@pytest.fixture
def make_resolver(dns_server):
    """make_resolver(timeout=1.0) -> stsmilter.dns.Resolver that asks only dns_server,
    its lookups callable as plain functions (world.sync.Sync)."""

    def make(timeout=TEST_TIMEOUT):
        return Sync(Resolver(nameservers=(dns_server.address,), port=dns_server.port, timeout=timeout))

    return make


@pytest.fixture
def resolver(make_resolver):
    """A stsmilter.dns.Resolver that asks only dns_server, with a 1 s timeout."""
    return make_resolver()
