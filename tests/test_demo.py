"""contrib/demo.py (`make demo`) runs end to end, shows the right answers and leaves
nothing behind: no directory, no Postfix daemon, no stsmilter process."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from world.postfix import processes_under

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "contrib" / "demo.py"
VIOLATING = "user@bad.example"
TIMEOUT = 180


@pytest.mark.timeout(TIMEOUT)
def test_demo_runs_and_cleans_up():
    done = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True, timeout=TIMEOUT,
                          cwd=ROOT)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output

    m = re.search(r"^world: (/\S+)$", done.stdout, re.M)
    assert m, output
    world = m.group(1)
    assert os.path.isabs(world) and "stsmilter-demo-" in world

    # The table: one row per recipient, "ADDRESS  CODE ...".
    rows = dict(re.findall(r"^\s+(\S+@\S+)\s+(\d{3} \S+)", done.stdout, re.M))
    assert len(rows) >= 6, output
    assert rows.pop(VIOLATING) == "451 4.7.5", output
    assert rows and all(reply.startswith("250 ") for reply in rows.values()), rows

    assert re.search(r"^metrics \(http://127\.0\.0\.1:\d+/metrics\)$", done.stdout, re.M), output
    assert re.search(r'stsmilter_decisions_total\{action="tempfail",mode="enforce",reason="mx-mismatch"\}\s+1$',
                     done.stdout, re.M), output
    assert "stsmilter_policy_fetches_total" in done.stdout
    assert "socketmap" in done.stdout and "OK secure match=mx.good.example" in done.stdout

    assert not os.path.exists(world)
    assert processes_under(world) == []
