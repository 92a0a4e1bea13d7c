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

Then the milter's own CPU per transaction, which the load generator sharing the cores
cannot bound as it bounds throughput: utime+stime of each milter process over a round
(/proc/PID/stat) divided by the transactions, 3 recipients per transaction, warm cache,
4 connections, TCP; CPU_ROUNDS rounds, A/B order alternating; each round gives the ratio
stsmilter/no-op of its two adjacent measurements, and the median of those counts.

With --probe, stsmilter runs with the MX TLS check on ([probe] enabled = yes) and warm
results: one aiosmtpd on 127.0.0.1 offers STARTTLS with a certificate for every MX name
(a private trustme CA as [probe] ca_file), each enforce and testing domain's MX host is
checked during the warm-up, and the ratios then measure the milter with a result per MX
host in memory (the lock-free peek of engine/mxtls.py); a warning is printed if any MX
host was checked again during the runs.

Last two lines: milter_overhead_ratio=<stsmilter/noop transactions/s at concurrency 4,
TCP> and milter_cpu_ratio=<stsmilter/noop milter CPU per transaction, median round>.
Options: --cpu-only (skip the throughput table), --cpu-rounds N, --probe.
"""

import argparse
import os
import ssl
import statistics
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
CPU_RCPTS = 3
CPU_CONCURRENCY = 4
CPU_DURATION = 2.0  # CPU time is read in clock ticks (10 ms): 60-100 ticks per round
CPU_ROUNDS = 15  # the machine is shared: single rounds range 0.8-1.6


def warm(spec, transactions):
    plans = {}
    for tx in transactions:
        _, refused = common.play(spec, tx, plans)
        if refused:
            raise RuntimeError(f"stsmilter refused a warm-up transaction on {spec}")
        plans.clear()


def decisions(daemon):
    return daemon.samples("stsmilter_decisions_total")


def start_mx_host(root, stack, world):
    """One SMTP server with STARTTLS for every published domain's MX host (all resolve to
    127.0.0.1): the [probe] section that checks against it."""
    import trustme

    from world.smtp_peers import SmtpSink

    ca = trustme.CA()
    ca_file = root / "mx-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(f"mx.{domain}" for domain in world.modes)).configure_cert(context)
    sink = SmtpSink(host=common.LOOPBACK, tls_context=context, hostname="mx.bench.example")
    stack.callback(sink.stop)
    sink.start()
    return {"enabled": "yes", "port": str(sink.port), "helo_name": "bench.stsmilter.test", "ca_file": str(ca_file),
            "timeout": "5"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cpu-only", action="store_true", help="only the milter CPU rounds")
    parser.add_argument("--cpu-rounds", type=int, default=CPU_ROUNDS, metavar="N")
    parser.add_argument("--probe", action="store_true", help="stsmilter with [probe] enabled and warm MX TLS results")
    args = parser.parse_args()
    print(f"# milter_overhead: {common.machine()}" + (" (--probe: MX TLS check on, results warm)" if args.probe else ""))
    with common.bench_session("milter") as (root, stack):
        world = common.BenchWorld(root)
        stack.callback(world.stop)
        domains = common.realistic_domains(NDOMAINS, seed=25)
        modes = world.publish(domains)
        counts = {m: list(modes.values()).count(m) for m in ("enforce", "testing", "none")}
        print(f"# world: {NDOMAINS} domains {counts}, DNS :{world.dns.port}, HTTPS :{world.https.port}")

        probe = {"probe": start_mx_host(root, stack, world)} if args.probe else {}
        checked = NDOMAINS - counts["none"]  # one MX host per enforce and testing domain

        transports = ("tcp",) if args.cpu_only else ("tcp", "unix")
        specs = {
            ("noop", "tcp"): f"inet:{common.free_port()}@127.0.0.1",
            ("noop", "unix"): f"unix:{root}/noop.sock",
            ("sts", "tcp"): f"inet:{common.free_port()}@127.0.0.1",
            ("sts", "unix"): f"unix:{root}/sts.sock",
        }
        pids, daemons = {}, {}
        for transport in transports:
            noop = common.start_noop_milter(root, stack, specs[("noop", transport)], f"noop-{transport}")
            pids[("noop", transport)] = noop.pid
            sts = common.StsDaemon(world, root, stack, f"sts-{transport}", milter_spec=specs[("sts", transport)],
                                   **probe)
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
            if args.probe:
                common.wait_for(lambda: daemon.sample("stsmilter_mx_checks_total", result="ok") >= checked,
                                30, f"{checked} MX TLS checks by sts-{transport}")
        warmed_at = [time.monotonic()]
        before = {t: decisions(d) for t, d in daemons.items()}
        probes_before = {t: sum(d.samples("stsmilter_mx_checks_total").values()) for t, d in daemons.items()}

        def measure(milter, transport, conc, txs, duration):
            """(tx/s, p50 ms, p99 ms, milter CPU us/tx, driver CPU us/tx) of one run."""
            if milter == "sts" and time.monotonic() - warmed_at[0] > REWARM_AFTER:
                for t in daemons:
                    warm(specs[("sts", t)], cover)
                warmed_at[0] = time.monotonic()
            spec, pid = specs[(milter, transport)], pids[(milter, transport)]
            loads = [(spec, txs, i * 7) for i in range(conc)]
            cpu0 = common.cpu_seconds(pid)
            total, lat, elapsed, client_cpu = common.run_workers(common.milter_load, loads, duration)
            cpu1 = common.cpu_seconds(pid)
            return (total / elapsed, common.percentile(lat, 50) * 1e3, common.percentile(lat, 99) * 1e3,
                    (cpu1 - cpu0) / total * 1e6, client_cpu / total * 1e6)

        results = {}  # (milter, transport, conc) -> list of measure() tuples
        if not args.cpu_only:
            for rnd in range(ROUNDS):
                for transport in transports:
                    for conc in CONCURRENCY:
                        order = ("noop", "sts") if (rnd + CONCURRENCY.index(conc)) % 2 == 0 else ("sts", "noop")
                        for milter in order:
                            results.setdefault((milter, transport, conc), []).append(
                                measure(milter, transport, conc, transactions, DURATION))

        cpu_transactions = common.make_transactions(domains, 60, rcpts_per=CPU_RCPTS, seed=3)
        cpu_rounds = []  # (noop run, sts run) per round
        for rnd in range(args.cpu_rounds):
            order = ("noop", "sts") if rnd % 2 == 0 else ("sts", "noop")
            run = {m: measure(m, "tcp", CPU_CONCURRENCY, cpu_transactions, CPU_DURATION) for m in order}
            cpu_rounds.append((run["noop"], run["sts"]))

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
            if args.probe:
                probes = sum(daemon.samples("stsmilter_mx_checks_total").values())
                by_result = {k: v for k, v in daemon.samples("stsmilter_mx_checks_total").items() if v}
                print(f"# sts-{transport}: MX TLS checks {by_result}")
                if probes != probes_before[transport] or probes != checked:
                    print(f"# WARNING sts-{transport}: {probes - probes_before[transport]:.0f} MX TLS checks"
                          f" during the runs ({probes:.0f} in all, {checked} expected)")
            for line in daemon.proc.log().splitlines():
                if " ERROR " in line or "Traceback" in line:
                    print(f"# WARNING sts-{transport} log: {line[:200]}")
                    break

    headline = None
    if not args.cpu_only:
        headline = throughput_report(results)

    print()
    print(f"milter CPU per transaction: {CPU_RCPTS} recipients, {CPU_CONCURRENCY} connections, TCP, "
          f"{CPU_DURATION:.0f} s rounds (A/B order alternating)")
    print(f"{'round':>5} {'noop us/tx':>10} {'sts us/tx':>10} {'ratio':>6} {'noop tx/s':>9} {'sts tx/s':>9} "
          f"{'driver us/tx':>12}")
    ratios = []
    for rnd, (noop, sts) in enumerate(cpu_rounds, 1):
        ratios.append(sts[3] / noop[3])
        print(f"{rnd:5d} {noop[3]:10.0f} {sts[3]:10.0f} {ratios[-1]:6.3f} {noop[0]:9.0f} {sts[0]:9.0f} "
              f"{(noop[4] + sts[4]) / 2:12.0f}")
    noop_median = statistics.median(r[0][3] for r in cpu_rounds)
    sts_median = statistics.median(r[1][3] for r in cpu_rounds)
    cpu_ratio = statistics.median(ratios)
    print(f"median: no-op {noop_median:.0f} us/tx, stsmilter {sts_median:.0f} us/tx; "
          f"ratio per round {min(ratios):.3f}-{max(ratios):.3f}, median {cpu_ratio:.3f}")
    if headline is not None:
        print(f"milter_overhead_ratio={headline:.3f}")
    print(f"milter_cpu_ratio={cpu_ratio:.3f}")
    return 0


def throughput_report(results) -> float:
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
    print("ratios stsmilter/noop (best-of-rounds throughput; CPU ratio = stsmilter milter CPU/tx over noop's):")
    for transport in ("tcp", "unix"):
        for conc in CONCURRENCY:
            s, n = results[("sts", transport, conc)], results[("noop", transport, conc)]
            ratio = best[("sts", transport, conc)][0] / best[("noop", transport, conc)][0]
            cpu_s = sorted(r[3] for r in s)[len(s) // 2]
            cpu_n = sorted(r[3] for r in n)[len(n) // 2]
            print(f"  {transport:4} conc {conc:2d}: throughput ratio {ratio:.3f}   milter CPU ratio {cpu_s / cpu_n:.3f}")
    return best[("sts", "tcp", 4)][0] / best[("noop", "tcp", 4)][0]


if __name__ == "__main__":
    common.run_main(main)
