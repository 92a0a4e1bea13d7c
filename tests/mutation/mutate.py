"""`make mutate`: mutation testing (mutmut 3) of the modules that decide what happens to mail.

Runs mutmut in a throw-away copy of the checkout (its mutants/ tree and setup.cfg never
touch the working tree), then prints one line per module:

    mutation_score <module> <killed>/<total>

A mutant counts as killed when a test failed or timed out. Survivors judged equivalent
(no test can tell them apart from the original) are listed, each with a one-line reason,
in tests/mutation/equivalent.txt; they are left out of the total. They are matched by
content (function, original line, mutated line), not by mutmut's numbering, which
shifts whenever a function changes. Every other survivor is printed as a diff.

Exit status: 0 when every module scores at least its minimum (MIN_SCORE unless its
MODULES entry says otherwise), 1 otherwise, 2 on errors. --only FILE (repeatable) runs
only those modules. Not part of .ci/run: it takes minutes (see HACKING.rst).
"""

import argparse
import ast
import dataclasses
import difflib
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EQUIVALENT = Path(__file__).with_name("equivalent.txt")
MIN_SCORE = 0.97

# One line per mutated module: the file, the functions to mutate (mutmut's names: "x_f"
# for a function, "xǁClassǁmethod" for a method; globs allowed), its fast unit tests and,
# optionally, a dict of options:
#   "min_score": the module's own minimum (default MIN_SCORE);
#   "undecorate": decorators (plain names) that mutmut would otherwise make it skip the
#       methods they decorate (mutmut 3 mutates no decorated function): in the throw-away
#       copy "@deco def f" inside a class becomes "def f ... f = deco(f)", the same
#       function at run time, so its body is mutated like any other.
MODULES = [
    ("stsmilter/engine/policy.py", ["*"], ["tests/engine/test_policy.py"]),
    ("stsmilter/engine/decision.py", ["*"], ["tests/engine/test_decision.py", "tests/engine/test_decision_dane.py",
                                             "tests/engine/test_decision_mxtls.py"]),
    ("stsmilter/engine/tlspolicy.py", ["*"], ["tests/engine/test_tlspolicy.py"]),
    ("stsmilter/socketmap/connection.py", ["x_netstring"], ["tests/socketmap/test_socketmap.py"]),
    ("stsmilter/engine/dane.py", ["x__der_sequence", "x_usable_tlsa", "x_host_has_dane", "x_evaluate"], ["tests/engine/test_dane.py"]),
    # The MX TLS check's pure part: SMTP replies from a hostile peer, OpenSSL errors as RFC
    # 8460 results, result lifetimes and the all-hosts-fail rule.
    ("stsmilter/engine/mxtls.py", ["x_parse_line", "xǁReplyReaderǁ*", "x_offers_starttls", "x_classify_verify",
                                   "x_classify_error", "x_lifetime", "x_failing_host", "x_quote", "x_one_line_detail",
                                   "x__os_error"], ["tests/engine/test_mxtls.py"]),
    ("stsmilter/engine/cache.py", ["*"], ["tests/engine/test_cache_memory.py", "tests/engine/test_cache.py"], {"min_score": 0.90}),
    ("stsmilter/engine/negative_cache.py", ["*"], ["tests/engine/test_negative_cache.py"], {"min_score": 0.90}),
    # The fleet's single-flight lock (claim, release) and what they call; a real private
    # redis-server (tests/world/fixtures_redis.py) starts in ~50 ms.
    ("stsmilter/engine/store/redis.py", ["xǁRedisStoreǁclaim", "xǁRedisStoreǁrelease", "xǁRedisStoreǁ_lock_key"],
     ["tests/engine/test_store_redis_lock.py"], {"min_score": 0.90, "undecorate": ["redis_errors"]}),
    ("stsmilter/engine/store/redis_client.py", ["x_redis_errors", "x_failure", "x_wrong_type"],
     ["tests/engine/test_store_redis_lock.py"], {"min_score": 0.90}),
    # The engine (issue 19): the discovery state machine (RFC 8461 §3.3, §5.1) over fake DNS,
    # fetch and clock; the order in which waiting work gets a DNS or fetch slot.
    ("stsmilter/engine/discovery.py", ["*"],
     ["tests/engine/test_discovery.py", "tests/engine/test_discovery_load.py", "tests/engine/test_decision_engine.py",
      "tests/engine/test_discovery_rules.py", "tests/engine/test_fleet.py"], {"min_score": 0.95}),
    # The proactive refresh (RFC 8461 §10.2), a mixin of Discovery split out of discovery.py.
    ("stsmilter/engine/refresh.py", ["*"],
     ["tests/engine/test_discovery.py", "tests/engine/test_discovery_rules.py", "tests/engine/test_fleet.py"],
     {"min_score": 0.95}),
    ("stsmilter/engine/limits.py", ["*"], ["tests/engine/test_limits.py", "tests/engine/test_limits_order.py"],
     {"min_score": 0.95}),
    # Daemons sharing a store (issue 23): who fetches, the events thread; over a fake shared
    # store (tests/engine/test_fleet.py's FakeSharedStore).
    ("stsmilter/engine/fleet.py", ["*"], ["tests/engine/test_fleet.py", "tests/engine/test_fleet_once.py"],
     {"min_score": 0.90}),
]

KILLED = {"killed", "timeout"}


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str  # stsmilter.policy.x_parse_txt__mutmut_3
    module: str  # stsmilter.policy
    function: str  # parse_txt, or Class.method
    removed: tuple  # original lines (stripped) the mutation changed
    added: tuple  # the lines it put there


def module_name(path):
    return path[:-3].replace("/", ".")


def entry(line):
    """(path, patterns, tests, options) from a MODULES line, options filled in."""
    path, patterns, tests, *rest = line
    options = {"min_score": MIN_SCORE, "undecorate": ()}
    options.update(rest[0] if rest else {})
    return path, patterns, tests, options


def undecorate(source, names):
    """The source with "@name" moved off every method of a class it decorates alone:
    "@name\n def f(...): ..." becomes "def f(...): ...\n f = name(f)" in the class body,
    which binds the same thing; mutmut 3 then mutates f's body (it skips decorated
    functions). Raises if a name decorates nothing (a stale MODULES option)."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    edits = []  # (index of the decorator line, index after the function, the assignment)
    found = set()
    for cls in ast.walk(tree):
        if not isinstance(cls, ast.ClassDef):
            continue
        for node in cls.body:
            if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(node.decorator_list) == 1
                    and isinstance(node.decorator_list[0], ast.Name) and node.decorator_list[0].id in names):
                name = node.decorator_list[0].id
                found.add(name)
                indent = lines[node.lineno - 1][: node.col_offset]
                edits.append((node.decorator_list[0].lineno - 1, node.end_lineno,
                              f"{indent}{node.name} = {name}({node.name})\n"))
    missing = set(names) - found
    if missing:
        sys.exit(f"mutate: undecorate: {', '.join(sorted(missing))} decorates no method")
    for decorator_line, end, assignment in sorted(edits, reverse=True):
        lines.insert(end, assignment)
        del lines[decorator_line]
    return "".join(lines)


def function_of(mutant_name):
    """x_parse_txt__mutmut_3 -> parse_txt; xǁPolicyǁmatches__mutmut_1 -> Policy.matches."""
    local = mutant_name.rsplit(".", 1)[1].rsplit("__mutmut_", 1)[0]
    if local.startswith("xǁ"):
        return ".".join(local[2:].split("ǁ"))
    return local[2:]


def mutmut_config(modules, tests):
    files = "\n    ".join(path for path, _, _, _ in modules)
    selection = "\n    ".join(dict.fromkeys(tests))
    return (
        "[mutmut]\n"
        "source_paths = stsmilter\n"
        f"only_mutate =\n    {files}\n"
        # fast unit tests only: the integration tests (real servers) take seconds each
        f"pytest_add_cli_args_test_selection =\n    -m\n    not integration\n    {selection}\n"
        "pytest_add_cli_args =\n    -p\n    no:cacheprovider\n    -q\n"
    )


def copy_checkout(workdir, modules):
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "mutants", ".hypothesis")
    for name in ("stsmilter", "tests"):
        shutil.copytree(REPO / name, workdir / name, ignore=ignore)
    shutil.copy(REPO / "pytest.ini", workdir / "pytest.ini")
    for path, _, _, options in modules:
        if options["undecorate"]:
            copied = workdir / path
            copied.write_text(undecorate(copied.read_text(), options["undecorate"]))


def run_mutmut(workdir, globs, children, log):
    mutmut = Path(sys.executable).with_name("mutmut")
    if not mutmut.exists():
        sys.exit("mutate: mutmut is not installed: pip install -e '.[test,mutation]'")
    argv = [str(mutmut), "run", "--max-children", str(children), *globs]
    with open(log, "wb") as out:
        run = subprocess.run(argv, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    if run.returncode != 0:
        sys.exit(f"mutate: mutmut run failed ({run.returncode}); see {log}")
    results = subprocess.run([str(mutmut), "results", "--all", "true"], cwd=workdir, capture_output=True, text=True)
    statuses = {}
    for line in results.stdout.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep:
            statuses[name] = status
    return statuses


def function_sources(mutated_file):
    tree = ast.parse(mutated_file.read_text())
    text = mutated_file.read_text()
    return {node.name: ast.get_source_segment(text, node) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "__mutmut_" in node.name}


def describe(name, sources):
    """The Mutant for a mutmut name: what it changed, from the mutated module's source."""
    local = name.rsplit(".", 1)[1]
    base = local.rsplit("__mutmut_", 1)[0]
    original = sources[base + "__mutmut_orig"].replace(base + "__mutmut_orig", base, 1).splitlines()
    mutated = sources[local].replace(local, base, 1).splitlines()  # the def line may be mutated too
    removed, added = [], []
    for line in difflib.ndiff(original, mutated):
        if line.startswith("- "):
            removed.append(line[2:].strip())
        elif line.startswith("+ "):
            added.append(line[2:].strip())
    return Mutant(name, name.rsplit(".", 1)[0], function_of(name), tuple(removed), tuple(added))


def read_equivalents(path=EQUIVALENT):
    """{(module, function, removed, added): reason} from the blocks of equivalent.txt."""
    entries = {}
    blocks = re.split(r"\n\s*\n", "\n".join(line for line in path.read_text().splitlines()
                                             if not line.startswith("#")))
    for block in blocks:
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        module, function = lines[0].split()
        removed = tuple(line[2:].strip() for line in lines[1:] if line.startswith("- "))
        added = tuple(line[2:].strip() for line in lines[1:] if line.startswith("+ "))
        reasons = [line[4:].strip() for line in lines[1:] if line.startswith("why:")]
        if len(reasons) != 1 or not reasons[0]:
            sys.exit(f"mutate: {path.name}: the entry for {module} {function} needs one 'why:' line")
        entries[(module, function, removed, added)] = reasons[0]
    return entries


def block(mutant, reason="..."):
    lines = [f"{mutant.module} {mutant.function}"]
    lines += [f"- {line}" for line in mutant.removed] + [f"+ {line}" for line in mutant.added]
    return "\n".join(lines + [f"why: {reason}"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-j", "--children", type=int, default=os.cpu_count() or 1, help="mutmut --max-children")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (mutants/, log)")
    parser.add_argument("--only", action="append", metavar="FILE", default=[],
                        help="only this module of MODULES (e.g. stsmilter/engine/cache.py); repeatable")
    args = parser.parse_args()
    modules = [entry(line) for line in MODULES]
    unknown = set(args.only) - {path for path, _, _, _ in modules}
    if unknown:
        parser.error(f"not in MODULES: {', '.join(sorted(unknown))}")
    if args.only:
        modules = [m for m in modules if m[0] in args.only]
    equivalents = read_equivalents()
    workdir = Path(tempfile.mkdtemp(prefix="stsmilter-mutate-"))
    started = time.monotonic()
    try:
        copy_checkout(workdir, modules)
        (workdir / "setup.cfg").write_text(mutmut_config(modules, [t for _, _, tests, _ in modules for t in tests]))
        globs = [f"{module_name(path)}.{pattern}__mutmut_*" for path, patterns, _, _ in modules for pattern in patterns]
        statuses = run_mutmut(workdir, globs, args.children, workdir / "mutmut.log")
        used, below, survivors = set(), [], []
        checked = {module_name(path) for path, _, _, _ in modules}
        for path, patterns, _, options in modules:
            module = module_name(path)
            wanted = [f"{module}.{pattern}__mutmut_*" for pattern in patterns]
            names = sorted(n for n in statuses if any(fnmatch.fnmatchcase(n, w) for w in wanted))
            sources = function_sources(workdir / "mutants" / path)
            killed = equivalent = timeouts = 0
            for name in names:
                if statuses[name] == "killed":
                    killed += 1
                    continue
                mutant = describe(name, sources)
                key = (mutant.module, mutant.function, mutant.removed, mutant.added)
                if key in equivalents:  # also when it timed out: a busy machine, not a test
                    used.add(key)
                    equivalent += 1
                elif statuses[name] in KILLED:
                    killed += 1
                    timeouts += 1
                else:
                    survivors.append((statuses[name], mutant))
            total = len(names) - equivalent
            print(f"mutation_score {module} {killed}/{total}"
                  + (f" ({100.0 * killed / total:.1f} %, {equivalent} equivalent excluded, {timeouts} by timeout)"
                     if total else ""))
            if not names or killed < options["min_score"] * total:
                below.append(f"{module} ({options['min_score']:.0%})")
        for status, mutant in survivors:
            print(f"\n# {mutant.name}: {status}\n{block(mutant)}")
        for module, function, removed, added in sorted(set(equivalents) - used):
            if module not in checked:  # not run this time (--only)
                continue
            print(f"\nmutate: note: no surviving mutant matches the equivalent entry for {module} {function}"
                  f" ({' / '.join(removed)} -> {' / '.join(added)}): remove it from {EQUIVALENT.name}")
        print(f"\nmutate: {len(statuses)} mutants generated, {time.monotonic() - started:.0f} s", file=sys.stderr)
        if below:
            print(f"mutate: below its minimum: {', '.join(below)}", file=sys.stderr)
        return 1 if below else 0
    finally:
        if args.keep:
            print(f"mutate: work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
