"""`stsmilter run` started as a subprocess, as an init script or systemd would."""

import os
import pwd
import re
import shutil
import signal
import sys
import tempfile
import time

import pytest

from stsmilter import __version__
from world.daemon import DaemonProcess, free_port, poll_until, scrape, wait_for_port
from world.socketmap_client import ask

pytestmark = pytest.mark.integration


def test_starts_writes_pidfile_serves_metrics_and_stops_on_term(start_daemon):
    daemon = start_daemon()
    with open(daemon.pidfile) as f:
        assert int(f.read()) == daemon.pid
    text = scrape(daemon.metrics_port)
    assert "stsmilter_cache_entries" in text and "process_resident_memory_bytes" in text
    assert f'stsmilter_build_info{{version="{__version__}"}} 1.0' in text
    wait_for_port(daemon.socketmap_port)
    started = time.monotonic()
    assert daemon.stop() == 0
    # libmilter's listener looks at its stop flag only every 5 s unless woken
    # (milter/stop.py wakes it).
    assert time.monotonic() - started < 2
    assert not os.path.exists(daemon.pidfile)


def test_int_stops_too(start_daemon):
    daemon = start_daemon()
    started = time.monotonic()
    daemon.signal(signal.SIGINT)
    daemon.proc.wait(10)
    assert daemon.proc.returncode == 0
    assert time.monotonic() - started < 2


def test_usr1_reloads_and_bad_reload_keeps_running_config(start_daemon, sts_world):
    daemon = start_daemon()
    daemon.reload(lambda text: text.replace("[milter]\n", "[milter]\ndry_run = yes\n"))
    daemon.reload(lambda text: text + "[milter]\nbogus = 1\n", expect="reload refused")
    assert daemon.proc.poll() is None
    scrape(daemon.metrics_port)  # still serving
    assert daemon.stop() == 0


def test_a_reload_whose_ca_file_cannot_be_read_is_refused_in_one_line(start_daemon, sts_world, tmp_path):
    """check-config refuses it, and so does the reload (a bare kill -USR1 runs no
    check-config first): one line, nothing half applied, no traceback."""
    daemon = start_daemon()
    missing = tmp_path / "gone.pem"
    logged = daemon.reload(lambda text: re.sub(r"(?m)^ca_file = .*$", f"ca_file = {missing}", text),
                           expect="reload refused")
    assert f"[fetch] ca_file {missing}" in logged
    assert "configuration reloaded" not in logged and "Traceback" not in daemon.log(), daemon.log()
    sts_world.publish("after.example")  # the running configuration (its CA) still fetches
    secure = "OK secure match=mx.after.example servername=hostname"
    poll_until(lambda: ask(daemon.socketmap_port, "after.example") == secure, 10, "the policy, fetched")
    assert daemon.stop() == 0


def test_bad_config_refuses_to_start_with_one_line(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("[milter]\non_violation = bounce\n")
    daemon = DaemonProcess(str(conf), str(tmp_path / "log")).start()
    assert daemon.proc.wait(10) == 2
    lines = daemon.log().strip().splitlines()
    assert len(lines) == 1 and "on_violation" in lines[0] and "bad.conf:2" in lines[0]


def test_busy_port_refuses_to_start(start_daemon, sts_world, tmp_path):
    first = start_daemon()
    conf = sts_world.write_config(
        "second.conf",
        milter={"socket": f"inet:{free_port()}@127.0.0.1"},
        metrics={"listen": f"127.0.0.1:{first.metrics_port}"},
        daemon={"pidfile": str(tmp_path / "second.pid"), "log": "stderr", "user": "", "group": ""},
    )
    second = DaemonProcess(conf, str(tmp_path / "second.log")).start()
    assert second.proc.wait(15) == 2
    line = re.search(r"cannot start: (.*)", second.log()).group(1)
    lines = open(conf).read().splitlines()
    number = lines.index(f"listen = 127.0.0.1:{first.metrics_port}") + 1
    assert line.startswith(f"{conf}:{number}: [metrics] listen inet:127.0.0.1:{first.metrics_port}: "), line


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_root_drops_privileges_before_serving(sts_world):
    nobody = pwd.getpwnam("nobody")
    # Its own world-traversable directory: pytest's tmp_path is 0700 root.
    rundir = tempfile.mkdtemp(prefix="stsmilter-priv-")
    os.chmod(rundir, 0o755)
    daemon = None
    try:
        metrics_port = free_port()
        ca_file = os.path.join(rundir, "ca.pem")  # the service user must be able to read it
        shutil.copyfile(sts_world.https.ca_file, ca_file)
        os.chmod(ca_file, 0o644)
        conf = sts_world.write_config(
            "priv.conf",
            fetch={"ca_file": ca_file},
            cache_path=os.path.join(rundir, "state", "cache.sqlite"),
            daemon={"user": "nobody", "group": "nogroup", "pidfile": os.path.join(rundir, "run", "s.pid"),
                    "log": "stderr"},
            milter={"socket": f"unix:{rundir}/run/milter.sock"},
            metrics={"listen": f"127.0.0.1:{metrics_port}"},
        )
        daemon = DaemonProcess(conf, os.path.join(rundir, "log")).start(wait_port=metrics_port)
        deadline = time.monotonic() + 10
        while not os.path.exists(f"{rundir}/run/milter.sock") and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(f"/proc/{daemon.pid}/status") as f:
            status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        assert status["Uid"].split()[:2] == [str(nobody.pw_uid)] * 2
        assert os.stat(f"{rundir}/run/milter.sock").st_uid == nobody.pw_uid
        assert os.stat(f"{rundir}/run/milter.sock").st_mode & 0o777 == 0o660
        assert os.stat(f"{rundir}/state/cache.sqlite").st_uid == nobody.pw_uid
        assert daemon.stop() == 0
        assert not os.path.exists(f"{rundir}/run/s.pid")
    finally:
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(rundir, ignore_errors=True)


def test_hup_stops_like_term(start_daemon):
    # libmilter treats HUP as TERM (documented in stsmilter(8)); USR1 is the reload.
    daemon = start_daemon()
    started = time.monotonic()
    daemon.signal(signal.SIGHUP)
    assert daemon.proc.wait(10) == 0
    assert time.monotonic() - started < 2


def test_restart_warning_compares_the_file_with_the_values_in_force(start_daemon):
    daemon = start_daemon()
    warning = "changes to [cache] max_entries take effect only after a restart"
    changed = daemon.reload(lambda text: text.replace("[cache]\n", "[cache]\nmax_entries = 5000\n"))
    assert warning in changed
    # The same file again: the change is still not in force, so say so again.
    assert warning in daemon.reload(lambda text: text)
    # Back to the value the daemon runs with: nothing needs a restart.
    reverted = daemon.reload(lambda text: text.replace("max_entries = 5000\n", ""))
    assert "after a restart" not in reverted
    assert daemon.stop() == 0


def test_stop_removes_the_socket_in_use_not_the_path_of_a_reload(start_daemon, tmp_path):
    listening, renamed = tmp_path / "milter.sock", tmp_path / "operator-file"
    renamed.write_text("not ours\n")
    daemon = start_daemon(unix_socket=str(listening))
    poll_until(listening.is_socket, 10, "the milter socket")
    logged = daemon.reload(lambda text: text.replace(f"unix:{listening}", f"unix:{renamed}"))
    assert "[milter] socket" in logged  # needs a restart: the daemon still listens on the first
    assert daemon.stop() == 0
    assert not listening.exists()
    assert renamed.read_text() == "not ours\n"


# Runs `stsmilter run` with the milter's entry points replaced by a line on stderr: a
# socketmap-only daemon must call none of them.
_MILTER_TRAP = """
import sys
import Milter
from stsmilter import cli
from stsmilter.milter import shed, stop, wake

def trap(name):
    def called(*args, **kwargs):
        sys.stderr.write("milter part started: %s\\n" % name)
        sys.stderr.flush()
    return called

stop.start_watcher, wake.start_waker = trap("stop"), trap("wake")
shed.start_guard, Milter.runmilter = trap("shed"), trap("runmilter")
sys.exit(cli.main(sys.argv[-3:]))
"""


def _socketmap_only(sts_world, tmp_path, name="smonly"):
    trap = tmp_path / "milter_trap.py"
    trap.write_text(_MILTER_TRAP)
    ports = {"socketmap": free_port(), "metrics": free_port()}
    conf = sts_world.write_config(
        f"{name}.conf",
        milter={"socket": ""},
        socketmap={"listen": f"inet:127.0.0.1:{ports['socketmap']}"},
        metrics={"listen": f"127.0.0.1:{ports['metrics']}"},
        daemon={"pidfile": str(tmp_path / f"{name}.pid"), "log": "stderr", "user": "", "group": ""},
    )
    daemon = DaemonProcess(conf, str(tmp_path / f"{name}.log"), prefix=[sys.executable, str(trap)])
    daemon.start(wait_port=ports["socketmap"])
    return daemon, ports


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_socketmap_only_serves_reloads_and_stops_on_each_stop_signal(sts_world, tmp_path, signum):
    """[milter] socket empty: no milter, none of its helper threads; the main thread waits
    for TERM/INT/HUP itself, USR1 still reloads."""
    sts_world.publish("only.example")
    daemon, ports = _socketmap_only(sts_world, tmp_path)
    try:
        daemon.wait_log("no milter ([milter] socket is empty)")
        secure = "OK secure match=mx.only.example servername=hostname"
        poll_until(lambda: ask(ports["socketmap"], "only.example") == secure, 10, "the policy")
        metrics = scrape(ports["metrics"])
        assert 'stsmilter_socketmap_lookups_total{result="ok"}' in metrics
        daemon.reload(lambda text: text.replace("[socketmap]\n", "[socketmap]\nstrict_testing = yes\n"))
        started = time.monotonic()
        daemon.signal(signum)
        assert daemon.proc.wait(10) == 0
        assert time.monotonic() - started < 2
        assert "Traceback" not in daemon.log(), daemon.log()
        # No libmilter, no stop watcher, waker or shedding guard.
        assert "milter part started" not in daemon.log() and "milter on" not in daemon.log()
        assert not os.path.exists(tmp_path / "smonly.pid")
    finally:
        daemon.stop()


def test_socketmap_only_check_config_and_nothing_to_serve(sts_world, tmp_path):
    conf = sts_world.write_config("smonly.conf", milter={"socket": ""},
                                  socketmap={"listen": f"inet:127.0.0.1:{free_port()}"})
    checked = sts_world.cli("check-config", "-c", conf)
    assert checked.returncode == 0, checked.stderr
    assert "\n[milter]\nsocket =\n" in checked.stdout
    neither = sts_world.write_config("neither.conf", milter={"socket": ""}, socketmap={"listen": ""})
    refused = sts_world.cli("check-config", "-c", neither)
    assert refused.returncode == 2
    line = open(neither).read().splitlines().index("socket = ") + 1
    assert refused.stderr.strip() == (f"stsmilter: configuration error: {neither}:{line}: [milter] socket and"
                                      " [socketmap] listen are both empty: nothing to serve (set at least one)")


def test_map_sections_answer_per_map_name_and_follow_a_reload(start_daemon, sts_world):
    """A strict zone answers secure for a testing policy, the default map NOTFOUND;
    the sections come and go with USR1, and the metrics count each configured map."""
    sts_world.publish("testing.example", mode="testing")
    daemon = start_daemon(**{"socketmap strict": {"strict_testing": "yes", "lookup_timeout": "3"}})
    secure = "OK secure match=mx.testing.example servername=hostname"
    poll_until(lambda: ask(daemon.socketmap_port, "testing.example", name="strict") == secure, 10, "strict")
    assert ask(daemon.socketmap_port, "testing.example") == "NOTFOUND "
    assert ask(daemon.socketmap_port, "testing.example", name="sts") == "NOTFOUND "
    metrics = scrape(daemon.metrics_port)
    assert 'stsmilter_socketmap_answers_total{kind="secure",map="strict"}' in metrics
    assert 'stsmilter_socketmap_answers_total{kind="notfound",map="default"}' in metrics
    assert 'stsmilter_socketmap_answers_total{kind="notfound",map="sts"}' in metrics
    daemon.reload(lambda text: text.replace("[socketmap strict]", "[socketmap postfix]"))
    assert ask(daemon.socketmap_port, "testing.example") == secure
    assert ask(daemon.socketmap_port, "testing.example", name="strict") == "NOTFOUND "
    assert 'map="postfix"' in scrape(daemon.metrics_port)
    assert daemon.stop() == 0
