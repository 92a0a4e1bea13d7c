"""Socketmap lookups/s: `stsmilter run`'s [socketmap] vs a static netstring responder,
and with DANE first ([socketmap] dane = auto, the default) vs without (dane = no).

(a) a minimal asyncio.Protocol responder (subprocess) that answers the constant
"OK secure match=..." to every request: the floor cost of any asyncio netstring server
in CPython; (b) `stsmilter run` as shipped (dane = auto) and (c) the same with dane = no
(subprocesses; metrics endpoint and milter enabled, sqlite cache), both resolving through
a private validating unbound in front of the loopback DNS server. 20 published domains:
enforce, testing and none in turn; half of the enforce domains are DNSSEC-signed zones
with TLSA records for their MX host, so (b) answers "OK dane-only" for those and
"OK secure match=..." for the other enforce domains, (c) "OK secure match=..." for all
of them; testing/none: "NOTFOUND ". Policies and DANE verdicts are warmed first.

Same client for all: one process per persistent connection, one request in flight per
connection (as Postfix's socketmap client), cycling through the 20 domains.
Concurrency 1, 4 and 16 connections; three rounds, server order rotating; best round.
Lines: dane_ratio=<dane = auto / dane = no lookups/s at 4 connections> (target >= 0.9:
a warm lookup costs about what it did before DANE), then the headline
socketmap_ratio=<stsmilter as shipped / static lookups/s at 4 connections>.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

DURATION = 2.0
ROUNDS = 3
CONNECTIONS = (1, 4, 16)
NDOMAINS = 20
SERVERS = ("static", "sts", "nodane")  # sts: dane = auto (the default); nodane: dane = no


def publish_dane(world, domains, modes):
    """Sign every other enforce domain as a zone of its own with a TLSA record for its MX
    host; returns (those domains, their trust anchors)."""
    from world.dnssec import spki_sha256

    import trustme

    signed = [d for d in domains if modes[d] == "enforce"][::2]
    ca = trustme.CA()
    anchors = []
    for domain in signed:
        anchors.append(world.dns.sign(domain).trust_anchor())
        cert = ca.issue_cert(f"mx.{domain}")
        world.dns.add(f"_25._tcp.mx.{domain}", "TLSA", "3 1 1 " + spki_sha256(cert.cert_chain_pems[0].bytes()))
    return signed, anchors


def main() -> int:
    from world.unbound import UnboundResolver

    print(f"# socketmap: {common.machine()}")
    with common.bench_session("socketmap") as (root, stack):
        world = common.BenchWorld(root)
        stack.callback(world.stop)
        domains = common.realistic_domains(NDOMAINS, seed=461)
        modes = world.publish(domains)
        signed, anchors = publish_dane(world, domains, modes)
        resolver = UnboundResolver(world.dns.port, anchors)
        stack.callback(resolver.stop)
        resolver.start()
        dns = {"nameservers": resolver.address, "port": str(resolver.port)}
        daemons = {
            "sts": common.StsDaemon(world, root, stack, "sts", dns=dns),
            "nodane": common.StsDaemon(world, root, stack, "nodane", dns=dns, socketmap={"dane": "no"}),
        }
        static, static_port = common.start_static_socketmap(root, stack)

        for name, daemon in daemons.items():
            answers = common.socketmap_warm(daemon.socketmap_port, domains)
            for domain in domains:
                want = b"NOTFOUND "
                if modes[domain] == "enforce":
                    want = b"OK dane-only" if name == "sts" and domain in signed else b"OK secure match="
                if not answers[domain].startswith(want):
                    raise RuntimeError(f"{name}: unexpected answer for {modes[domain]} {domain}: {answers[domain]!r}")
            kinds = {}
            for answer in answers.values():
                kind = answer.split(b" ")[1] if answer.startswith(b"OK") else answer.split(b" ")[0]
                kinds[kind.decode()] = kinds.get(kind.decode(), 0) + 1
            print(f"# {name}: {NDOMAINS} domains warm: " + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())))
        print(f"# e.g. {answers[signed[0]].decode()!r} (nodane) for a domain with DANE")
        print(f"# static answer: {common.STATIC_REPLY_PAYLOAD.decode()!r}")
        before = {name: (d.samples("stsmilter_socketmap_lookups_total"),
                         d.sample("stsmilter_cache_lookups_total", result="miss"),
                         sum(d.samples("stsmilter_dane_checks_total").values()))
                  for name, d in daemons.items()}

        requests = [common.netstring(f"postfix {d}".encode()) for d in domains]
        servers = {"static": (static_port, static.pid)}
        servers.update({name: (d.socketmap_port, d.pid) for name, d in daemons.items()})
        results = {}
        for rnd in range(ROUNDS):
            for conc in CONNECTIONS:
                shift = (rnd + CONNECTIONS.index(conc)) % len(SERVERS)
                for name in SERVERS[shift:] + SERVERS[:shift]:
                    port, pid = servers[name]
                    results.setdefault((name, conc), []).append(
                        common.socketmap_round(port, pid, requests, conc, DURATION))
        for name, daemon in daemons.items():
            lookups, misses, checks = before[name]
            after = daemon.samples("stsmilter_socketmap_lookups_total")
            delta = {k: after.get(k, 0) - lookups.get(k, 0) for k in after}
            print(f"# {name} socketmap answers during the runs: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in sorted(delta.items()) if v))
            misses = daemon.sample("stsmilter_cache_lookups_total", result="miss") - misses
            checks = sum(daemon.samples("stsmilter_dane_checks_total").values()) - checks
            if misses or checks or any(v for k, v in delta.items() if "temp" in k or "perm" in k):
                print(f"# WARNING: {name}: cache misses {misses:.0f}, DANE checks {checks:.0f} or TEMP/PERM "
                      "answers during the runs (the runs were not all warm)")

    print()
    print(f"{'server':6} {'conns':>5} {'lookups/s':>10} {'p50 us':>7} {'p99 us':>7} {'server CPU us/lookup':>21}"
          f" {'client CPU us/lookup':>21}   rounds lookups/s")
    best = {}
    for conc in CONNECTIONS:
        for name in SERVERS:
            runs = results[(name, conc)]
            top = max(runs, key=lambda r: r[0])
            best[(name, conc)] = top
            cpu = sorted(r[3] for r in runs)[len(runs) // 2]
            client = sorted(r[4] for r in runs)[len(runs) // 2]
            print(f"{name:6} {conc:5d} {top[0]:10.0f} {top[1]:7.0f} {top[2]:7.0f} {cpu:21.1f} {client:21.1f}   "
                  + " ".join(f"{r[0]:.0f}" for r in runs))
    print()
    for conc in CONNECTIONS:
        print(f"  {conc:2d} connections: stsmilter/static {best[('sts', conc)][0] / best[('static', conc)][0]:.3f}"
              f"   dane auto/no {best[('sts', conc)][0] / best[('nodane', conc)][0]:.3f}")
    print(f"dane_ratio={best[('sts', 4)][0] / best[('nodane', 4)][0]:.3f}")
    print(f"socketmap_ratio={best[('sts', 4)][0] / best[('static', 4)][0]:.3f}")
    return 0


if __name__ == "__main__":
    common.run_main(main)
