"""Real SMTP peers on loopback: an aiosmtpd sink that records what it receives.

``SmtpSink()`` plays a receiving MX. With ``tls_context`` it offers STARTTLS (never
requires it); with ``tls_context=None`` it offers no STARTTLS at all, which is what a
STARTTLS-stripping attacker presents to the sending MTA.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

from aiosmtpd.controller import Controller

LOOPBACK = "127.0.0.1"
RESERVED_PORTS = frozenset({2024})  # taken by another process on the test machines


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on right now (also usable as a 'closed port')."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in RESERVED_PORTS:
            return port


def tls_server_context(ca, *names: str) -> ssl.SSLContext:
    """Server context with a certificate for ``names`` issued by a trustme ``ca``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


@dataclass(frozen=True)
class ReceivedMessage:
    mail_from: str
    rcpt_tos: Tuple[str, ...]
    data: bytes
    tls: bool  # the session ran STARTTLS before this message
    tls_version: Optional[str]  # e.g. "TLSv1.3"
    helo: Optional[str]
    peer: Tuple[str, int]


class _RecordingHandler:
    def __init__(self, sink: "SmtpSink"):
        self._sink = sink

    async def handle_DATA(self, server, session, envelope):
        ssl_object = (session.ssl or {}).get("ssl_object")
        data = envelope.original_content or envelope.content or b""
        self._sink._record(
            ReceivedMessage(
                mail_from=envelope.mail_from,
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=data if isinstance(data, bytes) else data.encode(),
                tls=ssl_object is not None,
                tls_version=ssl_object.version() if ssl_object is not None else None,
                helo=session.host_name,
                peer=tuple(session.peer[:2]),
            )
        )
        return "250 2.0.0 Ok: queued by stsmilter test sink"


class _PreboundController(Controller):
    """Controller serving on a socket we bound ourselves.

    aiosmtpd 1.4.6 cannot serve on port 0 (its readiness probe connects to
    ``self.port``), and "find a free port, close it, pass it" races with other
    processes. Binding first and handing asyncio the socket has no race.
    """

    def __init__(self, handler, sock: socket.socket, **kwargs):
        host, port = sock.getsockname()[:2]
        super().__init__(handler, hostname=host, port=port, **kwargs)
        self._sock = sock

    def _create_server(self):
        return self.loop.create_server(self._factory_invoker, sock=self._sock)


class SmtpSink:
    """An SMTP server on 127.0.0.1 that accepts everything and records it."""

    def __init__(
        self,
        *,
        host: str = LOOPBACK,
        port: int = 0,
        tls_context: Optional[ssl.SSLContext] = None,
        hostname: str = "sink.stsmilter.test",
        handler=None,
    ):
        if not host.startswith("127.") and host != "::1":
            raise ValueError(f"test peers listen on loopback only, not {host!r}")
        self.host = host
        self._requested_port = port  # 0: any free port
        self.port: Optional[int] = None
        self.tls_context = tls_context
        # An explicit greeting name: aiosmtpd's default is socket.getfqdn(), a
        # resolver lookup of this machine's name.
        self.hostname = hostname
        self.handler = handler  # an aiosmtpd handler of the caller's (None: record messages)
        self._messages: List[ReceivedMessage] = []
        self._changed = threading.Condition()
        self._controller: Optional[_PreboundController] = None

    @property
    def address(self) -> Tuple[str, int]:
        return (self.host, self.port)

    @property
    def messages(self) -> List[ReceivedMessage]:
        with self._changed:
            return list(self._messages)

    def _record(self, message: ReceivedMessage) -> None:
        with self._changed:
            self._messages.append(message)
            self._changed.notify_all()

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> List[ReceivedMessage]:
        """Block until at least ``count`` messages arrived; return them all."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"sink got {len(self._messages)} of {count} messages in {timeout}s")
                self._changed.wait(remaining)
            return list(self._messages)

    def start(self) -> "SmtpSink":
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._requested_port))
            sock.listen(64)
            self.port = sock.getsockname()[1]
            self._controller = _PreboundController(
                self.handler or _RecordingHandler(self),
                sock,
                server_hostname=self.hostname,
                tls_context=self.tls_context,
                require_starttls=False,
            )
            self._controller.start()
        except BaseException:
            if self._controller is not None:
                self._controller.stop(no_assert=True)
                self._controller = None
            sock.close()
            raise
        return self

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()  # closes the listening socket with the server

    def __enter__(self) -> "SmtpSink":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
