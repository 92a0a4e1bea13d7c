"""The DANE world: the STS world with a DNSSEC-signed test zone, TLSA records made from
real MX certificates, and a private validating unbound in front of the DNS server.

SCENARIOS is the set the issue asks for (plus two failure cases); publish_scenarios()
puts all of it into the zone and the HTTPS server.
"""

import os

import pytest
import trustme

from world.dnssec import spki_sha256
from world.unbound import UNBOUND, UnboundResolver

SIGNED_APEX = "dnssec.test"  # the resolver's trust anchor is this zone's key
# domain -> (TLSA at _25._tcp.mx.<domain>: "match" | "wrong" | "pkix" | "servfail" | None,
#            MTA-STS policy mx patterns, expected postfix socketmap answer)
SCENARIOS = {
    # DANE and MTA-STS enforce: DANE first.
    "dane.dnssec.test": ("match", ("mx.dane.dnssec.test",), "dane-only"),
    # Signed, MTA-STS, no TLSA: the MTA-STS answer.
    "nodane.dnssec.test": (None, ("mx.nodane.dnssec.test",), "secure match=mx.nodane.dnssec.test servername=hostname"),
    # Unsigned (no trust anchor covers it), TLSA and MTA-STS: the TLSA is not validated.
    "dane.insecure.test": ("match", ("mx.dane.insecure.test",), "secure match=mx.dane.insecure.test servername=hostname"),
    # DANE, and an MTA-STS policy that matches no MX: DANE governs, no mismatch.
    "mismatch.dnssec.test": ("match", ("mx.elsewhere.test",), "dane-only"),
    # Signed, but the only TLSA record is PKIX-EE (unusable for SMTP): MTA-STS.
    "pkix.dnssec.test": ("pkix", ("mx.pkix.dnssec.test",), "secure match=mx.pkix.dnssec.test servername=hostname"),
    # The TLSA lookup fails (SERVFAIL, as for bogus signatures): nothing safe to say.
    "broken.dnssec.test": ("servfail", ("mx.broken.dnssec.test",), None),
}
TEMP_ANSWER = "TEMP DNSSEC lookup for DANE failed"


class DaneWorld:
    def __init__(self, sts_world):
        self.sts = sts_world
        self.dns = sts_world.dns
        self.key = self.dns.sign(SIGNED_APEX)
        self.mx_ca = trustme.CA()  # not in any trust store: only DANE can vouch for these
        self.certs = {}  # MX host -> trustme LeafCert
        self.resolvers = []

    def publish(self, domain, tlsa="match", mx_patterns=None, mx_address="127.0.0.1", **kwargs):
        """MTA-STS (enforce by default) for domain with one MX host, mx.<domain>, whose
        certificate (self.certs) the TLSA record describes as tlsa says."""
        host = f"mx.{domain}"
        self.sts.publish(domain, mx_patterns=mx_patterns or (host,), mx_hosts=[host], **kwargs)
        if mx_address != "127.0.0.1":
            self.dns.remove(host, "A")
            self.dns.add(host, "A", mx_address)
        cert = self.certs[host] = self.mx_ca.issue_cert(host)
        digest = spki_sha256(cert.cert_chain_pems[0].bytes())
        name = f"_25._tcp.{host}"
        if tlsa in ("match", "servfail"):
            self.dns.add(name, "TLSA", f"3 1 1 {digest}")
        elif tlsa == "wrong":
            self.dns.add(name, "TLSA", "3 1 1 " + "ab" * 32)
        elif tlsa == "pkix":
            self.dns.add(name, "TLSA", f"1 1 1 {digest}")
        if tlsa == "servfail":
            self.dns.servfail(name, "TLSA")

    def publish_scenarios(self, **kwargs):
        for domain, (tlsa, patterns, _answer) in SCENARIOS.items():
            self.publish(domain, tlsa, patterns, **kwargs)

    def start_resolver(self, address="127.0.0.1", port=None):
        resolver = UnboundResolver(self.dns.port, [self.key.trust_anchor()], address=address, port=port,
                                   upstream_address=self.dns.address)
        self.resolvers.append(resolver)
        return resolver.start()

    def dns_section(self, resolver):
        """[dns] settings that send stsmilter's queries through resolver."""
        return {"nameservers": resolver.address, "port": str(resolver.port), "timeout": "2"}

    def stop(self):
        for resolver in self.resolvers:
            resolver.stop()


@pytest.fixture
def dane_world(sts_world):
    if not os.path.exists(UNBOUND):
        pytest.skip("unbound is not installed (apt-get install unbound)")
    world = DaneWorld(sts_world)
    yield world
    world.stop()
