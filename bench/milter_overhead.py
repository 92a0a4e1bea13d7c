"""Milter protocol overhead: stsmilter vs a no-op pymilter milter, same driver, same run.

A protocol-level MTA-side driver (bench/common.py: pre-encoded packets, one milter
connection per message, as Postfix does for one message per SMTP session) plays full
transactions: OPTNEG, CONNECT with {daemon_name}, MAIL with {auth_authen} (empty) and i,
four RCPTs over three domains with {rcpt_mailer}=smtp, DATA, headers, EOM, QUIT. Steps
the milter negotiates away are not sent and no-reply steps are not waited for, exactly as
negotiated (both milters negotiate the same bits: same callbacks, same decorators).

(a) the no-op milter (Milter.Base answering CONTINUE), (b) `stsmilter run` with a warm
cache for every domain (20 published enforce/testing/none domains whose MX match; sqlite
cache, metrics and socketmap enabled, info logging to a file, as in production).

Concurrency 1, 4, 16 (one driver process per connection), TCP and unix socket; three
rounds, A/B order alternating each round; the best round of each configuration counts.
Last line: milter_overhead_ratio=<stsmilter/noop transactions/s at concurrency 4, TCP>.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

DURATION = 2.0
ROUNDS = 3
CONCURRENCY = (1, 4, 16)
NDOMAINS = 20
RCPTS = 4
REWARM_AFTER = 200.0  # seconds; the MX cache lives min(DNS TTL, mx_ttl) = 300 s


def warm(spec, transactions):
    plans = {}
    for tx in transactions:
        _, refused = common.play(spec, tx, plans)
        if refused:
            raise RuntimeError(f"stsmilter refused a warm-up transaction on {spec}")
        plans.clear()


def decisions(daemon):
    return daemon.samples("stsmilter_decisions_total")


def main() -> int:
    print(f"# milter_overhead: {common.machine()}")
    with common.bench_session("milter") as (root, stack):
        world = common.BenchWorld(root)
        stack.callback(world.stop)
        domains = common.realistic_domains(NDOMAINS, seed=25)
        modes = world.publish(domains)
        counts = {m: list(modes.values()).count(m) for m in ("enforce", "testing", "none")}
        print(f"# world: {NDOMAINS} domains {counts}, DNS :{world.dns.port}, HTTPS :{world.https.port}")

        specs = {
            ("noop", "tcp"): f"inet:{common.free_port()}@127.0.0.1",
            ("noop", "unix"): f"unix:{root}/noop.sock",
            ("sts", "tcp"): f"inet:{common.free_port()}@127.0.0.1",
            ("sts", "unix"): f"unix:{root}/sts.sock",
        }
        pids, daemons = {}, {}
        for transport in ("tcp", "unix"):
            noop = common.start_noop_milter(root, stack, specs[("noop", transport)], f"noop-{transport}")
            pids[("noop", transport)] = noop.pid
            sts = common.StsDaemon(world, root, stack, f"sts-{transport}", milter_spec=specs[("sts", transport)])
            pids[("sts", transport)] = sts.pid
            daemons[transport] = sts

        transactions = common.make_transactions(domains, 60, rcpts_per=RCPTS)
        cover = transactions[: (NDOMAINS + RCPTS - 2) // (RCPTS - 1)]  # every domain once
        # Warm: the first pass waits for the fetches (lookup_timeout 5 s, on_pending accept).
        for transport, daemon in daemons.items():
            warm(specs[("sts", transport)], cover)
            common.wait_for(lambda: daemon.sample("stsmilter_policy_fetches_total", result="ok") >= NDOMAINS,
                            30, f"{NDOMAINS} policy fetches by sts-{transport}")
            warm(specs[("sts", transport)], cover)
        warmed_at = time.monotonic()
        before = {t: decisions(d) for t, d in daemons.items()}

        results = {}  # (milter, transport, conc) -> list of (tps, p50, p99, milter cpu/tx, client cpu/tx)
        for rnd in range(ROUNDS):
            for transport in ("tcp", "unix"):
                for conc in CONCURRENCY:
                    order = ("noop", "sts") if (rnd + CONCURRENCY.index(conc)) % 2 == 0 else ("sts", "noop")
                    for milter in order:
                        if milter == "sts" and time.monotonic() - warmed_at > REWARM_AFTER:
                            for t, d in daemons.items():
                                warm(specs[("sts", t)], cover)
                            warmed_at = time.monotonic()
                        spec, pid = specs[(milter, transport)], pids[(milter, transport)]
                        args = [(spec, transactions, i * 7) for i in range(conc)]
                        cpu0 = common.cpu_seconds(pid)
                        total, lat, elapsed, client_cpu = common.run_workers(common.milter_load, args, DURATION)
                        cpu1 = common.cpu_seconds(pid)
                        results.setdefault((milter, transport, conc), []).append((
                            total / elapsed,
                            common.percentile(lat, 50) * 1e3,
                            common.percentile(lat, 99) * 1e3,
                            (cpu1 - cpu0) / total * 1e6,
                            client_cpu / total * 1e6,
                        ))

        # sanity: every measured recipient got a real decision from a warm cache
        for transport, daemon in daemons.items():
            after = decisions(daemon)
            delta = {k: after.get(k, 0) - before[transport].get(k, 0) for k in after}
            delta = {k: v for k, v in delta.items() if v}
            bad = {k: v for k, v in delta.items() if 'reason="mx-match"' not in k and 'reason="mode-none"' not in k}
            total = sum(delta.values())
            print(f"# sts-{transport}: {total:.0f} recipient decisions during the runs, "
                  f"{sum(v for k, v in delta.items() if 'mx-match' in k):.0f} mx-match, "
                  f"{sum(v for k, v in delta.items() if 'mode-none' in k):.0f} mode-none")
            if bad:
                print(f"# WARNING sts-{transport}: unexpected decisions {bad}")
            for line in daemon.proc.log().splitlines():
                if " ERROR " in line or "Traceback" in line:
                    print(f"# WARNING sts-{transport} log: {line[:200]}")
                    break

    print()
    print(f"{'milter':6} {'sock':4} {'conc':>4} {'tx/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'milter CPU us/tx':>16} {'driver CPU us/tx':>16}   rounds tx/s")
    best = {}
    for transport in ("tcp", "unix"):
        for conc in CONCURRENCY:
            for milter in ("noop", "sts"):
                runs = results[(milter, transport, conc)]
                top = max(runs, key=lambda r: r[0])
                best[(milter, transport, conc)] = top
                cpu = sorted(r[3] for r in runs)[len(runs) // 2]
                client = sorted(r[4] for r in runs)[len(runs) // 2]
                print(f"{milter:6} {transport:4} {conc:4d} {top[0]:8.0f} {top[1]:7.2f} {top[2]:7.2f} "
                      f"{cpu:16.0f} {client:16.0f}   " + " ".join(f"{r[0]:.0f}" for r in runs))
    print()
    print("ratios stsmilter/noop (best-of-rounds throughput; CPU ratio = noop milter CPU/tx over stsmilter's):")
    for transport in ("tcp", "unix"):
        for conc in CONCURRENCY:
            s, n = results[("sts", transport, conc)], results[("noop", transport, conc)]
            ratio = best[("sts", transport, conc)][0] / best[("noop", transport, conc)][0]
            cpu_s = sorted(r[3] for r in s)[len(s) // 2]
            cpu_n = sorted(r[3] for r in n)[len(n) // 2]
            print(f"  {transport:4} conc {conc:2d}: throughput ratio {ratio:.3f}   milter CPU ratio {cpu_n / cpu_s:.3f}")
    headline = best[("sts", "tcp", 4)][0] / best[("noop", "tcp", 4)][0]
    print(f"milter_overhead_ratio={headline:.3f}")
    return 0


if __name__ == "__main__":
    common.run_main(main)
