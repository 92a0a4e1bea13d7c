"""Memory per cached policy, and per domain without a policy (negative entry).

Negative entries, through the real daemon: `stsmilter run` (sqlite cache, metrics,
socketmap, milter, as in production) resolving through a loopback responder that
answers NXDOMAIN to everything; client processes ask the socketmap about 20 000 new
domains (warm-up), then about --negatives more (default 1 000 000, realistic names
of ~17 characters), pipelined, until each was answered NOTFOUND (TEMP answers are asked
again). RSS of the daemon from /proc/PID/statm before and after; a sample of the domains
is asked again to check that they are answered from the negative cache (no new miss).

Policies: 100 000 policies through the real cache code, each built the way a fetch
builds it: the TXT record goes through policy.parse_txt, the policy file through
policy.parse_policy, then store.make_entry(...) (with the TXT record's TTL) and
PolicyCache.put(...). Realistic inputs: domains of 8-30 characters, TXT ids of 8-20
characters, 2-4 mx patterns per policy (own names such as mx1.<domain> or *.<domain>
mixed with shared provider names such as *.mail.protection.outlook.com), modes
enforce/testing/none, max_age 1 day to 1 year.

Each in-process variant runs in a fresh interpreter (this script re-executed with
--variant), so freed memory of one cannot hide another's growth:
  negative: PolicyCache.put_negative() alone, 1 000 000 domains: RSS growth per entry.
  memory: PolicyCache over MemoryStore ([cache] path empty): RSS growth per policy.
  sqlite: PolicyCache over SqliteStore (the default): RSS growth per policy (memory LRU +
          sqlite page cache) and the sqlite file size per policy (after close).
RSS comes from /proc/self/statm after gc.collect(), before and after.
Last two lines: rss_per_negative_bytes=<daemon RSS growth per negative entry>, then
rss_per_policy_bytes=<memory variant>.
"""

import argparse
import collections
import gc
import json
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

N = 100_000
NEGATIVES = 1_000_000
NEGATIVE_WARMUP = 20_000
NEGATIVE_CLIENTS = 4
NEGATIVE_WINDOW = 64  # requests in flight per client connection
NEGATIVE_SAMPLE = 2000
PAGE = os.sysconf("SC_PAGE_SIZE")
PROVIDERS = (
    ("*.mail.protection.outlook.com",),
    ("aspmx.l.google.com", "*.aspmx.l.google.com", "*.googlemail.com"),
    ("*.pphosted.com", "*.ppe-hosted.com"),
    ("*.mimecast.com",),
    ("mx01.mail.icloud.com", "mx02.mail.icloud.com"),
)
WORDS = ("mail", "shop", "cloud", "bank", "news", "north", "data", "group", "travel", "media", "energy",
         "health", "city", "legal", "studio", "labs", "partners", "logistics", "consulting", "systems")
TLDS = ("com", "net", "org", "de", "fr", "nl", "co.uk", "com.au", "io", "ch", "se", "it")
ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def rss(pid="self") -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def inputs(rng, index):
    """(domain, TXT record text, policy file body) for one realistic policy."""
    words = rng.randrange(1, 3)
    name = "-".join(rng.choice(WORDS) for _ in range(words)) + str(index)
    domain = f"{name}.{rng.choice(TLDS)}"
    policy_id = "".join(rng.choice(ID_CHARS) for _ in range(rng.randrange(8, 21)))
    txt = f"v=STSv1; id={policy_id}"
    count = rng.randrange(2, 5)
    own = [f"mx{k}.{domain}" for k in range(1, 3)] + [f"*.{domain}", f"*.mail.{domain}"]
    patterns = []
    if rng.random() < 0.5:
        patterns.extend(rng.choice(PROVIDERS))
    while len(patterns) < count:
        p = rng.choice(own)
        if p not in patterns:
            patterns.append(p)
    patterns = patterns[:count]
    mode = rng.choice(("enforce", "enforce", "testing", "none"))
    max_age = rng.choice((86400, 604800, 1209600, 2592000, 31557600))
    body = f"version: STSv1\nmode: {mode}\n" + "".join(f"mx: {p}\n" for p in patterns) + f"max_age: {max_age}\n"
    return domain, txt, body.encode()


def build(store, n):
    from stsmilter.engine import policy
    from stsmilter.engine.cache import PolicyCache
    from stsmilter.engine.store import make_entry

    cache = PolicyCache(store, max_entries=max(200_000, n), negative_ttl=300, failure_backoff=300)
    rng = random.Random(8461)
    now = time.time()
    lengths = [0, 0, 0]
    for index in range(n):
        domain, txt, body = inputs(rng, index)
        record = policy.parse_txt([txt])
        parsed = policy.parse_policy(body)
        entry = make_entry(domain, record.id, parsed, fetched_at=now - rng.randrange(0, 86400),
                           txt_ttl=rng.choice((60, 300, 3600, 86400)))
        cache.put(entry)
        lengths[0] += len(domain)
        lengths[1] += len(record.id)
        lengths[2] += len(parsed.mx)
    return cache, [x / n for x in lengths]


def variant(name: str, directory: str) -> dict:
    from stsmilter.engine.store import MemoryStore, SqliteStore

    # Import everything the build touches first, so imports are not counted.
    warm_cache, _ = build(MemoryStore(), 10)
    del warm_cache
    gc.collect()
    before = rss()
    path = os.path.join(directory, "cache.sqlite") if name == "sqlite" else None
    store = SqliteStore(path) if path else MemoryStore()
    t0 = time.monotonic()
    cache, lengths = build(store, N)
    elapsed = time.monotonic() - t0
    gc.collect()
    after = rss()
    out = {"variant": name, "rss_per_policy": (after - before) / N, "build_s": elapsed,
           "avg_domain_len": lengths[0], "avg_id_len": lengths[1], "avg_mx": lengths[2],
           "held": len(cache._policies)}
    if path:
        store.close()
        size = sum(os.path.getsize(p) for p in (path, path + "-wal", path + "-shm") if os.path.exists(p))
        out["file_per_policy"] = size / N
    return out


def negative_domain(index: int) -> str:
    """A distinct, realistic name without a policy (one or two words, a number, a TLD)."""
    first = WORDS[index % len(WORDS)]
    if index % 3 == 0:
        first += "-" + WORDS[index // 7 % len(WORDS)]
    return f"{first}{index}.{TLDS[index // 3 % len(TLDS)]}"


def ask_negatives(port: int, first: int, count: int) -> tuple:
    """Ask the socketmap about domains first..first+count-1, NEGATIVE_WINDOW at a time on
    one connection, until each got NOTFOUND; returns (asked, answered TEMP)."""
    sock = socket.create_connection((common.LOOPBACK, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pending = collections.deque(range(first, first + count))
    asked = temp = 0
    buffer = b""
    try:
        while pending:
            batch = [pending.popleft() for _ in range(min(NEGATIVE_WINDOW, len(pending)))]
            sock.sendall(b"".join(common.netstring(b"postfix " + negative_domain(i).encode()) for i in batch))
            asked += len(batch)
            replies = []
            while len(replies) < len(batch):
                colon = buffer.find(b":")
                if colon > 0 and len(buffer) >= colon + 2 + int(buffer[:colon]):
                    end = colon + 1 + int(buffer[:colon])
                    replies.append(buffer[colon + 1:end])
                    buffer = buffer[end + 1:]
                    continue
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("socketmap closed the connection")
                buffer += chunk
            for index, reply in zip(batch, replies):
                if reply.startswith(b"TEMP"):
                    pending.append(index)  # still being looked up: ask again
                    temp += 1
                elif reply != b"NOTFOUND ":
                    raise RuntimeError(f"{negative_domain(index)}: unexpected answer {reply!r}")
    finally:
        sock.close()
    return asked, temp


def _ask_worker(port, first, count, conn):
    try:
        conn.send(("ok", ask_negatives(port, first, count)))
    except BaseException as e:  # report, never hang the parent
        conn.send(("error", repr(e)))
    finally:
        conn.close()


def ask_in_parallel(port: int, first: int, count: int, clients: int = NEGATIVE_CLIENTS) -> tuple:
    """ask_negatives over `clients` forked processes, each a slice; returns the sums."""
    ctx = multiprocessing.get_context("fork")
    share = -(-count // clients)
    procs, pipes = [], []
    try:
        for k in range(clients):
            start, size = first + k * share, max(0, min(share, count - k * share))
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_ask_worker, args=(port, start, size, child), daemon=True)
            proc.start()
            child.close()
            procs.append(proc)
            pipes.append(parent)
        totals = [0, 0]
        for parent in pipes:
            try:
                status, result = parent.recv()
            except EOFError:
                raise RuntimeError("a client process died") from None
            if status != "ok":
                raise RuntimeError(f"client failed: {result}")
            totals = [a + b for a, b in zip(totals, result)]
        return tuple(totals)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for parent in pipes:
            parent.close()


def negatives_through_daemon(root, stack, n: int) -> dict:
    """Daemon RSS growth per negative entry, n new domains through the socketmap."""
    _nx, dns_port = common.start_nxdomain_dns(root, stack)
    world = common.BenchWorld(root)
    stack.callback(world.stop)
    daemon = common.StsDaemon(
        world, root, stack, "negative",
        dns={"nameservers": common.LOOPBACK, "port": str(dns_port), "timeout": "5"},
        # Every entry must still be held at the end: no expiry, no eviction.
        cache={"negative_ttl": "86400", "max_entries": str(n + NEGATIVE_WARMUP + 1000)},
    )
    port = daemon.socketmap_port
    ask_in_parallel(port, 0, NEGATIVE_WARMUP)  # threads, pools, imports, the fast-path cache
    time.sleep(1)
    before, cpu0, t0 = rss(daemon.pid), common.cpu_seconds(daemon.pid), time.monotonic()
    asked, temp = ask_in_parallel(port, NEGATIVE_WARMUP, n)
    elapsed, cpu = time.monotonic() - t0, common.cpu_seconds(daemon.pid) - cpu0
    time.sleep(1)
    after = rss(daemon.pid)
    misses = daemon.sample("stsmilter_cache_lookups_total", result="miss")
    hits = daemon.sample("stsmilter_cache_lookups_total", result="negative")
    sample = random.Random(5).sample(range(NEGATIVE_WARMUP, NEGATIVE_WARMUP + n), min(NEGATIVE_SAMPLE, n))
    for index in sample:
        reply = common.socketmap_query(port, negative_domain(index))
        if reply != b"NOTFOUND ":
            raise RuntimeError(f"{negative_domain(index)} asked again: {reply!r}")
    if daemon.sample("stsmilter_cache_lookups_total", result="miss") != misses:
        raise RuntimeError("domains asked again were missed: the negative cache did not hold them")
    held = daemon.sample("stsmilter_cache_lookups_total", result="negative") - hits
    return {"rss_per_negative": (after - before) / n, "n": n, "rss_before": before, "rss_after": after,
            "elapsed": elapsed, "cpu_per_domain": cpu / n, "temp": temp, "asked": asked,
            "sample_held": held, "sample": len(sample),
            "avg_len": sum(len(negative_domain(i)) for i in sample) / len(sample)}


def negatives_in_process(n: int) -> dict:
    """PolicyCache.put_negative() alone: RSS growth per entry (domain string included)."""
    from stsmilter.engine.cache import PolicyCache
    from stsmilter.engine.policy import NONE, Result
    from stsmilter.engine.store import MemoryStore

    cache = PolicyCache(MemoryStore(), max_entries=n, negative_ttl=86400, failure_backoff=300)
    cache.put_negative(Result("warm.example", NONE, reason="no-txt-record", source="cache"))
    gc.collect()
    before = rss()
    for index in range(n):
        cache.put_negative(Result(negative_domain(index), NONE, reason="no-txt-record", source="cache"))
    gc.collect()
    return {"variant": "negative", "rss_per_negative": (rss() - before) / n}


def run_variant(name: str, root) -> dict:
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--variant", name, str(root)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"variant {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--negatives", type=int, default=NEGATIVES, metavar="N",
                        help=f"new domains without a policy asked through the daemon (default {NEGATIVES})")
    args = parser.parse_args()
    print(f"# cache_memory: {common.machine()}; {N} policies per variant; {args.negatives} negative entries")
    with common.bench_session("memory") as (root, stack):
        neg = negatives_through_daemon(root, stack, args.negatives)
        in_process = run_variant("negative", root)
        results = [run_variant("memory", root), run_variant("sqlite", root), run_variant("memory", root)]
    print(f"negative entries through the daemon: {neg['n']} new domains (avg {neg['avg_len']:.1f} chars), "
          f"{neg['elapsed']:.0f} s, {neg['cpu_per_domain'] * 1e6:.0f} us daemon CPU per domain, "
          f"{neg['temp']} TEMP answers asked again; RSS {neg['rss_before'] / 2**20:.0f} -> "
          f"{neg['rss_after'] / 2**20:.0f} MiB; {neg['sample_held']:.0f} of {neg['sample']} asked again "
          f"answered from the negative cache")
    print(f"negative entries in-process (PolicyCache.put_negative alone, {NEGATIVES} domains): "
          f"RSS +{in_process['rss_per_negative']:.0f} bytes/entry")
    mem = [r for r in results if r["variant"] == "memory"]
    sql = [r for r in results if r["variant"] == "sqlite"][0]
    first = mem[0]
    print(f"# inputs: avg domain {first['avg_domain_len']:.1f} chars, avg id {first['avg_id_len']:.1f} chars, "
          f"avg {first['avg_mx']:.2f} mx patterns; {first['held']} entries held in memory")
    for r in mem:
        print(f"memory store: RSS +{r['rss_per_policy']:.0f} bytes/policy (build {r['build_s']:.1f} s)")
    print(f"sqlite store: RSS +{sql['rss_per_policy']:.0f} bytes/policy (memory LRU + sqlite page cache), "
          f"file {sql['file_per_policy']:.0f} bytes/policy (build {sql['build_s']:.1f} s)")
    headline = min(r["rss_per_policy"] for r in mem)
    print(f"rss_per_negative_bytes={neg['rss_per_negative']:.0f}")
    print(f"rss_per_policy_bytes={headline:.0f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--variant":
        if sys.argv[2] == "negative":
            print(json.dumps(negatives_in_process(NEGATIVES)))
        else:
            print(json.dumps(variant(sys.argv[2], sys.argv[3])))
        sys.exit(0)
    common.run_main(main)
