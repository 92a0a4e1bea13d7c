"""The skip check of CI (tests/conftest.py registers it with STSMILTER_STRICT_SKIPS=1):
a skip that the allow-list (tests/skips-allowed.txt) does not name fails the session,
each such test named with its reason, and so does a session in which no test passed."""

import fnmatch
import os
import re

import pytest


def read_allowed_skips(path, environ=os.environ):
    """[(test id pattern, reason regex)] in force with this environment."""
    allowed = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(" :: ")
        if len(parts) not in (2, 3) or (len(parts) == 3 and not re.fullmatch(r"unset \w+", parts[2].strip())):
            raise pytest.UsageError(f"{path.name}:{number}: expected 'TEST-ID :: REASON-REGEX [:: unset NAME]'")
        if len(parts) == 3 and environ.get(parts[2].split()[1]):
            continue
        allowed.append((parts[0].strip(), re.compile(parts[1].strip())))
    return allowed


def skip_reason(report):
    """The reason pytest gives for a skip ("Skipped: " left off)."""
    if isinstance(report.longrepr, tuple):
        reason = report.longrepr[2]
    else:
        reason = str(report.longrepr)
    return reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason


class SkipCheck:
    def __init__(self, allowed, source="tests/skips-allowed.txt"):
        self.allowed, self.source = allowed, source
        self.unexpected = []  # (test id, reason)
        self.passed = 0

    def allows(self, nodeid, reason):
        return any(fnmatch.fnmatchcase(nodeid, pattern) and regex.search(reason) for pattern, regex in self.allowed)

    def pytest_runtest_logreport(self, report):
        if report.passed and report.when == "call":
            self.passed += 1
        elif report.skipped and not hasattr(report, "wasxfail"):
            self._skipped(report)

    def pytest_collectreport(self, report):
        if report.skipped:  # a whole module skipped at collection
            self._skipped(report)

    def _skipped(self, report):
        reason = skip_reason(report)
        if not self.allows(report.nodeid, reason):
            self.unexpected.append((report.nodeid, reason))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session):
        if (self.unexpected or not self.passed) and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        if self.unexpected:
            terminalreporter.section(f"skips not in {self.source} (STSMILTER_STRICT_SKIPS=1)", red=True)
            for nodeid, reason in self.unexpected:
                terminalreporter.line(f"UNEXPECTED SKIP {nodeid}: {reason}", red=True)
        if not self.passed:
            terminalreporter.line("STSMILTER_STRICT_SKIPS=1: no test passed", red=True)
