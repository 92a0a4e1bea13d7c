"""DNSSEC for the loopback DNS server: a zone key that signs RRsets on the fly, NSEC
proofs of non-existence, and TLSA helpers.

Uses only what dnspython 2.3 (Debian 12) already has: dns.dnssec.make_dnskey, sign and
make_ds (sign_zone came later). One ECDSA P-256 key per signed apex serves as KSK and
ZSK: quick to generate, and what a validating resolver needs to check the chain from the
trust anchor it is given for that apex.
"""

import hashlib
import time

import dns.dnssec
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

SIGNATURE_VALIDITY = 7 * 86400
CLOCK_SKEW = 3600  # inception in the past, so that a resolver a little ahead still accepts
NSEC_TTL = 60  # RFC 4034 §4: the SOA minimum


class ZoneKey:
    def __init__(self, apex, ttl=300):
        self.apex = apex if isinstance(apex, dns.name.Name) else dns.name.from_text(apex)
        self.ttl = ttl
        self._private = ec.generate_private_key(ec.SECP256R1())
        self.dnskey = dns.dnssec.make_dnskey(self._private.public_key(), dns.dnssec.Algorithm.ECDSAP256SHA256,
                                             flags=257)  # ZONE | SEP

    def trust_anchor(self):
        """The DNSKEY as a zone-file line, for unbound's trust-anchor: option."""
        return f"{self.apex.to_text()} {self.ttl} IN DNSKEY {self.dnskey.to_text()}"

    def ds(self):
        return dns.dnssec.make_ds(self.apex, self.dnskey, "SHA256")

    def rrsig(self, rrset):
        """The RRSIG RRset for rrset, signed now."""
        now = int(time.time())
        signature = dns.dnssec.sign(rrset, self._private, self.apex, self.dnskey,
                                    inception=now - CLOCK_SKEW, expiration=now + SIGNATURE_VALIDITY)
        signed = dns.rrset.RRset(rrset.name, dns.rdataclass.IN, dns.rdatatype.RRSIG, rrset.rdtype)
        signed.add(signature, rrset.ttl)
        return signed


def nsec_proof(owners, apex, name, nxdomain):
    """NSEC RRsets proving that name has no data of the asked type (nxdomain False) or does
    not exist (True). owners: {owner name: set of rdtypes} for every owner in the zone."""
    chain = sorted(owners)

    def nsec(owner):
        following = chain[(chain.index(owner) + 1) % len(chain)]
        types = sorted({dns.rdatatype.to_text(t) for t in owners[owner]} | {"RRSIG", "NSEC"})
        rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.NSEC, f"{following.to_text()} {' '.join(types)}")
        return dns.rrset.from_rdata(owner, NSEC_TTL, rdata)

    def covering(target):
        return nsec(max(owner for owner in chain if owner < target))

    if not nxdomain:
        return [nsec(name) if name in owners else covering(name)]  # no such type / empty non-terminal
    encloser = name.parent()
    while encloser != apex and not any(owner.is_subdomain(encloser) for owner in chain):
        encloser = encloser.parent()
    proofs = [covering(name)]
    wildcard = covering(dns.name.Name((b"*",) + encloser.labels))
    if wildcard != proofs[0]:
        proofs.append(wildcard)
    return proofs


def spki_sha256(cert_pem):
    """The data of a "3 1 1" TLSA record for this PEM certificate (DANE-EE, SPKI, SHA2-256)."""
    from cryptography import x509

    certificate = x509.load_pem_x509_certificate(cert_pem)
    spki = certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()
