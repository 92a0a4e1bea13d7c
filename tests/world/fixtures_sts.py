"""The MTA-STS world: the loopback DNS server and HTTPS policy host server together,
with helpers to publish a domain's policy and to write a stsmilter config that uses
them (and nothing else)."""

import os
import subprocess
import sys

import pytest

ENFORCE = "version: STSv1\nmode: enforce\n{mx}max_age: 86400\n"


def policy_text(mode="enforce", mx=("mx.{domain}",), max_age=86400, domain=""):
    lines = ["version: STSv1", f"mode: {mode}"]
    lines += [f"mx: {m.format(domain=domain)}" for m in mx]
    lines.append(f"max_age: {max_age}")
    return ("\n".join(lines) + "\n").encode()


class StsWorld:
    def __init__(self, dns_server, https_server, tmp_path):
        self.dns = dns_server
        self.https = https_server
        self.tmp_path = tmp_path

    def publish(self, domain, policy_id="id1", body=None, mode="enforce", mx_patterns=("mx.{domain}",),
                mx_hosts=None, txt=None, txt_ttl=300, **misbehaviour):
        """TXT _mta-sts.<domain> (TTL txt_ttl), A mta-sts.<domain> -> 127.0.0.1, the domain's MX
        hosts, and the policy file on the HTTPS server (with optional misbehaviour)."""
        if txt is None:
            txt = [f"v=STSv1; id={policy_id}"]
        for record in txt:
            self.dns.add(f"_mta-sts.{domain}", "TXT", record, ttl=txt_ttl)
        self.dns.add(f"mta-sts.{domain}", "A", "127.0.0.1")
        for host in mx_hosts if mx_hosts is not None else [f"mx.{domain}"]:
            self.dns.add(domain, "MX", f"10 {host}.")
            self.dns.add(host, "A", "127.0.0.1")
        if body is None:
            body = policy_text(mode, mx_patterns, domain=domain)
        self.https.serve(f"mta-sts.{domain}", body, **misbehaviour)

    def set_txt_id(self, domain, policy_id, txt_ttl=300):
        self.dns.remove(f"_mta-sts.{domain}", "TXT")
        self.dns.add(f"_mta-sts.{domain}", "TXT", f"v=STSv1; id={policy_id}", ttl=txt_ttl)

    def config_text(self, cache_path=None, **sections):
        """A complete config for this world; sections={'milter': {'dry_run': 'yes'}} overrides."""
        base = {
            "daemon": {"log": "stderr", "log_level": "info", "user": "", "group": "",
                       "pidfile": ""},
            "dns": {"nameservers": "127.0.0.1", "port": str(self.dns.port), "timeout": "1"},
            "fetch": {"port": str(self.https.port), "ca_file": self.https.ca_file,
                      "allow_private_addresses": "yes", "timeout": "2"},
            "cache": {"path": cache_path if cache_path is not None else str(self.tmp_path / "cache.sqlite")},
            "metrics": {"listen": ""},
            "socketmap": {"listen": ""},
        }
        for name, values in sections.items():
            base.setdefault(name, {}).update(values)
        out = []
        for name, values in base.items():
            out.append(f"[{name}]")
            out += [f"{k} = {v}" for k, v in values.items()]
        return "\n".join(out) + "\n"

    def write_config(self, name="stsmilter.conf", **kwargs):
        path = self.tmp_path / name
        path.write_text(self.config_text(**kwargs))
        return str(path)

    def cli(self, *args, timeout=30):
        """Run `python -m stsmilter ARGS` in a subprocess; returns CompletedProcess."""
        env = dict(os.environ)
        env.pop("SSL_CERT_FILE", None)
        return subprocess.run([sys.executable, "-m", "stsmilter", *args], capture_output=True, text=True,
                              timeout=timeout, env=env)


@pytest.fixture
def sts_world(dns_server, https_server, tmp_path):
    return StsWorld(dns_server, https_server, tmp_path)
