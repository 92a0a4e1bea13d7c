"""Cold start: single flight for one domain, and warm-up of 1000 new domains at once.

The engine runs in this process (stsmilter.engine.open_engine on
StsWorld.config_text(cache_path=""): memory cache, default [fetch] max_concurrent = 32).
The loopback DNS and HTTPS servers (tests/world) run in a forked child process driven
over a pipe: in the same process their per-query Python work shares the engine's GIL
and the figure would mostly measure the test servers (about 100 domains/s instead of
about 350 here).

(a) 200 threads look up one uncached domain at the same instant (a barrier):
    the DNS server must see 1 TXT query for _mta-sts.<domain> and the HTTPS server
    1 policy request (single flight), and every caller gets the policy.
(b) 1000 distinct uncached, published domains; 200 threads look up 5 each at once,
    each call with a 5 s deadline (the milter's lookup_timeout), as a flood of new
    recipient domains would. Reported: time until every domain is cached, peak
    concurrent HTTPS connections at the policy server (bounded by max_concurrent),
    TXT queries and policy requests (1 per domain), the longest any lookup call
    blocked (must stay within the deadline + slack) and how many returned "pending".
    Each mta-sts host also has an AAAA record (::1), so the test DNS server is not
    asked for NODATA answers, which it computes by scanning the whole zone.
Last line: warmup_rate=<domains/s in (b)>.
"""

import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from world.https_server import HttpsServer  # noqa: E402

SINGLE_FLIGHT_THREADS = 200
NDOMAINS = 1000
THREADS = 200
DEADLINE = 5.0
SLACK = 0.5  # allowed overrun of a lookup call past its deadline
ALL_CACHED_TIMEOUT = 120.0


class CountingHttpsServer(HttpsServer):
    """HttpsServer that counts connections in progress (TLS handshake to close)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.active = 0
        self.peak = 0
        self._count_lock = threading.Lock()

    def reset_peak(self):
        with self._count_lock:
            self.peak = self.active

    def _connection(self, conn):
        with self._count_lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            return super()._connection(conn)
        finally:
            with self._count_lock:
                self.active -= 1


def publish(world, domains, mode="enforce"):
    """world: a StsWorld."""
    for index, domain in enumerate(domains):
        world.publish(domain, policy_id=f"cold{index}", mode=mode)
        world.dns.add(f"mta-sts.{domain}", "AAAA", "::1")


def _world_main(conn, root):
    """The world process: serves DNS and HTTPS, obeys (command, argument) messages."""
    import signal
    import tempfile
    from pathlib import Path

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us

    def on_term(signum, frame):
        raise SystemExit(1)

    signal.signal(signal.SIGTERM, on_term)
    tempfile.tempdir = root  # the HTTPS server's CA directory lives in the bench temp dir
    world = common.BenchWorld(Path(root), https_class=CountingHttpsServer)
    try:
        conn.send(world.config_text(cache_path=""))
        while True:
            cmd, arg = conn.recv()
            if cmd == "publish":
                publish(world.sts, arg)
                conn.send(None)
            elif cmd == "reset":
                world.dns.reset_log()
                world.https.reset_log()
                world.https.reset_peak()
                conn.send(None)
            elif cmd == "txt_queries":  # TXT queries for names starting with arg
                conn.send(sum(1 for q in list(world.dns.queries) if q[1] == "TXT" and q[0].startswith(arg)))
            elif cmd == "https_requests":  # policy requests for these domains
                conn.send(sum(world.https.count(f"mta-sts.{d}") for d in arg))
            elif cmd == "peak":
                conn.send(world.https.peak)
            elif cmd == "stop":
                conn.send(None)
                return
    except (EOFError, OSError):
        pass
    finally:
        world.stop()


class WorldProcess:
    def __init__(self, root):
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_world_main, args=(child, str(root)), daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(30):
            self.stop()
            raise TimeoutError("the world process did not start")
        self.config_text = self.conn.recv()

    def ask(self, cmd, arg=None, timeout=120):
        self.conn.send((cmd, arg))
        if not self.conn.poll(timeout):
            raise TimeoutError(f"world process: no answer to {cmd}")
        return self.conn.recv()

    def stop(self):
        if self.proc.is_alive():
            try:
                self.ask("stop", timeout=20)
            except (OSError, EOFError, TimeoutError):
                pass
            self.proc.join(timeout=20)
        if self.proc.is_alive():
            self.proc.terminate()  # SIGTERM: its finally stops the servers
            self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def single_flight(world, discovery):
    domain = common.realistic_domains(1, seed=1, prefix="single-")[0]
    world.ask("publish", [domain])
    world.ask("reset")
    barrier = threading.Barrier(SINGLE_FLIGHT_THREADS)
    results, errors = [], []

    def worker():
        try:
            barrier.wait(timeout=30)
            results.append(discovery.lookup(domain, timeout=DEADLINE))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(SINGLE_FLIGHT_THREADS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=DEADLINE + 30)
    elapsed = time.monotonic() - t0
    txt = world.ask("txt_queries", f"_mta-sts.{domain}")
    https = world.ask("https_requests", [domain])
    valid = sum(1 for r in results if r.status == "valid")
    print(f"(a) {SINGLE_FLIGHT_THREADS} concurrent lookups of one uncached domain: TXT queries {txt}, "
          f"HTTPS policy requests {https}, valid answers {valid}/{SINGLE_FLIGHT_THREADS}, {elapsed * 1000:.0f} ms")
    if errors:
        print(f"    errors: {errors[:3]}")
    return txt, https, valid


def flood(world, discovery):
    domains = common.realistic_domains(NDOMAINS, seed=1000, prefix="cold-")
    t0 = time.monotonic()
    world.ask("publish", domains)
    print(f"# published {NDOMAINS} domains in {time.monotonic() - t0:.1f} s")
    world.ask("reset")
    slices = [domains[i::THREADS] for i in range(THREADS)]
    barrier = threading.Barrier(THREADS + 1)
    blocked, statuses, errors = [], {}, []
    lock = threading.Lock()
    stop = threading.Event()

    def worker(mine):
        try:
            barrier.wait(timeout=30)
            for domain in mine:
                if stop.is_set():
                    return
                s = time.monotonic()
                result = discovery.lookup(domain, timeout=DEADLINE)
                took = time.monotonic() - s
                with lock:
                    blocked.append(took)
                    statuses[result.status] = statuses.get(result.status, 0) + 1
        except Exception as e:  # noqa: BLE001 - reported below
            with lock:
                errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(mine,), daemon=True) for mine in slices]
    for t in threads:
        t.start()
    cpu0 = common.cpu_seconds(os.getpid())
    barrier.wait(timeout=30)
    start = time.monotonic()
    cache = discovery.cache
    missing = list(reversed(domains))  # cheap polling: pop cached names off the end
    while missing and time.monotonic() - start < ALL_CACHED_TIMEOUT:
        while missing and cache.peek(missing[-1]) is not None:
            missing.pop()
        if missing:
            time.sleep(0.01)
    all_cached = time.monotonic() - start
    stop.set()
    for t in threads:
        t.join(timeout=DEADLINE + 10)
    calls_done = time.monotonic() - start
    engine_cpu = common.cpu_seconds(os.getpid()) - cpu0
    txt = world.ask("txt_queries", "_mta-sts.cold-")
    requests = world.ask("https_requests", domains)
    peak = world.ask("peak")
    worst = max(blocked) if blocked else float("nan")
    fetch_failures = {k: v for k, v in discovery_fetch_results().items() if k != "ok"}
    print(f"(b) {NDOMAINS} new domains, {THREADS} threads x {NDOMAINS // THREADS} lookups, deadline {DEADLINE:g} s:")
    print(f"    all cached after {all_cached:.2f} s ({len(missing)} never cached); lookup calls done after "
          f"{calls_done:.2f} s; engine process CPU {engine_cpu:.2f} s ({engine_cpu / NDOMAINS * 1000:.1f} ms/domain)")
    print(f"    TXT queries {txt} (1 per domain: {txt == NDOMAINS}), HTTPS policy requests {requests}, "
          f"peak concurrent HTTPS connections {peak} (max_concurrent {discovery.settings.max_concurrent})")
    print(f"    lookup call blocked: max {worst:.2f} s, p50 {common.percentile(blocked, 50):.2f} s, "
          f"p99 {common.percentile(blocked, 99):.2f} s (bound {DEADLINE + SLACK:g} s: "
          f"{'ok' if worst <= DEADLINE + SLACK else 'EXCEEDED'}); answers {statuses}")
    if fetch_failures:
        print(f"    fetch failures: {fetch_failures}")
    if errors:
        print(f"    errors: {errors[:3]}")
    return (NDOMAINS - len(missing)) / all_cached if not missing else float("nan"), worst


def discovery_fetch_results():
    from stsmilter import metrics

    out = {}
    for metric in metrics.POLICY_FETCHES.collect():
        for s in metric.samples:
            if s.name.endswith("_total"):
                out[s.labels["result"]] = out.get(s.labels["result"], 0) + s.value
    return out


def main() -> int:
    from stsmilter import config, engine

    print(f"# cold_start: {common.machine()}")
    with common.bench_session("cold") as (root, stack):
        world = WorldProcess(root)
        stack.callback(world.stop)
        cfg = config.loads(world.config_text)
        discovery = engine.open_engine(cfg)
        stack.callback(discovery.close)
        print(f"# engine: memory cache, fetch max_concurrent {cfg.fetch.max_concurrent}, fetch timeout "
              f"{cfg.fetch.timeout:g} s, DNS timeout {cfg.dns.timeout:g} s")
        txt, https, valid = single_flight(world, discovery)
        rate, worst = flood(world, discovery)
        ok = txt == 1 and https == 1 and valid == SINGLE_FLIGHT_THREADS and worst <= DEADLINE + SLACK
        print(f"# checks: single flight {'ok' if txt == 1 and https == 1 else 'FAILED'}, "
              f"deadline {'ok' if worst <= DEADLINE + SLACK else 'FAILED'}")
    print(f"warmup_rate={rate:.0f}")
    return 0 if ok else 1


if __name__ == "__main__":
    common.run_main(main)
