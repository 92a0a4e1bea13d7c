"""A root start cannot be turned against root: real daemon subprocesses started as root
(dropping to nobody), real symlinks planted where its files go, pointing at a root-owned
file that must come out unchanged, and pre-existing directories that must keep their
owner and mode. A symlinked cache file costs persistence only: the daemon serves real
policies (the STS world) from memory."""

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from world.daemon import DaemonProcess, free_port, poll_until, sample, scrape, wait_for_port
from world.socketmap_client import ask

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="a root start needs root"),
]

NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrgid(NOBODY.pw_gid).gr_name
SECRET = b"root-owned, must not change\n"


class Box:
    """A world-traversable directory (pytest's tmp_path is 0700 root, closed to nobody)
    with a root-owned target file and a config for a root start as nobody."""

    def __init__(self, base: Path):
        self.base = base
        self.target = base / "target"
        self.target.write_bytes(SECRET)
        self.target.chmod(0o600)
        self.run, self.state = base / "run", base / "state"
        self.metrics_port = free_port()
        self.cache = self.state / "cache.sqlite"
        self.pidfile = self.run / "s.pid"
        self.socket = f"inet:{free_port()}@127.0.0.1"
        self.socketmap = ""

    def target_untouched(self) -> bool:
        st = os.lstat(self.target)
        return (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600) and self.target.read_bytes() == SECRET

    def config(self, **overrides) -> str:
        values = {"user": "nobody", "group": NOGROUP, "pidfile": self.pidfile, "socket": self.socket,
                  "cache": self.cache, "socketmap": self.socketmap, "metrics": f"127.0.0.1:{self.metrics_port}"}
        values.update(overrides)
        path = self.base / "s.conf"
        path.write_text(
            f"[daemon]\nuser = {values['user']}\ngroup = {values['group']}\npidfile = {values['pidfile']}\n"
            "log = stderr\n"
            f"[milter]\nsocket = {values['socket']}\n"
            f"[cache]\npath = {values['cache']}\n" + (f"redis = {values['redis']}\n" if values.get("redis") else "") +
            f"[socketmap]\nlisten = {values['socketmap']}\n"
            f"[metrics]\nlisten = {values['metrics']}\n"
            "[dns]\nnameservers = 127.0.0.1\nport = 9\ntimeout = 0.5\n"
        )
        path.chmod(0o644)
        return str(path)

    def service_dir(self, path: Path) -> Path:
        """A directory as a previous run of the daemon left it."""
        path.mkdir(mode=0o750)
        os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
        return path

    def world_config(self, world, socketmap_port: int) -> str:
        """A config for a root start as nobody that fetches from the STS world (its CA
        copied where nobody can read it: pytest's tmp_path is closed to nobody)."""
        ca_file = self.base / "ca.pem"
        shutil.copyfile(world.https.ca_file, ca_file)
        ca_file.chmod(0o644)
        path = self.base / "world.conf"
        path.write_text(world.config_text(
            cache_path=str(self.cache),
            daemon={"user": "nobody", "group": NOGROUP, "pidfile": str(self.pidfile), "log": "stderr"},
            fetch={"ca_file": str(ca_file)},
            milter={"socket": self.socket},
            socketmap={"listen": f"inet:127.0.0.1:{socketmap_port}"},
            metrics={"listen": f"127.0.0.1:{self.metrics_port}"},
        ))
        path.chmod(0o644)
        return str(path)

    def start(self, config=None, **overrides) -> DaemonProcess:
        return DaemonProcess(config or self.config(**overrides), str(self.base / "log")).start()


@pytest.fixture
def box():
    base = Path(tempfile.mkdtemp(prefix="stsmilter-priv-"))
    base.chmod(0o755)
    started = []
    b = Box(base)
    original_start = b.start

    def start(config=None, **overrides):
        daemon = original_start(config, **overrides)
        started.append(daemon)
        return daemon

    b.start = start
    yield b
    for daemon in started:
        daemon.stop()
    shutil.rmtree(base, ignore_errors=True)


def refused(daemon) -> str:
    """The daemon exits 2 with exactly one log line; that line."""
    assert daemon.proc.wait(20) == 2, daemon.log()
    lines = daemon.log().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def serving(box, daemon) -> None:
    poll_until(lambda: daemon.proc.poll() is not None or _scrape_ok(box.metrics_port), 20, "metrics",
               detail=daemon.log)
    assert daemon.proc.poll() is None, daemon.log()


def _scrape_ok(port) -> bool:
    try:
        return "stsmilter_cache_entries" in scrape(port)
    except OSError:
        return False


def files_in(directory: Path) -> dict:
    """name -> (kind, owner, mode, content or link target): what a start must not change."""
    found = {}
    for name in sorted(os.listdir(directory)):
        st = os.lstat(directory / name)
        what = os.readlink(directory / name) if stat.S_ISLNK(st.st_mode) else (directory / name).read_bytes()
        found[name] = (stat.S_IFMT(st.st_mode), st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), what)
    return found


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
def test_a_symlink_at_the_cache_file_is_never_followed_and_the_daemon_serves(box, sts_world, suffix):
    """The store is best-effort persistence: a symlink there must not stop the mail. The
    daemon starts, answers an enforce policy from memory, leaves the link and its target
    alone, and says so in one line and a metric. With only the -wal or -shm linked, the
    cache file itself is fine: sqlite would open the companion through the link, so the
    store must refuse before it opens anything."""
    box.service_dir(box.state)
    if suffix:  # a cache file as a previous run left it
        from stsmilter.engine.store import SqliteStore

        SqliteStore(str(box.cache)).close()
        os.chown(box.cache, NOBODY.pw_uid, NOBODY.pw_gid)
    link = Path(f"{box.cache}{suffix}")
    link.symlink_to(box.target)
    before = files_in(box.state)
    sts_world.publish("enforce.example", "e1")
    port = free_port()
    daemon = box.start(box.world_config(sts_world, port))
    serving(box, daemon)
    wait_for_port(port, daemon.proc)
    with open(f"/proc/{daemon.pid}/status") as f:
        assert f"Uid:\t{NOBODY.pw_uid}\t{NOBODY.pw_uid}\t" in f.read()

    secure = "OK secure match=mx.enforce.example servername=hostname"
    assert ask(port, "enforce.example") == secure
    sts_world.dns.remove("_mta-sts.enforce.example", "TXT")  # from now on only the cache knows it
    assert ask(port, "enforce.example") == secure
    metrics = scrape(box.metrics_port)
    assert sample(metrics, "stsmilter_store_errors_total", op="open") == 1
    assert sample(metrics, "stsmilter_policy_fetches_total", result="ok") == 1

    lines = daemon.log().strip().splitlines()
    warnings = [line for line in lines if " WARNING " in line or " ERROR " in line]
    assert len(warnings) == 1, lines
    assert f"cache {box.cache}: {link} is a symbolic link: not following it" in warnings[0]
    assert "memory only" in warnings[0]
    assert "Traceback" not in daemon.log()
    assert daemon.stop() == 0
    assert box.target_untouched() and link.is_symlink()
    assert files_in(box.state) == before  # nothing created, moved aside, written or re-owned


@pytest.mark.parametrize("which", ["milter", "socketmap"])
def test_a_symlink_at_a_unix_socket_is_refused_and_never_followed(box, which):
    box.service_dir(box.run)
    link = box.run / "listen.sock"
    link.symlink_to(box.target)
    key = {"milter": "socket", "socketmap": "socketmap"}[which]
    value = f"unix:{link}"
    line = refused(box.start(**{key: value}))
    assert f"[{which}]" in line and f"{link} exists and is a symbolic link" in line
    assert box.target_untouched() and link.is_symlink()


def test_a_symlink_at_the_pidfile_is_replaced_not_followed(box):
    box.service_dir(box.run)
    box.pidfile.symlink_to(box.target)
    daemon = box.start()
    serving(box, daemon)
    poll_until(lambda: not box.pidfile.is_symlink(), 10, "the PID file")
    st = os.lstat(box.pidfile)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == NOBODY.pw_uid
    assert box.pidfile.read_text() == f"{daemon.pid}\n"
    assert box.target_untouched()
    assert daemon.stop() == 0
    assert not box.pidfile.exists() and box.target_untouched()


def test_existing_directories_keep_their_owner_and_mode(box):
    """Neither the directories nor what their symlinks point to are handed to the
    service user; the daemon uses them as they are (here group-writable for it)."""
    shared_gid = NOBODY.pw_gid
    real_state = box.base / "real-state"
    for directory in (box.run, real_state):
        directory.mkdir()
        os.chown(directory, 0, shared_gid)
        directory.chmod(0o770)
    box.state.symlink_to(real_state)
    daemon = box.start(socket=f"unix:{box.run}/milter.sock")
    serving(box, daemon)
    poll_until(lambda: (box.run / "milter.sock").exists(), 10, "the milter socket")
    for directory in (box.run, real_state):
        st = os.stat(directory)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, shared_gid, 0o770), directory
    assert os.lstat(box.state).st_uid == 0
    # What the daemon creates inside is its user's.
    assert os.stat(box.cache).st_uid == NOBODY.pw_uid
    assert os.stat(box.run / "milter.sock").st_uid == NOBODY.pw_uid
    assert daemon.stop() == 0


def test_directories_it_creates_belong_to_the_service_user_mode_0750(box):
    daemon = box.start(socket=f"unix:{box.run}/milter.sock")
    serving(box, daemon)
    for directory in (box.run, box.state):
        st = os.lstat(directory)
        assert stat.S_ISDIR(st.st_mode)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY.pw_uid, NOBODY.pw_gid, 0o750)
    assert daemon.stop() == 0


@pytest.mark.parametrize("key", ["cache", "pidfile", "socket", "socketmap"])
def test_only_the_last_directory_is_created(box, key):
    typo = box.base / "typo"
    path = typo / "dir" / "file"
    value = {"cache": path, "pidfile": path, "socket": f"unix:{path}", "socketmap": f"unix:{path}"}[key]
    line = refused(box.start(**{key: value}))
    label = {"cache": "[cache] path", "pidfile": "[daemon] pidfile", "socket": "[milter] socket",
             "socketmap": "[socketmap] listen"}[key]
    assert label in line and f"{typo} does not exist" in line
    assert not typo.exists()


def test_a_directory_the_service_user_cannot_write_is_refused(box):
    box.run.mkdir(mode=0o755)  # root's
    line = refused(box.start())
    assert f"[daemon] pidfile = {box.pidfile}: user nobody cannot create files in {box.run}" in line
    assert os.stat(box.run).st_uid == 0


def test_a_symlink_at_the_control_socket_is_refused_and_never_followed(box):
    box.service_dir(box.run)
    link = box.run / "s.ctl"
    link.symlink_to(box.target)
    line = refused(box.start())
    assert f"[daemon] pidfile = {box.pidfile} (control socket {link})" in line and "symbolic link" in line
    assert box.target_untouched() and link.is_symlink()


def test_a_root_start_on_redis_talks_to_it_and_to_the_cli_as_the_service_user(box, redis_server):
    """redis-py imports some modules on first use: they must be loaded before the drop
    (the interpreter here is one nobody cannot read)."""
    from stsmilter.engine.policy import Policy
    from stsmilter.engine.store import make_entry
    from stsmilter.engine.store.redis import RedisStore

    socketmap_port = free_port()
    daemon = box.start(redis=redis_server.url, socketmap=f"inet:127.0.0.1:{socketmap_port}")
    serving(box, daemon)
    control = box.run / "s.ctl"
    poll_until(control.exists, 10, "the control socket")
    st = os.lstat(control)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY.pw_uid, 0o600)
    other = RedisStore(redis_server.url)  # another daemon of the fleet fetched a policy
    other.put(make_entry("fleet.example", "f1", Policy("STSv1", "enforce", 86400, ("mx.fleet.example",)),
                         time.time()))
    other.announce("changed", "fleet.example")
    other.close()

    def listed():
        proc = subprocess.run([sys.executable, "-m", "stsmilter", "cache", "list", "-c", daemon.config_path],
                              capture_output=True, text=True, timeout=30)
        return proc.stderr == "1 policy served by the running daemon\n" and proc.stdout.startswith("fleet.example ")

    poll_until(listed, 10, "the daemon to take the policy another daemon fetched", detail=daemon.log)
    # A domain nobody knows: the domain's lock taken, released and the work announced
    # (its TXT lookup fails: there is no DNS server here).
    assert ask(socketmap_port, "unknown.example") == "NOTFOUND "
    poll_until(lambda: redis_server.client().xlen(b"stsmilter:events") == 2, 10, "the announcement")
    assert "Traceback" not in daemon.log() and "cache redis" not in daemon.log(), daemon.log()  # no store fault
    assert daemon.stop() == 0
    assert not control.exists()
