"""What an operator meets around the daemon, as subprocesses: `check-config` refuses
exactly what `run` refuses (one code path, preflight.py), the one-shot commands run as
the daemon's user when started as root, output into a closed pipe ends quietly, and
every error line names stsmilter exactly once (stderr, and syslog through a private
/dev/log in a mount namespace)."""

import json
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from stsmilter.engine.policy import Policy
from stsmilter.engine.store import SqliteStore, make_entry
from world.daemon import DaemonProcess, free_port

pytestmark = pytest.mark.integration

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs a root start")


def stsmilter(*args, stdout=subprocess.PIPE, timeout=60, env=None):
    return subprocess.run([sys.executable, "-m", "stsmilter", *args], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=timeout, env=env)


@pytest.fixture
def base():
    """A directory the service user (nobody) can traverse: tmp_path is 0700 root."""
    path = Path(tempfile.mkdtemp(prefix="sts-ops-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_config(base: Path, name="ops.conf", user="", group="", log="stderr", **sections) -> str:
    values = {
        "daemon": {"user": user, "group": group, "pidfile": f"{base}/run/s.pid", "log": log},
        "milter": {"socket": f"inet:{free_port()}@127.0.0.1"},
        "cache": {"path": f"{base}/state/cache.sqlite"},
        "socketmap": {"listen": ""},
        "metrics": {"listen": ""},
        "dns": {"nameservers": "127.0.0.1", "port": "9", "timeout": "0.5"},
    }
    for section, keys in sections.items():
        values.setdefault(section, {}).update(keys)
    path = base / name
    path.write_text("".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) for s, keys in values.items()))
    path.chmod(0o644)
    return str(path)


def only_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def check_config_refusal(conf: str) -> str:
    """check-config's one-line refusal, without its 'stsmilter: [configuration error: ]'."""
    proc = stsmilter("check-config", "-c", conf)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    return re.sub(r"^stsmilter: (configuration error: )?", "", only_line(proc.stderr))


def run_refusal(conf: str) -> str:
    """`run`'s one-line refusal (log = stderr), without the log line's prefix."""
    proc = stsmilter("run", "-c", conf, timeout=60)
    assert proc.returncode == 2, proc.stderr
    line = only_line(proc.stderr)
    if line.startswith("stsmilter: configuration error: "):  # refused while loading the file
        return line[len("stsmilter: configuration error: "):]
    return re.sub(r"^.* stsmilter\[\d+\] ERROR cannot start: ", "", line)


# --- check-config refuses what run refuses --------------------------------------------


def _not_a_certificate(base):
    (base / "junk.pem").write_text("not a certificate\n")
    return {"fetch": {"ca_file": f"{base}/junk.pem"}}


def _socket_symlink(base):
    (base / "run").mkdir()
    (base / "run" / "m.sock").symlink_to(base / "elsewhere")
    return {"milter": {"socket": f"unix:{base}/run/m.sock"}}


def key_location(conf: str, section: str, key: str) -> str:
    """'FILE:LINE: [section] key', how a refusal must start (as a configuration error's)."""
    current = None
    for number, line in enumerate(Path(conf).read_text().splitlines(), 1):
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.split("=")[0].strip() == key:
            return f"{conf}:{number}: [{section}] {key}"
    raise AssertionError(f"{conf} does not set [{section}] {key}")


REFUSALS = [
    ("ca-file-missing", lambda b: {"fetch": {"ca_file": f"{b}/absent.pem"}}, "[fetch] ca_file", ("fetch", "ca_file")),
    ("ca-file-not-a-certificate", _not_a_certificate, "[fetch] ca_file", ("fetch", "ca_file")),
    ("socket-parent-missing", lambda b: {"milter": {"socket": f"unix:{b}/no/such/m.sock"}}, "does not exist",
     ("milter", "socket")),
    ("socketmap-parent-missing", lambda b: {"socketmap": {"listen": f"unix:{b}/no/such/s.sock"}}, "does not exist",
     ("socketmap", "listen")),
    ("pidfile-parent-missing", lambda b: {"daemon": {"pidfile": f"{b}/no/such/s.pid"}}, "does not exist",
     ("daemon", "pidfile")),
    ("cache-parent-missing", lambda b: {"cache": {"path": f"{b}/no/such/c.sqlite"}}, "does not exist",
     ("cache", "path")),
    ("socket-symlink", _socket_symlink, "is a symbolic link", ("milter", "socket")),
]


@pytest.mark.parametrize("name, make, expected, key", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_check_config_refuses_what_run_refuses(base, name, make, expected, key):
    conf = write_config(base, **make(base))
    refusal = check_config_refusal(conf)
    assert expected in refusal
    assert refusal.startswith(key_location(conf, *key)), refusal  # names the file and the line
    assert run_refusal(conf) == refusal
    assert not (base / "no").exists()


@ROOT_ONLY
def test_check_config_run_and_query_refuse_an_unusable_system_resolver(base):
    """[dns] nameservers empty means /etc/resolv.conf: without a nameserver there (here an
    empty file bound over it in a private mount namespace) the commands that need DNS
    refuse in one line, as for [fetch] ca_file, instead of a DnsError traceback."""
    empty = base / "resolv.conf"
    empty.write_text("")
    conf = write_config(base, dns={"nameservers": ""})

    def without_resolver(*args):
        bind = 'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"'
        return subprocess.run(["unshare", "--mount", "sh", "-c", bind, "sh", str(empty),
                               sys.executable, "-m", "stsmilter", *args], capture_output=True, text=True, timeout=60)

    expected = "[dns] nameservers (empty: the system resolver, /etc/resolv.conf): no usable resolver configuration"
    for args in (["check-config", "-c", conf], ["run", "-c", conf], ["query", "-c", conf, "example.com"]):
        proc = without_resolver(*args)
        assert proc.returncode == 2 and expected in only_line(proc.stderr), (args, proc.stderr)


ROOT_REFUSALS = [
    ("unknown-user", lambda b: {"daemon": {"user": "no-such-user-here"}}, "no such user", ("daemon", "user")),
    ("unknown-group", lambda b: {"daemon": {"user": "nobody", "group": "no-such-group-here"}}, "no such group",
     ("daemon", "group")),
    ("ca-file-unreadable-by-the-user", lambda b: _private_ca(b), "[fetch] ca_file", ("fetch", "ca_file")),
    ("pidfile-dir-not-writable-by-the-user", lambda b: _root_run_dir(b), "user nobody cannot create files in",
     ("daemon", "pidfile")),
]


def _private_ca(base):
    a_ca_certificate(base / "ca.pem")
    os.chmod(base / "ca.pem", 0o600)  # root's only
    return {"daemon": {"user": "nobody", "group": "nogroup"}, "fetch": {"ca_file": f"{base}/ca.pem"}}


def _root_run_dir(base):
    (base / "run").mkdir(mode=0o755)
    return {"daemon": {"user": "nobody", "group": "nogroup"}}


def a_ca_certificate(path: Path) -> None:
    import trustme

    trustme.CA().cert_pem.write_to_path(str(path))


@ROOT_ONLY
@pytest.mark.parametrize("name, make, expected, key", ROOT_REFUSALS, ids=[r[0] for r in ROOT_REFUSALS])
def test_check_config_as_root_refuses_what_a_root_run_refuses(base, name, make, expected, key):
    conf = write_config(base, **make(base))
    refusal = check_config_refusal(conf)
    assert expected in refusal
    assert refusal.startswith(key_location(conf, *key)), refusal  # names the file and the line
    assert run_refusal(conf) == refusal


@ROOT_ONLY
def test_check_config_accepts_what_run_accepts_and_creates_nothing(base):
    conf = write_config(base, user="nobody", group="nogroup", milter={"socket": f"unix:{base}/run/m.sock"})
    proc = stsmilter("check-config", "-c", conf)
    assert proc.returncode == 0, proc.stderr
    assert "user = nobody" in proc.stdout
    assert not (base / "run").exists() and not (base / "state").exists()


@pytest.mark.parametrize("user, suffix", [
    ("", ""), ("", "-wal"), pytest.param("nobody", "-shm", marks=ROOT_ONLY),
])
def test_check_config_warns_of_a_symlinked_cache_file_and_run_starts_without_it(base, user, suffix):
    """Not a refusal, for either: run serves from memory and leaves the link alone, and
    check-config says so on stderr (exit 0), with the reason run logs."""
    (base / "state").mkdir()
    target = base / "target"
    target.write_text("not a cache\n")
    link = base / "state" / f"cache.sqlite{suffix}"
    link.symlink_to(target)
    metrics_port = free_port()
    conf = write_config(base, user=user, group="nogroup" if user else "",
                        metrics={"listen": f"127.0.0.1:{metrics_port}"})
    reason = f"cache {base}/state/cache.sqlite: {link} is a symbolic link: not following it"

    proc = stsmilter("check-config", "-c", conf)
    assert proc.returncode == 0, proc.stderr
    assert "[cache]" in proc.stdout
    assert only_line(proc.stderr) == f"stsmilter: warning: {reason}; run starts without it and keeps policies in memory only"
    assert not (base / "run").exists()

    daemon = DaemonProcess(conf, str(base / "log")).start(wait_port=metrics_port)
    try:
        daemon.wait_log("milter on")
        [warning] = [line for line in daemon.log().splitlines() if " WARNING " in line or " ERROR " in line]
        assert warning.endswith(f" WARNING {reason}: policies are kept in memory only until a restart")
        assert daemon.stop() == 0
    finally:
        daemon.stop()
    assert link.is_symlink() and target.read_text() == "not a cache\n"
    assert sorted(os.listdir(base / "state")) == [link.name]


# --- the one-shot commands ------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["query", "x.example"], ["check", "user@x.example"], ["cache", "list"], ["cache", "purge", "--all"],
])
def test_the_one_shot_commands_stay_strict_about_a_symlinked_cache(base, argv):
    """Where run degrades, they refuse: one line, exit 1, like any cache they cannot use
    (as root, as the service user)."""
    (base / "state").mkdir()
    target = base / "target"
    target.write_text("not a cache\n")
    link = base / "state" / "cache.sqlite-wal"
    link.symlink_to(target)
    user = "nobody" if os.geteuid() == 0 else ""
    conf = write_config(base, user=user, group="nogroup" if user else "", daemon={"pidfile": ""})
    proc = stsmilter(*argv, "-c", conf)
    assert (proc.returncode, proc.stdout) == (1, ""), proc.stderr
    line = only_line(proc.stderr)
    assert line.startswith(f"stsmilter: cache {base}/state/cache.sqlite: {link} is a symbolic link: not following it")
    assert line.count("stsmilter") == 1
    assert link.is_symlink() and target.read_text() == "not a cache\n"
    assert sorted(os.listdir(base / "state")) == [link.name]



@ROOT_ONLY
def test_root_query_and_cache_commands_run_as_the_service_user(sts_world, base):
    nobody = pwd.getpwnam("nobody")
    sts_world.publish("root.example", "r1")
    ca = base / "ca.pem"
    shutil.copyfile(sts_world.https.ca_file, ca)
    ca.chmod(0o644)
    conf = base / "cli.conf"
    conf.write_text(sts_world.config_text(cache_path=f"{base}/state/cache.sqlite",
                                          daemon={"user": "nobody", "group": "nogroup", "pidfile": ""},
                                          fetch={"ca_file": str(ca)}))
    conf.chmod(0o644)
    proc = sts_world.cli("query", "--json", "-c", str(conf), "root.example")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "valid"
    state = os.stat(base / "state")
    assert (state.st_uid, stat.S_IMODE(state.st_mode)) == (nobody.pw_uid, 0o750)
    for name in os.listdir(base / "state"):  # the cache and its -wal/-shm: never root's
        assert os.stat(base / "state" / name).st_uid == nobody.pw_uid, name
    proc = sts_world.cli("cache", "list", "--json", "-c", str(conf))
    assert [row["domain"] for row in json.loads(proc.stdout)] == ["root.example"]
    proc = sts_world.cli("cache", "purge", "-c", str(conf), "--all")
    assert (proc.returncode, proc.stdout) == (0, "purged 1 policy\n")


# --- a reader that goes away ----------------------------------------------------------


@pytest.fixture
def big_cache(base):
    path = base / "big.sqlite"
    store = SqliteStore(str(path))
    policy = Policy("STSv1", "enforce", 86400, ("mx.example.net",))
    for i in range(3000):  # ~200 KB of output: more than a pipe holds
        # (fetched now: a fetch time far in the future is read back as a bad entry and skipped)
        store.put(make_entry(f"domain-{i:05d}.example", "id", policy, fetched_at=time.time()))
    store.close()
    return write_config(base, cache={"path": str(path)})


def into_closed_pipe(*args, **kwargs):
    """Run with stdout a pipe whose reader is already gone: every write fails with EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return stsmilter(*args, stdout=write_end, **kwargs)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("args", [
    ["check-config"], ["cache", "list"], ["cache", "list", "--json"], ["cache", "purge", "nothing.example"],
])
def test_output_into_a_closed_pipe_ends_quietly(big_cache, args):
    proc = into_closed_pipe(*args, "-c", big_cache)
    assert (proc.returncode, proc.stderr) == (141, "")


def test_query_and_check_into_a_closed_pipe_end_quietly(sts_world):
    sts_world.publish("pipe.example", "p1")
    conf = sts_world.write_config()
    env = dict(os.environ)
    env.pop("SSL_CERT_FILE", None)
    for args in (["query", "pipe.example"], ["check", "user@pipe.example"]):
        proc = into_closed_pipe(*args, "-c", conf, env=env)
        assert (proc.returncode, proc.stderr) == (141, ""), args


def test_head_1_stops_cache_list_quietly(big_cache):
    proc = subprocess.run(
        ["bash", "-c", '"$0" -m stsmilter cache list -c "$1" | head -1; echo "status ${PIPESTATUS[0]}" >&2',
         sys.executable, big_cache],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.stdout.startswith("domain-00000.example id=id mode=enforce")
    assert proc.stdout.count("\n") == 1
    assert proc.stderr == "status 141\n"


# --- one "stsmilter" per error line -------------------------------------------------------
# (No path in these tests contains the word: the count is of the prefix alone.)


@pytest.mark.parametrize("args", [
    [], ["bogus"], ["query"], ["cache"], ["cache", "purge", "-c", "{conf}"], ["query", "-c", "{conf}", "a..b"],
    ["query", "-c", "{conf}", "[192.0.2.1]"], ["check-config", "-c", "{base}/absent.conf"],
    ["check-config", "-c", "{bad}"], ["run", "-c", "{bad}"], ["check-config", "-c", "{nodir}"],
    ["cache", "list", "-c", "{nodir}"],
])
def test_every_error_line_names_stsmilter_once(base, args):
    values = {"base": base, "conf": write_config(base), "nodir": write_config(base, "nodir.conf", cache={"path": f"{base}/x/y/c.sqlite"})}
    (base / "bad.conf").write_text("[milter]\non_violation = bounce\n")
    values["bad"] = base / "bad.conf"
    proc = stsmilter(*[a.format(**values) for a in args])
    assert proc.returncode == 2
    line = only_line(proc.stderr)
    assert line.startswith("stsmilter: ") and line.count("stsmilter") == 1, line


def test_run_startup_error_with_log_stderr_names_stsmilter_once(base):
    conf = write_config(base, daemon={"pidfile": f"{base}/no/such/s.pid"})
    proc = stsmilter("run", "-c", conf)
    assert proc.returncode == 2
    line = only_line(proc.stderr)
    assert re.match(r"\S+ \S+ stsmilter\[\d+\] ERROR cannot start: " + re.escape(key_location(conf, "daemon", "pidfile")),
                    line), line
    assert line.count("stsmilter") == 1


@ROOT_ONLY
def test_run_startup_error_with_log_syslog_names_stsmilter_once(base):
    """log = syslog: one line in syslog and one on stderr (where an init script shows
    it), each with one prefix. /dev/log is a socket of this test, bind-mounted over a
    private /dev inside a mount namespace: the machine's own /dev is not touched."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare not installed")
    conf = write_config(base, log="syslog", daemon={"pidfile": f"{base}/no/such/s.pid"})
    dev = base / "dev"
    dev.mkdir()
    for name in ("null", "zero", "random", "urandom", "log"):
        (dev / name).touch()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslog:
        syslog.bind(str(base / "syslog.sock"))
        syslog.settimeout(30)
        script = (
            "set -e; mount --make-rprivate /; "
            "for n in null zero random urandom; do mount --bind /dev/$n \"$1/dev/$n\"; done; "
            "mount --bind \"$1/syslog.sock\" \"$1/dev/log\"; mount --rbind \"$1/dev\" /dev; "
            "exec \"$2\" -m stsmilter run -c \"$3\""
        )
        proc = subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", str(base), sys.executable, conf],
                              capture_output=True, text=True, timeout=60)
        logged = syslog.recv(4096).decode()
    assert proc.returncode == 2
    line = only_line(proc.stderr)
    where = key_location(conf, "daemon", "pidfile")
    assert line.startswith(f"stsmilter: cannot start: {where}") and line.count("stsmilter") == 1, line
    assert re.fullmatch(r"<\d+>stsmilter\[\d+\]: cannot start: " + re.escape(where) + r" .*\x00", logged), logged
    assert logged.count("stsmilter") == 1
