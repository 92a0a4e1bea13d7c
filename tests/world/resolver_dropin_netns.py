"""postfix-mta-sts-resolver 1.5.1 and stsmilter, with the configuration `stsmilter
import-config` made from the peer's, asked the same questions on the same loopback world.
Run only by tests/system/test_resolver_dropin.py, inside a fresh network namespace (only
loopback: the peer fetches policies from port 443 and nowhere else, and nothing can
leave); not collected on its own (no test_ prefix).

The world: the test DNS server (a free port; the peer reads it from a resolv.conf
bind-mounted in a mount namespace of its own, ``nameserver 127.0.0.1:PORT``), the HTTPS
policy hosts on 127.0.0.1:443 (a private CA: the peer's SSL_CERT_FILE, stsmilter's
[fetch] ca_file). Both daemons: a default map ("postfix") and a zone "strict" with
strict_testing. For every key of TABLE and each map, the answers must be the same, but
for the keys of DIFFERENCES, where they must differ as written there (README.rst,
"Migrating from postfix-mta-sts-resolver", lists them with their reasons).
"""

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stsmilter.cli import import_config
from world.daemon import DaemonProcess, free_port, poll_until, wait_for_port
from world.fixtures_sts import StsWorld, policy_text
from world.https_server import HttpsServer
from world.socketmap_client import ask

pytestmark = pytest.mark.skipif(os.environ.get("STSMILTER_NETNS") != "1",
                                reason="runs inside the network namespace of test_resolver_dropin.py")

PEER_COMMAND = "mta-sts-daemon"  # postfix-mta-sts-resolver, a test dependency (pyproject.toml)
MAPS = ("postfix", "strict")
SECURE = "OK secure match={} servername=hostname"


def peer_yaml(port):
    return f"""\
host: 127.0.0.1
port: {port}
reuse_port: true
shutdown_timeout: 1
cache:
  type: internal
  options:
    cache_size: 10000
default_zone:
  strict_testing: false
  timeout: 4
zones:
  strict:
    strict_testing: true
    timeout: 4
"""


def body(*lines):
    return ("\n".join(lines) + "\n").encode()


# key -> (how to publish it, the answer of both daemons per map). Answers: None for
# NOTFOUND, else the match= patterns (compared as a set: the peer lists them in set order).
TABLE = {}


def case(domain, expected_default, expected_strict=None, **publish):
    TABLE[domain] = (publish, {"postfix": expected_default,
                               "strict": expected_default if expected_strict is None else expected_strict})


case("enforce.dropin.test", {"mx.enforce.dropin.test"})
case("several.dropin.test", {"mx1.several.dropin.test", ".several.dropin.test", "mail.provider.test"},
     mx_patterns=("mx1.{domain}", "*.{domain}", "mail.provider.test"))
case("wildcard.dropin.test", {".mail.wildcard.dropin.test"}, mx_patterns=("*.mail.{domain}",))
case("testing.dropin.test", None, {"mx.testing.dropin.test"}, mode="testing")
case("none.dropin.test", None, mode="none")
case("notxt.dropin.test", None, txt=[])  # the domain and its policy host exist, no TXT
case("nxdomain.dropin.test", None, publish=False)
case("noid.dropin.test", None, txt=["v=STSv1;"])
case("otherversion.dropin.test", None, txt=["v=STSv2; id=1"])
case("tworecords.dropin.test", None, txt=["v=STSv1; id=1", "v=STSv1; id=2"])
case("nospace.dropin.test", {"mx.nospace.dropin.test"}, txt=["v=STSv1;id=20261207"])
case("servfail.dropin.test", None, servfail=True)
case("http404.dropin.test", None, status=404)
case("redirect.dropin.test", None, redirect="https://mta-sts.enforce.dropin.test/.well-known/mta-sts.txt")
case("html.dropin.test", None, content_type="text/html")
case("expired.dropin.test", None, expired=True)
case("untrusted.dropin.test", None, untrusted=True)
case("noversion.dropin.test", None, body=body("mode: enforce", "mx: mx.noversion.dropin.test", "max_age: 86400"))
case("nomaxage.dropin.test", None, body=body("version: STSv1", "mode: enforce", "mx: mx.nomaxage.dropin.test"))
case("badmode.dropin.test", None, body=body("version: STSv1", "mode: Enforce", "mx: mx.badmode.dropin.test",
                                            "max_age: 86400"))
case("nomx.dropin.test", None, body=body("version: STSv1", "mode: enforce", "max_age: 86400"))
# Where the two differ (DIFFERENCES below): their TABLE answers are stsmilter's.
case("badid.dropin.test", None, txt=["v=STSv1; id=not_an-id!"])
case("emptyid.dropin.test", None, txt=["v=STSv1; id="])
case("badpattern.dropin.test", None, body=body("version: STSv1", "mode: enforce", "mx: *.*.badpattern.dropin.test",
                                               "max_age: 86400"))
case("case.dropin.test", {"mx.case.dropin.test"}, body=body("version: STSv1", "mode: enforce",
                                                           "mx: MX.Case.Dropin.Test.", "max_age: 86400"))
case("bigmaxage.dropin.test", {"mx.bigmaxage.dropin.test"},
     body=body("version: STSv1", "mode: enforce", "mx: mx.bigmaxage.dropin.test", "max_age: 31557601"))
# Keys that are not a bare recipient domain (published above)
KEYS = {
    "ENFORCE.Dropin.Test.": {"postfix": {"mx.enforce.dropin.test"}, "strict": {"mx.enforce.dropin.test"}},
    ".enforce.dropin.test": {"postfix": None, "strict": None},  # a parent-domain lookup
    "[127.0.0.1]": {"postfix": None, "strict": None},
    "[enforce.dropin.test]": {"postfix": None, "strict": None},
    "[enforce.dropin.test]:25": {"postfix": None, "strict": None},
}

# (key, map) -> the peer's answer where it differs from stsmilter's (TABLE/KEYS), and why
# (README.rst "Migrating from postfix-mta-sts-resolver" says the same).
DIFFERENCES = {}
for _map in MAPS:
    DIFFERENCES[("badid.dropin.test", _map)] = ({"mx.badid.dropin.test"}, "TXT id not 1-32 letters and digits")
    DIFFERENCES[("emptyid.dropin.test", _map)] = ({"mx.emptyid.dropin.test"}, "TXT id empty")
    DIFFERENCES[("badpattern.dropin.test", _map)] = ({".*.badpattern.dropin.test"}, "invalid mx pattern")
    DIFFERENCES[("case.dropin.test", _map)] = ({"MX.Case.Dropin.Test."}, "mx patterns not canonical")
    DIFFERENCES[("bigmaxage.dropin.test", _map)] = (None, "max_age above 31557600")
    for _key in ("[enforce.dropin.test]", "[enforce.dropin.test]:25"):
        DIFFERENCES[(_key, _map)] = ({"mx.enforce.dropin.test"}, "a next hop [host] is not a recipient domain")


def publish(world, domain, publish=True, servfail=False, **how):
    if not publish:
        return
    if "body" not in how:
        how["body"] = policy_text(how.pop("mode", "enforce"), how.pop("mx_patterns", ("mx.{domain}",)), domain=domain)
    world.publish(domain, **how)
    if servfail:
        world.dns.remove(f"_mta-sts.{domain}", "TXT")
        world.dns.servfail(f"_mta-sts.{domain}", "TXT")


def answer_form(reply):
    """A reply as the table writes it: None (NOTFOUND), the set of match= patterns of a
    "secure" answer, or the reply itself (anything else: TEMP, an answer with more in it)."""
    if reply == "NOTFOUND ":
        return None
    words = reply.split(" ")
    if words[:2] == ["OK", "secure"] and len(words) == 4 and words[2].startswith("match=") \
            and words[3] == "servername=hostname":
        return set(words[2][len("match="):].split(":"))
    return reply


def stsmilter_config(imported, tmp_path, dns_port, ca_file, listen):
    """The imported file with this world's [dns], [fetch], [cache] and [daemon] over it."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(imported)
    overlay = {
        "daemon": {"user": "", "group": "", "pidfile": "", "log": "stderr"},
        "dns": {"nameservers": "127.0.0.1", "port": str(dns_port)},
        "fetch": {"ca_file": ca_file, "allow_private_addresses": "yes"},
        "cache": {"path": str(tmp_path / "cache.sqlite")},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
    }
    for section, values in overlay.items():
        if not parser.has_section(section):
            parser.add_section(section)
        for key, value in values.items():
            parser.set(section, key, value)
    assert parser.get("socketmap", "listen") == listen
    path = tmp_path / "stsmilter.conf"
    with open(path, "w") as f:
        parser.write(f)
    return str(path)


@pytest.fixture
def policy_hosts():
    with HttpsServer(port=443) as server:
        yield server


def test_both_give_the_same_answers(dns_server, policy_hosts, tmp_path):
    peer = shutil.which(PEER_COMMAND, path=os.path.dirname(sys.executable)) or shutil.which(PEER_COMMAND)
    assert peer, f"{PEER_COMMAND} (postfix-mta-sts-resolver, a test dependency) is not installed"
    world = StsWorld(dns_server, policy_hosts, tmp_path)
    for domain, (how, _answers) in TABLE.items():
        publish(world, domain, **how)

    peer_port, stsmilter_port = free_port(), free_port()
    yml = tmp_path / "mta-sts-daemon.yml"
    yml.write_text(peer_yaml(peer_port))
    imported, warnings = import_config.convert(yml.read_text(), str(yml), listen=f"inet:127.0.0.1:{stsmilter_port}")
    assert warnings == []
    conf = stsmilter_config(imported, tmp_path, dns_server.port, policy_hosts.ca_file,
                            f"inet:127.0.0.1:{stsmilter_port}")

    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver 127.0.0.1:{dns_server.port}\noptions timeout:2 attempts:1\n")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["SSL_CERT_FILE"] = policy_hosts.ca_file
    log = open(tmp_path / "peer.log", "wb")
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$1" /etc/resolv.conf && exec "$2" -c "$3" -v warn', "sh", str(resolv), peer, str(yml)]
    peer_proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    daemon = DaemonProcess(conf, str(tmp_path / "stsmilter.log"))
    try:
        daemon.start(wait_port=stsmilter_port)
        wait_for_port(peer_port, _Alive(peer_proc, tmp_path / "peer.log"), timeout=30)
        rows, mismatches = [], []
        questions = [(d, m, a[m]) for d, (_how, a) in TABLE.items() for m in MAPS]
        questions += [(k, m, a[m]) for k, a in KEYS.items() for m in MAPS]
        for key, map_name, expected in questions:
            # stsmilter may answer TEMP while a first lookup is still under way: ask again
            ours = poll_until(lambda: (lambda r: r if not r.startswith("TEMP") else None)(
                ask(stsmilter_port, key, map_name)), 20, f"stsmilter's answer for {key}", interval=0.2)
            theirs = ask(peer_port, key, map_name)
            ours_form, theirs_form = answer_form(ours), answer_form(theirs)
            differs = ours_form != theirs_form
            documented = DIFFERENCES.get((key, map_name))
            rows.append((key, map_name, theirs, ours, "DIFFERS: " + documented[1] if documented else
                         ("DIFFERS, not documented" if differs else "same")))
            if ours_form != expected:
                mismatches.append(f"{key} {map_name}: stsmilter {ours!r}, the table says {expected!r}")
            if documented is None and differs:
                mismatches.append(f"{key} {map_name}: stsmilter {ours!r}, postfix-mta-sts-resolver {theirs!r}")
            if documented is not None and theirs_form != documented[0]:
                mismatches.append(f"{key} {map_name}: postfix-mta-sts-resolver {theirs!r}, documented"
                                  f" {documented[0]!r} ({documented[1]})")
        width = max(len(k) for k, *_ in rows)
        print(f"\nside by side: {len(rows)} questions, postfix-mta-sts-resolver 1.5.1 | stsmilter")
        for key, map_name, theirs, ours, verdict in rows:
            print(f"{key:<{width}} {map_name:<7} | {theirs!r:<62} | {ours!r:<62} | {verdict}")
        same = sum(1 for row in rows if row[4] == "same")
        print(f"same: {same}, documented differences: {len(rows) - same}")
        assert not mismatches, "\n".join(mismatches)
        assert "Traceback" not in daemon.log(), daemon.log()
    finally:
        daemon.stop()
        if peer_proc.poll() is None:
            peer_proc.terminate()
            try:
                peer_proc.wait(10)
            except subprocess.TimeoutExpired:
                peer_proc.kill()
                peer_proc.wait()
        log.close()


class _Alive:
    """wait_for_port()'s view of the peer: fails at once if it exited."""

    def __init__(self, proc, log_path):
        self.proc, self.log_path = proc, log_path

    def poll(self):
        return self.proc.poll()

    @property
    def returncode(self):
        return self.proc.returncode

    def stderr_text(self):
        return Path(self.log_path).read_text(errors="replace")[-3000:]


def test_the_table_is_complete():
    """Every documented difference is a question of the table."""
    keys = set(TABLE) | set(KEYS)
    assert {key for key, _map in DIFFERENCES} <= keys
