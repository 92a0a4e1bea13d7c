"""The MTA test world itself: aiosmtpd sinks and a private Postfix on loopback."""

import os
import smtplib
import socket

import pytest
import trustme

from world.smtp_peers import SmtpSink, free_port, tls_server_context

pytestmark = pytest.mark.integration

SENDER = "alice@client.test"
MILTER_DOWN = (451, "4.7.1 Service unavailable - try again later")


def _alive(pid: int) -> bool:
    """True for a running process; a zombie waiting for PID 1 to reap it is dead."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sink_offers_starttls_only_with_a_context(smtp_sink_factory):
    plain = smtp_sink_factory()
    tls = smtp_sink_factory(tls_context=tls_server_context(trustme.CA(), "mx.enforce.test"))
    for sink, offers_tls in ((plain, False), (tls, True)):
        assert sink.host == "127.0.0.1" and sink.port not in (0, 2024)
        with smtplib.SMTP(*sink.address, local_hostname="client.stsmilter.test", timeout=10) as client:
            client.ehlo()
            assert client.has_extn("starttls") is offers_tls
    with pytest.raises(ValueError):
        SmtpSink(host="0.0.0.0")


def test_main_cf_is_loopback_only_and_overridable(postfix_factory):
    postfix = postfix_factory(
        start=False,
        relay=("127.0.0.1", 2525),
        milter="inet:127.0.0.1:7357",
        non_smtpd_milter=True,
        main_cf_extra={"smtputf8_enable": "yes", "biff": None},
    )
    main_cf = postfix.main_cf()
    assert main_cf["relayhost"] == "[127.0.0.1]:2525"
    assert main_cf["smtpd_milters"] == main_cf["non_smtpd_milters"] == "inet:127.0.0.1:7357"
    assert main_cf["smtp_dns_support_level"] == "disabled" and main_cf["smtp_host_lookup"] == "native"
    assert main_cf["smtpd_peername_lookup"] == "no" and main_cf["inet_interfaces"] == "127.0.0.1"
    assert main_cf["smtputf8_enable"] == "yes" and "biff" not in main_cf


def test_postfix_relays_a_message_to_the_sink(smtp_sink, postfix_factory):
    postfix = postfix_factory(relay=smtp_sink.address)
    result = postfix.send(SENDER, ["bob@dest.test", "carol@dest.test"], "hello\n")
    assert result.mail.code == 250
    assert result.accepted == ["bob@dest.test", "carol@dest.test"]
    assert result.data.code == 250 and "queued as" in result.data.text

    (message,) = smtp_sink.wait_for(1)
    assert message.mail_from == SENDER
    assert message.rcpt_tos == ("bob@dest.test", "carol@dest.test")
    assert b"Subject: stsmilter test" in message.data and message.data.endswith(b"hello\r\n")
    assert message.helo == "mta.stsmilter.test"
    assert not message.tls  # the sink offered no STARTTLS: the stripped case

    # The local submission path (sendmail -> postdrop -> pickup) reaches the sink too.
    postfix.sendmail(SENDER, ["dave@dest.test"], b"Subject: submitted\n\nlocal\n")
    submitted = smtp_sink.wait_for(2)[1]
    assert submitted.rcpt_tos == ("dave@dest.test",) and b"Subject: submitted" in submitted.data
    postfix.wait_until(lambda: postfix.queue() == [], what="empty queue")
    postfix.wait_until(lambda: postfix.log_text().count("status=sent") == 3, what="3 status=sent")


def test_postfix_uses_starttls_when_the_sink_offers_it(smtp_sink_factory, postfix_factory):
    ca = trustme.CA()
    sink = smtp_sink_factory(tls_context=tls_server_context(ca, "mx.enforce.test"))
    postfix = postfix_factory(relay=sink.address, tls_ca_pem=ca.cert_pem.bytes())
    assert postfix.send(SENDER, ["bob@enforce.test"]).accepted == ["bob@enforce.test"]

    (message,) = sink.wait_for(1)
    assert message.tls and message.tls_version.startswith("TLSv1.")
    # Trusted: the chain verified against smtp_tls_CAfile (level "may" checks no name).
    postfix.wait_for_log(r"Trusted TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:%d" % sink.port)


def test_unreachable_milter_tempfails_the_client(smtp_sink, postfix_factory):
    postfix = postfix_factory(relay=smtp_sink.address, milter=f"inet:127.0.0.1:{free_port()}")
    result = postfix.send(SENDER, ["bob@dest.test"])
    # smtpd records the failed milter connect and answers the next command it may refuse.
    assert result.mail == MILTER_DOWN
    assert result.rcpt == {} and result.data is None
    postfix.wait_for_log(r"milter-reject: MAIL from unknown\[127\.0\.0\.1\]: 451 4\.7\.1")
    assert postfix.queue() == [] and smtp_sink.messages == []


def test_deferred_message_shows_in_queue_then_hold_queue(postfix_factory):
    # Nothing listens at the relay. Long retry timers keep the deferred message in the
    # deferred queue (with the 1 s test timers it moves back to active every second).
    slow_retry = {"queue_run_delay": "300s", "minimal_backoff_time": "300s", "maximal_backoff_time": "300s"}
    postfix = postfix_factory(relay=("127.0.0.1", free_port()), main_cf_extra=slow_retry)
    assert postfix.send(SENDER, ["bob@dest.test"]).accepted == ["bob@dest.test"]

    def deferred():
        return [m for m in postfix.queue() if m["queue_name"] == "deferred"]

    (message,) = postfix.wait_until(deferred, what="a deferred message")
    assert message["sender"] == SENDER
    (recipient,) = message["recipients"]
    assert recipient["address"] == "bob@dest.test"
    assert "Connection refused" in recipient["delay_reason"]

    postfix.postsuper("-h", "ALL")
    (held,) = postfix.wait_until(postfix.hold_queue, what="a held message")
    assert held["queue_id"] == message["queue_id"]
    postfix.flush()  # held mail stays put
    assert [m["queue_name"] for m in postfix.queue()] == ["hold"]


def test_failed_start_cleans_up(postfix_factory):
    postfix = postfix_factory(start=False, master_cf_extra="this is not a master.cf line\n")
    with pytest.raises(RuntimeError, match="postfix"):
        postfix.start()
    assert postfix.processes() == [] and not postfix.root.exists()


def test_stop_leaves_no_daemon_and_no_files(postfix_factory):
    postfix = postfix_factory()
    master = postfix.master_pid()  # from the pid file in the queue directory
    assert master and _alive(master) and master in postfix.processes()
    # `pgrep -f <config dir>` finds nothing: master's command line is `master -w`.
    # Its environment names the instance, and every daemon inherits that.
    with open(f"/proc/{master}/environ", "rb") as environ:
        assert b"MAIL_CONFIG=%s\0" % os.fsencode(postfix.config_dir) in environ.read()

    postfix.stop()
    assert not _alive(master)
    assert postfix.processes() == []
    assert not postfix.root.exists()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", postfix.smtpd_port), timeout=1).close()
    postfix.stop()  # idempotent
