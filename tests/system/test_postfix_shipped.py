"""The shipped Postfix configuration on a real private Postfix, with `stsmilter run`.

Postfix runs contrib/postfix/main.cf.snippet and master.cf.snippet as shipped, with only
ports and paths substituted (world/postfix.py: shipped_main_cf, shipped_master_cf):
the milter on the submission services and on non-SMTP mail (sendmail(1)), not on port
25, with its own default_action = accept; the TLS policy socketmap on every delivery.
The test's own main.cf part is what any private instance needs (queue directory, names,
loopback) plus a server certificate and a Cyrus SASL user for the submission services,
and a virtual mailbox domain standing for "our own domain" on port 25.

Delivery is routed by recipient domain through a private /etc/hosts (world/mx_routing):
good.example's MX matches its enforce policy and presents a certificate for its
policy name; bad.example's MX is an attacker's host (mx.attacker.example) with a valid
certificate for its own name, which the policy does not allow.

Everything is read from Postfix's log (a line is written once an event happened),
not by polling queue states on short timers.
"""

import contextlib
import os
import re
import shutil
import ssl
from typing import Dict, NamedTuple

import pytest
import trustme

from world.daemon import sample, scrape
from world.mx_routing import can_unshare, common_free_port, private_hosts
from world.postfix import PostfixInstance, enable_submission_auth, shipped_main_cf, shipped_master_cf
from world.smtp_peers import SmtpSink, free_port, tls_server_context

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not can_unshare(), reason="needs root and unshare"),
    pytest.mark.skipif(not shutil.which("saslpasswd2") and not os.path.exists("/usr/sbin/saslpasswd2"),
                       reason="saslpasswd2 (sasl2-bin) not installed"),
]

SENDER = "cron@sender.example"  # sendmail(1)
MUA_SENDER = "alice@sender.example"  # the submission services
GOOD, BAD = "v@good.example", "u@bad.example"
LOCAL = "inbox@local.example"
USER = ("alice", "correct horse")
PEERS = {  # domain -> (its MX as Postfix finds it, certificate name the MX presents)
    "good.example": ("127.0.0.2", "mx.good.example"),
    "bad.example": ("127.0.0.3", "mx.attacker.example"),
}
STUCK = "can't reject recipient"


class Shipped(NamedTuple):
    postfix: PostfixInstance
    daemon: object
    sinks: Dict[str, SmtpSink]
    ports: Dict[str, int]  # submission, submissions
    client_tls: ssl.SSLContext
    mailbox: str


def message(subject: str) -> bytes:
    return f"From: <{SENDER}>\nTo: <{GOOD}>, <{BAD}>\nSubject: {subject}\n\nfrom a cron job\n".encode()


def decisions(daemon, action, mode, reason):
    return sample(scrape(daemon.metrics_port), "stsmilter_decisions_total", action=action, mode=mode, reason=reason)


@pytest.fixture
def shipped(sts_world, start_daemon, postfix_factory):
    """shipped(**[milter] settings) -> Shipped, everything started."""
    with contextlib.ExitStack() as stack:

        def build(**milter) -> Shipped:
            sts_world.publish("good.example", "g1")  # MX mx.good.example, policy mx.good.example
            sts_world.publish("bad.example", "b1", mx_hosts=["mx.attacker.example"])
            mx_ca, client_ca = trustme.CA(), trustme.CA()
            port = common_free_port([address for address, _ in PEERS.values()])
            sinks = {}
            for domain, (address, cert_name) in PEERS.items():
                sinks[domain] = SmtpSink(host=address, port=port, tls_context=tls_server_context(mx_ca, cert_name))
                stack.callback(sinks[domain].stop)
                sinks[domain].start()
            daemon = start_daemon(milter=milter)
            wrapper = stack.enter_context(private_hosts({d: a for d, (a, _) in PEERS.items()}))
            ports = {"submission": free_port(), "submissions": free_port()}
            postfix = postfix_factory(
                start=False,
                wrapper=wrapper,
                tls_ca_pem=mx_ca.cert_pem.bytes(),
                master_cf_extra=shipped_master_cf(ports),
                main_cf_extra={"smtp_tcp_port": str(port)},
            )
            postfix.main_cf_text = shipped_main_cf(
                daemon.milter_port, daemon.socketmap_port,
                paths={"/etc/ssl/certs/ca-certificates.crt": str(postfix.config_dir / "ca.pem")},
            )
            # "Our own domain" on port 25: a virtual mailbox, delivered by virtual(8).
            mail_dir = postfix.root / "mail"
            mail_dir.mkdir()
            shutil.chown(mail_dir, user="postfix", group="postfix")
            postfix.main_cf_extra.update({
                "virtual_mailbox_domains": "local.example",
                "virtual_mailbox_base": str(mail_dir),
                "virtual_mailbox_maps": "static:inbox",
                "virtual_uid_maps": "static:%d" % mail_dir.stat().st_uid,
                "virtual_gid_maps": "static:%d" % mail_dir.stat().st_gid,
            })
            enable_submission_auth(postfix, client_ca, dict([USER]))
            postfix.start()
            client_tls = ssl.create_default_context()
            client_ca.configure_trust(client_tls)
            return Shipped(postfix, daemon, sinks, ports, client_tls, str(mail_dir / "inbox"))

        yield build


def assert_nothing_stuck(postfix):
    assert STUCK not in postfix.log_text()
    assert [m for m in postfix.queue() if m["queue_name"] == "maildrop"] == []


def test_sendmail_non_smtp_accept_delivers_the_compliant_recipient_and_the_socketmap_stops_the_other(shipped):
    world = shipped(non_smtp="accept")
    postfix = world.postfix
    postfix.sendmail(SENDER, [BAD, GOOD], message("accept"))

    postfix.wait_for_log(r"to=<v@good\.example>.*status=sent", timeout=30)
    # The violating recipient was accepted (Postfix cannot refuse it alone), and the
    # socketmap keeps it from the MX the policy does not allow.
    postfix.wait_for_log(r"to=<u@bad\.example>, relay=bad\.example.*status=deferred \(Server certificate not verified\)",
                         timeout=30)
    delivered = world.sinks["good.example"].messages
    assert [m.rcpt_tos for m in delivered] == [(GOOD,)] and delivered[0].tls
    assert world.sinks["bad.example"].messages == []
    assert re.search(r"pickup\[\d+\]: \w+: uid=0 from=<cron@sender\.example>", postfix.log_text())
    assert_nothing_stuck(postfix)

    assert decisions(world.daemon, "accept", "enforce", "non-smtp") == 1
    assert decisions(world.daemon, "accept", "enforce", "mx-match") == 1
    assert decisions(world.daemon, "tempfail", "enforce", "mx-mismatch") == 0
    line = next(line for line in world.daemon.log().splitlines() if "reason=non-smtp" in line)
    assert "domain=bad.example" in line and "action=accept" in line and "would=tempfail cause=mx-mismatch" in line
    queue_id = re.search(r"queue_id=(\w+)", line).group(1)
    assert re.search(rf"{queue_id}: from=<cron@sender\.example>", postfix.log_text())  # Postfix's own queue id


def test_sendmail_non_smtp_hold_holds_the_whole_message(shipped):
    world = shipped(non_smtp="hold")
    postfix = world.postfix
    postfix.sendmail(SENDER, [BAD, GOOD], message("hold"))

    hold = postfix.wait_for_log(r"(\w+): milter-hold: END-OF-MESSAGE from localhost\[127\.0\.0\.1\]", timeout=30)
    held = postfix.hold_queue()
    assert [m["queue_id"] for m in held] == [hold.group(1)]
    assert sorted(r["address"] for r in held[0]["recipients"]) == [BAD, GOOD]
    assert world.sinks["good.example"].messages == [] and world.sinks["bad.example"].messages == []
    assert_nothing_stuck(postfix)
    assert decisions(world.daemon, "hold", "enforce", "non-smtp") == 1
    assert "action=hold reason=non-smtp quarantined: MTA-STS: no MX host matches the policy of bad.example" in (
        world.daemon.log())


def test_submission_services_refuse_only_the_violating_recipient(shipped):
    world = shipped()
    postfix = world.postfix
    starttls = postfix.send(MUA_SENDER, [BAD, GOOD], port=world.ports["submission"], tls=world.client_tls,
                            login=USER)
    implicit = postfix.send(MUA_SENDER, [BAD, GOOD], port=world.ports["submissions"], tls=world.client_tls,
                            implicit_tls=True, login=USER)
    for result in (starttls, implicit):
        assert {rcpt: reply.code for rcpt, reply in result.rcpt.items()} == {BAD: 451, GOOD: 250}
        assert result.rcpt[BAD].text.startswith("4.7.5 MTA-STS policy of bad.example")
        assert result.data.code == 250
    world.sinks["good.example"].wait_for(2, timeout=30)
    assert decisions(world.daemon, "tempfail", "enforce", "mx-mismatch") == 2
    # Without authentication the services relay nothing, so nothing reaches the milter.
    anonymous = postfix.send(MUA_SENDER, [GOOD], port=world.ports["submission"], tls=world.client_tls)
    assert anonymous.rcpt[GOOD].code == 554
    assert decisions(world.daemon, "accept", "enforce", "mx-match") == 2


def test_with_stsmilter_stopped_inbound_mail_flows_and_outbound_waits_for_the_socketmap(shipped):
    world = shipped()
    postfix = world.postfix
    world.daemon.stop()

    # Port 25, our own domain: no milter there at all.
    inbound = postfix.send("someone@elsewhere.example", [LOCAL], "Subject: inbound\n\nhello\n")
    assert inbound.rcpt[LOCAL].code == 250 and inbound.data.code == 250
    postfix.wait_for_log(r"to=<inbox@local\.example>.*status=sent \(delivered to mailbox\)", timeout=30)
    assert "Subject: inbound" in open(world.mailbox).read()
    assert "Milter" not in postfix.log_text()

    # Submission and sendmail(1): the milter's default_action = accept lets them in...
    submitted = postfix.send(MUA_SENDER, [BAD, GOOD], port=world.ports["submission"], tls=world.client_tls,
                             login=USER)
    assert {rcpt: reply.code for rcpt, reply in submitted.rcpt.items()} == {BAD: 250, GOOD: 250}
    postfix.sendmail(SENDER, [BAD, GOOD], message("stsmilter down"))
    postfix.wait_for_log(r"qmgr\[\d+\]: \w+: from=<cron@sender\.example>, size=\d+, nrcpt=2", timeout=30)
    assert re.search(r"cleanup\[\d+\]: warning: connect to Milter service inet:127\.0\.0\.1:\d+: Connection refused",
                     postfix.log_text())
    assert_nothing_stuck(postfix)
    # ...and, with the socketmap down too, delivery waits instead of going out unchecked.
    postfix.wait_for_log(r"to=<v@good\.example>, relay=none.*status=deferred \(client TLS configuration problem\)",
                         timeout=30)
    postfix.wait_for_log(r"warning: TLS policy lookup for good\.example/good\.example: client TLS configuration problem")
    assert world.sinks["good.example"].messages == [] and world.sinks["bad.example"].messages == []
