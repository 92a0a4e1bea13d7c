"""End to end with the MX TLS check ([probe] enabled = yes): a private Postfix on
loopback submits through the real `stsmilter run`, which discovers policies from the
loopback DNS and HTTPS servers and checks the MX hosts, real SMTP servers on
127.0.21.x (world/mx_hosts.py). Postfix relays what it accepts to a sink, so the MX
hosts see only the checks, never mail."""

import json
import threading

import pytest

from world.daemon import sample, scrape
from world.mx_hosts import converse_text_instead_of_tls

pytestmark = pytest.mark.integration

SENDER = "alice@sender.example"
HELO = "mta.stsmilter.test"


def publish(world, domain, *hosts, mode="enforce"):
    """A policy for domain whose mx patterns are exactly its MX hosts (preference order)."""
    world.publish(domain, "p1", mode=mode, mx_patterns=hosts, mx_hosts=[])
    for preference, host in enumerate(hosts, 1):
        world.dns.add(domain, "MX", f"{preference * 10} {host}.")


def probe_settings(mx_hosts, **overrides):
    settings = {"enabled": "yes", "port": str(mx_hosts.port), "helo_name": HELO, "ca_file": mx_hosts.ca_file,
                "timeout": "2"}
    settings.update(overrides)
    return settings


def decisions(metrics_text, action, mode, reason):
    return sample(metrics_text, "stsmilter_decisions_total", action=action, mode=mode, reason=reason)


def checks(metrics_text, result):
    return sample(metrics_text, "stsmilter_mx_checks_total", result=result)


def test_an_expired_mx_certificate_is_refused_at_rcpt_and_a_good_domain_delivered(
        sts_world, mx_hosts, start_daemon, postfix_factory, smtp_sink):
    """Issue 21: the only MX host of an enforce domain has an expired certificate, so
    delivery would be deferred for days and bounced; the submission gets the 451 at
    RCPT instead, and the other recipient of the same message is delivered."""
    (expired,) = mx_hosts.add("mx.expired.example", "expired")
    (good,) = mx_hosts.add("mx.good.example", "good")
    mx_hosts.start()
    publish(sts_world, "expired.example", "mx.expired.example")
    publish(sts_world, "good.example", "mx.good.example")
    daemon = start_daemon(probe=probe_settings(mx_hosts))
    postfix = postfix_factory(relay=("127.0.0.1", smtp_sink.port), milter=f"inet:127.0.0.1:{daemon.milter_port}")

    result = postfix.send(SENDER, ["a@expired.example", "b@good.example"], "Subject: hi\n\nhello\n")
    assert result.rcpt["a@expired.example"].code == 451
    assert result.rcpt["a@expired.example"].text == (
        "4.7.5 MTA-STS: no MX host of expired.example offers valid TLS: mx.expired.example: certificate has expired")
    assert result.rcpt["b@good.example"].code == 250
    delivered = smtp_sink.wait_for(1, timeout=15)
    assert [m.rcpt_tos for m in delivered] == [("b@good.example",)]

    m = scrape(daemon.metrics_port)
    assert decisions(m, "tempfail", "enforce", "mx-tls") == 1
    assert decisions(m, "accept", "enforce", "mx-match") == 1
    assert checks(m, "certificate-expired") == 1 and checks(m, "ok") == 1
    assert sample(m, "stsmilter_mx_tls_failing_hosts") == 1
    log = daemon.log()
    line = next(line for line in log.splitlines() if "domain=expired.example" in line)
    assert " action=tempfail reason=mx-tls mx=mx.expired.example tls=mx.expired.example:certificate-expired" in line
    assert "MX TLS check of mx.expired.example: certificate-expired: " in log
    # The MX hosts saw a check each, as delivery would: EHLO, STARTTLS, never a message.
    assert expired.commands() == ["EHLO"] and good.commands() == ["EHLO", "QUIT"]
    assert expired.sni == ["mx.expired.example"] and good.events[0] == ("EHLO", HELO, False)


CLASSES = {
    # domain: (the kind of its only MX host, mode, RCPT code, reason, the reply's words)
    "expired.example": ("expired", "enforce", 451, "mx-tls", "certificate has expired"),
    "misnamed.example": ("wrong_name", "enforce", 451, "mx-tls", "certificate is not valid for the host name"),
    "untrusted.example": ("untrusted", "enforce", 451, "mx-tls", "certificate is not trusted"),
    "plain.example": ("no_starttls", "enforce", 451, "mx-tls", "STARTTLS is not offered"),
    "garbled.example": (converse_text_instead_of_tls, "enforce", 451, "mx-tls",
                        "TLS handshake or certificate check failed"),
    "good.example": ("good", "enforce", 250, "mx-match", None),
    "busy.example": ("greeting_421", "enforce", 250, "mx-match", None),  # unreachable never decides
    "silent.example": ("silent", "enforce", 250, "mx-match", None),
    "closed.example": ("refused", "enforce", 250, "mx-match", None),
    "testing.example": ("expired", "testing", 250, "mx-tls", None),  # logged, would=tempfail
}


def test_every_failure_class_refuses_and_the_rest_accept(sts_world, mx_hosts, start_daemon, postfix_factory,
                                                         smtp_sink):
    for domain, (kind, _mode, _code, _reason, _words) in CLASSES.items():
        mx_hosts.add(f"mx.{domain}", kind)
    mx_hosts.add("mx1.mixed.example", "expired")  # one good host of two is enough
    mx_hosts.add("mx2.mixed.example", "good")
    mx_hosts.start()
    for domain, (_kind, mode, _code, _reason, _words) in CLASSES.items():
        publish(sts_world, domain, f"mx.{domain}", mode=mode)
    publish(sts_world, "mixed.example", "mx1.mixed.example", "mx2.mixed.example")
    daemon = start_daemon(milter={"lookup_timeout": "4"}, probe=probe_settings(mx_hosts))
    postfix = postfix_factory(relay=("127.0.0.1", smtp_sink.port), milter=f"inet:127.0.0.1:{daemon.milter_port}")

    recipients = [f"u@{domain}" for domain in CLASSES] + ["u@mixed.example"]
    result = postfix.send(SENDER, recipients, "Subject: classes\n\nhello\n")
    for domain, (_kind, _mode, code, _reason, words) in CLASSES.items():
        reply = result.rcpt[f"u@{domain}"]
        assert reply.code == code, (domain, reply)
        if words:
            assert reply.text == (f"4.7.5 MTA-STS: no MX host of {domain} offers valid TLS: mx.{domain}: {words}")
    assert result.rcpt["u@mixed.example"].code == 250
    accepted = sorted(r for r in recipients if result.rcpt[r].code == 250)
    assert sorted(smtp_sink.wait_for(1, timeout=15)[0].rcpt_tos) == accepted

    m = scrape(daemon.metrics_port)
    assert decisions(m, "tempfail", "enforce", "mx-tls") == 5
    assert decisions(m, "accept", "enforce", "mx-match") == 5
    assert decisions(m, "accept", "testing", "mx-tls") == 1
    for result_name, count in {"ok": 2, "certificate-expired": 3, "certificate-host-mismatch": 1,
                               "certificate-not-trusted": 1, "starttls-not-supported": 1,
                               "validation-failure": 1, "unreachable": 3}.items():
        assert checks(m, result_name) == count, result_name
    # expired, misnamed, untrusted, plain, garbled, and mixed's failing host (of an enforce
    # domain); not the testing domain's
    assert sample(m, "stsmilter_mx_tls_failing_hosts") == 6
    line = next(line for line in daemon.log().splitlines() if "domain=testing.example" in line)
    assert " action=accept reason=mx-tls " in line and line.endswith(" would=tempfail")


def test_each_mx_host_is_checked_once_however_much_mail_goes_to_it(sts_world, mx_hosts, start_daemon,
                                                                   postfix_factory, smtp_sink):
    """Ten domains on two provider MX hosts, eight clients sending at once: one check
    per MX host (within [probe] ttl and failure_ttl), every recipient decided by it."""
    (shared,) = mx_hosts.add("mx.provider.example", "good")
    (broken,) = mx_hosts.add("mx.broken-provider.example", "untrusted")
    mx_hosts.start()
    good = [f"good{n}.example" for n in range(5)]
    bad = [f"bad{n}.example" for n in range(5)]
    for domain in good:
        publish(sts_world, domain, "mx.provider.example")
    for domain in bad:
        publish(sts_world, domain, "mx.broken-provider.example")
    daemon = start_daemon(probe=probe_settings(mx_hosts))
    postfix = postfix_factory(relay=("127.0.0.1", smtp_sink.port), milter=f"inet:127.0.0.1:{daemon.milter_port}")
    replies, problems = [], []

    def client(n):
        try:
            for k in range(5):
                rcpts = [f"u{n}@{good[(n + k) % 5]}", f"u{n}@{bad[(n + k) % 5]}"]
                sent = postfix.send(SENDER, rcpts, f"Subject: {n}/{k}\n\nhello\n")
                replies.extend((rcpt.split("@")[1], reply.code) for rcpt, reply in sent.rcpt.items())
        except Exception as e:  # a failed client must fail the test, not vanish
            problems.append(repr(e))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not problems and len(replies) == 80
    assert {code for domain, code in replies if domain in good} == {250}
    assert {code for domain, code in replies if domain in bad} == {451}
    m = scrape(daemon.metrics_port)
    assert checks(m, "ok") == 1 and checks(m, "certificate-not-trusted") == 1
    assert shared.commands() == ["EHLO", "QUIT"] and broken.commands() == ["EHLO"]
    assert decisions(m, "tempfail", "enforce", "mx-tls") == 40


def test_check_shows_each_mx_hosts_result_and_age(sts_world, mx_hosts):
    mx_hosts.add("mx1.mixed.example", "expired")
    mx_hosts.add("mx2.mixed.example", "silent")  # not known within the wait: null
    mx_hosts.add("mx.misnamed.example", "wrong_name")
    mx_hosts.start()
    publish(sts_world, "mixed.example", "mx1.mixed.example", "mx2.mixed.example")
    publish(sts_world, "misnamed.example", "mx.misnamed.example")
    conf = sts_world.write_config("probe.conf", milter={"lookup_timeout": "1"},
                                  probe=probe_settings(mx_hosts, timeout="3"))
    proc = sts_world.cli("check", "--json", "-c", conf, "a@mixed.example", "b@misnamed.example")
    assert proc.returncode == 0, proc.stderr
    mixed, misnamed = json.loads(proc.stdout)
    assert (mixed["action"], mixed["reason"]) == ("accept", "mx-match")
    first, second = mixed["mx_tls"]
    assert (first["host"], first["result"], second) == (
        "mx1.mixed.example", "certificate-expired",
        {"host": "mx2.mixed.example", "result": None, "detail": None, "age": None})
    assert first["detail"].endswith(": TLS handshake: certificate has expired") and 0 <= first["age"] < 5
    assert (misnamed["action"], misnamed["reason"]) == ("tempfail", "mx-tls")
    assert misnamed["reply"] == ("451 4.7.5 MTA-STS: no MX host of misnamed.example offers valid TLS:"
                                 " mx.misnamed.example: certificate is not valid for the host name")
    assert [h["result"] for h in misnamed["mx_tls"]] == ["certificate-host-mismatch"]

    text = sts_world.cli("check", "-c", conf, "b@misnamed.example")
    assert text.returncode == 0, text.stderr
    assert "    mx tls: mx.misnamed.example: certificate-host-mismatch (0 s ago): " in text.stdout

    plain = sts_world.write_config("plain.conf")  # [probe] enabled = no: names only, as before
    proc = sts_world.cli("check", "--json", "-c", plain, "b@misnamed.example")
    (row,) = json.loads(proc.stdout)
    assert (row["action"], row["reason"], row["mx_tls"]) == ("accept", "mx-match", [])
