"""CI's skip check (tests/world/skipcheck.py, on with STSMILTER_STRICT_SKIPS=1): a skip
the allow-list does not name fails the run and names the test; an allowed one does not;
a run where nothing passed fails. Each case is a small pytest session of its own in a
temporary directory, with the same plugin."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

CONFTEST = f'''
import os, sys
from pathlib import Path
sys.path.insert(0, {str(TESTS)!r})
from world import skipcheck

def pytest_configure(config):
    if os.environ.get("STSMILTER_STRICT_SKIPS") == "1":
        allowed = skipcheck.read_allowed_skips(Path(__file__).with_name("allowed.txt"))
        config.pluginmanager.register(skipcheck.SkipCheck(allowed, "allowed.txt"), "skip-check")
'''

MODULE = '''
import os, pytest

def test_passes():
    pass

def test_no_tool():
    pytest.skip("frobnicate not installed")

@pytest.mark.skipif(True, reason="only elsewhere")
def test_marked():
    pass
'''


def session(tmp_path, allowed, module=MODULE, strict="1", **env):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "allowed.txt").write_text(allowed)
    (tmp_path / "test_inner.py").write_text(module)
    environ = {k: v for k, v in os.environ.items() if k not in ("STSMILTER_STRICT_SKIPS", "PYTEST_ADDOPTS")}
    environ.update(env, STSMILTER_STRICT_SKIPS=strict)
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-p", "no:randomly",
                          "--rootdir", str(tmp_path), str(tmp_path)], cwd=tmp_path, env=environ,
                         capture_output=True, text=True, timeout=120)
    return run.returncode, run.stdout + run.stderr


BOTH = ("test_inner.py::test_no_tool :: ^frobnicate not installed$\n"
        "test_inner.py::test_mark* :: only elsewhere\n")


def test_allowed_skips_pass(tmp_path):
    code, out = session(tmp_path, "# comment\n\n" + BOTH)
    assert code == 0, out
    assert "1 passed, 2 skipped" in out and "UNEXPECTED SKIP" not in out


def test_a_skip_not_allowed_fails_the_run_and_is_named(tmp_path):
    code, out = session(tmp_path, "test_inner.py::test_no_tool :: ^frobnicate not installed$\n")
    assert code == 1, out
    assert "UNEXPECTED SKIP test_inner.py::test_marked: only elsewhere" in out
    assert "test_no_tool" not in out.split("UNEXPECTED SKIP", 1)[1]


def test_the_reason_must_match_too(tmp_path):
    code, out = session(tmp_path, "test_inner.py::test_no_tool :: ^gadget not installed$\n"
                                  "test_inner.py::test_marked :: only elsewhere\n")
    assert code == 1 and "UNEXPECTED SKIP test_inner.py::test_no_tool: frobnicate not installed" in out, out


def test_an_entry_for_one_run_only(tmp_path):
    allowed = BOTH.replace("only elsewhere\n", "only elsewhere :: unset SECOND_RUN\n")
    assert session(tmp_path, allowed)[0] == 0
    code, out = session(tmp_path, allowed, SECOND_RUN="1")
    assert code == 1 and "UNEXPECTED SKIP test_inner.py::test_marked" in out, out


def test_a_module_skipped_at_collection_is_caught(tmp_path):
    module = 'import pytest\npytest.skip("no such library", allow_module_level=True)\n'
    code, out = session(tmp_path, BOTH, module=module)
    assert code in (1, 5) and "UNEXPECTED SKIP test_inner.py: no such library" in out, out  # 5: nothing collected


def test_a_run_where_nothing_passed_fails(tmp_path):
    module = MODULE.replace("def test_passes():\n    pass\n", "")
    code, out = session(tmp_path, BOTH, module=module)
    assert code == 1 and "no test passed" in out, out


def test_a_failure_keeps_its_exit_status(tmp_path):
    module = MODULE + "\ndef test_fails():\n    assert False\n"
    assert session(tmp_path, "x :: y\n", module=module)[0] == 1


def test_off_without_the_variable(tmp_path):
    code, out = session(tmp_path, "", strict="")
    assert code == 0 and "UNEXPECTED" not in out, out


@pytest.mark.parametrize("line", ["no separator", "a :: b :: sometimes", "a :: b :: unset"])
def test_a_malformed_allow_list_is_a_usage_error(tmp_path, line):
    code, out = session(tmp_path, line + "\n")
    assert code == 4 and "allowed.txt:1: expected" in out, out
