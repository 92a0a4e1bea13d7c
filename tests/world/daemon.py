"""`stsmilter run` as a subprocess, as an init script would start it."""

import collections
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def terminate(proc, timeout=10.0):
    """TERM a subprocess.Popen, KILL it if it is still there after timeout; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def poll_until(predicate, timeout, what, interval=0.05, detail=lambda: ""):
    """Call predicate until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}{detail()}")
        time.sleep(interval)


_RECENT_PORTS = collections.deque(maxlen=64)


def free_port():
    """A port free now on 127.0.0.1 and not handed out recently by this process: callers
    take several ports before binding any, and two successive bind(0)s can get the same
    port from the kernel (seen: the milter and the socketmap given one port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _RECENT_PORTS:
            _RECENT_PORTS.append(port)
            return port


def wait_for_port(port, proc=None, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"stsmilter exited with {proc.returncode}: {proc.stderr_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


class DaemonProcess:
    """Runs `python -m stsmilter run -c CONFIG`, stderr captured to a file; prefix: a
    command to run it under (e.g. setpriv)."""

    def __init__(self, config_path, log_path, prefix=()):
        self.config_path = config_path
        self.log_path = log_path
        self.prefix = list(prefix)
        self.proc = None

    def start(self, wait_port=None, preexec_fn=None):
        env = dict(os.environ)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "stsmilter", "run", "-c", self.config_path],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec_fn,
        )
        self.proc.stderr_text = self.log
        if wait_port:
            wait_for_port(wait_port, self.proc)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def wait_log(self, text, timeout=10.0, since=0):
        """Wait until text is in the log after its first `since` characters; returns the
        log from `since` on."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tail = self.log()[since:]
            if text in tail:
                return tail
            time.sleep(0.05)
        raise TimeoutError(f"{text!r} not logged; log:\n{self.log()}")

    def signal(self, signum):
        self.proc.send_signal(signum)

    def reload(self, edit, expect="configuration reloaded"):
        """Rewrite the config file with edit(text) -> text, send USR1, wait for expect
        to be logged by this reload; returns what was logged since the signal."""
        with open(self.config_path) as f:
            text = f.read()
        with open(self.config_path, "w") as f:
            f.write(edit(text))
        since = len(self.log())
        self.signal(signal.SIGUSR1)
        return self.wait_log(expect, since=since)

    def stop(self, timeout=10.0):
        """TERM, then KILL if it does not exit; returns the exit status."""
        if self.proc is None:
            return None
        status = terminate(self.proc, timeout)
        self._log.close()
        return status


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def sample(text, name, **labels):
    """The value of one sample in Prometheus text format (0.0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        if "{" in key:
            metric, rest = key.split("{", 1)
            got = ",".join(sorted(rest.rstrip("}").split(",")))
        else:
            metric, got = key, ""
        if metric == name and got == want:
            return float(value)
    return 0.0
