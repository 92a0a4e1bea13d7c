"""Fixture: start `stsmilter run` against the STS world, stopped at teardown."""

import pytest

from world.daemon import DaemonProcess, free_port


class RunningDaemon(DaemonProcess):
    milter_port = metrics_port = socketmap_port = None
    milter_socket = None


@pytest.fixture
def start_daemon(sts_world, tmp_path):
    """start_daemon(unix_socket=None, name=, preexec_fn=None, prefix=(), **config_sections) ->
    RunningDaemon (listening); prefix: a command to run it under (e.g. setpriv)."""
    started = []

    def start(unix_socket=None, name="stsmilter", preexec_fn=None, prefix=(), **sections):
        milter_port, metrics_port, socketmap_port = free_port(), free_port(), free_port()
        milter_socket = f"unix:{unix_socket}" if unix_socket else f"inet:{milter_port}@127.0.0.1"
        merged = {
            "milter": {"socket": milter_socket},
            "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
            "socketmap": {"listen": f"inet:127.0.0.1:{socketmap_port}"},
            "daemon": {"log": "stderr", "log_level": "info", "user": "", "group": "",
                       "pidfile": str(tmp_path / f"{name}.pid")},
        }
        for section, values in sections.items():
            merged.setdefault(section, {}).update(values)
        config_path = sts_world.write_config(f"{name}.conf", **merged)
        daemon = RunningDaemon(config_path, str(tmp_path / f"{name}.log"), prefix)
        daemon.milter_port, daemon.metrics_port, daemon.socketmap_port = milter_port, metrics_port, socketmap_port
        daemon.milter_socket = milter_socket
        daemon.pidfile = merged["daemon"]["pidfile"]
        started.append(daemon)
        daemon.start(wait_port=metrics_port, preexec_fn=preexec_fn)
        if not unix_socket:
            from world.daemon import wait_for_port
            wait_for_port(milter_port, daemon.proc)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
