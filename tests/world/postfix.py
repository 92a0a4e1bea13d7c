"""A private Postfix instance on loopback, run as root from a temp directory.

Under one root (mode 0755: the daemons run as user postfix and must traverse it):
``etc/`` (config_dir: main.cf, master.cf, ca.pem), ``spool/`` (queue_directory;
``postfix check`` creates its subdirs), ``data/`` (owned by postfix), ``log/maillog``.
Nothing resolves names: DNS is off, the relay host is an address literal, smtpd does
no peer-name lookups, and every host name in main.cf is set explicitly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import smtplib
import ssl
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, TypeVar

from world.smtp_peers import LOOPBACK, free_port

T = TypeVar("T")
CLIENT_HELO = "client.stsmilter.test"
CONTRIB_POSTFIX = Path(__file__).resolve().parents[2] / "contrib" / "postfix"

# Our own minimal master.cf rather than Debian's: the stock file chroots most services
# into $queue_directory, which a private queue directory does not have set up. The
# chroot column (5th) is "n" everywhere. The smtpd listener line is prepended.
MASTER_CF_SERVICES = """\
pickup    unix  n - n 60    1 pickup
cleanup   unix  n - n -     0 cleanup
qmgr      unix  n - n 300   1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n -     - trivial-rewrite
bounce    unix  - - n -     0 bounce
defer     unix  - - n -     0 bounce
trace     unix  - - n -     0 bounce
verify    unix  - - n -     1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -     - proxymap
showq     unix  n - n -     - showq
smtp      unix  - - n -     - smtp
relay     unix  - - n -     - smtp
error     unix  - - n -     - error
retry     unix  - - n -     - error
discard   unix  - - n -     - discard
local     unix  - n n -     - local
virtual   unix  - n n -     - virtual
anvil     unix  - - n -     1 anvil
scache    unix  - - n -     1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class Reply(NamedTuple):
    code: int
    text: str


class SendResult(NamedTuple):
    mail: Reply
    rcpt: Dict[str, Reply]  # one reply per RCPT TO actually sent
    data: Optional[Reply]  # None when no recipient was accepted

    @property
    def accepted(self) -> List[str]:
        return [addr for addr, reply in self.rcpt.items() if 200 <= reply.code < 300]


def _reply(code: int, text: bytes) -> Reply:
    return Reply(code, text.decode("utf-8", "replace"))


def _make_traversable(path: Path) -> None:
    """Add search permission for 'other' (user postfix) to path and its parents."""
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(directory, stat.S_IMODE(mode) | 0o011)



def processes_under(directory) -> List[int]:
    """PIDs of processes that belong to a throw-away world under directory: a Postfix
    daemon (MAIL_CONFIG under it) or anything whose command line names it
    (`stsmilter run -c DIR/stsmilter.conf`). Zombies (unreadable environ) are skipped."""
    prefix = os.fsencode(str(directory))
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:  # gone, or a zombie
            continue
        if any(v.startswith(b"MAIL_CONFIG=" + prefix) for v in environ) or prefix in cmdline:
            found.append(int(entry))
    return found

class PostfixInstance:
    """One private Postfix: construct (creates the temp root), start(), ..., stop().

    Call stop() (or use ``with``) whenever the object exists, even if start() failed:
    it kills what runs and removes the temp root; it is idempotent.
    """

    def __init__(
        self,
        tmp_root: Optional[os.PathLike] = None,
        *,
        smtpd_port: Optional[int] = None,
        relay: Optional[Tuple[str, int]] = None,
        milter: Optional[str] = None,
        non_smtpd_milter: bool = False,
        main_cf_extra: Optional[Dict[str, Optional[str]]] = None,
        main_cf_text: str = "",
        master_cf_extra: str = "",
        tls_ca_pem: Optional[bytes] = None,
        wrapper: Sequence[str] = (),
        hostname: str = "mta.stsmilter.test",
    ):
        # tmp_root None = the system temp dir. Not pytest's tmp_path: its parents are
        # 0700 and another pytest run re-chmods pytest-of-<user> to 0700 at start-up,
        # which would lock the running daemons out of their own queue.
        self.root = Path(tempfile.mkdtemp(prefix="stsmilter-postfix-", dir=tmp_root))
        os.chmod(self.root, 0o755)
        _make_traversable(self.root.parent)
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "spool"
        self.data_dir = self.root / "data"
        self.log_file = self.root / "log" / "maillog"
        self.smtpd_port = smtpd_port or free_port()
        self.relay = relay
        self.milter = milter
        self.non_smtpd_milter = non_smtpd_milter
        self.main_cf_extra = dict(main_cf_extra or {})
        self.main_cf_text = main_cf_text  # appended verbatim (a shipped snippet): it wins
        self.master_cf_extra = master_cf_extra
        self.tls_ca_pem = tls_ca_pem
        # Command prefix for `postfix start` only; master and every daemon inherit it.
        # Meant for `unshare --mount ...` with a bind-mounted private /etc/hosts so that
        # smtp_host_lookup = native resolves test MX names to loopback. stop() still
        # works from outside: it signals by pid (same pid namespace).
        self.wrapper = list(wrapper)
        self.hostname = hostname
        for directory in (self.config_dir, self.queue_dir, self.data_dir, self.log_file.parent):
            directory.mkdir()
            os.chmod(directory, 0o755)  # whatever the umask
        shutil.chown(self.data_dir, user="postfix")

    # -- configuration -------------------------------------------------------------
    def main_cf(self) -> Dict[str, str]:
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.hostname,
            "mydomain": self.hostname.partition(".")[2] or self.hostname,
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "alias_maps": "",
            "alias_database": "",
            "smtputf8_enable": "no",
            "biff": "no",
            "maillog_file": str(self.log_file),
            "maillog_file_prefixes": str(self.log_file.parent),
            # Minimums Postfix accepts; retries come quickly enough for tests.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtp_connect_timeout": "5s",
            "smtp_tls_security_level": "may",
            "smtp_tls_loglevel": "1",
            "milter_default_action": "tempfail",
            "milter_connect_timeout": "5s",
            "milter_command_timeout": "10s",
        }
        if self.relay is not None:
            settings["relayhost"] = "[%s]:%d" % self.relay
        if self.milter:
            settings["smtpd_milters"] = self.milter
            if self.non_smtpd_milter:
                settings["non_smtpd_milters"] = self.milter
        if self.tls_ca_pem is not None:
            settings["smtp_tls_CAfile"] = str(self.config_dir / "ca.pem")
        settings.update(self.main_cf_extra)
        return {key: value for key, value in settings.items() if value is not None}

    def write_config(self) -> None:
        main_cf = "".join(f"{key} = {value}\n" for key, value in self.main_cf().items()) + self.main_cf_text
        (self.config_dir / "main.cf").write_text(main_cf)
        smtpd = f"{LOOPBACK}:{self.smtpd_port} inet n - n - - smtpd\n"
        (self.config_dir / "master.cf").write_text(smtpd + MASTER_CF_SERVICES + self.master_cf_extra)
        if self.tls_ca_pem is not None:
            (self.config_dir / "ca.pem").write_bytes(self.tls_ca_pem)
        # Postfix re-reads a main.cf modified within the last ~2 s every 0.3 s until
        # it is that old (a guard against half-written files): backdating saves ~2 s.
        backdated = time.time() - 60
        for path in self.config_dir.iterdir():
            if path.is_file():
                os.chmod(path, 0o644)
                os.utime(path, (backdated, backdated))

    # -- commands ------------------------------------------------------------------
    def _run(self, argv: Sequence[str], stdin: bytes = b"", timeout: float = 30.0) -> str:
        done = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        output = done.stdout.decode("utf-8", "replace")
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {output}\n{self.log_tail()}")
        return output

    def postfix(self, *args: str) -> str:
        return self._run(["postfix", "-c", str(self.config_dir), *args])

    def postsuper(self, *args: str) -> str:
        return self._run(["postsuper", "-c", str(self.config_dir), *args])

    def start(self) -> "PostfixInstance":
        try:
            self.write_config()
            self.postfix("check")  # also creates the queue subdirectories
            self._run([*self.wrapper, "postfix", "-c", str(self.config_dir), "start"])
            self.wait_until(self._smtpd_listening, timeout=10, what=f"smtpd on port {self.smtpd_port}")
        except BaseException:
            self.stop()
            raise
        return self

    def master_pid(self) -> Optional[int]:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def processes(self) -> List[int]:
        """Live processes of this instance: all inherit MAIL_CONFIG=config_dir (their
        command lines never name it). Zombies (unreadable environ) are skipped: PID 1
        here reaps orphans ~1 s late, so a dead master lingers as `[master] <defunct>`."""
        marker = b"MAIL_CONFIG=" + os.fsencode(self.config_dir)
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                try:
                    with open(f"/proc/{entry}/environ", "rb") as environ:
                        if marker in environ.read().split(b"\0"):
                            pids.append(int(entry))
                except OSError:
                    pass
        return pids

    def stop(self) -> None:
        """SIGTERM the master, wait for its daemons to go, SIGKILL stragglers, remove
        the temp root. (`postfix stop` does the same kill but then polls with `sleep 1`,
        costing a second whenever the master takes more than a few ms to exit.)"""
        try:
            master = self.master_pid()
            if master in self.processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(master, signal.SIGTERM)  # the master SIGTERMs its children
                self._wait_for_exit(lambda: master in self.processes(), timeout=5)
            # A child the master forked but had not yet exec'd sleeps 1 s before it
            # exits: a short grace, then SIGKILL whatever is left.
            self._wait_for_exit(self.processes, timeout=0.2)
            for pid in self.processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._wait_for_exit(self.processes, timeout=5)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _wait_for_exit(running: Callable[[], object], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while running() and time.monotonic() < deadline:
            time.sleep(0.02)

    def __enter__(self) -> "PostfixInstance":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- observing -----------------------------------------------------------------
    def _smtpd_listening(self) -> bool:
        # Read the socket table instead of connecting: a probe connection would be a
        # real smtpd session, milter CONNECT included, in every milter test's counts.
        wanted = "0100007F:%04X" % self.smtpd_port  # 127.0.0.1 as /proc/net/tcp spells it
        with open("/proc/net/tcp") as table:
            return any(f[1] == wanted and f[3] == "0A" for f in (line.split() for line in table))  # 0A: LISTEN

    def queue(self) -> List[dict]:
        """`postqueue -j`: one dict per message with queue_name ('incoming', 'active',
        'deferred', 'hold', 'maildrop'), queue_id, sender and recipients (each with
        address and, once deferred, delay_reason)."""
        output = self._run(["postqueue", "-c", str(self.config_dir), "-j"])
        return [json.loads(line) for line in output.splitlines() if line.strip()]

    def hold_queue(self) -> List[dict]:
        return [message for message in self.queue() if message["queue_name"] == "hold"]

    def flush(self) -> None:
        self._run(["postqueue", "-c", str(self.config_dir), "-f"])

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_until(self, predicate: Callable[[], T], timeout: float = 10.0, what: str = "") -> T:
        """Poll predicate until it returns something truthy; return that value."""
        from world.daemon import poll_until

        return poll_until(predicate, timeout, what or predicate, detail=lambda: f"; maillog tail:\n{self.log_tail()}")

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        regex = re.compile(pattern)
        return self.wait_until(lambda: regex.search(self.log_text()), timeout, what=f"log /{pattern}/")

    # -- sending -------------------------------------------------------------------
    def send(
        self,
        from_addr: str,
        rcpts: Iterable[str],
        body: str = "stsmilter test message\n",
        *,
        headers: Optional[Dict[str, str]] = None,
        timeout: float = 30.0,
        port: Optional[int] = None,
        tls: Optional[ssl.SSLContext] = None,
        implicit_tls: bool = False,
        login: Optional[Tuple[str, str]] = None,
    ) -> SendResult:
        """One SMTP transaction to smtpd, recording the reply to every command.

        RCPT replies are kept per recipient (smtplib.sendmail() hides them); DATA is
        sent only when at least one recipient was accepted. port: another smtpd service
        (default the port-25 one); tls: STARTTLS with this client context, or with
        implicit_tls TLS from the first byte (submissions); login: SASL user, password.
        """
        rcpts = list(rcpts)
        fields = {"From": f"<{from_addr}>", "To": ", ".join(f"<{r}>" for r in rcpts), "Subject": "stsmilter test"}
        fields.update(headers or {})
        message = "".join(f"{name}: {value}\r\n" for name, value in fields.items()) + "\r\n" + body
        rcpt_replies: Dict[str, Reply] = {}
        data = None
        # local_hostname: smtplib's default is socket.getfqdn(), a resolver lookup.
        port = port or self.smtpd_port
        if implicit_tls:
            client = smtplib.SMTP_SSL(LOOPBACK, port, local_hostname=CLIENT_HELO, timeout=timeout, context=tls)
        else:
            client = smtplib.SMTP(LOOPBACK, port, local_hostname=CLIENT_HELO, timeout=timeout)
        with client:
            client.ehlo()
            if tls is not None and not implicit_tls:
                client.starttls(context=tls)
                client.ehlo()
            if login is not None:
                client.login(*login)
            mail = _reply(*client.mail(from_addr))
            if mail.code < 400:
                for rcpt in rcpts:
                    rcpt_replies[rcpt] = _reply(*client.rcpt(rcpt))
            if any(200 <= reply.code < 300 for reply in rcpt_replies.values()):
                try:
                    data = _reply(*client.data(message))  # smtplib fixes line ends
                except smtplib.SMTPDataError as error:  # DATA itself refused
                    data = _reply(error.smtp_code, error.smtp_error)
        return SendResult(mail, rcpt_replies, data)

    def sendmail(self, from_addr: str, rcpts: Iterable[str], message: bytes) -> None:
        """Submit through sendmail(1) -> postdrop -> pickup: the path non_smtpd_milters see."""
        self._run(["sendmail", "-C", str(self.config_dir), "-f", from_addr, "--", *rcpts], stdin=message)


# -- the shipped contrib/postfix snippets ------------------------------------------------


def _substitute(text: str, old: str, new: str) -> str:
    assert old in text, f"{old!r} not in the shipped snippet"
    return text.replace(old, new)


def shipped_main_cf(milter_port: int, socketmap_port: int, paths: Optional[Dict[str, str]] = None) -> str:
    """contrib/postfix/main.cf.snippet with only stsmilter's ports (8894, 8461) and the
    given file paths replaced (for PostfixInstance(main_cf_text=...))."""
    text = (CONTRIB_POSTFIX / "main.cf.snippet").read_text()
    text = _substitute(text, "inet:127.0.0.1:8894,", f"inet:127.0.0.1:{milter_port},")
    text = _substitute(text, "socketmap:inet:127.0.0.1:8461:", f"socketmap:inet:127.0.0.1:{socketmap_port}:")
    for old, new in (paths or {}).items():
        text = _substitute(text, old, new)
    return text


def shipped_master_cf(ports: Dict[str, int]) -> str:
    """contrib/postfix/master.cf.snippet with each service (submission, submissions)
    listening on 127.0.0.1:PORT instead of its well-known port, and the chroot column
    "n": the snippet's "y" means Debian's jail in /var/spool/postfix, which a private
    queue directory is not. Nothing else changes."""
    lines = (CONTRIB_POSTFIX / "master.cf.snippet").read_text().splitlines(keepends=True)
    replaced = set()
    for number, line in enumerate(lines):
        fields = line.split()
        if fields and fields[0] in ports and fields[1] == "inet":
            assert fields[4] == "y", line
            fields[0], fields[4] = f"{LOOPBACK}:{ports[fields[0]]}", "n"
            lines[number] = " ".join(fields) + "\n"
            replaced.add(line.split()[0])
    assert replaced == set(ports), f"services not in the snippet: {set(ports) - replaced}"
    return "".join(lines)


def enable_submission_auth(instance: PostfixInstance, ca, users: Dict[str, str]) -> None:
    """What the shipped submission services expect main.cf to provide: a server
    certificate (from a trustme CA) and SASL. SASL is Cyrus with a private sasldb
    (saslpasswd2 from sasl2-bin). Its smtpd.conf goes to $config_directory/sasl:
    Debian's Postfix looks only there (debian/patches/07_sasl_config.diff) and ignores
    cyrus_sasl_config_path, which is set too for other builds. Call before start()."""
    saslpasswd2 = shutil.which("saslpasswd2") or "/usr/sbin/saslpasswd2"
    sasl_dir = instance.config_dir / "sasl"
    sasl_dir.mkdir()
    os.chmod(sasl_dir, 0o755)
    sasldb = instance.root / "sasldb2"  # outside config_dir, which must be root's
    for user, password in users.items():
        subprocess.run([saslpasswd2, "-f", str(sasldb), "-p", "-c", "-u", instance.hostname, user],
                       input=password.encode(), check=True, timeout=30, capture_output=True)
    shutil.chown(sasldb, user="postfix")  # smtpd reads it as user postfix
    os.chmod(sasldb, 0o600)
    (sasl_dir / "smtpd.conf").write_text(
        f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\nsasldb_path: {sasldb}\n"
    )
    os.chmod(sasl_dir / "smtpd.conf", 0o644)
    cert = ca.issue_cert(instance.hostname, LOOPBACK)  # clients connect to the address
    cert_file, key_file = sasl_dir / "smtpd-cert.pem", sasl_dir / "smtpd-key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    os.chmod(key_file, 0o600)  # smtpd reads it as root, before it drops privileges
    instance.main_cf_extra.update({
        "smtpd_tls_cert_file": str(cert_file),
        "smtpd_tls_key_file": str(key_file),
        "smtpd_sasl_type": "cyrus",
        "smtpd_sasl_path": "smtpd",
        "cyrus_sasl_config_path": str(sasl_dir),
        "smtpd_sasl_local_domain": "$myhostname",
    })
