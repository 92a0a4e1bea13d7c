"""A root start cannot be turned against root: real daemon subprocesses started as root
(dropping to nobody), real symlinks planted where its files go, pointing at a root-owned
file that must come out unchanged, and pre-existing directories that must keep their
owner and mode."""

import grp
import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from world.daemon import DaemonProcess, free_port, poll_until, scrape

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
            f"[cache]\npath = {values['cache']}\n"
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

    def start(self, **overrides) -> DaemonProcess:
        return DaemonProcess(self.config(**overrides), str(self.base / "log")).start()


@pytest.fixture
def box():
    base = Path(tempfile.mkdtemp(prefix="stsmilter-priv-"))
    base.chmod(0o755)
    started = []
    b = Box(base)
    original_start = b.start

    def start(**overrides):
        daemon = original_start(**overrides)
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


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
def test_a_symlink_at_the_cache_file_is_refused_and_never_followed(box, suffix):
    box.service_dir(box.state)
    link = Path(f"{box.cache}{suffix}")
    link.symlink_to(box.target)
    line = refused(box.start())
    assert "[cache] path" in line and f"{link} is a symbolic link" in line
    assert box.target_untouched() and link.is_symlink()


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
