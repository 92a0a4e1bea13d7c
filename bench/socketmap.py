"""Socketmap lookups/s: `stsmilter run`'s [socketmap] vs a static netstring responder.

(a) a minimal asyncio.Protocol responder (subprocess) that answers the constant
"OK secure match=..." to every request: the floor cost of any asyncio netstring server
in CPython; (b) `stsmilter run` (subprocess; metrics endpoint and milter enabled, sqlite
cache) with a warm cache for 20 published domains (enforce: "OK secure match=...";
testing/none: "NOTFOUND "), all warmed before measuring.

Same client for both: one process per persistent connection, one request in flight per
connection (as Postfix's socketmap client), cycling through the 20 domains.
Concurrency 1, 4 and 16 connections; three rounds, A/B order alternating; best round.
Last line: socketmap_ratio=<stsmilter/static lookups/s at 4 connections>.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

DURATION = 2.0
ROUNDS = 3
CONNECTIONS = (1, 4, 16)
NDOMAINS = 20


def main() -> int:
    print(f"# socketmap: {common.machine()}")
    with common.bench_session("socketmap") as (root, stack):
        world = common.BenchWorld(root)
        stack.callback(world.stop)
        domains = common.realistic_domains(NDOMAINS, seed=461)
        modes = world.publish(domains)
        sts = common.StsDaemon(world, root, stack, "sts")
        static, static_port = common.start_static_socketmap(root, stack)

        # Warm: the first lookup of a domain starts discovery and waits up to lookup_timeout.
        answers = {}
        deadline = time.monotonic() + 60
        for domain in domains:
            while True:
                reply = common.socketmap_query(sts.socketmap_port, domain)
                if not reply.startswith(b"TEMP"):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"socketmap kept answering {reply!r} for {domain}")
                time.sleep(0.05)
            answers[domain] = reply
        for domain in domains:
            want_ok = modes[domain] == "enforce"
            if answers[domain].startswith(b"OK secure match=") != want_ok:
                raise RuntimeError(f"unexpected socketmap answer for {modes[domain]} {domain}: {answers[domain]!r}")
        ok = sum(1 for a in answers.values() if a.startswith(b"OK"))
        print(f"# {NDOMAINS} domains warm: {ok} answer OK secure, {NDOMAINS - ok} NOTFOUND; "
              f"e.g. {answers[domains[0]].decode()!r}")
        print(f"# static answer: {common.STATIC_REPLY_PAYLOAD.decode()!r}")
        before = sts.samples("stsmilter_socketmap_lookups_total")
        misses_before = sts.sample("stsmilter_cache_lookups_total", result="miss")

        requests = [common.netstring(f"postfix {d}".encode()) for d in domains]
        servers = {"static": (static_port, static.pid), "sts": (sts.socketmap_port, sts.pid)}
        results = {}
        for rnd in range(ROUNDS):
            for conc in CONNECTIONS:
                order = ("static", "sts") if (rnd + CONNECTIONS.index(conc)) % 2 == 0 else ("sts", "static")
                for name in order:
                    port, pid = servers[name]
                    args = [(port, requests, i * 5) for i in range(conc)]
                    cpu0 = common.cpu_seconds(pid)
                    total, lat, elapsed, client_cpu = common.run_workers(common.socketmap_load, args, DURATION)
                    cpu1 = common.cpu_seconds(pid)
                    results.setdefault((name, conc), []).append((
                        total / elapsed, common.percentile(lat, 50) * 1e6, common.percentile(lat, 99) * 1e6,
                        (cpu1 - cpu0) / total * 1e6, client_cpu / total * 1e6))
        after = sts.samples("stsmilter_socketmap_lookups_total")
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        print("# stsmilter socketmap answers during the runs: "
              + ", ".join(f"{k} {v:.0f}" for k, v in sorted(delta.items()) if v))
        misses = sts.sample("stsmilter_cache_lookups_total", result="miss") - misses_before
        if misses or any(v for k, v in delta.items() if "temp" in k or "perm" in k):
            print(f"# WARNING: cache misses {misses:.0f} or TEMP/PERM answers during the runs")

    print()
    print(f"{'server':6} {'conns':>5} {'lookups/s':>10} {'p50 us':>7} {'p99 us':>7} {'server CPU us/lookup':>21}"
          f" {'client CPU us/lookup':>21}   rounds lookups/s")
    best = {}
    for conc in CONNECTIONS:
        for name in ("static", "sts"):
            runs = results[(name, conc)]
            top = max(runs, key=lambda r: r[0])
            best[(name, conc)] = top
            cpu = sorted(r[3] for r in runs)[len(runs) // 2]
            client = sorted(r[4] for r in runs)[len(runs) // 2]
            print(f"{name:6} {conc:5d} {top[0]:10.0f} {top[1]:7.0f} {top[2]:7.0f} {cpu:21.1f} {client:21.1f}   "
                  + " ".join(f"{r[0]:.0f}" for r in runs))
    print()
    for conc in CONNECTIONS:
        print(f"  {conc:2d} connections: stsmilter/static {best[('sts', conc)][0] / best[('static', conc)][0]:.3f}")
    print(f"socketmap_ratio={best[('sts', 4)][0] / best[('static', 4)][0]:.3f}")
    return 0


if __name__ == "__main__":
    common.run_main(main)
