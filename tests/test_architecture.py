"""The package map is a rule: import-linter's contracts (pyproject.toml, [tool.importlinter])
hold for the code as it is, and each fails, naming itself, when the code breaks it.

The layers, top to bottom: cli, service, the front ends milter | socketmap (independent
of each other), engine, the small helpers (config, metrics, ratelog, threads,
descriptors, unixsocket). The engine never imports pymilter. No package has an import
cycle between its modules (HACKING.rst, "Packages")."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from world import paths

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint(root: Path):
    """lint-imports on the package and the contracts under root: (exit status, output)."""
    run = subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})
    return run.returncode, run.stdout + run.stderr


def test_the_contracts_hold():
    status, output = lint(paths.ROOT)
    assert status == 0, output
    assert "Contracts: 4 kept, 0 broken." in output


@pytest.fixture
def copy(tmp_path):
    """A copy of the package and its contracts, to break on purpose."""
    shutil.copytree(paths.ROOT / "stsmilter", tmp_path / "stsmilter", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(paths.ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def add_import(root: Path, module: str, line: str) -> None:
    path = root / (module.replace(".", "/") + ".py")
    path.write_text(line + "\n" + path.read_text())


@pytest.mark.parametrize("module, line, broken", [
    # the engine reaching up into a front end: the layers, and pymilter through it
    ("stsmilter.engine.policy", "import stsmilter.milter.session",
     ["Layers: cli > service > (milter | socketmap) > engine > helpers BROKEN",
      "The engine never imports pymilter (Milter) BROKEN"]),
    # one front end importing the other
    ("stsmilter.socketmap.server", "import stsmilter.milter.wake",
     ["Layers: cli > service > (milter | socketmap) > engine > helpers BROKEN"]),
    # a helper reaching up into the service
    ("stsmilter.ratelog", "import stsmilter.service.pidfile",
     ["Layers: cli > service > (milter | socketmap) > engine > helpers BROKEN"]),
    # PyYAML anywhere but import-config
    ("stsmilter.cli.lookup", "import yaml",
     ["Only import-config imports PyYAML (yaml) BROKEN"]),
    # a cycle inside a package
    ("stsmilter.socketmap.connection", "import stsmilter.socketmap.server",
     ["No import cycle between the modules of any package BROKEN"]),
])
def test_each_contract_fails_naming_itself(copy, module, line, broken):
    add_import(copy, module, line)
    status, output = lint(copy)
    assert status != 0
    for contract in broken:
        assert contract in output, output
