"""Python packaging: `python -m build` gives an sdist that carries the whole tree an
administrator or packager needs and a wheel that installs the program and its man
pages; the Debian packaging agrees with the code's version; the second test run of
`sh contrib/bootstrap.sh test` really uses Debian's libraries."""

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from stsmilter import __version__

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """sdist and wheel, each built straight from a clean copy of the tree (no egg-info
    left by an editable install), as Debian's pybuild builds the wheel; with the
    setuptools of this environment (no download)."""
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    tree = tmp_path_factory.mktemp("tree") / "stsmilter"
    shutil.copytree(ROOT, tree, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "dist", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out), str(tree)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sdist, = out.glob("stsmilter-*.tar.gz")
    wheel, = out.glob("stsmilter-*-py3-none-any.whl")
    return sdist, wheel


def test_sdist_carries_the_whole_tree(dists):
    sdist, _ = dists
    assert sdist.name == f"stsmilter-{__version__}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for path in ("LICENSE", "README.rst", "HACKING.rst", "pyproject.toml", "setup.py", "Makefile", "pytest.ini",
                 "etc/stsmilter.conf", "man/stsmilter.8", "man/stsmilter.conf.5",
                 "contrib/init.d/stsmilter", "contrib/systemd/stsmilter.service", "contrib/logrotate/stsmilter",
                 "contrib/bootstrap.sh", "contrib/postfix/main.cf.snippet", "contrib/prometheus/stsmilter-rules.yml",
                 "contrib/grafana/stsmilter-dashboard.json", "tests/conftest.py", "tests/world/dns_server.py",
                 "debian/control", "debian/rules", "stsmilter/engine/__init__.py"):
        assert path in names, path
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_installs_the_program_and_the_man_pages(dists, tmp_path):
    _, wheel = dists
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(f"stsmilter-{__version__}.dist-info/METADATA").decode()
        entry_points = z.read(f"stsmilter-{__version__}.dist-info/entry_points.txt").decode()
    data = f"stsmilter-{__version__}.data/data/share/man"
    assert {f"{data}/man8/stsmilter.8", f"{data}/man5/stsmilter.conf.5"} <= names
    assert any(n.endswith("LICENSE") and ".dist-info/" in n for n in names)
    assert "stsmilter = stsmilter.cli:main" in entry_points
    # every module of the tree, subpackages included
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "stsmilter").rglob("*.py")}
    assert modules <= names, modules - names
    assert "License: MIT" in metadata
    requires = {m.group(1).lower(): m.group(2) for m in re.finditer(
        r"^Requires-Dist: ([\w-]+) ?\(?([^;)\n]*)\)?$", metadata, re.M)}
    # Floors are what Debian 12 ships (the .deb runs on those).
    assert requires["dnspython"] == ">=2.3" and requires["prometheus-client"] == ">=0.16"
    assert requires["idna"] == ">=3.3" and requires["pymilter"] == ">=1.0.5"

    # Installed into a prefix (as into a venv): bin/ and share/man side by side, so that
    # man(1) finds the pages once bin/ is on PATH.
    prefix = tmp_path / "prefix"
    installed_before = (Path(sys.executable).parent / "stsmilter").exists()
    # --ignore-installed: without it pip first uninstalls the stsmilter of the running
    # environment (the editable install the other tests use).
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed",
                          "--prefix", str(prefix), str(wheel)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    assert (prefix / "bin" / "stsmilter").exists()
    assert (Path(sys.executable).parent / "stsmilter").exists() or not installed_before, "pip removed our install"
    assert (prefix / "share/man/man8/stsmilter.8").read_bytes() == (ROOT / "man/stsmilter.8").read_bytes()
    man = shutil.which("man")
    if man is not None:
        env = {k: v for k, v in os.environ.items() if k != "MANPATH"}
        env["PATH"] = f"{prefix}/bin:/usr/bin:/bin"
        found = subprocess.run([man, "-w", "stsmilter.conf"], capture_output=True, text=True, env=env, timeout=60)
        assert found.stdout.strip() == f"{prefix}/share/man/man5/stsmilter.conf.5"


def test_debian_changelog_has_the_version():
    first = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"stsmilter ({__version__}) ")


def test_debian_init_and_unit_are_the_contrib_files():
    for name, target in (("stsmilter.init", "contrib/init.d/stsmilter"),
                         ("stsmilter.service", "contrib/systemd/stsmilter.service"),
                         ("stsmilter.logrotate", "contrib/logrotate/stsmilter")):
        link = ROOT / "debian" / name
        assert link.is_symlink() and link.resolve() == (ROOT / target).resolve(), name


@pytest.mark.skipif(not os.environ.get("STSMILTER_DEBIAN_LIBS"),
                    reason="only in the Debian-libraries run of sh contrib/bootstrap.sh test")
def test_runtime_libraries_are_debians():
    import cachetools
    import dns
    import idna
    import Milter
    import prometheus_client

    for module in (Milter, dns, cachetools, prometheus_client, idna):
        assert module.__file__.startswith("/usr/lib/python3/dist-packages/"), module.__file__
