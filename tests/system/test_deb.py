"""The Debian package as an administrator meets it: `make deb`, lintian, `apt-get install
./dist/stsmilter_*.deb`, the daemon started by its own init script, `man stsmilter`,
`apt-get purge stsmilter`.

This changes the machine (it installs and purges a package), so it runs only as root on
Debian, refuses a machine where stsmilter is already installed or configured, takes a
machine-wide lock against a parallel run (several checkouts share these machines), and
stops the daemon and purges the package in its teardown whatever failed. The only change
to the installed files is the three ports in /etc/stsmilter/stsmilter.conf (free ones,
picked at run time), so that it cannot clash with anything listening on the defaults.
"""

import contextlib
import fcntl
import fnmatch
import json
import os
import pwd
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from stsmilter import __version__
from stsmilter.engine.policy import Policy
from stsmilter.engine.store import SqliteStore, make_entry
from world import milter_client, socketmap_client
from world.daemon import free_port, scrape
from world import paths

# Building may first install the build dependencies with apt (make deb-deps).
pytestmark = [pytest.mark.integration, pytest.mark.deb, pytest.mark.timeout(900)]

ROOT = paths.ROOT
DEB_NAME = f"stsmilter_{__version__}_all.deb"
CONF = Path("/etc/stsmilter/stsmilter.conf")
INIT = Path("/etc/init.d/stsmilter")
PIDFILE = Path("/run/stsmilter/stsmilter.pid")
LOGFILE = Path("/var/log/stsmilter.log")
LOCK = "/run/lock/stsmilter-deb-test.lock"
PACKAGE_GECOS = "stsmilter MTA-STS milter (package)"  # debian/stsmilter.postinst
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# Everything the package puts on the machine (and purge must take away again).
INSTALLED = [
    "/usr/bin/stsmilter",
    "/usr/lib/python3/dist-packages/stsmilter/engine/__init__.py",
    "/etc/stsmilter/stsmilter.conf",
    "/etc/init.d/stsmilter",
    "/etc/default/stsmilter",
    "/etc/logrotate.d/stsmilter",
    "/lib/systemd/system/stsmilter.service",
    "/usr/share/man/man8/stsmilter.8.gz",
    "/usr/share/man/man5/stsmilter.conf.5.gz",
    "/usr/share/doc/stsmilter/copyright",
    "/usr/share/doc/stsmilter/examples/main.cf.snippet",
    "/var/lib/stsmilter",
]


def run(argv, timeout=300, check=True, **kwargs):
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH=SYSTEM_PATH)
    env.update(kwargs.pop("env", {}))
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def package_status() -> str:
    """dpkg's status of stsmilter: 'installed', 'config-files', ... or 'not-installed'."""
    result = run(["dpkg-query", "-W", "-f", "${db:Status-Status}", "stsmilter"], check=False)
    return result.stdout.strip() if result.returncode == 0 else "not-installed"


def apt_get(*args, cwd=None):
    return run(["apt-get", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=600", *args],
               timeout=900, cwd=cwd)


def dpkg_excludes(path: str) -> bool:
    """True if a path-exclude in /etc/dpkg/dpkg.cfg.d (e.g. Docker's slim images drop
    /usr/share/man) keeps dpkg from unpacking path."""
    excluded = False
    for config in sorted(Path("/etc/dpkg/dpkg.cfg.d").glob("*")):
        for line in config.read_text(errors="replace").splitlines():
            m = re.fullmatch(r"\s*path-(exclude|include)[\s=]+(\S+)\s*", line)
            if m and fnmatch.fnmatch(path, m.group(2)):
                excluded = m.group(1) == "exclude"
    return excluded


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_until(predicate, timeout=15.0, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def milter_negotiates(port: int) -> bool:
    """Send a milter option negotiation (SMFIC_OPTNEG, protocol version 6) and read
    the milter's answer, as an MTA does first on every connection."""
    with milter_client.connect(f"inet:{port}@127.0.0.1") as conn:
        conn.sendall(milter_client.OPTNEG)
        command, data = milter_client.read_packet(conn)
    return command == b"O" and struct.unpack("!I", data[:4])[0] == 6


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@contextlib.contextmanager
def machine_lock(timeout=600.0):
    with open(LOCK, "w") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"another run holds {LOCK}")
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ours(user) -> bool:
    return user.pw_gecos.split(",")[0] == PACKAGE_GECOS  # adduser appends ",,,"


def stop_daemon(state) -> None:
    """What the package's prerm does where policy-rc.d lets it (here it may not): stop
    the daemon with the init script; then make sure every daemon this test started is gone."""
    if INIT.exists():
        run(["sh", str(INIT), "stop"], check=False, timeout=60)
    for pid in state["pids"]:
        if pid_alive(pid):
            os.kill(pid, 9)
            wait_until(lambda: not pid_alive(pid), what=f"pid {pid} to die")


def stop_and_purge(state) -> None:
    """Teardown, also after a failed step: no daemon, no package, no user of ours."""
    stop_daemon(state)
    if package_status() != "not-installed":
        apt_get("purge", "stsmilter")
    if not state["user_existed"]:
        with contextlib.suppress(KeyError):
            if ours(pwd.getpwnam("stsmilter")):
                run(["deluser", "--system", "stsmilter"], check=False)


@pytest.fixture(scope="module")
def package():
    """`make deb` into a temporary dist/; the path of the .deb."""
    if os.geteuid() != 0:
        pytest.skip("building and installing the package needs root")
    for tool in ("apt-get", "dpkg", "make"):
        if shutil.which(tool, path=SYSTEM_PATH) is None:
            pytest.skip(f"{tool} not installed: not a Debian machine set up by contrib/bootstrap.sh")
    work = tempfile.mkdtemp(prefix="stsmilter-deb-")
    os.chmod(work, 0o755)  # apt reads the .deb as user _apt
    try:
        run(["make", "-C", str(ROOT), "deb", f"DIST={work}/dist"], timeout=900)
        deb = Path(work) / "dist" / DEB_NAME
        assert deb.is_file()
        yield deb
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def installed(package):
    """The package installed with apt, its daemon stopped, free ports in its configuration."""
    if Path("/run/systemd/system").exists():
        pytest.skip("systemd is the init system here: /etc/init.d/stsmilter would hand over to systemctl")
    with machine_lock():
        if package_status() != "not-installed" or Path("/etc/stsmilter").exists():
            pytest.skip("stsmilter is installed or configured on this machine: not touching it")
        try:
            pwd.getpwnam("stsmilter")
            user_existed = True
        except KeyError:
            user_existed = False
        state = {"user_existed": user_existed, "logfile_existed": LOGFILE.exists(), "pids": []}
        try:
            apt_get("install", f"./dist/{DEB_NAME}", cwd=package.parent.parent)
            assert package_status() == "installed"
            # Where apt may start services, the daemon runs now on the default ports.
            run(["sh", str(INIT), "stop"], timeout=60)
            text = CONF.read_text()
            ports = {"milter": free_port(), "socketmap": free_port(), "metrics": free_port()}
            for old, new in (
                ("socket = inet:8894@127.0.0.1\n", f"socket = inet:{ports['milter']}@127.0.0.1\n"),
                ("listen = inet:127.0.0.1:8461\n", f"listen = inet:127.0.0.1:{ports['socketmap']}\n"),
                ("listen = 127.0.0.1:9464\n", f"listen = 127.0.0.1:{ports['metrics']}\n"),
            ):
                assert text.count(old) == 1, old
                text = text.replace(old, new)
            CONF.write_text(text)
            state["ports"] = ports
            state["deb"] = package
            yield state
        finally:
            stop_and_purge(state)


# -- the .deb -------------------------------------------------------------------------


def test_package_metadata_and_contents(package):
    fields = {name: run(["dpkg-deb", "-f", str(package), name]).stdout.strip()
              for name in ("Package", "Version", "Architecture", "Depends")}
    assert (fields["Package"], fields["Version"], fields["Architecture"]) == ("stsmilter", __version__, "all")
    depends = {d.strip().split()[0] for d in fields["Depends"].split(",")}
    assert {"python3-milter", "python3-dnspython", "python3-cachetools", "python3-prometheus-client",
            "python3-idna", "adduser"} <= depends
    listing = run(["dpkg-deb", "-c", str(package)]).stdout
    paths = {line.split()[5].lstrip(".").rstrip("/") for line in listing.splitlines()}
    assert set(INSTALLED) <= paths, set(INSTALLED) - paths
    modules = {f"/usr/lib/python3/dist-packages/{p.relative_to(ROOT)}" for p in (ROOT / "stsmilter").rglob("*.py")}
    assert modules <= paths, modules - paths  # subpackages too
    conffiles = run(["dpkg-deb", "-I", str(package), "conffiles"]).stdout.split()
    assert "/etc/stsmilter/stsmilter.conf" in conffiles
    # Shipped as they are in contrib/ (the test suite checks those files).
    work = package.parent / "unpacked"
    run(["dpkg-deb", "-x", str(package), str(work)])
    assert (work / "etc/init.d/stsmilter").read_bytes() == (ROOT / "contrib/init.d/stsmilter").read_bytes()
    assert (work / "lib/systemd/system/stsmilter.service").read_bytes() == (
        ROOT / "contrib/systemd/stsmilter.service").read_bytes()
    assert (work / "etc/stsmilter/stsmilter.conf").read_bytes() == (ROOT / "etc/stsmilter.conf").read_bytes()
    assert (work / "usr/bin/stsmilter").read_text().startswith("#!/usr/bin/python3\n")


def test_lintian_is_clean(package):
    if shutil.which("lintian", path=SYSTEM_PATH) is None:
        pytest.skip("lintian not installed")
    result = run(["lintian", "--pedantic", "--display-experimental", str(package)], check=False)
    tags = [line for line in result.stdout.splitlines() if re.match(r"[EWIPX]: ", line)]
    assert result.returncode == 0 and tags == [], result.stdout + result.stderr


# -- installed --------------------------------------------------------------------------


def test_installed_files_user_and_links(installed):
    for path in INSTALLED:
        if "/usr/share/man/" in path and dpkg_excludes(path):
            continue  # see test_man_stsmilter
        assert Path(path).exists(), path
    user = pwd.getpwnam("stsmilter")
    if not installed["user_existed"]:
        assert ours(user) and user.pw_shell == "/usr/sbin/nologin" and user.pw_uid < 1000
    state = os.stat("/var/lib/stsmilter")
    assert (state.st_uid, state.st_mode & 0o777) == (user.pw_uid, 0o750)
    assert list(Path("/etc").glob("rc2.d/S*stsmilter")), "update-rc.d defaults did not run"
    assert Path("/etc/systemd/system/multi-user.target.wants/stsmilter.service").is_symlink()
    assert "/etc/stsmilter/stsmilter.conf" in run(["dpkg-query", "-W", "-f", "${Conffiles}", "stsmilter"]).stdout
    # Debian's python3 and python3-* libraries, nothing from a venv.
    assert run(["stsmilter", "--version"]).stdout.strip() == f"stsmilter {__version__}"
    assert run(["stsmilter", "check-config", "--quiet"]).stdout == ""


def test_init_script_starts_a_daemon_that_answers(installed):
    ports = installed["ports"]
    start = run(["sh", str(INIT), "start"], check=False, timeout=60)
    assert start.returncode == 0, start.stdout + start.stderr + (LOGFILE.read_text() if LOGFILE.exists() else "")
    pid = int(PIDFILE.read_text())
    installed["pids"].append(pid)
    assert pid_alive(pid)
    uid = int(re.search(r"^Uid:\s+\d+\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))
    assert uid == pwd.getpwnam("stsmilter").pw_uid
    assert run(["sh", str(INIT), "status"], check=False).returncode == 0

    wait_until(lambda: not port_closed(ports["milter"]), what="the milter port")
    assert milter_negotiates(ports["milter"])
    # An address literal has no MTA-STS policy: answered without any DNS query.
    assert socketmap_client.ask(ports["socketmap"], "[127.0.0.1]") == "NOTFOUND "
    metrics = scrape(ports["metrics"])
    assert f'stsmilter_build_info{{version="{__version__}"}} 1.0' in metrics
    assert 'stsmilter_socketmap_lookups_total{result="notfound"} 1.0' in metrics

    # stderr goes to LOGFILE, never /dev/null; without /dev/log every line does.
    assert LOGFILE.exists() and LOGFILE.stat().st_mode & 0o777 == 0o640
    if not os.path.exists("/dev/log"):
        wait_until(lambda: f"milter on inet:{ports['milter']}@127.0.0.1" in LOGFILE.read_text(), what="start line")
        assert "log = syslog, but no /dev/log: logging to standard error" in LOGFILE.read_text()

    # reload validates the file first and leaves the daemon alone when it is bad.
    good = CONF.read_text()
    assert good.count("on_violation = tempfail\n") == 1
    CONF.write_text(good.replace("on_violation = tempfail\n", "on_violation = bounce\n"))
    try:
        refused = run(["sh", str(INIT), "reload"], check=False, timeout=60)
    finally:
        CONF.write_text(good)
    assert refused.returncode == 1 and "on_violation" in refused.stdout + refused.stderr
    assert pid_alive(pid) and int(PIDFILE.read_text()) == pid and milter_negotiates(ports["milter"])
    assert run(["sh", str(INIT), "reload"], check=False, timeout=60).returncode == 0
    if not os.path.exists("/dev/log"):
        wait_until(lambda: "configuration reloaded" in LOGFILE.read_text(), what="the reload line")
    assert "reload refused" not in LOGFILE.read_text()  # the bad file never reached the daemon

    assert run(["sh", str(INIT), "stop"], check=False, timeout=60).returncode == 0
    wait_until(lambda: not pid_alive(pid), what="the daemon to exit")
    assert all(port_closed(port) for port in ports.values())
    assert not PIDFILE.exists()


def test_init_script_runs_a_socketmap_only_daemon_imported_from_postfix_mta_sts_resolver(installed):
    """The migration README describes, with the installed program: import-config turns the
    resolver's shipped Docker configuration into a socketmap-only stsmilter.conf (no
    milter), which the package's init script starts, reloads and stops."""
    ports = installed["ports"]
    good = CONF.read_text()
    peer_yml = paths.DATA / "peer-configs" / "docker-config.yml"
    imported = run(["stsmilter", "import-config", "--listen", f"inet:127.0.0.1:{ports['socketmap']}", str(peer_yml)])
    assert imported.stderr == ""
    CONF.write_text(imported.stdout + f"\n[metrics]\nlisten = 127.0.0.1:{ports['metrics']}\n")
    try:
        assert run(["stsmilter", "check-config", "--quiet"]).stdout == ""
        start = run(["sh", str(INIT), "start"], check=False, timeout=60)
        assert start.returncode == 0, start.stdout + start.stderr + (LOGFILE.read_text() if LOGFILE.exists() else "")
        pid = int(PIDFILE.read_text())
        installed["pids"].append(pid)
        assert run(["sh", str(INIT), "status"], check=False).returncode == 0
        wait_until(lambda: not port_closed(ports["socketmap"]), what="the socketmap port")
        assert socketmap_client.ask(ports["socketmap"], "[127.0.0.1]") == "NOTFOUND "
        assert port_closed(ports["milter"])  # [milter] socket is empty: no milter at all
        metrics = scrape(ports["metrics"])
        assert 'stsmilter_socketmap_answers_total{kind="notfound",map="default"} 1.0' in metrics
        if not os.path.exists("/dev/log"):
            wait_until(lambda: "no milter ([milter] socket is empty)" in LOGFILE.read_text(), what="start line")
        assert run(["sh", str(INIT), "reload"], check=False, timeout=60).returncode == 0
        assert pid_alive(pid) and socketmap_client.ask(ports["socketmap"], "[127.0.0.1]") == "NOTFOUND "
        assert run(["sh", str(INIT), "stop"], check=False, timeout=60).returncode == 0
        wait_until(lambda: not pid_alive(pid), what="the daemon to exit")
        assert not PIDFILE.exists() and port_closed(ports["socketmap"])
    finally:
        stop_daemon(installed)
        CONF.write_text(good)


def test_man_stsmilter(installed):
    page = "/usr/share/man/man8/stsmilter.8.gz"
    if dpkg_excludes(page):
        pytest.skip("dpkg here excludes /usr/share/man (path-exclude in /etc/dpkg/dpkg.cfg.d): the package "
                    "ships the pages (test_package_metadata_and_contents) but dpkg does not unpack them")
    if shutil.which("man", path=SYSTEM_PATH) is None:
        pytest.skip("man-db not installed")
    env = {"MANPAGER": "cat", "MANWIDTH": "80", "LANG": "C.UTF-8"}
    assert run(["man", "-w", "stsmilter"], env=env).stdout.strip() == page
    assert run(["man", "-w", "stsmilter.conf"], env=env).stdout.strip() == "/usr/share/man/man5/stsmilter.conf.5.gz"
    text = run(["man", "stsmilter"], env=env).stdout
    assert "SYNOPSIS" in text and "stsmilter check-config" in text


def cached_domains() -> list:
    """The domains `stsmilter cache list` (the installed one, no daemon running) reads."""
    listing = run(["stsmilter", "cache", "list", "--json"])
    assert "cached polic" in listing.stderr, listing.stderr  # from the file, not a daemon
    return [entry["domain"] for entry in json.loads(listing.stdout)]


def test_reinstall_and_remove_keep_the_configuration_and_the_cache(installed):
    """An upgrade to the same version, `apt-get remove` and a new install keep the
    administrator's stsmilter.conf (a conffile: here, with its changed ports) and the
    policy cache; remove takes the program away, purge (next test) the rest."""
    stop_daemon(installed)
    conf = CONF.read_text()
    cache = Path("/var/lib/stsmilter/cache.sqlite")
    store = SqliteStore(str(cache))
    store.put(make_entry("kept.example", "id1", Policy("STSv1", "enforce", 86400, ("mx.kept.example",)),
                         fetched_at=time.time()))
    store.close()
    user = pwd.getpwnam("stsmilter")
    for path in Path("/var/lib/stsmilter").iterdir():  # as the daemon would have written it
        os.chown(path, user.pw_uid, user.pw_gid)
    assert cached_domains() == ["kept.example"]
    deb = f"./dist/{DEB_NAME}"

    apt_get("install", "--reinstall", deb, cwd=installed["deb"].parent.parent)
    assert package_status() == "installed"
    assert CONF.read_text() == conf
    assert cached_domains() == ["kept.example"]

    apt_get("remove", "stsmilter")
    assert package_status() == "config-files"
    assert not os.path.lexists("/usr/bin/stsmilter")
    # The init script is a conffile too: removed-not-purged, it does nothing, successfully.
    assert INIT.exists() and run(["sh", str(INIT), "start"], check=False, timeout=60).returncode == 0
    assert not PIDFILE.exists()
    assert CONF.read_text() == conf and cache.is_file() and pwd.getpwnam("stsmilter") == user

    apt_get("install", deb, cwd=installed["deb"].parent.parent)
    assert package_status() == "installed"
    assert CONF.read_text() == conf
    assert cached_domains() == ["kept.example"]
    state = os.stat("/var/lib/stsmilter")
    assert (state.st_uid, state.st_mode & 0o777) == (user.pw_uid, 0o750)


def test_purge_removes_what_the_package_created(installed):
    stop_daemon(installed)  # prerm's own stop may be refused by policy-rc.d here
    apt_get("purge", "stsmilter")
    assert package_status() == "not-installed"
    for path in INSTALLED + ["/etc/stsmilter", "/run/stsmilter"]:
        assert not os.path.lexists(path), path
    if not installed["logfile_existed"]:
        assert not LOGFILE.exists()
    assert not list(Path("/etc").glob("rc?.d/*stsmilter"))
    assert not os.path.lexists("/etc/systemd/system/multi-user.target.wants/stsmilter.service")
    try:
        pwd.getpwnam("stsmilter")
        user_left = True
    except KeyError:
        user_left = False
    assert user_left == installed["user_existed"]  # ours is gone, someone else's is kept
