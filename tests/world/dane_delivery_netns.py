"""Real Postfix deliveries with DANE first. Run only by
tests/system/test_dane_postfix.py::test_postfix_delivers_over_dane_in_a_network_namespace, inside
a fresh network namespace (only loopback) whose /etc/resolv.conf names unbound on
127.0.0.1:53 with "options trust-ad"; not collected on its own (no test_ prefix).

Postfix: smtp_dns_support_level = dnssec, default level "may", the socketmap as
smtp_tls_policy_maps, and a CA file holding the MX certificates' CA, so that WebPKI
verification ("secure") would succeed wherever a certificate names its MX host. Domains:

  dane.dnssec.test      TLSA matches, policy matches  -> dane-only, delivered over DANE
  mismatch.dnssec.test  TLSA matches, policy does not -> dane-only, delivered over DANE
                        (MTA-STS alone would defer: "secure match=" names no MX of it)
  wrongtlsa.dnssec.test TLSA does not match the certificate, policy matches, the
                        certificate is WebPKI-valid -> dane-only, deferred: MTA-STS
                        ("secure") would have delivered, overriding a failing DANE check
  nodane.dnssec.test    signed, no TLSA -> secure, delivered with WebPKI verification
"""

import os
import ssl

import pytest

from world.smtp_peers import SmtpSink

pytestmark = pytest.mark.skipif(os.environ.get("STSMILTER_NETNS") != "1",
                                reason="runs inside the network namespace of test_dane_postfix.py")

DOMAINS = {  # domain -> (MX address, TLSA, policy mx patterns)
    "dane.dnssec.test": ("127.0.0.2", "match", None),
    "mismatch.dnssec.test": ("127.0.0.3", "match", ("mx.elsewhere.test",)),
    "wrongtlsa.dnssec.test": ("127.0.0.4", "wrong", None),
    "nodane.dnssec.test": ("127.0.0.5", None, None),
}


def test_delivery_over_dane(dane_world, start_daemon, postfix_factory):
    sinks = {}
    try:
        for domain, (address, tlsa, patterns) in DOMAINS.items():
            dane_world.publish(domain, tlsa=tlsa, mx_patterns=patterns, mx_address=address)
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            dane_world.certs[f"mx.{domain}"].configure_cert(context)
            sinks[domain] = SmtpSink(host=address, port=25, tls_context=context,
                                     hostname=f"mx.{domain}").start()
        resolver = dane_world.start_resolver(port=53)
        daemon = start_daemon(dns=dane_world.dns_section(resolver))
        ca_file = os.path.join(dane_world.sts.tmp_path, "mx-ca.pem")
        dane_world.mx_ca.cert_pem.write_to_path(ca_file)
        os.chmod(ca_file, 0o644)
        postfix = postfix_factory(main_cf_extra={
            "smtp_dns_support_level": "dnssec",
            "smtp_host_lookup": "dns",
            "smtp_tls_security_level": "may",
            "smtp_tls_policy_maps": f"socketmap:inet:127.0.0.1:{daemon.socketmap_port}:postfix",
            "smtp_tls_CAfile": ca_file,
            "smtp_tls_loglevel": "1",
        })
        for domain in DOMAINS:
            result = postfix.send("alice@sender.stsmilter.test", [f"bob@{domain}"], f"Subject: to {domain}\n\nhi\n")
            assert result.rcpt[f"bob@{domain}"].code == 250

        for domain in ("dane.dnssec.test", "mismatch.dnssec.test", "nodane.dnssec.test"):
            message = sinks[domain].wait_for(1, timeout=60)[0]
            assert message.tls and message.rcpt_tos == (f"bob@{domain}",)
        postfix.wait_for_log(r"to=<bob@wrongtlsa\.dnssec\.test>.*status=deferred \(Server certificate not verified",
                             timeout=60)
        assert sinks["wrongtlsa.dnssec.test"].messages == []
        text = postfix.log_text()
        # Postfix's own words: DANE authenticated the first two, WebPKI the last; the
        # WebPKI-valid certificate of the third was refused for its TLSA records.
        for domain in ("dane.dnssec.test", "mismatch.dnssec.test", "nodane.dnssec.test"):
            assert f"Verified TLS connection established to mx.{domain}" in text, text[-4000:]
        assert ("server certificate verification failed for mx.wrongtlsa.dnssec.test[127.0.0.4]:25:"
                " num=65:no matching DANE TLSA records") in text
        assert "Traceback" not in daemon.log()
    finally:
        for sink in sinks.values():
            sink.stop()
