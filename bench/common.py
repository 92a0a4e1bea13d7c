"""Shared helpers for the stsmilter benchmarks (bench/*.py).

Nothing here is shipped: the benchmarks reuse the loopback test world in tests/world/
(DnsServer, HttpsServer, StsWorld, PostfixInstance, DaemonProcess) and add

* an MTA-side milter driver (a small codec with pre-encoded packets, so that the
  driver costs a few microseconds per packet and is not what is being measured);
* a no-op pymilter milter, a static netstring socketmap responder and a UDP DNS
  responder that answers NXDOMAIN to everything, run as subprocesses by
  ``python bench/common.py noop-milter SOCKET`` / ``static-socketmap PORT`` /
  ``nxdomain-dns PORT``;
* a closed-loop multi-process load runner with one time window for all workers;
* cleanup plumbing: every process and temp directory goes away on return, on error
  and on Ctrl-C / SIGTERM.

Everything talks to 127.0.0.1 only and picks free ports at run time.
"""

from __future__ import annotations

import array
import contextlib
import multiprocessing
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))  # the test world: `import world.*`
if str(REPO) not in sys.path:
    # A fallback only: the venv has stsmilter installed (editable), and PYTHONPATH comes
    # first, so `PYTHONPATH=/other/tree python bench/X.py` (run outside the checkout)
    # benchmarks that tree instead, daemon subprocesses included.
    sys.path.append(str(REPO))

PYTHON = sys.executable
LOOPBACK = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- cleanup


class _Interrupted(KeyboardInterrupt):
    pass


def _on_sigterm(signum, frame):
    raise _Interrupted(f"signal {signum}")


@contextlib.contextmanager
def bench_session(prefix: str):
    """A temp dir (mode 0755, so user postfix can traverse it) and an ExitStack.

    SIGTERM becomes KeyboardInterrupt so that every ``finally`` runs; callbacks on the
    stack stop processes; the temp dir is removed last."""
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    root = Path(tempfile.mkdtemp(prefix=f"stsmilter-bench-{prefix}-"))
    os.chmod(root, 0o755)
    try:
        with contextlib.ExitStack() as stack:
            yield root, stack
    finally:
        shutil.rmtree(root, ignore_errors=True)
        signal.signal(signal.SIGTERM, old)


def run_main(main: Callable[[], int]) -> None:
    """sys.exit(main()), with Ctrl-C / SIGTERM reported in one line (exit 130) once
    every finally clause has stopped what the benchmark started."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("# interrupted; everything started was stopped", file=sys.stderr)
        code = 130
    sys.exit(code)


def free_port() -> int:
    from world.smtp_peers import free_port as _free_port  # never 2024

    return _free_port()


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    from world.daemon import poll_until

    return poll_until(predicate, timeout, what, interval)


def port_listening(port: int) -> bool:
    wanted = "0100007F:%04X" % port
    with open("/proc/net/tcp") as table:
        return any(f[1] == wanted and f[3] == "0A" for f in (line.split() for line in table))


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process (all its threads) from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine() -> str:
    mem = ""
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    return f"{os.cpu_count()} CPUs{mem}, Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M %Z')}"


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, int(round(p / 100.0 * (len(ordered) - 1)))))
    return ordered[k]


# --------------------------------------------------------------------------- the STS world


DOMAIN_WORDS = (
    "northwind", "contoso", "fabrikam", "tailspin", "wingtip", "adventure-works", "litware",
    "proseware", "lucerne", "margie", "fourthcoffee", "alpineski", "blueyonder", "cohowinery",
    "graphicdesign", "humongous", "treyresearch", "wideworld", "woodgrove", "relecloud",
)
TLDS = ("com", "net", "org", "de", "co.uk", "fr", "nl", "io")


def realistic_domains(count: int, seed: int = 8461, prefix: str = "") -> List[str]:
    """Distinct, realistic-looking domain names (10-30 characters), all under .test-like
    TLDs that exist only in the loopback DNS server."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < count:
        word = rng.choice(DOMAIN_WORDS)
        name = f"{prefix}{word}{rng.randrange(1, 100000)}.{rng.choice(TLDS)}"
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


class BenchWorld:
    """DnsServer + HttpsServer + StsWorld on loopback; stop() undoes everything."""

    def __init__(self, root: Path, https_class=None):
        from world.dns_server import DnsServer
        from world.fixtures_sts import StsWorld
        from world.https_server import HttpsServer

        self.root = root
        self.dns = DnsServer()
        self.https = (https_class or HttpsServer)()
        self.sts = None
        self.modes: Dict[str, str] = {}
        try:
            self.dns.start()
            self.https.start()
        except BaseException:
            self.stop()
            raise
        self.sts = StsWorld(self.dns, self.https, root)

    def publish(self, domains: Sequence[str], modes=("enforce", "testing", "none")) -> Dict[str, str]:
        """Publish each domain with a policy whose mx pattern matches its MX host."""
        for index, domain in enumerate(domains):
            mode = modes[index % len(modes)]
            self.sts.publish(domain, policy_id=f"20260{index:04d}T1", mode=mode)
            self.modes[domain] = mode
        return dict(self.modes)

    def config_text(self, **kwargs) -> str:
        return self.sts.config_text(**kwargs)

    def stop(self):
        for server in (self.https, self.dns):
            with contextlib.suppress(Exception):
                server.stop()


# --------------------------------------------------------------------------- processes


_STARTED: List[subprocess.Popen] = []  # every child process this benchmark started


def _terminate_all() -> None:
    """SIGTERM every child still running, so that they shut down in parallel (libmilter
    takes ~5 s to leave its accept loop); each stop() then only waits for its own."""
    for proc in _STARTED:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)


class Subprocess:
    """A child process with output to a file; stop() TERMs, then KILLs."""

    def __init__(self, argv: Sequence[str], log_path: Path, env=None, preexec_fn=None):
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        try:
            self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, preexec_fn=preexec_fn)
        except BaseException:
            self._log.close()
            raise
        _STARTED.append(self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def check_alive(self, what: str):
        if not self.alive():
            raise RuntimeError(f"{what} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        return True

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        from world.daemon import terminate

        _terminate_all()
        try:
            return terminate(self.proc, timeout)
        finally:
            self._log.close()


def _milter_ready(spec: str, proc: Subprocess) -> Callable[[], bool]:
    def ready() -> bool:
        proc.check_alive("milter")
        if spec.startswith("unix:"):
            path = spec[5:]
            if not os.path.exists(path):
                return False
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
                return True
            return False
        return port_listening(int(spec.split(":", 1)[1].split("@", 1)[0]))

    return ready


def start_noop_milter(root: Path, stack: contextlib.ExitStack, spec: str, name: str = "noop") -> Subprocess:
    proc = Subprocess([PYTHON, str(Path(__file__).resolve()), "noop-milter", spec], root / f"{name}.log")
    stack.callback(proc.stop)
    wait_for(_milter_ready(spec, proc), 15, f"no-op milter on {spec}")
    return proc


class StsDaemon:
    """`stsmilter run` (subprocess) against a BenchWorld, production-like settings:
    sqlite cache, metrics endpoint, socketmap, info logging (to a file)."""

    def __init__(self, world: BenchWorld, root: Path, stack: contextlib.ExitStack, name: str,
                 milter_spec: Optional[str] = None, socketmap_port: Optional[int] = None, preexec_fn=None,
                 **sections):
        from world.daemon import DaemonProcess

        self.metrics_port = free_port()
        self.socketmap_port = socketmap_port or free_port()
        self.milter_spec = milter_spec or f"inet:{free_port()}@{LOOPBACK}"
        merged = {
            "daemon": {"log": "stderr", "log_level": "info", "user": "", "group": "",
                       "pidfile": str(root / f"{name}.pid")},
            "milter": {"socket": self.milter_spec},
            "metrics": {"listen": f"{LOOPBACK}:{self.metrics_port}"},
            "socketmap": {"listen": f"inet:{LOOPBACK}:{self.socketmap_port}"},
        }
        for section, values in sections.items():
            merged.setdefault(section, {}).update(values)
        config_path = root / f"{name}.conf"
        config_path.write_text(world.config_text(cache_path=str(root / f"{name}-cache.sqlite"), **merged))
        self.proc = DaemonProcess(str(config_path), str(root / f"{name}.log"))
        stack.callback(self._stop)
        self.proc.start(preexec_fn=preexec_fn)
        proc = self.proc.proc
        _STARTED.append(proc)

        def ready():
            if proc.poll() is not None:
                raise RuntimeError(f"stsmilter exited with {proc.returncode}:\n{self.proc.log()[-3000:]}")
            return (port_listening(self.metrics_port) and port_listening(self.socketmap_port)
                    and _milter_ready(self.milter_spec, _Alive(proc))())

        wait_for(ready, 20, f"stsmilter {name}")

    def _stop(self):
        _terminate_all()
        self.proc.stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics(self) -> str:
        from world.daemon import scrape

        return scrape(self.metrics_port)

    def sample(self, name: str, **labels) -> float:
        from world.daemon import sample

        return sample(self.metrics(), name, **labels)

    def samples(self, name: str) -> Dict[str, float]:
        """{label text: value} for every sample of a metric."""
        out = {}
        for line in self.metrics().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                key, value = line.rsplit(" ", 1)
                out[key[len(name):]] = float(value)
        return out


# --------------------------------------------------------------------------- the peer

PEER_COMMAND = "mta-sts-daemon"  # postfix-mta-sts-resolver (PyPI); 1.5.1 measured
PEER_ENV = "STSMILTER_BENCH_PEER"  # its path, when it is not on PATH


def find_peer(explicit: Optional[str] = None) -> Optional[str]:
    """The mta-sts-daemon to run: explicit, else $STSMILTER_BENCH_PEER, else PATH; None if
    it is not installed (the benchmarks install nothing)."""
    candidate = explicit or os.environ.get(PEER_ENV) or shutil.which(PEER_COMMAND)
    if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
        return candidate
    return None


class PeerDaemon:
    """postfix-mta-sts-resolver's mta-sts-daemon against a loopback world.

    It resolves through /etc/resolv.conf (c-ares; no option for another server) and
    always fetches policies from port 443: it runs in a private mount namespace whose
    bind-mounted resolv.conf says ``nameserver 127.0.0.1:DNS_PORT`` (c-ares takes
    ip:port) with ``options timeout:2 attempts:1``, trusts SSL_CERT_FILE = ca_file, and
    the caller serves the policy hosts on 127.0.0.x:443 (in a network namespace of its
    own if 443 is taken). Needs root (unshare, mount). Proxies are unset: nothing leaves
    loopback."""

    def __init__(self, executable: str, root: Path, stack: contextlib.ExitStack, dns_port: int, ca_file: str,
                 name: str = "peer", port: Optional[int] = None, dns_timeout: int = 2, preexec_fn=None):
        self.port = port or free_port()
        resolv = root / f"{name}-resolv.conf"
        resolv.write_text(f"nameserver {LOOPBACK}:{dns_port}\noptions timeout:{dns_timeout} attempts:1\n")
        config = root / f"{name}.yml"
        # Its defaults but for the address and the shutdown wait (20 s: it would only slow the
        # benchmark's teardown). default_zone.timeout stays 4 s (its default); reuse_port
        # stays true (1.5.1 fails to start with false: UnboundLocalError in Responder.start).
        config.write_text(f"host: {LOOPBACK}\nport: {self.port}\nshutdown_timeout: 2\n"
                          "cache:\n  type: internal\n  options:\n    cache_size: 10000\n")
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["SSL_CERT_FILE"] = ca_file
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$1" /etc/resolv.conf && exec "$2" -c "$3" -v warn', "sh",
                str(resolv), executable, str(config)]
        self.proc = Subprocess(argv, root / f"{name}.log", env=env, preexec_fn=preexec_fn)
        stack.callback(self.proc.stop)
        wait_for(lambda: self.proc.check_alive("mta-sts-daemon") and port_listening(self.port), 20,
                 "mta-sts-daemon listening")

    @property
    def pid(self) -> int:
        return self.proc.pid  # unshare and sh exec: the daemon itself


class _Alive:
    def __init__(self, proc):
        self.proc = proc

    def check_alive(self, what):
        if self.proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {self.proc.returncode}")
        return True


# --------------------------------------------------------------------------- milter codec (MTA side)

# Protocol step bits (libmilter mfdef.h)
P_NOCONNECT, P_NOHELO, P_NOMAIL, P_NORCPT, P_NOBODY, P_NOHDRS, P_NOEOH, P_NR_HDR = (
    0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80)
P_NOUNKNOWN, P_NODATA, P_SKIP, P_RCPT_REJ = 0x100, 0x200, 0x400, 0x800
P_NR_CONN, P_NR_HELO, P_NR_MAIL, P_NR_RCPT, P_NR_DATA, P_NR_UNKN, P_NR_EOH, P_NR_BODY = (
    0x1000, 0x2000, 0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000)
P_HDR_LEADSPC = 0x100000
MTA_PROTOCOL = 0x1FFFFF  # every step bit Postfix 3.7 (milter protocol 6) offers
MTA_ACTIONS = 0x1FF  # ADDHDRS .. SETSYMLIST
DISPOSITIONS = frozenset(b"catryd")  # continue accept tempfail reject replycode discard


def _packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + cmd + data


def _z(*strings: str) -> bytes:
    return b"".join(s.encode() + b"\0" for s in strings)


def _macro(stage: bytes, **pairs: str) -> bytes:
    names = {"daemon_name": "{daemon_name}", "auth_authen": "{auth_authen}", "rcpt_mailer": "{rcpt_mailer}"}
    body = b"".join(_z(names.get(k, k), v) for k, v in pairs.items())
    return _packet(b"D", stage + body)


OPTNEG = _packet(b"O", struct.pack("!III", 6, MTA_ACTIONS, MTA_PROTOCOL))
QUIT = _packet(b"Q")


class Transaction:
    """One message as Postfix would hand it to a milter (one SMTP session, one message)."""

    def __init__(self, queue_id: str, sender: str, rcpts: Sequence[str], body_size: int = 1024):
        self.queue_id = queue_id
        self.sender = sender
        self.rcpts = list(rcpts)
        self.headers = [("From", f"<{sender}>"), ("To", ", ".join(f"<{r}>" for r in rcpts)),
                        ("Subject", "bench"), ("Message-ID", f"<{queue_id}@mta.bench.test>")]
        self.body = (b"x" * 78 + b"\r\n") * (body_size // 80)

    def plan(self, protocol: int) -> List[Tuple[bytes, int]]:
        """[(bytes to write, replies to read)]: steps negotiated away are not sent, steps
        marked no-reply are written together with the next step that gets a reply.
        Replies to read: 0 none, 1 one, 2 = EOM (read until a final disposition)."""
        steps: List[Tuple[bytes, bool]] = []  # (packets, reply expected)
        if not protocol & P_NOCONNECT:
            steps.append((_macro(b"C", daemon_name="mta.bench.test")
                          + _packet(b"C", _z("localhost") + b"4" + struct.pack("!H", 40000) + _z(LOOPBACK)),
                          not protocol & P_NR_CONN))
        if not protocol & P_NOHELO:
            steps.append((_macro(b"H") + _packet(b"H", _z("client.bench.test")), not protocol & P_NR_HELO))
        if not protocol & P_NOMAIL:
            steps.append((_macro(b"M", auth_authen="", i=self.queue_id)
                          + _packet(b"M", _z(f"<{self.sender}>", "SIZE=1200")), not protocol & P_NR_MAIL))
        if not protocol & P_NORCPT:
            for rcpt in self.rcpts:
                steps.append((_macro(b"R", rcpt_mailer="smtp", i=self.queue_id) + _packet(b"R", _z(f"<{rcpt}>")),
                              not protocol & P_NR_RCPT))
        if not protocol & P_NODATA:
            steps.append((_macro(b"T", i=self.queue_id) + _packet(b"T"), not protocol & P_NR_DATA))
        if not protocol & P_NOHDRS:
            for name, value in self.headers:
                steps.append((_packet(b"L", _z(name, value)), not protocol & P_NR_HDR))
        if not protocol & P_NOEOH:
            steps.append((_packet(b"N"), not protocol & P_NR_EOH))
        if not protocol & P_NOBODY:
            steps.append((_packet(b"B", self.body), not protocol & P_NR_BODY))
        steps.append((_macro(b"E", i=self.queue_id) + _packet(b"E"), True))
        out, pending = [], b""
        for index, (data, reply) in enumerate(steps):
            pending += data
            if reply:
                out.append((pending, 2 if index == len(steps) - 1 else 1))
                pending = b""
        return out


class MilterError(Exception):
    pass


class _Reader:
    __slots__ = ("sock", "buf")

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def packet(self) -> Tuple[int, bytes]:
        buf = self.buf
        while True:
            if len(buf) >= 5:
                size = int.from_bytes(buf[:4], "big")
                if len(buf) >= 4 + size:
                    self.buf = buf[4 + size:]
                    return buf[4], buf[5:4 + size]
            chunk = self.sock.recv(65536)
            if not chunk:
                raise MilterError("milter closed the connection")
            buf += chunk


def milter_address(spec: str):
    if spec.startswith("unix:"):
        return socket.AF_UNIX, spec[5:]
    port, _, host = spec.split(":", 1)[1].partition("@")
    return socket.AF_INET, (host or LOOPBACK, int(port))


def play(spec: str, transaction: Transaction, plans: Dict[int, list]) -> Tuple[int, int]:
    """One milter connection, one transaction. Returns (protocol bits, non-CONTINUE replies)."""
    family, address = milter_address(spec)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect(address)
        sock.sendall(OPTNEG)
        reader = _Reader(sock)
        cmd, data = reader.packet()
        if cmd != 0x4F:  # 'O'
            raise MilterError(f"bad OPTNEG reply {cmd!r}")
        protocol = int.from_bytes(data[8:12], "big")
        plan = plans.get(protocol)
        if plan is None:
            plan = plans[protocol] = transaction.plan(protocol)
        refused = 0
        for data, replies in plan:
            sock.sendall(data)
            if replies == 1:
                cmd, _ = reader.packet()
                if cmd != 0x63:  # 'c'
                    refused += 1
            elif replies == 2:
                while True:
                    cmd, _ = reader.packet()
                    if cmd in DISPOSITIONS:
                        break
                if cmd != 0x63:
                    refused += 1
        sock.sendall(QUIT)
        return protocol, refused
    finally:
        sock.close()


def make_transactions(domains: Sequence[str], count: int, rcpts_per: int = 4, seed: int = 1) -> List[Transaction]:
    """count transactions, each with rcpts_per recipients over rcpts_per - 1 domains
    (two recipients share a domain), rotating through every domain."""
    rng = random.Random(seed)
    out = []
    alphabet = "0123456789BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz"
    ndom = max(1, rcpts_per - 1)
    for n in range(count):
        picked = [domains[(n * ndom + k) % len(domains)] for k in range(ndom)]
        rcpts = [f"user{rng.randrange(1000)}@{d}" for d in picked]
        while len(rcpts) < rcpts_per:
            rcpts.append(f"other{rng.randrange(1000)}@{picked[0]}")
        queue_id = "4" + "".join(rng.choice(alphabet) for _ in range(11))
        out.append(Transaction(queue_id, f"sender{n % 50}@corp.bench.test", rcpts))
    return out


# --------------------------------------------------------------------------- load runner


def _cpu_self() -> float:
    t = os.times()
    return t.user + t.system


def _worker_entry(target, args, start_at, end_at, conn):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent cleans up; the window ends by itself
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        cpu0 = _cpu_self()
        result = target(*args, start_at=start_at, end_at=end_at)
        conn.send(("ok", result, _cpu_self() - cpu0))
    except BaseException as e:  # report, never hang the parent
        conn.send(("error", repr(e), 0.0))
    finally:
        conn.close()


def run_workers(target, args_per_worker: Sequence[tuple], duration: float, warmup: float = 0.25,
                timeout_slack: float = 30.0):
    """Run target(*args, start_at=, end_at=) in one forked process per args tuple, all
    in the same time window [start_at, end_at] (CLOCK_MONOTONIC is system-wide).
    target returns (count, latencies array('d')); returns (total, latencies, elapsed,
    client CPU seconds)."""
    ctx = multiprocessing.get_context("fork")
    start_at = time.monotonic() + warmup + 0.01 * len(args_per_worker)
    end_at = start_at + duration
    procs, pipes = [], []
    finished_ok = False
    try:
        for args in args_per_worker:
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker_entry, args=(target, args, start_at, end_at, child), daemon=True)
            p.start()
            child.close()
            procs.append(p)
            pipes.append(parent)
        total, latencies, cpu, last_end = 0, array.array("d"), 0.0, end_at
        for parent in pipes:
            if not parent.poll(max(0.0, end_at - time.monotonic()) + timeout_slack):
                raise TimeoutError("a load worker did not finish")
            try:
                status, result, worker_cpu = parent.recv()
            except EOFError:
                raise RuntimeError("a load worker died") from None
            if status != "ok":
                raise RuntimeError(f"load worker failed: {result}")
            count, lat, finished = result
            total += count
            latencies.extend(lat)
            cpu += worker_cpu
            last_end = max(last_end, finished)
        finished_ok = True
        return total, latencies, last_end - start_at, cpu
    finally:
        if not finished_ok:  # error or Ctrl-C: workers may block writing to unread pipes
            for p in procs:
                if p.is_alive():
                    p.kill()
        for parent in pipes:
            parent.close()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def milter_load(spec: str, transactions: List[Transaction], offset: int, *, start_at: float, end_at: float,
                max_count: int = 500000):
    """Closed loop: one milter connection per transaction, back to back."""
    plan_cache = [dict() for _ in transactions]
    now = time.monotonic()
    if start_at > now:
        time.sleep(start_at - now)
    lat = array.array("d")
    count, refused, n = 0, 0, offset
    perf = time.perf_counter
    mono = time.monotonic
    while count < max_count and mono() < end_at:
        index = n % len(transactions)
        t0 = perf()
        _, bad = play(spec, transactions[index], plan_cache[index])
        lat.append(perf() - t0)
        refused += bad
        count += 1
        n += 1
    if refused:
        raise MilterError(f"{refused} non-CONTINUE replies")
    return count, lat, mono()


# --------------------------------------------------------------------------- socketmap client


def netstring(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


def socketmap_load(port: int, requests: List[bytes], offset: int, *, start_at: float, end_at: float,
                   max_count: int = 5_000_000):
    """One persistent connection, one request in flight (as Postfix's socketmap client)."""
    sock = socket.create_connection((LOOPBACK, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        now = time.monotonic()
        if start_at > now:
            time.sleep(start_at - now)
        lat = array.array("d")
        perf, mono = time.perf_counter, time.monotonic
        send, recv = sock.sendall, sock.recv
        count, n, nreq = 0, offset, len(requests)
        while count < max_count:
            if count & 63 == 0 and mono() >= end_at:
                break
            t0 = perf()
            send(requests[n % nreq])
            reply = recv(4096)
            # complete netstring?  "<len>:<payload>,"
            while True:
                colon = reply.find(b":")
                if colon > 0 and len(reply) >= colon + 2 + int(reply[:colon]):
                    break
                more = recv(4096)
                if not more:
                    raise ConnectionError("socketmap server closed the connection")
                reply += more
            lat.append(perf() - t0)
            count += 1
            n += 1
        return count, lat, mono()
    finally:
        sock.close()


def socketmap_query(port: int, key: str, name: str = "postfix", timeout: float = 10.0) -> bytes:
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(netstring(f"{name} {key}".encode()))
        reply = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
            colon = reply.find(b":")
            if colon > 0 and len(reply) >= colon + 2 + int(reply[:colon]):
                break
        colon = reply.find(b":")
        return reply[colon + 1:-1]


def socketmap_warm(port: int, domains: Sequence[str], timeout: float = 60.0) -> Dict[str, bytes]:
    """Ask each domain until it is answered from the warm path (not TEMP: in progress,
    or a DANE check under way); domain -> that answer."""
    deadline = time.monotonic() + timeout
    answers = {}
    for domain in domains:
        while True:
            reply = socketmap_query(port, domain)
            if not reply.startswith(b"TEMP"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"socketmap kept answering {reply!r} for {domain}")
            time.sleep(0.05)
        answers[domain] = reply
    return answers


def socketmap_round(port: int, pid: int, requests: List[bytes], connections: int, duration: float) -> tuple:
    """One measurement of a socketmap server (process pid): socketmap_load() on that many
    connections for duration seconds. (lookups/s, p50 us, p99 us, server CPU us/lookup,
    client CPU us/lookup)."""
    args = [(port, requests, i * 5) for i in range(connections)]
    cpu0 = cpu_seconds(pid)
    total, lat, elapsed, client_cpu = run_workers(socketmap_load, args, duration)
    cpu1 = cpu_seconds(pid)
    return (total / elapsed, percentile(lat, 50) * 1e6, percentile(lat, 99) * 1e6, (cpu1 - cpu0) / total * 1e6,
            client_cpu / total * 1e6)


# --------------------------------------------------------------------------- subprocess servers


def _noop_milter_main(spec: str) -> int:
    import Milter

    from stsmilter.milter.negotiation import MILTER_FLAGS, NegotiatingMilter

    class NoopMilter(NegotiatingMilter):
        """Answers CONTINUE to the callbacks stsmilter implements, with the same
        decorators and negotiation, so the MTA negotiates exactly the same steps. The
        arguments reach envfrom()/envrcpt() through Milter.Base's envfrom_bytes and
        envrcpt_bytes, as in any pymilter milter (stsmilter has its own, cheaper ones)."""

        @Milter.noreply
        @Milter.symlist("{daemon_name}")
        def connect(self, hostname, family, hostaddr):
            return Milter.CONTINUE

        @Milter.noreply
        @Milter.symlist("{auth_authen}", "i")
        def envfrom(self, sender, *params):
            return Milter.CONTINUE

        @Milter.symlist("{rcpt_mailer}", "i")
        def envrcpt(self, to, *params):
            return Milter.CONTINUE

        def data(self):
            return Milter.CONTINUE

        @Milter.symlist("i")
        def eom(self):
            return Milter.CONTINUE

    Milter.factory = NoopMilter
    Milter.set_flags(MILTER_FLAGS)
    os.umask(0o000)
    Milter.runmilter("noop", spec, timeout=600)
    return 0


STATIC_REPLY_PAYLOAD = b"OK secure match=mx1.static.bench.test:.mail.static.bench.test servername=hostname"


def _static_socketmap_main(port: int) -> int:
    import asyncio

    reply = netstring(STATIC_REPLY_PAYLOAD)

    class Static(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.buffer = b""

        def data_received(self, data):
            if self.buffer:
                data = self.buffer + data
            pos, end, answers = 0, len(data), 0
            while pos < end:
                colon = data.find(b":", pos)
                if colon < 0:
                    break
                comma = colon + 1 + int(data[pos:colon])
                if comma >= end:
                    break
                answers += 1
                pos = comma + 1
            self.buffer = data[pos:]
            if answers:
                self.transport.write(reply * answers)

    async def main():
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = await loop.create_server(Static, LOOPBACK, port, backlog=1024)
        await stop.wait()
        server.close()

    asyncio.run(main())
    return 0


def start_static_socketmap(root: Path, stack: contextlib.ExitStack) -> Tuple[Subprocess, int]:
    port = free_port()
    proc = Subprocess([PYTHON, str(Path(__file__).resolve()), "static-socketmap", str(port)],
                      root / "static-socketmap.log")
    stack.callback(proc.stop)
    wait_for(lambda: proc.check_alive("static socketmap") and port_listening(port), 15, "static socketmap")
    return proc, port


def _nxdomain_dns_main(port: int) -> int:
    """A UDP DNS responder that answers NXDOMAIN to every query, built from the query's
    bytes (no parsing library): tens of thousands of answers per second, so that a
    benchmark of a million new domains measures the daemon, not the DNS server."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((LOOPBACK, port))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        wire, peer = sock.recvfrom(4096)
        pos = 12
        while pos < len(wire) and wire[pos]:  # the question's name: length-prefixed labels
            pos += 1 + wire[pos]
        end = pos + 5  # the root label, QTYPE, QCLASS
        if len(wire) < 12 or end > len(wire) or wire[4:6] != b"\0\1":
            continue
        query_flags = int.from_bytes(wire[2:4], "big")
        # QR, the query's opcode and RD, AA; RCODE 3 (NXDOMAIN); one question, no records
        flags = 0x8000 | (query_flags & 0x7900) | 0x0400 | 3
        sock.sendto(wire[:2] + struct.pack("!HHHHH", flags, 1, 0, 0, 0) + wire[12:end], peer)


def start_nxdomain_dns(root: Path, stack: contextlib.ExitStack) -> Tuple[Subprocess, int]:
    port = free_port()
    proc = Subprocess([PYTHON, str(Path(__file__).resolve()), "nxdomain-dns", str(port)], root / "nxdomain-dns.log")
    stack.callback(proc.stop)

    def answers() -> bool:
        proc.check_alive("NXDOMAIN responder")
        import dns.message
        import dns.query
        import dns.rcode

        try:
            reply = dns.query.udp(dns.message.make_query("probe.bench.test", "TXT"), LOOPBACK, timeout=0.2, port=port)
        except Exception:
            return False
        return reply.rcode() == dns.rcode.NXDOMAIN

    wait_for(answers, 15, "NXDOMAIN responder")
    return proc, port


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "nxdomain-dns":
        sys.exit(_nxdomain_dns_main(int(sys.argv[2])))
    if len(sys.argv) == 3 and sys.argv[1] == "noop-milter":
        sys.exit(_noop_milter_main(sys.argv[2]))
    if len(sys.argv) == 3 and sys.argv[1] == "static-socketmap":
        sys.exit(_static_socketmap_main(int(sys.argv[2])))
    print("usage: common.py noop-milter SOCKET | static-socketmap PORT | nxdomain-dns PORT", file=sys.stderr)
    sys.exit(2)
