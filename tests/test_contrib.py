"""contrib/ files are valid for the tools that read them and match the code's defaults
and metric names. Tools that are not installed are skipped, never installed."""

import grp
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from metric_names import base_name, exposed_names, metric_objects
from world.postfix import processes_under

from stsmilter import config

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
INIT = CONTRIB / "init.d" / "stsmilter"
BOOTSTRAP = CONTRIB / "bootstrap.sh"
UNIT = CONTRIB / "systemd" / "stsmilter.service"
MAIN_CF = CONTRIB / "postfix" / "main.cf.snippet"
MASTER_CF = CONTRIB / "postfix" / "master.cf.snippet"
SENDMAIL_MC = CONTRIB / "sendmail" / "stsmilter.mc"
RULES = CONTRIB / "prometheus" / "stsmilter-rules.yml"
DASHBOARD = CONTRIB / "grafana" / "stsmilter-dashboard.json"

DEFAULTS = config.defaults()


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed")
    return path


def run(argv, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("timeout", 120)
    return subprocess.run(argv, capture_output=True, text=True, **kwargs)


def metric_names_in(text: str):
    return set(re.findall(r"\bstsmilter_[a-z_]+", text))


# --- shell scripts -------------------------------------------------------------------


@pytest.mark.parametrize("script", [INIT, BOOTSTRAP], ids=lambda p: p.name)
def test_shell_syntax(script):
    result = run(["sh", "-n", str(script)])
    assert result.returncode == 0, result.stderr


def test_shellcheck_init_script():
    result = run([tool("shellcheck"), "--shell=sh", str(INIT)])
    assert result.returncode == 0, result.stdout


def test_shellcheck_bootstrap():
    result = run([tool("shellcheck"), "--shell=sh", str(BOOTSTRAP)])
    assert result.returncode == 0, result.stdout


def test_init_script_lsb_header():
    text = INIT.read_text()
    header = re.search(r"^### BEGIN INIT INFO\n(.*?)^### END INIT INFO$", text, re.S | re.M)
    assert header, "no LSB header"
    fields = dict(re.findall(r"^# ([\w-]+):\s+(.*)$", header.group(1), re.M))
    assert fields["Provides"] == "stsmilter"
    assert set(fields["Required-Start"].split()) >= {"$network", "$remote_fs", "$syslog"}
    assert set(fields["X-Start-Before"].split()) == {"postfix", "sendmail"}
    assert fields["Default-Start"].split() == ["2", "3", "4", "5"]
    assert os.access(INIT, os.X_OK)
    assert f"PIDFILE={DEFAULTS.daemon.pidfile}" in text


def test_every_init_script_setting_is_documented():
    """The variables /etc/default/stsmilter may set (the init script's "Overridable"
    block) are each in the shipped defaults file, with their default, and in stsmilter(8)."""
    text = INIT.read_text()
    block = text.split("# Overridable in /etc/default/stsmilter:\n", 1)[1].split("\n\n", 1)[0]
    settings = dict(re.findall(r"^(\w+)=(\S*)", block, re.M))
    assert set(settings) == {"DAEMON", "CONFIG", "PIDFILE", "DAEMON_OPTS", "OPEN_FILES", "LOGFILE"}
    shipped = (ROOT / "debian" / "stsmilter.default").read_text()
    from test_docs import MAN8, roff_text

    files = " ".join(roff_text(MAN8).split("/etc/default/stsmilter\n", 1)[1].split("/var/log/")[0].split())
    for name, default in settings.items():
        assert re.search(rf"^#{name}={re.escape(default)}$", shipped, re.M) or (name, default) == ("DAEMON", '""'), name
        assert re.search(rf"\b{name}\b", files), f"stsmilter(8) FILES, /etc/default/stsmilter: no {name}"


@pytest.fixture
def init_sandbox(tmp_path):
    """The init script wired to a fake daemon (a shell script named stsmilter that
    behaves like the real one towards start-stop-daemon: creates its run directory,
    writes its PID file, stops on TERM, records USR1)."""
    tool("start-stop-daemon")
    if not Path("/lib/lsb/init-functions").exists():
        pytest.skip("/lib/lsb/init-functions not installed")
    tmp_path.chmod(0o755)
    rundir, bindir = tmp_path / "run", tmp_path / "bin"
    bindir.mkdir()
    pidfile = rundir / "stsmilter.pid"
    daemon = bindir / "stsmilter"
    daemon.write_text(
        f"""#!/bin/sh
case "$1" in
    check-config)
        if [ -e {tmp_path}/bad-config ]; then
            echo "stsmilter: configuration error: {tmp_path}/stsmilter.conf:3: bad" >&2
            exit 2
        fi
        if [ -e {tmp_path}/warn-config ]; then
            echo "stsmilter: warning: cache {tmp_path}/c.sqlite: is a symbolic link" >&2
        fi
        exit 0 ;;
    run) ;;
    *) exit 2 ;;
esac
trap 'echo usr1 >> {tmp_path}/signals' USR1
trap 'echo "usr2 of pid $$" >&2' USR2
trap 'rm -f {pidfile}; exit 0' TERM INT
mkdir -p {rundir}
echo $$ > {pidfile}
echo "stderr of pid $$" >&2
while :; do sleep 1 & wait $!; done
"""
    )
    daemon.chmod(0o755)
    defaults = tmp_path / "default"
    defaults.write_text(f"DAEMON={daemon}\nCONFIG={tmp_path}/stsmilter.conf\nPIDFILE={pidfile}\n")
    action = init_script(tmp_path, defaults)
    yield action, pidfile, tmp_path
    # Every fake daemon, not only the one the pidfile names: a failed restart or stop can
    # leave one the pidfile no longer points at (one outlived its test run here once).
    for pid in processes_under(tmp_path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def init_script(directory: Path, defaults: Path):
    """The shipped init script, reading its settings from defaults instead of
    /etc/default/stsmilter, the daemon's stderr going to directory/stsmilter.log;
    returns action(name) -> CompletedProcess."""
    with defaults.open("a") as f:
        f.write(f"LOGFILE={directory}/stsmilter.log\n")
    script = directory / "stsmilter.init"
    text = INIT.read_text()
    assert text.count("/etc/default/$NAME") == 2
    script.write_text(text.replace("/etc/default/$NAME", str(defaults)))

    def action(name):
        return run(["sh", str(script), name], timeout=60)

    return action


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_init_script_actions(init_sandbox):
    action, pidfile, tmp_path = init_sandbox
    assert action("start").returncode == 0
    pid = int(pidfile.read_text())
    assert _alive(pid)
    # stderr goes to LOGFILE (created 0640), never to /dev/null
    logfile = tmp_path / "stsmilter.log"
    deadline = time.monotonic() + 5
    while f"stderr of pid {pid}" not in logfile.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert logfile.read_text() == f"stderr of pid {pid}\n"
    assert logfile.stat().st_mode & 0o777 == 0o640
    assert action("status").returncode == 0
    assert action("start").returncode == 0  # already running: still success
    assert int(pidfile.read_text()) == pid

    assert action("reload").returncode == 0
    # The trap's ">>" creates the file a moment before it writes the line: wait for the line.
    signals = tmp_path / "signals"
    deadline = time.monotonic() + 5
    while not (signals.exists() and signals.read_text().endswith("\n")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert signals.read_text().split() == ["usr1"]
    assert _alive(pid)

    assert action("restart").returncode == 0
    new_pid = int(pidfile.read_text())
    assert new_pid != pid and _alive(new_pid) and not _alive(pid)
    deadline = time.monotonic() + 5
    while f"stderr of pid {new_pid}" not in logfile.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert logfile.read_text() == f"stderr of pid {pid}\nstderr of pid {new_pid}\n"  # appended

    assert action("stop").returncode == 0
    assert not pidfile.exists()
    deadline = time.monotonic() + 5
    while _alive(new_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(new_pid)
    assert action("status").returncode == 3
    assert action("stop").returncode == 0  # not running: still success

    (tmp_path / "bad-config").touch()
    result = action("start")
    assert result.returncode == 1
    assert "configuration error" in result.stdout + result.stderr
    assert not pidfile.exists()


def test_init_script_lsb_exit_codes_when_stopped_dead_or_misconfigured(init_sandbox):
    """LSB: reload of a stopped service fails (7, "not running"); status of a daemon
    that died and left its PID file is 1; restart and reload with a file that does not
    load fail and leave the running daemon alone."""
    action, pidfile, tmp_path = init_sandbox
    result = action("reload")
    assert result.returncode == 7, result.stdout + result.stderr
    assert not (tmp_path / "signals").exists()

    assert action("start").returncode == 0
    pid = int(pidfile.read_text())
    (tmp_path / "bad-config").touch()
    for name in ("reload", "restart", "force-reload"):
        result = action(name)
        assert result.returncode == 1, name
        assert "stsmilter.conf:3: bad" in result.stdout + result.stderr, name
        assert int(pidfile.read_text()) == pid and _alive(pid), name
    assert not (tmp_path / "signals").exists()
    (tmp_path / "bad-config").unlink()

    os.kill(pid, signal.SIGKILL)  # dies without removing its PID file
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:  # reaped, not a zombie
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists() and pidfile.exists()
    result = action("status")
    assert result.returncode == 1, result.stdout
    assert "is not running, but" in result.stdout
    assert action("start").returncode == 0  # over the dead daemon's PID file
    new_pid = int(pidfile.read_text())
    assert new_pid != pid and _alive(new_pid)
    assert action("stop").returncode == 0
    assert action("status").returncode == 3


def test_logrotate_rotates_the_init_scripts_log_while_the_daemon_writes(init_sandbox):
    """The shipped logrotate file on the init script's LOGFILE (the only change: its
    path): the old lines move to .1, the daemon keeps writing (it keeps no reopen
    signal: HUP stops it), and its next line starts the emptied file, without a hole."""
    logrotate = tool("logrotate")
    action, pidfile, tmp_path = init_sandbox
    logfile = tmp_path / "stsmilter.log"
    assert action("start").returncode == 0
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while f"stderr of pid {pid}" not in logfile.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    shipped = (CONTRIB / "logrotate" / "stsmilter").read_text()
    assert shipped.count("/var/log/stsmilter.log {") == 1
    conf = tmp_path / "logrotate.conf"
    conf.write_text(shipped.replace("/var/log/stsmilter.log {", f"{logfile} {{"))
    conf.chmod(0o644)
    result = run([logrotate, "-f", "-s", str(tmp_path / "logrotate.state"), str(conf)], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "stsmilter.log.1").read_text() == f"stderr of pid {pid}\n"  # delaycompress
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 5
    while not logfile.read_bytes().endswith(b"\n") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert logfile.read_bytes() == f"usr2 of pid {pid}\n".encode()  # appended at 0: no NUL bytes before it
    assert _alive(pid) and action("stop").returncode == 0


@pytest.fixture
def other_program():
    """A live process that is not stsmilter, whose PID a stale PID file may hold."""
    proc = subprocess.Popen(["sleep", "300"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "sleep":  # exec'd
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield proc
    proc.kill()
    proc.wait()


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_init_script_shows_a_check_config_warning_and_still_starts(init_sandbox):
    action, pidfile, tmp_path = init_sandbox
    (tmp_path / "warn-config").touch()
    result = action("start")
    assert result.returncode == 0 and pidfile.exists()
    assert "is a symbolic link" in result.stdout + result.stderr
    assert action("stop").returncode == 0


def test_init_script_status_and_start_ignore_a_pid_reused_by_another_program(init_sandbox, other_program):
    action, pidfile, tmp_path = init_sandbox
    pidfile.parent.mkdir()
    pidfile.write_text(f"{other_program.pid}\n")
    result = action("status")
    assert result.returncode == 1, result.stdout  # LSB: not running, PID file exists
    assert "is not running" in result.stdout
    assert action("start").returncode == 0
    pid = int(pidfile.read_text())
    assert pid != other_program.pid and _comm(pid) == "stsmilter"
    assert action("status").returncode == 0
    assert action("stop").returncode == 0
    assert other_program.poll() is None  # never signalled


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="the init script starts the daemon as root")
def test_init_script_starts_the_real_daemon_over_a_stale_pidfile(other_program):
    """The shipped script and the real daemon (a root start dropping to nobody): a PID
    file left behind whose PID now belongs to another program neither reads as running
    nor stops the start; the daemon replaces it, and stop leaves the other program be."""
    from world.daemon import free_port, scrape, wait_for_port

    daemon = Path(sys.executable).parent / "stsmilter"  # the console script, as installed
    if not daemon.exists():
        pytest.skip(f"{daemon}: no installed console script")
    base = Path(tempfile.mkdtemp(prefix="stsmilter-init-"))
    base.chmod(0o755)  # traversable by nobody
    try:
        nobody = pwd.getpwnam("nobody")
        rundir, pidfile = base / "run", base / "run" / "stsmilter.pid"
        rundir.mkdir(mode=0o750)
        os.chown(rundir, nobody.pw_uid, nobody.pw_gid)  # as a previous run left it
        pidfile.write_text(f"{other_program.pid}\n")
        metrics_port = free_port()
        conf = base / "stsmilter.conf"
        conf.write_text(
            f"[daemon]\nuser = nobody\ngroup = {grp.getgrgid(nobody.pw_gid).gr_name}\npidfile = {pidfile}\n"
            f"[milter]\nsocket = inet:{free_port()}@127.0.0.1\n"
            f"[cache]\npath = {base}/state/cache.sqlite\n"
            f"[socketmap]\nlisten =\n[metrics]\nlisten = 127.0.0.1:{metrics_port}\n"
        )
        conf.chmod(0o644)
        defaults = base / "default"
        defaults.write_text(f"DAEMON={daemon}\nCONFIG={conf}\nPIDFILE={pidfile}\n")
        action = init_script(base, defaults)

        assert action("status").returncode == 1
        result = action("start")
        assert result.returncode == 0, result.stdout + result.stderr
        pid = int(pidfile.read_text())
        assert pid != other_program.pid and _comm(pid) == "stsmilter"
        # The PID file comes before the listeners (start returns on it): wait for the port.
        wait_for_port(metrics_port)
        assert "stsmilter_cache_entries" in scrape(metrics_port)
        assert (base / "state").stat().st_uid == nobody.pw_uid  # created by the daemon
        assert action("status").returncode == 0
        assert action("stop").returncode == 0
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid)
        assert other_program.poll() is None
        assert action("status").returncode == 3
    finally:
        if pidfile.exists():
            try:
                pid = int(pidfile.read_text())
                if pid != other_program.pid and _comm(pid) == "stsmilter":
                    os.kill(pid, signal.SIGKILL)
            except (ValueError, OSError):
                pass
        shutil.rmtree(base, ignore_errors=True)


# --- systemd ----------------------------------------------------------------------------


def unit_settings():
    settings = {}
    for line in UNIT.read_text().splitlines():
        m = re.fullmatch(r"(\w+)=(.*)", line)
        if m:
            settings.setdefault(m.group(1), []).append(m.group(2))
    return settings


def test_unit_settings():
    s = unit_settings()
    # /usr/bin: where the .deb installs the program (the unit is packaged as it is)
    assert s["ExecStart"] == [f"/usr/bin/stsmilter run -c {config.DEFAULT_CONFIG_PATH}"]
    assert s["Type"] == ["simple"]
    # reload validates the file first: a bad one fails the reload and is never signalled
    assert s["ExecReload"] == [
        f"/usr/bin/stsmilter check-config --quiet -c {config.DEFAULT_CONFIG_PATH}",
        "/bin/kill -USR1 $MAINPID",
    ]
    assert s["User"] == [DEFAULTS.daemon.user] and s["Group"] == [DEFAULTS.daemon.group]
    assert s["RuntimeDirectory"] == [Path(DEFAULTS.daemon.pidfile).parent.name]
    assert s["StateDirectory"] == [Path(DEFAULTS.cache.path).parent.name]
    assert Path(DEFAULTS.daemon.pidfile).parent == Path("/run") / s["RuntimeDirectory"][0]
    assert Path(DEFAULTS.cache.path).parent == Path("/var/lib") / s["StateDirectory"][0]
    assert set(s["Before"][0].split()) == {"postfix@-.service", "postfix.service", "sendmail.service"}
    assert s["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "RestrictNamespaces",
                "LockPersonality", "MemoryDenyWriteExecute"):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"]
    assert s["SystemCallFilter"] == ["@system-service"]
    assert s["Restart"] == ["on-failure"]


def test_unit_starts_before_the_unit_that_runs_the_postfix_master():
    """Debian 12's postfix.service is a placeholder; the master runs in postfix@-.service.
    Read from the units Debian's postfix package installs."""
    units = Path("/lib/systemd/system")
    if not (units / "postfix@.service").exists():
        pytest.skip("Debian's postfix systemd units not installed")
    template = (units / "postfix@.service").read_text()
    assert re.search(r"^ExecStart=/usr/sbin/postmulti -i %i -p start$", template, re.M)
    assert re.search(r"^Before=postfix\.service$", template, re.M)  # so ordering on postfix.service is too late
    assert re.search(r"^ExecStart=/bin/true$", (units / "postfix.service").read_text(), re.M)
    assert "postfix@-.service" in unit_settings()["Before"][0].split()


def test_unit_verifies(tmp_path):
    analyze = tool("systemd-analyze")
    # ExecStart must name an existing binary for verify; point it at one.
    binary = ROOT / ".venv" / "bin" / "stsmilter"
    if not binary.exists():
        binary = Path(sys.executable)
    unit = tmp_path / "stsmilter.service"
    text = UNIT.read_text()
    assert text.count("=/usr/bin/stsmilter ") == 2
    unit.write_text(text.replace("=/usr/bin/stsmilter ", f"={binary} "))
    result = run([analyze, "verify", "--man=no", str(unit)])
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


# --- Postfix ----------------------------------------------------------------------------


def _milter_as_postfix(socket: str) -> str:
    port, host = socket.split(":", 1)[1].split("@")
    return f"inet:{host}:{port}"


MTA_STS_MILTER = f"{{ {_milter_as_postfix(DEFAULTS.milter.socket)}, default_action=accept }}"


def settings_in(text: str) -> list:
    """The uncommented 'name = value' lines of a main.cf text."""
    return re.findall(r"^([a-z_]+) = (.*)$", text, re.M)


def test_postfix_snippets_match_the_defaults():
    main = dict(settings_in(MAIN_CF.read_text()))
    listen = DEFAULTS.socketmap.listen
    assert main["mta_sts_milter"] == MTA_STS_MILTER
    assert main["smtp_tls_policy_maps"] == f"socketmap:inet:{listen.host}:{listen.port}:postfix"
    assert main["non_smtpd_milters"] == "$mta_sts_milter"
    # Nothing that changes other milters or puts stsmilter on port 25 (inbound mail).
    for global_setting in ("smtpd_milters", "milter_default_action", "milter_protocol", "milter_connect_macros",
                           "milter_mail_macros", "milter_rcpt_macros"):
        assert global_setting not in main
    master = MASTER_CF.read_text()
    for service in ("submission", "submissions"):
        entry = re.search(rf"^{service} inet .*?(?=^\S|\Z)", master, re.M | re.S).group(0)
        assert "-o smtpd_milters=$mta_sts_milter\n" in entry
        assert "-o milter_macro_daemon_name=ORIGINATING\n" in entry


@pytest.fixture
def postfix_config(tmp_path):
    postconf = tool("postconf")
    (tmp_path / "main.cf").write_text(MAIN_CF.read_text())
    (tmp_path / "master.cf").write_text(MASTER_CF.read_text())
    return postconf, tmp_path


def test_postfix_main_cf_snippet_parses(postfix_config):
    postconf, directory = postfix_config
    # -x expands $mta_sts_milter; with master.cf present, postconf would also warn
    # about a parameter nothing uses.
    result = run([postconf, "-c", str(directory), "-n", "-x"])
    assert result.returncode == 0 and result.stderr == "", result.stderr
    values = dict(line.split(" = ", 1) for line in result.stdout.splitlines() if " = " in line)
    assert values["non_smtpd_milters"] == MTA_STS_MILTER
    assert "smtpd_milters" not in values and "milter_default_action" not in values
    assert values["smtp_tls_policy_maps"].startswith("socketmap:inet:")
    # Postfix's own defaults send the macros stsmilter reads.
    defaults = run([postconf, "-c", str(directory), "-d", "milter_connect_macros", "milter_mail_macros",
                    "milter_rcpt_macros"]).stdout
    for macro in ("{daemon_name}", "{auth_authen}", "{rcpt_mailer}"):
        assert macro in defaults


def test_postfix_master_cf_snippet_parses(postfix_config):
    postconf, directory = postfix_config
    result = run([postconf, "-c", str(directory), "-P", "-x"])
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    for service in ("submission", "submissions"):
        assert f"{service}/inet/milter_macro_daemon_name = ORIGINATING" in lines
        assert f"{service}/inet/smtpd_milters = {MTA_STS_MILTER}" in lines


# --- Sendmail ---------------------------------------------------------------------------


def test_sendmail_mc_lines():
    lines = [line for line in SENDMAIL_MC.read_text().splitlines() if not line.startswith("dnl")]
    assert lines == [
        "INPUT_MAIL_FILTER(`stsmilter', `S=unix:/run/stsmilter/stsmilter.sock, T=C:10s;S:30s;R:30s;E:1m')",
        f"FEATURE(`sts', `socket -d10 -T<TMPF> inet:{DEFAULTS.socketmap.listen.port}@{DEFAULTS.socketmap.listen.host}')",
    ]
    timeout = float(re.search(r"-d(\d+)", lines[1]).group(1))
    assert timeout > DEFAULTS.socketmap.lookup_timeout
    assert 30 > DEFAULTS.milter.lookup_timeout  # R:30s


def test_sendmail_mc_builds():
    """With sendmail-cf's m4 files (/usr/share/sendmail/cf, or $SENDMAIL_CF_DIR)."""
    m4 = tool("m4")
    cf_dir = Path(os.environ.get("SENDMAIL_CF_DIR", "/usr/share/sendmail/cf"))
    if not (cf_dir / "m4" / "cf.m4").exists() or not (cf_dir / "feature" / "sts.m4").exists():
        pytest.skip("sendmail-cf (8.17+) not installed")
    mc = (
        f"include(`{cf_dir}/m4/cf.m4')dnl\nOSTYPE(`linux')dnl\n"
        f"include(`{SENDMAIL_MC}')dnl\nMAILER(`local')dnl\nMAILER(`smtp')dnl\n"
    )
    result = run([m4, f"-D_CF_DIR_={cf_dir}/"], input=mc)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    cf = result.stdout.splitlines()
    listen = DEFAULTS.socketmap.listen
    assert f"Ksts socket -d10 -T<TMPF> inet:{listen.port}@{listen.host}" in cf
    assert "O StrictTransportSecurity=true" in cf
    assert "O InputMailFilters=stsmilter" in cf
    assert "Xstsmilter, S=unix:/run/stsmilter/stsmilter.sock, T=C:10s;S:30s;R:30s;E:1m" in cf


def test_sendmail_command_line_mail_reaches_the_milter_over_smtp():
    """The premise of stsmilter.mc's "Command-line mail" note, read from Debian's own
    MSP configuration: sendmail(1) relays to the MTA on [127.0.0.1] port 25 over SMTP,
    so stsmilter answers per recipient there and [milter] non_smtp has no Sendmail part."""
    submit = Path(os.environ.get("SENDMAIL_CF_DIR", "/usr/share/sendmail/cf")) / "debian" / "submit.mc"
    if not submit.exists():
        pytest.skip("Debian's sendmail-cf not installed")
    assert re.search(r"^FEATURE\(`msp', `\[127\.0\.0\.1\]', `25'\)", submit.read_text(), re.M)
    assert "[127.0.0.1] port 25" in SENDMAIL_MC.read_text()


# --- Prometheus -------------------------------------------------------------------------


def load_rules():
    return yaml.safe_load(RULES.read_text())


def test_rules_structure():
    data = load_rules()
    rules = {rule["alert"]: rule for group in data["groups"] for rule in group["rules"]}
    assert set(rules) == {"StsmilterDown", "StsmilterRefreshFailing", "StsmilterViolationSpike", "StsmilterFetchErrors",
                          "StsmilterStoreErrors", "StsmilterDnsFailures", "StsmilterSocketmapEvictions",
                          "StsmilterDaneDnsErrors", "StsmilterDiscoverySaturated",
                          "StsmilterOutOfDescriptors", "StsmilterMxTlsFailing"}
    for name, rule in rules.items():
        assert rule["expr"].strip() and rule["labels"]["severity"] and rule["annotations"]["summary"], name
    assert rules["StsmilterDown"]["for"] == "5m"
    assert rules["StsmilterRefreshFailing"]["for"] == "1h"
    assert 'reason="mx-mismatch"' in rules["StsmilterViolationSpike"]["expr"]
    assert 'result!="ok"' in rules["StsmilterFetchErrors"]["expr"]
    assert "increase(stsmilter_store_errors_total" in rules["StsmilterStoreErrors"]["expr"]
    assert "stsmilter_dns_failures_total" in rules["StsmilterDnsFailures"]["expr"]
    assert "stsmilter_socketmap_evicted_connections_total" in rules["StsmilterSocketmapEvictions"]["expr"]
    assert 'verdict="dns-error"' in rules["StsmilterDaneDnsErrors"]["expr"]
    assert "stsmilter_discovery_waiting" in rules["StsmilterDiscoverySaturated"]["expr"]
    assert "increase(stsmilter_out_of_descriptors_total" in rules["StsmilterOutOfDescriptors"]["expr"]
    assert "stsmilter_mx_tls_failing_hosts" in rules["StsmilterMxTlsFailing"]["expr"]


def test_rules_use_real_metric_names():
    names = metric_names_in(RULES.read_text())
    assert names, "no stsmilter metric in the rules"
    assert names <= exposed_names(), names - exposed_names()


def test_promtool_check_rules():
    result = run([tool("promtool"), "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana ----------------------------------------------------------------------------


def test_dashboard_is_valid_and_covers_every_metric():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert all(exprs)
    names = set().union(*(metric_names_in(e) for e in exprs))
    assert names <= exposed_names(), names - exposed_names()
    assert {base_name(n) for n in names} == {m._name for m in metric_objects()}
    # Every stsmilter name anywhere in the file (descriptions too) is real.
    assert metric_names_in(DASHBOARD.read_text()) <= exposed_names()
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]


def test_dashboard_groups_and_names_series_only_by_labels_its_metrics_have():
    dashboard = json.loads(DASHBOARD.read_text())
    labels_of = {m._name: set(m._labelnames) for m in metric_objects()}
    for panel in (p for p in dashboard["panels"] if p["type"] != "row"):
        for target in panel["targets"]:
            expr = target["expr"]
            have = {"job", "instance"}.union(*(labels_of[base_name(n)] for n in metric_names_in(expr)))
            if "_bucket" in expr:
                have.add("le")
            grouped = {label.strip() for by in re.findall(r"by \(([^)]*)\)", expr) for label in by.split(",")}
            shown = set(re.findall(r"{{(\w+)}}", target.get("legendFormat", "")))
            assert grouped <= have, (panel["title"], grouped - have)
            assert shown <= grouped | {"instance"} or not grouped, (panel["title"], shown - grouped)


def test_dashboard_takes_the_job_as_a_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["job"]["query"]["query"] == "label_values(stsmilter_build_info, job)"
    assert 'job="$job"' in variables["instance"]["query"]["query"]
    exprs = [t["expr"] for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]
    assert all('job="$job"' in e for e in exprs)
    assert 'job=\\"stsmilter\\"' not in DASHBOARD.read_text()
