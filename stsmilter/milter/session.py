"""The pymilter front end: per-recipient MTA-STS decisions at RCPT TO.

The daemon builds one class per configuration with make_milter_class(decider, config)
and assigns it to Milter.factory. libmilter calls the factory once per MTA connection,
so a reload (a new class in Milter.factory) applies to new connections while each open
connection keeps the snapshot it started with.

The daemon must also call Milter.set_flags(MILTER_FLAGS) before Milter.runmilter():
negotiate() asks the MTA for exactly these actions (QUARANTINE for on_violation = hold,
SETSYMLIST for the @symlist macro lists), and libmilter uses set_flags for MTAs that do
not negotiate.

Scope (per transaction): mail from a SASL-authenticated sender ({auth_authen}), from a
client in [scope] trusted_networks or without a network address (local submission),
non-SMTP mail (below), or mail received by a [scope] daemon_names MTA daemon
({daemon_name}) is checked; anything else (inbound mail) is accepted untouched.
Recipients routed to a [scope] skip_mailers transport ({rcpt_mailer}) are not looked up.

Non-SMTP mail (scope.py explains how it is recognised): Postfix cannot refuse one
recipient of it, so a recipient the milter would refuse is accepted there ([milter]
non_smtp = accept) or the whole message is quarantined at end of message (non_smtp =
hold), counted and logged with reason "non-smtp".

Only connect, envfrom, envrcpt, data and eom are implemented, so negotiation
(negotiation.py) tells the MTA to skip HELO, headers, end of headers, body and unknown commands (P_NOHELO,
P_NOHDRS, P_NOEOH, P_NOBODY, P_NOUNKNOWN). DATA is answered on purpose: with DATA
negotiated away Postfix still sends its macros, and that unanswered write followed at
once by end-of-message costs ~40 ms per message over TCP (Nagle against delayed ACK).
connect and envfrom always continue, so they are @noreply (P_NR_CONN, P_NR_MAIL): with
Postfix 3.7 over TCP that measured ~15% faster per message and showed no such stall.

Macros asked for (@symlist), each one read: {daemon_name} at connect (only with [scope]
daemon_names), {auth_authen} at MAIL, {rcpt_mailer} at RCPT, and i at MAIL, RCPT and end
of message for log lines (Sendmail and non-SMTP mail have the queue id from MAIL on).

Queue ids: Postfix creates the queue file after the first accepted recipient, so the
first RCPT of a transaction has no "i" macro yet; such lines say queue_id=NOQUEUE,
as Postfix's own log does.
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Tuple

import Milter

from stsmilter import metrics
from stsmilter.engine import decision
from stsmilter.engine.decision import ACCEPT, HOLD, REJECT, TEMPFAIL
from stsmilter.milter.negotiation import NegotiatingMilter
from stsmilter.milter.scope import client_text, client_trusted, non_smtp_session, trusted_address_check

log = logging.getLogger("stsmilter")

# Accept reasons too common to log one line each (metrics still count them). A
# compliant recipient is the normal case; logging it was 45% of the milter's CPU.
QUIET_REASONS = frozenset(
    {"mx-match", "no-policy", "mode-none", "out-of-scope", "skip-mailer", "local-domain", "no-domain", "dane"}
)

NO_QUEUE_ID = "NOQUEUE"  # what Postfix logs before the queue file exists (first RCPT)

REFUSALS = frozenset({TEMPFAIL, REJECT})
NON_SMTP = "non-smtp"  # decision reason: a refusal turned into non_smtp's action

# What a held message waits for, by the reason its recipient would have been refused.
HOLD_CAUSES = {
    "mx-mismatch": "no MX host matches the policy of ",
    "pending": "policy lookup not finished for ",
    "mx-dns-error": "MX lookup failed for ",
    "mx-tls": "no MX host offers valid TLS for ",
}

# What getsymval() gives for a macro value that is not UTF-8: not empty (a SASL login is
# still a login), and equal to no configured daemon name or mailer.
UNREADABLE_MACRO = "\ufffd"

# A quiet accept (compliant MX, mode none, no policy) is reused for the same domain for
# this long: mail to one domain comes in bursts, and a full decision per recipient was
# the milter's main cost. Violations, testing, dry-run and anything logged are decided
# every time. One second is nothing next to the policy cache's own id_check_interval.
ACCEPT_MEMO_SECONDS = 1.0
ACCEPT_MEMO_REASONS = frozenset({"mx-match", "mode-none", "no-policy", "dane"})
ACCEPT_MEMO_SIZE = 10000


def make_milter_class(decider: decision.Decider, config) -> type:
    """A StsMilter subclass bound to decider and config.milter / config.scope."""
    scope = config.scope
    return type(
        "BoundStsMilter",
        (StsMilter,),
        {
            "decider": decider,
            "lookup_timeout": config.milter.lookup_timeout,
            "dry_run": config.milter.dry_run,
            "non_smtp_action": config.milter.non_smtp,
            "trusted_address": staticmethod(trusted_address_check(tuple(scope.trusted_networks))),
            "daemon_names": frozenset(scope.daemon_names),
            "skip_mailers": frozenset(scope.skip_mailers),
            # per configuration snapshot: a reload starts with an empty memo
            "accept_memo": {},
        },
    )


class StsMilter(NegotiatingMilter):
    # Bound by make_milter_class().
    decider: decision.Decider
    lookup_timeout: float = 5.0
    dry_run: bool = False
    non_smtp_action: str = ACCEPT
    trusted_address = staticmethod(trusted_address_check(()))
    daemon_names: frozenset = frozenset()
    skip_mailers: frozenset = frozenset()
    accept_memo: dict = {}

    # Connection and transaction state starts from these class attributes, so that the
    # object made for every MTA connection needs no __init__ (nor close() a reset).
    # Trusted or address-less client, or a daemon_names daemon. Set by connect(); a
    # connect that pymilter could not decode (see log_untrapped_exception) never
    # reaches it, and such a client's mail is checked rather than waved through.
    client_in_scope = True
    non_smtp = False  # Postfix non_smtpd_milters session: no recipient can be refused
    client = "-"  # the client's IP address, for log lines
    in_scope = False
    queue_id: Optional[str] = None
    holds: Tuple[Tuple[decision.Decision, str], ...] = ()  # (verdict, why it is held)

    def getsymval(self, name):
        # pymilter decodes macro values as strict UTF-8 and raises on anything else.
        try:
            return self._ctx.getsymval(name)
        except UnicodeDecodeError:
            return UNREADABLE_MACRO

    def _reset(self) -> None:
        self.in_scope = False
        self.queue_id = None
        self.holds = ()

    @Milter.noreply
    @Milter.symlist("{daemon_name}")
    def connect(self, hostname, family, hostaddr):
        self.non_smtp = non_smtp = non_smtp_session(family, hostaddr)
        self.client = "local" if non_smtp else client_text(family, hostaddr)
        # Non-SMTP mail is local submission: in scope whatever trusted_networks says.
        in_scope = non_smtp or client_trusted(family, hostaddr, self.trusted_address)
        if not in_scope and self.daemon_names:  # the macro is read only where it can matter
            in_scope = self.getsymval("{daemon_name}") in self.daemon_names
        self.client_in_scope = in_scope
        return Milter.CONTINUE

    def envfrom_bytes(self, sender, *params):
        # Milter.Base's looks up a decoding strategy on envfrom (an AttributeError caught
        # on every call) and decodes every argument, none of which envfrom() reads.
        return self.envfrom(sender)

    @Milter.noreply
    @Milter.symlist("{auth_authen}", "i")
    def envfrom(self, sender, *params):
        self._reset()
        self.in_scope = self.client_in_scope or bool(self.getsymval("{auth_authen}"))
        return Milter.CONTINUE

    def envrcpt_bytes(self, to, *params):
        # The recipient as Milter.Base's gives it (UTF-8 with surrogateescape, which
        # cannot fail), without its decoding-strategy lookup on every call; the ESMTP
        # parameters are not read.
        return self.envrcpt(to.decode("utf-8", "surrogateescape"))

    @Milter.symlist("{rcpt_mailer}", "i")
    def envrcpt(self, to, *params):
        if not self.in_scope:
            metrics.count_decision(ACCEPT, "", "out-of-scope")
            return Milter.CONTINUE
        mailer = self.getsymval("{rcpt_mailer}")
        if mailer and mailer in self.skip_mailers:
            metrics.count_decision(ACCEPT, "", "skip-mailer")
            return Milter.CONTINUE
        now = time.monotonic()
        # Keyed by the raw domain text: the same spelling gives the same decision.
        memo_key = to.rpartition("@")[2]
        memo = self.accept_memo.get(memo_key)
        if memo is not None and memo[0] > now:
            memo[1].inc()  # counted like the decision it repeats
            return Milter.CONTINUE
        try:
            # The Decider keeps to the deadline; nothing here waits on top of it.
            verdict = self.decider.decide(to, now + self.lookup_timeout)
        except Exception:
            log.exception("queue_id=%s client=%s MTA-STS decision failed for a recipient", self._queue_id(), self.client)
            if self.dry_run or self.non_smtp:  # non-SMTP: a tempfail would strand the message
                return Milter.CONTINUE
            self.setreply("451", "4.3.0", "MTA-STS check failed, try again later")
            return Milter.TEMPFAIL
        cause = verdict.reason
        if verdict.action in REFUSALS and self.non_smtp:
            verdict = verdict._replace(action=self.non_smtp_action, reason=NON_SMTP, reply=None)
        counter = metrics.decision_counter(verdict.action, verdict.mode or "", verdict.reason)
        counter.inc()
        if verdict.action == ACCEPT == verdict.would and verdict.reason in ACCEPT_MEMO_REASONS:
            if len(self.accept_memo) >= ACCEPT_MEMO_SIZE:
                self.accept_memo.clear()
            self.accept_memo[memo_key] = (now + ACCEPT_MEMO_SECONDS, counter)
        self._log(verdict, cause)
        if verdict.action in REFUSALS:
            code, xcode, text = verdict.reply
            self.setreply(code, xcode, text.replace("%", "%%"))  # libmilter formats it
            return Milter.TEMPFAIL if verdict.action == TEMPFAIL else Milter.REJECT
        if verdict.action == HOLD:
            self.holds += ((verdict, cause),)
        return Milter.CONTINUE

    def data(self):
        return Milter.CONTINUE

    @Milter.symlist("i")
    def eom(self):
        if not self.holds:
            return Milter.CONTINUE
        queue_id = self._queue_id()
        reasons = ",".join(sorted({verdict.reason for verdict, _ in self.holds}))
        text = self._hold_text()
        try:
            self.quarantine(text)
        except (Milter.DisabledAction, Milter.error) as e:
            if self.non_smtp:
                # A tempfail would keep the message in the maildrop queue for ever; the
                # socketmap still checks its delivery.
                log.warning(
                    "queue_id=%s client=%s action=accept reason=%s quarantine unavailable: %s",
                    queue_id, self.client, reasons, e,
                )
                return Milter.CONTINUE
            # The MTA cannot hold mail: tempfail it rather than let the violation through.
            log.warning(
                "queue_id=%s client=%s action=tempfail reason=%s quarantine unavailable: %s",
                queue_id, self.client, reasons, e,
            )
            self.setreply("451", "4.7.5", text.replace("%", "%%"))
            return Milter.TEMPFAIL
        log.warning("queue_id=%s client=%s action=hold reason=%s quarantined: %s", queue_id, self.client, reasons, text)
        return Milter.CONTINUE

    def _hold_text(self) -> str:
        """'MTA-STS: no MX host matches the policy of a.example, b.example; ...'"""
        domains_by_cause = {}
        for verdict, cause in self.holds:
            domains_by_cause.setdefault(cause, set()).add(verdict.domain or "-")
        parts = [
            HOLD_CAUSES.get(cause, cause + ": ") + decision.safe_names(sorted(domains))
            for cause, domains in sorted(domains_by_cause.items())
        ]
        return decision.cap_text("MTA-STS: " + "; ".join(parts))

    def abort(self):
        self._reset()
        return Milter.CONTINUE

    def _queue_id(self) -> str:
        """The MTA's queue id, asked for only when a line is logged (it is rarely needed
        and each macro lookup costs a call into libmilter)."""
        self.queue_id = self.getsymval("i") or self.queue_id
        return self.queue_id or NO_QUEUE_ID

    def _log(self, verdict: decision.Decision, cause: str) -> None:
        """cause: the decision's own reason when verdict.reason replaced it (non-smtp)."""
        if verdict.action == ACCEPT and verdict.would == ACCEPT and verdict.reason in QUIET_REASONS:
            return
        line = (
            f"queue_id={self._queue_id()} client={self.client} domain={verdict.domain or '-'}"
            f" policy_id={decision.safe_id(verdict.policy_id) or '-'} mode={verdict.mode or '-'}"
            f" action={verdict.action} reason={verdict.reason} mx={decision.safe_names(verdict.mx, sep=',', empty='-')}"
        )
        if verdict.reason == "mx-tls" or cause == "mx-tls":  # which host failed how
            line += " tls=" + ",".join(
                f"{decision.safe_name(host)}:{result.kind}" for host, result in verdict.tls[: decision.MAX_NAMES]
                if result is not None)
        if verdict.would != verdict.action:
            line += f" would={verdict.would}"
        if cause != verdict.reason:
            line += f" cause={cause}"
        refused = verdict.action != ACCEPT or verdict.would != ACCEPT
        log.log(logging.WARNING if refused else logging.INFO, line)


UNTRAPPED_LOG_INTERVAL = 60.0
_untrapped = {"next_log": 0.0, "count": 0}


def log_untrapped_exception(exc_type, exc, tb) -> None:
    """sys.excepthook for the daemon. pymilter hands here what it could not pass to a
    callback and then answers with its exception policy (tempfail). Met in practice: a
    connect packet whose host name is not UTF-8, which pymilter decodes in C before any
    of our code runs. One line a minute for those instead of bare exception text."""
    if not issubclass(exc_type, UnicodeDecodeError):
        log.error("uncaught exception", exc_info=(exc_type, exc, tb))
        return
    _untrapped["count"] += 1
    now = time.monotonic()
    if now >= _untrapped["next_log"]:
        log.warning("milter: %d MTA packet(s) with text that is not UTF-8 where pymilter expects UTF-8"
                    " (host name); pymilter answered tempfail", _untrapped["count"])
        _untrapped["next_log"], _untrapped["count"] = now + UNTRAPPED_LOG_INTERVAL, 0
