"""preflight.py and pidfile.py in-process: what is refused, what is created, and how the
PID file treats symlinks, stale and foreign PIDs. (The root start itself, dropping to
another user, is tested with real daemons in test_privileges.py.)"""

import os
import pwd
import socket
import stat
import subprocess
import sys
import time

import pytest

from stsmilter import config, unixsocket
from stsmilter.service import preflight
from stsmilter.service.pidfile import Pidfile, is_stsmilter, read_pid
from stsmilter.service.preflight import StartupError


def make_config(tmp_path, **sections):
    base = {
        "daemon": {"user": "", "group": "", "pidfile": f"{tmp_path}/run/s.pid"},
        "milter": {"socket": f"unix:{tmp_path}/run/m.sock"},
        "socketmap": {"listen": f"unix:{tmp_path}/run/map.sock"},
        "cache": {"path": f"{tmp_path}/state/c.sqlite"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    text = "".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items()) for s, kv in base.items())
    return config.loads(text, "t.conf")


def test_runtime_paths_name_their_keys(tmp_path):
    cfg = make_config(tmp_path)
    assert [(p.kind, p.key, p.path) for p in preflight.runtime_paths(cfg)] == [
        ("socket", f"t.conf:6: [milter] socket = unix:{tmp_path}/run/m.sock", f"{tmp_path}/run/m.sock"),
        ("socket", f"t.conf:8: [socketmap] listen = unix:{tmp_path}/run/map.sock", f"{tmp_path}/run/map.sock"),
        ("pidfile", f"t.conf:4: [daemon] pidfile = {tmp_path}/run/s.pid", f"{tmp_path}/run/s.pid"),
        ("socket", f"t.conf:4: [daemon] pidfile = {tmp_path}/run/s.pid (control socket {tmp_path}/run/s.ctl)",
         f"{tmp_path}/run/s.ctl"),
        ("cache", f"t.conf:10: [cache] path = {tmp_path}/state/c.sqlite", f"{tmp_path}/state/c.sqlite"),
    ]
    # A key left at its default is named with the file alone.
    default_cache = config.loads(f"[daemon]\npidfile =\n[milter]\nsocket = inet:1@127.0.0.1\n", "d.conf")
    assert [p.key for p in preflight.runtime_paths(default_cache, {preflight.CACHE})] == [
        f"d.conf: [cache] path = {config.defaults().cache.path}"]
    inet = make_config(tmp_path, milter={"socket": "inet:1@127.0.0.1"}, socketmap={"listen": "127.0.0.1:2"},
                       daemon={"pidfile": ""}, cache={"path": ""})
    assert preflight.runtime_paths(inet) == []
    assert [p.kind for p in preflight.runtime_paths(cfg, {preflight.CACHE})] == ["cache"]


def test_plan_lists_each_missing_last_directory_once(tmp_path):
    assert preflight.plan(make_config(tmp_path)) == [f"{tmp_path}/run", f"{tmp_path}/state"]
    (tmp_path / "run").mkdir()
    assert preflight.plan(make_config(tmp_path)) == [f"{tmp_path}/state"]


@pytest.mark.parametrize("key, section, value", [
    ("[cache] path", "cache", {"path": "{t}/a/b/c.sqlite"}),
    ("[daemon] pidfile", "daemon", {"pidfile": "{t}/a/b/s.pid"}),
    ("[milter] socket", "milter", {"socket": "unix:{t}/a/b/m.sock"}),
    ("[socketmap] listen", "socketmap", {"listen": "unix:{t}/a/b/s.sock"}),
])
def test_a_missing_parent_is_an_error_naming_the_key(tmp_path, key, section, value):
    cfg = make_config(tmp_path, **{section: {k: v.format(t=tmp_path) for k, v in value.items()}})
    with pytest.raises(StartupError) as e:
        preflight.prepare(cfg, None)
    where = cfg.where(*key.strip("[").split("] "))
    assert where == f"t.conf:{ {'daemon': 4, 'milter': 6, 'socketmap': 8, 'cache': 10}[section]}"
    assert str(e.value).startswith(f"{where}: {key} = ") and f"{tmp_path}/a does not exist" in str(e.value)
    assert not (tmp_path / "a").exists()


def test_a_file_where_the_directory_goes_is_refused(tmp_path):
    (tmp_path / "state").write_text("")
    with pytest.raises(StartupError, match=r"\[cache\] path = .*state is not a directory"):
        preflight.plan(make_config(tmp_path))


@pytest.mark.parametrize("name", ["m.sock", "map.sock"])
def test_a_socket_path_must_be_a_socket_or_nothing(tmp_path, name):
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / name
    path.write_text("an operator's file")
    with pytest.raises(StartupError, match="exists and is not a socket"):
        preflight.plan(make_config(tmp_path))
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")  # dangling or not: never followed
    with pytest.raises(StartupError, match="exists and is a symbolic link"):
        preflight.plan(make_config(tmp_path))
    path.unlink()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # a stale socket is fine: the server replaces it
        preflight.plan(make_config(tmp_path))


@pytest.mark.parametrize("key, section, name, prefix, suffix", [
    ("[milter] socket", "milter", "socket", "unix:", ".ock"),
    ("[socketmap] listen", "socketmap", "listen", "unix:", ".ock"),
    ("[daemon] pidfile", "daemon", "pidfile", "", ".pid"),  # its control socket .ctl: as long
])
def test_a_socket_path_too_long_to_bind_is_refused_before_anything_is_created(tmp_path, key, section, name, prefix,
                                                                               suffix):
    """bind() refuses a unix socket path of more than 107 bytes (sun_path): check-config
    must refuse it as run does, and run with one line naming the key, not a bind error."""
    def config_with_path_of(size):
        directory = f"{tmp_path}/run/"
        path = directory + "s" * (size - len(directory) - len(suffix)) + suffix
        assert len(path) == size
        return make_config(tmp_path, **{section: {name: prefix + path}}), path

    cfg, path = config_with_path_of(preflight.MAX_SOCKET_PATH + 1)
    for create in (False, True):  # check-config, then run
        with pytest.raises(StartupError) as e:
            preflight.prepare(cfg, None, create=create)
        assert str(e.value).startswith(f"{cfg.where(section, name)}: {key} = ")
        assert "is longer than a unix socket path can be (108 bytes, at most 107)" in str(e.value)
    assert os.listdir(tmp_path) == []
    cfg, path = config_with_path_of(preflight.MAX_SOCKET_PATH)  # the longest that binds
    preflight.prepare(cfg, None)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path[:-len(suffix)] + ".ctl" if name == "pidfile" else path)


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
def test_a_symlinked_cache_file_is_a_warning_not_a_refusal(tmp_path, suffix):
    """The store refuses to follow it and the daemon serves from memory (test_privileges.py),
    so preflight lets the start go on; check-config reports what run will do."""
    cfg = make_config(tmp_path)
    (tmp_path / "state").mkdir()
    assert preflight.cache_warning(cfg) is None  # nothing there yet: nothing to say
    (tmp_path / "target").write_text("x")
    link = tmp_path / "state" / f"c.sqlite{suffix}"
    link.symlink_to(tmp_path / "target")
    assert preflight.prepare(cfg, None) == frozenset({f"{tmp_path}/run"})
    assert preflight.cache_warning(cfg) == (
        f"cache {tmp_path}/state/c.sqlite: {link} is a symbolic link: not following it;"
        " run starts without it and keeps policies in memory only"
    )
    assert link.is_symlink() and (tmp_path / "target").read_text() == "x"
    assert sorted(os.listdir(tmp_path / "state")) == [link.name]
    assert preflight.cache_warning(make_config(tmp_path, cache={"path": ""})) is None


def test_a_usable_cache_file_gets_no_warning(tmp_path):
    cfg = make_config(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "c.sqlite").write_bytes(b"")
    assert preflight.cache_warning(cfg) is None


def test_a_pidfile_that_is_a_directory_is_refused(tmp_path):
    (tmp_path / "run" / "s.pid").mkdir(parents=True)
    with pytest.raises(StartupError, match=r"\[daemon\] pidfile = .* is a directory"):
        preflight.plan(make_config(tmp_path))


def test_prepare_creates_mode_0750_whatever_the_umask_and_leaves_existing_ones(tmp_path):
    (tmp_path / "state").mkdir(mode=0o711)
    old = os.umask(0)
    try:
        created = preflight.prepare(make_config(tmp_path), None)
    finally:
        os.umask(old)
    assert created == {f"{tmp_path}/run"}
    assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o711


def test_check_config_mode_creates_nothing(tmp_path):
    planned = preflight.prepare(make_config(tmp_path), None, create=False)
    assert planned == {f"{tmp_path}/run", f"{tmp_path}/state"}
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_created_directory_goes_to_the_identity(tmp_path):
    nobody = pwd.getpwnam("nobody")
    identity = preflight.Identity(nobody.pw_uid, nobody.pw_gid, "nobody")
    preflight.prepare(make_config(tmp_path, cache={"path": ""}), identity)
    st = os.stat(tmp_path / "run")
    assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert os.stat(tmp_path).st_uid == 0  # its parent existed: not ours to give


def test_service_identity(monkeypatch):
    daemon = config.defaults().daemon
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert preflight.service_identity(daemon) is None  # not root: nothing to switch
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert preflight.service_identity(config.loads("[daemon]\nuser =\n").daemon) is None
    nobody = pwd.getpwnam("nobody")
    assert preflight.service_identity(config.loads("[daemon]\nuser = nobody\ngroup =\n").daemon) == \
        preflight.Identity(nobody.pw_uid, nobody.pw_gid, "nobody")
    assert preflight.service_identity(config.loads("[daemon]\nuser = nobody\ngroup = root\n").daemon).gid == 0
    with pytest.raises(StartupError, match=r"^\[daemon\] user 'no-such-user-x': no such user$"):
        preflight.service_identity(config.loads("[daemon]\nuser = no-such-user-x\n").daemon)
    with pytest.raises(StartupError, match=r"^\[daemon\] group 'no-such-group-x': no such group$"):
        preflight.service_identity(config.loads("[daemon]\nuser = nobody\ngroup = no-such-group-x\n").daemon)


def test_check_access_reads_the_ca_file(tmp_path):
    cfg = make_config(tmp_path).replace(fetch={"ca_file": f"{tmp_path}/absent.pem"})
    with pytest.raises(config.ConfigError, match=r"\[fetch\] ca_file"):
        preflight.check_access(cfg, kinds={preflight.FETCH})
    preflight.check_access(cfg, kinds={preflight.CACHE})  # not asked: not checked


def test_check_access_reads_the_probe_ca_file_when_the_probe_is_on(tmp_path):
    absent = f"{tmp_path}/absent-mx-ca.pem"
    cfg = make_config(tmp_path).replace(probe={"ca_file": absent})
    preflight.check_access(cfg, kinds={preflight.FETCH})  # [probe] enabled = no: never read
    with pytest.raises(config.ConfigError, match=r"\[probe\] ca_file " + absent + ": No such file"):
        preflight.check_access(cfg.replace(probe={"enabled": True}), kinds={preflight.FETCH})


# --- the PID file ------------------------------------------------------------------------


@pytest.fixture
def live():
    """Start a process whose argv[0] is `name`; kill it at the end."""
    procs = []

    def start(name):
        proc = subprocess.Popen([name, "60"], executable="/bin/sleep")
        procs.append(proc)
        cmdline = f"/proc/{proc.pid}/cmdline"
        deadline = time.monotonic() + 10
        while not open(cmdline, "rb").read().startswith(name.encode() + b"\0"):  # until exec'd
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return proc.pid

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_pidfile_written_and_removed(tmp_path):
    pidfile = Pidfile(str(tmp_path / "s.pid"))
    pidfile.write()
    assert (tmp_path / "s.pid").read_text() == f"{os.getpid()}\n"
    assert stat.S_IMODE(os.stat(tmp_path / "s.pid").st_mode) == 0o644
    assert os.listdir(tmp_path) == ["s.pid"]  # no temporary name left
    pidfile.remove()
    assert os.listdir(tmp_path) == []


def test_pidfile_replaces_a_symlink_without_following_it(tmp_path):
    target = tmp_path / "target"
    target.write_text("12345\n")
    (tmp_path / "s.pid").symlink_to(target)
    assert read_pid(str(tmp_path / "s.pid")) is None
    Pidfile(str(tmp_path / "s.pid")).write()
    assert not (tmp_path / "s.pid").is_symlink()
    assert target.read_text() == "12345\n"


def test_a_running_stsmilter_blocks_a_second_start(tmp_path, live):
    pid = live("stsmilter")
    assert is_stsmilter(pid)
    (tmp_path / "s.pid").write_text(f"{pid}\n")
    with pytest.raises(StartupError, match=f"already running as pid {pid}"):
        Pidfile(str(tmp_path / "s.pid")).write()


@pytest.mark.parametrize("content", ["other", "dead", "garbage", "zero"])
def test_a_stale_pidfile_is_replaced(tmp_path, live, content):
    if content == "other":
        pid = live("sleep")  # alive, but not stsmilter: the PID was reused
        assert not is_stsmilter(pid)
        text = f"{pid}\n"
    elif content == "dead":
        proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        text = proc.stdout
    else:
        text = {"garbage": "not a pid\n", "zero": "0\n"}[content]
    (tmp_path / "s.pid").write_text(text)
    Pidfile(str(tmp_path / "s.pid")).write()
    assert read_pid(str(tmp_path / "s.pid")) == os.getpid()


def test_pidfile_removed_only_while_it_is_ours(tmp_path):
    pidfile = Pidfile(str(tmp_path / "s.pid"))
    pidfile.write()
    (tmp_path / "s.pid").write_text("424242\n")  # a successor's
    pidfile.remove()
    assert (tmp_path / "s.pid").read_text() == "424242\n"


def test_pidfile_write_error_names_the_key(tmp_path):
    with pytest.raises(StartupError, match=r"^\[daemon\] pidfile = .*/absent/s\.pid: cannot write: "):
        Pidfile(str(tmp_path / "absent" / "s.pid")).write()


def test_chmod_socket_changes_a_socket_and_nothing_through_a_symlink(tmp_path):
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "s.sock"))
        unixsocket.chmod_socket(str(tmp_path / "s.sock"), 0o640)
        assert stat.S_IMODE(os.stat(tmp_path / "s.sock").st_mode) == 0o640
        (tmp_path / "link").symlink_to(tmp_path / "s.sock")
        (tmp_path / "file").write_text("")
        os.chmod(tmp_path / "file", 0o600)
        for name in ("link", "file"):
            with pytest.raises(OSError, match="is not a socket"):
                unixsocket.chmod_socket(str(tmp_path / name), 0o666)
        assert stat.S_IMODE(os.stat(tmp_path / "s.sock").st_mode) == 0o640
        assert stat.S_IMODE(os.stat(tmp_path / "file").st_mode) == 0o600


def test_a_path_this_user_may_not_look_at_is_refused_naming_the_key(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "state").mkdir()

    def denied(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "lstat", denied)  # root may look anywhere: play an unprivileged user
    with pytest.raises(StartupError, match=r"^t\.conf:6: \[milter\] socket = unix:.*: (user|uid) \S+ cannot look at .*m\.sock: "
                                           r"Permission denied$"):
        preflight.plan(make_config(tmp_path))
