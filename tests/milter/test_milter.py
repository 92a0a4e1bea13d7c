import logging
import socket
import time

import Milter
import pytest
from Milter import testctx  # not Milter.test: importing it changes Milter.NOREPLY process-wide
from prometheus_client import REGISTRY

from stsmilter import config
from stsmilter.milter import session as milter
from stsmilter.milter.negotiation import MILTER_FLAGS
from stsmilter.engine.decision import Decider, Decision
from test_decision import OTHER_MX, FakeDiscovery, valid

OFFERED_PROTOCOL = 0x1FFFFF  # every protocol bit, as a Postfix 3.x / Sendmail 8.14+ offers them


class Ctx(testctx.TestCtx):
    """TestCtx that records quarantine() (TestCtx's own raises), takes setsymlist()
    arguments only as the C module does, and drives connect with any address family
    (TestCtx._connect takes only IP strings and mishandles NOREPLY)."""

    def __init__(self):
        super().__init__()
        self.quarantined = []

    def quarantine(self, reason):
        self.quarantined.append(reason)

    def setsymlist(self, stage, macros):
        # milter.Context.setsymlist(int, str): bytes raise TypeError, which pymilter's
        # negotiate() swallows, silently falling back to "all protocol steps".
        if not isinstance(stage, int) or not isinstance(macros, str):
            raise TypeError("setsymlist(int, str)")
        return super().setsymlist(stage, macros)

    def open(self, ip="192.0.2.1", family=None, port=40000, hostname="client.example"):
        assert self._negotiate() == Milter.CONTINUE
        if family is None:
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        hostaddr = (ip, port) if family == socket.AF_INET else (ip, port, 0, 0)
        if family not in (socket.AF_INET, socket.AF_INET6):
            hostaddr = ip
        self._stage = Milter.M_CONNECT
        rc = Milter.connect_callback(self, hostname, family, hostaddr)
        self._stage = None
        assert rc == Milter.NOREPLY
        return self

    def open_non_smtp(self):
        """The connection Postfix's cleanup(8) emulates for non_smtpd_milters (measured
        with Postfix 3.7: sendmail(1), sendmail -bs, QMQP)."""
        return self.open("127.0.0.1", socket.AF_INET, port=0, hostname="localhost")

    def rcpt(self, address, mailer="smtp"):
        if mailer is None:
            self._macros.pop("{rcpt_mailer}", None)
        else:
            self._macros["{rcpt_mailer}"] = mailer
        self._reply = None
        return self._envrcpt(address)


class FakeDecider:
    """Canned Decisions by recipient; records what it was asked."""

    def __init__(self, decisions=None):
        self.decisions = decisions or {}
        self.asked = []

    def decide(self, recipient, deadline=None):
        self.asked.append((recipient, deadline))
        return self.decisions.get(recipient) or Decision(recipient, "example.net", "accept", "accept", "no-policy")


def violation(recipient, action, reply=None, would=None, domain="example.com"):
    return Decision(
        recipient, domain, action, would or action, "mx-mismatch", "enforce", "20240101",
        OTHER_MX.hosts, ("mx.example.com",), reply,
    )


@pytest.fixture(autouse=True)
def fresh_testctx(monkeypatch):
    offer(monkeypatch)  # a fresh list per test
    monkeypatch.setattr(Milter, "factory", None)


def offer(monkeypatch, actions=Milter.CURR_ACTS):
    """What the simulated MTA offers in negotiation (TestCtx negotiates in place on this list)."""
    monkeypatch.setattr(testctx.TestCtx, "default_opts", [actions, OFFERED_PROTOCOL, 0, 0])


def session(decider, monkeypatch, macros=None, **settings):
    milter_keys = {k: v for k, v in settings.items() if k in config.SCHEMA["milter"]}
    scope_keys = {k: v for k, v in settings.items() if k in config.SCHEMA["scope"]}
    cfg = config.defaults().replace(milter=milter_keys, scope=scope_keys)
    monkeypatch.setattr(Milter, "factory", milter.make_milter_class(decider, cfg))
    ctx = Ctx()
    ctx._macros.update({"i": "4QX1yZ2abc"})
    ctx._macros.update(macros or {})
    return ctx


def count(action, mode, reason):
    labels = {"action": action, "mode": mode, "reason": reason}
    return REGISTRY.get_sample_value("stsmilter_decisions_total", labels) or 0.0


def test_negotiation(monkeypatch):
    ctx = session(FakeDecider(), monkeypatch).open("127.0.0.1")
    actions, protocol = ctx._opts[0], ctx._opts[1]
    assert actions == Milter.QUARANTINE | Milter.SETSYMLIST == MILTER_FLAGS
    for skipped in ("P_NOHELO", "P_NOHDRS", "P_NOEOH", "P_NOBODY", "P_NOUNKNOWN"):
        assert protocol & getattr(Milter, skipped), skipped
    for sent in ("P_NOCONNECT", "P_NOMAIL", "P_NORCPT", "P_NODATA"):
        assert not protocol & getattr(Milter, sent), sent
    assert protocol & Milter.P_NR_CONN and protocol & Milter.P_NR_MAIL
    assert not protocol & (Milter.P_NR_RCPT | Milter.P_NR_DATA)  # RCPT and DATA are answered
    assert not protocol & (Milter.P_RCPT_REJ | Milter.P_HDR_LEADSPC)
    assert ctx._symlist[Milter.M_CONNECT] == {b"{daemon_name}"}
    assert ctx._symlist[Milter.M_ENVFROM] == {b"{auth_authen}", b"i"}
    assert ctx._symlist[Milter.M_ENVRCPT] == {b"{rcpt_mailer}", b"i"}
    assert ctx._symlist[Milter.M_EOM] == {b"i"}
    assert ctx._priv._actions == MILTER_FLAGS
    assert ctx._envfrom("<sender@here.example>") == Milter.NOREPLY
    assert ctx._data() == Milter.CONTINUE


def test_mta_without_setsymlist_still_negotiates(monkeypatch):
    offer(monkeypatch, Milter.CURR_ACTS & ~Milter.SETSYMLIST)
    decider = FakeDecider({"<u@example.com>": violation("<u@example.com>", "reject", ("550", "5.7.5", "x"))})
    ctx = session(decider, monkeypatch, {"{auth_authen}": "alice"}).open("198.51.100.7")
    assert ctx._opts[0] == Milter.QUARANTINE and ctx._opts[1] & Milter.P_NOBODY
    assert ctx._symlist == [None] * 7  # the MTA sends the macros it is configured to send
    ctx._envfrom("<alice@here.example>")
    assert ctx.rcpt("<u@example.com>") == Milter.REJECT


def test_a_failed_negotiation_is_logged_and_falls_back_to_all_options(monkeypatch, caplog):
    class RefusingCtx(Ctx):
        def setsymlist(self, stage, macros):
            raise Milter.error("cannot set symbol list")

    monkeypatch.setattr(Milter, "factory", milter.make_milter_class(FakeDecider(), config.defaults()))
    ctx = RefusingCtx()
    with caplog.at_level(logging.WARNING, logger="stsmilter"):
        assert ctx._negotiate() == Milter.ALL_OPTS
    assert "milter protocol negotiation failed" in caplog.text


def test_macro_lists_are_each_classs_own():
    # Worked out once per class; a subclass never reuses its base's.
    class Other(milter.StsMilter):
        @Milter.symlist("j")
        def envrcpt(self, to, *params):
            return Milter.CONTINUE

    bound = milter.make_milter_class(FakeDecider(), config.defaults())
    assert bound._macro_lists() == milter.StsMilter._macro_lists() == (
        (Milter.M_CONNECT, "{daemon_name}"), (Milter.M_ENVFROM, "{auth_authen} i"),
        (Milter.M_ENVRCPT, "{rcpt_mailer} i"), (Milter.M_EOM, "i"),
    )
    assert Other._macro_lists() == (
        (Milter.M_CONNECT, "{daemon_name}"), (Milter.M_ENVFROM, "{auth_authen} i"),
        (Milter.M_ENVRCPT, "j"), (Milter.M_EOM, "i"),
    )


def test_per_recipient_replies(monkeypatch, caplog):
    text = "MTA-STS policy of example.com (id 20240101) allows no MX host of the domain: a do not match b"
    decider = FakeDecider({"<u@example.com>": violation("<u@example.com>", "tempfail", ("451", "4.7.5", text))})
    ctx = session(decider, monkeypatch).open("127.0.0.1")
    ctx._envfrom("<sender@here.example>")
    before = count("tempfail", "enforce", "mx-mismatch")
    with caplog.at_level(logging.INFO, logger="stsmilter"):
        assert ctx.rcpt("<a@example.net>") == Milter.CONTINUE and ctx._reply is None
        assert ctx.rcpt("<u@example.com>") == Milter.TEMPFAIL
        assert ctx._reply == ("451", "4.7.5", text)
        assert ctx.rcpt("<b@example.org>") == Milter.CONTINUE and ctx._reply is None
    assert ctx._data() == Milter.CONTINUE
    assert ctx._eom() == Milter.CONTINUE and ctx.quarantined == []
    assert count("tempfail", "enforce", "mx-mismatch") == before + 1
    assert [r.getMessage() for r in caplog.records] == [
        "queue_id=4QX1yZ2abc client=127.0.0.1 domain=example.com policy_id=20240101 mode=enforce action=tempfail"
        " reason=mx-mismatch mx=mx1.evil.example,mx2.evil.example"
    ]  # the no-policy recipients are counted, not logged
    assert caplog.records[0].levelno == logging.WARNING
    assert [r for r, _ in decider.asked] == ["<a@example.net>", "<u@example.com>", "<b@example.org>"]


def test_exact_reply_through_the_real_decider(monkeypatch):
    cfg = config.defaults()
    decider = Decider(FakeDiscovery(mx=OTHER_MX), cfg.milter, cfg.scope)
    ctx = session(decider, monkeypatch).open("::1")
    ctx._envfrom("<sender@here.example>")
    assert ctx.rcpt("<user@example.com>") == Milter.TEMPFAIL
    assert ctx._reply == (
        "451",
        "4.7.5",
        "MTA-STS policy of example.com (id 20240101) allows no MX host of the domain:"
        " mx1.evil.example, mx2.evil.example do not match mx.example.com, *.mail.example.com",
    )


def test_reject(monkeypatch):
    reply = ("550", "5.7.5", "MTA-STS policy of example.com (id 20240101) allows no MX host of the domain")
    decider = FakeDecider({"<u@example.com>": violation("<u@example.com>", "reject", reply)})
    ctx = session(decider, monkeypatch).open("127.0.0.1")
    ctx._envfrom("<s@here.example>")
    before = count("reject", "enforce", "mx-mismatch")
    assert ctx.rcpt("<u@example.com>") == Milter.REJECT
    assert ctx._reply == reply
    assert count("reject", "enforce", "mx-mismatch") == before + 1


def test_percent_in_reply_is_escaped(monkeypatch):
    reply = ("451", "4.7.5", "100% broken %s")
    decider = FakeDecider({"<u@example.com>": violation("<u@example.com>", "tempfail", reply)})
    ctx = session(decider, monkeypatch).open("127.0.0.1")
    ctx._envfrom("<s@here.example>")
    assert ctx.rcpt("<u@example.com>") == Milter.TEMPFAIL
    assert ctx._reply == ("451", "4.7.5", "100%% broken %%s")


def test_hold_quarantines_the_message(monkeypatch, caplog):
    decider = FakeDecider(
        {
            "<u@example.com>": violation("<u@example.com>", "hold"),
            "<v@example.com>": violation("<v@example.com>", "hold"),
            "<w@other.example>": violation("<w@other.example>", "hold", domain="other.example"),
        }
    )
    ctx = session(decider, monkeypatch).open("127.0.0.1")
    ctx._envfrom("<s@here.example>")
    for rcpt in ("<u@example.com>", "<a@example.net>", "<v@example.com>", "<w@other.example>"):
        assert ctx.rcpt(rcpt) == Milter.CONTINUE and ctx._reply is None
    assert ctx._data() == Milter.CONTINUE
    with caplog.at_level(logging.INFO, logger="stsmilter"):
        assert ctx._eom() in (Milter.CONTINUE, Milter.ACCEPT)
    assert ctx.quarantined == ["MTA-STS: no MX host matches the policy of example.com, other.example"]
    assert caplog.records[-1].getMessage().startswith("queue_id=4QX1yZ2abc client=127.0.0.1 action=hold ")
    # The next transaction on the connection starts clean.
    ctx._envfrom("<s@here.example>")
    ctx.rcpt("<a@example.net>")
    ctx._eom()
    assert len(ctx.quarantined) == 1


@pytest.mark.parametrize(
    "ip, family, client",
    [("2001:db8::7", None, "2001:db8::7"), ("198.51.100.7", None, "198.51.100.7"),
     ("/run/x.sock", socket.AF_UNIX, "local")],
)
def test_logged_decision_names_the_client_and_the_queue(monkeypatch, caplog, ip, family, client):
    decider = FakeDecider({"<u@example.com>": violation("<u@example.com>", "tempfail", ("451", "4.7.5", "x"))})
    ctx = session(decider, monkeypatch, {"{auth_authen}": "alice"}).open(ip, family)
    ctx._envfrom("<alice@here.example>")
    del ctx._macros["i"]  # Postfix: no queue file yet at the first RCPT
    with caplog.at_level(logging.INFO, logger="stsmilter"):
        assert ctx.rcpt("<u@example.com>") == Milter.TEMPFAIL
        ctx._macros["i"] = "4QX1yZ2abd"  # ... and one after an accepted recipient
        assert ctx.rcpt("<u@example.com>") == Milter.TEMPFAIL
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" policy_id=")[0] for line in lines] == [
        f"queue_id=NOQUEUE client={client} domain=example.com",
        f"queue_id=4QX1yZ2abd client={client} domain=example.com",
    ]


def test_hold_without_quarantine_support_tempfails(monkeypatch):
    offer(monkeypatch, Milter.CURR_ACTS & ~Milter.QUARANTINE)
    decider = FakeDecider({"<u@example.com>": violation("<u@example.com>", "hold")})
    ctx = session(decider, monkeypatch).open("127.0.0.1")
    ctx._envfrom("<s@here.example>")
    assert ctx.rcpt("<u@example.com>") == Milter.CONTINUE
    assert ctx._eom() == Milter.TEMPFAIL
    assert ctx._reply[:2] == ("451", "4.7.5") and ctx.quarantined == []


def test_abort_forgets_holds(monkeypatch):
    decider = FakeDecider({"<u@example.com>": violation("<u@example.com>", "hold")})
    ctx = session(decider, monkeypatch).open("127.0.0.1")
    ctx._envfrom("<s@here.example>")
    ctx.rcpt("<u@example.com>")
    ctx._priv.abort()
    assert ctx._eom() == Milter.CONTINUE and ctx.quarantined == []


def test_untrusted_unauthenticated_client_is_out_of_scope(monkeypatch):
    decider = FakeDecider({"<u@example.com>": violation("<u@example.com>", "reject", ("550", "5.7.5", "x"))})
    ctx = session(decider, monkeypatch).open("198.51.100.7")
    ctx._envfrom("<s@elsewhere.example>")
    before = count("accept", "", "out-of-scope")
    assert ctx.rcpt("<u@example.com>") == Milter.CONTINUE and ctx._reply is None
    assert decider.asked == []
    assert count("accept", "", "out-of-scope") == before + 1


def test_authenticated_sender_from_untrusted_ip_is_in_scope(monkeypatch):
    decider = FakeDecider({"<u@example.com>": violation("<u@example.com>", "reject", ("550", "5.7.5", "x"))})
    ctx = session(decider, monkeypatch, {"{auth_authen}": "alice"}).open("198.51.100.7")
    ctx._envfrom("<alice@here.example>")
    assert ctx.rcpt("<u@example.com>") == Milter.REJECT
    # Scope is per transaction: the next MAIL FROM without authentication is out of scope.
    ctx._macros["{auth_authen}"] = ""
    ctx._envfrom("<bob@here.example>")
    assert ctx.rcpt("<u@example.com>") == Milter.CONTINUE


@pytest.mark.parametrize("daemon, in_scope", [("ORIGINATING", True), ("mx.here.example", False), (None, False)])
def test_daemon_names_scope(monkeypatch, daemon, in_scope):
    decider = FakeDecider({"<u@example.com>": violation("<u@example.com>", "reject", ("550", "5.7.5", "x"))})
    macros = {"{daemon_name}": daemon} if daemon else {}
    ctx = session(decider, monkeypatch, macros, daemon_names=("ORIGINATING", "MSA")).open("198.51.100.7")
    ctx._envfrom("<s@here.example>")
    assert ctx.rcpt("<u@example.com>") == (Milter.REJECT if in_scope else Milter.CONTINUE)


@pytest.mark.parametrize(
    "ip, family, in_scope",
    [
        ("10.1.2.3", socket.AF_INET, True),
        ("10.2.0.1", socket.AF_INET, False),
        ("2001:db8::25", socket.AF_INET6, True),
        ("::ffff:10.1.2.3", socket.AF_INET6, True),
        ("2001:db8:1::25", socket.AF_INET6, False),
        ("/run/some.sock", socket.AF_UNIX, True),  # local submission over a unix socket
    ],
)
def test_trusted_networks(monkeypatch, ip, family, in_scope):
    decider = FakeDecider({"<u@example.com>": violation("<u@example.com>", "reject", ("550", "5.7.5", "x"))})
    networks = config.loads("[scope]\ntrusted_networks = 10.1.0.0/16, 2001:db8::/64\n").scope.trusted_networks
    ctx = session(decider, monkeypatch, trusted_networks=networks).open(ip, family)
    ctx._envfrom("<s@here.example>")
    assert ctx.rcpt("<u@example.com>") == (Milter.REJECT if in_scope else Milter.CONTINUE)


def test_a_reload_judges_a_known_client_by_the_new_trusted_networks(monkeypatch):
    # Client addresses are remembered per configuration snapshot (one class per reload).
    decider = FakeDecider({"<u@example.com>": violation("<u@example.com>", "reject", ("550", "5.7.5", "x"))})
    for networks, in_scope in (("10.1.0.0/16", True), ("10.2.0.0/16", False), ("10.1.0.0/16", True)):
        trusted = config.loads(f"[scope]\ntrusted_networks = {networks}\n").scope.trusted_networks
        ctx = session(decider, monkeypatch, trusted_networks=trusted).open("10.1.2.3")
        ctx._envfrom("<s@here.example>")
        assert ctx.rcpt("<u@example.com>") == (Milter.REJECT if in_scope else Milter.CONTINUE), networks


def test_client_without_address_is_local_submission(monkeypatch):
    # Postfix non_smtpd_milters (sendmail(1) submissions): hostname "localhost", no address.
    decider = FakeDecider({"<u@example.com>": violation("<u@example.com>", "reject", ("550", "5.7.5", "x"))})
    ctx = session(decider, monkeypatch, trusted_networks=())
    assert ctx._negotiate() == Milter.CONTINUE
    ctx._stage = Milter.M_CONNECT
    assert Milter.connect_callback(ctx, "localhost", 0, None) == Milter.NOREPLY
    ctx._stage = None
    ctx._envfrom("<root@here.example>")
    assert ctx.rcpt("<u@example.com>") == Milter.REJECT


def test_skip_mailers(monkeypatch):
    decider = FakeDecider({"<u@example.com>": violation("<u@example.com>", "reject", ("550", "5.7.5", "x"))})
    ctx = session(decider, monkeypatch).open("127.0.0.1")
    ctx._envfrom("<s@here.example>")
    before = count("accept", "", "skip-mailer")
    assert ctx.rcpt("<u@example.com>", mailer="lmtp") == Milter.CONTINUE
    assert decider.asked == []
    assert count("accept", "", "skip-mailer") == before + 1
    assert ctx.rcpt("<u@example.com>", mailer="smtp") == Milter.REJECT


def test_deadline_is_lookup_timeout(monkeypatch):
    decider = FakeDecider()
    ctx = session(decider, monkeypatch, lookup_timeout=2.5).open("127.0.0.1")
    ctx._envfrom("<s@here.example>")
    start = time.monotonic()
    ctx.rcpt("<a@example.net>")
    (_, deadline), = decider.asked
    assert start + 2.5 <= deadline <= time.monotonic() + 2.5


def test_dry_run_logs_what_it_would_do(monkeypatch, caplog):
    cfg = config.defaults().replace(milter={"dry_run": True, "on_violation": "reject"})
    decider = Decider(FakeDiscovery(mx=OTHER_MX, forced=valid(source="fetched")), cfg.milter, cfg.scope)
    ctx = session(decider, monkeypatch, dry_run=True).open("127.0.0.1")
    ctx._envfrom("<s@here.example>")
    before = count("accept", "enforce", "mx-mismatch")
    with caplog.at_level(logging.INFO, logger="stsmilter"):
        assert ctx.rcpt("<u@example.com>") == Milter.CONTINUE and ctx._reply is None
    assert count("accept", "enforce", "mx-mismatch") == before + 1
    assert caplog.records[-1].getMessage() == (
        "queue_id=4QX1yZ2abc client=127.0.0.1 domain=example.com policy_id=20240101 mode=enforce action=accept"
        " reason=mx-mismatch"
        " mx=mx1.evil.example,mx2.evil.example would=reject"
    )


def test_decider_crash_tempfails_the_recipient(monkeypatch, caplog):
    class Broken:
        def decide(self, recipient, deadline=None):
            raise RuntimeError("bug")

    ctx = session(Broken(), monkeypatch).open("127.0.0.1")
    ctx._envfrom("<s@here.example>")
    with caplog.at_level(logging.ERROR, logger="stsmilter"):
        assert ctx.rcpt("<u@example.com>") == Milter.TEMPFAIL
    assert ctx._reply == ("451", "4.3.0", "MTA-STS check failed, try again later")
    assert "RuntimeError" in caplog.text


def test_factory_snapshot(monkeypatch):
    cfg = config.defaults()
    first = milter.make_milter_class(FakeDecider(), cfg)
    second = milter.make_milter_class(FakeDecider(), cfg.replace(milter={"dry_run": True}))
    assert issubclass(first, milter.StsMilter) and first is not second
    assert (first.dry_run, second.dry_run) == (False, True)
    assert first.decider is not second.decider


def test_quiet_accepts_are_reused_per_domain_for_a_second(monkeypatch):
    accept = Decision("<a@memo.example>", "memo.example", "accept", "accept", "mx-match", "enforce", "m1")
    decider = FakeDecider({"<a@memo.example>": accept})
    ctx = session(decider, monkeypatch).open("127.0.0.1")
    ctx._envfrom("<s@here.example>")
    before = count("accept", "enforce", "mx-match")
    assert ctx.rcpt("<a@memo.example>") == Milter.CONTINUE
    assert ctx.rcpt("<b@memo.example>") == Milter.CONTINUE  # same domain: not asked again
    assert [r for r, _ in decider.asked] == ["<a@memo.example>"]
    assert count("accept", "enforce", "mx-match") == before + 2  # but counted twice
    clock = time.monotonic() + milter.ACCEPT_MEMO_SECONDS + 0.01
    monkeypatch.setattr(milter.time, "monotonic", lambda: clock)
    ctx.rcpt("<c@memo.example>")
    assert len(decider.asked) == 2  # the memo lapsed


def test_violations_are_decided_every_time(monkeypatch):
    decider = FakeDecider({r: violation(r, "tempfail", ("451", "4.7.5", "no")) for r in ("<a@example.com>", "<b@example.com>")})
    ctx = session(decider, monkeypatch).open("127.0.0.1")
    ctx._envfrom("<s@here.example>")
    assert ctx.rcpt("<a@example.com>") == Milter.TEMPFAIL
    assert ctx.rcpt("<b@example.com>") == Milter.TEMPFAIL
    assert len(decider.asked) == 2


def test_a_reload_starts_with_an_empty_memo(monkeypatch):
    decider = FakeDecider()
    ctx = session(decider, monkeypatch).open("127.0.0.1")
    ctx._envfrom("<s@here.example>")
    ctx.rcpt("<a@fresh.example>")
    ctx = session(decider, monkeypatch).open("127.0.0.1")  # a new class, as after USR1
    ctx._envfrom("<s@here.example>")
    ctx.rcpt("<b@fresh.example>")
    assert len(decider.asked) == 2


# --- non-SMTP mail (Postfix non_smtpd_milters) ---------------------------------------


@pytest.mark.parametrize(
    "hostname, family, hostaddr, non_smtp",
    [
        ("localhost", socket.AF_INET, ("127.0.0.1", 0), True),  # cleanup(8): sendmail(1), QMQP
        ("localhost", socket.AF_INET6, ("::1", 0, 0, 0), True),
        ("localhost", socket.AF_INET, ("127.0.0.1", 48123), False),  # smtpd, peer name looked up
        ("[127.0.0.1]", socket.AF_INET, ("127.0.0.1", 48123), False),  # smtpd, no peer name lookup
        ("[::1]", socket.AF_INET6, ("::1", 48123, 0, 0), False),
        ("localhost", socket.AF_UNIX, "/run/smtpd.sock", False),
        ("localhost", socket.AF_UNSPEC, None, False),  # smtpd on stdin / a unix socket
        ("localhost", socket.AF_INET, ("127.0.0.1",), False),
        ("localhost", socket.AF_INET, None, False),
    ],
)
def test_non_smtp_session_is_port_zero_on_an_inet_address(hostname, family, hostaddr, non_smtp):
    assert milter.non_smtp_session(family, hostaddr) is non_smtp


def non_smtp_violation_session(monkeypatch, **settings):
    cfg = config.defaults().replace(milter={k: v for k, v in settings.items() if k in config.SCHEMA["milter"]})
    decider = Decider(FakeDiscovery(mx=OTHER_MX, forced=valid(source="fetched")), cfg.milter, cfg.scope)
    ctx = session(decider, monkeypatch, **settings).open_non_smtp()
    del ctx._macros["i"]
    ctx._envfrom("cron@here.example")  # Postfix sends non-SMTP addresses without <>
    ctx._macros["i"] = "4QX1yZ2abc"  # the queue id exists from MAIL on
    return ctx


@pytest.mark.parametrize("on_violation, would", [("tempfail", "tempfail"), ("reject", "reject")])
def test_non_smtp_accept_never_refuses_a_recipient(monkeypatch, caplog, on_violation, would):
    ctx = non_smtp_violation_session(monkeypatch, on_violation=on_violation, trusted_networks=())
    before = count("accept", "enforce", "non-smtp"), count(would, "enforce", "mx-mismatch")
    with caplog.at_level(logging.INFO, logger="stsmilter"):
        assert ctx.rcpt("u@example.com", mailer=None) == Milter.CONTINUE and ctx._reply is None
    assert ctx._data() == Milter.CONTINUE
    assert ctx._eom() == Milter.CONTINUE and ctx.quarantined == []
    assert (count("accept", "enforce", "non-smtp"), count(would, "enforce", "mx-mismatch")) == (
        before[0] + 1, before[1])
    assert [r.getMessage() for r in caplog.records] == [
        "queue_id=4QX1yZ2abc client=local domain=example.com policy_id=20240101 mode=enforce action=accept"
        " reason=non-smtp"
        f" mx=mx1.evil.example,mx2.evil.example would={would} cause=mx-mismatch"
    ]
    assert caplog.records[0].levelno == logging.WARNING


def test_non_smtp_hold_quarantines_the_whole_message(monkeypatch, caplog):
    ctx = non_smtp_violation_session(monkeypatch, non_smtp="hold")
    before = count("hold", "enforce", "non-smtp")
    with caplog.at_level(logging.INFO, logger="stsmilter"):
        assert ctx.rcpt("u@example.com", mailer=None) == Milter.CONTINUE and ctx._reply is None
        assert ctx._eom() == Milter.CONTINUE
    assert ctx.quarantined == ["MTA-STS: no MX host matches the policy of example.com"]
    assert count("hold", "enforce", "non-smtp") == before + 1
    assert [r.getMessage() for r in caplog.records] == [
        "queue_id=4QX1yZ2abc client=local domain=example.com policy_id=20240101 mode=enforce action=hold"
        " reason=non-smtp"
        " mx=mx1.evil.example,mx2.evil.example would=tempfail cause=mx-mismatch",
        "queue_id=4QX1yZ2abc client=local action=hold reason=non-smtp quarantined:"
        " MTA-STS: no MX host matches the policy of example.com",
    ]


def test_non_smtp_hold_says_what_each_domain_waits_for(monkeypatch):
    pending = Decision("a@slow.example", "slow.example", "tempfail", "tempfail", "pending",
                       reply=("451", "4.7.5", "pending"))
    dns_error = Decision("b@dns.example", "dns.example", "tempfail", "tempfail", "mx-dns-error", "enforce", "d1",
                         reply=("451", "4.7.5", "dns"))
    decider = FakeDecider({"a@slow.example": pending, "b@dns.example": dns_error,
                           "c@example.com": violation("c@example.com", "hold")})  # on_violation = hold
    ctx = session(decider, monkeypatch, non_smtp="hold").open_non_smtp()
    ctx._envfrom("cron@here.example")
    for rcpt in ("a@slow.example", "b@dns.example", "c@example.com", "d@fine.example"):
        assert ctx.rcpt(rcpt, mailer=None) == Milter.CONTINUE and ctx._reply is None
    assert ctx._eom() == Milter.CONTINUE
    assert ctx.quarantined == [
        "MTA-STS: MX lookup failed for dns.example; no MX host matches the policy of example.com;"
        " policy lookup not finished for slow.example"
    ]


def test_non_smtp_without_quarantine_accepts_rather_than_strand_the_message(monkeypatch, caplog):
    offer(monkeypatch, Milter.CURR_ACTS & ~Milter.QUARANTINE)
    ctx = non_smtp_violation_session(monkeypatch, non_smtp="hold")
    assert ctx.rcpt("u@example.com", mailer=None) == Milter.CONTINUE
    with caplog.at_level(logging.INFO, logger="stsmilter"):
        assert ctx._eom() == Milter.CONTINUE
    assert ctx._reply is None and ctx.quarantined == []
    assert "action=accept reason=non-smtp quarantine unavailable" in caplog.records[-1].getMessage()


def test_non_smtp_decider_crash_accepts(monkeypatch, caplog):
    class Broken:
        def decide(self, recipient, deadline=None):
            raise RuntimeError("bug")

    ctx = session(Broken(), monkeypatch).open_non_smtp()
    ctx._envfrom("cron@here.example")
    with caplog.at_level(logging.ERROR, logger="stsmilter"):
        assert ctx.rcpt("u@example.com", mailer=None) == Milter.CONTINUE
    assert ctx._reply is None and "RuntimeError" in caplog.text


def test_non_smtp_mail_is_in_scope_whatever_trusted_networks_says(monkeypatch):
    decider = FakeDecider()
    ctx = session(decider, monkeypatch, trusted_networks=()).open_non_smtp()
    ctx._envfrom("cron@here.example")
    ctx.rcpt("a@example.net", mailer=None)
    assert [r for r, _ in decider.asked] == ["a@example.net"]


def test_non_smtp_accepts_and_holds_pass_through(monkeypatch, caplog):
    """Only refusals change: a compliant recipient stays a quiet mx-match accept, and
    on_violation = hold still holds with its own reason."""
    decider = FakeDecider({"u@example.com": violation("u@example.com", "hold")})
    ctx = session(decider, monkeypatch, non_smtp="accept").open_non_smtp()
    ctx._envfrom("cron@here.example")
    before = count("hold", "enforce", "mx-mismatch"), count("accept", "", "no-policy")
    assert ctx.rcpt("a@example.net", mailer=None) == Milter.CONTINUE
    assert ctx.rcpt("u@example.com", mailer=None) == Milter.CONTINUE
    with caplog.at_level(logging.INFO, logger="stsmilter"):
        assert ctx._eom() == Milter.CONTINUE
    assert ctx.quarantined == ["MTA-STS: no MX host matches the policy of example.com"]
    assert (count("hold", "enforce", "mx-mismatch"), count("accept", "", "no-policy")) == (
        before[0] + 1, before[1] + 1)
    assert "action=hold reason=mx-mismatch quarantined" in caplog.records[-1].getMessage()


@pytest.mark.parametrize("hostname, port", [("localhost", 48123), ("[127.0.0.1]", 48123)])
def test_smtp_from_loopback_is_not_mistaken_for_non_smtp(monkeypatch, hostname, port):
    ctx = session(FakeDecider({"<u@example.com>": violation("<u@example.com>", "tempfail", ("451", "4.7.5", "x"))}),
                  monkeypatch, non_smtp="accept").open("127.0.0.1", socket.AF_INET, port=port, hostname=hostname)
    ctx._envfrom("<s@here.example>")
    assert ctx.rcpt("<u@example.com>") == Milter.TEMPFAIL and ctx._reply == ("451", "4.7.5", "x")


# --- the MX TLS check's verdicts (reason mx-tls) --------------------------------------------


def tls_violation(recipient, action, reply=None, would=None, domain="tls.example", mode="enforce"):
    from stsmilter.engine.mxtls import HostResult

    tls = (("mx1.tls.example", HostResult("certificate-expired", "x", 0.0, 300.0)),
           ("mx2.tls.example", HostResult("starttls-not-supported", "y", 0.0, 300.0)))
    return Decision(recipient, domain, action, would or action, "mx-tls", mode, "20240101",
                    ("mx1.tls.example", "mx2.tls.example"), ("*.tls.example",), reply, tls)


def test_an_mx_tls_refusal_is_logged_with_each_host_and_its_failure(monkeypatch, caplog):
    reply = ("451", "4.7.5", "MTA-STS: no MX host of tls.example offers valid TLS: mx1.tls.example: certificate"
                             " has expired")
    decider = FakeDecider({"<u@tls.example>": tls_violation("<u@tls.example>", "tempfail", reply)})
    ctx = session(decider, monkeypatch).open("127.0.0.1")
    ctx._envfrom("<s@here.example>")
    before = count("tempfail", "enforce", "mx-tls")
    with caplog.at_level(logging.INFO, logger="stsmilter"):
        assert ctx.rcpt("<u@tls.example>") == Milter.TEMPFAIL
    assert ctx._reply == reply
    assert count("tempfail", "enforce", "mx-tls") == before + 1
    line = caplog.records[-1]
    assert line.levelname == "WARNING"
    assert line.getMessage().endswith(
        " action=tempfail reason=mx-tls mx=mx1.tls.example,mx2.tls.example"
        " tls=mx1.tls.example:certificate-expired,mx2.tls.example:starttls-not-supported")


def test_a_testing_policy_logs_what_the_mx_tls_check_would_have_done(monkeypatch, caplog):
    decider = FakeDecider({"<u@tls.example>": tls_violation("<u@tls.example>", "accept", would="tempfail",
                                                             mode="testing")})
    ctx = session(decider, monkeypatch).open("127.0.0.1")
    ctx._envfrom("<s@here.example>")
    with caplog.at_level(logging.INFO, logger="stsmilter"):
        assert ctx.rcpt("<u@tls.example>") == Milter.CONTINUE and ctx._reply is None
        assert ctx.rcpt("<u@tls.example>") == Milter.CONTINUE  # not memoized: decided and logged again
    assert len(decider.asked) == 2
    assert caplog.records[-1].getMessage().endswith(
        " mode=testing action=accept reason=mx-tls mx=mx1.tls.example,mx2.tls.example"
        " tls=mx1.tls.example:certificate-expired,mx2.tls.example:starttls-not-supported would=tempfail")


def test_a_held_message_says_which_domain_lacks_valid_tls(monkeypatch):
    decider = FakeDecider({"<u@tls.example>": tls_violation("<u@tls.example>", "hold"),
                           "<v@example.com>": violation("<v@example.com>", "hold")})
    ctx = session(decider, monkeypatch).open("127.0.0.1")
    ctx._envfrom("<s@here.example>")
    for rcpt in ("<u@tls.example>", "<v@example.com>"):
        assert ctx.rcpt(rcpt) == Milter.CONTINUE
    ctx._eom()
    assert ctx.quarantined == ["MTA-STS: no MX host matches the policy of example.com;"
                               " no MX host offers valid TLS for tls.example"]


def test_non_smtp_mail_names_the_mx_tls_cause(monkeypatch, caplog):
    decider = FakeDecider({"<u@tls.example>": tls_violation("<u@tls.example>", "tempfail", ("451", "4.7.5", "x"))})
    ctx = session(decider, monkeypatch).open_non_smtp()
    ctx._envfrom("<s@here.example>")
    with caplog.at_level(logging.INFO, logger="stsmilter"):
        assert ctx.rcpt("<u@tls.example>") == Milter.CONTINUE
    message = caplog.records[-1].getMessage()
    assert " reason=non-smtp " in message and " tls=mx1.tls.example:certificate-expired," in message
    assert message.endswith(" cause=mx-tls")
