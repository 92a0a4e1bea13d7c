"""Shared fixtures: every tests/world/fixtures_*.py module is a pytest plugin.

With STSMILTER_STRICT_SKIPS=1 (sh contrib/bootstrap.sh test sets it, so CI has it) a
skip that tests/skips-allowed.txt does not list fails the run, naming the test and its
reason, and so does a run in which no test passed (tests/world/skipcheck.py)."""

import os
import pkgutil
from pathlib import Path

import world
from world import skipcheck

pytest_plugins = sorted(
    f"world.{module.name}" for module in pkgutil.iter_modules(world.__path__) if module.name.startswith("fixtures_")
)

ALLOWED_SKIPS = Path(__file__).with_name("skips-allowed.txt")


def pytest_configure(config):
    if os.environ.get("STSMILTER_STRICT_SKIPS") == "1":
        config.pluginmanager.register(skipcheck.SkipCheck(skipcheck.read_allowed_skips(ALLOWED_SKIPS)),
                                      "stsmilter-skip-check")
