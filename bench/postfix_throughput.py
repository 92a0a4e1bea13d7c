"""Messages/s through a real private Postfix: no-op milter vs `stsmilter run`, same run.

Three private Postfix 3.7 instances (tests/world/postfix.py) relay to one `smtp-sink`:
one without a milter (context only), one with the no-op pymilter milter, one with
`stsmilter run` (warm cache, metrics and socketmap enabled, info logging), all over TCP
(`smtpd_milters = inet:127.0.0.1:PORT`, milter_default_action = tempfail).

Load: four `smtp-source` processes at once (one SMTP session each, one message per
session, 1 KB body, one recipient), on an enforce, a testing, a none and another enforce
domain, rotating over the 20 published domains.

What is measured: ACCEPTANCE, i.e. messages/s from the first connection until every
smtp-source has had its last message accepted (250 after DATA). The milter's cost is
paid at acceptance; delivery to the sink is the same work in every configuration, so
it is reported for context only (delivered/s: until every message reached the sink).
The next run starts only once the previous run's messages have all been delivered, so
runs do not overlap. `in_flow_delay = 0`: otherwise smtpd stalls acceptance whenever
delivery lags behind, coupling the two figures.

Five rounds, order rotating each round; the best round per configuration counts.
Last line: postfix_ratio=<stsmilter/noop accepted messages/s>.
"""

import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ROUNDS = 5
SOURCES = 4  # smtp-source processes (= concurrent SMTP sessions)
PER_SOURCE = 300  # messages per smtp-source per run
NDOMAINS = 20


class LogCounter:
    """Counts 'status=sent' lines in a Postfix maillog, reading only what is new."""

    def __init__(self, path):
        self.path = path
        self.offset = 0
        self.sent = 0
        self.tail = b""

    def update(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.sent
        self.offset += len(data)
        data = self.tail + data
        lines = data.split(b"\n")
        self.tail = lines.pop()
        self.sent += sum(1 for line in lines if b" status=sent " in line)
        return self.sent


def run_load(instance, rcpt_domains, tag):
    argv_base = ["smtp-source", "-s", "1", "-m", str(PER_SOURCE), "-l", "1024", "-M", "client.bench.test",
                 "-f", "sender@corp.bench.test"]
    procs = []
    t0 = time.monotonic()
    try:
        for i, domain in enumerate(rcpt_domains):
            argv = argv_base + ["-t", f"user{i}@{domain}", f"127.0.0.1:{instance.smtpd_port}"]
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        outputs = []
        for p in procs:
            out, _ = p.communicate(timeout=120)
            outputs.append((p.returncode, out.decode(errors="replace")))
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [(rc, out) for rc, out in outputs if rc != 0]
    if failed:
        raise RuntimeError(f"{tag}: smtp-source failed: {failed[0][1][-500:]}\n{instance.log_tail()}")
    return elapsed, t0


def main() -> int:
    from world.postfix import PostfixInstance

    print(f"# postfix_throughput: {common.machine()}")
    postfix_version = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True,
                                     text=True).stdout.strip()
    print(f"# Postfix {postfix_version}; {SOURCES} smtp-source x {PER_SOURCE} messages per run, 1 KB, 1 rcpt")
    with common.bench_session("postfix") as (root, stack):
        world = common.BenchWorld(root)
        stack.callback(world.stop)
        domains = common.realistic_domains(NDOMAINS, seed=95)
        modes = world.publish(domains)
        by_mode = {m: [d for d in domains if modes[d] == m] for m in ("enforce", "testing", "none")}

        sink_port = common.free_port()
        sink = common.Subprocess(["smtp-sink", "-u", "postfix", f"127.0.0.1:{sink_port}", "1000"],
                                 root / "smtp-sink.log")
        stack.callback(sink.stop)
        common.wait_for(lambda: sink.check_alive("smtp-sink") and common.port_listening(sink_port), 10,
                        "smtp-sink")

        noop_spec = f"inet:{common.free_port()}@127.0.0.1"
        noop = common.start_noop_milter(root, stack, noop_spec)
        sts = common.StsDaemon(world, root, stack, "sts")
        sts_spec = sts.milter_spec

        def milter_for_postfix(spec):
            port, _, host = spec.split(":", 1)[1].partition("@")
            return f"inet:{host}:{port}"

        instances, counters = {}, {}
        for name, milter in (("none", None), ("noop", milter_for_postfix(noop_spec)),
                             ("sts", milter_for_postfix(sts_spec))):
            inst = PostfixInstance(root, relay=("127.0.0.1", sink_port), milter=milter,
                                   main_cf_extra={"in_flow_delay": "0"})
            stack.callback(inst.stop)
            inst.start()
            instances[name] = inst
            counters[name] = LogCounter(inst.log_file)

        def rcpt_domains(run_index):
            k = run_index
            return [by_mode["enforce"][k % len(by_mode["enforce"])], by_mode["testing"][k % len(by_mode["testing"])],
                    by_mode["none"][k % len(by_mode["none"])],
                    by_mode["enforce"][(k + 3) % len(by_mode["enforce"])]][:SOURCES]

        # Warm stsmilter's cache (and every instance's own caches) with every domain.
        for name, inst in instances.items():
            for d in domains:
                result = inst.send("sender@corp.bench.test", [f"warm@{d}"])
                if not result.accepted and name != "sts":
                    raise RuntimeError(f"warm-up refused by {name}: {result}")
        common.wait_for(lambda: sts.sample("stsmilter_policy_fetches_total", result="ok") >= NDOMAINS, 30,
                        "stsmilter policy fetches")
        for d in domains:  # a pass that must now be decided from the cache
            result = instances["sts"].send("sender@corp.bench.test", [f"warm@{d}"])
            if not result.accepted:
                raise RuntimeError(f"warm-up refused by stsmilter: {result}")
        expected = {name: NDOMAINS * (2 if name == "sts" else 1) for name in instances}
        for name in instances:
            common.wait_for(lambda: counters[name].update() >= expected[name], 60, f"warm-up delivery via {name}")
        before = sts.samples("stsmilter_decisions_total")

        results = {name: [] for name in instances}
        order = ["none", "noop", "sts"]
        run_index = 0
        for rnd in range(ROUNDS):
            for name in order[rnd % 3:] + order[: rnd % 3]:
                inst, counter = instances[name], counters[name]
                total = SOURCES * PER_SOURCE
                cpu0 = common.cpu_seconds(noop.pid if name == "noop" else sts.pid) if name != "none" else 0.0
                accepted_s, t0 = run_load(inst, rcpt_domains(run_index), name)
                cpu1 = common.cpu_seconds(noop.pid if name == "noop" else sts.pid) if name != "none" else 0.0
                expected[name] += total
                common.wait_for(lambda: counter.update() >= expected[name], 120, f"delivery via {name}",
                                interval=0.02)
                delivered_s = time.monotonic() - t0
                results[name].append((total / accepted_s, total / delivered_s, (cpu1 - cpu0) / total * 1e6))
                run_index += 1
        after = sts.samples("stsmilter_decisions_total")
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        delta = {k: v for k, v in delta.items() if v}
        print("# stsmilter decisions during the runs: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(delta.items())))
        bad = {k: v for k, v in delta.items() if "mx-match" not in k and "mode-none" not in k}
        if bad:
            print(f"# WARNING: unexpected stsmilter decisions {bad}")

    print()
    print(f"{'milter':6} {'accepted msg/s':>15} {'delivered msg/s':>16} {'milter CPU us/msg':>18}   rounds accepted/s")
    best = {}
    for name in ("none", "noop", "sts"):
        runs = results[name]
        top = max(runs, key=lambda r: r[0])
        best[name] = top
        cpu = sorted(r[2] for r in runs)[len(runs) // 2]
        cpu_text = f"{cpu:18.0f}" if name != "none" else f"{'-':>18}"
        print(f"{name:6} {top[0]:15.0f} {max(r[1] for r in runs):16.0f} {cpu_text}   "
              + " ".join(f"{r[0]:.0f}" for r in runs))
    ratio = best["sts"][0] / best["noop"][0]
    print()
    print(f"ratios: sts/noop accepted {ratio:.3f}, delivered {max(r[1] for r in results['sts']) / max(r[1] for r in results['noop']):.3f};"
          f" noop/no-milter accepted {best['noop'][0] / best['none'][0]:.3f}")
    print(f"postfix_ratio={ratio:.3f}")
    return 0


if __name__ == "__main__":
    common.run_main(main)
