"""Broken destinations under load (issue 19): does a burst of dead and hanging domains
delay lookups for the others?

For N = 150 and N = 1000 (``--n``), against ``stsmilter run`` (subprocess, sqlite cache,
metrics, milter, socketmap; ``[dns] timeout = 2`` as in the issue's reproduction, the
daemon's defaults otherwise: ``[fetch] timeout`` 10 s, ``max_concurrent`` 32,
``[socketmap] lookup_timeout`` 5 s; RLIMIT_NOFILE 8192 as the shipped unit's
LimitNOFILE) and, when it is installed, postfix-mta-sts-resolver's ``mta-sts-daemon``
(``--peer PATH``, ``$STSMILTER_BENCH_PEER`` or PATH):

* N DNS-dead domains (the loopback DNS server drops every query for them) and N
  hanging-TLS domains (TXT and A fine; the policy host, 127.0.0.2 on the policy port,
  accepts TCP and never completes the TLS handshake) are looked up all at once, the two
  kinds interleaved, one request on each of 2N socketmap connections (as Postfix's
  client: one request in flight per connection);
* 0.5 s into the burst a never-seen good domain (enforce policy, working DNS and HTTPS)
  is asked on a connection of its own: the time to its answer, and the answer;
* meanwhile 4 connections ask 20 pre-warmed good domains, each every 10 ms: p99 of those
  cached lookups, from the burst's start until every burst request is answered;
* the daemon's threads and RSS (/proc/PID/status) before, at the fresh answer, peak;
* 15 s after the burst's start (``--reask-after``; within the coming ``[cache]
  dns_failure_ttl``) the same 2N domains are asked again at once: how many are answered
  within 1 s, and how many new DNS queries (for the dead ones) and policy-host
  connections (for the hanging ones) that caused.

Each run (daemon x N) has a fresh world (tests/world/slow_destinations.py, shared with
tests/service/test_fairness.py), a fresh daemon and fresh clients. The peer always fetches from
port 443: its runs serve the policy hosts on 127.0.0.1:443 and 127.0.0.2:443, inside a
network namespace of their own (``unshare --net --mount``, this script again with
``--peer-part``) if 443 is taken or ``--peer-netns yes``.
Last line: fresh_domain_seconds=<stsmilter, N=1000 (or the largest N run)>.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings

# dnspython imports its DSA support on the way to the test DNS server; cryptography
# deprecates DSA. Nothing here uses it: four lines of noise at the top of the output.
warnings.filterwarnings("ignore", message="DSA is deprecated", module="dns.dnssecalgs")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from world import slow_destinations as slow  # noqa: E402

DNS_TIMEOUT = 2  # [dns] timeout, as in the reproduction
FETCH_TIMEOUT = 10  # [fetch] timeout: the daemon's default, written out
WARM = 20  # pre-warmed good domains asked during the burst
CACHED_CONNECTIONS = 4
CACHED_INTERVAL = 0.01  # each cached-lookup connection asks every 10 ms
FRESH_DELAY = 0.5  # the never-seen good domain is asked this long into the burst
BURST_TIMEOUT = 30.0  # a burst request not answered by then counts as unanswered
REASK_AFTER = 15.0  # seconds from the burst's start to the second round
WITHIN = 1.0  # a second-round answer counts when it comes within this
DAEMON_NOFILE = 8192  # the shipped unit's LimitNOFILE
PEER_PORT = 443  # postfix-mta-sts-resolver fetches from nowhere else


def log(text: str) -> None:
    print(text, flush=True)


def mib(kib: int) -> float:
    return kib / 1024.0


def summary(daemon: str, n: int, report: slow.BurstReport, reask: slow.ReaskReport, before, dead, hang,
            round1_dns: int, round1_tls: int, seconds: float) -> dict:
    by_name = {name: (reply, s) for name, reply, s in report.burst}

    def kinds(names):
        out = {}
        for name in names:
            kind = slow.kind_of(by_name[name][0])
            out[kind] = out.get(kind, 0) + 1
        return out

    def times(names):
        values = [by_name[name][1] for name in names if by_name[name][0] is not None]
        return (slow.percentile(values, 50), max(values) if values else float("nan"))

    return {
        "daemon": daemon, "n": n, "seconds": seconds,
        "fresh_reply": (report.fresh_reply or b"<no answer>").decode(errors="replace"),
        "fresh_seconds": report.fresh_seconds,
        "answered_before_fresh": report.answered_before_fresh,
        "fresh_timeline": report.timeline_text(),
        "daemon_cpu": report.daemon_cpu, "world_cpu": report.world_cpu, "load": report.load,
        "cached_count": len(report.cached_latencies),
        "cached_p50_ms": slow.percentile(report.cached_latencies, 50) * 1e3,
        "cached_p99_ms": report.cached_p99 * 1e3,
        "cached_max_ms": max(report.cached_latencies, default=float("nan")) * 1e3,
        "cached_kinds": report.cached_kinds,
        "threads_before": before[0], "rss_before_mib": mib(before[1]),
        "threads_at_fresh": report.threads_at_fresh, "rss_at_fresh_mib": mib(report.rss_kib_at_fresh),
        "peak_threads": report.peak_threads, "peak_rss_mib": mib(report.peak_rss_kib),
        "burst_elapsed": report.elapsed,
        "dead_kinds": kinds(dead), "dead_p50_s": times(dead)[0], "dead_max_s": times(dead)[1],
        "hang_kinds": kinds(hang), "hang_p50_s": times(hang)[0], "hang_max_s": times(hang)[1],
        "round1_dns_dead": round1_dns, "round1_tls_hang": round1_tls,
        "reask": {label: {"count": len(g.answers), "within": g.answered_within, "dns_queries": g.dns_queries,
                          "kinds": g.kinds(), "slowest": g.slowest()}
                  for label, g in reask.groups.items()},
        "reask_tls_hang": reask.tls_connections,
    }


def print_run(r: dict) -> None:
    name = f"{r['daemon']} N={r['n']}"

    def kinds(d):
        return ", ".join(f"{v} {k}" for k, v in sorted(d.items()))

    log(f"## {name} ({r['seconds']:.0f} s)")
    log(f"#   fresh good domain asked {FRESH_DELAY} s into the burst: {r['fresh_seconds']:.3f} s -> "
        f"{r['fresh_reply']!r} ({r['answered_before_fresh']} of {2 * r['n']} burst requests answered before it)")
    log(f"#   the fresh domain's lookup reached the servers: {r['fresh_timeline']}")
    log(f"#   CPU from the burst's start until it was answered: daemon {r['daemon_cpu']:.2f} s, test servers"
        f" {r['world_cpu']:.2f} s, over {r['burst_elapsed']:.1f} s on {os.cpu_count()} CPUs (load average"
        f" {r['load']:.1f} before)")
    log(f"#   cached lookups during the burst: {r['cached_count']}, p50 {r['cached_p50_ms']:.2f} ms, "
        f"p99 {r['cached_p99_ms']:.2f} ms, max {r['cached_max_ms']:.1f} ms ({kinds(r['cached_kinds'])})")
    log(f"#   daemon threads {r['threads_before']} before, {r['threads_at_fresh']} at the fresh answer, "
        f"{r['peak_threads']} peak; RSS {r['rss_before_mib']:.0f} / {r['rss_at_fresh_mib']:.0f} / "
        f"{r['peak_rss_mib']:.0f} MiB")
    log(f"#   burst answered in {r['burst_elapsed']:.1f} s: dead {kinds(r['dead_kinds'])} (p50 {r['dead_p50_s']:.2f} s,"
        f" max {r['dead_max_s']:.2f} s); hanging {kinds(r['hang_kinds'])} (p50 {r['hang_p50_s']:.2f} s,"
        f" max {r['hang_max_s']:.2f} s)")
    log(f"#   by then: {r['round1_dns_dead']} DNS queries for the dead domains, {r['round1_tls_hang']} connections"
        f" to the hanging policy host")
    for label in ("dead", "hang"):
        g = r["reask"][label]
        log(f"#   asked again {REASK_AFTER:.0f} s after the burst began, {label}: {g['within']}/{g['count']} answered"
            f" within {WITHIN:.0f} s (slowest {g['slowest']:.2f} s; {kinds(g['kinds'])}), {g['dns_queries']} new DNS"
            f" queries" + (f", {r['reask_tls_hang']} new connections to the policy host" if label == "hang" else ""))


# --------------------------------------------------------------------------- one run


def run_one(daemon: str, n: int, peer: str = None) -> dict:
    """One daemon, one N, a fresh world; the summary dict."""
    began = time.monotonic()
    with common.bench_session(f"slow-{daemon}-{n}") as (root, stack):
        world = slow.SlowWorld(root, https_port=PEER_PORT if daemon == "peer" else 0)
        stack.callback(world.stop)
        world.start()
        dead, hang = slow.domains("dead", n), slow.domains("hang", n)
        warm, fresh = slow.domains("warm", WARM), slow.domains("fresh", 1)[0]
        world.publish_dead(dead)
        world.publish_hang(hang)
        world.publish_good(warm + [fresh])
        limits = slow.open_files_limit(DAEMON_NOFILE)
        if daemon == "peer":
            proc = common.PeerDaemon(peer, root, stack, world.dns_port, world.ca_file, dns_timeout=DNS_TIMEOUT,
                                     preexec_fn=limits)
            port, pid = proc.port, proc.pid
        else:
            # 2N burst connections + the cached and fresh ones must fit under max_connections,
            # or the daemon closes connections with a lookup under way (a different test).
            socketmap = {"max_connections": str(max(1000, 2 * n + 64))}
            proc = common.StsDaemon(world, root, stack, "sts", preexec_fn=limits, dns={"timeout": str(DNS_TIMEOUT)},
                                    fetch={"timeout": str(FETCH_TIMEOUT)}, socketmap=socketmap)
            port, pid = proc.socketmap_port, proc.pid
        answers = slow.warm(port, warm)
        bad = {d: a for d, a in answers.items() if not a.startswith(b"OK secure")}
        if bad:
            raise RuntimeError(f"{daemon}: warm domains not answered OK secure: {bad}")
        client = slow.BurstClient(port, 2 * n)
        stack.callback(client.stop)
        client.start()
        before = slow.proc_status(pid)
        report = slow.run_burst(port, pid, client, slow.interleave(dead, hang), fresh, warm, fresh_delay=FRESH_DELAY,
                                burst_timeout=BURST_TIMEOUT, cached_connections=CACHED_CONNECTIONS,
                                cached_interval=CACHED_INTERVAL, world=world)
        round1_dns, round1_tls = world.dns_queries(dead), world.hang_stats()[0]
        reask = slow.run_reask(world, client, {"dead": dead, "hang": hang}, at=report.started + REASK_AFTER,
                               timeout=BURST_TIMEOUT, within=WITHIN)
        errors = world.dns_errors()
        if errors:
            raise RuntimeError(f"the test DNS server failed while answering: {errors[:3]}")
        result = summary(daemon, n, report, reask, before, dead, hang, round1_dns, round1_tls, 0.0)
    result["seconds"] = time.monotonic() - began
    return result


# --------------------------------------------------------------------------- the peer's runs


def port_free(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def peer_runs(peer: str, ns: list, netns: str, root, stack) -> list:
    """The peer's runs: here, or in a network namespace of their own (this script again)."""
    if netns == "auto":
        netns = "no" if all(port_free(a, PEER_PORT) for a in (common.LOOPBACK, slow.BLACK_HOLE)) else "yes"
    if netns == "no":
        log(f"# peer: policy hosts on 127.0.0.1:{PEER_PORT} and {slow.BLACK_HOLE}:{PEER_PORT} (host network)")
        results = []
        for n in ns:
            results.append(run_one("peer", n, peer))
            print_run(results[-1])
        return results
    if not shutil.which("unshare") or not shutil.which("ip"):
        log("# peer: skipped: port 443 is taken and unshare/ip are missing for a network namespace")
        return []
    log(f"# peer: port {PEER_PORT} taken (or --peer-netns yes): its runs go into a network namespace of their own")
    out = root / "peer-results.json"
    argv = ["unshare", "--net", "--mount", "--propagation", "private", common.PYTHON,
            *(f"-W{option}" for option in sys.warnoptions), os.path.abspath(__file__),
            "--peer-part", str(out), "--peer", peer, "--n", ",".join(map(str, ns))]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=slow.die_with_parent)
    common._STARTED.append(proc)
    try:
        status = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)  # it stops what it started (the daemon, the world) first
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if status != 0 or not out.exists():
        raise RuntimeError(f"the peer's runs in a network namespace failed (exit {status})")
    return json.loads(out.read_text())


def peer_part(out: str, peer: str, ns: list) -> int:
    """Inside `unshare --net --mount`: loopback up, the peer's runs, results to out."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    results = []
    for n in ns:
        results.append(run_one("peer", n, peer))
        print_run(results[-1])
    with open(out, "w") as f:
        json.dump(results, f)
    return 0


# --------------------------------------------------------------------------- main


def table(results: list) -> None:
    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else str(v)

    def kinds(d):
        return " ".join(f"{k.replace('OK secure', 'OK')}:{v}" for k, v in sorted(d.items()))

    rows = [
        ("fresh domain, s", lambda r: fmt(r["fresh_seconds"], ".3f")),
        ("fresh answer", lambda r: " ".join(r["fresh_reply"].split(" ")[:2]) if r["fresh_reply"].startswith("OK")
         else r["fresh_reply"].split(" ")[0]),
        ("cached p99, ms", lambda r: fmt(r["cached_p99_ms"], ".2f")),
        ("cached max, ms", lambda r: fmt(r["cached_max_ms"], ".1f")),
        ("daemon CPU, s", lambda r: fmt(r["daemon_cpu"], ".2f")),
        ("threads peak", lambda r: str(r["peak_threads"])),
        ("RSS peak, MiB", lambda r: fmt(r["peak_rss_mib"], ".0f")),
        ("burst answered, s", lambda r: fmt(r["burst_elapsed"], ".1f")),
        ("dead: answers", lambda r: kinds(r["dead_kinds"])),
        ("hanging: answers", lambda r: kinds(r["hang_kinds"])),
        ("again: dead <1 s", lambda r: f"{r['reask']['dead']['within']}/{r['reask']['dead']['count']}"),
        ("again: dead DNS q.", lambda r: str(r["reask"]["dead"]["dns_queries"])),
        ("again: hang <1 s", lambda r: f"{r['reask']['hang']['within']}/{r['reask']['hang']['count']}"),
        ("again: hang DNS q.", lambda r: str(r["reask"]["hang"]["dns_queries"])),
        ("again: hang TLS conn.", lambda r: str(r["reask_tls_hang"])),
    ]
    heads = [f"{'stsmilter' if r['daemon'] == 'sts' else 'peer'} N={r['n']}" for r in results]
    cells = [[get(r) for r in results] for _, get in rows]
    width = max([len(h) for h in heads] + [len(c) for row in cells for c in row]) + 2
    log("")
    log(f"{'':22}" + "".join(h.rjust(width) for h in heads))
    for (label, _), row in zip(rows, cells):
        log(f"{label:22}" + "".join(c.rjust(width) for c in row))


def parse_ns(text: str) -> list:
    ns = [int(x) for x in text.split(",") if x.strip()]
    if not ns or any(n < 1 or n > 5000 for n in ns):
        raise argparse.ArgumentTypeError("N between 1 and 5000")
    return ns


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=parse_ns, default=[150, 1000], help="N values, comma-separated (150,1000)")
    parser.add_argument("--peer", help=f"mta-sts-daemon to compare with (default ${common.PEER_ENV}, then PATH)")
    parser.add_argument("--no-peer", action="store_true", help="stsmilter only")
    parser.add_argument("--peer-netns", choices=("auto", "yes", "no"), default="auto",
                        help="the peer's runs in a network namespace: if port 443 is taken (auto), always, never")
    parser.add_argument("--peer-part", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # 2N burst connections in one client process, the world's black hole, the cached clients
    slow.raise_open_files(4 * max(args.n) + 2048)
    if args.peer_part:
        return peer_part(args.peer_part, args.peer, args.n)

    log(f"# slow destinations: {common.machine()}")
    log(f"# [dns] timeout = {DNS_TIMEOUT}, [fetch] timeout = {FETCH_TIMEOUT} (default); {WARM} warm domains on"
        f" {CACHED_CONNECTIONS} connections every {CACHED_INTERVAL * 1e3:.0f} ms; fresh domain at +{FRESH_DELAY} s;"
        f" asked again at +{REASK_AFTER:.0f} s")
    results = []
    for n in args.n:
        results.append(run_one("sts", n))
        print_run(results[-1])
    peer = None if args.no_peer else common.find_peer(args.peer)
    if args.no_peer:
        log("# peer: skipped (--no-peer)")
    elif peer is None:
        log(f"# peer: skipped: {common.PEER_COMMAND} (postfix-mta-sts-resolver) is not installed"
            f" (not on PATH, no --peer, no ${common.PEER_ENV})")
    elif os.geteuid() != 0:
        log("# peer: skipped: needs root (port 443, a private mount namespace for its resolv.conf)")
    else:
        with common.bench_session("slow-peer") as (root, stack):
            results += peer_runs(peer, args.n, args.peer_netns, root, stack)
    table(results)
    headline = [r for r in results if r["daemon"] == "sts" and r["n"] == max(args.n)][0]
    log(f"fresh_domain_seconds={headline['fresh_seconds']:.3f}")
    return 0


if __name__ == "__main__":
    common.run_main(main)
