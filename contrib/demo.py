#!/usr/bin/env python3
"""stsmilter demo: MTA-STS enforcement through a real Postfix, all on loopback.

    make demo                        # or: .venv/bin/python contrib/demo.py

Builds a throw-away world from the test servers in tests/world/ (nothing is
duplicated here): a DNS server, HTTPS policy hosts with a private CA, an SMTP sink
standing in for every MX, `stsmilter run` with the milter over TCP, the socketmap and
/metrics, and a private Postfix (smtpd_milters -> stsmilter, relayhost -> the sink).
It publishes one domain per interesting case, sends one message with one recipient in
each through Postfix, and prints what Postfix answered to every RCPT TO and why, the
socketmap's answer per domain and the relevant /metrics lines.

Only 127.0.0.1 is used; every port is picked at run time. Every process and directory
the demo starts is stopped/removed at the end, also on error or Ctrl-C. Needs root
(Postfix runs as a private instance) and the Debian packages postfix and libmilter-dev.

Exit status: 0 when everything behaved as expected, 1 when something did not (the
message says what), 2 when the demo cannot run here, 130 on Ctrl-C.
"""

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

SENDER = "alice@sender.example"
REPLY_WIDTH = 40  # SMTP reply column; longer replies are cut and printed in full below
RECIPIENT = "user@{}"
VIOLATING = "bad.example"

# (domain, what is published, expected RCPT reply code, world.publish() arguments or
# None for a domain without MTA-STS)
CASES = [
    ("plain.example", "no MTA-STS record", 250, None),
    ("good.example", "enforce, MX matches the policy", 250, dict(policy_id="g1")),
    ("bad.example", "enforce, MX does not match", 451,
     dict(policy_id="b1", mx_hosts=["mx.attacker.example"])),
    ("testing.example", "testing, MX does not match", 250,
     dict(policy_id="t1", mode="testing", mx_hosts=["mx.elsewhere.example"])),
    ("none.example", "mode none", 250, dict(policy_id="n1", mode="none", mx_patterns=())),
    ("broken.example", "enforce, policy host answers HTTP 500", 250, dict(policy_id="x1", status=500)),
    ("expired.example", "enforce, policy host cert expired", 250, dict(policy_id="e1", expired=True)),
]
METRICS = ("stsmilter_decisions_total", "stsmilter_policy_fetches_total", "stsmilter_cache_entries",
           "stsmilter_socketmap_lookups_total")


class DemoError(Exception):
    """Something did not behave as expected; str() says what."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP: unwind like Ctrl-C so that everything is cleaned up."""


def _interrupted(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def say(text=""):
    print(text, flush=True)


def table(rows, indent="  "):
    """Left-aligned columns; the last column is not padded."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [str(c).ljust(w) for c, w in zip(row, widths)] + [str(row[-1])]
        say((indent + "  ".join(cells)).rstrip())


def cut(text, width):
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def cannot_run(text):
    print(f"demo: {text}", file=sys.stderr)
    sys.exit(2)


def preflight():
    if sys.version_info < (3, 9):
        cannot_run("needs Python 3.9+; run it with the project's venv: make demo")
    if os.geteuid() != 0:
        cannot_run("must run as root (it starts a private Postfix instance)")
    os.environ["PATH"] = os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
    if shutil.which("postfix") is None:
        cannot_run("postfix is not installed; run `sh contrib/bootstrap.sh test` once as root "
                   "(or apt-get install postfix libmilter-dev)")
    try:
        import aiosmtpd  # noqa: F401
        import Milter  # noqa: F401
        import trustme  # noqa: F401

        import stsmilter  # noqa: F401
    except ImportError as e:
        cannot_run(f"{e}; run it with the project's venv (make demo creates it)")


def netstring_lookup(sock, key):
    """One socketmap request ('postfix KEY'); returns (request, answer) as text."""
    payload = b"postfix " + key.encode()
    request = b"%d:%s," % (len(payload), payload)
    sock.sendall(request)
    data = b""
    while True:
        head, colon, rest = data.partition(b":")
        if colon:
            if not head.isdigit():
                raise DemoError(f"socketmap sent a malformed reply: {data[:80]!r}")
            if len(rest) >= int(head) + 1:
                if rest[int(head): int(head) + 1] != b",":
                    raise DemoError(f"socketmap sent a malformed reply: {data[:80]!r}")
                return request.decode(), rest[: int(head)].decode("ascii", "replace")
        chunk = sock.recv(4096)
        if not chunk:
            raise DemoError(f"socketmap closed the connection while answering {key}")
        data += chunk


def why(row, fetch_failures):
    """The 'why' column from one `stsmilter check --json` row (plus, for a failed
    discovery, the fetch error from the daemon's log)."""
    reason, mode = row.get("reason"), row.get("mode")
    if reason is None:
        return "?"
    if reason == "no-policy":
        return "no-policy: no _mta-sts TXT record"
    if reason == "discovery-failed":
        failure = fetch_failures.get(row.get("domain"))
        return f"discovery-failed ({cut(failure, 60)})" if failure else reason
    text = f"{mode} id {row.get('policy_id')}, {reason}"
    if row.get("mx"):
        text += ": MX " + ",".join(row["mx"])
    if row.get("would") and row.get("would") != row.get("action"):
        text += f" (would {row['would']})"
    return text


def run(world_dir, cleanup):
    from world.daemon import DaemonProcess, free_port, scrape, wait_for_port
    from world.dns_server import DnsServer
    from world.fixtures_sts import StsWorld
    from world.https_server import HttpsServer
    from world.postfix import PostfixInstance
    from world.smtp_peers import SmtpSink

    # -- the servers ------------------------------------------------------------------
    dns_server = DnsServer("127.0.0.1")
    cleanup.callback(dns_server.stop)
    dns_server.start()
    https = HttpsServer("127.0.0.1")
    cleanup.callback(https.stop)
    https.start()
    sink = SmtpSink(hostname="sink.stsmilter.test")
    cleanup.callback(sink.stop)
    sink.start()
    world = StsWorld(dns_server, https, world_dir)

    say("published")
    rows = [("domain", "MX host", "MTA-STS")]
    for domain, description, _code, publish in CASES:
        if publish is None:
            dns_server.add(domain, "MX", f"10 mx.{domain}.")
            dns_server.add(f"mx.{domain}", "A", "127.0.0.1")
            mx = f"mx.{domain}"
        else:
            world.publish(domain, **publish)
            mx = ",".join(publish.get("mx_hosts", [f"mx.{domain}"]))
        rows.append((domain, mx, description))
    table(rows)
    say()

    milter_port, socketmap_port, metrics_port = free_port(), free_port(), free_port()
    config = world.write_config(
        "stsmilter.conf",
        cache_path=str(world_dir / "cache.sqlite"),
        milter={"socket": f"inet:{milter_port}@127.0.0.1"},
        socketmap={"listen": f"inet:127.0.0.1:{socketmap_port}"},
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
    )
    daemon = DaemonProcess(config, str(world_dir / "stsmilter.log"))

    def stop_daemon():
        daemon.stop()  # TERM (the daemon wakes libmilter itself), KILL after 10 s
        if getattr(daemon, "_log", None) is not None:
            daemon._log.close()

    cleanup.callback(stop_daemon)
    try:
        daemon.start(wait_port=metrics_port)
        wait_for_port(milter_port, daemon.proc)
        wait_for_port(socketmap_port, daemon.proc)
    except (RuntimeError, TimeoutError) as e:
        raise DemoError(f"stsmilter run did not start: {e}") from None

    postfix = PostfixInstance(tmp_root=world_dir, relay=("127.0.0.1", sink.port),
                              milter=f"inet:127.0.0.1:{milter_port}")
    cleanup.callback(postfix.stop)
    try:
        postfix.start()
    except (RuntimeError, TimeoutError) as e:
        raise DemoError(f"Postfix did not start: {e}") from None

    say("started (127.0.0.1 only)")
    table([
        ("dns server", f"127.0.0.1:{dns_server.port} udp+tcp"),
        ("policy hosts", f"https://127.0.0.1:{https.port}/.well-known/mta-sts.txt, private CA"),
        ("relay sink", f"smtp 127.0.0.1:{sink.port} (stands in for every MX)"),
        ("stsmilter run", f"-c {config}"),
        ("  milter", f"inet:{milter_port}@127.0.0.1"),
        ("  socketmap", f"127.0.0.1:{socketmap_port}"),
        ("  metrics", f"http://127.0.0.1:{metrics_port}/metrics"),
        ("postfix", f"smtpd 127.0.0.1:{postfix.smtpd_port}, smtpd_milters = inet:127.0.0.1:{milter_port}"),
    ])
    say()

    # -- one message, one recipient per domain ----------------------------------------
    recipients = [RECIPIENT.format(domain) for domain, *_ in CASES]
    t0 = time.monotonic()
    try:
        result = postfix.send(SENDER, recipients, "stsmilter demo message\n")
    except OSError as e:  # smtplib's errors are OSErrors too
        # smtplib's __exit__ sends QUIT even when Ctrl-C interrupted a command, and
        # raises about the out-of-step reply: the interruption is what happened.
        if isinstance(e.__context__, (KeyboardInterrupt, Interrupted)):
            raise e.__context__ from None
        raise DemoError(f"sending through Postfix failed: {e}") from None
    send_seconds = time.monotonic() - t0
    if result.mail.code != 250:
        raise DemoError(f"Postfix refused MAIL FROM: {result.mail.code} {result.mail.text}")

    check = world.cli("check", "--json", "-c", config, *recipients)
    if check.returncode != 0:
        raise DemoError(f"stsmilter check failed ({check.returncode}): {check.stderr.strip()}")
    decisions = {row["recipient"]: row for row in json.loads(check.stdout)}
    fetch_failures = {m.group(1): m.group(2).strip() for m in re.finditer(
        r"policy fetch for (\S+) \(id [^)]*\) failed: ([^\n]+)", daemon.log())}

    say(f"sent one message from {SENDER} to {len(recipients)} recipients through Postfix "
        f"({send_seconds:.2f} s)")
    rows = [("recipient", "RCPT TO reply", "why (stsmilter check --json)")]
    problems, long_replies = [], []
    for (domain, _description, expected, _publish), rcpt in zip(CASES, recipients):
        reply = result.rcpt.get(rcpt)
        shown = f"{reply.code} {reply.text}" if reply else "(not sent)"
        if len(shown) > REPLY_WIDTH:
            long_replies.append((rcpt, shown))
        rows.append((rcpt, cut(shown, REPLY_WIDTH), why(decisions.get(rcpt, {}), fetch_failures)))
        if reply is None or reply.code != expected:
            problems.append(f"{rcpt}: expected {expected}, got {shown}")
        elif expected == 451 and not reply.text.startswith("4.7.5 "):
            problems.append(f"{rcpt}: expected 451 4.7.5, got {shown}")
    table(rows)
    for rcpt, text in long_replies:
        say(f"  full reply for {rcpt}:")
        say(f"    {text}")
    if problems:
        raise DemoError("unexpected RCPT replies:\n  " + "\n  ".join(problems))

    accepted = [r for r in recipients if r != RECIPIENT.format(VIOLATING)]
    try:
        delivered = sink.wait_for(1, timeout=20)[0]
    except TimeoutError:
        raise DemoError("Postfix did not deliver the message to the relay sink within 20 s:\n"
                        + postfix.log_tail(10)) from None
    if sorted(delivered.rcpt_tos) != sorted(accepted):
        raise DemoError(f"the sink got the message for {sorted(delivered.rcpt_tos)}, expected {sorted(accepted)}")
    say(f"  delivered: the relay sink got the message for the {len(accepted)} accepted recipients;"
        f" {RECIPIENT.format(VIOLATING)} stays with the sender")
    say()

    # -- socketmap: what Postfix's smtp_tls_policy_maps would be told -------------------
    say(f"socketmap lookups on 127.0.0.1:{socketmap_port} (Postfix smtp_tls_policy_maps at delivery time)")
    rows = [("domain", "request", "answer")]
    with socket.create_connection(("127.0.0.1", socketmap_port), timeout=10) as sock:
        for domain, _description, _code, publish in CASES:
            request, answer = netstring_lookup(sock, domain)
            rows.append((domain, request, answer))
            enforce = publish is not None and publish.get("mode", "enforce") == "enforce" \
                and "status" not in publish and "expired" not in publish
            if enforce and not answer.startswith("OK secure match="):
                problems.append(f"{domain}: expected 'OK secure match=...', got {answer!r}")
            if not enforce and not answer.startswith("NOTFOUND"):
                problems.append(f"{domain}: expected NOTFOUND, got {answer!r}")
    table(rows)
    if problems:
        raise DemoError("unexpected socketmap answers:\n  " + "\n  ".join(problems))
    say()

    # -- the cache the daemon filled ------------------------------------------------------
    listing = world.cli("cache", "list", "--json", "-c", config)
    if listing.returncode != 0:
        raise DemoError(f"stsmilter cache list failed ({listing.returncode}): {listing.stderr.strip()}")
    cached = json.loads(listing.stdout)
    say("cached policies (stsmilter cache list --json, the daemon's sqlite cache)")
    rows = [("domain", "id", "mode", "mx patterns")]
    rows += [(e["domain"], e["id"], e["mode"], ",".join(e["mx"]) or "-") for e in cached]
    table(rows)
    say()

    # -- metrics ------------------------------------------------------------------------
    say(f"metrics (http://127.0.0.1:{metrics_port}/metrics)")
    text = scrape(metrics_port)
    rows = []
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        if key.split("{", 1)[0] in METRICS:
            rows.append((key, f"{float(value):g}"))
    if not rows:
        raise DemoError("/metrics has none of " + ", ".join(METRICS))
    table(rows)
    gauge = dict(rows).get("stsmilter_cache_entries")
    if gauge is not None and gauge != str(len(cached)):
        say(f"  note: stsmilter_cache_entries says {gauge}, the cache holds {len(cached)}: the gauge is"
            " refreshed at start-up and by the periodic refresher, not on every fetch")
    wanted = 'stsmilter_decisions_total{action="tempfail",mode="enforce",reason="mx-mismatch"}'
    if (wanted, "1") not in rows:
        raise DemoError(f"/metrics does not show {wanted} 1")
    say()


def main():
    preflight()
    logging.getLogger().addHandler(logging.NullHandler())  # aiosmtpd and friends: quiet
    logging.getLogger().setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")
    os.environ.pop("SSL_CERT_FILE", None)  # the daemon trusts only the world's CA file
    # The daemon and the CLI run this checkout's code, whatever the venv holds.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # Ctrl-C raises KeyboardInterrupt even if SIGINT came in ignored (a background job);
    # TERM and HUP unwind the same way, so that the cleanup always runs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupted)

    say("stsmilter demo: MTA-STS enforcement through a private Postfix, on loopback only")
    started = time.monotonic()
    world_dir = Path(tempfile.mkdtemp(prefix="stsmilter-demo-"))
    os.chmod(world_dir, 0o755)  # Postfix's daemons (user postfix) must traverse it
    tempfile.tempdir = str(world_dir)  # the servers' own temp dirs (the CA file) go inside
    say(f"world: {world_dir}")
    say()
    status, message = 0, ""
    cleanup = contextlib.ExitStack()
    try:
        try:
            run(world_dir, cleanup)
        finally:
            # Nothing may cut the cleanup short, not even a second Ctrl-C.
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_IGN)
            try:
                cleanup.close()
            finally:
                shutil.rmtree(world_dir, ignore_errors=True)
    except DemoError as e:
        status, message = 1, f"demo FAILED: {e}"
    except (KeyboardInterrupt, Interrupted):
        status, message = 130, "demo interrupted"
    except Exception as e:  # a bug or an environment problem: say it in one line
        status, message = 1, f"demo FAILED: {type(e).__name__}: {e}"
    from world.postfix import processes_under

    leftovers = processes_under(world_dir) + ([str(world_dir)] if world_dir.exists() else [])
    if leftovers:
        say(f"cleanup INCOMPLETE: still there: {', '.join(map(str, leftovers))}")
        status, message = status or 1, message or "demo FAILED: cleanup incomplete"
    else:
        say(f"cleaned up: every server stopped, {world_dir} removed")
    if status:
        print(message, file=sys.stderr, flush=True)
        return status
    say(f"OK: every recipient got the expected answer ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
