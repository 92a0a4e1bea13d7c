"""stsmilter as a drop-in for postfix-mta-sts-resolver: the same answers, key by key and
zone by zone, from the peer (1.5.1, a test dependency) and from stsmilter running the
configuration `stsmilter import-config` made of the peer's (tests/world/resolver_dropin_netns.py).

The peer fetches policies from port 443 only: the whole comparison runs in a fresh
network namespace that has only loopback (unshare --net --mount), where 443 is ours and
nothing can leave the machine.
"""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from world import paths

pytestmark = pytest.mark.integration


def processes_under(directory):
    """PIDs whose command line names directory (left over only if the inner run was killed)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if directory.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"),
                    reason="needs root, unshare and ip")
@pytest.mark.timeout(300)
def test_postfix_mta_sts_resolver_and_stsmilter_give_the_same_answers():
    outer = tempfile.mkdtemp(prefix="stsmilter-dropin-")
    os.chmod(outer, 0o755)
    try:
        env = dict(os.environ, STSMILTER_NETNS="1", TMPDIR=outer)
        command = ["unshare", "--net", "--mount", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
                   sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-ra", "-s",
                   f"--basetemp={outer}/basetemp", "tests/world/resolver_dropin_netns.py"]
        proc = subprocess.run(command, cwd=paths.ROOT, env=env, capture_output=True, text=True, timeout=280)
        print(proc.stdout[-20000:])  # the side-by-side table (pytest -rP shows it)
        assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout[-10000:] + proc.stderr[-3000:]
    finally:
        for pid in processes_under(outer):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        shutil.rmtree(outer, ignore_errors=True)
