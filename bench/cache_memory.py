"""Memory per cached policy: 100 000 policies through the real cache code.

Each policy is built the way a fetch builds it: the TXT record goes through
policy.parse_txt, the policy file through policy.parse_policy, then
store.make_entry(...) and PolicyCache.put(...). Realistic inputs: domains of 8-30
characters, TXT ids of 8-20 characters, 2-4 mx patterns per policy (own names such as
mx1.<domain> or *.<domain> mixed with shared provider names such as
*.mail.protection.outlook.com), modes enforce/testing/none, max_age 1 day to 1 year.

Each variant runs in a fresh interpreter (this script re-executed with --variant), so
freed memory of one cannot hide another's growth:
  memory: PolicyCache over MemoryStore ([cache] path empty): RSS growth per policy.
  sqlite: PolicyCache over SqliteStore (the default): RSS growth per policy (memory LRU +
          sqlite page cache) and the sqlite file size per policy (after close).
RSS comes from /proc/self/statm after gc.collect(), before and after.
Last line: rss_per_policy_bytes=<memory variant>.
"""

import gc
import json
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

N = 100_000
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


def rss() -> int:
    with open("/proc/self/statm") as f:
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
    from stsmilter import policy
    from stsmilter.cache import PolicyCache
    from stsmilter.store import make_entry

    cache = PolicyCache(store, max_entries=max(200_000, n), negative_ttl=300, failure_backoff=300)
    rng = random.Random(8461)
    now = time.time()
    lengths = [0, 0, 0]
    for index in range(n):
        domain, txt, body = inputs(rng, index)
        record = policy.parse_txt([txt])
        parsed = policy.parse_policy(body)
        entry = make_entry(domain, record.id, parsed, fetched_at=now - rng.randrange(0, 86400))
        cache.put(entry)
        lengths[0] += len(domain)
        lengths[1] += len(record.id)
        lengths[2] += len(parsed.mx)
    return cache, [x / n for x in lengths]


def variant(name: str, directory: str) -> dict:
    from stsmilter.store import MemoryStore, SqliteStore

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


def run_variant(name: str, root) -> dict:
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--variant", name, str(root)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"variant {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    print(f"# cache_memory: {common.machine()}; {N} policies per variant")
    with common.bench_session("memory") as (root, _stack):
        results = [run_variant("memory", root), run_variant("sqlite", root), run_variant("memory", root)]
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
    print(f"rss_per_policy_bytes={headline:.0f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--variant":
        print(json.dumps(variant(sys.argv[2], sys.argv[3])))
        sys.exit(0)
    common.run_main(main)
