"""A private Redis: Debian's redis-server on a loopback port, no persistence, its own
config in a temp directory (never the system service or /etc/redis). It can be stopped
and started again on the same port, to play an outage."""

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from world.daemon import free_port, poll_until

REDIS_SERVER = "/usr/bin/redis-server"
START_TIMEOUT = 15.0


def _die_with_parent():
    """In the child before exec: SIGKILL when the thread that started it dies, so that a
    test process killed before its teardown (make mutate's timeouts, pytest-timeout's
    os._exit) leaves no redis-server behind (PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG


class RedisServer:
    """start() -> self (answering PING); stop() kills it; close() also removes its
    directory. Call close() whenever the object exists, even if start() failed."""

    def __init__(self, port=None):
        self.port = port or free_port()
        self.root = tempfile.mkdtemp(prefix="stsmilter-redis-")
        self.config_path = os.path.join(self.root, "redis.conf")
        self.log_path = os.path.join(self.root, "redis.log")
        self.proc = None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def config_text(self):
        return "\n".join([
            "bind 127.0.0.1",
            f"port {self.port}",
            "protected-mode yes",
            "daemonize no",
            'save ""',
            "appendonly no",
            f"dir {self.root}",
            f"logfile {self.log_path}",
            "databases 4",
            "",
        ])

    def start(self):
        with open(self.config_path, "w") as f:
            f.write(self.config_text())
        self.proc = subprocess.Popen([REDIS_SERVER, self.config_path], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        poll_until(self._answers, START_TIMEOUT, f"redis-server on port {self.port}", detail=self._log_tail)
        return self

    def _answers(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}{self._log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self):
        try:
            with open(self.log_path) as f:
                return ":\n" + "".join(f.readlines()[-10:])
        except OSError:
            return ""

    def stop(self):
        """Kill it at once (an outage, not a shutdown); its data is gone (no persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # (also ends a paused one)
            self.proc.wait(10)
        self.proc = None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the port is free again before a restart
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            except OSError:
                return
            time.sleep(0.05)

    def pause(self):
        """A hung Redis: connections are accepted (by the kernel) and never answered."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def close(self):
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def client(self, **kwargs):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)
